"""The teacher stage: quality gate on unseen gold labels, accuracy on the test queries, then labeling.

Every number is measured under the current fingerprint on each run; DSPy's LM cache (in the artifact
directory) makes re-measuring an unchanged teacher cheap, and labeling resumes from `labels.jsonl`.
"""

from __future__ import annotations

from pathlib import Path

import dspy
import numpy as np
from pydantic import BaseModel

from distill.active import ActiveResult, PoolScorer, RoundSummary, active_label
from distill.config import Config
from distill.data.dataset import TaskData, write_jsonl
from distill.errors import DistillError
from distill.evaluation.variants import measure_calls
from distill.stages.base import (
    CallStats,
    Manifest,
    Stage,
    code_version,
    endpoint_fingerprint,
    fingerprint,
    prompt_fingerprint,
    require,
)
from distill.stages.data import data_fingerprint
from distill.teacher.labeling import LabelingResult, label_queries, quality_gate, score_teacher
from distill.teacher.labeling_ray import label_queries_ray
from distill.teacher.program import GoldIndex, HybridTeacher, build_teacher, build_vote, embed
from distill.teacher.routing import Routing, grid_line, tune_routing
from distill.teacher.vote import LabelVote


class VoteSummary(BaseModel):
    c: float  # logistic regression's C, chosen by leave-one-out on gold
    loo_accuracy_gold: dict[str, float]  # C -> leave-one-out accuracy of plain LR on gold (how C was chosen)
    accuracy_test: float  # the vote alone on the same test queries as the teacher


class TeacherManifest(Manifest):
    model: str
    strategy: str
    k: int
    candidate_k: int
    accuracy_gold: float  # leave-one-out on the gold labels (the quality gate)
    valid_rate_gold: float
    n_gold: int
    accuracy_test: float
    valid_rate: float
    test_size: int
    test_queries_per_s: float
    labeled: int
    to_label: int
    labels_per_s: float | None  # None when every label was already there (a resumed run)
    labeling_engine: str = "threads"  # teacher.engine: threads | ray_data
    labeling_concurrency: int = 0  # concurrent teacher calls while labeling (threads, or actors x calls)
    calls: CallStats
    # vote_llm only: share of queries the LLM answered (the vote answered the rest), and the vote alone.
    llm_share_gold: float | None = None
    llm_share_test: float | None = None
    vote: VoteSummary | None = None
    calls_llm: CallStats | None = None  # vote_llm: the teacher timed with every query going to the LLM
    # vote_llm: the threshold the teacher labeled with, and (auto, or curation.min_confidence auto) the
    # leave-one-out grid on gold it was chosen from, with curation's floor.
    vote_confidence: float | None = None
    routing: Routing | None = None
    # data.selection: active -- each round's picks (selection.jsonl has every query's round and score).
    selection: str = "random"
    active_rounds: list[RoundSummary] | None = None
    # data.num_calibration: the teacher on the held-out hand labels (the cascade chooses its threshold there)
    accuracy_calibration: float | None = None
    n_calibration: int = 0


