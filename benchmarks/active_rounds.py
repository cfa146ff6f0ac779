"""What each round of active selection bought: per round of a learning-curve point's teacher stage, how many
queries it picked, their mean uncertainty score against the pool's, how many the teacher's LLM answered, and
how often the teacher's label was right against the dataset's own labels.

    python benchmarks/active_rounds.py --point artifacts/local_full/curve/active_1000_steps220 \\
        --profile local_full --out docs/active_rounds.json

The dataset's own labels of the training queries are read here for analysis only, as the proxy benchmark's
oracle does (benchmarks/active_proxy.py); the pipeline never sees them. Nothing is chosen on the test set.
Prints the Markdown table docs/measurements.md carries.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from distill.config import load_config
from distill.data.dataset import prepare_data, read_jsonl


def rounds_table(point: Path, truth: dict[str, str]) -> list[dict]:
    """One row per selection round of the point's teacher stage (teacher/selection.jsonl, labels.jsonl)."""
    labels = {r["text"]: r for r in read_jsonl(point / "teacher" / "labels.jsonl")}
    meta = {r["round"]: r for r in json.loads((point / "teacher" / "manifest.json").read_text())["active_rounds"]}
    picked: dict[int, list[str]] = defaultdict(list)
    for r in read_jsonl(point / "teacher" / "selection.jsonl"):
        picked[r["round"]].append(r["text"])
    rows = []
    for rnd in sorted(picked):
        got = [labels[t] for t in picked[rnd] if t in labels]
        right = [r["label"] == truth[r["text"]] for r in got if r["text"] in truth]
        rows.append({"round": rnd, "signal": "random" if rnd == 0 else "uncertainty", "picked": len(picked[rnd]),
                     "mean_score": meta.get(rnd, {}).get("mean_score"),
                     "pool_mean_score": meta.get(rnd, {}).get("pool_mean_score"),
                     "llm_answered": sum(r["source"] == "llm" for r in got),
                     "teacher_label_accuracy": round(sum(right) / len(right), 4) if right else None,
                     "distinct_labels": len({r["label"] for r in got})})
    return rows


def markdown(rows: list[dict], point: str) -> str:
    head = ("| round | picked by | queries | mean score (pool) | teacher's LLM answered | teacher label right* |\n"
            "|---|---|---|---|---|---|")
    body = [f"| {r['round']} | {r['signal']} | {r['picked']} | "
            + (f"{r['mean_score']:.3f} ({r['pool_mean_score']:.3f})" if r["mean_score"] is not None else "-")
            + f" | {r['llm_answered']} | "
            + (f"{r['teacher_label_accuracy']:.1%}" if r["teacher_label_accuracy"] is not None else "-") + " |"
            for r in rows]
    foot = (f"\n\n*against the dataset's own labels of these training queries, read for this analysis only. "
            f"Point: `{point}`.")
    return "\n".join([head, *body]) + foot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--point", type=Path, required=True, help="an active learning-curve point's artifact directory")
    ap.add_argument("--profile", default="local_full", help="the profile whose task gives the training labels")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    data = prepare_data(load_config(a.profile))
    truth = {ex.text: ex.label for ex in data.train}
    rows = rounds_table(a.point, truth)
    if a.out:
        a.out.write_text(json.dumps({"point": str(a.point), "profile": a.profile, "rounds": rows}, indent=1) + "\n")
    print(markdown(rows, str(a.point)))


if __name__ == "__main__":
    main()
