"""Render `bench_classify.py --mode attack`'s JSON result into docs/serving.md (numbers never typed by hand).

    .venv/bin/python benchmarks/attack_report.py docs/bench_attack.json docs/serving.md

replaces the block between `<!-- attack:begin -->` and `<!-- attack:end -->` with `render(result)`;
tests/test_serving_docs.py checks that the committed document matches the committed JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- attack:begin -->", "<!-- attack:end -->"


def render(result: dict[str, Any]) -> str:
    """The attack benchmark's result as Markdown: what was thrown at the deployment and how it held."""
    c, a = result["classify"], result["attack"]

    def n(kind: str, outcome: str) -> int:
        return a[kind].get(outcome, 0)

    rows = [
        ("`/classify_intent` success during the attack", f"{c['success_rate']:.1%} ({c['ok']}/{c['requests']})"),
        ("`/classify_intent` p50 / p95 of the 200s", f"{c['p50_s']} s / {c['p95_s']} s"),
        ("`/classify_intent` statuses", ", ".join(f"{k}: {v}" for k, v in c["status_counts"].items())),
        ("replica restarts (by replica PID)", str(result["replica_restarts"])),
        ("crash schemas sent / answered 4xx", f"{n('crash_schemas', 'sent')} / {n('crash_schemas', '4xx')}"),
        ("slow bodies opened (1 byte/s) / ended by a 408", f"{n('slow_bodies', 'opened')} / {n('slow_bodies', '408')}"),
        ("abandoned long generations", str(n("cancellations", "sent"))),
        ("burst requests / shed with 503", f"{n('burst', 'sent')} / {n('burst', '503')}"),
        ("classifier-only key on the LLM app: 401s", f"{n('wrong_key', '401')} / {n('wrong_key', 'sent')}"),
    ]
    lines = [f"Measured {result['when']} on {result['machine']}, {result['duration_s']:g} s of attack "
             f"(`{result['command']}`):", "", "| what | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def update(doc: Path, result: dict[str, Any]) -> str:
    """`doc`'s text with the attack block rendered from `result`."""
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + render(result) + "\n" + text[end:]


if __name__ == "__main__":
    src, doc = Path(sys.argv[1]), Path(sys.argv[2])
    doc.write_text(update(doc, json.loads(src.read_text())))
    print(f"{doc}: attack numbers rendered from {src}")
