"""Offline teacher variants from the LL records: candidate restriction, LR top-m, LR gate, fusion."""
import sys
from common import *
cfg, d = data(); S = subsets(); G, T, U = vectors()
gl = [e.label for e in d.gold]
C = json.loads((RES / "baselines.json").read_text())["lr_C_loo"]
lr = fit_lr(G, gl, C); cls = list(lr.classes_)
if os.environ.get("VOTE") == "names":  # LR on gold + label-name prototypes, balanced class weights
    from distill.teacher.program import embed
    from sklearn.linear_model import LogisticRegression
    NV = embed(cfg.teacher.embedder, [l.replace("_", " ") for l in d.labels])
    lr = LogisticRegression(C=C, max_iter=5000, class_weight="balanced").fit(np.vstack([G, NV]), gl + list(d.labels)); cls = list(lr.classes_)
def load(k, split):
    f = RES / f"score_k{k}_{split}.jsonl"
    return [json.loads(l) for l in f.open()] if f.exists() else []
def variants(recs, V, truth):
    P = lr.predict_proba(V[[r["i"] for r in recs]])
    out = {}
    def add(name, preds): out[name] = (preds, [p == truth[r["i"]] for p, r in zip(preds, recs)])
    add("lr", [cls[p.argmax()] for p in P]); add("1nn", [r["knn_order"][0] for r in recs])
    for c in (1, 2, 3, 4, 6, 8):
        add(f"llm_knn_cand{c}", [max(dict.fromkeys(r["knn_order"][:c]), key=lambda l: r["ll"].get(l, -1e9)) for r in recs])
    for m in (2, 3, 4, 6):
        add(f"llm_lr_top{m}", [max([cls[j] for j in np.argsort(-p)[:m]], key=lambda l: r["ll"].get(l, -1e9)) for p, r in zip(P, recs)])
    for tau in (0.3, 0.4, 0.5, 0.6, 0.7):
        for m in (2, 3, 4):
            add(f"gate{tau}_lr_top{m}", [cls[p.argmax()] if p.max() >= tau else max([cls[j] for j in np.argsort(-p)[:m]], key=lambda l: r["ll"].get(l, -1e9)) for p, r in zip(P, recs)])
    for w in (0.1, 0.2, 0.3, 0.5, 1.0):
        add(f"fuse_w{w}", [max(r["ll"], key=lambda l: np.log(P[n][cls.index(l)] + 1e-9) + w * r["ll"][l]) for n, r in enumerate(recs)])
    return out
if __name__ == "__main__":
    tl = [e.label for e in d.full_test]
    for k in ("1", "2", "4", "div4"):
        recs = load(k, sys.argv[1] if len(sys.argv) > 1 else "t400")
        if len(sys.argv) > 2: recs = recs[: int(sys.argv[2])]
        if not recs: continue
        out = variants(recs, T, tl)
        print(f"\n== k={k}  n={len(recs)}  mean sec/query {np.mean([r['sec'] for r in recs]):.2f}  prompt tokens {np.mean([r['prompt_tokens'] for r in recs]):.0f}")
        base = np.array(out["lr"][1], float)
        rows = {}
        for name, (p, c) in out.items():
            c = np.array(c, float); diff = c - base
            rows[name] = {**acc_se(c), "vs_lr": round(100 * diff.mean(), 2), "vs_lr_se": round(100 * diff.std(ddof=1) / np.sqrt(len(c)), 2)}
            print(f"{name:22s} {rows[name]['acc']:6.2f} ± {rows[name]['se']:.2f}   vs LR {rows[name]['vs_lr']:+6.2f} ± {rows[name]['vs_lr_se']:.2f}")
        save(f"teacher_variants_{os.environ.get('VOTE', 'lr')}_k{k}_{sys.argv[1] if len(sys.argv) > 1 else 't400'}.json", rows)

def share(tau):
    P = lr.predict_proba(vectors()[1]); return float((P.max(1) < tau).mean())
if os.environ.get("VOTE") == "names":
    print({t: share(t) for t in (0.3, 0.4, 0.5)})
