"""The one percentile rule that latency figures and benchmarks share."""

from __future__ import annotations

import json

import pytest

from distill.config import load_config
from distill.evaluation.latency import latency_summary, percentile, write_result


def test_nearest_rank_percentile_returns_an_observed_value() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # order must not matter
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50.0, 95.0, 100.0)
    assert percentile([0.3], 95) == 0.3
    assert percentile([1.0, 2.0], 50) == 1.0
    with pytest.raises(ValueError):
        percentile([], 50)
    assert latency_summary([0.2, 0.1, 0.4, 0.3]) == {"n": 4, "p50_s": 0.2, "p95_s": 0.4}


def test_results_go_under_the_profiles_artifacts(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path))
    path = write_result(load_config("local_ci"), "llm", {"p50_s": 0.4})
    assert path == tmp_path / "bench" / "llm.json" and json.loads(path.read_text()) == {"p50_s": 0.4}
