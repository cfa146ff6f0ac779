"""The cascade stage (issue 31): the deployed student answers with a confidence; below a threshold the teacher
answers. The calibration and the threshold are fit on the calibration split (`data.num_calibration` hand
labels neither model learns from), else the threshold on the devset and the calibration there or on gold
(`cascade:` in the profile says how); the test set is then scored once: the
cascade against the student and the teacher alone, the fallback share, ECE, the accuracy-vs-fallback curve
over every threshold, a cost estimate, and a per-label table.

The student is served as the evaluation stage serves it (same endpoint, same DSPy caches), asked for
logprobs; the teacher's test answers are the ones the teacher stage recorded while it was scored
(`teacher/test_predictions.jsonl`). On the devset the teacher's answer is the devset label (it labeled it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from distill.config import Config
from distill.data.dataset import TaskData, make_example, read_jsonl, write_jsonl
from distill.errors import DistillError
from distill.evaluation.calibration import (
    calibrate_student,
    ece_noise_floor,
    expected_calibration_error,
    fallback_curve,
)
from distill.evaluation.cascade_report import (
    CallCost,
    CostEstimate,
    LabelRow,
    cost_estimate,
    per_label_report,
    plot_fallback_curve,
    plot_per_label,
)
from distill.evaluation.variants import evaluate
from distill.program import Calibration, DeployParams
from distill.stages.base import (
    CallStats,
    Manifest,
    Stage,
    Tracked,
    code_version,
    endpoint_fingerprint,
    fingerprint,
    require,
)
from distill.stages.evaluation import EvaluationStage, _lm_cache
from distill.stages.teacher import TeacherStage


class SplitScores(BaseModel):
    """One split at the chosen threshold. On the devset "accuracy" is agreement with the teacher's labels
    (the teacher's own is 1 by construction); on the calibration split and the test set, with true labels."""

    model_config = ConfigDict(extra="forbid")

    n: int
    student_accuracy: float
    teacher_accuracy: float
    cascade_accuracy: float
    fallback_share: float  # answered by the teacher
    ece_raw: float  # the student's confidence
    ece_calibrated: float  # after the calibration (fit on `CascadeResult.fit.split`)
    # the ECE a perfectly calibrated predictor exceeds 5% of the time on these calibrated confidences
    # (calibration.ece_noise_floor): below it, this split is too small to tell the fit from calibrated
    ece_noise_floor: float | None = None
    no_confidence: int = 0  # answers without a confidence (a failed call): sent to the teacher, as served


class CalibrationFit(BaseModel):
    """The data the calibration was fit on (`cascade.calibrate_on`), its ECE in-sample."""

    model_config = ConfigDict(extra="forbid")

    # devset (the teacher's labels) | gold (true labels the student never trained on) | calibration (hand
    # labels neither teacher nor student used: data.num_calibration)
    split: str
    n: int
    student_accuracy: float
    ece_raw: float
    ece_calibrated: float


class CascadeResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str  # the deployed student (evaluation's deploy params)
    kind: str
    variant: str
    calibration: Calibration  # fit on `fit.split`
    fit: CalibrationFit | None = None  # None: written before the fit's split was recorded (the devset)
    threshold: float  # on the calibrated confidence: the student answers at >= this
    threshold_rule: str  # how it was chosen, in words
    # the split it was chosen on: devset (agreement with the teacher) | calibration (true labels, the
    # teacher's answers to them; scored in `calibration_split`)
    chosen_on: str = "devset"
    threshold_reached: bool  # the target agreement was reached within the budget
    max_fallback: float
    # the fallback share the budget was checked on (devset + unlabeled queries), how many, its upper bound
    budget_share: float | None = None
    budget_n: int | None = None
    budget_bound: float | None = None
    budget_confidence: float | None = None
    target_agreement: float
    devset: SplitScores
    calibration_split: SplitScores | None = None  # data.num_calibration: in-sample for fit and threshold
    testset: SplitScores
    cost: CostEstimate | None  # teacher as deployed (vote + LLM)
    cost_llm_path: CostEstimate | None = None  # vote_llm: every fallback through the teacher's LLM (upper bound)
    per_label: list[LabelRow]  # test set, worst cascade accuracy first
    plots: dict[str, str]  # reliability, curve, per_label
    cascade_params: str  # cascade.json: what the served cascade reads
    predictions: dict[str, str]


class CascadeManifest(Manifest):
    enabled: bool
    result: CascadeResult | None = None  # None when cascade.enabled is false


def _cost(calls: CallStats | None) -> CallCost | None:
    if calls is None:
        return None
    return CallCost(p50_s=calls.p50_s, p95_s=calls.p95_s, prompt_tokens_per_query=calls.prompt_tokens_per_query,
                    completion_tokens_per_query=calls.completion_tokens_per_query)


class CascadeStage(Stage[CascadeManifest]):
    name = "cascade"
    title = "cascade: the student's confidence, calibrated; the teacher below a threshold chosen on dev data"
    manifest_type = CascadeManifest
    upstream = ("teacher", "curation", "finetune", "eval")

    @classmethod
    def build(cls, graph: Any) -> "CascadeStage":
        return cls(graph.cfg, graph.data, graph.stage("eval"), graph.stage("teacher"))

    def __init__(self, cfg: Config, data: TaskData, evaluation: EvaluationStage, teacher: TeacherStage) -> None:
        super().__init__(cfg)
        self.data, self.evaluation, self.teacher = data, evaluation, teacher

    @property
    def cascade_params_path(self) -> Path:
        return self.dir / "cascade.json"

    def inputs(self) -> dict[str, str]:
        return {
            "teacher": require(self.teacher.load(), "teacher").fingerprint,  # its test answers, its timings
            "curation": require(self.evaluation.curation.load(), "curation").fingerprint,  # the devset
            "finetune": require(self.evaluation.finetune.load(), "finetune").fingerprint,  # the served adapter
            "eval": require(self.evaluation.load(), "evaluation").fingerprint,  # the deployed student
        }

    def fingerprint(self) -> str:
        cfg = self.cfg
        return fingerprint(self.inputs(), cfg.cascade.model_dump(), cfg.calibration_split,
                           endpoint_fingerprint(cfg, cfg.models.student),
                           cfg.evaluation.max_errors,
                           code_version("distill.evaluation", "distill.program", "distill.lm", "distill.stages.cascade"))

    def outputs(self, m: CascadeManifest) -> list[Path]:
        if m.result is None:
            return []
        return [Path(m.result.cascade_params), *(Path(p) for p in m.result.plots.values()),
                *(Path(p) for p in m.result.predictions.values())]

    def tracked(self, m: CascadeManifest) -> Tracked:
        if m.result is None:
            return Tracked()
        return Tracked(files=[*(Path(p) for p in m.result.plots.values()), Path(m.result.cascade_params)],
                       dicts={"cascade_per_label.json": [r.model_dump() for r in m.result.per_label]})

    def describe(self, m: CascadeManifest) -> str:
        if (r := m.result) is None:
            return "cascade.enabled is false"
        t = r.testset
        chosen = r.calibration_split if r.chosen_on == "calibration" and r.calibration_split else r.devset
        return (f"threshold {r.threshold:.3f} (chosen on the {r.chosen_on}: {chosen.fallback_share:.0%} to the teacher); "
                f"test: cascade {t.cascade_accuracy:.1%}, student {t.student_accuracy:.1%}, teacher "
                f"{t.teacher_accuracy:.1%}, {t.fallback_share:.0%} to the teacher")

    def teacher_answers(self, path: Path, examples: list[Any], what: str) -> list[str | None]:
        """The teacher's answer to each query of `examples`, in order, as the teacher stage recorded it."""
        rows = read_jsonl(path) if path.is_file() else []
        if [r["text"] for r in rows] != [ex.text for ex in examples]:
            raise DistillError(f"{path} does not hold the teacher's answers to this run's {what} queries: run the "
                               f"teacher stage again")
        return [r["predicted"] for r in rows]

    def teacher_test_answers(self) -> list[str | None]:
        """The teacher's answer to each test query, in the test set's order (recorded by the teacher stage)."""
        return self.teacher_answers(self.teacher.test_predictions_path, self.data.test, "test")

    def budget_queries(self) -> list[Any]:
        """Up to `cascade.budget_queries` unlabeled queries the teacher never labeled (the pool's seeded order),
        unlabeled: the fallback share is measured on them too (`cascade.budget_confidence`)."""
        labeled = {r["text"] for r in read_jsonl(self.teacher.labels_path)} if self.teacher.labels_path.is_file() \
            else set()
        # "" as the label: evaluate wants one; only the answers' confidences are read
        return [make_example(ex.text, "") for ex in self.data.unlabeled
                if ex.text not in labeled][: self.cfg.cascade.budget_queries]

    def run(self) -> CascadeManifest:
        cfg, data, c = self.cfg, self.data, self.cfg.cascade
        if not c.enabled:
            print("cascade.enabled is false: no calibration, no threshold; serving deploys the student alone")
            return CascadeManifest(fingerprint=self.fingerprint(), enabled=False)
        ft = require(self.evaluation.finetune.load(), "finetune")
        ev = require(self.evaluation.load(), "evaluation")
        teacher_m = require(self.teacher.load(), "teacher")
        params = DeployParams.load(self.evaluation.deploy_params_path)
        dev, test = self.evaluation.curation.splits()["devset"], data.test
        fit_on = cfg.calibration_split
        held = {"gold": data.gold, "calibration": data.calibration}.get(fit_on)
        splits = {"devset": dev, "testset": test, **({fit_on: held} if held is not None else {})}
        teacher_test = self.teacher_test_answers()
        teacher_cal = (self.teacher_answers(self.teacher.calibration_predictions_path, data.calibration,
                                            "calibration-split") if fit_on == "calibration" else None)
        program = params.load_program()
        st, threads, max_errors = cfg.models.student, cfg.evaluation.threads, cfg.evaluation.max_errors
        # As the evaluation stage serves and caches the student: the same endpoint, the same caches.
        with _lm_cache(cfg.artifacts / "dspy_cache_eval" / ft.fingerprint, cfg.artifacts / "dspy_cache"), \
                self.endpoint(st, ft.serve_config, models=[params.model]):
            lm = self.lm(st, model=params.model, logprobs=True)
            scored = {name: evaluate(program, lm, examples, data.labels, threads, max_errors,
                                     name=f"{name}, deployed student with its confidence",
                                     prompt=params.program.prompt, labeled=name != "budget").predictions
                      for name, examples in {**splits, "budget": self.budget_queries()}.items()
                      if examples}  # no unlabeled queries (budget_queries 0, or the whole pool labeled)
        budget_rows = scored.pop("budget", [])
        budget_sample = [p.get("confidence") or 0.0 for p in budget_rows]  # no confidence: to the teacher
        missing = {name: sum(p.get("confidence") is None for p in preds) for name, preds in scored.items()}
        if all(missing[name] == len(scored[name]) for name in scored):
            raise DistillError("the student's answers carry no confidence: does its server decode the label set "
                               "over its answers (choice decoding) and return logprobs? (docs/cascade.md)")
        # No confidence (a failed call): the served cascade asks the teacher; here it counts as confidence 0.
        conf = {name: np.array([p.get("confidence") or 0.0 for p in preds]) for name, preds in scored.items()}
        student = {name: [p["predicted"] for p in preds] for name, preds in scored.items()}
        gold = {k: [ex.label for ex in examples] for k, examples in splits.items()}  # the devset's: the teacher's
        s_ok = {k: np.array([a == g for a, g in zip(student[k], gold[k])]) for k in gold}
        fit_scores = (conf[fit_on], s_ok[fit_on])
        for d in (conf, gold, student):  # gold only fits the calibration: no teacher answers or cascade there
            d.pop("gold", None)
        teacher = {"devset": gold["devset"], "testset": teacher_test,  # the devset's labels are the teacher's
                   **({"calibration": teacher_cal} if teacher_cal is not None else {})}
        t_ok = {k: np.array([a == g for a, g in zip(teacher[k], gold[k])]) for k in gold}

        # Fit on the devset, gold or the calibration split; choose on the calibration split when there is one
        # (true labels: the target is the teacher's accuracy there), else on the devset (agreement with the
        # teacher). The test set only passes through (scored). A share needs no labels, so the budget's is
        # measured on the devset's confidences too: a few hundred split queries alone leave it a few points
        # loose, and the most accurate threshold within the bound stops where that draw runs low.
        on = "calibration" if fit_on == "calibration" else "devset"
        report, cascade = calibrate_student(
            (conf[on], s_ok[on]), (conf["testset"], s_ok["testset"]), self.dir, c.calibration,
            teacher_dev_correct=t_ok[on] if on == "calibration" else None,
            target=c.target_agreement if on == "devset" else None, max_fallback=c.max_fallback, fit=fit_scores,
            fit_on=fit_on, budget_sample=[*conf["devset"], *budget_sample] if on == "calibration" else budget_sample,
            budget_confidence=c.budget_confidence, chosen_on=on,
            most_accurate=on == "calibration" and c.target == "best",
            expected=on == "calibration" and c.target == "expected",
            title=f"Deployed student's confidence, test set ({len(test)} queries; calibration fit on "
                  f"{'the devset' if fit_on == 'devset' else f'{len(fit_scores[0])} {fit_on} labels'})")
        cal = cascade.calibration
        calibrated = {k: np.array(cal.apply_many(conf[k])) for k in conf}
        kept = {k: calibrated[k] >= cascade.threshold for k in conf}

        # ECE before and after calibration, per split (the test set's equals calibrate_student's report)
        ece = {k: (expected_calibration_error(conf[k], s_ok[k]), expected_calibration_error(calibrated[k], s_ok[k]))
               for k in conf}

        def split(k: str) -> SplitScores:
            raw, after = (round(float(x), 4) for x in ece[k])
            return SplitScores(n=len(gold[k]), student_accuracy=round(float(s_ok[k].mean()), 4),
                               teacher_accuracy=round(float(t_ok[k].mean()), 4),
                               cascade_accuracy=round(float(np.where(kept[k], s_ok[k], t_ok[k]).mean()), 4),
                               fallback_share=round(float(1 - kept[k].mean()), 4), ece_raw=raw, ece_calibrated=after,
                               ece_noise_floor=round(ece_noise_floor(calibrated[k]), 4),
                               no_confidence=missing[k])

        scores = {k: split(k) for k in conf}
        out = self.dir
        predictions = {}
        for k in conf:
            predictions[k] = str(out / "predictions" / f"{k}.jsonl")
            write_jsonl(Path(predictions[k]), [
                {"text": ex.text, "label": g, "student": s, "confidence": scored[k][i].get("confidence"),
                 "calibrated": round(float(calibrated[k][i]), 6), "teacher": t,
                 "answered_by": "student" if kept[k][i] else "teacher", "cascade": s if kept[k][i] else t}
                for i, (ex, g, s, t) in enumerate(zip(splits[k], gold[k], student[k], teacher[k]))])
        # the unlabeled queries the budget was also checked on: their confidences, nothing to score
        predictions["budget"] = str(out / "predictions" / "budget.jsonl")
        write_jsonl(Path(predictions["budget"]), [
            {"text": p["text"], "student": p["predicted"], "confidence": p.get("confidence"),
             "calibrated": round(q, 6)} for p, q in zip(budget_rows, cal.apply_many(budget_sample))])
        t = scores["testset"]
        curve = fallback_curve(calibrated["testset"], s_ok["testset"], t_ok["testset"])
        where = "the calibration split" if on == "calibration" else "the devset"
        per_label = per_label_report(gold["testset"], [a or "" for a in teacher_test],
                                     [a or "" for a in student["testset"]], [not k for k in kept["testset"]])
        plots = {
            "reliability": report.plot,
            "curve": str(plot_fallback_curve(
                curve, (t.fallback_share, t.cascade_accuracy), out / "fallback_curve.png",
                f"Cascade on the test set ({t.n} queries) at every threshold;\nthe marked one was chosen on {where}",
                t.student_accuracy, t.teacher_accuracy, budget=c.max_fallback, chosen_on=where)),
            "per_label": str(plot_per_label(
                per_label, out / "per_label.png",
                f"Per label, test set, worst cascade accuracy first (threshold {cascade.threshold:.3f})")),
        }
        student_cost = _cost(ev.calls)
        costs = {name: cost_estimate(student_cost, tc, t.fallback_share)
                 for name, tc in (("teacher", _cost(teacher_m.calls)), ("llm", _cost(teacher_m.calls_llm)))
                 if tc is not None and student_cost is not None}
        result = CascadeResult(
            model=params.model, kind=params.kind or ev.best.kind, variant=params.variant or ev.best.variant,
            calibration=cal, fit=CalibrationFit(split=fit_on, n=report.n_fit or 0,
                                                student_accuracy=round(report.accuracy_fit or 0, 4),
                                                ece_raw=round(report.ece_fit_before or 0, 4),
                                                ece_calibrated=round(report.ece_fit_after or 0, 4)),
            threshold=round(cascade.threshold, 6), threshold_rule=report.threshold_rule,
            threshold_reached=report.threshold_reached, chosen_on=on, max_fallback=c.max_fallback,
            budget_share=report.budget_share, budget_n=report.budget_n, budget_bound=report.budget_bound,
            budget_confidence=report.budget_confidence,
            target_agreement=c.target_agreement, devset=scores["devset"], testset=t, cost=costs.get("teacher"),
            calibration_split=scores.get("calibration"),
            cost_llm_path=costs.get("llm"), per_label=per_label, plots=plots,
            cascade_params=str(self.cascade_params_path), predictions=predictions)
        d = scores[on]
        how = (f"{cal.method}, chosen by 10-fold cross-validated log loss: " + ", ".join(
            f"{k} {v:.4f}" for k, v in cal.cv_log_loss.items())) if cal.cv_log_loss else cal.method
        print(f"calibration ({how}) fit on {fit_on} ({report.n_fit} queries, student accuracy "
              f"{report.accuracy_fit:.1%}): ECE {report.ece_fit_before:.3f} -> {report.ece_fit_after:.3f} in-sample")
        measure = (f"agreement {d.cascade_accuracy:.1%}" if on == "devset" else
                   f"accuracy {d.cascade_accuracy:.1%}, teacher alone {d.teacher_accuracy:.1%}")
        print(f"threshold {result.threshold:.3f} on the {cal.method}-calibrated confidence, chosen on the {on}: "
              f"{d.fallback_share:.0%} of {d.n} {on} queries to the teacher, {measure} "
              f"(student alone {d.student_accuracy:.1%}); {report.threshold_rule}")
        print(f"test set ({t.n}): cascade {t.cascade_accuracy:.1%}, student alone {t.student_accuracy:.1%}, teacher "
              f"alone {t.teacher_accuracy:.1%}; {t.fallback_share:.0%} to the teacher; ECE {t.ece_raw:.3f} raw, "
              f"{t.ece_calibrated:.3f} calibrated (a calibrated predictor exceeds {t.ece_noise_floor:.3f} 5% of the "
              f"time at this size)")
        return CascadeManifest(fingerprint=self.fingerprint(), enabled=True, result=result)
