"""Random vs active selection at equal budget, measured on a cheap proxy student -- not the finetuned one.

    python benchmarks/active_proxy.py [--profile local_active] [--out docs/active_proxy.json]
    python benchmarks/active_proxy.py --from-json docs/active_proxy.json   # the table again, nothing measured

The proxy student is logistic regression on the MiniLM embeddings (the vote's C), trained on the gold
labels plus the labels the selection bought. Two teachers label what is picked: the `oracle` (the queries'
true banking77 labels: what selection can do with a perfect teacher) and the `vote` (the teacher's vote
alone, vote_confidence 0: no LLM). Selection is the real `distill.active.active_label` with the
profile's settings; labeling is in-process (`label_queries` with the teacher as a dspy module). Scored on
the profile's test subset; nothing is chosen on it. One seed: a sign, not an error bar.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import dspy
import numpy as np

from distill.active import PoolScorer, active_label
from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.lm import make_lm
from distill.teacher.labeling import label_queries
from distill.teacher.program import GoldIndex, build_vote, embed
from distill.teacher.vote import fit_lr


class Oracle(dspy.Module):
    """The query's true label (from the train split): a perfect teacher."""

    def __init__(self, truth: dict[str, str]) -> None:
        super().__init__()
        self.truth = truth

    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(label=self.truth[text])


class VoteTeacher(dspy.Module):
    def __init__(self, model: object, embedder: str) -> None:
        super().__init__()
        self.model, self.embedder = model, embedder

    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(label=str(self.model.predict(embed(self.embedder, [text]))[0]))  # type: ignore[attr-defined]


TEACHERS = {"oracle": "oracle (the true labels)", "vote": "the vote alone (no LLM)"}


def markdown(report: dict) -> str:
    """The table docs/pipeline.md carries, from the JSON this script writes."""
    res = report["results"]
    lines = ["| teacher that labels the picks | random: proxy test acc. | active: proxy test acc. | "
             "active - random (points) | teacher right on the picks (random / active) |",
             "|---|---|---|---|---|"]
    for key, name in TEACHERS.items():
        r, a = res[f"{key}/random"], res[f"{key}/active"]
        diff = 100 * (a["proxy_student_test_accuracy"] - r["proxy_student_test_accuracy"])
        lines.append(f"| {name} | {r['proxy_student_test_accuracy']:.1%} | {a['proxy_student_test_accuracy']:.1%} | "
                     f"{diff:+.1f} | {r['teacher_accuracy_on_picked']:.1%} / {a['teacher_accuracy_on_picked']:.1%} |")
    act = report["active"]
    lines.append(f"\nProfile `{report['profile']}`: budget {report['budget']} labels (a random seed round of "
                 f"{report['seed_round']}, then {act['rounds']} rounds of {act['batch_size']} by {act['signal']}, "
                 f"{act['diversity']}), one seed, {report['test']} test queries.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="local_active")
    ap.add_argument("--out", default=None)
    ap.add_argument("--from-json", type=Path, default=None, help="measure nothing: print the table of a saved result")
    args = ap.parse_args()
    if args.from_json:
        print(markdown(json.loads(args.from_json.read_text())))
        return
    cfg = load_config(args.profile)
    data = prepare_data(cfg)
    emb = cfg.teacher.embedder
    index = GoldIndex(data.gold, emb)
    vote = build_vote(index, data.labels)
    t0 = time.perf_counter()
    pool = data.unlabeled
    pool_vecs = embed(emb, [ex.text for ex in pool]).astype(np.float32)
    test_vecs = embed(emb, [ex.text for ex in data.test])
    embed_s = time.perf_counter() - t0
    truth = {ex.text: ex.label for ex in data.train}
    teachers = {"oracle": Oracle(truth), "vote": VoteTeacher(vote.model, emb)}
    lm = make_lm(cfg.models.teacher, cache=False)  # never called: both teachers answer without an LLM
    budget = cfg.data.num_to_label or 0
    results: dict[str, dict[str, float]] = {}
    for tname, teacher in teachers.items():
        for selection in ("random", "active"):
            with tempfile.TemporaryDirectory() as d:
                out = Path(d)
                if selection == "random":
                    res = label_queries(teacher, lm, pool[:budget], out, threads=2, fingerprint="p")
                else:
                    res = active_label(pool, PoolScorer(vote, pool_vecs, cfg.data.active.refit), cfg.data.active,
                                       cfg.data.seed_size, lambda q: label_queries(teacher, lm, q, out, threads=2,
                                                                                  fingerprint="p"),
                                       out, "p", seed=cfg.seed).labeling
                recs = [json.loads(line) for line in res.path.read_text().splitlines()]
            row = {ex.text: i for i, ex in enumerate(pool)}
            rows = [row[r["text"]] for r in recs]
            x = np.vstack([vote.gold_vecs, pool_vecs[rows]])
            y = vote.gold_labels + [r["label"] for r in recs]
            student = fit_lr(x, y, vote.c, balanced=True)
            acc = float(np.mean([str(p) == ex.label for p, ex in zip(student.predict(test_vecs), data.test)]))
            teacher_acc = float(np.mean([r["label"] == truth[r["text"]] for r in recs]))
            results[f"{tname}/{selection}"] = {"proxy_student_test_accuracy": round(acc, 4),
                                               "teacher_accuracy_on_picked": round(teacher_acc, 4),
                                               "labels": len(recs)}
            print(tname, selection, results[f"{tname}/{selection}"], flush=True)
    report = {"profile": cfg.name, "budget": budget, "seed_round": cfg.data.seed_size,
              "active": cfg.data.active.model_dump(), "pool": len(pool), "test": len(data.test),
              "embed_seconds": round(embed_s, 1), "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
