"""Run tracking with MLflow: every pipeline run recorded, with its stages, numbers, files and DSPy traces.

One MLflow run per pipeline run (`start` ... `finish`), a nested run per stage (`stage`). The parent carries
the profile's settings as params, every number of `report.json` as metrics, `report.json` and
`deploy_params.json`, and tags (profile, git commit, versions). A stage that ran logs its own numbers, step
series (the finetune's loss per step), plots and files on its nested run; a stage skipped as current gets
a nested run tagged `distill.skipped=true` and logs nothing else, so a re-run duplicates no metric. The
evaluation stage registers the best program with `mlflow.dspy.log_model`.

The store is embedded in the artifact directory (SQLite plus a folder of artifacts, no server:
`ui_command` prints how to browse it); a remote tracking server comes from the variable
`tracking.uri_env` names. Tracking never stops a run: an unreachable server falls back to the local store
with a warning, and any later MLflow error is reported once and ends tracking for that run -- the run's
own artifacts are written by the stages, not through MLflow, so nothing of the run is lost.

The pipeline calls this module; it imports only the configuration (MLflow and DSPy lazily, when enabled).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from rich import box
from rich.console import Console
from rich.table import Table

from distill import logs
from distill.config import Config, project_root
from distill.env import STACK, installed_versions

console = Console()

VERSIONS = (*STACK, "mlflow")
PIPELINE_TAG = "distill.pipeline"  # "true" on a pipeline run (the parent); stage runs carry STAGE_TAG
STAGE_TAG = "distill.stage"
SKIPPED_TAG = "distill.skipped"
# The history's headline numbers: metric keys of the parent run (report.json's, flattened).
TEACHER_METRIC = "teacher.accuracy_test"
STUDENT_METRIC = "eval.best.test_score"
WALL_METRIC = "run.wall_seconds"

T = TypeVar("T")


def store_dir(cfg: Config) -> Path:
    """The embedded store: `mlflow.db` (runs, metrics, traces, registry) and `artifacts/`."""
    return cfg.artifacts / "mlflow"


def local_uri(cfg: Config) -> str:
    return f"sqlite:///{store_dir(cfg) / 'mlflow.db'}"


def ui_command(cfg: Config) -> str:
    """How to browse the profile's local store."""
    return f"mlflow ui --backend-store-uri {local_uri(cfg)}"


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or f"distill-{cfg.name}"


def model_name(cfg: Config) -> str:
    """The registered model the best program of each run becomes a version of."""
    return f"distill-{cfg.name}"


def remote_uri(cfg: Config) -> str | None:
    """The remote tracking URI from the environment (never from a file), or None."""
    env = cfg.tracking.uri_env
    return (os.environ.get(env) or "").strip() or None if env else None


# --- what is logged -------------------------------------------------------------------------------------

_BAD_KEY_CHARS = re.compile(r"[^\w.\- :/]")  # MLflow's allowed characters in metric/param names


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (`eval.testset.base.bfrs`); other values kept as they are."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def metric_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)


