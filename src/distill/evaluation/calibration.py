"""Calibrating the student's confidence on the devset, and choosing the cascade's threshold there.

The served student's confidence is the probability of its answer among the labels (the product of the
answer trie's branch probabilities, `distill.serving.choices`). A tiny finetuned model is rarely
calibrated: its 0.9 is not right 90% of the time. Two fits, both on (confidence, correct) pairs of the
devset, never the test set:

* `temperature`: one parameter on the confidence's log-odds, p' = sigmoid(logit(p) / T), fit by maximum
  likelihood (scipy). Monotone and hard to overfit on a few hundred examples; it keeps 0.5 at 0.5, so it
  cannot lower every confidence alike (a student right less often than it says, everywhere).
* `platt`: two, p' = sigmoid(a * logit(p) + b) with a > 0, by maximum likelihood: temperature plus a shift.
* `isotonic`: scikit-learn's isotonic regression, a monotone step function; more flexible, overfits small
  devsets.
* `auto`: the one of these (or none) with the lowest held-out log loss in a k-fold cross-validation on the
  fit's own data (`choose_calibration`), so the choice never looks at the test set.

All keep the order of the confidences, so a threshold on any picks the same answers; calibration is
what makes the threshold (and the reported confidence) mean what it says.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, logit
from sklearn.isotonic import IsotonicRegression

from distill.errors import DistillError
from distill.evaluation.plots import plt, save_figure
from distill.lm import Prompt, using
from distill.program import Calibration, CalibrationMethod, CascadeParams

EPS = 1e-6


def _arrays(confidence: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"confidence and correct must be 1-D and of one length ({p.shape} vs {y.shape})")
    if len(p) == 0:
        raise ValueError("no examples to calibrate on")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("confidences must be probabilities in [0, 1]")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("correct must hold booleans")
    return p, y


@dataclass(frozen=True)
class Bin:
    lower: float
    upper: float
    count: int
    confidence: float  # mean confidence in the bin (nan when empty)
    accuracy: float  # share correct in the bin (nan when empty)


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[Bin]:
    """Equal-width confidence bins over [0, 1] (the last one closed), with their mean confidence and accuracy."""
    p, y = _arrays(confidence, correct)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        out.append(Bin(float(edges[b]), float(edges[b + 1]), n,
                       float(p[mask].mean()) if n else float("nan"), float(y[mask].mean()) if n else float("nan")))
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width bins (0 = calibrated)."""
    total = len(confidence)
    return float(sum(b.count / total * abs(b.accuracy - b.confidence)
                     for b in reliability_bins(confidence, correct, bins) if b.count))


def ece_noise_floor(confidence: Sequence[float], bins: int = 10, draws: int = 2000, quantile: float = 0.95,
                    seed: int = 0) -> float:
    """The ECE a perfectly calibrated predictor exceeds with probability 1 - `quantile` on these confidences.

    ECE is biased upwards on small samples: with a few hundred answers, binned accuracies scatter around
    their confidences by chance. Drawing each answer right with probability equal to its confidence shows how
    much ECE that chance alone gives; a measured ECE below this floor cannot be told from calibrated."""
    p, _ = _arrays(confidence, [False] * len(confidence))
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    # Per draw and bin: |sum of (outcome - confidence)| / n, the count-weighted |accuracy - confidence|.
    rng = np.random.default_rng(seed)
    gap = (rng.random((draws, len(p))) < p).astype(np.float64) - p
    per_bin = np.stack([gap[:, index == b].sum(axis=1) for b in range(bins)], axis=1)
    return float(np.quantile(np.abs(per_bin).sum(axis=1) / len(p), quantile))


