"""The labeling scale simulation: the Ray Data labeling job against a fixed-latency fake teacher.

The thing measured is the labeling pipeline (`distill.teacher.labeling_ray`: read, actors running the DSPy
teacher program, Parquet shards, labels.jsonl); the endpoint is a fixture (`distill_harness.fake_llm`)
that answers a valid label after a fixed delay and saturates at replicas x max_ongoing / latency
requests per second. Two measurements:

- throughput against concurrency (actors x calls per actor), for each number of endpoint replicas;
- peak resident memory against the number of queries, at a fixed concurrency.

The teacher is the task's zero-shot program (the full prompt through DSPy's JSON adapter, no retrieval):
retrieval would add one sentence embedding per query on the same CPUs and measure the embedder instead.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import dspy
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict

from distill.config import Config, LMConfig, RayDataLabelingConfig
from distill.serving.control import serving
from distill.teacher.labeling import query_id, read_records, shard_files
from distill.teacher.labeling_ray import QUERY_SCHEMA, label_queries_ray

FAKE_MODEL = "fake-teacher"
# Actors mostly wait on the endpoint; a tenth of a CPU each lets 16 of them fit beside Serve on 2 cores.
ACTOR_CPUS = 0.1


def synthetic_queries(texts: Sequence[str], n: int, path: Path, chunk: int = 10_000) -> Path:
    """n distinct queries (real query texts, numbered) as a Parquet file of (id, text), written in chunks."""
    with pq.ParquetWriter(path, QUERY_SCHEMA) as writer:
        for start in range(0, n, chunk):
            rows = [f"{texts[i % len(texts)]} (ticket {i})" for i in range(start, min(n, start + chunk))]
            writer.write_table(pa.Table.from_pydict(
                {"id": [query_id(start + j, t) for j, t in enumerate(rows)], "text": rows}, schema=QUERY_SCHEMA))
    return path


class PeakRSS:
    """Samples the resident memory of this process and of all its descendants (Ray's processes, when this
    process started Ray) every `interval_s`; keeps the peaks, in MB."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.driver_mb = self.total_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        driver = me.memory_info().rss
        total = driver
        for p in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.driver_mb = max(self.driver_mb, driver / 2**20)
        self.total_mb = max(self.total_mb, total / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class ScalePoint:
    n: int
    replicas: int
    actors: int
    calls_per_actor: int
    concurrency: int  # actors x calls_per_actor
    endpoint_capacity_qps: float  # replicas x max_ongoing / latency: where the fake endpoint saturates
    labeled: int
    failed: int
    exactly_once: bool  # every id of the input in labels.jsonl, none twice
    seconds: float  # the Ray Data job, actor start-up included
    queries_per_s: float
    steady_queries_per_s: float | None  # between the first and the last shard written (start-up excluded)
    peak_rss_driver_mb: float
    peak_rss_total_mb: float  # this process + every Ray process it started (shared pages counted per process)


class ScaleResult(BaseModel):
    """What `simulate` measured: written by benchmarks/labeling_scale.py (docs/labeling_scale.json), read
    back by it to draw the README's table and chart."""

    model_config = ConfigDict(extra="forbid")
    latency_s: float
    max_ongoing_per_replica: int
    sweep_n: int
    actor_cpus: float
    cpu_count: int
    throughput: list[ScalePoint] = []
    memory: list[ScalePoint] = []


def steady_rate(out_dir: Path) -> float | None:
    """Rows per second between the first and the last shard's write: the rate once the actors are up."""
    files = sorted(shard_files(out_dir), key=lambda f: f.stat().st_mtime)
    if len(files) < 3:
        return None
    first, last = files[0].stat().st_mtime, files[-1].stat().st_mtime
    rows = sum(pq.read_metadata(f).num_rows for f in files[1:])
    return round(rows / (last - first), 2) if last > first else None


def label_point(teacher: dspy.Module, lm_cfg: LMConfig, queries: Path, out_dir: Path, *, replicas: int,
                actors: int, calls_per_actor: int, capacity: float, batch_size: int = 8,
                rows_per_shard: int = 256) -> ScalePoint:
    """Label `queries` into a fresh `out_dir` and measure it."""
    shutil.rmtree(out_dir, ignore_errors=True)
    settings = RayDataLabelingConfig(actors=actors, calls_per_actor=calls_per_actor, batch_size=batch_size,
                                     rows_per_shard=rows_per_shard, num_cpus_per_actor=ACTOR_CPUS)
    with PeakRSS() as rss:
        result = label_queries_ray(teacher, lm_cfg, queries, out_dir, settings, cache=False, lm_kwargs={"num_retries": 2})
    ids = [r["id"] for r in read_records(result.path)]
    want = pq.read_table(queries, columns=["id"])["id"].to_pylist()
    return ScalePoint(
        n=len(want), replicas=replicas, actors=actors, calls_per_actor=calls_per_actor,
        concurrency=actors * calls_per_actor, endpoint_capacity_qps=round(capacity, 1), labeled=result.labeled,
        failed=result.failed, exactly_once=len(ids) == len(set(ids)) and set(ids) == set(want),
        seconds=round(result.seconds, 2), queries_per_s=round(result.new / result.seconds, 2) if result.seconds else 0.0,
        steady_queries_per_s=steady_rate(out_dir), peak_rss_driver_mb=round(rss.driver_mb, 1),
        peak_rss_total_mb=round(rss.total_mb, 1),
    )


@contextlib.contextmanager
def fake_endpoint(work: Path, replicas: int, latency_s: float, max_ongoing: int, port: int = 8000) -> Iterator[LMConfig]:
    """The fake teacher up on Ray Serve (through the same Serve-config path as the real endpoints)."""
    path = work / f"serve_fake_{replicas}.yaml"
    path.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "fake-teacher", "route_prefix": "/", "import_path": "distill_harness.fake_llm:build_app",
                          "args": {"model": FAKE_MODEL, "latency_s": latency_s, "num_replicas": replicas,
                                   "max_ongoing_requests": max_ongoing}}],
    }))
    lm_cfg = LMConfig(model=FAKE_MODEL, api_base=f"http://127.0.0.1:{port}/v1", max_tokens=16, timeout_s=60)
    with serving(path, lm_cfg.api_base, models=[FAKE_MODEL]):
        yield lm_cfg


