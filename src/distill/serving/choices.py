"""Finite-choice decoding: a response schema that admits a closed set of answers is decoded over their tokens.

A classifier's schema -- an object whose one property is a string enum (what DSPy's JSONAdapter sends for
a `Literal` output field) or a bare string enum -- admits a handful of answers. llama.cpp's grammar
sampler would produce one of them a token at a time, running a forward pass per token even where the
grammar leaves a single choice, and checking all vocabulary entries (49k for SmolLM2) against the grammar
at every step, which on CPU costs about as much as the forward pass itself.

Here the answers are rendered the way `json.dumps` writes them, on one line (the student's SFT answers)
and indented (DSPy's JSONAdapter prompts), and tokenized once into a trie. Only a branch of the trie
needs the model: the tokens before it are fed in one batch with the next forward pass, and once the
tokens chosen so far fit a single answer, the rest of it is written without running the model. A branch takes the
allowed token with the highest logit -- or samples among the allowed tokens at temperature > 0 -- so the
answer is always one the schema admits.

A pass has a fixed cost (on CPU, reading all the weights once) on top of its cost per token. So where a
branch has gone the same way several times running (which spelling a model writes, say), the pass that
decides it also evaluates the tokens up to the next branch: when the branch goes that way again, the next
branch's logits are already there and one pass is saved; when it does not, those few tokens are dropped.
Either way every pick is made on the logits of exactly the tokens before it, as step by step (a batch of
another shape may round the logits differently in the last digits, as any change of batch does in llama.cpp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, MutableMapping, Sequence

import numpy as np

# Keywords that do not narrow a string enum; any other (pattern, maxLength, ...) sends the schema to the grammar.
_ANNOTATIONS = {"title", "description"}


def answers_for(schema: dict[str, Any]) -> list[str] | None:
    """The JSON texts to decode over when `schema` admits a closed set of strings (else None: use the grammar).

    A string `enum`/`const`, or an object with exactly one property, required, that is one. Answers are
    rendered as `json.dumps` renders them; the schema admits other whitespace too, which this decoder
    never produces.
    """
    if (values := _strings(schema)) is not None:
        return [json.dumps(v, ensure_ascii=False) for v in values]
    props = schema.get("properties")
    if (schema.get("type") != "object" or not isinstance(props, dict) or len(props) != 1
            or set(schema) - _ANNOTATIONS - {"type", "properties", "required", "additionalProperties"}):
        return None
    ((name, prop),) = props.items()
    if list(schema.get("required", [])) != [name] or (values := _strings(prop)) is None:
        return None
    # Both spellings: one line (how the compact prompt's SFT answers are written) and indented (how
    # DSPy's JSONAdapter shows outputs in its prompts); the model's first token picks one.
    return [json.dumps({name: v}, ensure_ascii=False, indent=indent) for indent in (None, 2) for v in values]


def _strings(schema: Any) -> list[str] | None:
    if not isinstance(schema, dict) or schema.get("type", "string") != "string":
        return None
    if set(schema) - _ANNOTATIONS - {"type", "enum", "const"}:
        return None
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if not values or not all(isinstance(v, str) for v in values):
        return None
    return list(dict.fromkeys(values))


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    answer: str | None = None  # set where an answer's tokens end


class ChoiceTrie:
    """The answers' token sequences, merged on their common prefixes."""

    def __init__(self, answers: Sequence[str], tokenize: Callable[[str], list[int]]) -> None:
        if not answers:
            raise ValueError("no answers to decode over")
        self.root = _Node()
        self.longest = 0  # tokens of the longest answer
        for answer in answers:
            tokens = tokenize(answer)
            node = self.root
            for t in tokens:
                node = node.children.setdefault(t, _Node())
            # Two JSON texts never tokenize so that one is a prefix of the other: each ends with a
            # character (`"` or `}`) that cannot occur unescaped inside the other.
            node.answer = answer
            self.longest = max(self.longest, len(tokens))


@dataclass
class Decoded:
    answer: str | None  # None: stopped before an answer was decided
    tokens: list[int]  # the answer's tokens (or those decided before the stop)
    forward_passes: int
    # Per token of `tokens`: its log-probability under the model restricted to the answers (a softmax over
    # the allowed tokens at a branch, at temperature 1; 0.0 where the answer leaves one token), and that
    # distribution over the allowed tokens. The answer's probability is exp(sum(logprobs)).
    logprobs: list[float] = field(default_factory=list)
    alternatives: list[dict[int, float]] = field(default_factory=list)

    @property
    def probability(self) -> float:
        """The chosen answer's probability among the answers: the product of its branch probabilities."""
        return float(np.exp(sum(self.logprobs)))


