"""Shared set-up for the issue-19 research: data, embeddings (cached), test subsets, LR/kNN helpers."""
import os, json, time, warnings
os.environ.setdefault("BANKING77_DIR", "/work/shared/data/banking77")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from pathlib import Path
import numpy as np

R = Path("/tmp/research19"); RES = R / "results"; RES.mkdir(exist_ok=True)

_cache = {}
def data():
    if "d" not in _cache:
        from distill.config import load_config
        from distill.data.dataset import prepare_data, stratified_subset
        cfg = load_config("local")
        d = prepare_data(cfg)
        _cache["cfg"], _cache["d"] = cfg, d
        # stratified test subsets, seeded (same function the product uses; T100 is a prefix of T400)
        idx = {ex.text: i for i, ex in enumerate(d.full_test)}
        _cache["t400"] = [idx[ex.text] for ex in stratified_subset(d.full_test, 400, cfg.seed)]
        _cache["t200"] = [idx[ex.text] for ex in stratified_subset(d.full_test, 200, cfg.seed)]
        _cache["t100"] = [idx[ex.text] for ex in stratified_subset(d.full_test, 100, cfg.seed)]
    return _cache["cfg"], _cache["d"]

def subsets():
    data(); return {k: _cache[k] for k in ("t100", "t200", "t400")}

def vectors():
    f = RES / "emb.npz"
    cfg, d = data()
    if f.exists():
        z = np.load(f); return z["gold"], z["test"], z["unl"]
    from distill.teacher.program import embed
    t = time.time()
    g = embed(cfg.teacher.embedder, [e.text for e in d.gold])
    te = embed(cfg.teacher.embedder, [e.text for e in d.full_test])
    u = embed(cfg.teacher.embedder, [e.text for e in d.unlabeled])
    print(f"embedded {len(g)+len(te)+len(u)} in {time.time()-t:.1f}s")
    np.savez(f, gold=g, test=te, unl=u)
    return g, te, u

def acc_se(correct):
    c = np.asarray(correct, float); n = len(c); p = c.mean() if n else float("nan")
    return {"acc": round(100 * p, 2), "se": round(100 * np.sqrt(p * (1 - p) / max(n, 1)), 2), "n": n}

def fit_lr(X, y, C):
    from sklearn.linear_model import LogisticRegression
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(C=C, max_iter=5000).fit(X, y)

def loo_lr_C(X, y, grid=(0.1, 1, 3, 10, 30, 100, 300, 1000)):
    """C by leave-one-out accuracy on gold only; also returns the LOO probability matrices."""
    y = np.asarray(y); out = {}
    for C in grid:
        ok = 0
        for i in range(len(y)):
            m = np.ones(len(y), bool); m[i] = False
            ok += fit_lr(X[m], y[m], C).predict(X[i:i+1])[0] == y[i]
        out[C] = ok / len(y)
    best = max(out, key=lambda c: (out[c], -abs(np.log10(c) - 2)))
    return best, out

def knn_vote(sims_row, gold_labels, k):
    """Weighted-by-count vote among the k nearest; ties -> larger similarity sum -> nearest."""
    order = np.argsort(-sims_row)[:k]
    score = {}
    for rank, j in enumerate(order):
        c, s, r = score.get(gold_labels[j], (0, 0.0, 99))
        score[gold_labels[j]] = (c + 1, s + sims_row[j], min(r, rank))
    return max(score, key=lambda l: (score[l][0], score[l][1], -score[l][2]))

def save(name, obj):
    (RES / name).write_text(json.dumps(obj, indent=1, default=str))
