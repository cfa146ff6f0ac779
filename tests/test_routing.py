"""`teacher.vote_confidence: auto`: the routing threshold chosen by leave-one-out on gold, and the errors that
name their real cause (a closed port is "endpoint unreachable", a bug is itself).

Fast: the selection rule on constructed routes; the teacher stage on DSPy's DummyLM (a scripted LLM) with the
real gold embeddings; a closed port. Slow (marked): the grid with the real served SmolLM2 teacher.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM

from distill.calls import CallGuard, EndpointUnreachable, is_call_failure, is_unreachable
from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.errors import ConfigError
from distill.lm import CompactJSONAdapter, make_lm
from distill.stages.curation import CurationStage
from distill.stages.data import DataStage
from distill.stages.teacher import TeacherStage
from distill.teacher.labeling import LabelingStopped, label_queries, read_records, score_teacher
from distill.teacher.program import GoldIndex, HybridTeacher, build_teacher, build_vote, embed
from distill.teacher.routing import (
    LLM_ALWAYS,
    VOTE_ALONE,
    GoldRoute,
    choose,
    choose_routing,
    curation_floor,
    grid,
    loo_routes,
    point,
)
from distill.teacher.vote import LabelVote

slow = pytest.mark.slow


# --- the selection rule, on constructed inputs ------------------------------------------------------


def R(label: str, vote: str, confidence: float, llm: str | None) -> GoldRoute:
    return GoldRoute(label, vote, confidence, llm)


def test_the_grid_runs_from_the_vote_alone_to_the_llm_always() -> None:
    routes = [R("a", "a", 0.9, "b"), R("a", "b", 0.3, "a"), R("b", "a", 0.2, "b"), R("b", "b", 0.6, "a")]
    points = grid(routes)
    assert [p.threshold for p in points] == [0.0, 0.2, 0.3, 0.6, 0.9, 1.0]
    by_t = {p.threshold: p for p in points}
    assert (by_t[VOTE_ALONE].accuracy, by_t[VOTE_ALONE].llm_share) == (0.5, 0.0)  # the vote's 2 of 4
    assert (by_t[LLM_ALWAYS].accuracy, by_t[LLM_ALWAYS].llm_share) == (0.5, 1.0)  # the LLM's 2 of 4
    # 0.3: the two least sure go to the LLM, which is right on both; the vote is right on the other two
    assert (by_t[0.3].accuracy, by_t[0.3].llm_share) == (1.0, 0.5)
    assert choose(points).threshold == 0.3


def test_ties_go_to_the_smaller_llm_share() -> None:
    # The LLM is right exactly where the vote is: every threshold ties, the vote alone is cheapest.
    routes = [R("a", "a", 0.9, "a"), R("b", "a", 0.3, "a"), R("b", "b", 0.5, "b")]
    assert {p.accuracy for p in grid(routes)} == {round(2 / 3, 4)}
    assert choose(grid(routes)).threshold == VOTE_ALONE
    # An LLM right everywhere beats the vote; among the points that send everything to it, the lowest
    # threshold (the highest gold confidence: a surer new query still goes to the vote).
    routes = [R("a", "b", 0.9, "a"), R("b", "a", 0.3, "b")]
    best = choose(grid(routes))
    assert (best.accuracy, best.llm_share, best.threshold) == (1.0, 1.0, 0.9)


def test_routing_is_hybrid_teachers_rule_and_a_profile_number_wins() -> None:
    routes = [R("a", "a", 0.4, "b"), R("a", "b", 0.39, "a")]
    # confidence 0.4 at threshold 0.4 goes to the LLM (the vote answers only above it)
    assert point(routes, 0.4).llm_share == 1.0 and point(routes, 0.39).llm_share == 0.5
    fixed = choose_routing(routes, fixed=0.0)
    assert (fixed.vote_confidence, fixed.chosen_by, fixed.accuracy_gold) == (0.0, "profile", 0.5)
    auto = choose_routing(routes)
    assert (auto.vote_confidence, auto.chosen_by, auto.accuracy_gold) == (0.39, "auto", 1.0)
    assert auto.accuracy_gold == max(p.accuracy for p in auto.grid)
    assert auto.llm_failures == 0 and auto.llm_band_n == 1 and auto.llm_band_accuracy == 1.0


def test_the_curation_floor_drops_the_llms_labels_only_when_they_are_mostly_wrong() -> None:
    weak = [R("a", "a", 0.9, "b"), R("b", "a", 0.2, "c"), R("b", "b", 0.3, "b"), R("c", "a", 0.1, "a")]
    assert curation_floor(weak, 0.3) == 0.3001  # LLM band: 1 of 3 right -> its labels go (all have conf <= 0.3)
    strong = [R("a", "a", 0.9, "a"), R("b", "a", 0.2, "b"), R("b", "c", 0.3, "b")]
    assert curation_floor(strong, 0.3) == 0.0  # 2 of 2 right: kept
    assert curation_floor(weak, VOTE_ALONE) == 0.0  # the LLM answers nothing: nothing to drop
    assert choose_routing(weak, fixed=0.3, floor_auto=True).min_confidence == 0.3001
    assert choose_routing(weak, fixed=0.3, floor_fixed=0.5).min_confidence == 0.5


def test_auto_is_the_default_and_a_number_in_the_profile_wins(tmp_path) -> None:
    cfg = load_config("local")
    assert cfg.teacher.vote_confidence == "auto" and cfg.curation.min_confidence == "auto"
    assert load_config("local", overrides={"teacher": {"vote_confidence": 0.4}}).teacher.vote_confidence == 0.4
    with pytest.raises(ConfigError, match="vote_confidence"):
        load_config("local", overrides={"teacher": {"vote_confidence": "sometimes"}})
    with pytest.raises(ConfigError, match="vote_confidence"):
        load_config("local", overrides={"teacher": {"vote_confidence": 1.5}})


# --- the teacher stage on a scripted LLM, real gold embeddings ---------------------------------------


@pytest.fixture
def cfg(tmp_path, monkeypatch, with_banking77):
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    return load_config("local_ci", overrides={"data": {"num_to_label": 8, "test_size": 25, "devset_size": 3,
                                                       "optimizer_val_size": 2},
                                              "teacher": {"gate_size": 30, "min_accuracy_gold": 0.0},
                                              "curation": {"sft_source": "teacher"},
                                              "evaluation": {"latency_queries": 2}})


class Scripted(TeacherStage):
    """The real teacher stage; DSPy's DummyLM answers `answer[text]` for the query in the prompt."""

    def __init__(self, cfg: Any, data: Any, answer: dict[str, str]) -> None:
        super().__init__(cfg, data)
        self.answer = answer

    def endpoint(self, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def lm(self, lm_cfg: Any, model: str | None = None, cache: bool = True) -> dspy.LM:
        lm = DummyLM({text: {"label": label} for text, label in self.answer.items()}, adapter=CompactJSONAdapter())
        lm.cache = False
        return lm


def _answers(data, right_on_gold: bool) -> dict[str, str]:
    """The scripted LLM: right (or wrong) on every gold query; on the rest, a fixed label."""
    wrong = {ex.text: next(lab for lab in data.labels if lab != ex.label) for ex in data.gold}
    gold = {ex.text: ex.label for ex in data.gold} if right_on_gold else wrong
    return gold | {ex.text: ex.label for ex in data.test} | {ex.text: data.labels[0] for ex in data.to_label}


@pytest.mark.parametrize("llm_right", [True, False])
def test_auto_chooses_on_gold_and_the_gate_scores_the_chosen_teacher(cfg, llm_right) -> None:
    data = DataStage(cfg).data
    DataStage(cfg, data).ensure()
    m = Scripted(cfg, data, _answers(data, llm_right)).ensure()
    r = m.routing
    assert r is not None and r.chosen_by == "auto" and r.n_gold == 30
    thresholds = [p.threshold for p in r.grid]
    assert thresholds[0] == VOTE_ALONE and thresholds[-1] == LLM_ALWAYS and len(thresholds) > 10
    best = max(p.accuracy for p in r.grid)
    assert r.accuracy_gold == best and r.llm_share_gold == min(p.llm_share for p in r.grid if p.accuracy == best)
    assert m.vote_confidence == r.vote_confidence
    # the gate is the chosen teacher
    assert m.accuracy_gold == r.accuracy_gold and m.llm_share_gold == pytest.approx(r.llm_share_gold, abs=1e-4)
    if llm_right:  # an LLM right on every gold query: it answers where the vote is wrong, and its labels are kept
        assert r.accuracy_gold == 1.0 and 0 < r.llm_share_gold < 1.0 and r.min_confidence == 0.0
        assert r.vote_confidence < LLM_ALWAYS  # the vote is right above it: ties go to fewer LLM calls
    else:  # an LLM wrong on every gold query: the vote alone, nothing to drop
        assert r.vote_confidence == VOTE_ALONE and r.llm_share_gold == 0.0 and r.min_confidence == 0.0
        assert {rec["source"] for rec in read_records(TeacherStage(cfg, data).labels_path)} == {"vote"}
    c = CurationStage(cfg, data).ensure()
    assert c.min_confidence == r.min_confidence and c.low_confidence == 0
    assert TeacherStage(cfg, data).program().vote_confidence == r.vote_confidence  # what the stage labeled with


def test_a_number_wins_over_auto_and_the_floor_follows_the_routing(cfg) -> None:
    # More queries and smaller splits than `cfg`: the floor drops about half of the labels
    fixed = load_config("local_ci", overrides={**_overrides(cfg), "teacher": {"gate_size": 30, "min_accuracy_gold": 0.0,
                                                                              "vote_confidence": 0.95},
                                               "data": {"num_to_label": 20, "test_size": 25, "devset_size": 2,
                                                        "optimizer_val_size": 1}})
    data = DataStage(fixed).data
    DataStage(fixed, data).ensure()
    # On the queries it labels, the scripted LLM answers the vote's own top label (one of the labels it may give)
    index = GoldIndex(data.gold, cfg.teacher.embedder)
    vote = build_vote(index, data.labels)
    vecs = embed(cfg.teacher.embedder, [q.text for q in data.to_label])
    tops = {q.text: LabelVote.ranked(vote.model, v)[0][0] for q, v in zip(data.to_label, vecs)}
    m = Scripted(fixed, data, _answers(data, right_on_gold=False) | tops).ensure()
    r = m.routing  # curation.min_confidence auto still needs the LLM's band on gold
    assert r is not None and r.chosen_by == "profile" and m.vote_confidence == r.vote_confidence == 0.95
    assert r.llm_band_n > 0 and r.llm_band_accuracy < 0.5 and r.min_confidence == 0.9501  # mostly wrong: its labels go
    records = read_records(TeacherStage(fixed, data).labels_path)
    c = CurationStage(fixed, data).ensure()
    assert c.low_confidence == sum(rec["source"] == "llm" for rec in records) > 0  # exactly the LLM's labels
    plain = load_config("local_ci", overrides={**_overrides(cfg), "teacher": {"vote_confidence": 0.5},
                                               "curation": {"min_confidence": None}})
    assert TeacherStage(plain, data).routing(None, None, None, []) is None  # a number, no floor: no grid, no calls
    with pytest.raises(ConfigError, match="auto"):
        build_teacher(cfg, data.labels, data.gold)  # auto needs the chosen number


def _overrides(cfg) -> dict[str, Any]:
    return {"data": {"num_to_label": 8, "test_size": 25, "devset_size": 3, "optimizer_val_size": 2},
            "curation": {"sft_source": "teacher"}, "evaluation": {"latency_queries": 2}}


# --- errors name their real cause ----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connections are refused


@pytest.fixture
def dead(cfg):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    return url, make_lm(cfg.models.teacher.model_copy(update={"api_base": url, "timeout_s": 2}), cache=False,
                        num_retries=0)


def test_a_dead_endpoint_during_the_gate_says_unreachable_with_the_url(cfg, dead) -> None:
    url, lm = dead
    data = prepare_data(cfg)
    teacher = build_teacher(cfg, data.labels, data.gold, exclude_identical=True, vote_confidence=1.0)
    with pytest.raises(EndpointUnreachable, match=f"endpoint unreachable: {url}") as e:
        score_teacher(teacher, lm, data.gold[:6], data.labels, threads=2)
    assert "improve the teacher" not in str(e.value)
    assert isinstance(teacher, HybridTeacher)
    with pytest.raises(EndpointUnreachable, match=url):
        loo_routes(teacher, lm, data.gold[:4], threads=2)


def test_labeling_stops_after_n_failures_in_a_row_keeping_what_was_labeled(cfg, dead, tmp_path) -> None:
    url, lm = dead
    data = prepare_data(cfg)
    queries = data.to_label[:8]
    vote_only = build_teacher(cfg, data.labels, data.gold, vote_confidence=0.0)
    assert label_queries(vote_only, lm, queries[:3], tmp_path, fingerprint="t").new == 3  # no LLM call needed
    llm = build_teacher(cfg, data.labels, data.gold, vote_confidence=1.0)
    with pytest.raises(LabelingStopped, match=rf"stopped after 4 failed calls in a row \(endpoint unreachable: "
                                              rf"{url}.*3 of 8 queries are labeled .* rerun to resume"):
        label_queries(llm, lm, queries, tmp_path, threads=1, fingerprint="t", max_consecutive_failures=4)
    assert len(read_records(tmp_path / "labels.jsonl")) == 3  # kept
    assert len(read_records(tmp_path / "errors.jsonl")) == 4  # stopped there, not after every query


class Broken(dspy.Module):
    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(label=text.upper().nonexistent)  # a bug: AttributeError


def test_a_bug_inside_evaluation_propagates_as_itself(cfg) -> None:
    from distill.evaluation.variants import evaluate

    data = prepare_data(cfg)
    lm = make_lm(cfg.models.teacher, cache=False)
    with pytest.raises(AttributeError, match="nonexistent"):
        score_teacher(Broken(), lm, data.gold[:5], data.labels, threads=2)
    with pytest.raises(AttributeError, match="nonexistent"):
        evaluate(Broken(), lm, data.gold[:5], data.labels, threads=2, max_errors=2)
    with pytest.raises(AttributeError, match="nonexistent"):  # also under max_errors
        evaluate(Broken(), lm, data.gold[:1], data.labels, threads=1, max_errors=5)
    with pytest.raises(AttributeError):
        label_queries(Broken(), lm, data.to_label[:3], cfg.artifacts / "bug", fingerprint="t")


def test_the_guard_classifies_failures() -> None:
    from dspy.utils.exceptions import AdapterParseError

    assert is_unreachable(ConnectionRefusedError()) and is_call_failure(ConnectionRefusedError())
    parse = AdapterParseError(adapter_name="JSONAdapter", signature=dspy.Signature("text -> label"), lm_response="x")
    assert is_call_failure(parse) and not is_unreachable(parse)
    assert not is_call_failure(KeyError("label"))
    guard = CallGuard("http://x/v1")
    guard.raise_cause()  # nothing seen: nothing raised


# --- the real served teacher ---------------------------------------------------------------------------


@slow
def test_auto_on_the_real_served_teacher(with_banking77) -> None:
    from distill.serving.control import serving

    cfg = load_config("local_ci")  # vote_confidence auto, gate_size 40
    data = prepare_data(cfg)
    t = cfg.models.teacher
    index = GoldIndex(data.gold, cfg.teacher.embedder)
    vote = build_vote(index, data.labels)
    gold = data.gold[: cfg.teacher.gate_size]
    with serving(cfg.path(t.serve_config), t.api_base, models=[t.model]):
        lm = make_lm(t)  # cached: the gate below replays the routing pass's calls
        loo = build_teacher(cfg, data.labels, data.gold, exclude_identical=True, index=index, vote=vote,
                            vote_confidence=LLM_ALWAYS)
        routes = loo_routes(loo, lm, gold, threads=2)
        r = choose_routing(routes, floor_auto=True)
        assert r.llm_failures == 0
        ends = {p.threshold: p for p in r.grid}
        assert VOTE_ALONE in ends and LLM_ALWAYS in ends and ends[LLM_ALWAYS].llm_share == 1.0
        assert ends[VOTE_ALONE].llm_share == 0.0
        # the vote alone at 0 is the vote's own leave-one-out accuracy
        assert ends[VOTE_ALONE].accuracy == round(sum(x.vote == x.label for x in routes) / len(routes), 4)
        assert r.accuracy_gold == max(p.accuracy for p in r.grid)
        chosen = build_teacher(cfg, data.labels, data.gold, exclude_identical=True, index=index, vote=vote,
                               vote_confidence=r.vote_confidence)
        gate = score_teacher(chosen, lm, gold, data.labels, threads=2)
        assert gate.accuracy == pytest.approx(r.accuracy_gold) and gate.llm_share == pytest.approx(r.llm_share_gold)
        # a number in the profile wins over auto
        fixed = load_config("local_ci", overrides={"teacher": {"vote_confidence": 0.4}})
        assert build_teacher(fixed, data.labels, data.gold, index=index, vote=vote).vote_confidence == 0.4
        assert choose_routing(routes, fixed=0.4).vote_confidence == 0.4
