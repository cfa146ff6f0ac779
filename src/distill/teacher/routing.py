"""`teacher.vote_confidence: auto`: the vote/LLM routing threshold chosen by leave-one-out on the gold labels.

For every gold example we know, without its own label: the vote's top label and its confidence (the vote
refitted without the example), and the LLM's answer (shown demonstrations that leave the example out,
restricted to that vote's shortlist). A threshold t routes an example to the vote when its confidence is
above t, else to the LLM -- exactly `HybridTeacher`'s rule -- so every t has a leave-one-out accuracy and
an LLM share computed from the same answers, with no further LLM call. The grid is 0 (the vote alone),
every distinct confidence in between, and 1 (the LLM always: no probability is above 1). The choice is the
best accuracy, ties going to the smaller LLM share (cheaper); since the share only grows with t, that is
the smallest threshold among the best.

`curation.min_confidence: auto` follows from the same table (`curation_floor`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import dspy
from pydantic import BaseModel

from distill.calls import is_call_failure, is_unreachable, unreachable
from distill.lm import using
from distill.teacher.program import HybridTeacher, embed

VOTE_ALONE = 0.0
LLM_ALWAYS = 1.0
ROUND = 4  # thresholds and recorded confidences carry 4 decimals


@dataclass(frozen=True)
class GoldRoute:
    """One gold example under leave-one-out: its label, the vote's answer and confidence, the LLM's answer."""

    label: str
    vote: str
    confidence: float
    llm: str | None  # None: the call failed (scored wrong)


class GridPoint(BaseModel):
    threshold: float
    accuracy: float  # leave-one-out on gold, 0-1
    llm_share: float  # share of the gold examples the LLM answers at this threshold


class Routing(BaseModel):
    """What `auto` chose and its evidence (the teacher's manifest carries it)."""

    vote_confidence: float  # the threshold the teacher labels with
    chosen_by: str  # "auto": chosen on gold here; "profile": the profile's number (the grid is then evidence only)
    accuracy_gold: float  # leave-one-out accuracy at vote_confidence
    llm_share_gold: float
    n_gold: int
    llm_failures: int  # LLM calls that failed in the leave-one-out pass (scored wrong)
    grid: list[GridPoint]
    # The LLM's leave-one-out accuracy on the gold examples it answers at vote_confidence (None: it answers none)
    llm_band_accuracy: float | None
    llm_band_n: int
    min_confidence: float | None = None  # curation's floor when curation.min_confidence is auto
    seconds: float = 0.0


def grid(routes: Sequence[GoldRoute]) -> list[GridPoint]:
    thresholds = sorted({VOTE_ALONE, LLM_ALWAYS} | {round(r.confidence, ROUND) for r in routes})
    return [point(routes, t) for t in thresholds]


def point(routes: Sequence[GoldRoute], t: float) -> GridPoint:
    n = max(1, len(routes))
    to_llm = [r.confidence <= t for r in routes]  # HybridTeacher: the vote answers when confidence > t
    right = sum((r.llm == r.label) if llm else (r.vote == r.label) for r, llm in zip(routes, to_llm))
    return GridPoint(threshold=t, accuracy=round(right / n, ROUND), llm_share=round(sum(to_llm) / n, ROUND))


def choose(points: Sequence[GridPoint]) -> GridPoint:
    """The best leave-one-out accuracy; ties to the smaller LLM share, then the smaller threshold."""
    return min(points, key=lambda p: (-p.accuracy, p.llm_share, p.threshold))


def band(routes: Sequence[GoldRoute], t: float) -> tuple[float | None, int]:
    """The LLM's accuracy on the gold examples it answers at threshold t, and how many."""
    mine = [r for r in routes if r.confidence <= t]
    return (round(sum(r.llm == r.label for r in mine) / len(mine), ROUND) if mine else None), len(mine)


def curation_floor(routes: Sequence[GoldRoute], t: float) -> float:
    """`curation.min_confidence: auto`: drop the labels the LLM gives when, on gold, its answers in its band
    (confidence <= t) were more often wrong than right; otherwise keep every label (floor 0).

    The threshold already gives each band to the better of the two sources; what is left to decide is
    whether the LLM's band is worth learning from at all. A label more likely wrong than right teaches the
    student more wrong than right, so it goes; a strong LLM's band stays. The floor is one step of the
    recorded confidences' rounding above t: curation keeps `confidence >= floor`, and every label the LLM
    gave has a confidence <= t.
    """
    accuracy, n = band(routes, t)
    return round(t + 10 ** -ROUND, ROUND) if n and accuracy is not None and accuracy < 0.5 else 0.0


def loo_routes(teacher: HybridTeacher, lm: dspy.LM, examples: Sequence[dspy.Example], threads: int,
               ) -> list[GoldRoute]:
    """Every gold example's leave-one-out vote and LLM answer (one LLM call each, cached by DSPy).

    `teacher` must be built with `exclude_identical=True`. A dead endpoint stops the pass with
    `EndpointUnreachable` naming the URL; a bug in our code propagates as itself; any other failed call
    (the server's error answer, an unparseable answer) counts as a wrong LLM answer.
    """
    assert teacher.exclude_identical, "leave-one-out needs a teacher built with exclude_identical=True"
    vectors = embed(teacher.index.embedder, [ex.text for ex in examples])
    always = HybridTeacher(teacher.program, teacher.index, teacher.vote, teacher.k, teacher.candidate_m,
                           vote_confidence=LLM_ALWAYS, exclude_identical=True)

    def one(i: int) -> GoldRoute:
        ex = examples[i]
        shortlist, confidence = teacher.shortlist(ex.text, vectors[i])
        try:
            with using(lm):
                answer = always(text=ex.text).label
        except Exception as e:
            if not is_call_failure(e):
                raise
            if is_unreachable(e):
                raise unreachable(lm.kwargs.get("api_base"), e) from e
            answer = None
        return GoldRoute(ex.label, shortlist[0], confidence, answer)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(len(examples))))


