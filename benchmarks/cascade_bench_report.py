"""Render `bench_classify.py --mode cascade`'s JSON result into docs/cascade.md (numbers never typed by hand).

    .venv/bin/python benchmarks/cascade_bench_report.py docs/cascade.md docs/bench_cascade.json

replaces the block between `<!-- bench-cascade:begin -->` and `<!-- bench-cascade:end -->` with
`render(result)`; tests/test_serving_docs.py checks that the committed document matches the committed JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench-cascade:begin -->", "<!-- bench-cascade:end -->"


def render(result: dict[str, Any]) -> str:
    on, s, c = result["ran_on"], result["student_alone"], result["cascade"]
    sizes = on.get("sizes") or {}
    lines = [
        f"- `{result['command']}`, {result['when']}, {result['machine']}; one run each, the student alone first, "
        f"then the cascade, the same {result['requests']} queries (banking77's test queries of the labels in use), "
        f"{result['concurrency']} in flight",
        f"- on a `{on['profile']}` run ({sizes.get('num_to_label')} teacher labels, devset {sizes.get('devset_size')}): "
        f"student `{on['student']}` ({on['student_variant']}), teacher `{on['teacher']}` ({on['teacher_strategy']}), "
        f"threshold {on['threshold']:.3f} (the cascade stage sent {on['cascade_stage_fallback_share']['devset']:.0%} "
        f"of the devset, {on['cascade_stage_fallback_share']['testset']:.0%} of the test set to the teacher)",
        "",
        "| | student alone | cascade |",
        "|---|---|---|",
        f"| answered (200) / requests | {s['status_counts'].get('200', 0)} / {s['requests']} | "
        f"{c['status_counts'].get('200', 0)} / {c['requests']} |",
        f"| throughput (200s per second) | {s['ok_per_s']} | {c['ok_per_s']} |",
        f"| p50 / p95 of the 200s | {s['p50_s']} s / {s['p95_s']} s | {c['p50_s']} s / {c['p95_s']} s |",
        f"| slowest 200 | {s['max_s']} s | {c['max_s']} s |",
        f"| answered by the teacher (its vote / its LLM) | - | {c['fallback_share']:.0%} "
        f"({c['teacher_sources'].get('vote', 0)} / {c['teacher_sources'].get('llm', 0)}) |",
        f"| teacher failures (the student's answer, marked) | - | {sum(c['fallback_errors'].values())} |",
        f"| replica restarts | {result['replica_restarts']} | |",
    ]
    return "\n".join(lines)


def update(doc: Path, result_path: Path) -> None:
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if not rest or END not in rest:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} block")
    doc.write_text(f"{head}{BEGIN}\n{render(json.loads(result_path.read_text()))}\n{END}{tail}")


if __name__ == "__main__":
    update(Path(sys.argv[1]), Path(sys.argv[2]))
