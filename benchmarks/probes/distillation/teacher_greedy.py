"""Greedy grammar-constrained decoding (what the served teacher does) for the repo's current teacher design
(k nearest demos, answer restricted to the labels of the candidate_k nearest), vs the LL-argmax approximation."""
import sys
from common import *
from llm import *
K, CK, N = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg, d = data(); S = subsets(); G, T, U = vectors()
gl = [e.label for e in d.gold]; gt = [e.text for e in d.gold]
from distill.program import make_signature
from distill.lm import CompactJSONAdapter
sig = make_signature(d.labels); ad = CompactJSONAdapter()
ll = {json.loads(l)["i"]: json.loads(l) for l in (RES / f"score_k{K}_t400.jsonl").open()}
llama = load_llama()
rows = []
for i in S["t400"][:N]:
    order = np.argsort(-(G @ T[i])); cands = list(dict.fromkeys(gl[j] for j in order[:CK]))
    demos = [(gt[j], gl[j]) for j in reversed(order[:K])]
    t0 = time.time()
    r = llama.create_chat_completion(messages=teacher_messages(sig, demos, d.full_test[i].text, ad), temperature=0.0, max_tokens=64, grammar=grammar_for(cands))
    dt = time.time() - t0
    g = json.loads(r["choices"][0]["message"]["content"])["label"]
    lla = max(cands, key=lambda l: ll[i]["ll"].get(l, -1e9))
    rows.append({"i": i, "greedy": g, "ll_argmax": lla, "truth": d.full_test[i].label, "sec": dt, "pt": r["usage"]["prompt_tokens"], "ct": r["usage"]["completion_tokens"]})
res = {"k": K, "candidate_k": CK, "greedy": acc_se([r["greedy"] == r["truth"] for r in rows]), "ll_argmax": acc_se([r["ll_argmax"] == r["truth"] for r in rows]),
       "agreement": float(np.mean([r["greedy"] == r["ll_argmax"] for r in rows])), "p50_s": float(np.median([r["sec"] for r in rows])),
       "prompt_tokens": float(np.mean([r["pt"] for r in rows])), "completion_tokens": float(np.mean([r["ct"] for r in rows]))}
print(json.dumps(res)); save(f"teacher_greedy_k{K}_c{CK}_{N}.json", {**res, "rows": rows})
