"""A two-node Ray cluster on one machine, for the rehearsal (`make rehearse`) and the tests.

- `ray_head`: a head node started with `ray start --head`, as a cluster's head is. The pipeline joins it
  through RAY_ADDRESS (`joined`), exactly as it joins a real cluster: so it must also tear down only what it
  started there.
- `job_node`: a second node (`ray start --address ...`) offering a custom resource (`JOB_NODE`) that pins the
  finetune job to it (`entrypoint_resources`, and the recipe's `scaling.resources` for the Ray Train workers).
  It runs in a mount namespace of its own (`unshare --mount`) with an empty tmpfs mounted over each directory
  in `hide` (the driver's artifact directory). Every process of that node -- its raylet, the job's
  entrypoint, the Ray Train workers it hosts -- sees an empty directory there, while the driver and the head
  see the real files. A path that exists only on the driver's disk therefore fails on the job node with "No
  such file", as it would on another machine; code, venv and model cache stay visible, as a cluster image
  would carry them. Another working directory would not do this: the job gets absolute paths, and the same
  user could still read them.

Processes are started here and stopped by their own ids (never `ray stop`, which stops every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx

from distill.errors import DistillError

JOB_NODE = "job_node"  # the custom resource the job node offers and the finetune job asks for
UNRELATED_APP = "unrelated"  # a Serve application this run did not start (see `deploy_unrelated_app`)


class ClusterError(DistillError):
    """The local cluster could not be started as asked."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_cli() -> str:
    venv = Path(sys.executable).with_name("ray")  # this interpreter's Ray, not whichever is on PATH
    return str(venv) if venv.is_file() else (shutil.which("ray") or "ray")


def _port_args() -> list[str]:
    """Ports of a node's own processes, free ones: two nodes on one machine must not ask for the same defaults."""
    return [arg for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
            for arg in (flag, str(free_port()))]


def _env(drop: Sequence[str]) -> dict[str, str]:
    """The environment of a node we start: ours without `drop`; stopping it stops it at once (no 30 s drain
    for Serve's proxies: the whole throwaway cluster goes)."""
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def _stop(proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    """SIGTERM to `ray start --block` (it drains and stops its node's processes), then SIGKILL its group."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _log_tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def _refresh_ray_config() -> None:
    """Make this process's Ray read RAY_AUTH_MODE again (what Ray itself does when it turns token auth on)."""
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass


@contextlib.contextmanager
def token_auth() -> Iterator[str]:
    """Our cluster's authentication, as a real cluster's: Ray's token auth with the machine's token
    (~/.ray/auth_token; `ray get-auth-token --generate` makes one when there is none, as `ray.init` does),
    set through RAY_AUTH_MODE for every process that talks to the cluster: the nodes started here and this
    process (the pipeline's `ray.init` and job clients). An explicit RAY_AUTH_MODE wins.

    Needed because Ray turns token auth on by itself only for a cluster it finds, never for an explicit
    address such as RAY_ADDRESS: a driver joining a token cluster needs RAY_AUTH_MODE=token, as a user of a
    real cluster does. Without it every call is refused (401, or UNAUTHENTICATED from the GCS).
    """
    before = os.environ.get("RAY_AUTH_MODE")
    mode = before or "token"
    if mode == "token":  # the token goes to ~/.ray/auth_token; its value is never printed
        subprocess.run([_ray_cli(), "get-auth-token", "--generate"], check=True, capture_output=True)
    os.environ["RAY_AUTH_MODE"] = mode
    _refresh_ray_config()
    try:
        yield mode
    finally:
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before
        _refresh_ray_config()


def dashboard_headers() -> dict[str, str]:
    """The headers Ray's own clients send to the dashboard: its token when token authentication is on (Ray
    turns it on by itself when ~/.ray/auth_token exists); a plain request then gets 401."""
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
    except ImportError:  # a Ray without token authentication
        return {}
    return dict(get_auth_headers_if_auth_enabled({}))


def dashboard_get(head: "Head", path: str) -> Any:
    """GET <dashboard><path> as Ray's clients do; the JSON body."""
    r = httpx.get(f"{head.dashboard}{path}", headers=dashboard_headers(), timeout=30)
    r.raise_for_status()
    return r.json()


def _job_server_up(dashboard: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(dashboard)  # checks the server's version: up, and answering with our credentials
    except Exception:  # noqa: BLE001 - ConnectionError until it is up
        return False
    return True


@dataclass
class Head:
    gcs: str  # what RAY_ADDRESS / `ray start --address` take
    dashboard: str  # http://...: the job server
    log: Path


@contextlib.contextmanager
def ray_head(num_cpus: int, log: Path, timeout_s: float = 120) -> Iterator[Head]:
    """`ray start --head --block` with its dashboard (the job server) on free ports, token auth on for it and
    for this process (`token_auth`); stopped after the block."""
    with token_auth():
        with _ray_head(num_cpus, log, timeout_s) as head:
            yield head


@contextlib.contextmanager
def _ray_head(num_cpus: int, log: Path, timeout_s: float) -> Iterator[Head]:
    gcs, dash = free_port(), free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_ray_cli(), "start", "--head", "--block", "--disable-usage-stats", "--port", str(gcs),
           "--num-cpus", str(num_cpus), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port()), *_port_args()]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(["RAY_ADDRESS"]),
                                start_new_session=True)
    head = Head(gcs=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", log=log)
    try:
        deadline = time.monotonic() + timeout_s
        while not _job_server_up(head.dashboard):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"the Ray head did not start ({log}):\n{_log_tail(log)}")
            time.sleep(0.5)
        yield head
    finally:
        _stop(proc)


