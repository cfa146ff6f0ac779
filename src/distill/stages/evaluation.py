"""The evaluation stage: base and finetuned student, zero-shot and BFRS-optimized, on the synthetic
devset, the optimizer valset and the test set; the variant to deploy (chosen on the devset, ties broken on
the optimizer valset, never on the test set), plots, its latency/cost, and the deploy params."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import dspy
from pydantic import BaseModel, ConfigDict

from distill.config import Config
from distill.data.dataset import TaskData, read_jsonl
from distill.evaluation.plots import plot_confusion_matrix, plot_variant_scores
from distill.evaluation.variants import (
    evaluate_and_prompt_optimize,
    measure_calls,
    run_testset_evaluation,
    score_variants,
)
from distill.lm import adapter, make_lm
from distill.program import DeployParams, ProgramParams, load_program
from distill.stages.base import (
    CallStats,
    Manifest,
    Stage,
    Tracked,
    code_version,
    endpoint_fingerprint,
    fingerprint,
    prompt_fingerprint,
    require,
)
from distill.stages.baselines import BaselinesStage
from distill.stages.curation import CurationStage
from distill.stages.finetune import FinetuneStage
from distill.tracking import model_name

BASELINE_NAMES = {"nearest_neighbour": "1-NN on gold", "logistic_regression": "log. regression on gold"}
Scores = dict[str, dict[str, float]]  # {"base"|"finetuned": {"vanilla"|"bfrs": accuracy}}


class BestVariant(BaseModel):
    """The deployed variant: chosen on `devset_score`, ties broken on `tiebreak_score` (the optimizer valset);
    `test_score` is its score on the test set, measured after the choice and never part of it."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    variant: str
    model: str
    program_path: str
    devset_score: float
    tiebreak_score: float | None = None  # on the optimizer valset
    test_score: float
    chosen_on: str = "devset; ties: optimizer valset"


class EvalManifest(Manifest):
    devset: Scores
    optimizer_val: Scores  # the tie-break (BFRS picked its candidates on these queries too)
    testset: Scores
    best: BestVariant  # the deployed variant, chosen on the devset
    sizes: dict[str, int]
    bfrs: dict[str, int]
    plots: dict[str, str]
    calls: CallStats  # the deployed variant, timed like the teacher


