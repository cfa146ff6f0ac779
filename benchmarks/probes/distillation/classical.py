"""Classical levers for the vote inside the teacher: class weights, label-name prototypes, self-training on the pool."""
from common import *
from distill.teacher.program import embed
cfg, d = data(); S = subsets(); G, T, U = vectors()
gl = np.array([e.label for e in d.gold]); tl = np.array([e.label for e in d.full_test])
from sklearn.linear_model import LogisticRegression
import warnings; warnings.simplefilter("ignore")
def loo(make, X, y, extra=None):
    ok = 0
    for i in range(len(y)):
        m = np.ones(len(y), bool); m[i] = False
        Xt, yt = X[m], y[m]
        if extra is not None: Xt, yt = np.vstack([Xt, extra[0]]), np.concatenate([yt, extra[1]])
        ok += make().fit(Xt, yt).predict(X[i:i+1])[0] == y[i]
    return ok / len(y)
res = {}
def report(name, pred, **kw):
    res[name] = {"all1000": acc_se(pred == tl), "t400": acc_se((pred == tl)[S["t400"]]), **kw}
    print(f"{name:40s} {res[name]['all1000']} t400 {res[name]['t400']['acc']} {kw}", flush=True)
names = [l.replace("_", " ") for l in d.labels]
NV = embed(cfg.teacher.embedder, names); nl = np.array(d.labels)
for cw in (None, "balanced"):
    for use_names in (False, True):
        best = (None, 1000)  # C from the baseline's gold LOO; no re-tuning (CPU is contended)
        C = best[1]
        X, y = (np.vstack([G, NV]), np.concatenate([gl, nl])) if use_names else (G, gl)
        lr = LogisticRegression(C=C, max_iter=5000, class_weight=cw).fit(X, y)
        report(f"lr cw={cw} names={use_names}", lr.predict(T), C=C, gold_loo=best[0])
# self-training: label the 4071 pool with LR, keep confident, refit (C fixed from LOO above), 2 rounds
lr = LogisticRegression(C=1000, max_iter=5000, class_weight="balanced").fit(G, gl)
for rnd in range(2):
    P = lr.predict_proba(U); conf = P.max(1); lab = lr.classes_[P.argmax(1)]
    keep = conf >= np.quantile(conf, 0.5)
    lr = LogisticRegression(C=100, max_iter=5000, class_weight="balanced").fit(np.vstack([G, U[keep]]), np.concatenate([gl, lab[keep]]))
    report(f"self-train round{rnd+1} (top50% conf)", lr.predict(T))
from sklearn.semi_supervised import LabelSpreading
X = np.vstack([G, U]); y = np.concatenate([np.array([list(d.labels).index(l) for l in gl]), -np.ones(len(U), int)])
for k in (10, 20):
    ls = LabelSpreading(kernel="knn", n_neighbors=k, alpha=0.2, max_iter=100).fit(X, y)
    report(f"label spreading knn={k}", np.array(d.labels)[ls.predict(T)])
save("classical_levers.json", res)
