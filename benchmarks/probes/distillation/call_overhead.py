"""Where a served call's time goes: the same requests timed at each layer of the product path.

    .venv/bin/python benchmarks/probes/distillation/call_overhead.py --profile local_full --queries 41

(from the checkout whose artifacts it reads: it needs the profile's finetune and evaluation stages).

For the deployed student program and the teacher's LLM path (every query through its LLM), each query is
timed (a) as the DSPy program call, as the stages time it; (b) as the `dspy.LM` call with the messages
and arguments the program sent (litellm + HTTP); (c) as a plain HTTP POST of that body to the served
OpenAI endpoint (Ray Serve's proxy + the LLM application); (d) in-process on the same engine, no Ray, no
HTTP. Interleaved query by query, so all layers see the same machine. Writes <artifacts>/bench/call_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from distill.evaluation.latency import latency_summary, write_result
from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.lm import make_lm, using
from distill.program import DeployParams
from distill.serving.control import load_serve_config, serving
from distill.serving.llm import ChatCompletionRequest, LLMAppArgs, LlamaCppEngine
from distill.stages.finetune import FinetuneManifest
from distill.teacher.program import HybridTeacher, build_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local_full")
    ap.add_argument("--queries", type=int, default=40)
    args = ap.parse_args()
    cfg = load_config(args.profile)
    data = prepare_data(cfg)
    test = data.test[: args.queries]
    ft = FinetuneManifest.model_validate_json((cfg.artifacts / "finetune" / "manifest.json").read_text())
    params = DeployParams.load(cfg.artifacts / "deploy_params.json")
    serve_path = Path(ft.serve_config)
    serve_cfg = yaml.safe_load(serve_path.read_text())
    base_model = serve_cfg["applications"][0]["args"]["models"][0]["name"]
    teacher = build_teacher(cfg, data.labels, data.gold)
    assert isinstance(teacher, HybridTeacher)
    always_llm = HybridTeacher(teacher.program, teacher.index, teacher.vote, teacher.k, teacher.candidate_m,
                               vote_confidence=1.0)
    runs = {"student": (params.load_program(), params.model, params.program.prompt),
            "teacher_llm": (always_llm, base_model, "full")}
    st = cfg.models.student
    times: dict[str, dict[str, list[float]]] = {r: {"program": [], "lm": [], "http": [], "engine": []} for r in runs}
    with serving(serve_path, st.api_base, models=[params.model, base_model]):
        client = httpx.Client(timeout=120)
        lms = {r: make_lm(st, model=m, cache=False) for r, (_, m, _) in runs.items()}
        for r, (prog, _, prompt) in runs.items():  # warm-up: the shared prefix in the KV cache
            with using(lms[r], prompt):
                prog(**test[0].inputs())
        # The same engine in this process, no Ray and no HTTP (a second copy of the models; the calls are
        # sequential, so the two never compete for the cores).
        engine = LlamaCppEngine(LLMAppArgs.model_validate(load_serve_config(serve_path)["applications"][0]["args"]))

        def post(body: dict[str, Any]) -> None:
            client.post(f"{st.api_base}/chat/completions", json=body).raise_for_status()

        def direct(body: dict[str, Any]) -> None:
            asyncio.run(engine.chat(ChatCompletionRequest.model_validate(body)))

        previous: dict[str, dict[str, Any]] = {}
        for i, ex in enumerate(test):  # the layers one after the other on each query: same machine state
            for r, (prog, model, prompt) in runs.items():
                lm = lms[r]
                with using(lm, prompt):  # (a) each call finds the previous query cached, as in the stages
                    n = len(lm.history)
                    t0 = time.perf_counter()
                    prog(**ex.inputs())
                    took = time.perf_counter() - t0
                h = lm.history[n]
                kw = {k: v for k, v in h["kwargs"].items() if k != "num_retries"}
                body = {"model": model, "messages": h["messages"], "temperature": lm.kwargs["temperature"],
                        "max_tokens": lm.kwargs["max_tokens"]}
                if (fmt := kw.get("response_format")) is not None:  # a pydantic model, as litellm sends it
                    body["response_format"] = {"type": "json_schema", "json_schema": {
                        "name": fmt.__name__, "schema": fmt.model_json_schema(), "strict": True}}
                flush = previous.get(r, body)
                previous[r] = body
                if flush is body:  # the first query was the warm-up's: fully cached
                    continue
                times[r]["program"].append(took)
                post(flush)
                t0 = time.perf_counter()
                lm(messages=h["messages"], **kw)  # (b)
                times[r]["lm"].append(time.perf_counter() - t0)
                post(flush)
                t0 = time.perf_counter()
                post(body)  # (c)
                times[r]["http"].append(time.perf_counter() - t0)
                direct(flush)
                t0 = time.perf_counter()
                direct(body)  # (d)
                times[r]["engine"].append(time.perf_counter() - t0)

    result = {r: {layer: latency_summary(v) for layer, v in layers.items()} for r, layers in times.items()}
    for r, layers in result.items():
        print(r, "  ".join(f"{layer} p50 {s['p50_s']:.3f}" for layer, s in layers.items()))
    s, t = result["student"], result["teacher_llm"]
    for layer in ("program", "lm", "http", "engine"):
        print(f"ratio at {layer}: {s[layer]['p50_s'] / t[layer]['p50_s']:.3f}")
    print(f"wrote {write_result(cfg, 'call_overhead', {'queries': len(test), **result})}")


if __name__ == "__main__":
    main()
