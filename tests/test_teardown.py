"""Teardown takes down only what this run started (issue 33).

A run that joins a cluster through RAY_ADDRESS deletes its own Serve applications by name and disconnects;
someone else's application, Serve and the cluster keep running. A Ray this process starts is its own, and
goes with everything on it. The cluster here is a `ray start --head` on free ports, stopped by its own id.
"""

from __future__ import annotations

import httpx
import pytest
import ray

from distill.config import load_config
from distill.serving.control import ensure_ray, load_serve_config, owned, shutdown
from distill.stages.base import served
from distill_harness.cluster import (
    UNRELATED_APP,
    dashboard_get,
    deploy_unrelated_app,
    ray_head,
    still_serving,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray cluster this process did not start, with someone else's Serve application on it."""
    cfg = load_config("local_ci")
    http = load_serve_config(cfg.path(cfg.models.teacher.serve_config or "")).get("http_options") or {}
    with ray_head(num_cpus=4, log=tmp_path_factory.mktemp("ray") / "head.log") as head:
        url = deploy_unrelated_app(head, http)
        assert still_serving(url)
        yield head, url


def _applications(head) -> set[str]:
    return set(dashboard_get(head, "/api/serve/applications/").get("applications") or {})


def test_a_teacher_block_that_joins_a_cluster_leaves_an_unrelated_app_serving(cluster, tmp_path, monkeypatch) -> None:
    head, url = cluster
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    monkeypatch.setenv("RAY_ADDRESS", head.gcs)
    cfg = load_config("local_ci")
    teacher = cfg.models.teacher
    with served(cfg, teacher):  # what every teacher block of the pipeline does
        assert owned() == {"ray": "joined", "apps": ["teacher-llm"]}
        assert _applications(head) == {UNRELATED_APP, "teacher-llm"}
        models = httpx.get(f"{teacher.api_base}/models", timeout=30).json()["data"]
        assert [m["id"] for m in models] == [teacher.model]
    assert owned() == {"ray": None, "apps": []}
    assert not ray.is_initialized()  # disconnected...
    assert still_serving(url)  # ...and the unrelated app, Serve and the cluster are still there
    assert _applications(head) == {UNRELATED_APP}  # ours is gone
    assert dashboard_get(head, "/api/version")  # the cluster is up


def test_shutdown_with_nothing_of_ours_deployed_leaves_the_cluster_alone(cluster, monkeypatch) -> None:
    """A failed deploy, a Ctrl-C in the notebook: `shutdown()` may run with nothing of ours up."""
    head, url = cluster
    monkeypatch.setenv("RAY_ADDRESS", head.gcs)
    ensure_ray()
    assert owned() == {"ray": "joined", "apps": []}
    shutdown()
    assert not ray.is_initialized() and still_serving(url) and _applications(head) == {UNRELATED_APP}
