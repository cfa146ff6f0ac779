"""The learning curve: student test accuracy against the number of teacher labels it is finetuned on.

    .venv/bin/python -m distill run --profile local_full            # first: the full run (~2 h on 2 cores)
    .venv/bin/python benchmarks/learning_curve.py --profile local_full --sizes 100 300 1000
    .venv/bin/python benchmarks/learning_curve.py --profile local_full --sizes 300 1000 --no-gold \\
        --selection random active --budget steps --steps 440
    .venv/bin/python benchmarks/learning_curve.py --from-csv   # the table and chart again, nothing measured

Reads the profile's finished run (its student on every label, the teacher, the baselines), measures one
student per size and selection plus one on the gold labels alone, all under one training budget
(`distill_harness.curve` says what each budget and selection means), and adds the rows to
docs/learning_curve.csv (a row measured again replaces its old one; `--fresh` starts the CSV anew), then
redraws docs/learning_curve.png and prints the table for docs/measurements.md. Each point takes a finetune
and one pass over the test queries (an active point also its teacher stage, from the full run's LM cache);
an interrupted run resumes at the point it stopped in. A quick run draws its own student on these axes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from distill_harness.learning_curve import (
    CurveRow,
    curve_block,
    curve_csv,
    merge_rows,
    plot_curve,
    read_curve,
    write_curve,
)


def draw(rows: list[CurveRow], profile: str) -> Path:
    test = next((r.test_size for r in rows if r.kind == "student"), rows[0].test_size)
    return plot_curve(rows, curve_csv().with_suffix(".png"),
                      f"How many teacher labels? ({profile}, {test} test queries)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="local_full")
    ap.add_argument("--sizes", type=int, nargs="*", default=[100, 300, 1000],
                    help="teacher labels per point (the profile's own run adds the point with all of them)")
    ap.add_argument("--selection", nargs="+", choices=["random", "active"], default=["random"],
                    help="a point per size for each: random (the full run's first n labels) or active "
                         "(the teacher picks them by the vote's uncertainty)")
    ap.add_argument("--budget", choices=["min_steps", "steps", "epochs"], default="min_steps",
                    help="steps: every point trains exactly --steps; epochs: exactly --epochs; min_steps (the "
                         "original): the profile's cap, at least --min-steps")
    ap.add_argument("--steps", type=int, help="optimizer steps of every point (--budget steps)")
    ap.add_argument("--epochs", type=float, default=1, help="epochs of every point (--budget epochs)")
    ap.add_argument("--min-steps", type=int, default=120, help="optimizer steps every point trains for at least "
                                                               "(--budget min_steps)")
    ap.add_argument("--no-gold", action="store_true", help="skip the student on the gold labels alone")
    ap.add_argument("--confident-sizes", type=int, nargs="+", default=[],
                    help="also these sizes with the labels below --min-confidence dropped (a curation lever)")
    ap.add_argument("--min-confidence", type=float, default=0.5)
    ap.add_argument("--fresh", action="store_true", help="start the CSV anew instead of adding to it")
    ap.add_argument("--from-csv", action="store_true",
                    help="measure nothing: redraw the chart and print the table from docs/learning_curve.csv")
    args = ap.parse_args()
    if args.from_csv:
        rows = read_curve()
        draw(rows, args.profile)
        print(curve_block(rows))
        return

    # Heavy imports only when measuring: --from-csv runs without Ray or DSPy.
    from distill import pipeline
    from distill.config import load_config
    from distill.env import load_env
    from distill_harness.curve import Budget, measure_curve

    if args.budget == "steps" and args.steps is None:
        ap.error("--budget steps needs --steps (e.g. the full run's one epoch, its report's finetune steps)")
    budget = Budget(args.budget, {"steps": args.steps, "epochs": args.epochs, "min_steps": args.min_steps}[args.budget])
    load_env()
    cfg = load_config(args.profile)
    pipeline.setup(cfg)
    before = [] if args.fresh or not curve_csv().is_file() else read_curve()
    for measured in measure_curve(cfg, sorted(args.sizes), gold=not args.no_gold, min_steps=args.min_steps,
                                  confident_sizes=args.confident_sizes, min_confidence=args.min_confidence,
                                  budget=budget, selections=args.selection):
        rows = merge_rows(before, measured)
        csv_path = write_curve(rows)  # after every point: an interrupted run keeps what it measured
        png = draw(rows, cfg.name)
    table = Table(title=f"learning curve -> {csv_path}, {png}")
    for col in ("student on / reference", "selection", "budget", "labels", "steps", "train s", "test accuracy"):
        table.add_column(col, justify="left" if col.startswith("student") else "right")
    for r in rows:
        table.add_row(r.name, *(str(v) if v is not None else "-" for v in
                                (r.selection, r.budget, r.labels, r.steps, r.train_seconds)),
                      f"{r.test_accuracy:.1%} ± {r.se:.1%} of {r.test_size}")
    Console().print(table)
    print("\n" + curve_block(rows))


if __name__ == "__main__":
    main()