def _nll(q: np.ndarray, y: np.ndarray, eps: float = EPS) -> float:
    """Mean negative log-likelihood of outcomes `y` under probabilities `q`, clipped to [eps, 1 - eps]."""
    q = np.clip(q, eps, 1 - eps)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def fit_temperature(confidence: Sequence[float], correct: Sequence[bool]) -> float:
    """T minimising the negative log-likelihood of `correct` under sigmoid(logit(p) / T)."""
    p, y = _arrays(confidence, correct)
    z = logit(np.clip(p, EPS, 1 - EPS))

    def nll(log_t: float) -> float:
        return _nll(expit(z / np.exp(log_t)), y)

    # log T in [-5, 5]: T from 0.007 to 148, far beyond any useful scaling, so the bound never decides.
    return float(np.exp(minimize_scalar(nll, bounds=(-5.0, 5.0), method="bounded").x))


def fit_platt(confidence: Sequence[float], correct: Sequence[bool]) -> tuple[float, float]:
    """(a, b) minimising the negative log-likelihood of `correct` under sigmoid(a * logit(p) + b), a > 0."""
    p, y = _arrays(confidence, correct)
    z = logit(np.clip(p, EPS, 1 - EPS))

    def nll(ab: np.ndarray) -> float:
        return _nll(expit(np.exp(ab[0]) * z + ab[1]), y)

    # a = exp(log a) keeps the order; log a in [-5, 5] and |b| <= 20 as for the temperature: never binding.
    res = minimize(nll, np.zeros(2), method="L-BFGS-B", bounds=[(-5.0, 5.0), (-20.0, 20.0)])
    return float(np.exp(res.x[0])), float(res.x[1])


FITTED_METHODS: tuple[CalibrationMethod, ...] = ("none", "temperature", "platt", "isotonic")
ISOTONIC_MIN_N = 1000  # choose_calibration: isotonic is a candidate from this many examples on


def log_loss(confidence: Sequence[float], correct: Sequence[bool]) -> float:
    """Mean negative log-likelihood of `correct` (confidences clipped to [1e-4, 1 - 1e-4]: an isotonic step
    at 0 or 1 costs a bounded amount when it is wrong, not infinity)."""
    return _nll(np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64), eps=1e-4)


