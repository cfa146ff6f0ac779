"""Which rule should choose the cascade's threshold? Measured on the calibration split alone, never the test set.

The cascade stage fits the calibration and chooses the threshold on the calibration split (hand labels
neither model learned from, and the teacher's answers to them). Its rule was `target: best`, the most
accurate point of the split's 0/1 curve within the budget: on a few hundred queries that curve is jagged,
and its maximum is partly noise; this probe is how `expected` (docs/cascade.md) was compared with it. This probe splits the calibration split in two halves, many times over:
each rule chooses on one half (calibration fit there too, `auto`; the budget's share on that half plus the
devset's confidences, as the stage does), and the cascade is scored on the other half. The rules:

* `best`: the most accurate point within the budget (`choose_threshold(most_accurate=True)`).
* `teacher`: the smallest fallback share reaching the teacher's accuracy on the half, else the most
  accurate point (`most_accurate=False`).
* `expected`: the threshold with the highest *expected* accuracy within the budget, from models instead of
  0/1 outcomes: the student is right with its calibrated confidence, and the teacher with a logistic fit of
  its correctness on the student's calibrated log-odds (fit on the half). Both models are smooth, so the
  choice does not chase single queries.

    .venv/bin/python benchmarks/probes/threshold_rules.py --artifacts artifacts/local \
        --out docs/calibration/threshold_rules_local.json     # likewise local_next25, local_full
    .venv/bin/python benchmarks/probes/threshold_rules.py --from-json docs/calibration/threshold_rules_local.json

Reads `<artifacts>/cascade/predictions/{calibration,devset}.jsonl`; no LLM, no test queries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from distill.data.dataset import read_jsonl
from distill.evaluation.calibration import choose_threshold, expected_threshold, fit_calibration
from distill.tracking import git_commit

RULES = ("best", "teacher", "expected")


def choose(rule: str, q: np.ndarray, s_ok: np.ndarray, t_ok: np.ndarray, pool: np.ndarray, max_fallback: float,
           confidence: float) -> float:
    """The threshold `rule` picks on one half: `q` its calibrated confidences, `pool` the devset's."""
    if rule == "expected":
        return expected_threshold(q, s_ok, t_ok, max_fallback=max_fallback, budget_sample=pool,
                                  budget_confidence=confidence).threshold
    return choose_threshold(q, s_ok, t_ok, max_fallback=max_fallback, budget_sample=pool,
                            budget_confidence=confidence, most_accurate=rule == "best",
                            on="calibration-split accuracy").threshold


def measure(artifacts: Path, repeats: int, max_fallback: float, confidence: float, seed: int) -> dict:
    rows = read_jsonl(artifacts / "cascade" / "predictions" / "calibration.jsonl")
    dev = read_jsonl(artifacts / "cascade" / "predictions" / "devset.jsonl")
    raw = np.array([r["confidence"] or 0.0 for r in rows])
    s_ok = np.array([r["student"] == r["label"] for r in rows])
    t_ok = np.array([r["teacher"] == r["label"] for r in rows])
    dev_raw = np.array([r["confidence"] or 0.0 for r in dev])
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[float]]] = {r: {"gain": [], "share": []} for r in RULES}
    for _ in range(repeats):
        order = rng.permutation(len(rows))
        a, b = order[: len(rows) // 2], order[len(rows) // 2:]
        cal = fit_calibration(raw[a], s_ok[a], "auto")
        qa, qb = np.array(cal.apply_many(raw[a])), np.array(cal.apply_many(raw[b]))
        pool = np.array(cal.apply_many(dev_raw))
        for rule in RULES:
            c = choose(rule, qa, s_ok[a], t_ok[a], pool, max_fallback, confidence)
            kept = qb >= c
            out[rule]["gain"].append(float(np.where(kept, s_ok[b], t_ok[b]).mean() - t_ok[b].mean()))
            out[rule]["share"].append(float(1 - kept.mean()))

    def summary(xs: list[float]) -> dict[str, float]:
        x = np.asarray(xs)
        return {"mean": round(float(x.mean()), 5), "se": round(float(x.std(ddof=1) / np.sqrt(len(x))), 5)}

    res = {rule: {"gain_over_teacher": summary(v["gain"]), "share": summary(v["share"]),
                  "over_budget": round(float(np.mean(np.asarray(v["share"]) > max_fallback)), 4)}
           for rule, v in out.items()}
    for rule in RULES[:-1]:
        res[f"expected - {rule}"] = {"gain_over_teacher": summary(
            list(np.asarray(out["expected"]["gain"]) - np.asarray(out[rule]["gain"])))}
    return {"what": "threshold rules chosen on one half of the calibration split, scored on the other "
                    "(benchmarks/probes/threshold_rules.py); the test set is not read",
            "artifacts": str(artifacts), "n_calibration": len(rows), "n_devset": len(dev), "repeats": repeats,
            "max_fallback": max_fallback, "budget_confidence": confidence, "seed": seed,
            "student_accuracy": round(float(s_ok.mean()), 4), "teacher_accuracy": round(float(t_ok.mean()), 4),
            "rules": res, "commit": git_commit()}


def markdown(doc: dict, source: Path) -> str:
    rows = [f"<!-- generated: python benchmarks/probes/threshold_rules.py --from-json {source} -->",
            "| rule | cascade minus teacher, held-out half (points ± SE) | share to the teacher | held-out halves over the budget |",
            "|---|---|---|---|"]
    for rule in RULES:
        r = doc["rules"][rule]
        g, s = r["gain_over_teacher"], r["share"]
        rows.append(f"| {rule} | {100 * g['mean']:+.2f} ± {100 * g['se']:.2f} | {s['mean']:.1%} | "
                    f"{r['over_budget']:.0%} |")
    for rule in RULES[:-1]:
        g = doc["rules"][f"expected - {rule}"]["gain_over_teacher"]
        rows.append(f"| expected minus {rule}, paired | {100 * g['mean']:+.2f} ± {100 * g['se']:.2f} | | |")
    rows += ["", f"`{doc['artifacts']}`: {doc['n_calibration']} calibration-split queries (student "
             f"{doc['student_accuracy']:.1%}, teacher {doc['teacher_accuracy']:.1%}), {doc['repeats']} random "
             f"halves, budget {doc['max_fallback']:.0%} at {doc['budget_confidence']:.0%} confidence with the "
             f"{doc['n_devset']} devset confidences. ± is over the random halves of this one split, not a "
             "sampling error of the population; a held-out half's share is measured on its own "
             f"{doc['n_calibration'] - doc['n_calibration'] // 2} queries. "
             f"Measured at commit `{doc['commit'][:12]}`.",
             "<!-- end generated -->"]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--max-fallback", type=float, default=0.25)
    ap.add_argument("--budget-confidence", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--from-json", type=Path, help="measure nothing: the table from a JSON this probe wrote")
    a = ap.parse_args()
    if a.from_json:
        print(markdown(json.loads(a.from_json.read_text()), a.from_json))
        return
    if a.artifacts is None:
        ap.error("--artifacts or --from-json")
    doc = measure(a.artifacts, a.repeats, a.max_fallback, a.budget_confidence, a.seed)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc, a.out or Path("-")))


if __name__ == "__main__":
    main()