def choose_routing(routes: Sequence[GoldRoute], fixed: float | None = None, seconds: float = 0.0,
                   floor_auto: bool = False, floor_fixed: float | None = None) -> Routing:
    """The routing report: the grid, the point chosen (or the profile's `fixed` threshold), and curation's floor."""
    points = grid(routes)
    chosen = choose(points) if fixed is None else point(routes, fixed)
    acc, n_band = band(routes, chosen.threshold)
    floor = curation_floor(routes, chosen.threshold) if floor_auto else floor_fixed
    return Routing(vote_confidence=chosen.threshold, chosen_by="auto" if fixed is None else "profile",
                   accuracy_gold=chosen.accuracy, llm_share_gold=chosen.llm_share, n_gold=len(routes),
                   llm_failures=sum(r.llm is None for r in routes), grid=points, llm_band_accuracy=acc,
                   llm_band_n=n_band, min_confidence=floor, seconds=round(seconds, 1))


def tune_routing(teacher: HybridTeacher, lm: dspy.LM, examples: Sequence[dspy.Example], threads: int,
                 fixed: float | None = None, floor_auto: bool = False, floor_fixed: float | None = None) -> Routing:
    t0 = time.perf_counter()
    routes = loo_routes(teacher, lm, examples, threads)
    return choose_routing(routes, fixed, time.perf_counter() - t0, floor_auto, floor_fixed)


def grid_line(r: Routing) -> str:
    """One line for the console: the grid's ends and the choice."""
    ends = {p.threshold: p for p in r.grid}
    alone, always = ends[VOTE_ALONE], ends[LLM_ALWAYS]
    return (f"routing on {r.n_gold} gold (leave-one-out): vote alone {alone.accuracy:.1%}, LLM always "
            f"{always.accuracy:.1%}; {'chosen' if r.chosen_by == 'auto' else 'profile'} vote_confidence "
            f"{r.vote_confidence:g}: {r.accuracy_gold:.1%} with the LLM on {r.llm_share_gold:.0%}"
            + (f" ({len(r.grid)} thresholds tried)" if r.chosen_by == "auto" else ""))
