"""Quiet by default: Ray's, Serve's and the finetune job's logs go to files under `<artifacts>/logs/`.

A notebook is for results; thousands of Ray INFO lines and per-request access lines bury them. Nothing
here filters output after the fact: each library is configured through its own settings.

- Ray: `ray.init(log_to_driver=False, logging_level=WARNING)` (`ray_init_kwargs`). Worker, actor and
  replica output stays in Ray's session logs, linked as `<logs>/ray`.
- Serve: controller, proxy and replica logs, the access log included, are written to `<logs>/serve`
  (`serve_logging_config`); the driver's `ray.serve` logger says only warnings (`apply_levels`).
- The finetune job: its whole log goes to `<logs>/<job>.log` (`JobLog`).
- Warnings known to be harmless are ignored where they come from (`configure`, and next to the code that
  triggers them).
- Libraries that `print()` their progress instead of logging it (DSPy's optimizers) run inside
  `chatter_to_log`, which sends their stdout and stderr to `<logs>/<name>.log`.

`configure(log_dir, verbose=True)` (the `verbose` setting, `pipeline.setup`) brings it all back into
the notebook. Logging is per process, so this is process-wide state, set once by `pipeline.setup`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO


@dataclass
class LogSettings:
    dir: Path | None = None  # None: Ray's own defaults (its session directory under /tmp/ray)
    verbose: bool = False


_settings = LogSettings()

# Ray's driver prints "(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries
# remaining, so the task will be retried" on every `serve.shutdown()`: Serve's controller kills itself while
# the driver waits on that call, as designed (Serve catches the resulting error). The line is not a log
# record but an error the driver's core worker pushes for any task it is about to retry, so no logger level
# reaches it; this RayConfig setting stops the push at its source. A process reads RAY_* settings when it
# first uses Ray's config (the driver: on `import ray`), so it is set here, before the pipeline imports Ray,
# and Ray's processes inherit it. A task that finally fails still raises.
_RETRY_NOTICE = "RAY_enable_output_error_log_if_still_retry"
_set_retry_notice = False


def settings() -> LogSettings:
    """Where logs go and whether they are also shown, as `configure` last set them."""
    return _settings


def configure(log_dir: Path | None, verbose: bool = False) -> LogSettings:
    """Send Ray's, Serve's and the finetune job's logs to `log_dir` (and, with `verbose`, here too)."""
    global _settings
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    _settings = LogSettings(log_dir, verbose)
    apply_levels()
    _quiet_retry_notices(not verbose)
    if not verbose:
        from tqdm import TqdmWarning

        # tqdm.auto (imported by sentence-transformers and others) wants ipywidgets for a widget bar and
        # falls back to the text bar, which Jupyter updates in place just as well.
        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    return _settings


def _quiet_retry_notices(quiet: bool) -> None:
    """Set (or, when verbose, take back) the RayConfig setting that drops Ray's task-retry notices."""
    global _set_retry_notice
    if quiet and _RETRY_NOTICE not in os.environ:
        os.environ[_RETRY_NOTICE] = "0"
        _set_retry_notice = True
    elif not quiet and _set_retry_notice:
        os.environ.pop(_RETRY_NOTICE, None)
        _set_retry_notice = False


def apply_levels() -> None:
    """The driver-side loggers of Ray, Serve and dspy.Evaluate: INFO when verbose, else WARNING.

    Serve configures its `ray.serve` logger when `ray.serve` is first imported, so this runs again after
    that import (`distill.serving.control` does).
    """
    level = logging.INFO if _settings.verbose else logging.WARNING
    # dspy.Evaluate logs its score once more after its progress bar's last line has shown it.
    # MLflow says at INFO that it creates its store's tables (alembic: each migration) on a first run.
    for name in ("ray", "ray.serve", "dspy.evaluate", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(level)
    # Importing ray.serve.llm puts the root logger at INFO behind a JSON handler, and vLLM its own logger:
    # every library's INFO lines (httpx, botocore, vLLM) would reach the terminal. Verbose keeps them.
    if not _settings.verbose:
        for name in ("", "vllm"):
            logging.getLogger(name).setLevel(logging.WARNING)
    # `import ray` sets the "ray" logger to INFO, and while importing Ray says (at INFO) that without ipywidgets
    # its objects show as text in notebooks, which is all we show of them.
    logging.getLogger("ray.widgets.util").setLevel(level)
    # Ray's job SDK sets its own logger to INFO on import: following a job's log (`tail_job_logs`) would
    # end with a "WebSocket closed for job ..." line.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(level)
    # Ray announces, as a warning, that a new local cluster uses token authentication (its default, kept
    # here). Setting RAY_AUTH_MODE=token ourselves would say the same without it, but Ray reads the variable
    # into its config once per process, so a late setting leaves the driver without the token.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.INFO if _settings.verbose else logging.ERROR)


def ray_init_kwargs() -> dict[str, Any]:
    """`ray.init` arguments: worker output reaches this process only when verbose."""
    return {"log_to_driver": _settings.verbose,
            "logging_level": logging.INFO if _settings.verbose else logging.WARNING}


def link_ray_session(session_dir: str | None) -> None:
    """`<logs>/ray` -> this Ray session's log directory (raylet, GCS, every worker's stdout/stderr).

    Ray's session directory holds its sockets, whose paths must stay short, so it stays under /tmp/ray
    (`ray.init(_temp_dir=...)` under a deep artifact path would fail); the link makes it findable.
    """
    if _settings.dir is None or not session_dir:
        return
    link, target = _settings.dir / "ray", Path(session_dir) / "logs"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=True)


def serve_logging_config() -> dict[str, Any]:
    """Serve's `LoggingConfig` for `serve.start` / `serve.run`: every component's log file in `<logs>/serve`."""
    cfg: dict[str, Any] = {"log_level": "INFO", "enable_access_log": True}
    if _settings.dir is not None:
        cfg["logs_dir"] = str(_settings.dir / "serve")
    return cfg


def where() -> str:
    """A hint for error messages: where the logs of what failed are."""
    if _settings.dir is None:
        return "Ray's logs: /tmp/ray/session_latest/logs"
    return f"logs: {_settings.dir}"


@contextlib.contextmanager
def chatter_to_log(name: str) -> Iterator[TextIO | None]:
    """Inside this block, stdout and stderr go to `<logs>/<name>.log` (appended), unless verbose.

    For libraries that `print()` what others log -- DSPy's BootstrapFewShotWithRandomSearch prints its
    sampling plan, each candidate's score and the running list of scores -- so no logging level reaches
    it. DSPy's own log handler writes to whatever `sys.stderr` is, so its records in the block go to the
    file too; an error that stops the block still raises here. Yields the real stdout (for a progress
    display of one's own), or None when nothing is redirected.
    """
    if _settings.verbose:
        yield None
        return
    path = (_settings.dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    real = sys.stdout
    with path.open("a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield real


class JobLog:
    """An `on_log` for `distill.student.jobs.submit_and_wait`: appends to `<logs>/<name>.log`; prints too when verbose."""

    def __init__(self, name: str) -> None:
        self.path = (_settings.dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"{name}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.verbose = _settings.verbose

    def __call__(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
        if self.verbose:
            print(text)


__all__ = ["LogSettings", "configure", "settings", "apply_levels", "ray_init_kwargs", "link_ray_session",
           "serve_logging_config", "where", "chatter_to_log", "JobLog"]
