"""Measuring the learning curve: how many teacher labels does the student need?

Each point is the profile's own pipeline, curation then finetune, with the student's SFT set cut to the
first `n` teacher-labeled queries (`data.optimizer_train_size`; the queries come in the data stage's seeded
order, so the points are nested) or made of the gold labels alone (`curation.sft_source: gold`). The
finetuned student is then scored zero-shot, in its served form (the program through the server's
grammar), on the profile's test queries. The point with every label is the profile's own run.

A point lives in `<artifacts>/curve/<point>/` and starts from copies of the profile's data, baselines and
teacher stages, so nothing is labeled again; its stages are resumable like the pipeline's, and a finished
point (`point.json`, keyed on its finetune) is not measured twice.

Every point trains for at least `min_steps` optimizer steps: with 100 examples one epoch is 13 steps,
which would measure the step count rather than the labels.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator, Sequence

from pydantic import BaseModel, ConfigDict

from distill.config import Config
from distill.data.dataset import TaskData
from distill.errors import DistillError
from distill.evaluation.variants import evaluate
from distill.lm import make_lm
from distill.program import IntentClassificationModule
from distill.stages.base import console, read_manifest, served, write_manifest
from distill.stages.baselines import BaselinesStage
from distill.stages.curation import CurationStage
from distill.stages.data import DataStage
from distill.stages.evaluation import BASELINE_NAMES, EvaluationStage
from distill.stages.finetune import FinetuneManifest, FinetuneStage
from distill.stages.teacher import TeacherStage
from distill.student.finetune import load_recipe
from distill_harness.learning_curve import CurveRow

UPSTREAM = (DataStage.name, BaselinesStage.name, TeacherStage.name)


class PointManifest(BaseModel):
    """`point.json`: a measured point, valid for the finetune it was measured on."""

    model_config = ConfigDict(extra="forbid")

    finetune_fingerprint: str
    row: CurveRow


def batch_size(cfg: Config) -> int:
    t = load_recipe(cfg.path(cfg.finetune.recipe), cfg.finetune.training).training
    return int(t.get("per_device_train_batch_size", 8)) * int(t.get("gradient_accumulation_steps", 1))


def point_config(cfg: Config, source: str, n: int | None, min_steps: int, min_confidence: float | None = None) -> Config:
    """The profile for one point: its own artifact directory, the SFT set cut to `n` (source "teacher") or
    the gold labels (source "gold", `n` = their number), and at least `min_steps` steps. `min_confidence`
    drops the labels the teacher was less sure of before the cut (`curation.min_confidence`)."""
    name = f"gold_{n}" if source == "gold" else f"teacher_{n}"
    if min_confidence is not None:
        name += f"_conf{min_confidence:g}"
    data = cfg.data.model_copy(update={"optimizer_train_size": n}) if source == "teacher" else cfg.data
    curation = cfg.curation.model_copy(update={"sft_source": source, "min_confidence": min_confidence})
    training = dict(cfg.finetune.training)
    if n is not None and math.ceil(n / batch_size(cfg)) < min_steps:  # one epoch is too short: steps instead
        training = {k: v for k, v in training.items() if k != "num_train_epochs"} | {"max_steps": min_steps}
    return cfg.model_copy(update={
        "artifacts_dir": str(cfg.artifacts / "curve" / name), "data": data, "curation": curation,
        "finetune": cfg.finetune.model_copy(update={"training": training}),
    })


def series(source: str, min_confidence: float | None = None) -> str:
    """A point's series on the chart: what the student learned from."""
    name = "teacher labels" if source == "teacher" else "gold labels"
    return name if min_confidence is None else f"{name}, confidence >= {min_confidence:g}"


