"""Labeling at scale, simulated: the Ray Data labeling job against a fixed-latency fake teacher endpoint.

    BANKING77_DIR=... flock /tmp/distill-heavy.lock .venv/bin/python benchmarks/labeling_scale.py \
        [--sweep-n 1000] [--sizes 1000 10000 100000] [--latency-ms 50] [--max-ongoing 2] [--replicas 1 2]

Throughput (queries/s) against concurrency (actors x calls per actor) for each number of replicas of the
fake endpoint, up to where the endpoint saturates (replicas x max_ongoing / latency), then peak RSS against
the number of queries. Writes <artifacts>/bench/labeling_scale.json (distill_harness.labeling_scale.ScaleResult),
the same as docs/labeling_scale.json with its chart docs/labeling_scale.png, and prints the README's tables;
`--from-json docs/labeling_scale.json` redraws the chart and tables without running anything.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.evaluation.latency import write_result
from distill_harness.labeling_scale import ScaleResult, plot_scale, simulate, to_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def pairs(text: str) -> tuple[int, int]:
    actors, _, calls = text.partition("x")
    return int(actors), int(calls or 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="local")
    ap.add_argument("--sweep-n", type=int, default=1000, help="queries per throughput point")
    ap.add_argument("--concurrency", type=pairs, nargs="+", default=[(1, 1), (2, 1), (2, 2), (4, 2), (4, 4)],
                    help="actors x calls per actor, e.g. 2x2")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, 100_000], help="N for peak RSS")
    ap.add_argument("--size-concurrency", type=pairs, default=(2, 2))
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--max-ongoing", type=int, default=2, help="concurrent completions per fake replica")
    ap.add_argument("--from-json", type=Path, help="draw the chart and tables of an earlier run; run nothing")
    args = ap.parse_args()
    if args.from_json:
        result = ScaleResult.model_validate_json(args.from_json.read_text())
        show(result, args.from_json)
        return

    cfg = load_config(args.profile)
    data = prepare_data(cfg)
    texts = [ex.text for ex in data.unlabeled]
    console = Console()
    result = simulate(cfg, data.labels, texts, sweep_n=args.sweep_n, concurrency=args.concurrency,
                      replicas=args.replicas, sizes=args.sizes, size_concurrency=args.size_concurrency,
                      latency_s=args.latency_ms / 1000, max_ongoing=args.max_ongoing,
                      log=lambda p: console.print(p))
    path = write_result(cfg, "labeling_scale", result.model_dump())
    shutil.copyfile(path, DOCS / "labeling_scale.json")
    show(result, path)


def show(result: ScaleResult, path: Path) -> None:
    console = Console()
    png = plot_scale(result, DOCS / "labeling_scale.png")
    console.print(f"chart: {png}")

    table = Table(title=f"queries/s against concurrency (fake endpoint: {result.latency_s * 1000:g} ms, "
                        f"{result.max_ongoing_per_replica} at a time per replica) -> {path}")
    for col in ("replicas", "actors x calls", "endpoint capacity q/s", "queries", "q/s", "steady q/s", "exactly once"):
        table.add_column(col, justify="right")
    for p in result.throughput:
        table.add_row(str(p.replicas), f"{p.actors}x{p.calls_per_actor}", f"{p.endpoint_capacity_qps:g}",
                      str(p.n), f"{p.queries_per_s:.1f}", str(p.steady_queries_per_s or "-"), str(p.exactly_once))
    console.print(table)
    table = Table(title="peak resident memory against the number of queries")
    for col in ("queries", "actors x calls", "seconds", "q/s", "driver MB", "driver + Ray MB", "exactly once"):
        table.add_column(col, justify="right")
    for p in result.memory:
        table.add_row(str(p.n), f"{p.actors}x{p.calls_per_actor}", f"{p.seconds:.0f}", f"{p.queries_per_s:.1f}",
                      f"{p.peak_rss_driver_mb:.0f}", f"{p.peak_rss_total_mb:.0f}", str(p.exactly_once))
    console.print(table)
    print(f"\n<!-- generated: python benchmarks/labeling_scale.py --from-json docs/labeling_scale.json -->\n"
          f"{to_markdown(result)}\n<!-- end generated -->")


if __name__ == "__main__":
    main()