def simulate(
    cfg: Config,
    labels: Sequence[str],
    texts: Sequence[str],
    *,
    sweep_n: int = 1000,
    concurrency: Sequence[tuple[int, int]] = ((1, 1), (2, 1), (2, 2), (4, 2), (4, 4)),
    replicas: Sequence[int] = (1, 2),
    sizes: Sequence[int] = (1000, 10_000),
    size_concurrency: tuple[int, int] = (2, 2),
    latency_s: float = 0.05,
    max_ongoing: int = 2,
    work_dir: Path | None = None,
    log: Any = print,
) -> ScaleResult:
    """Throughput against (actors, calls per actor) for each replica count, then peak RSS against N.

    The RSS points run on the largest replica count at `size_concurrency`.
    """
    from distill.teacher.program import build_teacher

    zero_shot = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"strategy": "zero_shot"})})
    teacher = build_teacher(zero_shot, labels, [])
    own = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="labeling-scale-")) if own else work_dir
    work.mkdir(parents=True, exist_ok=True)
    out = ScaleResult(latency_s=latency_s, max_ongoing_per_replica=max_ongoing, sweep_n=sweep_n,
                      actor_cpus=ACTOR_CPUS, cpu_count=psutil.cpu_count() or 1)
    try:
        sweep_queries = synthetic_queries(texts, sweep_n, work / f"queries_{sweep_n}.parquet")
        for r in replicas:
            capacity = r * max_ongoing / latency_s if latency_s else float("inf")
            with fake_endpoint(work, r, latency_s, max_ongoing) as lm_cfg:
                for actors, calls in concurrency:
                    p = label_point(teacher, lm_cfg, sweep_queries, work / "out", replicas=r, actors=actors,
                                    calls_per_actor=calls, capacity=capacity)
                    out.throughput.append(p)
                    log(p)
                if r == max(replicas):
                    for n in sizes:
                        q = synthetic_queries(texts, n, work / f"queries_{n}.parquet")
                        p = label_point(teacher, lm_cfg, q, work / "out", replicas=r, actors=size_concurrency[0],
                                        calls_per_actor=size_concurrency[1], capacity=capacity)
                        out.memory.append(p)
                        log(p)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return out


def to_markdown(result: ScaleResult) -> str:
    """The README's two tables: queries/s against concurrency per replica count, peak RSS against N."""
    lines = [f"Fake endpoint: {result.latency_s * 1000:g} ms per call, {result.max_ongoing_per_replica} calls at a "
             f"time per replica; {result.sweep_n} queries per throughput point; {result.cpu_count} cores.", "",
             "| endpoint replicas | actors x calls | endpoint capacity (q/s) | queries/s | steady queries/s |",
             "|---|---|---|---|---|"]
    for p in result.throughput:
        steady = f"{p.steady_queries_per_s:.1f}" if p.steady_queries_per_s else "-"
        lines.append(f"| {p.replicas} | {p.actors}x{p.calls_per_actor} | {p.endpoint_capacity_qps:g} | "
                     f"{p.queries_per_s:.1f} | {steady} |")
    lines += ["", "| queries | actors x calls | seconds | queries/s | peak RSS, driver (MB) | "
                  "peak RSS, driver + Ray (MB) | every id once |", "|---|---|---|---|---|---|---|"]
    for p in result.memory:
        lines.append(f"| {p.n:,} | {p.actors}x{p.calls_per_actor} | {p.seconds:.0f} | {p.queries_per_s:.1f} | "
                     f"{p.peak_rss_driver_mb:.0f} | {p.peak_rss_total_mb:.0f} | {'yes' if p.exactly_once else 'NO'} |")
    return "\n".join(lines)


def plot_scale(result: ScaleResult, path: str | Path) -> Path:
    """Two panels: queries/s against concurrency (one line per replica count, its capacity dashed), and
    peak RSS against the number of queries (log x)."""
    import matplotlib.pyplot as plt

    from distill.evaluation.plots import save_figure  # first: it sets the headless backend

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(sorted({p.replicas for p in result.throughput})):
        pts = sorted((p.concurrency, p.queries_per_s, p.endpoint_capacity_qps) for p in result.throughput
                     if p.replicas == r)
        left.plot([c for c, _, _ in pts], [q for _, q, _ in pts], "o-", color=f"C{i}",
                  label=f"{r} replica{'s' if r > 1 else ''}")
        left.axhline(pts[0][2], color=f"C{i}", linestyle="--", linewidth=1, label=f"capacity {pts[0][2]:g} q/s")
    left.set_xlabel("concurrent calls (actors x calls per actor)")
    left.set_ylabel("queries/s")
    left.set_title("throughput against concurrency")
    left.legend(fontsize=8)
    mem = sorted(result.memory, key=lambda p: p.n)
    right.plot([p.n for p in mem], [p.peak_rss_driver_mb for p in mem], "o-", label="driver")
    right.plot([p.n for p in mem], [p.peak_rss_total_mb for p in mem], "s-", label="driver + Ray processes")
    right.set_xscale("log")
    right.set_ylim(bottom=0)
    right.set_xlabel("queries labeled")
    right.set_ylabel("peak RSS (MB)")
    right.set_title("memory against the number of queries")
    right.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
