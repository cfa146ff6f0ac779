"""The main job: the pipeline's stages in order, on one profile. The notebook calls the same functions.

Each stage (`distill.stages`) decides for itself whether it is current (its manifest's fingerprint
equals the one its inputs give now, its outputs exist) and is then skipped with a one-line message, so
sections can be re-run alone after a restart. After every stage the report is assembled anew from the
manifests.

Each run is recorded in MLflow (`distill.tracking`): `setup` opens the run, every stage gets a nested run
(tagged skipped when current), `finish_run` logs the report and closes it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import dspy
from rich import box
from rich.table import Table

from distill import logs, tracking
from distill.config import Config, load_config
from distill.data.dataset import TaskData
from distill.env import check_env, missing
from distill.errors import DistillError
from distill.student.finetune import load_recipe
from distill.lm import adapter, make_lm
from distill.evaluation.plots import VARIANT_NAMES
from distill.program import DeployParams
from distill.report import finish_run as _finish_run
from distill.report import print_summary, report_path, write_report
from distill.stages.base import Manifest, Stage, console, require
from distill.stages.baselines import BaselinesManifest, BaselinesStage
from distill.stages.curation import CurationManifest, CurationStage
from distill.stages.data import DataStage
from distill.stages.evaluation import BASELINE_NAMES, EvalManifest, EvaluationStage
from distill.stages.finetune import FinetuneCall, FinetuneManifest, FinetuneStage
from distill.stages.serving import ServingManifest, ServingStage, program_app_env
from distill.stages.teacher import TeacherManifest, TeacherStage
from distill.teacher.program import HybridTeacher, RetrievalTeacher, embed

__all__ = ["setup", "data_stage", "baselines_stage", "teacher_stage", "curation_stage", "finetune_stage", "evaluation_stage",
           "serving_stage", "deploy_config", "client_headers", "finish_run", "print_summary", "run",
           "finetune_call", "teacher_walkthrough", "data_table", "baselines_table", "teacher_table", "curation_table",
           "finetune_table", "evaluation_table", "table", "runs_table"]


def setup(cfg: Config, verbose: bool | None = None) -> float:
    """Environment check, where logs go, and DSPy's LM cache inside the artifact directory (so re-runs reuse
    calls).

    Ray's, Serve's and the finetune job's logs go to `<artifacts>/logs/`; with `verbose` (default: the
    profile's `verbose`) they are shown here too. Opens the run's MLflow run (`tracking:`). Returns the run's
    start time, for `finish_run`.
    """
    started = time.time()
    logs.configure(cfg.artifacts / "logs", cfg.verbose if verbose is None else verbose)
    checks = check_env(cfg)
    for c in checks:
        console.print(c.line(), markup=False)
    if bad := missing(checks):
        raise DistillError("environment incomplete: " + "; ".join(c.line() for c in bad))
    cfg.artifacts.mkdir(parents=True, exist_ok=True)
    dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(cfg.artifacts / "dspy_cache"))
    tracking.start(cfg)
    return started


def _ensure(stage: Stage) -> Manifest:
    with tracking.stage(stage.name) as record:
        try:
            m = stage.ensure()
        finally:
            write_report(stage.cfg)  # also after a failure: the report shows what is current
        if record.tracker is not None:  # a failure to record is reported, never the stage's failure
            record.tracker.safe(f"recording the {stage.name} stage", _record, record, stage, m)
    return m


def _record(record: tracking.StageRecord, stage: Stage, m: Manifest) -> None:
    """What a stage that ran leaves in its MLflow run: its numbers, plots and files (a current one: a tag)."""
    if record.tracker is None:
        return
    if stage.skipped:
        record.skipped(m.fingerprint)
        return
    files: list[Path] = []
    dicts: dict[str, Any] = {}
    series: dict[str, list[tuple[int, float]]] = {}
    if isinstance(m, CurationManifest):
        files, dicts = [Path(m.plot)], {"label_counts.json": m.label_counts}
    elif isinstance(m, FinetuneManifest):
        files = [Path(m.loss_plot)] if m.loss_plot else []
        series = {"loss": list(zip(m.loss_steps, m.loss_history)) if len(m.loss_steps) == len(m.loss_history)
                  else loss_steps(stage.cfg, m.loss_history)}
        if m.validation:
            series["eval_loss"] = [(p.step, p.eval_loss) for p in m.validation.curve]
    elif isinstance(m, EvalManifest) and isinstance(stage, EvaluationStage):
        files = [*(Path(p) for p in m.plots.values()), stage.dir / "programs", stage.deploy_params_path]
    record.ran(m.model_dump(mode="json"), m.fingerprint, files, dicts, series)
    if isinstance(stage, EvaluationStage) and stage.cfg.tracking.register_model:
        params = DeployParams.load(stage.deploy_params_path)
        record.register_program(params.load_program(),  # uncached, as the program app calls it
                                make_lm(stage.cfg.models.student, model=params.model, cache=False),
                                adapter(params.program.prompt), tracking.model_name(stage.cfg))


def loss_steps(cfg: Config, losses: list[float]) -> list[tuple[int, float]]:
    """The finetune's logged losses (the Ray job's trainer log) at their optimizer steps: the trainer logs
    every `logging_steps` steps (HF's default 500); a fractional setting falls back to 1, 2, 3, ..."""
    every = load_recipe(cfg.path(cfg.finetune.recipe), cfg.finetune.training).training.get("logging_steps", 500)
    every = every if isinstance(every, int) and every >= 1 else 1
    return [((i + 1) * every, loss) for i, loss in enumerate(losses)]


def data_stage(cfg: Config) -> TaskData:
    stage = DataStage(cfg)
    _ensure(stage)
    return stage.data


def baselines_stage(cfg: Config, data: TaskData) -> BaselinesManifest:
    """1-NN and logistic regression on the gold embeddings, on the same test queries as everything else."""
    return _ensure(BaselinesStage(cfg, data))  # type: ignore[return-value]


def teacher_stage(cfg: Config, data: TaskData) -> TeacherManifest:
    """Quality gate on unseen gold, accuracy on the test queries, then labeling."""
    return _ensure(TeacherStage(cfg, data))  # type: ignore[return-value]


def curation_stage(cfg: Config, data: TaskData) -> CurationManifest:
    """Curate the labels, split them (devset / optimizer val / optimizer train) and write SFT data."""
    return _ensure(CurationStage(cfg, data))  # type: ignore[return-value]


def finetune_stage(cfg: Config, data: TaskData) -> FinetuneManifest:
    """LoRA-finetune the student on the SFT data as a Ray job, through DSPy's `LM.finetune`."""
    return _ensure(FinetuneStage(cfg, CurationStage(cfg, data)))  # type: ignore[return-value]


def _evaluation(cfg: Config, data: TaskData) -> EvaluationStage:
    curation = CurationStage(cfg, data)
    return EvaluationStage(cfg, data, curation, FinetuneStage(cfg, curation))


def evaluation_stage(cfg: Config, data: TaskData) -> EvalManifest:
    """Base and finetuned student, zero-shot and BFRS: devset, valset, test set, the deployed variant (chosen
    on the devset), plots, deploy params."""
    return _ensure(_evaluation(cfg, data))  # type: ignore[return-value]


def _serving(cfg: Config, data: TaskData, keep_running: bool = False) -> ServingStage:
    ev = _evaluation(cfg, data)
    return ServingStage(cfg, data, ev, ev.finetune, keep_running)


def serving_stage(cfg: Config, data: TaskData, keep_running: bool = False) -> ServingManifest:
    """Deploy the program and its LLM as one Serve deployment and classify test queries over HTTP.

    With `keep_running` (the notebook) the deployment stays up for you to query; `shutdown()` ends it.
    """
    return _ensure(_serving(cfg, data, keep_running))  # type: ignore[return-value]


def deploy_config(cfg: Config, data: TaskData | None = None) -> Path:
    """The profile's multi-app Serve config with this run's artifact paths filled in."""
    return _serving(cfg, data if data is not None else DataStage(cfg).data).deploy_config()


def client_headers(cfg: Config) -> dict[str, str]:
    """The Authorization header a client of the profile's program app sends (if its key is set)."""
    return program_app_env(cfg.path(cfg.serving.deploy_config))[1]


def finish_run(cfg: Config, started: float | None = None) -> dict:
    """Write the run manifest (wall time since `setup`, sizes, versions), the report, and print the summary;
    the report's numbers and files close the run's MLflow run."""
    report = _finish_run(cfg, started)
    print_summary(report)
    deploy_params = cfg.artifacts / "deploy_params.json"
    tracking.finish(report, [report_path(cfg), deploy_params])
    return report.get("run", {})


def run(profile: str | None = None, verbose: bool | None = None) -> Config:
    cfg = load_config(profile)
    console.rule(f"distill: profile [bold]{cfg.name}[/] ({cfg.profile})")
    started = setup(cfg, verbose)
    try:
        data = data_stage(cfg)
        baselines_stage(cfg, data)
        teacher_stage(cfg, data)
        curation_stage(cfg, data)
        finetune_stage(cfg, data)
        evaluation_stage(cfg, data)
        serving_stage(cfg, data)
    except BaseException as e:
        # No report metrics on a failed run (they would be the last good run's); the report file as it is.
        tracking.finish({}, [report_path(cfg)], status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finish_run(cfg, started)
    return cfg


def runs_table(cfg: Config, last: int = 10) -> Table:
    """The last `last` pipeline runs of the profile recorded in MLflow, newest first (`python -m distill runs`)."""
    rows = tracking.run_history(cfg, last)
    return tracking.history_table(rows, f"{cfg.name}: the last {len(rows)} pipeline run(s), newest first",
                                  caption=f"browse them: {tracking.ui_command(cfg)}")


# What each notebook section ends with: its result as a small table, read from the stage's manifest (rich
# tables display as HTML in Jupyter and as text elsewhere). And the calls the sections show.


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None,
          header: bool = True) -> Table:
    """A small rich table; the last expression of a notebook cell displays it."""
    # no outer frame: a notebook's output lines are for results, not borders
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left", show_header=header,
              box=box.MINIMAL_HEAVY_HEAD, show_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(str(v) for v in r))
    return t


