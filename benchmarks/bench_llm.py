"""Latency and throughput of the local teacher endpoint vs. a direct in-process llama-cpp-python call.

    .venv/bin/python benchmarks/bench_llm.py [--profile local] [--requests 32]

Both sides get the same requests: the IntentClassification prompt as DSPy formats it, constrained by
the label schema. The serving layer's overhead is reported as a ratio (served / direct).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, Callable

import httpx
from dspy.adapters.json_adapter import _get_structured_outputs_response_format
from rich.console import Console
from rich.table import Table

from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.evaluation.latency import latency_summary, write_result
from distill.lm import CompactJSONAdapter
from distill.program import make_signature
from distill.serving.control import load_serve_config, serving
from distill.serving.llm import ChatCompletionRequest, LlamaCppEngine, LLMAppArgs


def build_requests(profile: str, n: int) -> tuple[list[dict[str, Any]], Any]:
    cfg = load_config(profile)
    data = prepare_data(cfg)
    sig = make_signature(data.labels)
    schema = _get_structured_outputs_response_format(sig).model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "DSPyProgramOutputs", "schema": schema, "strict": True}}
    bodies = [
        {
            "model": cfg.models.teacher.model,
            "messages": CompactJSONAdapter().format(sig, [], {"text": ex.text}),
            "temperature": 0.0,
            "max_tokens": cfg.models.teacher.max_tokens,
            "response_format": fmt,
        }
        for ex in data.test[:n]
    ]
    return bodies, cfg


def measure(call: Callable[[dict[str, Any]], None], bodies: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    lat: list[float] = []

    async def run() -> float:
        sem = asyncio.Semaphore(concurrency)

        async def one(b: dict[str, Any]) -> None:
            async with sem:
                t = time.perf_counter()
                await asyncio.to_thread(call, b)
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0

    wall = asyncio.run(run())
    return {**latency_summary(lat), "req_per_s": round(len(bodies) / wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,8")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    bodies, cfg = build_requests(args.profile, args.requests)
    results: dict[str, dict[int, dict[str, float]]] = {"served": {}, "direct": {}}

    lm_cfg = cfg.models.teacher
    serve_cfg = cfg.path(lm_cfg.serve_config)
    with serving(serve_cfg, lm_cfg.api_base, models=[lm_cfg.model]):
        client = httpx.Client(timeout=120)

        def served(body: dict[str, Any]) -> None:
            r = client.post(f"{lm_cfg.api_base}/chat/completions", json=body)
            r.raise_for_status()
            json.loads(r.json()["choices"][0]["message"]["content"])

        served(bodies[0])  # warm the prefix cache
        for c in levels:
            results["served"][c] = measure(served, bodies, c)

    # The same engine in-process, no Ray and no HTTP: its own executor runs one generation at a time.
    engine = LlamaCppEngine(LLMAppArgs.model_validate(load_serve_config(serve_cfg)["applications"][0]["args"]))

    def direct(body: dict[str, Any]) -> None:
        out = asyncio.run(engine.chat(ChatCompletionRequest.model_validate(body)))
        json.loads(out["choices"][0]["message"]["content"])

    direct(bodies[0])
    for c in levels:
        results["direct"][c] = measure(direct, bodies, c)

    table = Table(title=f"local teacher ({lm_cfg.model}), {len(bodies)} classification requests per level")
    for col in ("concurrency", "served p50 s", "served p95 s", "served req/s", "direct p50 s", "direct req/s",
                "overhead (served/direct p50)"):
        table.add_column(col, justify="right")
    for c in levels:
        s, d = results["served"][c], results["direct"][c]
        table.add_row(str(c), f"{s['p50_s']:.3f}", f"{s['p95_s']:.3f}", f"{s['req_per_s']:.2f}",
                      f"{d['p50_s']:.3f}", f"{d['req_per_s']:.2f}", f"{s['p50_s'] / d['p50_s']:.2f}x")
    Console(width=150).print(table)
    print(f"wrote {write_result(cfg, 'llm', {'model': lm_cfg.model, 'requests': len(bodies), **results})}")


if __name__ == "__main__":
    main()
