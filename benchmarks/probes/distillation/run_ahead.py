"""Closed-set decoding with and without running ahead along a branch's usual choice (distill.serving.choices).

    .venv/bin/python benchmarks/probes/distillation/run_ahead.py --profile local_full --queries 100

The finetune's serve config is loaded in process (no Ray, no HTTP: what the served call adds is
call_overhead.py's). The finetuned student answers the same test queries, with the compact prompt and the
label schema DSPy sends, alternately with running ahead on and off, query by query. Prints and writes the
p50 per call, forward passes per answer, and how long building the answers' trie takes (kept per answer
set since running ahead came in) to <artifacts>/bench/run_ahead.json.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from dspy.adapters.json_adapter import _get_structured_outputs_response_format

import distill.serving.choices as choices
from distill.evaluation.latency import latency_summary, write_result
from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.lm import CompactPromptAdapter
from distill.program import make_signature
from distill.serving.control import load_serve_config
from distill.serving.llm import ChatCompletionRequest, LLMAppArgs, LlamaCppEngine, choices_for, grammar_for
from distill.stages.finetune import FinetuneManifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local_full")
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    cfg = load_config(args.profile)
    data = prepare_data(cfg)
    ft = FinetuneManifest.model_validate_json((cfg.artifacts / "finetune" / "manifest.json").read_text())
    engine = LlamaCppEngine(LLMAppArgs.model_validate(load_serve_config(Path(ft.serve_config))["applications"][0]["args"]))
    llama = engine.llamas[ft.model]
    sig = make_signature(data.labels)
    schema = _get_structured_outputs_response_format(sig).model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "DSPyProgramOutputs", "schema": schema, "strict": True}}
    reqs = [ChatCompletionRequest.model_validate({
        "model": ft.model, "messages": CompactPromptAdapter().format(sig, [], {"text": ex.text}),
        "temperature": 0.0, "max_tokens": 64, "response_format": fmt}) for ex in data.test[: args.queries + 1]]

    passes: list[int] = []
    forward = llama._forward

    def counting(tokens, ahead=()):  # noqa: ANN001, ANN202 -- the engine's own forward, counted
        passes.append(1)
        return forward(tokens, ahead)

    llama._forward = counting  # type: ignore[method-assign]
    run_ahead = choices.SPECULATE_AFTER
    times: dict[str, list[float]] = {"on": [], "off": []}
    n_passes: dict[str, list[int]] = {"on": [], "off": []}
    answers: dict[str, list[str]] = {"on": [], "off": []}

    def call(req: ChatCompletionRequest) -> tuple[float, int, str]:
        passes.clear()
        t0 = time.perf_counter()
        out = engine._generate(req, grammar_for(req.response_format), threading.Event())
        return time.perf_counter() - t0, len(passes), out["choices"][0]["message"]["content"]

    call(reqs[0])  # the shared prefix into the KV cache
    for i, req in enumerate(reqs[1:]):
        for mode in (("on", "off") if i % 2 else ("off", "on")):
            choices.SPECULATE_AFTER = run_ahead if mode == "on" else 10**9
            call(reqs[i])  # the previous query first, so both modes find the same KV cache
            took, p, text = call(req)
            times[mode].append(took)
            n_passes[mode].append(p)
            answers[mode].append(text)
    choices.SPECULATE_AFTER = run_ahead

    ans = choices_for(reqs[0])
    assert ans is not None
    t0 = time.perf_counter()
    for _ in range(20):
        choices.ChoiceTrie(ans, lambda s: llama.tokenize(s.encode(), add_bos=False, special=False))
    trie_s = (time.perf_counter() - t0) / 20

    result = {
        "queries": args.queries, "model": ft.model, "answers_in_set": len(ans), "trie_build_s": round(trie_s, 4),
        **{mode: {**latency_summary(times[mode]), "passes_per_answer": round(statistics.mean(n_passes[mode]), 2)}
           for mode in times},
        "same_answer": sum(a == b for a, b in zip(answers["on"], answers["off"])),
    }
    on, off = result["on"], result["off"]
    print(f"running ahead on:  p50 {on['p50_s']:.3f} s, {on['passes_per_answer']} passes per answer")
    print(f"running ahead off: p50 {off['p50_s']:.3f} s, {off['passes_per_answer']} passes per answer")
    print(f"same answer {result['same_answer']}/{args.queries}; building the trie of {len(ans)} answers: "
          f"{trie_s * 1000:.1f} ms")
    print(f"wrote {write_result(cfg, 'run_ahead', result)}")


if __name__ == "__main__":
    main()
