"""What the benchmarks and the latency measurements share: one percentile rule and one place for results.

Benchmark results are JSON files under `<artifacts>/bench/<name>.json`; README figures are read from them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from distill.config import Config


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100): a value that was actually observed."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_summary(seconds: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """n, p50 and p95 of per-request latencies, in seconds."""
    return {"n": len(seconds), "p50_s": round(percentile(seconds, 50), digits),
            "p95_s": round(percentile(seconds, 95), digits)}


def write_result(cfg: Config, name: str, result: dict[str, Any]) -> Path:
    """Write a benchmark's result as `<artifacts>/bench/<name>.json` and return the path."""
    path = cfg.artifacts / "bench" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    return path