# forward(tokens, ahead): the next-token logits after `tokens`, and, when `ahead` is not empty, after
# `tokens + ahead` too, from the same pass.
Forward = Callable[[list[int], Sequence[int]], Sequence[np.ndarray]]
# What each branch chose last, and how many times running: keyed by the answer tokens before the branch.
Streaks = MutableMapping[tuple[int, ...], tuple[int, int]]
SPECULATE_AFTER = 3  # same pick this many times running: evaluate the way to the next branch with it


def decode(trie: ChoiceTrie, prompt: Sequence[int], forward: Forward,
           temperature: float = 0.0, top_p: float = 1.0, rng: np.random.Generator | None = None,
           stopped: Callable[[], bool] = lambda: False, streaks: Streaks | None = None) -> Decoded:
    """Walk `trie` after `prompt`, running `forward` at its branches.

    `stopped()` is read before each forward pass, so an abandoned request runs no further pass. `streaks`
    (kept across calls by the caller, for one model) lets a pass run ahead along a branch's usual choice.
    """
    node, out, passes = trie.root, [], 0
    logprobs: list[float] = []
    alternatives: list[dict[int, float]] = []

    def forced(token: int) -> None:
        logprobs.append(0.0)
        alternatives.append({token: 0.0})

    ready: np.ndarray | None = None  # this branch's logits, computed ahead by the previous pass
    while node.answer is None:
        if len(node.children) == 1:
            (token,) = node.children
            out.append(token)
            forced(token)
            node = node.children[token]
            continue
        ahead: list[int] = []
        key = tuple(out)
        usual, times = streaks.get(key, (None, 0)) if streaks is not None else (None, 0)
        if ready is not None:
            logits, ready, after = ready, None, None
        else:
            if stopped():
                return Decoded(None, out, passes, logprobs, alternatives)
            if times >= SPECULATE_AFTER and usual in node.children:
                ahead = _to_next_branch(node, usual)
            computed = forward([*prompt, *out], ahead)
            passes += 1
            logits, after = computed[0], (computed[1] if ahead else None)
        token = _pick(logits, list(node.children), temperature, top_p, rng)
        branch = _log_softmax(logits, list(node.children))
        logprobs.append(branch[token])
        alternatives.append(branch)
        if streaks is not None:
            streaks[key] = (token, times + 1 if token == usual else 1)
        if ahead and token == ahead[0]:  # went the usual way: the next branch's logits are ready
            for t in ahead:
                node = node.children[t]
            out.extend(ahead)
            for t in ahead[1:]:
                forced(t)
            ready = after
        else:
            out.append(token)
            node = node.children[token]
    return Decoded(node.answer, out, passes, logprobs, alternatives)


def _log_softmax(logits: np.ndarray, allowed: list[int]) -> dict[int, float]:
    """The model's distribution (temperature 1) renormalised over the tokens the answers allow here."""
    scores = np.asarray(logits, dtype=np.float64)[allowed]
    scores = scores - scores.max()
    scores -= np.log(np.exp(scores).sum())
    return {t: float(v) for t, v in zip(allowed, scores)}


def _to_next_branch(node: _Node, token: int) -> list[int]:
    """`token` and the forced tokens after it, up to the next branch; [] if an answer ends first (then
    nothing after this pick needs the model)."""
    path, node = [token], node.children[token]
    while node.answer is None and len(node.children) == 1:
        (t,) = node.children
        path.append(t)
        node = node.children[t]
    return [] if node.answer is not None else path


def _pick(logits: np.ndarray, allowed: list[int], temperature: float, top_p: float,
          rng: np.random.Generator | None) -> int:
    scores = np.asarray(logits, dtype=np.float64)[allowed]
    if temperature <= 0:
        return allowed[int(np.argmax(scores))]
    p = np.exp((scores - scores.max()) / temperature)
    p /= p.sum()
    if top_p < 1.0:  # nucleus among the allowed tokens: the fewest, most likely ones holding top_p
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        p = np.where(np.isin(np.arange(len(p)), keep), p, 0.0)
        p /= p.sum()
    return allowed[int((rng or np.random.default_rng()).choice(len(allowed), p=p))]
