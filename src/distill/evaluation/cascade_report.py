"""Per-label report of the cascade (issue 31): for each gold label of the test set, the accuracy of the
teacher, the student and the cascade, how often student and teacher agree, and how often the cascade fell
back to the teacher -- worst first, so the labels the cascade gets wrong lead the table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class LabelRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    count: int
    teacher_accuracy: float
    student_accuracy: float
    cascade_accuracy: float
    agreement: float  # student and teacher give the same answer
    fallback_rate: float  # share answered by the teacher


def per_label_report(gold: Sequence[str], teacher: Sequence[str], student: Sequence[str],
                     fell_back: Sequence[bool]) -> list[LabelRow]:
    """One row per gold label, sorted by cascade accuracy (then student accuracy), lowest first; ties: the
    label with more queries first. The cascade's answer is the teacher's where it fell back, else the student's."""
    n = len(gold)
    if not (len(teacher) == len(student) == len(fell_back) == n):
        raise ValueError(f"gold, teacher, student and fell_back must be of one length "
                         f"({n}, {len(teacher)}, {len(student)}, {len(fell_back)})")
    rows = []
    for label in sorted(set(gold)):
        idx = [i for i in range(n) if gold[i] == label]
        k = len(idx)
        cascade = [teacher[i] if fell_back[i] else student[i] for i in idx]
        rows.append(LabelRow(
            label=label, count=k,
            teacher_accuracy=sum(teacher[i] == label for i in idx) / k,
            student_accuracy=sum(student[i] == label for i in idx) / k,
            cascade_accuracy=sum(c == label for c in cascade) / k,
            agreement=sum(teacher[i] == student[i] for i in idx) / k,
            fallback_rate=sum(bool(fell_back[i]) for i in idx) / k))
    return sorted(rows, key=lambda r: (r.cascade_accuracy, r.student_accuracy, -r.count, r.label))


def markdown_table(rows: Sequence[LabelRow]) -> str:
    """The report as a Markdown table (percentages)."""
    head = "| label | n | teacher | student | cascade | agreement | fallback |\n|---|---|---|---|---|---|---|"
    body = [f"| {r.label} | {r.count} | {r.teacher_accuracy:.0%} | {r.student_accuracy:.0%} | "
            f"{r.cascade_accuracy:.0%} | {r.agreement:.0%} | {r.fallback_rate:.0%} |" for r in rows]
    return "\n".join([head, *body])


def plot_per_label(rows: Sequence[LabelRow], path: str | Path, title: str) -> Path:
    """Horizontal bars per gold label (worst first, at the top): the accuracy of student, teacher and
    cascade, with each label's fallback rate and count at the right."""
    from distill.evaluation.plots import plt, save_figure

    n = len(rows)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * n))
    y = list(range(n))
    height = 0.27
    for i, (name, key) in enumerate((("student", "student_accuracy"), ("teacher", "teacher_accuracy"),
                                     ("cascade", "cascade_accuracy"))):
        ax.barh([v + (i - 1) * height for v in y], [100 * getattr(r, key) for r in rows], height, label=name)
    for v, r in zip(y, rows):
        ax.text(102, v, f"to the teacher: {r.fallback_rate:.0%} of {r.count}", va="center", fontsize=7)
    ax.set_yticks(y, [r.label for r in rows], fontsize=7)
    ax.invert_yaxis()  # the worst label on top
    ax.set_xlim(0, 145)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("accuracy on the test set (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower center", ncols=3, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (1.2 + 0.32 * n), 1, 1))  # room for the legend below
    return save_figure(fig, path)


def plot_fallback_curve(curve: Sequence[Any], chosen: tuple[float, float], path: str | Path, title: str,
                        student: float, teacher: float, budget: float | None = None,
                        chosen_on: str = "the devset") -> Path:
    """The cascade's test accuracy against the share of test queries sent to the teacher, over every
    threshold (`distill.evaluation.calibration.fallback_curve` points), with the threshold chosen on
    `chosen_on` marked at `chosen` (fallback share, accuracy on test); student and teacher alone as lines."""
    from distill.evaluation.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([100 * p.fallback_share for p in curve], [100 * p.accuracy for p in curve], marker=".",
            markersize=4, label="cascade, every threshold")
    ax.axhline(100 * teacher, color="black", linestyle="--", linewidth=1, label=f"teacher alone ({teacher:.1%})")
    ax.axhline(100 * student, color="dimgray", linestyle=":", linewidth=1, label=f"student alone ({student:.1%})")
    if budget is not None:
        ax.axvline(100 * budget, color="tab:red", alpha=0.4, linewidth=1,
                   label=f"budget (max_fallback {budget:.0%})")
    ax.plot([100 * chosen[0]], [100 * chosen[1]], marker="*", markersize=14, color="tab:red", linestyle="none",
            label=f"chosen on {chosen_on}: {chosen[0]:.0%} fallback, {chosen[1]:.1%}")
    ax.set_xlim(-2, 102)
    ax.set_xlabel("queries answered by the teacher (% of the test set)")
    ax.set_ylabel("accuracy on the test set (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


class CallCost(BaseModel):
    """Per-call timings (one call at a time, uncached) and tokens per query, as a stage measured them."""

    model_config = ConfigDict(extra="forbid")

    p50_s: float
    p95_s: float
    prompt_tokens_per_query: float
    completion_tokens_per_query: float


class CostEstimate(BaseModel):
    """What a cascade query costs, estimated from per-call timings of the student and the teacher (measured
    separately, on the same test queries): the student always answers first, the teacher after it on the
    fallback share. An estimate, not a measured latency of the cascade: `seconds_p50` is the p50s weighted by
    who answered (student p50 + fallback share x teacher p50), `seconds_p95_fallback` the p95 of a query that
    falls back (student p95 + teacher p95)."""

    model_config = ConfigDict(extra="forbid")

    fallback_share: float
    student: CallCost
    teacher: CallCost
    seconds_p50: float
    seconds_p95_fallback: float
    tokens_per_query: float  # prompt + completion, student always + fallback share x teacher
    basis: str = "estimate from per-call timings (student: evaluation stage, teacher: teacher stage)"


def cost_estimate(student: CallCost, teacher: CallCost, fallback_share: float) -> CostEstimate:
    """The cascade's per-query cost from its two parts' per-call numbers (`CostEstimate`)."""
    tokens = student.prompt_tokens_per_query + student.completion_tokens_per_query
    teacher_tokens = teacher.prompt_tokens_per_query + teacher.completion_tokens_per_query
    return CostEstimate(fallback_share=fallback_share, student=student, teacher=teacher,
                        seconds_p50=round(student.p50_s + fallback_share * teacher.p50_s, 4),
                        seconds_p95_fallback=round(student.p95_s + teacher.p95_s, 4),
                        tokens_per_query=round(tokens + fallback_share * teacher_tokens, 1))
