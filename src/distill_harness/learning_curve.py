"""The learning curve's file format, table and chart: student test accuracy against the number of labels it
was finetuned on, one series per (what it learned from, how the labels were selected, training budget), with
±1 binomial standard error per point, and the teacher and the baselines as reference lines.

`docs/learning_curve.csv` is measured on the full profile (`benchmarks/learning_curve.py`); a quick run
draws its own student as one more point on the same axes. The tables in docs/measurements.md (the curve and
the differences its prose cites) are `curve_block(read_curve())`, pasted under their `<!-- generated: ... -->`
marker (tests/test_curve.py checks it).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # headless: CI, `make demo`; the notebook shows the PNG inline
import matplotlib.pyplot as plt  # noqa: E402
from pydantic import BaseModel, ConfigDict, field_validator  # noqa: E402

from distill.config import project_root  # noqa: E402

# The command that prints the committed table (the marker above it in docs/measurements.md).
TABLE_COMMAND = "python benchmarks/learning_curve.py --profile local_full --from-csv"


def curve_csv() -> Path:
    """Where the measured curve is committed."""
    return project_root() / "docs" / "learning_curve.csv"


class CurveRow(BaseModel):
    """One row of the CSV: a student finetuned on `labels` examples, or a reference (teacher, baseline)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["student", "reference"]
    name: str  # student: what it learned from ("teacher labels", "gold labels"); reference: who
    # students: how the teacher's queries were picked (random: the pool's seeded order; active: by the vote's
    # uncertainty) and the training budget every point of its series shares ("440 steps", "1 epoch",
    # "min 120 steps": one epoch but at least 120 steps). None: a reference, or a row older than these columns.
    selection: str | None = None
    budget: str | None = None
    labels: int | None = None  # SFT examples given to the finetune (students only; 10% of them held out)
    steps: int | None = None  # optimizer steps trained
    epochs: float | None = None
    train_seconds: float | None = None
    test_accuracy: float  # 0-1
    test_size: int
    # The teacher labels curation read and kept (a random point cuts its `labels` from the full run's; an
    # active point's are its own: what its rounds picked).
    labeled: int | None = None
    kept: int | None = None
    commit: str | None = None  # the code it was measured with (None: before the CSV recorded it)
    # students: the point's directory under <artifacts>/curve/, or the profile's name for its own run
    point: str | None = None

    @field_validator("selection", "budget", "labels", "steps", "epochs", "train_seconds", "labeled", "kept",
                     "commit", "point", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v  # csv writes None as an empty cell

    @property
    def se(self) -> float:
        """One binomial standard error of the test accuracy (0-1)."""
        return standard_error(self.test_accuracy, self.test_size)

    @property
    def series(self) -> tuple[str, str | None, str | None]:
        """Points on one line of the chart: same source, selection and budget."""
        return self.name, self.selection, self.budget

    @property
    def key(self) -> tuple[object, ...]:
        """What a row measures: a new measurement of it replaces the old one in the CSV (a point by its
        directory, the profile's run by its name, whatever its label count now)."""
        return (self.kind, self.point) if self.point else (self.kind, self.name, self.selection, self.budget,
                                                           self.labels)


def standard_error(p: float, n: int) -> float:
    """sqrt(p(1-p)/n): the standard error of an accuracy p measured on n independent queries."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def write_curve(rows: Sequence[CurveRow], path: Path | None = None) -> Path:
    path = path or curve_csv()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CurveRow.model_fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.model_dump().items()})
    tmp.replace(path)
    return path


def read_curve(path: Path | None = None) -> list[CurveRow]:
    """The CSV's rows; a CSV from before a column existed reads with it empty (None)."""
    with (path or curve_csv()).open(newline="") as f:
        return [CurveRow.model_validate(row) for row in csv.DictReader(f)]


def merge_rows(old: Sequence[CurveRow], new: Sequence[CurveRow]) -> list[CurveRow]:
    """`old` with every row `new` measures again replaced, then `new`'s other rows: runs of other sizes,
    selections or budgets add to the committed curve instead of overwriting it."""
    fresh = {r.key: r for r in new}
    kept = [fresh.pop(r.key, r) for r in old]
    return kept + [r for r in new if r.key in fresh]


def _series_order(rows: Sequence[CurveRow]) -> list[tuple[str, str | None, str | None]]:
    """Gold first, then plain teacher labels, then curation levers; within each, budgets in the order the CSV
    has them, random selection before active."""
    series = list(dict.fromkeys(r.series for r in rows))
    budgets = list(dict.fromkeys(r.budget for r in rows))
    rank = {"gold labels": 0, "teacher labels": 1}
    return sorted(series, key=lambda s: (rank.get(s[0], 2), s[0], budgets.index(s[2]), s[1] != "random",
                                         s[1] or ""))


def _students(rows: Sequence[CurveRow]) -> list[CurveRow]:
    students = [r for r in rows if r.kind == "student"]
    order = {s: i for i, s in enumerate(_series_order(students))}
    return sorted(students, key=lambda r: (order[r.series], r.labels or 0))


def _pct(r: CurveRow) -> str:
    return f"{100 * r.test_accuracy:.1f}% ± {100 * r.se:.1f} of {r.test_size}"


def to_markdown(rows: Sequence[CurveRow]) -> str:
    """The curve as a table: students by series and label count, then the references."""
    lines = ["| finetuned on / reference | selection | budget | labels | steps | test accuracy ± SE |",
             "|---|---|---|---|---|---|"]
    for r in [*_students(rows), *(r for r in rows if r.kind == "reference")]:
        who = f"student on {r.name}" if r.kind == "student" else r.name
        cells = (r.selection, r.budget, r.labels, r.steps)
        lines.append(f"| {who} | " + " | ".join(str(c) if c is not None else "-" for c in cells) + f" | {_pct(r)} |")
    return "\n".join(lines)


def comparisons(rows: Sequence[CurveRow]) -> list[tuple[str, CurveRow, CurveRow]]:
    """The differences the docs' prose rests on, each (what, a, b) for a minus b, found by rule so that new
    rows get theirs: active against random at one budget and about one label count; a longer budget against
    a shorter one on the same labels; and each exact-budget series' largest point against the full run's
    student (the one with the most labels). "min N steps" series are left out of the last: their steps grow
    with the labels, so a gap there is not the labels' alone."""
    students = _students(rows)
    full = max(students, key=lambda r: r.labels or 0, default=None)
    selection: list[tuple[str, CurveRow, CurveRow]] = []
    budget: list[tuple[str, CurveRow, CurveRow]] = []
    for a in students:
        for b in students:
            if a.name != b.name or not a.labels or not b.labels:
                continue
            if a.budget == b.budget and (a.selection, b.selection) == ("active", "random") \
                    and abs(a.labels - b.labels) <= 0.05 * b.labels:
                selection.append((f"active against random selection ({a.name}, {a.budget}; {a.labels} / "
                                  f"{b.labels} labels)", a, b))
            if a.selection == b.selection and a.labels == b.labels and a.budget != b.budget \
                    and (a.steps or 0) > (b.steps or 0):
                budget.append((f"{a.budget} against {b.budget} ({a.name}, {a.selection}, {a.labels} labels; "
                               f"{a.steps} / {b.steps} steps)", a, b))
    out = selection + budget
    if full is not None:
        for s in _series_order(students):
            if s == full.series or (s[2] or "min").startswith("min"):
                continue
            a = max((r for r in students if r.series == s), key=lambda r: r.labels or 0)
            out.append((f"{a.selection}, {a.budget}, {a.labels} labels against the full run's student "
                        f"({full.labels} labels, {full.steps} steps)", a, full))
    return out


def comparisons_markdown(rows: Sequence[CurveRow]) -> str:
    """The differences as a table: points, ± the standard error of the difference, and how many of those."""
    lines = ["| difference in test accuracy | points ± SE | in standard errors |", "|---|---|---|"]
    for what, a, b in comparisons(rows):
        d, se = 100 * (a.test_accuracy - b.test_accuracy), 100 * math.hypot(a.se, b.se)
        lines.append(f"| {what} | {d:+.1f} ± {se:.1f} | {d / se:+.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def curve_block(rows: Sequence[CurveRow], command: str = TABLE_COMMAND) -> str:
    """The tables as pasted in the docs: marker, the curve, the differences, provenance, end marker."""
    commits = sorted({r.commit for r in rows if r.commit})
    undated = sum(r.commit is None for r in rows if r.kind == "student")
    if not commits:
        where = "Measured before the CSV recorded a commit (its git history says when)"
    else:
        where = f"Measured at commit{'s' if len(commits) > 1 else ''} " + ", ".join(f"`{c}`" for c in commits)
        if undated:
            where += (f" ({undated} student row{'s' if undated != 1 else ''} from before the CSV recorded a "
                      "commit: see its git history)")
    note = (f"{where}; ± is one binomial standard error, sqrt(p(1-p)/n) on the n test queries; "
            "a budget is shared by every point of its series (\"min 120 steps\": one epoch, at least 120 steps).")
    tables = [to_markdown(rows)]
    if diffs := comparisons_markdown(rows):  # the prose cites these: computed here, never typed there
        tables.append(diffs)
        note += (" A difference is the first point minus the second, ± sqrt(SE1² + SE2²), the two scores "
                 "taken as independent (on the same test queries this is if anything too wide).")
    return f"<!-- generated: {command} -->\n" + "\n\n".join(tables) + f"\n\n{note}\n<!-- end generated -->"


_MARKERS = {"random": "o", "active": "^"}
_LINES = ["-", "--", ":", "-."]


def plot_curve(rows: Sequence[CurveRow], path: str | Path, title: str, this_run: CurveRow | None = None) -> Path:
    """Accuracy against labels (log scale), ±1 standard error bars, one line per series (colour: what it
    learned from and how it was selected; line style: the budget); references as horizontal lines;
    `this_run` as a star."""
    fig, ax = plt.subplots(figsize=(8, 5))
    students = [r for r in _students(rows) if r.labels]
    # From a round 10 below the lowest point (not 0): a standard error of 1-2 points stays visible.
    shown = [*students, *(r for r in rows if r.kind == "reference"), *([this_run] if this_run else [])]
    bottom = max(0, 10 * math.floor(min((100 * r.test_accuracy for r in shown), default=0) / 10) - 10)
    ax.set_ylim(bottom, 100)
    budgets = list(dict.fromkeys(r.budget for r in students))
    order = _series_order(students)
    for i, s in enumerate(order):
        pts = sorted((r for r in students if r.series == s), key=lambda r: r.labels or 0)
        name, selection, budget = s
        label = f"student on {name}" + "".join(f", {x}" for x in (selection, budget) if x)
        ax.errorbar([r.labels for r in pts], [100 * r.test_accuracy for r in pts], yerr=[100 * r.se for r in pts],
                    color=f"C{i}", marker=_MARKERS.get(selection or "", "s"),
                    linestyle=_LINES[budgets.index(budget) % len(_LINES)] if len(pts) > 1 else "none",
                    capsize=3, markersize=5, label=label)
    # Values to the right of their points; at one n, labels stacked top-down at least a line apart, so
    # several series at the same size stay legible.
    gap = 0.028 * (100 - bottom)
    for n in sorted({r.labels for r in students}):
        at_n = sorted((r for r in students if r.labels == n), key=lambda r: -r.test_accuracy)
        last = math.inf
        for r in at_n:
            y = 100 * r.test_accuracy
            last = min(y, last - gap)
            ax.annotate(f"{y:.1f}", (n, y), xytext=(n * 1.07, last), textcoords="data", va="center", fontsize=7,
                        color=f"C{order.index(r.series)}")
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, r in enumerate(r for r in rows if r.kind == "reference"):
        ax.axhline(100 * r.test_accuracy, color="black" if i == 0 else "dimgray", linestyle=styles[i % len(styles)],
                   linewidth=1, label=f"{r.name} {100 * r.test_accuracy:.1f}% ± {100 * r.se:.1f}")
    if this_run is not None and this_run.labels:
        ax.plot([this_run.labels], [100 * this_run.test_accuracy], "*", color="tab:red", markersize=14,
                label=f"this run: {this_run.name}, {100 * this_run.test_accuracy:.1f}% on {this_run.test_size}")
    ax.set_xscale("log")
    if students:  # room on the right for the last point's value
        ax.set_xlim(min(r.labels or 1 for r in students) / 1.3, max(r.labels or 1 for r in students) * 1.4)
    ax.set_xlabel("labels the student was finetuned on")
    ax.set_ylabel("test accuracy (%), ±1 standard error")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
