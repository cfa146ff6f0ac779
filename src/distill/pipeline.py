"""The main job: the pipeline's stages in order, on one profile. The notebook calls the same functions.

Each stage (`distill.stages`) decides for itself whether it is current (its manifest's fingerprint
equals the one its inputs give now, its outputs exist) and is then skipped with a one-line message, so
sections can be re-run alone after a restart. After every stage the report is assembled anew from the
manifests.
"""

from __future__ import annotations

import time
from pathlib import Path

import dspy

from distill import logs
from distill.config import Config, load_config
from distill.data import Banking77Data
from distill.env import check_env, missing
from distill.errors import DistillError
from distill.report import finish_run as _finish_run
from distill.report import print_summary, write_report
from distill.stages.base import Manifest, Stage, console
from distill.stages.baselines import BaselinesManifest, BaselinesStage
from distill.stages.curation import CurationManifest, CurationStage
from distill.stages.data import DataStage
from distill.stages.evaluation import EvalManifest, EvaluationStage
from distill.stages.finetune import FinetuneManifest, FinetuneStage
from distill.stages.serving import ServingManifest, ServingStage, program_app_env
from distill.stages.teacher import TeacherManifest, TeacherStage

__all__ = ["setup", "data_stage", "baselines_stage", "teacher_stage", "curation_stage", "finetune_stage", "evaluation_stage",
           "serving_stage", "deploy_config", "client_headers", "finish_run", "print_summary", "run"]


def setup(cfg: Config, verbose: bool | None = None) -> float:
    """Environment check, where logs go, and DSPy's LM cache inside the artifact directory (so re-runs reuse
    calls).

    Ray's, Serve's and the finetune job's logs go to `<artifacts>/logs/`; with `verbose` (default: the
    profile's `verbose`) they are shown here too. Returns the run's start time, for `finish_run`.
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
    return started


def _ensure(stage: Stage) -> Manifest:
    try:
        return stage.ensure()
    finally:
        write_report(stage.cfg)  # also after a failure: the report shows what is current


def data_stage(cfg: Config) -> Banking77Data:
    stage = DataStage(cfg)
    _ensure(stage)
    return stage.data


def baselines_stage(cfg: Config, data: Banking77Data) -> BaselinesManifest:
    """1-NN and logistic regression on the gold embeddings, on the same test queries as everything else."""
    return _ensure(BaselinesStage(cfg, data))  # type: ignore[return-value]


def teacher_stage(cfg: Config, data: Banking77Data) -> TeacherManifest:
    """Quality gate on unseen gold, accuracy on the test queries, then labeling."""
    return _ensure(TeacherStage(cfg, data))  # type: ignore[return-value]


def curation_stage(cfg: Config, data: Banking77Data) -> CurationManifest:
    """Curate the labels, split them (devset / optimizer val / optimizer train) and write SFT data."""
    return _ensure(CurationStage(cfg, data))  # type: ignore[return-value]


def finetune_stage(cfg: Config, data: Banking77Data) -> FinetuneManifest:
    """LoRA-finetune the student on the SFT data as a Ray job, through DSPy's `LM.finetune`."""
    return _ensure(FinetuneStage(cfg, CurationStage(cfg, data)))  # type: ignore[return-value]


def _evaluation(cfg: Config, data: Banking77Data) -> EvaluationStage:
    curation = CurationStage(cfg, data)
    return EvaluationStage(cfg, data, curation, FinetuneStage(cfg, curation))


def evaluation_stage(cfg: Config, data: Banking77Data) -> EvalManifest:
    """Base and finetuned student, zero-shot and BFRS: devset, test set, best, plots, deploy params."""
    return _ensure(_evaluation(cfg, data))  # type: ignore[return-value]


def _serving(cfg: Config, data: Banking77Data, keep_running: bool = False) -> ServingStage:
    ev = _evaluation(cfg, data)
    return ServingStage(cfg, data, ev, ev.finetune, keep_running)


def serving_stage(cfg: Config, data: Banking77Data, keep_running: bool = False) -> ServingManifest:
    """Deploy the program and its LLM as one Serve deployment and classify test queries over HTTP.

    With `keep_running` (the notebook) the deployment stays up for you to query; `shutdown()` ends it.
    """
    return _ensure(_serving(cfg, data, keep_running))  # type: ignore[return-value]


def deploy_config(cfg: Config, data: Banking77Data | None = None) -> Path:
    """The profile's multi-app Serve config with this run's artifact paths filled in."""
    return _serving(cfg, data if data is not None else DataStage(cfg).data).deploy_config()


def client_headers(cfg: Config) -> dict[str, str]:
    """The Authorization header a client of the profile's program app sends (if its key is set)."""
    return program_app_env(cfg.path(cfg.serving.deploy_config))[1]


def finish_run(cfg: Config, started: float | None = None) -> dict:
    """Write the run manifest (wall time since `setup`, sizes, versions), the report, and print the summary."""
    report = _finish_run(cfg, started)
    print_summary(report)
    return report.get("run", {})


def run(profile: str | None = None, verbose: bool | None = None) -> Config:
    cfg = load_config(profile)
    console.rule(f"distill: profile [bold]{cfg.name}[/] ({cfg.profile})")
    started = setup(cfg, verbose)
    data = data_stage(cfg)
    baselines_stage(cfg, data)
    teacher_stage(cfg, data)
    curation_stage(cfg, data)
    finetune_stage(cfg, data)
    evaluation_stage(cfg, data)
    serving_stage(cfg, data)
    finish_run(cfg, started)
    return cfg
