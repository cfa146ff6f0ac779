"""The learning curve's file format and chart: student test accuracy against the number of labels it was
finetuned on, with the teacher and the baselines as reference lines.

`docs/learning_curve.csv` is measured once on the full profile (`benchmarks/learning_curve.py`); a quick run
draws its own student as one more point on the same axes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # headless: CI, `make demo`; the notebook shows the PNG inline
import matplotlib.pyplot as plt  # noqa: E402
from pydantic import BaseModel, ConfigDict, field_validator  # noqa: E402

from distill.config import project_root  # noqa: E402


def curve_csv() -> Path:
    """Where the measured curve is committed."""
    return project_root() / "docs" / "learning_curve.csv"


class CurveRow(BaseModel):
    """One row of the CSV: a student finetuned on `labels` examples, or a reference (teacher, baseline)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["student", "reference"]
    name: str  # student: what it learned from ("teacher labels", "gold labels"); reference: who
    labels: int | None = None  # SFT examples (students only)
    steps: int | None = None
    epochs: float | None = None
    train_seconds: float | None = None
    test_accuracy: float  # 0-1
    test_size: int

    @field_validator("labels", "steps", "epochs", "train_seconds", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v  # csv writes None as an empty cell


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
    with (path or curve_csv()).open(newline="") as f:
        return [CurveRow.model_validate(row) for row in csv.DictReader(f)]


def to_markdown(rows: Sequence[CurveRow]) -> str:
    """The curve as a README table (students by label count, then the references)."""
    lines = ["| finetuned on / reference | labels | steps | test accuracy |", "|---|---|---|---|"]
    students = sorted((r for r in rows if r.kind == "student"), key=lambda r: (r.name != "gold labels", r.labels or 0))
    for r in [*students, *(r for r in rows if r.kind == "reference")]:
        who = f"student on {r.name}" if r.kind == "student" else r.name
        lines.append(f"| {who} | {r.labels or '-'} | {r.steps or '-'} | {100 * r.test_accuracy:.1f}% of {r.test_size} |")
    return "\n".join(lines)


def plot_curve(rows: Sequence[CurveRow], path: str | Path, title: str, this_run: CurveRow | None = None) -> Path:
    """Accuracy against labels (log scale); references as horizontal lines; `this_run` as a star."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    students = [r for r in rows if r.kind == "student" and r.labels]
    for i, name in enumerate(dict.fromkeys(r.name for r in students)):  # one series per "what it learned from"
        pts = sorted((r.labels, 100 * r.test_accuracy) for r in students if r.name == name)
        ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "s", color=f"C{i}", label=f"student on {name}")
        for x, y in pts:
            # below the point when another series has a higher one at the same n: both labels stay legible
            below = any(r.labels == x and 100 * r.test_accuracy > y for r in students if r.name != name)
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, -13 if below else 6),
                        ha="center", fontsize=8)
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, r in enumerate(r for r in rows if r.kind == "reference"):
        ax.axhline(100 * r.test_accuracy, color="black" if i == 0 else "dimgray", linestyle=styles[i % len(styles)],
                   linewidth=1, label=f"{r.name} {100 * r.test_accuracy:.1f}%")
    if this_run is not None and this_run.labels:
        ax.plot([this_run.labels], [100 * this_run.test_accuracy], "*", color="tab:red", markersize=14,
                label=f"this run: {this_run.name}, {100 * this_run.test_accuracy:.1f}% on {this_run.test_size}")
    ax.set_xscale("log")
    ax.set_xlabel("labels the student was finetuned on")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