class EvaluationStage(Stage[EvalManifest]):
    name = "eval"
    title = "evaluation and prompt optimization (BootstrapFewShotWithRandomSearch)"
    manifest_type = EvalManifest
    upstream = ("teacher", "baselines", "curation", "finetune")

    @classmethod
    def build(cls, graph: Any) -> "EvaluationStage":
        stage = cls(graph.cfg, graph.data, graph.stage("curation"), graph.stage("finetune"))
        stage.baselines = graph.stage("baselines")
        return stage

    def tracked(self, m: EvalManifest) -> Tracked:
        return Tracked(files=[*(Path(p) for p in m.plots.values()), self.dir / "programs", self.deploy_params_path])

    def on_recorded(self, record: Any, m: EvalManifest) -> None:
        if self.cfg.tracking.register_model:  # the deployed program, uncached, as the program app calls it
            params = DeployParams.load(self.deploy_params_path)
            record.register_program(params.load_program(), make_lm(self.cfg.models.student, model=params.model,
                                                                   cache=False),
                                    adapter(params.program.prompt), model_name(self.cfg))

    def __init__(self, cfg: Config, data: TaskData, curation: CurationStage, finetune: FinetuneStage) -> None:
        super().__init__(cfg)
        self.data, self.curation, self.finetune = data, curation, finetune
        self.baselines = BaselinesStage(cfg, data)

    @property
    def deploy_params_path(self) -> Path:
        """The profile's deploy parameters: best model id, saved program, labels (read by the serving app)."""
        return self.cfg.artifacts / "deploy_params.json"

    def inputs(self) -> dict[str, str]:
        return {
            # the teacher's and the baselines' accuracies are reference lines on the plots
            "teacher": require(self.curation.teacher.load(), "teacher").fingerprint,
            "baselines": require(self.baselines.load(), "baselines").fingerprint,
            "curation": require(self.curation.load(), "curation").fingerprint,
            "finetune": require(self.finetune.load(), "finetune").fingerprint,
        }

    def fingerprint(self) -> str:
        cfg = self.cfg
        return fingerprint(self.inputs(), prompt_fingerprint(cfg, self.data.labels), [ex.text for ex in self.data.test],
                           cfg.evaluation.model_dump(exclude={"threads", "max_errors"}),
                           endpoint_fingerprint(cfg, cfg.models.student), cfg.program.model_dump(), cfg.seed,
                           # the modules that score and chart the variants, not the cascade's calibration beside them
                           code_version("distill.evaluation.variants", "distill.evaluation.latency",
                                        "distill.evaluation.plots", "distill.stages.evaluation", "distill.program",
                                        "distill.lm"))

    def outputs(self, m: EvalManifest) -> list[Path]:
        return [self.deploy_params_path, Path(m.best.program_path), *(Path(p) for p in m.plots.values())]

    def describe(self, m: EvalManifest) -> str:
        b = m.best
        return (f"deployed {b.kind} {b.variant} ({b.model}), chosen on the devset ({b.devset_score:.1%}); "
                f"{b.test_score:.1%} on the test set")

    def run(self) -> EvalManifest:
        cfg, data, ev, st = self.cfg, self.data, self.cfg.evaluation, self.cfg.models.student
        ft = require(self.finetune.load(), "finetune")
        teacher = require(self.curation.teacher.load(), "teacher")
        baselines = require(self.baselines.load(), "baselines")
        splits = self.curation.splits()
        dev, train, val = splits["devset"], splits["optimizer_train"], splits["optimizer_val"]
        kinds = {"base": st.model, "finetuned": ft.model}
        program_kw = cfg.program.model_dump(include={"reasoning", "max_reasoning_chars"})
        # The base student needs the full prompt; the finetuned one runs with the prompt it was trained on.
        prompts = {"base": "full", "finetuned": cfg.program.student_prompt}
        bfrs = ev.bfrs.model_dump()
        opt_fp = {k: fingerprint(m, ft.fingerprint if k == "finetuned" else None, bfrs, cfg.seed,
                                 prompt_fingerprint(cfg, data.labels), [ex.text for ex in train + val],
                                 [ex.label for ex in train + val])
                  for k, m in kinds.items()}
        with _lm_cache(cfg.artifacts / "dspy_cache_eval" / ft.fingerprint, cfg.artifacts / "dspy_cache"), \
                self.endpoint(st, ft.serve_config, models=list(kinds.values())):
            lms = {k: self.lm(st, model=m) for k, m in kinds.items()}
            dev_scores, variants = evaluate_and_prompt_optimize(
                lms, data.labels, dev, train, val, self.dir, bfrs, ev.threads, ev.max_errors, opt_fp, **program_kw,
                prompts=prompts)
            # The tie-break: mostly DSPy-cache hits, BFRS scored these programs on the valset already.
            val_scores = score_variants(lms, variants, data.labels, val, self.dir, "optimizer_val", ev.threads,
                                        ev.max_errors, **program_kw)
            # Chosen on the devset (ties: valset) before the test set is scored; test scores are reported only.
            best, test_scores = run_testset_evaluation(
                lms, variants, data.labels, data.test, self.dir, ev.threads, ev.max_errors, dev_scores, val_scores,
                **program_kw)
            best_path, best_model = str(best.program_path), best.model
            best_score = test_scores[best.kind][best.variant]
            calls = CallStats(model=best_model, **measure_calls(
                load_program(best_path, data.labels, **program_kw), self.lm(st, model=best_model, cache=False),
                data.test[: ev.latency_queries], best.prompt))
        print(calls.line(f"deployed student ({best.kind} {best.variant})"))
        out = self.dir
        plots = {
            "devset": plot_variant_scores(dev_scores, out / "devset_scores.png",
                                          f"Synthetic devset ({len(dev)} teacher-labeled queries)",
                                          {"teacher on gold (leave-one-out)": teacher.accuracy_gold}),
            "testset": plot_variant_scores(test_scores, out / "testset_scores.png",
                                           f"Test set ({len(data.test)} queries)",
                                           {"teacher": teacher.accuracy_test,
                                            **{BASELINE_NAMES.get(k, k): v for k, v in baselines.accuracy.items()}}),
        }
        preds = read_jsonl(out / "predictions" / "testset" / f"{best.kind}_{best.variant}.jsonl")
        plots["confusion"] = plot_confusion_matrix(
            [p["label"] for p in preds], [p["predicted"] for p in preds], data.labels, out / "confusion_best.png",
            f"Deployed variant (chosen on the devset) on the test set: {best.kind} {best.variant} ({best_score:.1%})")
        DeployParams(model=best_model, program_path=best_path, labels=data.labels, variant=best.variant,
                     kind=best.kind, test_score=best_score, devset_score=dev_scores[best.kind][best.variant],
                     program=ProgramParams(**program_kw, prompt=best.prompt)
                     ).save(self.deploy_params_path)
        print(f"deployed: {best.kind} {best.variant} ({best_model}), chosen on the devset "
              f"{dev_scores[best.kind][best.variant]:.1%} (ties: optimizer valset "
              f"{val_scores[best.kind][best.variant]:.1%}); test set {best_score:.1%} -> {self.deploy_params_path}")
        return EvalManifest(
            fingerprint=self.fingerprint(), devset=dev_scores, optimizer_val=val_scores, testset=test_scores,
            best=BestVariant(kind=best.kind, variant=best.variant, model=best_model, program_path=best_path,
                             devset_score=dev_scores[best.kind][best.variant],
                             tiebreak_score=val_scores[best.kind][best.variant], test_score=best_score),
            sizes={"devset": len(dev), "testset": len(data.test), "optimizer_train": len(train),
                   "optimizer_val": len(val)},
            bfrs=bfrs, plots={k: str(v) for k, v in plots.items()}, calls=calls,
        )


@contextlib.contextmanager
def _lm_cache(path: Path, restore: Path) -> Iterator[None]:
    """DSPy's LM cache in `path` for this block, then `restore`.

    DSPy keys its cache on the model id and the request, not on the weights behind the id: a retrained
    adapter is served under the same id, so the evaluation keeps one cache per finetune (by fingerprint).
    """
    dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(path))
    try:
        yield
    finally:
        dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(restore))
