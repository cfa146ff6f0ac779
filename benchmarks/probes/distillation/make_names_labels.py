"""Teacher labels from the recommended vote: LR on gold + label-name prototypes, balanced (C=1000 from gold LOO)."""
from common import *
from distill.teacher.program import embed
from sklearn.linear_model import LogisticRegression
cfg, d = data(); G, T, U = vectors(); gl = [e.label for e in d.gold]
NV = embed(cfg.teacher.embedder, [l.replace("_", " ") for l in d.labels])
lr = LogisticRegression(C=1000, max_iter=5000, class_weight="balanced").fit(np.vstack([G, NV]), gl + list(d.labels))
truth = {e.text: e.label for e in d.train}
P = lr.predict_proba(U[:1000]); cls = lr.classes_
recs = [{"text": d.unlabeled[i].text, "label": str(cls[P[i].argmax()]), "conf": float(P[i].max()),
         "correct": str(cls[P[i].argmax()]) == truth.get(d.unlabeled[i].text)} for i in range(1000)]
(RES / "names_labels_unl1000.json").write_text(json.dumps(recs))
for n in (300, 600, 1000): print(n, acc_se([r["correct"] for r in recs[:n]]))
t100 = subsets()["t100"]; tl = np.array([e.label for e in d.full_test])
print("vote on t100", acc_se((lr.predict(T) == tl)[t100]))
