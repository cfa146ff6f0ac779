"""The learning curve's points (their profiles) and its CSV and chart; measuring a point is in test_pipeline."""

from __future__ import annotations

from distill.config import load_config
from distill_harness.curve import point_config, series
from distill_harness.learning_curve import CurveRow, plot_curve, read_curve, to_markdown, write_curve


def test_a_point_is_the_profile_cut_to_n_labels_and_trains_at_least_min_steps() -> None:
    full = load_config("local_full")
    assert full.finetune.training == {"num_train_epochs": 1}
    small = point_config(full, "teacher", 100, min_steps=120)  # one epoch would be 13 steps of 8
    assert small.data.optimizer_train_size == 100 and small.curation.sft_source == "teacher"
    assert small.finetune.training == {"max_steps": 120}
    assert small.artifacts == full.artifacts / "curve" / "teacher_100"
    big = point_config(full, "teacher", 1000, min_steps=120)  # 125 steps in one epoch: the profile's own
    assert big.finetune.training == full.finetune.training and big.data.optimizer_train_size == 1000
    gold = point_config(full, "gold", 100, min_steps=120)
    assert gold.curation.sft_source == "gold" and gold.data == full.data
    assert gold.artifacts.name == "gold_100" and gold.finetune.training == {"max_steps": 120}
    sure = point_config(full, "teacher", 1000, min_steps=120, min_confidence=0.5)  # a curation lever at n
    assert sure.curation.min_confidence == 0.5 and sure.artifacts.name == "teacher_1000_conf0.5"
    assert series("teacher", 0.5) == "teacher labels, confidence >= 0.5" and series("gold") == "gold labels"
    # everything upstream of curation is the profile's: the points reuse its labels
    assert (gold.teacher, gold.models, gold.program) == (full.teacher, full.models, full.program)


def test_the_curve_survives_its_csv_and_draws(tmp_path) -> None:
    rows = [CurveRow(kind="student", name="teacher labels", labels=100, steps=120, epochs=9.6, train_seconds=None,
                     test_accuracy=0.61, test_size=1000),
            CurveRow(kind="student", name="gold labels", labels=100, steps=120, epochs=9.6, train_seconds=501.2,
                     test_accuracy=0.55, test_size=1000),
            CurveRow(kind="reference", name="teacher", test_accuracy=0.77, test_size=1000)]
    path = write_curve(rows, tmp_path / "curve.csv")
    assert read_curve(path) == rows
    table = to_markdown(rows).splitlines()
    assert table[2] == "| student on gold labels | 100 | 120 | 55.0% of 1000 |" and table[-1].startswith("| teacher | - |")
    png = plot_curve(rows, tmp_path / "curve.png", "t", this_run=rows[0].model_copy(update={"name": "local"}))
    assert png.stat().st_size > 10_000
