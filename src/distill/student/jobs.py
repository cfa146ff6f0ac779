"""Submit a command as a Ray job (JobSubmissionClient, the API behind `ray job submit`), stream its
logs and wait with a timeout. A failed job raises with Ray's message and the tail of its log."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from distill.errors import DistillError


class JobFailed(DistillError):
    """The Ray job ended in FAILED/STOPPED or did not finish in time."""


def load_job_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"job config not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    unknown = set(raw) - {"entrypoint", "runtime_env", "forward_env"}
    if unknown or "entrypoint" not in raw:
        raise DistillError(f"{p}: needs 'entrypoint'; unknown keys: {sorted(unknown)}")
    return raw


def runtime_env(job_cfg: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in (job_cfg.get("runtime_env") or {}).items() if v is not None}
    forwarded = {k: os.environ[k] for k in job_cfg.get("forward_env", []) if os.environ.get(k)}
    if forwarded:
        env["env_vars"] = {**env.get("env_vars", {}), **forwarded}
    return env


def submit_and_wait(
    address: str,
    entrypoint: str,
    runtime_env: dict[str, Any] | None = None,
    timeout_s: float = 3600.0,
    on_log: Callable[[str], None] | None = print,
    poll_s: float = 2.0,
) -> str:
    """Run `entrypoint` as a Ray job at `address`; return its logs, or raise JobFailed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None)
    deadline = time.monotonic() + timeout_s
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if on_log is not None and len(logs) > shown:
            on_log(logs[shown:].rstrip("\n"))
        shown = len(logs)
        if status.is_terminal():
            break
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise JobFailed(f"Ray job {job_id} did not finish in {timeout_s:.0f}s; stopped. Log tail:\n{logs[-2000:]}")
        time.sleep(poll_s)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        tail = "\n".join(logs.strip().splitlines()[-25:])
        raise JobFailed(f"Ray job {job_id} {status.value}: {info.message or ''}\n--- log tail ---\n{tail}")
    return logs