def numbers(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every finite number in `d` (booleans and lists excluded: lists are step series), by dotted key."""
    return {metric_key(k): float(v) for k, v in flatten(d, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def params(cfg: Config) -> dict[str, str]:
    """The profile's settings, flattened (lists and nulls as JSON), within MLflow's value length."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    out = {}
    for k, v in flatten(cfg.model_dump(mode="json")).items():
        s = v if isinstance(v, str) else json.dumps(v)
        out[metric_key(k)] = s if len(s) <= MAX_PARAM_VAL_LENGTH else s[: MAX_PARAM_VAL_LENGTH - 3] + "..."
    return out


def git_commit(root: Path | None = None) -> str:
    """The checkout's commit (`+dirty` with uncommitted changes), or `unknown` outside git."""
    root = root or project_root()
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    return installed_versions(VERSIONS)


# --- the run --------------------------------------------------------------------------------------------


@dataclass
class Tracker:
    """The MLflow run of one pipeline run. After an MLflow error it stops calling MLflow (`broken`)."""

    cfg: Config
    uri: str
    run_id: str
    experiment_id: str
    traces: bool
    stages: dict[str, bool] = field(default_factory=dict)  # stage -> skipped
    broken: bool = False

    def safe(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`fn(...)`, or None after a warning: tracking must never stop or fail the run."""
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any MLflow/store/network error: report once, go on untracked
            self.broken = True
            console.print(f"[yellow]warning: MLflow tracking failed while {what} ({type(e).__name__}: {e}); "
                          f"the run goes on without tracking, its artifacts are under {self.cfg.artifacts}[/]")
            return None


_active: Tracker | None = None


def active() -> Tracker | None:
    """The tracker of the pipeline run in progress in this process, if any."""
    return _active


def _reachable(uri: str) -> str | None:
    """None when the tracking server answers, else why not (one quick try: MLflow otherwise retries for
    minutes)."""
    from mlflow import MlflowClient

    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
        return None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, auth, HTTP errors: all mean "not usable"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _experiment_id(cfg: Config, local: bool) -> str:
    import mlflow

    name = experiment_name(cfg)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # Local: the artifacts beside the database, so the whole store is one folder of the artifact directory.
    location = (store_dir(cfg) / "artifacts").as_uri() if local else None
    return mlflow.create_experiment(name, artifact_location=location)


def start(cfg: Config) -> Tracker | None:
    """Open the pipeline run (a previous one still open in this process is ended as killed).

    Returns None when tracking is off or could not start (with a warning): the pipeline runs as before.
    """
    global _active
    if _active is not None:
        finish({}, status="KILLED")
    if not cfg.tracking.enabled:
        return None
    import mlflow

    logs.apply_levels()  # importing MLflow configures its logger at INFO
    uri, note = remote_uri(cfg), {}
    if uri and (why := _reachable(uri)):
        console.print(f"[yellow]warning: the tracking server in ${cfg.tracking.uri_env} is unreachable ({why}); "
                      f"this run is recorded in the local store instead ({ui_command(cfg)})[/]")
        note = {"distill.remote_unreachable": cfg.tracking.uri_env or ""}
        uri = None
    local = uri is None
    if local:
        store_dir(cfg).mkdir(parents=True, exist_ok=True)
        uri = local_uri(cfg)
    probe = Tracker(cfg, uri, "", "", False)  # reports a failure to start like any other tracking failure

    def _open() -> Tracker:
        mlflow.set_tracking_uri(uri)
        exp_id = _experiment_id(cfg, local)
        mlflow.set_experiment(experiment_id=exp_id)
        tags = {PIPELINE_TAG: "true", "distill.profile": cfg.name, "distill.git_commit": git_commit(),
                "mlflow.source.git.commit": git_commit().removesuffix("+dirty"), **note,
                **{f"version.{k}": v for k, v in versions().items()}}
        run = mlflow.start_run(run_name=f"{cfg.name} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}", tags=tags)
        mlflow.log_params(params(cfg))
        traces = cfg.tracking.traces and cfg.tracking.trace_sample > 0
        if traces:
            _enable_traces(cfg.tracking.trace_sample)
        return Tracker(cfg, uri, run.info.run_id, exp_id, traces)

    _active = probe.safe("starting the run", _open)
    return _active


def _enable_traces(sample: float) -> None:
    import mlflow
    import mlflow.dspy

    # MLflow's sampler reads its ratio when the tracer is set up: set it, then have the tracer set up again.
    os.environ["MLFLOW_TRACE_SAMPLING_RATIO"] = str(sample)
    mlflow.tracing.reset()
    mlflow.tracing.disable_notebook_display()  # the notebook's outputs stay results, not trace widgets
    # Traces of direct calls and of dspy.Evaluate; none from BFRS's compile (hundreds of calls, no insight).
    mlflow.dspy.autolog(log_traces=True, log_traces_from_eval=True, log_traces_from_compile=False, silent=True)


def _disable_traces() -> None:
    import mlflow.dspy

    mlflow.dspy.autolog(disable=True, silent=True)
    os.environ.pop("MLFLOW_TRACE_SAMPLING_RATIO", None)


def call_traced(name: str, fn: Callable[..., T], **inputs: Any) -> T:
    """`fn(**inputs)`, always traced while a run with traces is in progress (a single call worth seeing
    whole, e.g. the sanity check), whatever the sampling ratio."""
    t = _active
    if t is None or t.broken or not t.traces:
        return fn(**inputs)
    import mlflow

    def call(**kw: Any) -> T:  # a function: mlflow.trace names the span and its inputs from it
        return fn(**kw)

    call.__name__ = name
    return mlflow.trace(call, name=name, sampling_ratio_override=1.0)(**inputs)


@dataclass
class StageRecord:
    """What the pipeline records about one stage on its nested run (no-ops without a tracker)."""

    tracker: Tracker | None
    name: str

    def skipped(self, fingerprint: str) -> None:
        """The stage was current: tagged, nothing logged (its numbers are on the run that computed them)."""
        if self.tracker is None:
            return
        import mlflow

        self.tracker.stages[self.name] = True
        self.tracker.safe(f"tagging the {self.name} stage", mlflow.set_tags,
                          {SKIPPED_TAG: "true", "distill.fingerprint": fingerprint})

    def ran(self, manifest: Mapping[str, Any], fingerprint: str, files: Sequence[Path] = (),
            dicts: Mapping[str, Any] | None = None,
            series: Mapping[str, Sequence[tuple[int, float]]] | None = None) -> None:
        """The stage ran: its manifest's numbers, step series ((step, value) pairs), files and JSON dicts."""
        t = self.tracker
        if t is None:
            return
        import mlflow
        from mlflow.entities import Metric

        t.stages[self.name] = False
        t.safe(f"tagging the {self.name} stage", mlflow.set_tags,
               {SKIPPED_TAG: "false", "distill.fingerprint": fingerprint})
        t.safe(f"logging the {self.name} stage's metrics", mlflow.log_metrics, numbers(manifest))
        now, run = int(time.time() * 1000), mlflow.active_run()
        for key, values in (series or {}).items():
            steps = [Metric(metric_key(key), float(v), now, step) for step, v in values]
            for i in range(0, len(steps), 1000):  # MLflow's limit per batch
                t.safe(f"logging {key} per step", mlflow.MlflowClient().log_batch, run.info.run_id,
                       metrics=steps[i: i + 1000])
        for f in files:
            if f.is_dir():
                t.safe(f"logging {f}", mlflow.log_artifacts, str(f), f.name)
            elif f.is_file():
                t.safe(f"logging {f}", mlflow.log_artifact, str(f))
        for name, d in (dicts or {}).items():
            t.safe(f"logging {name}", mlflow.log_dict, d, name)

    def register_program(self, program: Any, lm: Any, adapter: Any, name: str) -> None:
        """Log the program with its LM and adapter (`mlflow.dspy.log_model`) as a new version of `name`.

        `mlflow.dspy.load_model("models:/<name>/latest")` gives it back, ready to call, in a fresh process
        that has this package installed (the LM is the served endpoint, as in the program app).
        """
        t = self.tracker
        if t is None:
            return
        import dspy
        import mlflow.dspy

        def _log() -> None:
            served = lm.copy()
            served.kwargs.pop("api_key", None)  # a key stays in the environment, never in the store
            # MLflow loads back the program DSPy just saved (our own file, a moment old) and DSPy warns, twice,
            # that pickles from untrusted sources run code: not news here, and two lines in every notebook.
            with dspy.context(lm=served, adapter=adapter), _quiet("dspy.primitives.base_module", "dspy.dsp.utils.settings"):
                # DSPy's own save (`Module.save(save_program=True)`), as MLflow recommends over its pickle
                mlflow.dspy.log_model(program, name="program", registered_model_name=name, use_dspy_model_save=True,
                                      # given, so MLflow does not infer them by importing in a subprocess
                                      pip_requirements=[f"{d}=={v}" for d, v in versions().items()
                                                        if d in ("dspy", "mlflow")])

        t.safe(f"registering the best program as {name}", _log)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """These loggers say nothing below ERROR for the block (unless verbose)."""
    saved = {n: logging.getLogger(n).level for n in loggers}
    if not logs.settings().verbose:
        for n in loggers:
            logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


@contextlib.contextmanager
def stage(name: str) -> Iterator[StageRecord]:
    """A nested run for one stage of the pipeline run in progress (none: a record that logs nothing)."""
    t = _active
    if t is None or t.broken:
        yield StageRecord(None, name)
        return
    import mlflow

    child = t.safe(f"starting the {name} stage's run", mlflow.start_run, run_name=name, nested=True,
                   tags={STAGE_TAG: name, "distill.profile": t.cfg.name})
    status = "FINISHED"
    try:
        yield StageRecord(t if child is not None else None, name)
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if child is not None:
            t.safe(f"ending the {name} stage's run", mlflow.end_run, status)


def finish(report: Mapping[str, Any], files: Sequence[Path] = (), status: str = "FINISHED") -> str | None:
    """Close the pipeline run: the report's numbers as metrics, its files, which stages ran. Its run id."""
    global _active
    t, _active = _active, None
    if t is None:
        return None
    import mlflow

    if report:
        t.safe("logging the report's metrics", mlflow.log_metrics, numbers(report))
    for f in files:
        if f.is_file():
            t.safe(f"logging {f}", mlflow.log_artifact, str(f))
    t.safe("tagging the run", mlflow.set_tags, {
        "distill.stages_ran": ",".join(n for n, skipped in t.stages.items() if not skipped),
        "distill.stages_skipped": ",".join(n for n, skipped in t.stages.items() if skipped)})
    if t.traces:
        t.safe("turning DSPy traces off", _disable_traces)
    # Ended even after an error, so the store does not keep a run that looks in progress.
    t.broken = False
    t.safe("ending the run", _end_all, status)
    if status == "FINISHED" and not t.broken and t.uri.startswith("sqlite:"):
        print(f"run recorded in MLflow ({t.run_id}); browse: {ui_command(t.cfg)}")  # unwrapped: to copy
    return t.run_id


def _end_all(status: str) -> None:
    import mlflow

    while mlflow.active_run() is not None:  # a stage's run left open by an interrupted cell, then the parent
        mlflow.end_run(status)


# --- the run history ------------------------------------------------------------------------------------


def client(cfg: Config) -> Any:
    """An MLflow client on the profile's store (the remote one when its variable is set)."""
    from mlflow import MlflowClient

    return MlflowClient(remote_uri(cfg) or local_uri(cfg))


def run_history(cfg: Config, last: int = 10) -> list[dict[str, Any]]:
    """The last `last` pipeline runs of the profile, newest first: time, status, headline numbers."""
    if last < 1:
        from distill.errors import DistillError

        raise DistillError(f"the number of runs to show must be at least 1, not {last}")
    if remote_uri(cfg) is None and not (store_dir(cfg) / "mlflow.db").is_file():
        return []
    c = client(cfg)
    exp = c.get_experiment_by_name(experiment_name(cfg))
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = 'true'",
                         order_by=["attributes.start_time DESC"], max_results=last)
    rows = []
    for r in runs:
        m, tags = r.data.metrics, r.data.tags
        teacher, student = m.get(TEACHER_METRIC), m.get(STUDENT_METRIC)
        rows.append({
            "run_id": r.info.run_id, "started": datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc),
            "status": r.info.status, "profile": tags.get("distill.profile", ""), "teacher": teacher,
            "student": student, "ratio": student / teacher if teacher and student is not None else None,
            "wall_seconds": m.get(WALL_METRIC), "stages_ran": tags.get("distill.stages_ran", ""),
            "stages_skipped": tags.get("distill.stages_skipped", ""),
            "commit": tags.get("distill.git_commit", "")[:9],
        })
    return rows


