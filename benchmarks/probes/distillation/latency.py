"""Teacher (current repo design: 2 nearest demos, full prompt, grammar = 6-NN labels) vs compact LoRA student,
interleaved query by query in one process (same machine conditions), plus the hybrid teacher's vote cost."""
import sys
from common import *
from llm import *
name, N = sys.argv[1], int(sys.argv[2])
cfg, d = data(); S = subsets(); G, T, U = vectors()
gl = [e.label for e in d.gold]; gt = [e.text for e in d.gold]
from distill.program import make_signature
from distill.lm import CompactJSONAdapter, CompactPromptAdapter
from distill.teacher.program import embed
sig = make_signature(d.labels); fa, ca = CompactJSONAdapter(), CompactPromptAdapter()
teacher = load_llama(); student = load_llama(lora_path=str(R / "students" / name / "adapter.gguf"))
full = grammar_for(d.labels)
tt, st, et = [], [], []
for i in S["t400"][:N]:
    text = d.full_test[i].text
    t0 = time.time(); v = embed(cfg.teacher.embedder, [text])[0]; et.append(time.time() - t0)
    order = np.argsort(-(G @ v)); cands = list(dict.fromkeys(gl[j] for j in order[:6]))
    t0 = time.time()
    teacher.create_chat_completion(messages=teacher_messages(sig, [(gt[j], gl[j]) for j in reversed(order[:2])], text, fa), temperature=0.0, max_tokens=64, grammar=grammar_for(cands))
    tt.append(time.time() - t0)
    t0 = time.time()
    student.create_chat_completion(messages=ca.format(sig, [], {"text": text}), temperature=0.0, max_tokens=64, grammar=full)
    st.append(time.time() - t0)
res = {"n": N, "threads": NT, "teacher_llm_p50": float(np.median(tt)), "student_p50": float(np.median(st)), "embed_p50": float(np.median(et)),
       "ratio_p50": float(np.median(st) / np.median(tt)), "teacher_mean": float(np.mean(tt)), "student_mean": float(np.mean(st))}
print(json.dumps(res)); save(f"latency_{name}_{N}.json", res)