def data_table(data: TaskData, examples: int = 3) -> Table:
    """The splits every later section starts from, and a few gold examples."""
    rows: list[list[Any]] = [
        ["gold: hand-labeled, the only labels the pipeline may use", len(data.gold)],
        ["unlabeled pool", len(data.unlabeled)], ["  of which the teacher labels", len(data.to_label)],
        ["test queries scored (of the test set's)", f"{len(data.test)} of {data.full_test_size}"],
    ]
    rows += [[f"  e.g. {ex.text!r}", ex.label] for ex in data.gold[:examples]]
    return table(f"The {len(data.labels)} labels in use ({data.source})", ["", ""], rows, header=False)


def baselines_table(baselines: BaselinesManifest) -> Table:
    return table(f"Baselines on the {baselines.test_size} test queries ({baselines.n_gold} gold examples)",
                 ["classifier", "test accuracy"],
                 [[BASELINE_NAMES.get(k, k), _pct(v)] for k, v in baselines.accuracy.items()])


def teacher_table(cfg: Config, data: TaskData, teacher: TeacherManifest) -> Table:
    """The teacher next to the baselines (when their stage has run) on the same test queries."""
    rows: list[list[Any]] = []
    if (b := BaselinesStage(cfg, data).load()) is not None:
        rows += [[BASELINE_NAMES.get(k, k), _pct(v), ""] for k, v in b.accuracy.items()]
    if teacher.vote is not None:
        rows.append([f"the teacher's vote alone (C={teacher.vote.c:g})", _pct(teacher.vote.accuracy_test), ""])
    who = f"{teacher.strategy} ({teacher.model})"
    if teacher.llm_share_test is not None:
        who += f", the LLM answered {teacher.llm_share_test:.0%}"
    rows.append([f"teacher: {who}", _pct(teacher.accuracy_test), _pct(teacher.accuracy_gold)])
    return table(f"Teacher and baselines ({teacher.test_size} test queries)",
                 ["classifier", "test accuracy", "gold, leave-one-out"], rows,
                 caption=f"{teacher.labeled} of {teacher.to_label} queries labeled; quality gate "
                         f"{cfg.teacher.min_accuracy_gold:.0%} on gold")