def history_table(rows: Sequence[Mapping[str, Any]], title: str = "Pipeline runs", caption: str | None = None) -> Table:
    """The run history as a rich table (newest first)."""
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left",
              box=box.MINIMAL_HEAVY_HEAD, show_edge=False)
    for c in ("started (UTC)", "run", "profile", "status", "teacher (test)", "best student (test)", "ratio",
              "wall", "stages run", "commit"):
        t.add_column(c, justify="right" if c in ("teacher (test)", "best student (test)", "ratio", "wall")
                     else "left")

    def pct(x: float | None) -> str:
        return "" if x is None else f"{x:.1%}"

    for r in rows:
        wall = r.get("wall_seconds")
        t.add_row(f"{r['started']:%Y-%m-%d %H:%M}", r["run_id"][:8], r["profile"], r["status"], pct(r["teacher"]),
                  pct(r["student"]), "" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                  "" if wall is None else f"{wall / 60:.1f} min", _stages(r),
                  r["commit"])
    return t


def _stages(row: Mapping[str, Any]) -> str:
    """Which stages ran: 'all 7' for a fresh run, else their names (a re-run: usually just serving)."""
    ran = [n for n in row.get("stages_ran", "").split(",") if n]
    if not row.get("stages_skipped"):
        return f"all {len(ran)}" if ran else ""
    return ", ".join(ran) or "none (all current)"
