"""Calibration of the student's confidence and the cascade threshold (issue 31), on synthetic data whose
true calibration is known: the fits must recover it, and an uncalibrated score must show as one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression

from distill.evaluation.calibration import (
    choose_calibration,
    choose_threshold,
    ece_noise_floor,
    expected_calibration_error,
    expected_threshold,
    fit_calibration,
    fit_platt,
    fit_teacher_given_student,
    fit_temperature,
    plot_reliability,
    reliability_bins,
)
from distill.program import Calibration, answer_confidence


def generator(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Answers right with probability q; the model reports sigmoid(logit(q) * temperature): overconfident
    for temperature > 1, calibrated at 1."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.05, 0.95, n)
    correct = rng.random(n) < q
    return expit(logit(q) * temperature), correct


def test_ece_of_a_hand_computed_case() -> None:
    # One bin at 0.9 with 6 of 10 right (|0.6 - 0.9| = 0.3), one at 0.25 with 1 of 4 right (0): weighted.
    conf = [0.9] * 10 + [0.25] * 4
    correct = [True] * 6 + [False] * 4 + [True] + [False] * 3
    assert expected_calibration_error(conf, correct) == pytest.approx(10 / 14 * 0.3)
    bins = reliability_bins(conf, correct)
    assert sum(b.count for b in bins) == 14 and bins[8].count == 10 and bins[8].accuracy == pytest.approx(0.6)
    # 1.0 falls in the last bin, 0.0 in the first.
    assert [b.count for b in reliability_bins([0.0, 1.0], [False, True])] == [1] + [0] * 8 + [1]


def test_the_noise_floor_is_what_a_calibrated_predictor_exceeds_one_time_in_twenty() -> None:
    # Calibrated samples (the generator at temperature 1), each with its own confidences: their ECE stays
    # below the floor about 95% of the time, and the floor falls with the sample's size.
    below = []
    for seed in range(200):
        p, y = generator(200, 1.0, seed)
        below.append(expected_calibration_error(p, y) <= ece_noise_floor(p, draws=500, seed=seed + 1000))
    assert 0.9 <= np.mean(below) <= 0.99
    p, _ = generator(5000, 1.0, seed=1)
    assert ece_noise_floor(p[:100]) > 2 * ece_noise_floor(p)
    # An overconfident predictor of the same size is far above it.
    p, y = generator(1000, 2.5, seed=2)
    assert expected_calibration_error(p, y) > 2 * ece_noise_floor(p)


def test_temperature_recovers_a_known_overconfidence_and_fixes_it_out_of_sample() -> None:
    dev_p, dev_y = generator(4000, 2.5, seed=0)
    test_p, test_y = generator(4000, 2.5, seed=1)
    assert fit_temperature(dev_p, dev_y) == pytest.approx(2.5, rel=0.1)
    cal = fit_calibration(dev_p, dev_y, "temperature")
    before, after = expected_calibration_error(test_p, test_y), expected_calibration_error(cal.apply_many(test_p), test_y)
    assert before > 0.1 and after < 0.03, (before, after)
    assert cal.ece_before > 0.1 and cal.ece_after < 0.03 and cal.n == 4000


def test_a_calibrated_score_is_left_alone() -> None:
    p, y = generator(4000, 1.0, seed=2)
    assert fit_temperature(p, y) == pytest.approx(1.0, rel=0.1)
    assert expected_calibration_error(p, y) < 0.03


def test_isotonic_fixes_a_non_logistic_distortion_and_applies_as_sklearn_does() -> None:
    rng = np.random.default_rng(3)
    q = rng.uniform(0, 1, 6000)
    y = rng.random(6000) < q
    p = q ** 0.3  # overconfident everywhere, not a temperature
    cal = fit_calibration(p[:3000], y[:3000], "isotonic")
    assert expected_calibration_error(p[3000:], y[3000:]) > 0.15
    assert expected_calibration_error(cal.apply_many(p[3000:]), y[3000:]) < 0.04
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:3000], y[:3000])
    # The stored knots reproduce sklearn's predictions after a JSON round trip (what the server reads).
    again = Calibration.model_validate(json.loads(cal.model_dump_json()))
    assert np.allclose(again.apply_many(p[3000:]), iso.predict(np.clip(p[3000:], 1e-6, 1 - 1e-6)), atol=1e-9)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="one length"):
        fit_calibration([0.5, 0.6], [True])
    with pytest.raises(ValueError, match="probabilities"):
        fit_calibration([1.5], [True])
    with pytest.raises(ValueError, match="no examples"):
        expected_calibration_error([], [])
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibration([0.5], [True], "beta")  # type: ignore[arg-type]


def test_threshold_reaches_the_teacher_with_the_least_fallback() -> None:
    conf = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    student = [1, 1, 1, 0, 1, 0, 0, 0]
    teacher = [1, 1, 0, 1, 1, 1, 1, 0]  # 6/8 = 0.75
    c = choose_threshold(conf, student, teacher)
    # Student on >= 0.6 (4 of 5 right) + teacher on the three below (2 of 3 right) = 6/8.
    assert (c.threshold, c.accuracy, c.fallback_share, c.reached) == (0.6, 0.75, 3 / 8, True)
    # A target nobody reaches: the most accurate threshold (student on >= 0.8: 3/3, teacher below: 4/5).
    c = choose_threshold(conf, student, teacher, target=0.99)
    assert (c.threshold, c.accuracy, c.fallback_share, c.reached) == (0.8, 7 / 8, 5 / 8, False)
    # A student better than the teacher everywhere never falls back.
    c = choose_threshold(conf, [1] * 8, teacher)
    assert c.fallback_share == 0 and c.accuracy == 1


def test_on_true_labels_the_best_threshold_within_the_budget_goes_past_the_break_even_point() -> None:
    """cascade.target: best (a calibration split's true labels): no stop where the cascade first reaches the
    teacher; the most accurate threshold within the budget, ties to less fallback, the teacher's accuracy
    recorded as the target it was compared with."""
    conf = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    student = [1, 1, 1, 0, 1, 0, 0, 0]
    teacher = [1, 1, 0, 1, 1, 1, 1, 0]  # 6/8: reached first at 0.6 (3/8 to the teacher), 7/8 at 0.8 (5/8)
    c = choose_threshold(conf, student, teacher, max_fallback=1.0, most_accurate=True, on="calibration accuracy")
    assert (c.threshold, c.accuracy, c.fallback_share, c.target, c.reached) == (0.8, 7 / 8, 5 / 8, 0.75, True)
    assert c.rule().startswith("the best calibration accuracy within the budget (87.5%; the teacher's 75.0%)")
    assert "of the calibration split to the teacher" in c.rule()
    # Within a 50% budget (0.6 sends 3/8; 0.7 sends 4/8: 5/8 right): the break-even point is also the best.
    c = choose_threshold(conf, student, teacher, max_fallback=0.5, most_accurate=True)
    assert (c.threshold, c.accuracy, c.fallback_share) == (0.6, 0.75, 3 / 8)
    # Nothing within a 25% budget reaches the teacher: the most accurate there (0.4's answer to the teacher), not reached.
    c = choose_threshold(conf, student, teacher, max_fallback=0.25, most_accurate=True)
    assert (c.threshold, c.accuracy, c.fallback_share, c.reached) == (0.5, 5 / 8, 2 / 8, False)


def cascade_population(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A calibrated student (right with its confidence q) and a teacher right about 87% of the time where the
    student is unsure (q = 0.5), less where it is sure (sigmoid(-0.3 * logit(q) + 1.9)): the best cascade hands over every query
    with q below where the two cross, about 0.8."""
    rng = np.random.default_rng(seed)
    q = expit(rng.normal(1.5, 1.5, n))
    return q, rng.random(n) < q, rng.random(n) < expit(-0.3 * logit(q) + 1.9)


def test_the_teacher_fit_recovers_how_its_accuracy_moves_with_the_students_confidence() -> None:
    q, _, t = cascade_population(20_000, seed=11)
    a, b = fit_teacher_given_student(q, t)
    assert a == pytest.approx(-0.3, abs=0.05) and b == pytest.approx(1.9, abs=0.1)
    # A teacher right on every query: its chance is 1 whatever the student says.
    a, b = fit_teacher_given_student(q[:200], np.ones(200, dtype=bool))
    assert expit(a * logit(q[:200]) + b).min() > 0.99


def test_the_expected_accuracy_threshold_hands_over_where_the_teacher_is_likelier_right() -> None:
    """Unbounded, it stops near the crossing point; within a budget, at the budget; on a new draw of the same
    population its choice is at least as accurate on average as the 0/1 curve's best, which chases noise."""
    q, s, t = cascade_population(20_000, seed=12)
    crossing = float(expit((1.9) / 1.3))  # logit(q) = -0.3 * logit(q) + 1.9
    c = expected_threshold(q, s, t)
    assert c.threshold == pytest.approx(crossing, abs=0.03) and c.expected_accuracy is not None
    c = expected_threshold(q, s, t, max_fallback=0.2, budget_confidence=0.95)
    assert c.budget_bound is not None and c.budget_bound <= 0.2 and c.budget_bound > 0.19
    assert c.rule().startswith("the highest expected accuracy within the budget")
    gains = []
    for seed in range(30):  # choose on 300, score on 20,000 fresh queries
        q1, s1, t1 = cascade_population(300, seed=100 + seed)
        q2, s2, t2 = cascade_population(20_000, seed=200 + seed)

        def held(threshold: float) -> float:
            return float(np.where(q2 >= threshold, s2, t2).mean())
        e = expected_threshold(q1, s1, t1, max_fallback=0.3, budget_confidence=0.95).threshold
        b = choose_threshold(q1, s1, t1, max_fallback=0.3, budget_confidence=0.95, most_accurate=True).threshold
        gains.append(held(e) - held(b))
    assert np.mean(gains) > 0
    with pytest.raises(ValueError, match="max_fallback"):
        expected_threshold(q, s, t, max_fallback=1.5)


def test_answer_confidence_from_openai_logprobs() -> None:
    content = [{"token": "{", "logprob": 0.0}, {"token": "card", "logprob": np.log(0.5)},
               {"token": "_arrival", "logprob": np.log(0.8)}]
    assert answer_confidence({"content": content}) == pytest.approx(0.4)
    assert answer_confidence(None) is None and answer_confidence({"content": []}) is None


def test_reliability_diagram_is_written(tmp_path) -> None:
    p, y = generator(500, 2.5, seed=4)
    cal = fit_calibration(p, y)
    out = plot_reliability({"raw": p, "calibrated": cal.apply_many(p)}, y, tmp_path / "r.png", "synthetic")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_calibrate_student_fits_on_dev_scores_on_test_and_writes_what_the_cascade_reads(tmp_path) -> None:
    from distill.evaluation.calibration import calibrate_student
    from distill.program import CascadeParams

    dev, test = generator(2000, 2.5, seed=5), generator(2000, 2.5, seed=6)
    report, params = calibrate_student(dev, test, tmp_path, target=0.9)
    assert report.ece_testset_before > 0.1 and report.ece_testset_after < 0.03
    assert CascadeParams.load(tmp_path / "cascade.json") == params and (tmp_path / "reliability.png").is_file()
    # The threshold met its devset target and sends only part of the queries to the teacher (right by default).
    assert report.threshold_reached and report.devset_cascade_accuracy >= 0.9 and 0 < report.devset_fallback_share < 1
    # Chosen on dev, it behaves alike on test drawn from the same generator.
    assert abs(report.testset_fallback_share - report.devset_fallback_share) < 0.05
    with pytest.raises(ValueError, match="not valid cascade params"):
        (tmp_path / "bad.json").write_text('{"threshold": -1}')
        CascadeParams.load(tmp_path / "bad.json")


def test_a_fit_on_true_labels_corrects_what_a_fit_on_agreement_overstates(tmp_path) -> None:
    """The devset's labels are the teacher's: when the teacher is wrong on 20% of queries, the student's
    agreement with it is higher than its accuracy, and a fit there is overconfident on test by about that
    much. The same fit on gold (true labels) is not; the threshold is chosen on the devset in both cases."""
    from distill.evaluation.calibration import calibrate_student

    rng = np.random.default_rng(7)

    def split(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p, agrees = generator(n, 2.5, seed=int(rng.integers(1 << 30)))
        teacher_right = rng.random(n) < 0.8
        # right against the truth only when it agrees with a teacher who is right (same label, the true one)
        return p, agrees, agrees & teacher_right

    dev_p, dev_agree, _ = split(600)
    gold_p, _, gold_right = split(600)
    test_p, _, test_right = split(4000)
    on_dev, _ = calibrate_student((dev_p, dev_agree), (test_p, test_right), tmp_path / "dev", "auto")
    on_gold, _ = calibrate_student((dev_p, dev_agree), (test_p, test_right), tmp_path / "gold", "auto",
                                   fit=(gold_p, gold_right), fit_on="gold")
    assert on_dev.fit_on == "devset" and on_gold.fit_on == "gold" and on_gold.n_fit == 600
    assert on_dev.ece_testset_after > 0.08 and on_gold.ece_testset_after < 0.04, (on_dev, on_gold)
    # The same queries go to the teacher: a monotone calibration keeps the devset's order, so its threshold
    # picks the same devset answers whatever it was fit on.
    assert on_dev.devset_fallback_share == on_gold.devset_fallback_share
    assert on_dev.testset_fallback_share == on_gold.testset_fallback_share


def test_gold_calibration_only_for_a_student_that_never_trained_on_gold() -> None:
    from distill.config import load_config
    from distill.errors import ConfigError

    # a calibration split (data.num_calibration) wins; without one, gold when the student never trained on it
    assert load_config("local_full").calibration_split == load_config("local").calibration_split == "calibration"
    none = {"data": {"num_calibration": 0}}
    assert load_config("local_full", overrides=none).calibration_split == "gold"  # sft_source: teacher
    assert load_config("local", overrides=none).calibration_split == "devset"  # sft_source: both
    with pytest.raises(ConfigError, match="calibrate_on: calibration needs data.num_calibration"):
        load_config("local", overrides={**none, "cascade": {"calibrate_on": "calibration"}})
    with pytest.raises(ConfigError, match="calibrate_on: gold needs curation.sft_source: teacher"):
        load_config("local", overrides={"cascade": {"calibrate_on": "gold"}})


def test_auto_picks_a_shift_where_temperature_cannot_reach_and_nothing_where_none_is_needed() -> None:
    """A student right 75% as often as it says, at every confidence: temperature keeps 0.5 at 0.5 and cannot
    lower everything alike, platt's shift can, and cross-validation on the fit's data sees it. A calibrated
    one is left alone (or nearly: no fitted method may do clearly worse than none held out)."""
    p, y = generator(3000, 1.0, seed=11)
    rng = np.random.default_rng(12)
    shifted = y & (rng.random(len(y)) < 0.75)
    method, scores = choose_calibration(p, shifted)
    assert method in ("platt", "isotonic") and scores[method] < scores["temperature"] - 0.005, scores
    cal = fit_calibration(p, shifted, "auto")
    assert cal.method == method and cal.cv_log_loss == scores
    assert expected_calibration_error(cal.apply_many(p), shifted) < 0.03
    method, scores = choose_calibration(p, y)
    assert scores[method] > scores["none"] - 0.002, scores
    # under ISOTONIC_MIN_N examples isotonic is no candidate: on a few hundred it overfits into flat steps
    method, scores = choose_calibration(p[:300], shifted[:300])
    assert "isotonic" not in scores and set(scores) == {"none", "temperature", "platt"} and method == "platt", scores
    # platt keeps the order of the confidences (a > 0), so a threshold picks the same answers
    slope, bias = fit_platt(p, shifted)
    assert slope > 0 and np.all(np.diff(Calibration(method="platt", slope=slope, bias=bias)
                                        .apply_many(np.sort(p))) >= 0)


def test_the_budget_is_kept_with_confidence_on_the_devset_and_unlabeled_queries() -> None:
    """Measured on 100 devset queries, a 25% share is good to about 7 points: with budget_confidence the
    bound must stay within the budget, so less goes to the teacher; unlabeled queries beside the devset
    narrow the bound. The first threshold (nothing from the devset to the teacher) is always allowed."""
    from distill.evaluation.calibration import share_upper_bound

    p, y = generator(100, 1.0, seed=21)
    teacher = np.ones(100, dtype=bool)
    plain = choose_threshold(p, y, teacher, target=1.0, max_fallback=0.25)
    guarded = choose_threshold(p, y, teacher, target=1.0, max_fallback=0.25, budget_confidence=0.95)
    unlabeled, _ = generator(2000, 1.0, seed=22)
    wide = choose_threshold(p, y, teacher, target=1.0, max_fallback=0.25, budget_sample=unlabeled,
                            budget_confidence=0.95)
    assert plain.fallback_share <= 0.25 and plain.budget_bound is None
    assert guarded.budget_n == 100 and guarded.budget_bound <= 0.25 and guarded.fallback_share < plain.fallback_share
    assert wide.budget_n == 2100 and wide.budget_bound <= 0.25 and wide.budget_share > guarded.budget_share
    assert "with 95% confidence" in wide.rule() and "of 2100 queries" in wide.rule()
    # Wilson: 20 of 100 -> at most ~27% at 95%; of 2100, ~21.4%; none of 100 is still up to ~2.6%
    assert 0.26 < share_upper_bound(0.2, 100, 0.95) < 0.28 and 0.2 < share_upper_bound(0.2, 2100, 0.95) < 0.22
    assert share_upper_bound(0.2, 100, None) == 0.2 and 0 < share_upper_bound(0.0, 100, 0.95) < 0.03
    nothing = choose_threshold(p, y, teacher, target=1.0, max_fallback=0.0, budget_confidence=0.95)
    assert nothing.fallback_share == 0.0


def test_the_committed_local_full_fit_is_what_docs_cascade_shows() -> None:
    """docs/cascade.md shows benchmarks/calibrate_student.py's summary of docs/calibration/local_full_gold as the
    script prints it (regenerate, do not edit), and the summary agrees with the fit's own files."""
    import importlib.util
    from pathlib import Path

    from distill.config import project_root
    from distill.evaluation.calibration import CalibrationReport

    root = project_root()
    spec = importlib.util.spec_from_file_location("calibrate_student", root / "benchmarks" / "calibrate_student.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = Path("docs/calibration/local_full_gold")
    summary = json.loads((root / out / "summary.json").read_text())
    assert mod.markdown(summary, out, Path("artifacts/local_full")) in (root / "docs" / "cascade.md").read_text()
    report = CalibrationReport.model_validate_json((root / out / "calibration.json").read_text())
    conf, correct = json.loads((root / out / "scores.json").read_text())["testset"]
    assert summary["ece_testset"]["raw"] == report.ece_testset_before == expected_calibration_error(conf, correct)
    assert report.fit_on == summary["fit_on"] == "gold" and report.n_fit == 100