def curation_table(m: CurationManifest) -> Table:
    return table("Curation: the teacher's labels to training data", ["", "queries"], [
        ["labeled by the teacher", m.input], ["- label not one of the labels", m.invalid_label],
        ["- teacher less sure than curation.min_confidence", m.low_confidence], ["- duplicate query", m.duplicate], ["- also in the test set", m.test_overlap], ["kept", m.kept],
        ["synthetic devset (scoring)", m.devset], ["optimizer valset (BFRS picks)", m.optimizer_val],
        ["optimizer trainset (BFRS demos, SFT data)", m.optimizer_train], ["SFT examples", m.sft_examples],
    ], header=False)


def finetune_table(m: FinetuneManifest) -> Table:
    loss = f"{m.first_loss:.3f} -> {m.last_loss:.3f}" if m.first_loss is not None and m.last_loss is not None else ""
    return table(f"Finetune: {m.model}", ["", ""], [
        ["SFT examples x epochs", f"{m.examples} x {m.epochs:.3g}"], ["optimizer steps", m.steps],
        ["training loss, first -> last", loss],
        *([["validation loss per evaluation (epoch: loss)",
            ", ".join(f"{p.epoch:g}: {p.eval_loss:.3f}" for p in m.validation.curve)],
           ["kept", m.validation.reason]] if m.validation else []),
        ["training time", f"{m.train_seconds:.0f} s" if m.train_seconds is not None else ""],
        ["recipe", m.recipe], ["adapter", m.published or m.adapter],
    ], header=False)


