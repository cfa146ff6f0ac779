"""Probe: what vLLM's CPU build costs the rehearsal, per engine setting -- cold start (an empty compile cache)
and the time for a batch of teacher-sized chat calls.

Run in the rehearsal venv after `make rehearse-setup`:
    .venv-vllm/bin/python benchmarks/probes/vllm_cpu_start.py --variant default --variant eager ...
Each variant deploys the rehearsal's derived teacher config (`<artifacts>/rehearsal/serve_teacher.yaml`,
written by a rehearsal) on a Ray of its own with the rehearsal's logical CPUs, with VLLM_CACHE_ROOT in a
fresh directory (cold), times deploy -> /v1/models, then `--calls` chat calls of ~500 prompt tokens from
`--threads` threads. Writes JSON (one object per variant) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

VARIANTS = {
    "default": ({}, {}),
    "eager": ({"enforce_eager": True}, {}),
    "bind2": ({}, {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    "eager_bind2": ({"enforce_eager": True}, {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
}
PROMPT = ("Classify the customer's message into exactly one of these labels: "
          + ", ".join(f"label_{i}_card_payment_issue" for i in range(40)) + ".\n\nMessage: ")


def variant_config(source: Path, out: Path, engine: dict, env: dict) -> Path:
    raw = yaml.safe_load(source.read_text())
    for app in raw["applications"]:
        for c in app.get("args", {}).get("llm_configs", []):
            c["engine_kwargs"] = {**c.get("engine_kwargs", {}), **engine}
            c.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(env)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def run_variant(name: str, source: Path, calls: int, threads: int) -> dict:
    from distill.serving.control import shutdown, start_serve_config, wait_until_ready

    engine, env = VARIANTS[name]
    cache = tempfile.mkdtemp(prefix="vllm-cache-")
    env = {**env, "VLLM_CACHE_ROOT": cache}  # a new dict: VARIANTS stays as it is
    with tempfile.TemporaryDirectory() as tmp:
        config = variant_config(source, Path(tmp) / "serve.yaml", engine, env)
        raw = yaml.safe_load(config.read_text())
        model = raw["applications"][0]["args"]["llm_configs"][0]["model_loading_config"]["model_id"]
        api = f"http://127.0.0.1:{raw.get('http_options', {}).get('port', 8000)}/v1"
        import ray

        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            t = time.monotonic()
            start_serve_config(config)
            wait_until_ready(api, timeout_s=900, models=[model])
            start_s = time.monotonic() - t

            def one(i: int) -> float:
                t0 = time.monotonic()
                r = httpx.post(f"{api}/chat/completions", timeout=600, json={
                    "model": model, "max_tokens": 16, "temperature": 0.0,
                    "messages": [{"role": "user", "content": f"{PROMPT}my card {i} was declined at a shop"}]})
                r.raise_for_status()
                return time.monotonic() - t0

            one(-1)  # the first call warms the prefix cache
            t = time.monotonic()
            with ThreadPoolExecutor(threads) as pool:
                lat = sorted(pool.map(one, range(calls)))
            calls_s = time.monotonic() - t
        finally:
            shutdown()
            ray.shutdown()  # started here, not by distill.serving.control: its shutdown leaves it running
    return {"variant": name, "engine_kwargs": engine, "env": {k: v for k, v in env.items() if k != "VLLM_CACHE_ROOT"},
            "cold_start_s": round(start_s, 1), "calls": calls, "threads": threads, "calls_s": round(calls_s, 1),
            "p50_s": round(lat[len(lat) // 2], 2), "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    ap.add_argument("--config", default="artifacts/cluster_cpu/rehearsal/serve_teacher.yaml")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--out", default="artifacts/bench/vllm_cpu_start.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for v in args.variant or ["default"]:
        results.append(run_variant(v, Path(args.config), args.calls, args.threads))
        print(json.dumps(results[-1]), flush=True)
        out.write_text(json.dumps(results, indent=2))  # each variant as it ends: a later failure keeps it
    return 0


if __name__ == "__main__":
    sys.exit(main())
