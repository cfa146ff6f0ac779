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
from typing import Any

import dspy
from rich.table import Table

from distill import logs, tracking
from distill.config import Config, load_config
from distill.data.dataset import TaskData
from distill.env import check_env, missing
from distill.errors import DistillError
from distill.report import finish_run as _finish_run
from distill.report import print_summary, report_path, write_report
from distill.stages.base import Manifest, Stage, console, require
from distill.stages.baselines import BaselinesManifest
from distill.stages.cascade import CascadeManifest
from distill.stages.curation import CurationManifest, CurationStage
from distill.stages.evaluation import EvalManifest
from distill.stages.finetune import FinetuneCall, FinetuneManifest, FinetuneStage
from distill.stages.graph import StageGraph
from distill.stages.serving import ServingManifest, program_app_env
from distill.stages.teacher import TeacherManifest
from distill.tracking import git_commit

__all__ = ["setup", "stage", "data_stage", "baselines_stage", "teacher_stage", "curation_stage", "finetune_stage",
           "evaluation_stage", "cascade_stage", "serving_stage", "teacher_program", "deploy_config", "client_headers", "finish_run", "print_summary",
           "run", "finetune_call", "runs_table"]


_commit_at_start: dict[Path, str] = {}  # artifacts dir -> the commit when `setup` ran, for `finish_run`


def setup(cfg: Config, verbose: bool | None = None) -> float:
    """Environment check, where logs go, and DSPy's LM cache inside the artifact directory (so re-runs reuse
    calls).

    Ray's, Serve's and the finetune job's logs go to `<artifacts>/logs/`; with `verbose` (default: the
    profile's `verbose`) they are shown here too. Opens the run's MLflow run (`tracking:`). Returns the run's
    start time, for `finish_run`.
    """
    started = time.time()
    # What ran is the code checked out now (the stages are imported at the start); a commit made while the
    # run goes on must not be recorded as the one that measured it.
    _commit_at_start[cfg.artifacts] = git_commit(cfg.root)
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
    """What a stage that ran leaves in its MLflow run: its numbers, and what `Stage.tracked` names (a current
    stage: a tag)."""
    if stage.skipped:
        record.skipped(m.fingerprint)
        return
    t = stage.tracked(m)
    record.ran(m.model_dump(mode="json"), m.fingerprint, t.files, t.dicts, t.series)
    stage.on_recorded(record, m)


def stage(cfg: Config, name: str, data: TaskData | None = None, **options: Any) -> Manifest:
    """Run one stage of the graph (`distill.stages.graph.STAGES`) unless it is current; its manifest."""
    return _ensure(StageGraph(cfg, data, **options).stage(name))


def data_stage(cfg: Config) -> TaskData:
    graph = StageGraph(cfg)
    _ensure(graph.stage("data"))
    return graph.data


def baselines_stage(cfg: Config, data: TaskData) -> BaselinesManifest:
    """1-NN and logistic regression on the gold embeddings, on the same test queries as everything else."""
    return stage(cfg, "baselines", data)  # type: ignore[return-value]


def teacher_stage(cfg: Config, data: TaskData) -> TeacherManifest:
    """Quality gate on unseen gold, accuracy on the test queries, then labeling."""
    return stage(cfg, "teacher", data)  # type: ignore[return-value]


def teacher_program(cfg: Config, data: TaskData) -> dspy.Module:
    """The teacher the teacher stage labeled with (its routing threshold as the stage chose it)."""
    return StageGraph(cfg, data).stage("teacher").program()  # type: ignore[attr-defined]


def curation_stage(cfg: Config, data: TaskData) -> CurationManifest:
    """Curate the labels, split them (devset / optimizer val / optimizer train) and write SFT data."""
    return stage(cfg, "curation", data)  # type: ignore[return-value]


def finetune_stage(cfg: Config, data: TaskData) -> FinetuneManifest:
    """LoRA-finetune the student on the SFT data as a Ray job, through DSPy's `LM.finetune`."""
    return stage(cfg, "finetune", data)  # type: ignore[return-value]


def evaluation_stage(cfg: Config, data: TaskData) -> EvalManifest:
    """Base and finetuned student, zero-shot and BFRS: devset, valset, test set, the deployed variant (chosen
    on the devset), plots, deploy params."""
    return stage(cfg, "eval", data)  # type: ignore[return-value]


def cascade_stage(cfg: Config, data: TaskData) -> CascadeManifest:
    """The deployed student's confidence calibrated and its threshold chosen on dev data (the teacher answers
    below it); the cascade, the student and the teacher alone scored on the test set, plots, per-label table."""
    return stage(cfg, "cascade", data)  # type: ignore[return-value]


def serving_stage(cfg: Config, data: TaskData, keep_running: bool = False) -> ServingManifest:
    """Deploy the program and its LLM as one Serve deployment and classify test queries over HTTP.

    With `keep_running` (the notebook) the deployment stays up for you to query; `shutdown()` ends it.
    """
    return stage(cfg, "serving", data, keep_running=keep_running)  # type: ignore[return-value]


def deploy_config(cfg: Config, data: TaskData | None = None, cascade: bool | None = None) -> Path:
    """The profile's multi-app Serve config with this run's artifact paths filled in: what the serving stage
    deploys (`cascade` None), the cascade (True), or the program app alone (False)."""
    return StageGraph(cfg, data).stage("serving").deploy_config(cascade)  # type: ignore[attr-defined]


def client_headers(cfg: Config) -> dict[str, str]:
    """The Authorization header a client of the profile's program app sends (if its key is set)."""
    return program_app_env(cfg.path(cfg.serving.deploy_config))[1]


def finish_run(cfg: Config, started: float | None = None) -> dict:
    """Write the run manifest (wall time since `setup`, sizes, versions), the report, and print the summary;
    the report's numbers and files close the run's MLflow run."""
    report = _finish_run(cfg, started, commit=_commit_at_start.pop(cfg.artifacts, None))
    print_summary(report)
    deploy_params = cfg.artifacts / "deploy_params.json"
    tracking.finish(report, [report_path(cfg), deploy_params])
    return report.get("run", {})


def run(profile: str | None = None, verbose: bool | None = None) -> Config:
    cfg = load_config(profile)
    console.rule(f"distill: profile [bold]{cfg.name}[/] ({cfg.profile})")
    started = setup(cfg, verbose)
    try:
        for st in StageGraph(cfg):  # in the graph's order (distill.stages.graph)
            _ensure(st)
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


def finetune_call(cfg: Config, data: TaskData) -> FinetuneCall:
    """The `LM.finetune` call the finetune stage makes on the current SFT data (needs the curation stage)."""
    curation = CurationStage(cfg, data)
    require(curation.load(), "curation")
    ft = FinetuneStage(cfg, curation)
    return ft.call(ft.configured_address())


