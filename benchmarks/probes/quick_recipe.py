"""The quick profile's finetune settings side by side, from the runs' own report.json files: what each
setting did to the validation loss, the devset and the optimizer valset (what the choice is made on), with
the test score beside them (scored by every run, not used to choose) and the finetune's wall time.

    python benchmarks/probes/quick_recipe.py --runs "lr 1e-3, 3 epochs=<artifacts>/report.json" ... \
        --out docs/finetune_quick_recipe.json
    python benchmarks/probes/quick_recipe.py --from-json docs/finetune_quick_recipe.json   # the table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def extract(label: str, report: dict) -> dict:
    ft, ev, run = report["finetune"], report["eval"], report["run"]
    val = ft["validation"]
    return {"setting": label, "commit": run["git_commit"][:12] + ("+dirty" if run["git_commit"].endswith("+dirty") else ""), "steps": ft["steps"],
            "eval_loss_by_epoch": [round(p["eval_loss"], 4) for p in val["curve"]],
            "best_epoch": val["best_epoch"], "best_eval_loss": round(val["best_metric"], 4),
            "deployed": f"{ev['best']['kind']} {ev['best']['variant']}",
            "devset": ev["best"]["devset_score"], "optimizer_val": ev["best"]["tiebreak_score"],
            "test": ev["best"]["test_score"], "teacher_test": report["teacher"]["accuracy_test"],
            "n_devset": ev["sizes"]["devset"], "n_val": ev["sizes"]["optimizer_val"],
            "n_test": ev["sizes"]["testset"], "finetune_seconds": ft["wall_seconds"]}


def markdown(doc: dict, source: Path) -> str:
    rows = ["| setting | steps | validation loss by epoch (best) | devset | optimizer valset | test, not used to "
            "choose (student / teacher) | finetune wall |", "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        curve = ", ".join(f"{x:.4f}" for x in r["eval_loss_by_epoch"])
        rows.append(f"| {r['setting']} | {r['steps']} | {curve} ({r['best_eval_loss']:.4f}) | "
                    f"{r['devset']:.1%} of {r['n_devset']} | {r['optimizer_val']:.1%} of {r['n_val']} | "
                    f"{r['test']:.1%} / {r['teacher_test']:.1%} of {r['n_test']} | {r['finetune_seconds']:.0f} s |")
    commits = ", ".join(sorted({f"`{r['commit']}`" for r in doc["runs"]}))
    return "\n".join([f"<!-- generated: python benchmarks/probes/quick_recipe.py --from-json {source} -->", *rows,
                      "", f"{doc['note']} Measured at commits {commits}.", "<!-- end generated -->"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="label=path/to/report.json")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--from-json", type=Path)
    a = ap.parse_args()
    if a.from_json:
        print(markdown(json.loads(a.from_json.read_text()), a.from_json))
        return
    runs = [extract(label, json.loads(Path(path).read_text()))
            for label, path in (spec.split("=", 1) for spec in a.runs)]
    doc = {"what": "the quick profile's finetune settings compared (benchmarks/probes/quick_recipe.py)",
           "note": a.note, "runs": runs}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc, a.out))


if __name__ == "__main__":
    main()
