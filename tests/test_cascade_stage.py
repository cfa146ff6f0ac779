"""The cascade stage's rule and record (issue 31), fast, on synthetic data: the threshold is chosen within the
devset budget (`cascade.max_fallback`, `cascade.target_agreement`), the manifest survives a round trip, and
the report reads its rows from it. The stage on real served models runs in tests/test_pipeline.py."""

from __future__ import annotations

import numpy as np
import pytest

from distill.config import CascadeConfig
from distill.evaluation.calibration import choose_threshold, fallback_curve, fit_calibration
from distill.evaluation.cascade_report import (
    CallCost,
    cost_estimate,
    per_label_report,
    plot_fallback_curve,
    plot_per_label,
)
from distill.report import summary_rows
from distill.stages.base import read_manifest, write_manifest
from distill.stages.cascade import CascadeManifest, CascadeResult, SplitScores

# A devset labeled by the teacher: the teacher is right everywhere; the student on 6 of 8, sorted by confidence.
CONF = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
STUDENT = [1, 1, 1, 0, 1, 1, 0, 1]
TEACHER = [1] * 8


def test_full_agreement_within_the_budget_is_the_smallest_such_fallback() -> None:
    # Agreement 100% needs the two wrong answers (0.7 and 0.4) sent to the teacher: threshold 0.8 sends 5/8,
    # over a 50% budget; with 75% it is the first that reaches it.
    c = choose_threshold(CONF, STUDENT, TEACHER, target=1.0, max_fallback=0.75)
    assert (c.threshold, c.fallback_share, c.accuracy, c.reached) == (0.8, 5 / 8, 1.0, True)
    assert "smallest fallback share" in c.rule()


def test_out_of_budget_the_most_agreement_within_it_ties_to_less_fallback() -> None:
    # Budget 50%: thresholds up to 0.6 (3/8 to the teacher) are allowed. Their agreement: 0.3 -> 6/8, 0.4 ->
    # 6/8, 0.5 -> 7/8 (the 0.4 answer fixed), 0.6 -> 7/8: the first of the best is 0.5 (fewer to the teacher).
    c = choose_threshold(CONF, STUDENT, TEACHER, target=1.0, max_fallback=0.5)
    assert (c.threshold, c.fallback_share, c.accuracy, c.reached) == (0.5, 2 / 8, 7 / 8, False)
    assert "not reached" in c.rule() and "50%" in c.rule()
    # A zero budget: the student alone, whatever the target.
    c = choose_threshold(CONF, STUDENT, TEACHER, target=1.0, max_fallback=0.0)
    assert (c.threshold, c.fallback_share, c.accuracy) == (0.3, 0.0, 6 / 8)
    # A reachable target inside the budget stops as early as it can.
    c = choose_threshold(CONF, STUDENT, TEACHER, target=0.75, max_fallback=0.5)
    assert (c.threshold, c.fallback_share) == (0.3, 0.0)
    with pytest.raises(ValueError, match="max_fallback"):
        choose_threshold(CONF, STUDENT, TEACHER, max_fallback=1.5)


def test_the_default_budget_is_the_config_s() -> None:
    c = CascadeConfig()
    assert (c.enabled, c.calibration, c.calibrate_on, c.max_fallback, c.target_agreement) == (
        True, "auto", "auto", 0.25, 1.0)
    assert (c.budget_confidence, c.budget_queries) == (0.95, 300)
    # 25% of 8 queries, as measured: two may go to the teacher; 100% agreement needs five, so the best within two.
    choice = choose_threshold(CONF, STUDENT, TEACHER, c.target_agreement, c.max_fallback)
    assert choice.fallback_share <= 0.25 and choice.accuracy == 7 / 8 and not choice.reached
    # With 95% confidence 8 queries allow none (even 0 of 8 is up to 25.3%): the first threshold stands,
    # where the student answers every devset query.
    choice = choose_threshold(CONF, STUDENT, TEACHER, c.target_agreement, c.max_fallback,
                              budget_confidence=c.budget_confidence)
    assert choice.fallback_share == 0 and choice.budget_n == 8 and 0.25 < choice.budget_bound < 0.26


def test_the_curve_runs_from_the_student_alone_to_the_teacher_alone() -> None:
    gold_teacher = [1, 1, 1, 1, 1, 0, 1, 1]
    curve = fallback_curve(CONF, STUDENT, gold_teacher)
    assert [p.fallback_share for p in curve] == [i / 8 for i in range(9)]
    assert curve[0].accuracy == np.mean(STUDENT) and curve[-1].accuracy == np.mean(gold_teacher)


