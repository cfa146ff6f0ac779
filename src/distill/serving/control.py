"""Bring a Ray Serve config up from Python (non-blocking), wait until its OpenAI API answers, shut down.

This does what `serve run <config>.yaml` does, through Ray's public API, so the notebook and the
tests run the same YAML that users run. Secrets never go into the YAML: the variables named in
`forward_env` are copied from this process's environment into Ray's job runtime_env at start time,
and every application deployed from here inherits them.

Ray's and Serve's logs go where `distill.logs` says (files under `<artifacts>/logs/` unless verbose).

Teardown (`shutdown`) removes only what this process started. Without RAY_ADDRESS, `ensure_ray` starts a
Ray of its own (`address="local"`: never someone's `ray start` found on the machine), and everything on it
is ours. With RAY_ADDRESS it joins that cluster: then `shutdown` deletes this process's Serve applications by
name and disconnects, and every other application, Serve itself and the cluster keep running.
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import httpx
import yaml

from distill import logs
from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.config import Config


def load_serve_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a Serve config with Ray's own schema."""
    from ray.serve.schema import ServeDeploySchema

    p = Path(path)
    if not p.is_file():
        raise DistillError(f"serve config not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, reported in one line
        raise DistillError(f"{p}: not a valid Ray Serve config: {e}") from None
    return raw


def _import_attr(path: str) -> Any:
    module, sep, attr = path.partition(":")  # "pkg.module:attr", or Ray's older "pkg.module.attr"
    if not sep:
        module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def build_application(import_path: str, args: dict[str, Any] | None) -> Any:
    """An application from `import_path`: a builder called with `args`, or a bound application."""
    from ray.serve import Application

    target = _import_attr(import_path)
    if isinstance(target, Application):
        if args:
            raise DistillError(f"{import_path} is an application, not a builder: it takes no args")
        return target
    return target(args or {})


# Seconds from deploy to ready, per Serve config path, for this process (see `serving`).
STARTUP_SECONDS: dict[str, float] = {}

# What this process started, and therefore what `shutdown` may take down. "ray": "started" (a Ray of our own),
# "joined" (we connected to a running cluster) or None (not ours: not initialised by `ensure_ray`).
_OWNED: dict[str, Any] = {"ray": None, "apps": []}


def owned() -> dict[str, Any]:
    """What `shutdown` would take down: {"ray": "started" | "joined" | None, "apps": [names]} (a copy)."""
    return {"ray": _OWNED["ray"], "apps": list(_OWNED["apps"])}


# The serving apps' keys (docs/serving.md): forwarded when set, so that replicas on a joined cluster, whose
# processes do not inherit this shell's environment, check the same keys. DISTILL_API_KEYS holds the
# program app's named clients' keys.
SERVING_KEY_ENVS = ("DISTILL_API_KEY", "DISTILL_API_KEYS", "DISTILL_LLM_API_KEY")


def forward_env_names(cfg: "Config") -> list[str]:
    """Variables a profile's replicas need: its required secrets, the endpoints' and the serving apps' keys."""
    names = list(cfg.required_env) + [n for n in SERVING_KEY_ENVS if n not in cfg.required_env]
    for lm in (cfg.models.teacher, cfg.models.student):
        if lm.api_key_env and lm.api_key_env not in names:
            names.append(lm.api_key_env)
    return names


def ensure_ray(forward_env: Sequence[str] = (), dashboard: bool = False) -> str:
    """Start a Ray of our own, or join the cluster RAY_ADDRESS names, with the named environment variables in
    the job's runtime_env. `shutdown` remembers which (it stops only a Ray it started).

    Returns the dashboard address ("" without one); the dashboard hosts Ray's job server. Worker output
    reaches this process only when `distill.logs` is verbose; `<logs>/ray` links to the session's logs.
    """
    import ray

    logs.apply_levels()
    if ray.is_initialized():
        if dashboard:
            raise DistillError("Ray is already running in this process without a job server; call shutdown() first")
        return ""
    env_vars = {k: os.environ[k] for k in forward_env if os.environ.get(k)}
    kwargs: dict[str, Any] = {
        "include_dashboard": dashboard, "runtime_env": {"env_vars": env_vars} if env_vars else None,
        **logs.ray_init_kwargs(),
    }
    if dashboard:
        kwargs["dashboard_host"] = "127.0.0.1"
    # "local" starts a new Ray even when a `ray start` cluster runs on this machine: ray.init() would join the
    # cluster /tmp/ray last recorded (and hang when it is gone), and our teardown would stop what others started.
    address = os.environ.get("RAY_ADDRESS") or "local"
    joined = address != "local"
    kwargs["address"] = address
    ctx = ray.init(**kwargs)
    _OWNED["ray"] = "joined" if joined else "started"
    logs.link_ray_session(ctx.address_info.get("session_dir"))
    return ctx.dashboard_url or ""


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


def start_serve_config(path: str | os.PathLike[str], forward_env: Sequence[str] = ()) -> list[str]:
    """Deploy every application of a Serve config without blocking; returns the application names."""
    import ray
    from ray import serve

    cfg = load_serve_config(path)
    http = cfg.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    joining = (os.environ.get("RAY_ADDRESS") or "local") != "local"  # a cluster's proxy may hold the port already
    if not ray.is_initialized() and not joining and _port_in_use(host, port):
        # Otherwise we would silently talk to whatever else is listening there.
        raise DistillError(f"{path}: {host}:{port} is already in use by another process; stop it or change http_options.port")
    ensure_ray(forward_env)
    # Controller, proxy and replica logs (access log included) to files; a config's own settings win.
    logging_config = {**logs.serve_logging_config(), **(cfg.get("logging_config") or {})}
    serve.start(http_options=cfg.get("http_options") or {}, proxy_location=cfg.get("proxy_location"),
                logging_config=logging_config)
    logs.apply_levels()  # importing ray.serve set its driver logger to INFO
    names = []
    for app in cfg["applications"]:
        application = build_application(app["import_path"], app.get("args"))
        if app["name"] not in _OWNED["apps"]:  # recorded first: a deploy that fails half-way is ours to delete
            _OWNED["apps"].append(app["name"])
        serve.run(application, blocking=False, name=app["name"], route_prefix=app.get("route_prefix", "/"),
                  logging_config={**logging_config, **(app.get("logging_config") or {})})
        names.append(app["name"])
    return names


def wait_until_ready(
    api_base: str, timeout_s: float = 180.0, config: str = "", api_key: str | None = None, models: Sequence[str] = ()
) -> list[str]:
    """Poll `GET {api_base}/models` until it lists `models` (or any model); return the served ids."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{api_base.rstrip('/')}/models", headers=headers, timeout=10)
            if r.status_code == 200:
                ids = [m["id"] for m in r.json().get("data", [])]
                if ids and all(m in ids for m in models):
                    return ids
                last = f"serving {ids}, waiting for {list(models)}"
            else:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1.0)
    raise DistillError(f"{config or api_base}: {api_base}/models did not become ready in {timeout_s:.0f}s; "
                       f"last: {last} ({logs.where()})")


def wait_until_healthy(url: str, timeout_s: float = 180.0, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Poll `GET {url}` (a health endpoint) until it answers 200; return its JSON body."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, headers=headers or {}, timeout=10)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1.0)
    raise DistillError(f"{url} did not become healthy in {timeout_s:.0f}s; last: {last} ({logs.where()})")


def wait_until_running(apps: Sequence[str], timeout_s: float = 180.0) -> None:
    """Wait until every one of these Serve applications is RUNNING: each deployment's replicas constructed
    (an ingress answers /healthz before the worker behind it has loaded its program)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status: dict[str, str] = {}
    while time.monotonic() < deadline:
        found = serve.status().applications
        status = {a: str(found[a].status) if a in found else "not deployed" for a in apps}
        if any(s.endswith("DEPLOY_FAILED") for s in status.values()):
            break
        if all(s.endswith("RUNNING") for s in status.values()):
            return
        time.sleep(1.0)
    raise DistillError(f"Serve applications not running after {timeout_s:.0f}s: {status} ({logs.where()})")


def replica_ids(app: str) -> dict[str, list[str]]:
    """The live replica ids of each deployment of a running application, to tell whether one restarted.

    `serve.status()` counts replicas but does not name them; the controller's instance details (what
    `serve status -v` and the dashboard show) do.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    if app not in serve.status().applications:
        raise DistillError(f"no Serve application named {app!r} is running")
    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    return {name: sorted(r.replica_id for r in d.replicas)
            for name, d in details.applications[app].deployments.items()}


def shutdown(ray_too: bool = True) -> None:
    """Tear down what this process started, and nothing else.

    On a Ray of our own (`ensure_ray` started it): Serve, then Ray. On a joined cluster: this process's Serve
    applications, by name (`serve.delete`), then disconnect; the cluster, Serve and everyone else's
    applications keep running. On a Ray this process did not initialise through `ensure_ray`: only our
    applications; Ray stays as its owner left it.
    """
    import ray
    from ray import serve

    apps, _OWNED["apps"] = list(_OWNED["apps"]), []
    if not ray.is_initialized():
        _OWNED["ray"] = None
        return
    if _OWNED["ray"] == "started":
        serve.shutdown()  # our own Ray: every application on it is ours
    else:
        for name in apps:
            if name in serve.status().applications:
                serve.delete(name)  # blocks until it is gone
    if ray_too and _OWNED["ray"] is not None:
        shutdown_ray()  # stops a Ray we started; from a joined cluster it only disconnects this driver
        _OWNED["ray"] = None


def shutdown_ray() -> None:
    """`ray.shutdown()` with no garbage collection in this process while Ray's core worker goes down.

    A Ray object freed while `ray.shutdown()` tears the driver's core worker down (an ObjectRef's dealloc
    still finds `global_worker.core_worker` and calls into it) makes Ray end the whole process on the
    spot: `_Exit(1)`, no traceback, only "The core worker has already been shutdown ... The process will
    exit" in the driver's log. Ray objects caught in reference cycles are freed by the cyclic GC, which
    runs in whatever thread happens to allocate -- with MLflow tracing on, its span-export threads are
    busy right then (the pipeline's tests ended silently with rc=1 after the evaluation stage). So the
    cycles are collected first, while the core worker is up, and no collection runs until Ray is down;
    after that a freed ObjectRef finds no core worker and does nothing.
    """
    import gc

    import ray

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # process-wide: no thread starts a collection during the shutdown
    try:
        ray.shutdown()
    finally:
        if enabled:
            gc.enable()


@contextmanager
def serving(
    path: str | os.PathLike[str],
    api_base: str,
    models: Sequence[str] = (),
    forward_env: Sequence[str] = (),
    timeout_s: float = 180.0,
    api_key: str | None = None,
) -> Iterator[list[str]]:
    """`with serving(cfg, api_base): ...` -- up and ready inside, always torn down after.

    The seconds from deploy to ready are kept in `STARTUP_SECONDS[str(path)]` (the latest bring-up of each
    config): what a cold start costs, e.g. vLLM loading a model.
    """
    try:
        started = time.monotonic()
        start_serve_config(path, forward_env)
        ids = wait_until_ready(api_base, timeout_s, str(path), api_key, models)
        STARTUP_SECONDS[str(path)] = round(time.monotonic() - started, 1)
        yield ids
    finally:
        shutdown()
