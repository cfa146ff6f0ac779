"""Proxy teacher labels for student-lever experiments: LR on the 100 gold embeddings (C by gold LOO)."""
from common import *
cfg, d = data(); G, T, U = vectors()
gl = [e.label for e in d.gold]
C = json.loads((RES / "baselines.json").read_text())["lr_C_loo"]
lr = fit_lr(G, gl, C)
truth = {e.text: e.label for e in d.train}
P = lr.predict_proba(U[:1000]); cls = lr.classes_
recs = [{"text": d.unlabeled[i].text, "label": str(cls[P[i].argmax()]), "conf": float(P[i].max()),
         "correct": str(cls[P[i].argmax()]) == truth.get(d.unlabeled[i].text)} for i in range(1000)]
(RES / "lr_labels_unl1000.json").write_text(json.dumps(recs))
for n in (300, 600, 1000): print(n, acc_se([r["correct"] for r in recs[:n]]))
# gold label of the first 1000 pool queries: a stand-in for "perfect teacher" if needed
(RES / "true_labels_unl1000.json").write_text(json.dumps([{"text": d.unlabeled[i].text, "label": truth[d.unlabeled[i].text], "conf": 1, "correct": True} for i in range(1000)]))