def synthetic_result(tmp_path) -> CascadeResult:
    rng = np.random.default_rng(0)
    labels = [f"label_{i}" for i in range(5)]
    gold = [labels[i % 5] for i in range(60)]
    teacher = [g if rng.random() < 0.8 else labels[0] for g in gold]
    student = [g if rng.random() < 0.6 else labels[1] for g in gold]
    conf = np.clip(np.where([s == g for s, g in zip(student, gold)], 0.8, 0.5) + rng.normal(0, 0.1, 60), 0.01, 0.99)
    correct = np.array([s == g for s, g in zip(student, gold)])
    cal = fit_calibration(conf, correct)
    calibrated = np.array(cal.apply_many(conf))
    choice = choose_threshold(calibrated, correct, np.ones(60, bool), 1.0, 0.25)
    fell_back = calibrated < choice.threshold
    rows = per_label_report(gold, teacher, student, fell_back)
    t_ok = np.array([t == g for t, g in zip(teacher, gold)])
    split = SplitScores(n=60, student_accuracy=float(correct.mean()), teacher_accuracy=float(t_ok.mean()),
                        cascade_accuracy=float(np.where(fell_back, t_ok, correct).mean()),
                        fallback_share=float(fell_back.mean()), ece_raw=cal.ece_before, ece_calibrated=cal.ece_after)
    curve = fallback_curve(calibrated, correct, t_ok)
    plots = {"curve": str(plot_fallback_curve(curve, (split.fallback_share, split.cascade_accuracy),
                                              tmp_path / "curve.png", "synthetic", split.student_accuracy,
                                              split.teacher_accuracy, 0.25)),
             "per_label": str(plot_per_label(rows, tmp_path / "per_label.png", "synthetic"))}
    cost = cost_estimate(CallCost(p50_s=0.2, p95_s=0.3, prompt_tokens_per_query=60, completion_tokens_per_query=10),
                         CallCost(p50_s=1.0, p95_s=2.0, prompt_tokens_per_query=500, completion_tokens_per_query=20),
                         split.fallback_share)
    return CascadeResult(model="student", kind="finetuned", variant="vanilla", calibration=cal,
                         threshold=choice.threshold, threshold_rule=choice.rule(), threshold_reached=choice.reached,
                         max_fallback=0.25, target_agreement=1.0, devset=split, testset=split, cost=cost,
                         per_label=rows, plots=plots, cascade_params=str(tmp_path / "cascade.json"), predictions={})


def test_manifest_round_trip_and_the_report_rows(tmp_path) -> None:
    result = synthetic_result(tmp_path)
    for p in result.plots.values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [r.cascade_accuracy for r in result.per_label] == sorted(r.cascade_accuracy for r in result.per_label)
    cost = result.cost
    assert cost is not None and cost.seconds_p50 == pytest.approx(0.2 + result.testset.fallback_share * 1.0, abs=1e-4)
    assert cost.tokens_per_query == pytest.approx(70 + result.testset.fallback_share * 520, abs=0.1)
    m = CascadeManifest(fingerprint="abc", enabled=True, result=result)
    write_manifest(tmp_path / "manifest.json", m)
    again = read_manifest(tmp_path / "manifest.json", CascadeManifest)
    assert again == m
    rows = dict(summary_rows({"cascade": m.model_dump(mode="json")}))
    key = next(k for k in rows if k.startswith("cascade on test"))
    t = result.testset
    assert rows[key].startswith(f"{100 * t.cascade_accuracy:.1f}% / {100 * t.student_accuracy:.1f}% / "
                                f"{100 * t.teacher_accuracy:.1f}%")
    assert rows["student confidence ECE on test: raw / calibrated (fit on the devset)"] == \
        f"{t.ece_raw:.3f} / {t.ece_calibrated:.3f}"
    assert any(k.startswith("cascade threshold") and v.startswith(f"{result.threshold:.3f}: ") for k, v in rows.items())
    # A disabled cascade records that and nothing else; the report has no cascade rows.
    off = CascadeManifest(fingerprint="abc", enabled=False)
    write_manifest(tmp_path / "off.json", off)
    assert read_manifest(tmp_path / "off.json", CascadeManifest) == off
    assert not any("cascade" in k for k, _ in summary_rows({"cascade": off.model_dump(mode="json")}))
