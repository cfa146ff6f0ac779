"""Render `bench_classify.py --mode attack`'s JSON results into docs/serving.md (numbers never typed by hand).

    .venv/bin/python benchmarks/attack_report.py docs/serving.md docs/bench_attack.json docs/bench_attack_llm_key.json

replaces the block between `<!-- attack:begin -->` and `<!-- attack:end -->` with `render(results)`, one
column per result; tests/test_serving_docs.py checks that the committed document matches the committed JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- attack:begin -->", "<!-- attack:end -->"
WHO = {"classifier": "holds a key to the classifier only", "llm": "holds the LLM app's key"}
# How the attacker's classifier key relates to the legitimate client's (results before named keys: shared).
KEYS = {"own": "classifier keys: one of its own each", "shared": "classifier keys: one shared by both"}


def _who(result: dict[str, Any]) -> str:
    return f"{WHO[result['attacker_key']]} ({KEYS[result.get('classifier_keys', 'shared')]})"


def _column(result: dict[str, Any]) -> list[str]:
    c, a = result["classify"], result["attack"]

    def n(kind: str, outcome: str) -> int:
        return a[kind].get(outcome, 0)

    return [
        f"{c['success_rate']:.1%} ({c['ok']}/{c['requests']})",
        f"{c['p50_s']} s / {c['p95_s']} s",
        ", ".join(f"{k}: {v}" for k, v in c["status_counts"].items()),
        "; ".join(f"{k} ({v})" for k, v in result.get("classify_failures", {}).items()) or "none",
        str(result["replica_restarts"]),
        f"{n('crash_schemas', 'sent')} / {n('crash_schemas', '4xx')}",
        f"{n('slow_bodies', 'opened')} / {n('slow_bodies', '408')}",
        f"{n('cancellations', 'sent')} / {n('cancellations', 'abandoned')}",
        f"{n('burst', 'sent')} / {n('burst', '429') + n('burst', '503')}",
        f"{n('wrong_key', '401')} / {n('wrong_key', 'sent')}",
    ]


ROWS = ["`/classify_intent` success during the attack", "`/classify_intent` p50 / p95 of the 200s",
        "`/classify_intent` statuses", "`/classify_intent` failures (detail)", "replica restarts (by replica PID)",
        "crash schemas sent / answered 4xx (400, or 401 for the classifier's key)", "slow bodies opened (1 byte/s, both apps) / ended by a 408",
        "cancellation storm: requests sent / abandoned by the client", "burst requests / refused at once (429 over the client's share, 503 at capacity)",
        "the attacker's classifier key on the LLM app: 401s / tries"]


def render(results: list[dict[str, Any]]) -> str:
    """The attack benchmark's results as Markdown: one column per run (attacker's key)."""
    cols = [_column(r) for r in results]
    lines = [f"- attacker who {_who(r)}: `{r['command']}`, {r['when']}, {r['machine']}, model "
             f"`{r['model']}`" for r in results]
    lines += ["", "| | " + " | ".join(f"attacker {WHO[r['attacker_key']]}" for r in results) + " |",
              "|---|" + "---|" * len(results)]
    lines += [f"| {row} | " + " | ".join(col[i] for col in cols) + " |" for i, row in enumerate(ROWS)]
    return "\n".join(lines)


def update(doc: Path, results: list[dict[str, Any]]) -> str:
    """`doc`'s text with the attack block rendered from `results`."""
    text = doc.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + render(results) + "\n" + text[end:]


if __name__ == "__main__":
    doc, sources = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    doc.write_text(update(doc, [json.loads(p.read_text()) for p in sources]))
    print(f"{doc}: attack numbers rendered from {', '.join(map(str, sources))}")
