"""Submit a command as a Ray job (JobSubmissionClient, the API behind `ray job submit`), stream its log
(`tail_job_logs`) and wait. A failed job raises with Ray's message and the tail of its log. A timeout, a
Ctrl-C or a stop request stops the job (`stop_job`), says so, and waits until Ray reports it stopped: a job is
never left running on the cluster because its submitter went away."""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import yaml

from distill.errors import DistillError

JOB_CONFIG_KEYS = {"entrypoint", "runtime_env", "forward_env", "entrypoint_resources", "entrypoint_num_cpus"}


class JobFailed(DistillError):
    """The Ray job ended in FAILED/STOPPED or did not finish in time."""


class JobStopped(JobFailed):
    """We stopped the Ray job: it ran out of time, or its submitter was interrupted or asked it to stop."""


class StopRequest(threading.Event):
    """`submit_and_wait(stop=...)` from another thread: `request("why")` stops the job, and the why is reported."""

    reason = "stop requested"

    def request(self, reason: str) -> None:
        self.reason = reason
        self.set()


def load_job_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"job config not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    unknown = set(raw) - JOB_CONFIG_KEYS
    if unknown or "entrypoint" not in raw:
        raise DistillError(f"{p}: needs 'entrypoint'; unknown keys: {sorted(unknown)}")
    return raw


def runtime_env(job_cfg: dict[str, Any]) -> dict[str, Any]:
    env = {k: v for k, v in (job_cfg.get("runtime_env") or {}).items() if v is not None}
    forwarded = {k: os.environ[k] for k in job_cfg.get("forward_env", []) if os.environ.get(k)}
    if forwarded:
        env["env_vars"] = {**env.get("env_vars", {}), **forwarded}
    return env


class _Log:
    """The job's log as it streams: passed on chunk by chunk, its last lines kept for error messages."""

    def __init__(self, on_log: Callable[[str], None] | None) -> None:
        self.on_log = on_log
        self.chunks: list[str] = []
        self.last: collections.deque[str] = collections.deque(maxlen=25)

    def add(self, chunk: str) -> None:
        self.chunks.append(chunk)
        self.last.extend(chunk.rstrip("\n").splitlines())
        if self.on_log is not None and chunk.strip():
            self.on_log(chunk.rstrip("\n"))

    def tail(self) -> str:
        return "\n".join(self.last)

    def text(self) -> str:
        return "".join(self.chunks)


def _terminal_status(client: Any, job_id: str, wait_s: float) -> Any:
    """The job's status once terminal (Ray's status API, polled with tenacity); the last one seen after `wait_s`."""
    from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

    retrying = Retrying(retry=retry_if_result(lambda s: not s.is_terminal()), wait=wait_fixed(0.5),
                        stop=stop_after_delay(wait_s), retry_error_callback=lambda state: state.outcome.result())
    return retrying(client.get_job_status, job_id)


def stop_job(client: Any, job_id: str, reason: str) -> str:
    """Stop a Ray job and wait until Ray says it is; returns its final status. Says what it does on stderr."""
    print(f"stopping Ray job {job_id} ({reason})", file=sys.stderr, flush=True)
    try:
        client.stop_job(job_id)
        status = _terminal_status(client, job_id, wait_s=60).value
    except Exception as e:  # noqa: BLE001 - the cluster gone, a network error: report it, do not mask the cause
        print(f"could not stop Ray job {job_id}: {type(e).__name__}: {e}; check `ray job list`", file=sys.stderr,
              flush=True)
        return "UNKNOWN"
    print(f"Ray job {job_id}: {status} ({reason})", file=sys.stderr, flush=True)
    return str(status)


async def _follow(client: Any, job_id: str, log: _Log, timeout_s: float, stop: threading.Event | None) -> str:
    """Stream the log until the job ends ("done"), `timeout_s` passes ("timeout") or `stop` is set ("stop")."""

    async def tail() -> None:
        try:
            async for chunk in client.tail_job_logs(job_id):  # ends when the job does
                log.add(chunk)
        except RuntimeError as e:  # the stream broke (a dashboard restart): wait on the status API instead
            log.add(f"(log stream ended early: {e}; waiting for the job's status)\n")
            while not (await asyncio.to_thread(client.get_job_status, job_id)).is_terminal():
                await asyncio.sleep(2)

    async def stopped() -> None:
        assert stop is not None
        while not stop.is_set():
            await asyncio.sleep(0.2)

    follow = asyncio.ensure_future(tail())
    waiters = {follow} | ({asyncio.ensure_future(stopped())} if stop is not None else set())
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    if follow in done:
        follow.result()
        return "done"
    return "stop" if stop is not None and stop.is_set() else "timeout"


def _run(coro: Any) -> Any:
    """`asyncio.run`, also from a thread whose event loop is running (a notebook cell): then in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # in the main thread, Ctrl-C cancels it and raises KeyboardInterrupt here
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = e

    t = threading.Thread(target=target, name="ray-job-log", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def submit_and_wait(
    address: str | None,
    entrypoint: str,
    runtime_env: dict[str, Any] | None = None,
    timeout_s: float = 3600.0,
    on_log: Callable[[str], None] | None = print,
    *,
    submission_id: str | None = None,
    entrypoint_resources: dict[str, float] | None = None,
    entrypoint_num_cpus: float | None = None,
    stop: threading.Event | None = None,
) -> str:
    """Run `entrypoint` as a Ray job at `address`; return its log, or raise JobFailed.

    The job is stopped (and this says so) when it does not finish in `timeout_s` (JobStopped), when `stop` is
    set from another thread (JobStopped), or when this call is interrupted (Ctrl-C: KeyboardInterrupt
    propagates once the job is stopped). `entrypoint_resources` pins the job to nodes that have them.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    from distill import logs

    logs.apply_levels()  # importing Ray's job SDK put its logger at INFO
    client = JobSubmissionClient(address)
    if stop is not None and stop.is_set():
        raise JobStopped("stop requested before the Ray job was submitted: nothing submitted")
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None, submission_id=submission_id,
                               entrypoint_resources=entrypoint_resources or None,
                               entrypoint_num_cpus=entrypoint_num_cpus)
    log = _Log(on_log)
    try:
        outcome = _run(_follow(client, job_id, log, timeout_s, stop))
    except BaseException as e:  # Ctrl-C (KeyboardInterrupt), or anything unexpected: never leave the job running
        stop_job(client, job_id, "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else
                 f"the submitter failed: {type(e).__name__}")
        raise
    if outcome != "done":
        reason = f"did not finish in {timeout_s:.0f}s" if outcome == "timeout" else getattr(stop, "reason",
                                                                                              "stop requested")
        status = stop_job(client, job_id, reason)
        raise JobStopped(f"Ray job {job_id} {reason}; stopped it ({status}). Log tail:\n{log.tail()}")
    status = _terminal_status(client, job_id, wait_s=30)
    if not status.is_terminal():  # the log ended but the job did not: do not leave it behind
        raise JobStopped(f"Ray job {job_id}: its log ended but it is still {status.value}; stopped it "
                         f"({stop_job(client, job_id, 'its log ended')}). Log tail:\n{log.tail()}")
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        raise JobFailed(f"Ray job {job_id} {status.value}: {info.message or ''}\n--- log tail ---\n{log.tail()}")
    return log.text()