@contextlib.contextmanager
def joined(head: Head) -> Iterator[None]:
    """RAY_ADDRESS names the head for this block: every `ray.init` and job client of the pipeline joins it."""
    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = head.gcs
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before


def unshare_command() -> list[str]:
    """A private mount namespace: `unshare --mount` as root (CAP_SYS_ADMIN), else in an unprivileged user
    namespace. Raises if this machine allows neither (say so rather than rehearse without the isolation)."""
    candidates = [["unshare", "--mount", "--propagation", "private"]] if os.geteuid() == 0 else []
    candidates.append(["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"])
    tried = []
    with tempfile.TemporaryDirectory(prefix="distill-unshare-") as mnt:
        for cmd in candidates:
            probe = subprocess.run([*cmd, "mount", "-t", "tmpfs", "distill-probe", mnt], capture_output=True, text=True)
            if probe.returncode == 0:
                return cmd
            tried.append(f"{' '.join(cmd)}: {probe.stderr.strip() or probe.returncode}")
    raise ClusterError("cannot give the job node a mount namespace of its own (needed to hide the driver's "
                       "artifacts from it): " + "; ".join(tried))


@dataclass
class Node:
    node_id: str
    resources: dict[str, float]
    hidden: list[str]
    log: Path


def _alive_node_with(dashboard: str, resource: str, exclude: set[str]) -> Any:
    from ray.util.state import list_nodes

    for n in list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False):
        if n.node_id not in exclude and resource in (n.resources_total or {}):
            return n
    return None


@contextlib.contextmanager
def job_node(head: Head, hide: Sequence[Path], log: Path, num_cpus: int = 2,
             resources: dict[str, float] | None = None, timeout_s: float = 120) -> Iterator[Node]:
    """A second Ray node joined to `head`, in its own mount namespace with each directory of `hide` empty
    (a tmpfs over it); offers `resources` (default {JOB_NODE: 2}: the job's entrypoint and one Train worker)."""
    from ray.util.state import list_nodes

    resources = resources or {JOB_NODE: 2}
    resource = next(iter(resources))
    hidden = [str(Path(d).resolve()) for d in hide]
    for d in hidden:
        if not Path(d).is_dir():
            raise ClusterError(f"cannot hide {d} from the job node: not a directory")
    before = {n.node_id for n in list_nodes(address=head.dashboard, raise_on_missing_output=False)}
    ray_cmd = [_ray_cli(), "start", "--block", "--disable-usage-stats", "--address", head.gcs,
               "--num-cpus", str(num_cpus), "--resources", json.dumps(resources), *_port_args()]
    # Mount the tmpfs, then become the node: the mounts stay private to it and to everything it starts.
    script = "set -e; " + "".join(f"mount -t tmpfs -o size=64m,mode=755 distill-hidden {shlex.quote(d)}; "
                                  for d in hidden) + 'exec "$@"'
    cmd = [*unshare_command(), "sh", "-c", script, "sh", *ray_cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    # RAY_OVERRIDE_RESOURCES would give this node the head's logical CPUs; RAY_ADDRESS is set by --address.
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=_env(["RAY_ADDRESS", "RAY_OVERRIDE_RESOURCES"]), start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while (found := _alive_node_with(head.dashboard, resource, before)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"the job node did not join {head.gcs} ({log}):\n{_log_tail(log)}")
            time.sleep(1)
        yield Node(node_id=found.node_id, resources=dict(found.resources_total), hidden=hidden, log=log)
    finally:
        _stop(proc)


def run_job(head: Head, entrypoint: str, resources: dict[str, float] | None = None,
            timeout_s: float = 120) -> tuple[str, str, str]:
    """A short job (a probe): (status, node id of its driver, log)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard)
    job_id = client.submit_job(entrypoint=entrypoint, entrypoint_resources=resources or None)
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise ClusterError(f"probe job {job_id} did not finish in {timeout_s:.0f}s")
        time.sleep(0.5)
    return status.value, client.get_job_info(job_id).driver_node_id or "", client.get_job_logs(job_id)


def hidden_from_node(head: Head, node: Node, path: Path) -> tuple[bool, str]:
    """Whether a job pinned to `node` cannot see `path` (a file the driver can), and the probe's log."""
    if not path.exists():
        raise ClusterError(f"{path}: the driver must see it for the probe to mean anything")
    code = f"import os, sys; sys.exit(3 if os.path.exists({str(path)!r}) else 0)"
    status, where, out = run_job(head, f"{sys.executable} -c {shlex.quote(code)}", {JOB_NODE: 1})
    return status == "SUCCEEDED" and where == node.node_id, out


def deploy_unrelated_app(head: Head, http_options: dict[str, Any], route_prefix: str = "/unrelated") -> str:
    """A Serve application someone else deployed on the cluster: from a separate driver, which then exits
    (Serve keeps it). Returns its URL. Teardown of a run that joined the cluster must leave it serving."""
    code = f"""
import ray
from ray import serve

ray.init(address={head.gcs!r}, logging_level="WARNING", log_to_driver=False)
serve.start(http_options={http_options!r})

@serve.deployment(ray_actor_options={{"num_cpus": 0}})
class Unrelated:
    def __call__(self, request) -> str:
        return "still serving"

serve.run(Unrelated.bind(), name={UNRELATED_APP!r}, route_prefix={route_prefix!r})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_env(["RAY_ADDRESS"]))
    if done.returncode != 0:
        raise ClusterError(f"could not deploy the unrelated app: {done.stderr[-2000:]}")
    host = http_options.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{host}:{http_options.get('port', 8000)}{route_prefix}"


def still_serving(url: str) -> bool:
    try:
        r = httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and "still serving" in r.text
