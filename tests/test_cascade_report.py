"""The per-label cascade report (issue 31) on a hand-computed case."""

from __future__ import annotations

import pytest

from distill.evaluation.cascade_report import markdown_table, per_label_report


def test_per_label_rows_worst_first() -> None:
    gold = ["a", "a", "a", "b", "b", "c"]
    teacher = ["a", "a", "b", "b", "b", "a"]
    student = ["a", "b", "b", "b", "a", "c"]
    fell_back = [False, True, True, False, True, False]
    rows = per_label_report(gold, teacher, student, fell_back)
    # c: cascade keeps the student's right answer (1/1); b: student right, then teacher right (2/2);
    # a: student right, teacher right, teacher wrong (2/3) -> a first.
    assert [r.label for r in rows] == ["a", "b", "c"]
    a = rows[0]
    assert (a.count, a.teacher_accuracy, a.student_accuracy, a.cascade_accuracy) == (3, 2 / 3, 1 / 3, 2 / 3)
    assert (a.agreement, a.fallback_rate) == (2 / 3, 2 / 3)
    c = rows[2]
    assert (c.teacher_accuracy, c.student_accuracy, c.cascade_accuracy, c.agreement) == (0, 1, 1, 0)
    table = markdown_table(rows)
    assert table.splitlines()[2].startswith("| a | 3 | 67% | 33% | 67% |")


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="one length"):
        per_label_report(["a"], ["a", "b"], ["a"], [False])
