"""LL of candidate labels under the teacher prompt (full DSPy prompt + k gold demos, nearest last).
usage: teacher_score.py K SPLIT(t400|rest600|unl1000) [N]"""
import sys
from common import *
from llm import *
K, split = sys.argv[1], sys.argv[2]
DIV = K.startswith("div"); KN = int(K[3:] if DIV else K); N = int(sys.argv[3]) if len(sys.argv) > 3 else None
cfg, d = data(); S = subsets(); G, T, U = vectors()
gl = [e.label for e in d.gold]; gt = [e.text for e in d.gold]
C = json.loads((RES / "baselines.json").read_text())["lr_C_loo"]
lr = fit_lr(G, gl, C)
if split == "t400": items = [(i, d.full_test[i].text, T[i]) for i in S["t400"]]
elif split == "rest600": items = [(i, d.full_test[i].text, T[i]) for i in range(len(T)) if i not in set(S["t400"])]
elif split == "unl1000": items = [(i, d.unlabeled[i].text, U[i]) for i in range(1000)]
if N: items = items[:N]
from distill.program import make_signature
from distill.lm import CompactJSONAdapter
sig = make_signature(d.labels); ad = CompactJSONAdapter()
out_f = RES / f"score_k{K}_{split}.jsonl"
done = {json.loads(l)["i"] for l in out_f.open()} if out_f.exists() else set()
llama = load_llama(logits_all=True); sc = Scorer(llama)
cls = list(lr.classes_)
with out_f.open("a") as f:
    t_all = time.time(); n = 0
    for i, text, v in items:
        if i in done: continue
        sims = G @ v; order = np.argsort(-sims)
        knn_labels = list(dict.fromkeys(gl[j] for j in order[:8]))
        p = lr.predict_proba(v[None])[0]; lr_top = [cls[j] for j in np.argsort(-p)[:6]]
        cands = list(dict.fromkeys(knn_labels + lr_top))
        if DIV:  # one demo per LR top-KN label (its nearest gold example), most probable label last
            top = [cls[j] for j in np.argsort(-p)[:KN]]
            demos = [(gt[next(j for j in order if gl[j] == lab)], lab) for lab in reversed(top)]
        else:
            demos = [(gt[j], gl[j]) for j in reversed(order[:KN])]  # nearest last
        prompt = chatml(teacher_messages(sig, demos, text, ad))
        t0 = time.time(); ll, ptoks, new = sc.score(prompt, cands); dt = time.time() - t0
        rec = {"i": i, "ll": ll, "knn_order": [gl[j] for j in order[:8]], "knn_sims": [float(sims[j]) for j in order[:8]],
               "lr_p": {cls[j]: float(p[j]) for j in np.argsort(-p)[:6]}, "prompt_tokens": ptoks, "evaluated": new, "sec": round(dt, 3)}
        f.write(json.dumps(rec) + "\n"); f.flush(); n += 1
    print(f"k={K} {split}: {n} queries in {time.time()-t_all:.0f}s")
