"""Which response schemas are decoded as a closed set of answers (distill.serving.choices), and how a
branch is picked. The decoding itself runs against the real model in test_serving_engine.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill.serving.choices import SPECULATE_AFTER, ChoiceTrie, _pick, answers_for, decode

ENUM = {"type": "string", "enum": ["a_b", "a_c", "d"]}
DSPY_LIKE = {"type": "object", "title": "Outputs", "additionalProperties": False, "required": ["label"],
             "properties": {"label": {"type": "string", "enum": ["x", "y"], "title": "Label"}}}


def test_closed_sets_give_their_renderings() -> None:
    assert answers_for(ENUM) == ['"a_b"', '"a_c"', '"d"']
    assert answers_for({"const": "only"}) == ['"only"']
    answers = answers_for(DSPY_LIKE)
    assert answers == ['{"label": "x"}', '{"label": "y"}', '{\n  "label": "x"\n}', '{\n  "label": "y"\n}']
    assert [json.loads(a) for a in answers] == [{"label": "x"}, {"label": "y"}] * 2


@pytest.mark.parametrize("schema", [
    {"type": "string"},  # free text
    {"type": "string", "enum": ["a", "b"], "pattern": "a"},  # a keyword that narrows the enum further
    {"type": "integer", "enum": [1, 2]},
    {"enum": ["a", 1]},
    {"type": "string", "enum": []},
    {"type": "object", "properties": {"label": ENUM}},  # not required: `{}` is an answer too
    {"type": "object", "properties": {"label": ENUM, "why": {"type": "string"}}, "required": ["label", "why"]},
    {"type": "object", "properties": {"label": {"$ref": "#/$defs/L"}}, "required": ["label"]},
    {"type": "array", "items": ENUM},
])
def test_other_schemas_go_to_the_grammar(schema: dict) -> None:
    assert answers_for(schema) is None


def _chars(s: str) -> list[int]:
    return [ord(c) for c in s]


def test_decode_runs_the_model_only_at_branches() -> None:
    trie = ChoiceTrie(["ab", "ac", "d"], _chars)
    calls: list[list[int]] = []

    def forward(tokens: list[int], ahead: list[int]) -> list[np.ndarray]:
        calls.append(tokens)
        assert not ahead  # no streaks given: never runs ahead
        logits = np.zeros(128)
        logits[ord("a")], logits[ord("c")] = 2.0, 1.0  # `a` over `d`, then `c` over `b`
        return [logits]

    out = decode(trie, [1, 2], forward)
    assert out.answer == "ac" and out.tokens == _chars("ac") and out.forward_passes == 2
    assert calls == [[1, 2], [1, 2, ord("a")]]
    # one answer: nothing to decide, no forward pass at all
    assert decode(ChoiceTrie(["zz"], _chars), [1], forward).forward_passes == 0
    # a request abandoned before a branch runs no pass and returns no answer
    stopped = decode(trie, [1], forward, stopped=lambda: True)
    assert stopped.answer is None and stopped.forward_passes == 0


class Scripted:
    """A model whose preference at each position is scripted: `prefer[i]` is the character it puts first
    after i answer characters. Records each pass as (tokens, ahead)."""

    def __init__(self, prefer: str, prompt_len: int) -> None:
        self.prefer, self.prompt_len, self.passes = prefer, prompt_len, []

    def logits(self, tokens: list[int]) -> np.ndarray:
        out = np.zeros(128)
        out[ord(self.prefer[len(tokens) - self.prompt_len])] = 1.0
        return out

    def __call__(self, tokens: list[int], ahead: list[int]) -> list[np.ndarray]:
        self.passes.append((tokens, list(ahead)))
        return [self.logits(tokens)] + ([self.logits([*tokens, *ahead])] if ahead else [])


def test_a_branch_that_keeps_going_one_way_is_run_ahead_without_changing_the_answer() -> None:
    # A branch between `x` and `y` (a spelling, say), forced `:a`, then a branch between `b` and `c`.
    trie = ChoiceTrie(["x:ab", "x:ac", "y:ab", "y:ac"], _chars)
    streaks: dict = {}
    model = Scripted("x:ab", prompt_len=1)
    for _ in range(SPECULATE_AFTER):  # the streak builds up: a pass per branch
        model.passes.clear()
        assert decode(trie, [0], model, streaks=streaks).answer == "x:ab"
        assert model.passes == [([0], []), ([0, *_chars("x:a")], [])]
    model.passes.clear()
    out = decode(trie, [0], model, streaks=streaks)
    # The first pass also evaluates `x:a`, giving the second branch's logits: one pass instead of two.
    assert out.answer == "x:ab" and out.forward_passes == 1 and model.passes == [([0], _chars("x:a"))]
    # The model goes the other way at the first branch: the run-ahead is dropped, the answer follows the model.
    other = Scripted("y:ac", prompt_len=1)
    out = decode(trie, [0], other, streaks=streaks)
    assert out.answer == "y:ac" and out.forward_passes == 2
    assert other.passes == [([0], _chars("x:a")), ([0, *_chars("y:a")], [])]  # `c` picked after `y`, not `x`
    assert streaks[()] == (ord("y"), 1)  # the streak starts over


def test_pick_greedy_and_sampled() -> None:
    logits = np.array([0.0, 5.0, 4.0, 9.0])
    assert _pick(logits, [0, 1, 2], 0.0, 1.0, None) == 1  # the best allowed, not the best overall
    rng = np.random.default_rng(0)
    draws = {_pick(logits, [0, 1, 2], 1.0, 1.0, rng) for _ in range(200)}
    assert draws <= {0, 1, 2} and {1, 2} <= draws
    # top_p keeps only the most likely allowed token when it holds enough of the mass
    assert {_pick(logits, [0, 1, 2], 1.0, 0.5, rng) for _ in range(50)} == {1}


def test_the_answer_probability_is_the_product_of_its_branch_probabilities_run_ahead_or_not() -> None:
    # Scripted puts logit 1 on its preferred character, 0 elsewhere: each two-way branch gives e/(e+1).
    trie = ChoiceTrie(["x:ab", "x:ac", "y:ab", "y:ac"], _chars)
    p_branch = np.e / (np.e + 1)
    streaks: dict = {}
    for i in range(SPECULATE_AFTER + 1):  # the last one runs ahead: the same numbers from fewer passes
        out = decode(trie, [0], Scripted("x:ab", prompt_len=1), streaks=streaks)
        assert out.probability == pytest.approx(p_branch ** 2)
        assert len(out.logprobs) == len(out.alternatives) == len(out.tokens) == 4
        assert out.logprobs[1:3] == [0.0, 0.0]  # `:a` is forced
        assert set(out.alternatives[0]) == {ord("x"), ord("y")}
        assert sum(np.exp(v) for v in out.alternatives[3].values()) == pytest.approx(1.0)
    assert out.forward_passes == 1
    # A sampled answer carries the probability of the answer actually taken, likely or not.
    rng = np.random.default_rng(0)
    outs = [decode(trie, [0], Scripted("x:ab", prompt_len=1), temperature=5.0, rng=rng) for _ in range(40)]
    unlikely = [o for o in outs if o.answer == "y:ac"]
    assert unlikely and all(o.probability == pytest.approx((1 - p_branch) ** 2) for o in unlikely)