def choose_calibration(confidence: Sequence[float], correct: Sequence[bool], folds: int = 10,
                       seed: int = 0) -> tuple[CalibrationMethod, dict[str, float]]:
    """The method (of `FITTED_METHODS`) with the lowest mean held-out log loss over `folds` shuffled folds of
    (confidence, correct), and every method's. Ties go to the simpler one (the order of FITTED_METHODS).

    Isotonic regression is a candidate from `ISOTONIC_MIN_N` examples on: below, it overfits (Niculescu-Mizil
    & Caruana, "Predicting good probabilities with supervised learning", ICML 2005, found it worse than
    Platt's under about a thousand), and its flat steps give many answers one confidence, which a threshold
    cannot tell apart -- on a few dozen it maps whole ranges to 0 or 1."""
    from sklearn.model_selection import KFold

    p, y = _arrays(confidence, correct)
    if len(p) < 2 * 2:  # fewer than two folds of two: nothing to tell the methods apart with
        return "none", {}
    splits = list(KFold(n_splits=min(folds, len(p) // 2), shuffle=True, random_state=seed).split(p))
    scores: dict[str, float] = {}
    for method in [m for m in FITTED_METHODS if m != "isotonic" or len(p) >= ISOTONIC_MIN_N]:
        losses = []
        for train, held in splits:
            if method != "none" and len(np.unique(y[train])) < 2:
                losses.append(log_loss(p[held], y[held]))  # nothing to fit on a one-class fold: raw
                continue
            cal = fit_calibration(p[train], y[train], method)
            losses.append(log_loss(cal.apply_many(p[held]), y[held]))
        scores[method] = round(float(np.mean(losses)), 6)
    best = min(scores, key=lambda m: (scores[m], FITTED_METHODS.index(m)))
    return best, scores


def fit_calibration(confidence: Sequence[float], correct: Sequence[bool],
                    method: CalibrationMethod | Literal["auto"] = "temperature", bins: int = 10) -> Calibration:
    """Fit `method` on (confidence, correct) of the devset; the result records the ECE before and after,
    measured on the same devset (in-sample: report the test set's too, with `Calibration.apply`).
    `auto`: the method `choose_calibration` picks by cross-validation on the same data, refit on all of it."""
    p, y = _arrays(confidence, correct)
    if method == "auto":
        chosen, scores = choose_calibration(p, y)
        return fit_calibration(p, y, chosen, bins).model_copy(update={"cv_log_loss": scores})
    if method == "temperature":
        cal = Calibration(method="temperature", temperature=fit_temperature(p, y), n=len(p))
    elif method == "platt":
        slope, bias = fit_platt(p, y)
        cal = Calibration(method="platt", slope=slope, bias=bias, n=len(p))
    elif method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        cal = Calibration(method="isotonic", x=iso.X_thresholds_.tolist(), y=iso.y_thresholds_.tolist(), n=len(p))
    elif method == "none":
        cal = Calibration(method="none", n=len(p))
    else:
        raise ValueError(f"unknown calibration method {method!r}: auto, temperature, platt, isotonic or none")
    return cal.model_copy(update={"ece_before": expected_calibration_error(p, y, bins),
                                  "ece_after": expected_calibration_error(cal.apply_many(p), y, bins)})


def share_upper_bound(share: float, n: int, confidence: float | None) -> float:
    """The one-sided upper bound of a share measured on `n` queries at `confidence` (Wilson score interval);
    `confidence` None: the share itself."""
    if confidence is None or n == 0:
        return share
    from scipy.stats import norm

    z = float(norm.ppf(confidence))
    centre = share + z * z / (2 * n)
    spread = z * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return float(min(1.0, (centre + spread) / (1 + z * z / n)))


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float  # the student answers when its (calibrated) confidence is >= this
    accuracy: float  # the cascade's accuracy on the devset at this threshold
    fallback_share: float  # share of devset queries sent to the teacher
    target: float  # the accuracy it had to reach
    reached: bool  # False: no threshold within the budget reaches the target; the most accurate one is chosen
    max_fallback: float = 1.0  # the budget: at most this share of queries may go to the teacher
    # the share measured on the split chosen on and the queries beside it (budget_sample), how many, and
    # its upper bound at budget_confidence: what has to stay within max_fallback
    budget_share: float | None = None
    budget_n: int | None = None
    budget_bound: float | None = None
    budget_confidence: float | None = None

    # what it was chosen on, in words ("devset agreement": with the teacher's labels; "calibration-split
    # accuracy": with true labels), and whether the target was the most accurate point within the budget
    on: str = "devset agreement"
    most_accurate: bool = False
    # expected_threshold: the cascade's expected accuracy it maximised, over the split and the budget's queries
    expected_accuracy: float | None = None

    def rule(self) -> str:
        """How it was chosen, in words (for the report: short, it is a table cell)."""
        split = {"calibration": "calibration split"}.get(s := self.on.split(" ")[0], s)
        if self.budget_confidence is None:
            budget = f"at most {self.max_fallback:.0%} of the {split} to the teacher"
        else:
            budget = (f"at most {self.max_fallback:.0%} to the teacher with {self.budget_confidence:.0%} confidence "
                      f"({self.budget_share:.1%} of {self.budget_n} queries, bound {self.budget_bound:.1%})")
        if self.expected_accuracy is not None:
            return (f"the highest expected accuracy within the budget ({self.expected_accuracy:.1%}, from the "
                    f"calibrated confidence and the teacher's fit on it; {self.on} {self.accuracy:.1%}, the "
                    f"teacher's {self.target:.1%}), ties to less fallback; {budget}")
        if self.most_accurate:
            return (f"the best {self.on} within the budget ({self.accuracy:.1%}; the teacher's {self.target:.1%}), "
                    f"ties to less fallback; {budget}")
        if self.reached:
            return f"the smallest fallback share reaching {self.target:.1%} {self.on}; {budget}"
        return (f"the best {self.on} ({self.accuracy:.1%}; {self.target:.1%} not reached), "
                f"ties to less fallback; {budget}")


@dataclass(frozen=True)
class CurvePoint:
    threshold: float
    fallback_share: float
    accuracy: float


def fallback_curve(confidence: Sequence[float], student_correct: Sequence[bool],
                   teacher_correct: Sequence[bool]) -> list[CurvePoint]:
    """The cascade's accuracy at every threshold these confidences give, ascending (the fallback share
    grows): the student answers at confidence >= threshold, the teacher below. The thresholds are the
    confidences themselves and one above them all (always the teacher), so nothing is interpolated."""
    p, s = _arrays(confidence, student_correct)
    _, t = _arrays(confidence, teacher_correct)
    out = []
    for c in np.unique(np.append(p, np.nextafter(p.max(), np.inf))):
        student = p >= c
        out.append(CurvePoint(float(c), float(1 - student.mean()), float(np.where(student, s, t).mean())))
    return out


def choose_threshold(confidence: Sequence[float], student_correct: Sequence[bool], teacher_correct: Sequence[bool],
                     target: float | None = None, max_fallback: float = 1.0,
                     budget_sample: Sequence[float] = (), budget_confidence: float | None = None,
                     most_accurate: bool = False, on: str = "devset agreement") -> ThresholdChoice:
    """The threshold with the smallest fallback share whose cascade accuracy on the devset reaches `target`
    (default: the teacher's own devset accuracy), among those sending at most `max_fallback` of the queries
    to the teacher; if none does, the most accurate of those (ties: the smaller fallback share). Candidates
    are the devset's confidences themselves (`fallback_curve`), so nothing is interpolated between examples;
    the lowest sends nothing to the teacher, so there is always one within the budget.

    The budget is a promise about traffic the cascade has not seen. With `budget_confidence`, the fallback
    share is measured on `confidence` plus `budget_sample` (the confidences of more queries, whose labels
    are not read: a share needs none) and its one-sided upper bound at that confidence (`share_upper_bound`)
    must stay within `max_fallback`: a devset of 100 puts its share within about 7 points, not 1.

    `most_accurate`: no early stop at the target, the most accurate threshold within the budget (ties: the
    smaller share); the target is then only recorded (`reached`: whether that threshold reaches it). `on`
    names the split and what its accuracy is, for `ThresholdChoice.rule`."""
    if not 0.0 <= max_fallback <= 1.0:
        raise ValueError(f"max_fallback must be a share in [0, 1], not {max_fallback}")
    p, _ = _arrays(confidence, student_correct)
    _, t = _arrays(confidence, teacher_correct)
    pool = np.concatenate([p, np.asarray(budget_sample, dtype=np.float64)])
    goal = float(t.mean()) if target is None else target
    best: ThresholdChoice | None = None
    for point in fallback_curve(confidence, student_correct, teacher_correct):
        share = float((pool < point.threshold).mean())
        bound = share_upper_bound(share, len(pool), budget_confidence)
        over = (bound if budget_confidence is not None else point.fallback_share) > max_fallback + 1e-12
        if over and best is not None:
            break  # ascending: every later threshold sends more (the first, nothing from the devset, stays)
        choice = ThresholdChoice(point.threshold, point.accuracy, point.fallback_share, goal,
                                 point.accuracy >= goal - 1e-12, max_fallback,
                                 *((round(share, 6), len(pool), round(bound, 6), budget_confidence)
                                   if budget_confidence is not None else ()),
                                 on=on, most_accurate=most_accurate)
        if choice.reached and not most_accurate:
            return choice
        if best is None or point.accuracy > best.accuracy:
            best = choice
    assert best is not None
    return best


def fit_teacher_given_student(confidence: Sequence[float], teacher_correct: Sequence[bool]) -> tuple[float, float]:
    """(a, b): the teacher is right with probability sigmoid(a * logit(q) + b), q the student's calibrated
    confidence, by maximum likelihood. The teacher tends to be surer where the student is, but not always,
    so the slope may take either sign; a teacher right (or wrong) on every query gives a = 0 and b at the
    bound, its share."""
    q, t = _arrays(confidence, teacher_correct)
    z = logit(np.clip(q, EPS, 1 - EPS))

    def nll(ab: np.ndarray) -> float:
        return _nll(expit(ab[0] * z + ab[1]), t)

    res = minimize(nll, np.array([0.0, float(logit(np.clip(t.mean(), 0.01, 0.99)))]), method="L-BFGS-B",
                   bounds=[(-20.0, 20.0), (-20.0, 20.0)])
    return float(res.x[0]), float(res.x[1])


def expected_threshold(confidence: Sequence[float], student_correct: Sequence[bool],
                       teacher_correct: Sequence[bool], max_fallback: float = 1.0,
                       budget_sample: Sequence[float] = (), budget_confidence: float | None = None,
                       on: str = "calibration-split accuracy") -> ThresholdChoice:
    """The threshold with the highest *expected* cascade accuracy within the budget, ties to less fallback.

    `choose_threshold(most_accurate=True)` maximises the split's 0/1 curve, whose top on a few hundred
    queries is partly which queries happened to be right. Here a query the student keeps counts its
    calibrated confidence (`confidence` must be calibrated), and one it hands over counts the teacher's
    chance of being right at that student confidence (`fit_teacher_given_student`, fit on the split). Neither
    reads a label at scoring time, so the expectation runs over the split and `budget_sample` together, and
    the budget is checked on the same queries as in `choose_threshold`. The reported accuracy and fallback
    share are the split's own, measured (the teacher's accuracy there is the recorded target)."""
    if not 0.0 <= max_fallback <= 1.0:
        raise ValueError(f"max_fallback must be a share in [0, 1], not {max_fallback}")
    q, s = _arrays(confidence, student_correct)
    _, t = _arrays(confidence, teacher_correct)
    pool = np.concatenate([q, np.asarray(budget_sample, dtype=np.float64)])
    a, b = fit_teacher_given_student(q, t)
    teacher_p = expit(a * logit(np.clip(pool, EPS, 1 - EPS)) + b)
    best: tuple[float, float] | None = None  # (expected accuracy, threshold)
    for c in np.unique(np.append(pool, np.nextafter(pool.max(), np.inf))):
        share = float((pool < c).mean())
        bound = share_upper_bound(share, len(pool), budget_confidence)
        if (bound if budget_confidence is not None else share) > max_fallback + 1e-12 and best is not None:
            break  # ascending: every later threshold sends more
        value = float(np.where(pool >= c, pool, teacher_p).mean())
        if best is None or value > best[0] + 1e-12:
            best = (value, float(c))
    assert best is not None
    value, threshold = best
    share = float((pool < threshold).mean())
    kept = q >= threshold
    accuracy = float(np.where(kept, s, t).mean())
    return ThresholdChoice(threshold, accuracy, float(1 - kept.mean()), float(t.mean()), accuracy >= t.mean() - 1e-12,
                           max_fallback,
                           *((round(share, 6), len(pool), round(share_upper_bound(share, len(pool), budget_confidence), 6),
                              budget_confidence) if budget_confidence is not None else ()),
                           on=on, most_accurate=True, expected_accuracy=round(value, 6))


def plot_reliability(curves: Mapping[str, Sequence[float]], correct: Sequence[bool], path: str | Path, title: str,
                     bins: int = 10) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, one line per set of confidences
    (e.g. raw and calibrated) with its ECE in the legend; the diagonal is perfect calibration. Bar heights
    at the bottom show how many answers each bin holds (of the first curve)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfectly calibrated")
    for i, (name, conf) in enumerate(curves.items()):
        rows = [b for b in reliability_bins(conf, correct, bins) if b.count]
        ece = expected_calibration_error(conf, correct, bins)
        ax.plot([b.confidence for b in rows], [b.accuracy for b in rows], marker="o",
                label=f"{name} (ECE {ece:.3f})")
        if i == 0:
            share = np.array([b.count for b in reliability_bins(conf, correct, bins)]) / len(conf)
            ax.bar(np.linspace(0, 1, bins + 1)[:-1], 0.25 * share, width=1 / bins, align="edge", alpha=0.2,
                   color="tab:blue", label=f"share of answers per bin ({name}, scaled 1/4)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(textwrap.fill(title, 70), fontsize=10)  # the stage's titles outrun a 5.5-inch figure
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


class CalibrationReport(BaseModel):
    """`calibration.json`: the student's confidence before and after calibration on the data it was fit on
    (`fit_on`), the devset and the test set (scored only), and the cascade threshold chosen on the devset."""

    model_config = ConfigDict(extra="forbid")

    method: CalibrationMethod
    # what the fit saw: "devset" (the teacher's labels: agreement) or "gold" (true labels the student never
    # trained on); its ECE before and after is in-sample
    fit_on: str = "devset"
    # the split the threshold was chosen on, which the devset_* fields describe: devset (agreement with the
    # teacher) or calibration (hand labels held out from teacher and student, the teacher's answers to them)
    chosen_on: str = "devset"
    n_fit: int | None = None
    accuracy_fit: float | None = None
    ece_fit_before: float | None = None
    ece_fit_after: float | None = None
    n_devset: int
    n_testset: int
    accuracy_devset: float
    accuracy_testset: float
    ece_devset_before: float
    ece_devset_after: float
    ece_testset_before: float
    ece_testset_after: float
    # ece_noise_floor's 95th percentile on the calibrated test confidences: a test ECE below it is
    # indistinguishable from a calibrated one at this test size (None: written before it was measured)
    ece_testset_noise_floor: float | None = None
    threshold: float
    threshold_target: float
    threshold_reached: bool
    threshold_max_fallback: float = 1.0  # the budget: at most this devset share to the teacher
    threshold_rule: str = ""  # how the threshold was chosen, in words
    devset_cascade_accuracy: float
    devset_fallback_share: float
    # the fallback share on the devset plus unlabeled queries, their number, and its upper bound at
    # budget_confidence (None: the budget was checked on the devset's share alone)
    budget_share: float | None = None
    budget_n: int | None = None
    budget_bound: float | None = None
    budget_confidence: float | None = None
    testset_fallback_share: float  # at the devset's threshold
    testset_student_accuracy_kept: float | None  # the student's test accuracy on the answers it keeps
    plot: str


def score_confidence(program: Any, lm: Any, prompt: Prompt, examples: Sequence[Any]) -> tuple[list[float], list[bool]]:
    """The program's confidence and correctness on each example (the LM must ask for logprobs:
    `make_lm(..., logprobs=True)`); an answer without a confidence is a clear error, not a guess."""
    confidence, correct = [], []
    with using(lm, prompt):
        for ex in examples:
            pred = program(text=ex.text)
            if pred.get("confidence") is None:
                raise DistillError(f"no confidence for {ex.text!r}: does the LM ask for logprobs, and does the "
                                   "server decode the label set over its answers (choice decoding)?")
            confidence.append(pred.confidence)
            correct.append(pred.label == ex.label)
    return confidence, correct


def calibrate_student(dev: tuple[Sequence[float], Sequence[bool]], test: tuple[Sequence[float], Sequence[bool]],
                      out_dir: Path, method: CalibrationMethod | Literal["auto"] = "temperature",
                      teacher_dev_correct: Sequence[bool] | None = None, target: float | None = None,
                      title: str = "", max_fallback: float = 1.0,
                      fit: tuple[Sequence[float], Sequence[bool]] | None = None,
                      fit_on: str = "devset", budget_sample: Sequence[float] = (),
                      budget_confidence: float | None = None, chosen_on: str = "devset",
                      most_accurate: bool = False, expected: bool = False) -> tuple[CalibrationReport, CascadeParams]:
    """Fit the calibration on `fit` (default: `dev`) and choose the threshold on `dev` (confidence, correct);
    score both on `test`. `fit_on` names the fit's data in the report (e.g. "gold": true labels the student
    never trained on, where the devset holds the teacher's).

    `teacher_dev_correct` defaults to all True: on a devset labeled by the teacher (the pipeline's synthetic
    devset) the teacher is right by construction, so the default target asks the cascade to agree with the
    teacher on every devset query; `max_fallback` caps the share sent to the teacher, checked as
    `choose_threshold` says with `budget_sample` (raw confidences of more queries, calibrated here) and
    `budget_confidence`. Writes cascade.json, calibration.json and reliability.png to `out_dir`.

    `chosen_on` names `dev` when it is not the devset: "calibration", hand labels with the teacher's answers
    in `teacher_dev_correct`; the report's devset fields then describe that split. `expected`: the threshold
    is `expected_threshold`'s (it needs the teacher's true correctness, so not on the devset).
    """
    (dev_p, dev_y), (test_p, test_y) = _arrays(*dev), _arrays(*test)
    fit_p, fit_y = (dev_p, dev_y) if fit is None else _arrays(*fit)
    cal = fit_calibration(fit_p, fit_y, method)
    dev_c, test_c = np.array(cal.apply_many(dev_p)), np.array(cal.apply_many(test_p))
    teacher = np.ones_like(dev_y) if teacher_dev_correct is None else np.asarray(teacher_dev_correct, dtype=float)
    on = "devset agreement" if chosen_on == "devset" else f"{chosen_on} accuracy"
    if expected and teacher_dev_correct is None:
        raise ValueError("the expected-accuracy threshold needs the teacher's correctness on true labels")
    choice = (expected_threshold(dev_c, dev_y, teacher, max_fallback, cal.apply_many(budget_sample),
                                 budget_confidence, on=on) if expected else
              choose_threshold(dev_c, dev_y, teacher, target, max_fallback, cal.apply_many(budget_sample),
                               budget_confidence, most_accurate=most_accurate, on=on))
    kept = test_c >= choice.threshold
    plot = plot_reliability({"test, raw": test_p, f"test, {cal.method} (fit on {fit_on})": test_c}, test_y,
                            out_dir / "reliability.png",
                            title or f"Student confidence on the test set ({len(test_p)} queries)")
    report = CalibrationReport(
        method=cal.method, fit_on=fit_on, chosen_on=chosen_on, n_fit=len(fit_p), accuracy_fit=float(fit_y.mean()),
        ece_fit_before=float(cal.ece_before or 0), ece_fit_after=float(cal.ece_after or 0),
        n_devset=len(dev_p), n_testset=len(test_p), accuracy_devset=float(dev_y.mean()),
        accuracy_testset=float(test_y.mean()), ece_devset_before=expected_calibration_error(dev_p, dev_y),
        ece_devset_after=expected_calibration_error(dev_c, dev_y),
        ece_testset_before=expected_calibration_error(test_p, test_y),
        ece_testset_after=expected_calibration_error(test_c, test_y),
        ece_testset_noise_floor=ece_noise_floor(test_c), threshold=choice.threshold,
        threshold_target=choice.target, threshold_reached=choice.reached, threshold_max_fallback=max_fallback,
        threshold_rule=choice.rule(),
        devset_cascade_accuracy=choice.accuracy, devset_fallback_share=choice.fallback_share,
        budget_share=choice.budget_share, budget_n=choice.budget_n, budget_bound=choice.budget_bound,
        budget_confidence=choice.budget_confidence, testset_fallback_share=float(1 - kept.mean()),
        testset_student_accuracy_kept=float(test_y[kept].mean()) if kept.any() else None, plot=str(plot))
    params = CascadeParams(threshold=choice.threshold, calibration=cal, chosen_on=chosen_on, target=choice.target,
                           devset_accuracy=choice.accuracy, devset_fallback_share=choice.fallback_share)
    params.save(out_dir / "cascade.json")
    (out_dir / "calibration.json").write_text(report.model_dump_json(indent=2))
    return report, params