class TeacherStage(Stage[TeacherManifest]):
    name = "teacher"
    title = "teacher: quality gate and labeling"
    manifest_type = TeacherManifest
    upstream = ("data",)

    def __init__(self, cfg: Config, data: TaskData) -> None:
        super().__init__(cfg)
        self.data = data

    @property
    def labels_path(self) -> Path:
        return self.dir / "labels.jsonl"

    def labeling_fingerprint(self) -> str:
        """What the labels depend on: the teacher, its prompt and the queries (not how it is timed)."""
        cfg = self.cfg
        return fingerprint(cfg.teacher.model_dump(exclude={"threads", "engine", "ray_data", "min_accuracy_gold",
                                                           "max_consecutive_failures"}),
                           endpoint_fingerprint(cfg, cfg.models.teacher),
                           prompt_fingerprint(cfg, self.data.labels, student=False), data_fingerprint(self.data),
                           code_version("distill.teacher", "distill.program", "distill.lm"), *self.selection_parts())

    def selection_parts(self) -> tuple[object, ...]:
        """Active selection's settings (random selection adds nothing: its fingerprints are unchanged)."""
        d = self.cfg.data
        if d.selection != "active":
            return ()
        return (d.active.model_dump(), d.seed_size, self.cfg.seed, code_version("distill.data.selection", "distill.active"))

    def inputs(self) -> dict[str, str]:
        return {"data": data_fingerprint(self.data)}

    def fingerprint(self) -> str:
        return fingerprint(self.labeling_fingerprint(), self.cfg.evaluation.latency_queries)

    @property
    def test_predictions_path(self) -> Path:
        """The teacher's answer to every test query (the cascade stage's fallback answers)."""
        return self.dir / "test_predictions.jsonl"

    @property
    def calibration_predictions_path(self) -> Path:
        """The teacher's answer to every query of the calibration split (data.num_calibration), as for test."""
        return self.dir / "calibration_predictions.jsonl"

    def outputs(self, manifest: TeacherManifest) -> list[Path]:
        return [self.labels_path, self.test_predictions_path,
                *([self.calibration_predictions_path] if manifest.n_calibration else [])]

    def describe(self, m: TeacherManifest) -> str:
        return (f"{m.labeled} labels in {self.labels_path}; accuracy gold {m.accuracy_gold:.1%}, "
                f"test {m.accuracy_test:.1%}")

    def check(self, m: TeacherManifest) -> None:
        quality_gate(m.accuracy_gold, m.n_gold, self.cfg.teacher.min_accuracy_gold)

    def run(self) -> TeacherManifest:
        cfg, data, t = self.cfg, self.data, self.cfg.models.teacher
        queries = data.to_label
        with self.endpoint(t):
            lm = self.lm(t)
            index = None if cfg.teacher.strategy == "zero_shot" else GoldIndex(data.gold, cfg.teacher.embedder)
            vote = build_vote(index, data.labels) if cfg.teacher.strategy == "vote_llm" else None
            gate_set = data.gold[: cfg.teacher.gate_size] if cfg.teacher.gate_size else data.gold
            routing = self.routing(lm, index, vote, gate_set)
            threshold = routing.vote_confidence if routing else None
            loo = build_teacher(cfg, data.labels, data.gold, exclude_identical=True, index=index, vote=vote,
                                vote_confidence=threshold)
            # The chosen teacher on the same gold: its LLM calls are the routing pass's, from DSPy's cache.
            gate = score_teacher(loo, lm, gate_set, data.labels, cfg.teacher.threads)
            quality_gate(gate.accuracy, gate.n, cfg.teacher.min_accuracy_gold)
            teacher = build_teacher(cfg, data.labels, data.gold, index=index, vote=vote, vote_confidence=threshold)
            recorder = _Recorder(teacher)
            test = score_teacher(recorder, lm, data.test, data.labels, cfg.teacher.threads)
            recorder.write(self.test_predictions_path, data.test)
            print(f"teacher accuracy on {test.n} test queries: {test.accuracy:.1%} (valid {test.valid_rate:.1%})"
                  + (f", the LLM answered {test.llm_share:.0%} of them" if test.llm_share is not None else ""))
            held = None
            if data.calibration:  # scored as test is: the cascade's threshold is chosen on these answers
                held = score_teacher(recorder, lm, data.calibration, data.labels, cfg.teacher.threads)
                recorder.write(self.calibration_predictions_path, data.calibration)
                print(f"teacher accuracy on the {held.n} calibration-split queries: {held.accuracy:.1%}")
            vote_summary = self.vote_summary(teacher) if isinstance(teacher, HybridTeacher) else None
            active = self.label_active(teacher, lm, index, vote) if cfg.data.selection == "active" else None
            if active is not None:
                result, expected = active.labeling, active.picked
            else:
                result, expected = self.label(teacher, lm, queries), len(queries)
            if result.labeled < expected:  # no manifest: the next run retries the failed ones
                raise DistillError(f"{expected - result.labeled} queries are not labeled yet (errors in "
                                   f"{self.dir / 'errors.jsonl'}); run the teacher stage again to retry them")
            # The same test queries the best student is timed on in the evaluation stage.
            timed = data.test[: cfg.evaluation.latency_queries]
            calls = CallStats(model=t.model, **measure_calls(teacher, self.lm(t, cache=False), timed))
            calls_llm = None
            if isinstance(teacher, HybridTeacher):  # the vote is instant: also time the path through the LLM
                always_llm = HybridTeacher(teacher.program, teacher.index, teacher.vote, teacher.k,
                                           teacher.candidate_m, vote_confidence=1.0)
                calls_llm = CallStats(model=t.model, **measure_calls(always_llm, self.lm(t, cache=False), timed))
        print(calls.line("teacher"))
        if calls_llm:
            print(calls_llm.line("teacher, every query through the LLM"))
        return TeacherManifest(
            fingerprint=self.fingerprint(), model=t.model, strategy=cfg.teacher.strategy, k=cfg.teacher.k,
            candidate_k=cfg.teacher.candidate_k, accuracy_gold=round(gate.accuracy, 4),
            valid_rate_gold=round(gate.valid_rate, 4), n_gold=gate.n, accuracy_test=round(test.accuracy, 4),
            valid_rate=round(test.valid_rate, 4), test_size=test.n, test_queries_per_s=round(test.per_s, 3),
            labeled=result.labeled, to_label=expected,
            labels_per_s=round(result.new / result.seconds, 3) if result.new else None, calls=calls,
            labeling_engine=cfg.teacher.engine, labeling_concurrency=self.labeling_concurrency(),
            llm_share_gold=gate.llm_share, llm_share_test=test.llm_share, vote=vote_summary, calls_llm=calls_llm,
            vote_confidence=teacher.vote_confidence if isinstance(teacher, HybridTeacher) else None, routing=routing,
            selection=cfg.data.selection, active_rounds=active.rounds if active else None,
            accuracy_calibration=round(held.accuracy, 4) if held else None, n_calibration=held.n if held else 0,
        )

    def routing(self, lm: dspy.LM, index: GoldIndex | None, vote: LabelVote | None,
                gold: list[dspy.Example]) -> Routing | None:
        """vote_llm: the routing threshold, chosen by leave-one-out on `gold` when `auto` (or the profile's
        number), with the grid as evidence. Skipped for a number unless curation's floor is auto."""
        t, floor = self.cfg.teacher, self.cfg.curation.min_confidence
        if t.strategy != "vote_llm" or (t.vote_confidence != "auto" and floor != "auto"):
            return None
        assert index is not None and vote is not None
        loo = build_teacher(self.cfg, self.data.labels, self.data.gold, exclude_identical=True, index=index,
                            vote=vote, vote_confidence=1.0)
        assert isinstance(loo, HybridTeacher)
        fixed = None if t.vote_confidence == "auto" else float(t.vote_confidence)
        routing = tune_routing(loo, lm, gold, t.threads, fixed=fixed, floor_auto=floor == "auto",
                               floor_fixed=None if floor in (None, "auto") else float(floor))
        print(grid_line(routing))
        return routing

    def program(self) -> dspy.Module:
        """The teacher this stage labeled with (its chosen `vote_confidence` read from the manifest)."""
        m = require(self.load(), "teacher")
        index = None if self.cfg.teacher.strategy == "zero_shot" else GoldIndex(self.data.gold, self.cfg.teacher.embedder)
        return build_teacher(self.cfg, self.data.labels, self.data.gold, index=index, vote_confidence=m.vote_confidence)

    def label(self, teacher: dspy.Module, lm: dspy.LM, queries: list[dspy.Example]) -> LabelingResult:
        """Label the queries with the profile's engine, into this stage's directory (resuming)."""
        t = self.cfg.teacher
        labels_fp = self.labels_fingerprint(teacher)
        if t.engine == "ray_data":  # the actors build their own client to the same endpoint, with this cache
            cache_dir = dspy.cache.disk_cache_dir if dspy.cache.enable_disk_cache else None
            return label_queries_ray(teacher, self.cfg.models.teacher, queries, self.dir, t.ray_data,
                                     fingerprint=labels_fp, cache=True,
                                     cache_dir=Path(cache_dir) if cache_dir else None)
        return label_queries(teacher, lm, queries, self.dir, threads=t.threads, fingerprint=labels_fp,
                             max_consecutive_failures=t.max_consecutive_failures)

    def labels_fingerprint(self, teacher: dspy.Module) -> str:
        labels_fp = self.labeling_fingerprint()
        if isinstance(teacher, HybridTeacher) and self.cfg.teacher.vote_confidence == "auto":
            # The threshold is chosen on each run: labels made with another one are not these labels.
            labels_fp = fingerprint(labels_fp, teacher.vote_confidence)
        return labels_fp

    def label_active(self, teacher: dspy.Module, lm: dspy.LM, index: GoldIndex | None,
                     vote: LabelVote | None) -> ActiveResult:
        """data.selection active: a random seed round, then rounds picked by the vote's uncertainty over the
        pool (refitted on the labels so far), each labeled with the profile's engine (resuming)."""
        cfg, data = self.cfg, self.data
        index = index or GoldIndex(data.gold, cfg.teacher.embedder)
        vote = vote or build_vote(index, data.labels)  # the uncertainty signal, whatever the teacher's strategy
        pool_vecs = embed(cfg.teacher.embedder, [ex.text for ex in data.pool]).astype(np.float32)
        scorer = PoolScorer(vote, pool_vecs, refit=cfg.data.active.refit)
        return active_label(data.pool, scorer, cfg.data.active, cfg.data.seed_size,
                            lambda qs: self.label(teacher, lm, qs), self.dir, self.labels_fingerprint(teacher),
                            seed=cfg.seed)

    def labeling_concurrency(self) -> int:
        t = self.cfg.teacher
        return t.ray_data.actors * t.ray_data.calls_per_actor if t.engine == "ray_data" else t.threads

    def vote_summary(self, teacher: HybridTeacher) -> VoteSummary:
        """The teacher's vote alone on the test queries: what the LLM adds on top of it."""
        vecs = embed(self.cfg.teacher.embedder, [ex.text for ex in self.data.test])
        predicted = teacher.vote.model.predict(vecs)
        accuracy = sum(str(p) == ex.label for p, ex in zip(predicted, self.data.test)) / max(1, len(self.data.test))
        print(f"the teacher's vote alone: {accuracy:.1%} on the test queries (C={teacher.vote.c:g})")
        return VoteSummary(c=teacher.vote.c, loo_accuracy_gold={f"{c:g}": round(a, 4) for c, a in
                                                                teacher.vote.loo_accuracy.items()},
                           accuracy_test=round(accuracy, 4))


class _Recorder(dspy.Module):
    """The teacher, recording what it answers to each query (by text) while it is scored."""

    def __init__(self, teacher: dspy.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.answers: dict[str, dspy.Prediction] = {}

    def forward(self, text: str) -> dspy.Prediction:
        pred = self.teacher(text=text)
        self.answers[text] = pred  # one text, one answer: the vote is deterministic, the LLM's calls cached
        return pred

    def write(self, path: Path, examples: list[dspy.Example]) -> None:
        """One line per example, in order: the query, its label, the teacher's answer (null: the call failed),
        and (vote_llm) who answered and the vote's confidence."""
        rows = []
        for ex in examples:
            pred = self.answers.get(ex.text)
            rows.append({"text": ex.text, "label": ex.label,
                         "predicted": pred.get("label") if pred is not None else None,
                         "source": pred.get("source") if pred is not None else None,
                         "confidence": _float(pred.get("confidence")) if pred is not None else None})
        write_jsonl(path, rows)


def _float(x: object) -> float | None:
    return None if x is None else float(x)  # type: ignore[arg-type]
