"""Per-label report of the cascade (issue 31): for each gold label of the test set, the accuracy of the
teacher, the student and the cascade, how often student and teacher agree, and how often the cascade fell
back to the teacher -- worst first, so the labels the cascade gets wrong lead the table."""

from __future__ import annotations

from collections.abc import Sequence

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