def measure_point(cfg: Config, source: str, n: int, min_steps: int, threads: int | None = None,
                  min_confidence: float | None = None) -> CurveRow:
    """Finetune and score one point (resumable; a measured point is read back)."""
    pcfg = point_config(cfg, source, n, min_steps, min_confidence)
    for name in UPSTREAM:  # the profile's own labels and references: nothing labeled twice
        if not (pcfg.artifacts / name / "manifest.json").is_file():
            shutil.copytree(cfg.artifacts / name, pcfg.artifacts / name, dirs_exist_ok=True)
    data = DataStage(pcfg).data
    DataStage(pcfg, data).ensure()
    curation = CurationStage(pcfg, data)
    c = curation.ensure()
    if source == "teacher" and c.sft_examples < n:
        raise DistillError(f"only {c.sft_examples} teacher labels to train on, not {n}: lower the point")
    ft = FinetuneStage(pcfg, curation).ensure()
    path = pcfg.artifacts / "point.json"
    done = read_manifest(path, PointManifest)
    if done is not None and done.finetune_fingerprint == ft.fingerprint:
        console.print(f"{path}: measured; skipped")
        return done.row
    row = _score(pcfg, data, ft, series(source, min_confidence), threads)
    write_manifest(path, PointManifest(finetune_fingerprint=ft.fingerprint, row=row))
    return row


def _score(cfg: Config, data: TaskData, ft: FinetuneManifest, name: str, threads: int | None) -> CurveRow:
    """The finetuned student, zero-shot, served, on the test queries (as the evaluation stage scores it)."""
    st, ev, p = cfg.models.student, cfg.evaluation, cfg.program
    program = IntentClassificationModule(data.labels, p.reasoning, p.max_reasoning_chars)
    with served(cfg, st, ft.serve_config, models=[ft.model]):
        # No LM cache: every point serves its adapter under the same model id.
        lm = make_lm(st, model=ft.model, cache=False)
        result = evaluate(program, lm, data.test, data.labels, threads or ev.threads, ev.max_errors,
                          cfg.artifacts / "predictions.jsonl", f"student on {ft.examples} {name}",
                          prompt=p.student_prompt)
    return CurveRow(kind="student", name=name, labels=ft.examples, steps=ft.steps, epochs=round(ft.epochs, 2),
                    train_seconds=ft.train_seconds, test_accuracy=round(result.score, 4), test_size=result.n)


def profile_rows(cfg: Config) -> list[CurveRow]:
    """The profile's own run: its student on every label it kept (in the series of the profile's confidence
    floor), and the references (teacher, baselines)."""
    data = DataStage(cfg).data
    ev = EvaluationStage(cfg, data, (cur := CurationStage(cfg, data)), FinetuneStage(cfg, cur))
    m, ft = ev.load(), ev.finetune.load()
    teacher, baselines = ev.curation.teacher.load(), ev.baselines.load()
    if m is None or ft is None or teacher is None or baselines is None:
        raise DistillError(f"profile {cfg.name} has no finished run in {cfg.artifacts}: run it first "
                           f"(python -m distill run --profile {cfg.name})")
    n_test = m.sizes["testset"]
    # the floor curation applied (`auto`: what the teacher's routing chose; 0 is no floor)
    floor = (c.min_confidence or None) if (c := cur.load()) is not None else None
    rows = [CurveRow(kind="student", name=series("teacher", floor), labels=ft.examples, steps=ft.steps,
                     epochs=round(ft.epochs, 2), train_seconds=ft.train_seconds,
                     test_accuracy=m.testset["finetuned"]["vanilla"], test_size=n_test),
            CurveRow(kind="reference", name="teacher", test_accuracy=teacher.accuracy_test, test_size=n_test)]
    rows += [CurveRow(kind="reference", name=BASELINE_NAMES.get(k, k), test_accuracy=v, test_size=baselines.test_size)
             for k, v in baselines.accuracy.items()]
    return rows


def measure_curve(cfg: Config, sizes: list[int], gold: bool = True, min_steps: int = 120,
                  threads: int | None = None, confident_sizes: Sequence[int] = (),
                  min_confidence: float | None = None) -> Iterator[list[CurveRow]]:
    """The profile's run, then the gold-only student, a point per size (teacher labels), and a point per
    `confident_sizes` with the labels below `min_confidence` dropped: yields the rows so far, first the
    profile's own and then after each point, for the caller to write as it goes."""
    rows = profile_rows(cfg)
    yield rows
    todo = [("gold", cfg.data.num_gold, None)] if gold else []  # the cheapest, most telling point first
    todo += [("teacher", n, None) for n in sizes] + [("teacher", n, min_confidence) for n in confident_sizes]
    for source, n, floor in todo:
        rows.append(measure_point(cfg, source, n, min_steps, threads, floor))
        yield rows