def evaluation_table(m: EvalManifest) -> Table:
    """The four variants on every split; the deployed one (chosen on the devset, ties: valset) is marked."""
    rows = []
    for kind in m.testset:
        for variant in m.testset[kind]:
            chosen = "<- deployed" if (kind, variant) == (m.best.kind, m.best.variant) else ""
            rows.append([f"{kind} student, {VARIANT_NAMES.get(variant, variant)}",
                         _pct(m.devset.get(kind, {}).get(variant)), _pct(m.optimizer_val.get(kind, {}).get(variant)),
                         _pct(m.testset[kind][variant]), chosen])
    return table("The four variants (the deployed one is chosen on the devset, never on the test set)",
                 ["", f"devset ({m.sizes.get('devset', '?')})", f"valset, ties ({m.sizes.get('optimizer_val', '?')})",
                  f"test set ({m.sizes.get('testset', '?')})", ""], rows,
                 caption=f"BFRS: up to {m.bfrs.get('max_bootstrapped_demos')} bootstrapped + "
                         f"{m.bfrs.get('max_labeled_demos')} labeled demos, {m.bfrs.get('num_candidate_programs')} "
                         f"random candidates; demos from {m.sizes.get('optimizer_train', '?')} queries, picked on "
                         f"{m.sizes.get('optimizer_val', '?')}")


def finetune_call(cfg: Config, data: TaskData) -> FinetuneCall:
    """The `LM.finetune` call the finetune stage makes on the current SFT data (needs the curation stage)."""
    curation = CurationStage(cfg, data)
    require(curation.load(), "curation")
    stage = FinetuneStage(cfg, curation)
    return stage.call(stage.configured_address())


def teacher_walkthrough(teacher: dspy.Module, examples: Sequence[dspy.Example], embedder: str, n: int = 1) -> str:
    """What the teacher does with a few queries, short of calling the LLM: the vote's shortlist and confidence,
    who answers, and the gold demonstrations the LLM is shown (nearest last). For a vote + LLM teacher, the
    first `n` queries the vote answers and the first `n` it leaves to the LLM."""
    lines: list[str] = []
    if isinstance(teacher, HybridTeacher):
        lines.append(f"HybridTeacher: the vote answers above confidence {teacher.vote_confidence:g}; below, the LLM "
                     f"picks one of the vote's top {teacher.candidate_m}, shown the {teacher.k} nearest gold examples")
        taken = {True: 0, False: 0}
        for ex in examples:
            if min(taken.values()) >= n:
                break
            vector = embed(embedder, [ex.text])[0]
            shortlist, confidence = teacher.shortlist(ex.text, vector)
            vote = confidence > teacher.vote_confidence
            if taken[vote] >= n:
                continue
            taken[vote] += 1
            lines += [f"{ex.text!r} (true label: {ex.label})",
                      f"  vote: {', '.join(shortlist)} (confidence {confidence:.2f}) -> "
                      + (f"answers {shortlist[0]}" if vote else "the LLM answers, one of these")]
            if not vote:
                demos = reversed(teacher.index.nearest(ex.text, teacher.k, vector=vector))
                lines += [f"  demonstration: {d.text!r} -> {d.label}" for d in demos]
    elif isinstance(teacher, RetrievalTeacher):
        lines.append(f"RetrievalTeacher: the LLM is shown the {teacher.k} nearest gold examples"
                     + (f" and may answer only their {teacher.candidate_k} nearest's labels" if teacher.restrict else ""))
        for ex in examples[:n]:
            near = teacher.neighbours(ex.text)
            allowed = list(dict.fromkeys(d.label for d in near[: teacher.candidate_k])) if teacher.restrict else []
            lines.append(f"{ex.text!r} (true label: {ex.label})")
            if allowed:
                lines.append(f"  allowed: {', '.join(allowed)}")
            lines += [f"  demonstration: {d.text!r} -> {d.label}" for d in reversed(near[: teacher.k])]
    else:
        lines.append(f"{type(teacher).__name__}: the LLM alone, without demonstrations")
    return "\n".join(lines)
