"""The learning curve: student test accuracy against the number of teacher labels it is finetuned on.

    .venv/bin/python -m distill run --profile local_full            # first: the full run (~2 h on 2 cores)
    .venv/bin/python benchmarks/learning_curve.py --profile local_full --sizes 100 300 1000

Reads the profile's finished run (its student on every label, the teacher, the baselines), measures one
student per size plus one on the gold labels alone (`distill_harness.curve`), and writes docs/learning_curve.csv
and docs/learning_curve.png. Each point takes a finetune and one pass over the test queries; an
interrupted run resumes at the point it stopped in. A quick run draws its own student on these axes.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from distill import pipeline
from distill.config import load_config
from distill.env import load_env
from distill_harness.curve import measure_curve
from distill_harness.learning_curve import plot_curve, to_markdown, write_curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="local_full")
    ap.add_argument("--sizes", type=int, nargs="*", default=[100, 300, 1000],
                    help="teacher labels per point (the profile's own run adds the point with all of them)")
    ap.add_argument("--no-gold", action="store_true", help="skip the student on the gold labels alone")
    ap.add_argument("--confident-sizes", type=int, nargs="+", default=[],
                    help="also these sizes with the labels below --min-confidence dropped (a curation lever)")
    ap.add_argument("--min-confidence", type=float, default=0.5)
    ap.add_argument("--min-steps", type=int, default=120, help="optimizer steps every point trains for at least")
    args = ap.parse_args()
    load_env()
    cfg = load_config(args.profile)
    pipeline.setup(cfg)
    for rows in measure_curve(cfg, sorted(args.sizes), gold=not args.no_gold, min_steps=args.min_steps,
                              confident_sizes=args.confident_sizes, min_confidence=args.min_confidence):
        csv_path = write_curve(rows)  # after every point: an interrupted run keeps what it measured
        png = plot_curve(rows, csv_path.with_suffix(".png"),
                         f"How many teacher labels? ({cfg.name}, {rows[0].test_size} test queries)")
    table = Table(title=f"learning curve -> {csv_path}, {png}")
    for col in ("student on / reference", "labels", "steps", "train s", "test accuracy"):
        table.add_column(col, justify="left" if col.startswith("student") else "right")
    for r in rows:
        table.add_row(r.name, *(str(v) if v is not None else "-" for v in (r.labels, r.steps, r.train_seconds)),
                      f"{r.test_accuracy:.1%} of {r.test_size}")
    Console().print(table)
    print(f"\n<!-- generated: python benchmarks/learning_curve.py --profile {cfg.name} -->\n{to_markdown(rows)}\n"
          "<!-- end generated -->")


if __name__ == "__main__":
    main()
