"""Measuring the learning curve: how many teacher labels does the student need, and does picking them help?

Each point is the profile's own pipeline, curation then finetune, with the student's SFT set cut to `n`
teacher-labeled queries (`data.optimizer_train_size`) or made of the gold labels alone
(`curation.sft_source: gold`). The finetuned student is then scored zero-shot, in its served form (the
program through the server's grammar), on the profile's test queries. The point with every label is the
profile's own run.

Selection (which queries the teacher labeled):
    random: the first `n` of the full run's labels (the data stage's seeded order, so the points are
        nested). A point starts from copies of the profile's data, baselines and teacher stages: nothing is
        labeled again.
    active: the point's own teacher stage (`data.selection: active`, `active_data`): a random seed round
        holding curation's devset and optimizer valset plus one batch, then batches picked by the vote's
        uncertainty. The teacher's LLM answers come from a copy of the full run's LM cache for the same
        endpoint (`reuse_teacher_cache`): the full run labeled every pool query, so nothing is asked twice
        and a query gets the same label under either selection.
    Both take curation as the profile has it except the confidence floor: none (unless `min_confidence`),
    so the SFT sets differ only in which queries they hold. Active picks are where the vote is least sure,
    exactly what a floor would drop.

Budget (how long each point trains; `Budget`), shared by every point of a series:
    steps N: every point trains exactly N optimizer steps -- separates the labels from the training
        compute (a small set is seen for many epochs, a large one for few).
    epochs E: every point trains exactly E epochs -- the same passes over each label, so a larger set also
        gets proportionally more steps (the usual "train it the same way" comparison).
    min_steps N (the original): the profile's own cap (local_full: one epoch), raised to N steps when that
        is shorter: with 100 examples one epoch is 13 steps, which would measure the step count rather than
        the labels. The recipe's early stopping on held-out examples applies.
    The exact budgets train with the recipe's held-out slice still evaluated every epoch (the validation
    curve is in the point's finetune manifest) but without early stopping or restoring the best checkpoint:
    otherwise a small set would stop early and the budgets would not match.

A point lives in `<artifacts>/curve/<point>/` (its name carries the selection and an exact budget); its
stages are resumable like the pipeline's, and a finished point (`point.json`, keyed on its finetune) is not
measured twice.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from distill.config import Config, DataConfig
from distill.data.dataset import TaskData
from distill.errors import DistillError
from distill.evaluation.variants import evaluate
from distill.lm import make_lm
from distill.program import IntentClassificationModule
from distill.stages.base import console, endpoint_fingerprint, read_manifest, served, write_manifest
from distill.stages.baselines import BaselinesStage
from distill.stages.curation import CurationManifest, CurationStage
from distill.stages.data import DataStage
from distill.stages.evaluation import BASELINE_NAMES, EvaluationStage
from distill.stages.finetune import FinetuneManifest, FinetuneStage
from distill.stages.teacher import TeacherStage
from distill.student.finetune import load_recipe
from distill.tracking import git_commit
from distill_harness.learning_curve import CurveRow

UPSTREAM = (DataStage.name, BaselinesStage.name, TeacherStage.name)
Selection = Literal["random", "active"]
# Queries per active round: local_active's batch (configs/local_active.yaml).
ACTIVE_BATCH = 100


class PointManifest(BaseModel):
    """`point.json`: a measured point, valid for the finetune it was measured on."""

    model_config = ConfigDict(extra="forbid")

    finetune_fingerprint: str
    row: CurveRow


@dataclass(frozen=True)
class Budget:
    """How long every point of a series trains (the module's docstring says what each mode separates)."""

    mode: Literal["min_steps", "steps", "epochs"]
    value: float

    def __post_init__(self) -> None:
        if self.value <= 0 or (self.mode != "epochs" and self.value != int(self.value)):
            raise ValueError(f"a {self.mode} budget is a positive {'number' if self.mode == 'epochs' else 'integer'}, "
                             f"not {self.value}")

    @property
    def exact(self) -> bool:
        """Every point trains exactly this long (no early stopping)."""
        return self.mode != "min_steps"

    @property
    def label(self) -> str:
        """The budget as the CSV, the table and the chart name it."""
        if self.mode == "min_steps":
            return f"min {self.value:g} steps"
        unit = "step" if self.mode == "steps" else "epoch"
        return f"{self.value:g} {unit}{'' if self.value == 1 else 's'}"

    @property
    def tag(self) -> str:
        """The budget in a point's directory name; empty for min_steps, whose points keep their old names."""
        return "" if self.mode == "min_steps" else f"{self.mode}{self.value:g}"

    def training(self, profile: dict[str, Any], n: int | None, batch: int) -> dict[str, Any]:
        """The point's `finetune.training`: the profile's with its length replaced by this budget."""
        rest = {k: v for k, v in profile.items() if k not in ("max_steps", "num_train_epochs")}
        if self.mode == "steps":
            return rest | {"max_steps": int(self.value)}
        if self.mode == "epochs":  # 1, not 1.0, as a profile writes it: the same finetune fingerprint either way
            return rest | {"num_train_epochs": int(self.value) if self.value == int(self.value) else self.value}
        if n is not None and math.ceil(n / batch) < self.value:  # one epoch is too short: steps instead
            return rest | {"max_steps": int(self.value)}
        return dict(profile)


def profile_budget(cfg: Config) -> str:
    """The profile's own finetune length, labelled as a `Budget` is (local_full: "1 epoch")."""
    t = cfg.finetune.training
    if "max_steps" in t:
        return Budget("steps", t["max_steps"]).label
    return Budget("epochs", float(t.get("num_train_epochs", 3))).label  # 3: transformers' default


def batch_size(cfg: Config) -> int:
    t = load_recipe(cfg.path(cfg.finetune.recipe), cfg.finetune.training).training
    return int(t.get("per_device_train_batch_size", 8)) * int(t.get("gradient_accumulation_steps", 1))


def active_data(data: DataConfig, n: int, batch: int = ACTIVE_BATCH) -> DataConfig:
    """The data settings of an active point whose student trains on `n` teacher labels.

    The teacher labels devset + optimizer valset + n queries (as many as a random point at n draws on):
    a random seed round of devset + valset + one batch (+ n mod batch), then n // batch - 1 rounds of `batch`
    picked by the vote's uncertainty; `batch` is halved for n < 2 x batch so there is always one active
    round. local_full (devset 300, valset 50): n = 300 -> 650 labeled, seed 450, 2 rounds of 100 (200 of the
    300 SFT labels chosen); n = 1000 -> 1350, seed 450, 9 rounds (900 chosen). The signal, diversity and
    refit are the profile's `data.active`. Validated (the seed round must hold devset + valset).
    """
    batch = min(batch, n // 2)
    if batch < 1:
        raise DistillError(f"an active point needs at least 2 labels to train on, not {n}")
    rounds = n // batch - 1
    active = data.active.model_copy(update={"rounds": rounds, "batch_size": batch})
    return DataConfig.model_validate({
        **data.model_dump(), "selection": "active", "active": active.model_dump(),
        # the SFT set is the rest of what was labeled: curation may drop a few labels (no valid answer),
        # so n is the labels paid for, and the student trains on those of them curation kept
        "num_to_label": data.devset_size + data.optimizer_val_size + n, "optimizer_train_size": None})


def point_name(source: str, n: int | None, selection: Selection = "random", budget: Budget | None = None,
               min_confidence: float | None = None) -> str:
    """The point's directory under `<artifacts>/curve/`: teacher_300, active_300_steps440, gold_100_epochs3."""
    name = f"gold_{n}" if source == "gold" else f"{'active' if selection == 'active' else 'teacher'}_{n}"
    if min_confidence is not None:
        name += f"_conf{min_confidence:g}"
    return f"{name}_{budget.tag}" if budget is not None and budget.tag else name


def point_config(cfg: Config, source: str, n: int | None, min_steps: int = 120, min_confidence: float | None = None,
                 *, budget: Budget | None = None, selection: Selection = "random") -> Config:
    """The profile for one point: its own artifact directory, the SFT set cut to `n` (source "teacher") or
    the gold labels (source "gold", `n` = their number), trained for `budget` (default: at least `min_steps`
    steps). `min_confidence` drops the labels the teacher was less sure of before the cut
    (`curation.min_confidence`; default: no floor). `selection` "active": the teacher picks its queries
    (`active_data`). An exact budget trains under the point's copy of the recipe (`write_point_recipe`)."""
    budget = budget or Budget("min_steps", min_steps)
    if selection == "active" and (source != "teacher" or n is None):
        raise DistillError("active selection picks teacher-labeled queries: it needs source teacher and a size")
    pdir = cfg.artifacts / "curve" / point_name(source, n, selection, budget, min_confidence)
    if selection == "active":
        assert n is not None
        data = active_data(cfg.data, n)
    else:
        data = cfg.data.model_copy(update={"optimizer_train_size": n}) if source == "teacher" else cfg.data
    curation = cfg.curation.model_copy(update={"sft_source": source, "min_confidence": min_confidence})
    finetune = cfg.finetune.model_copy(update={
        "training": budget.training(cfg.finetune.training, n, batch_size(cfg)),
        **({"recipe": str(pdir / "recipe.yaml")} if budget.exact else {})})
    return cfg.model_copy(update={"artifacts_dir": str(pdir), "data": data, "curation": curation,
                                  "finetune": finetune})


def write_point_recipe(cfg: Config, pcfg: Config) -> None:
    """The profile's recipe for an exact budget: still holding out and evaluating its slice every epoch,
    but with no early stopping and the last weights kept, so every point trains its whole budget."""
    raw = yaml.safe_load(cfg.path(cfg.finetune.recipe).read_text()) or {}
    raw.setdefault("validation", {})["patience"] = None
    raw.setdefault("training", {})["load_best_model_at_end"] = False
    path = pcfg.path(pcfg.finetune.recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {cfg.finetune.recipe} for a learning-curve point with an exact budget (distill_harness.curve):\n"
              "# no early stopping, no best checkpoint restored -- every point trains its whole budget.\n")
    text = header + yaml.safe_dump(raw, sort_keys=False)
    if not path.is_file() or path.read_text() != text:  # unchanged: the finetune's fingerprint stays
        path.write_text(text)
    load_recipe(path, pcfg.finetune.training)  # a recipe the finetune would refuse fails here


def reuse_teacher_cache(cfg: Config, pcfg: Config) -> bool:
    """Copy the profile's DSPy cache of the teacher endpoint into the point (once), so its teacher stage
    answers from the full run's calls. The cache is kept per endpoint identity
    (`<artifacts>/dspy_cache_endpoints/<endpoint fingerprint>`, `distill.stages.base.endpoint_cache`), which
    a point shares with its profile; a copy, not the directory itself: the full run's cache stays as it was.
    False when the profile has no cache for that identity (the point's teacher then calls its LLM)."""
    key = endpoint_fingerprint(pcfg, pcfg.models.teacher)
    src = cfg.artifacts / "dspy_cache_endpoints" / key
    dst = pcfg.artifacts / "dspy_cache_endpoints" / key
    if dst.is_dir():
        return True
    if not src.is_dir():
        console.print(f"[yellow]no LM cache of this teacher endpoint in {src.parent}: the active point's teacher "
                      "asks its LLM again[/yellow]")
        return False
    shutil.copytree(src, dst)
    return True


def series(source: str, min_confidence: float | None = None) -> str:
    """A point's series on the chart: what the student learned from."""
    name = "teacher labels" if source == "teacher" else "gold labels"
    return name if min_confidence is None else f"{name}, confidence >= {min_confidence:g}"


def measure_point(cfg: Config, source: str, n: int, min_steps: int = 120, threads: int | None = None,
                  min_confidence: float | None = None, *, budget: Budget | None = None,
                  selection: Selection = "random") -> CurveRow:
    """Finetune and score one point (resumable; a measured point is read back)."""
    budget = budget or Budget("min_steps", min_steps)
    pcfg = point_config(cfg, source, n, min_steps, min_confidence, budget=budget, selection=selection)
    if selection == "random":
        for name in UPSTREAM:  # the profile's own labels and references: nothing labeled twice
            if not (pcfg.artifacts / name / "manifest.json").is_file():
                shutil.copytree(cfg.artifacts / name, pcfg.artifacts / name, dirs_exist_ok=True)
    else:
        reuse_teacher_cache(cfg, pcfg)
    if budget.exact:
        write_point_recipe(cfg, pcfg)
    data = DataStage(pcfg).data
    DataStage(pcfg, data).ensure()
    if selection == "active":  # its own picks: the rounds run here, labeled from the copied cache
        TeacherStage(pcfg, data).ensure()
    curation = CurationStage(pcfg, data)
    c = curation.ensure()
    if c.sft_examples < n:
        if selection == "random":
            raise DistillError(f"only {c.sft_examples} teacher labels to train on, not {n}: lower the point")
        # Active labeled exactly devset + valset + n; curation dropped a few (invalid, duplicate, test text).
        console.print(f"[yellow]{c.sft_examples} of the {n} active labels to train on: curation dropped "
                      f"{c.input - c.kept} of {c.input}[/yellow]")
    ft = FinetuneStage(pcfg, curation).ensure()
    path = pcfg.artifacts / "point.json"
    done = read_manifest(path, PointManifest)
    if done is not None and done.finetune_fingerprint == ft.fingerprint:
        console.print(f"{path}: measured; skipped")
        return done.row
    row = _score(pcfg, data, ft, c, series(source, min_confidence), selection, budget, threads)
    write_manifest(path, PointManifest(finetune_fingerprint=ft.fingerprint, row=row))
    return row


def _commit() -> str:
    """The code measuring a point: 12 hex digits, `+dirty` with uncommitted changes."""
    sha = git_commit()
    return sha[:12] + ("+dirty" if sha.endswith("+dirty") else "")


def _score(cfg: Config, data: TaskData, ft: FinetuneManifest, c: CurationManifest, name: str, selection: str,
           budget: Budget, threads: int | None) -> CurveRow:
    """The finetuned student, zero-shot, served, on the test queries (as the evaluation stage scores it)."""
    st, ev, p = cfg.models.student, cfg.evaluation, cfg.program
    program = IntentClassificationModule(data.labels, p.reasoning, p.max_reasoning_chars)
    with served(cfg, st, ft.serve_config, models=[ft.model]):
        # No LM cache: every point serves its adapter under the same model id.
        lm = make_lm(st, model=ft.model, cache=False)
        result = evaluate(program, lm, data.test, data.labels, threads or ev.threads, ev.max_errors,
                          cfg.artifacts / "predictions.jsonl",
                          f"student on {ft.examples} {name} ({selection}, {budget.label})", prompt=p.student_prompt)
    return CurveRow(kind="student", name=name, selection=selection, budget=budget.label, labels=ft.examples,
                    steps=ft.steps, epochs=round(ft.epochs, 2), train_seconds=ft.train_seconds,
                    test_accuracy=round(result.score, 4), test_size=result.n, labeled=c.input, kept=c.kept,
                    commit=_commit(), point=cfg.artifacts.name)


def profile_rows(cfg: Config) -> list[CurveRow]:
    """The profile's own run: its student on every label it kept (in the series of the profile's confidence
    floor, its selection and finetune length), and the references (teacher, baselines)."""
    data = DataStage(cfg).data
    ev = EvaluationStage(cfg, data, (cur := CurationStage(cfg, data)), FinetuneStage(cfg, cur))
    m, ft = ev.load(), ev.finetune.load()
    teacher, baselines = ev.curation.teacher.load(), ev.baselines.load()
    if m is None or ft is None or teacher is None or baselines is None:
        raise DistillError(f"profile {cfg.name} has no finished run in {cfg.artifacts}: run it first "
                           f"(python -m distill run --profile {cfg.name})")
    n_test = m.sizes["testset"]
    report = cfg.artifacts / "report.json"
    sha = json.loads(report.read_text()).get("run", {}).get("git_commit") if report.is_file() else None
    commit = sha[:12] + ("+dirty" if sha.endswith("+dirty") else "") if sha else None
    # the floor curation applied (`auto`: what the teacher's routing chose; 0 is no floor)
    c = cur.load()
    floor = (c.min_confidence or None) if c is not None else None
    rows = [CurveRow(kind="student", name=series("teacher", floor), selection=cfg.data.selection,
                     budget=profile_budget(cfg), labels=ft.examples, steps=ft.steps, epochs=round(ft.epochs, 2),
                     train_seconds=ft.train_seconds, test_accuracy=m.testset["finetuned"]["vanilla"],
                     test_size=n_test, labeled=c.input if c else None, kept=c.kept if c else None, commit=commit,
                     point=cfg.name),
            CurveRow(kind="reference", name="teacher", test_accuracy=teacher.accuracy_test, test_size=n_test,
                     commit=commit)]
    rows += [CurveRow(kind="reference", name=BASELINE_NAMES.get(k, k), test_accuracy=v, test_size=baselines.test_size,
                      commit=commit) for k, v in baselines.accuracy.items()]
    return rows


def measure_curve(cfg: Config, sizes: list[int], gold: bool = True, min_steps: int = 120,
                  threads: int | None = None, confident_sizes: Sequence[int] = (),
                  min_confidence: float | None = None, *, budget: Budget | None = None,
                  selections: Sequence[Selection] = ("random",)) -> Iterator[list[CurveRow]]:
    """The profile's run, then the gold-only student, a point per size and selection (teacher labels), and
    a point per `confident_sizes` (random) with the labels below `min_confidence` dropped, all under one
    `budget` (default: at least `min_steps` steps): yields the rows so far, first the profile's own and then
    after each point, for the caller to write as it goes."""
    rows = profile_rows(cfg)
    yield rows
    todo: list[tuple[str, int, float | None, Selection]] = [("gold", cfg.data.num_gold, None, "random")] if gold else []
    todo += [("teacher", n, None, s) for n in sizes for s in selections]  # random and active side by side
    todo += [("teacher", n, min_confidence, "random") for n in confident_sizes]
    for source, n, floor, selection in todo:
        rows.append(measure_point(cfg, source, n, min_steps, threads, floor, budget=budget, selection=selection))
        yield rows
