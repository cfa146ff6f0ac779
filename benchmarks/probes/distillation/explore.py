import json
from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.program import IntentClassificationModule, make_signature
from distill.lm import CompactJSONAdapter, CandidateJSONAdapter, CompactPromptAdapter
cfg = load_config("local")
d = prepare_data(cfg)
print(len(d.labels), len(d.gold), len(d.unlabeled), len(d.full_test), len(d.test))
sig = make_signature(d.labels)
ad = CandidateJSONAdapter(d.labels[:3])
msgs = ad.format(sig, [dict(text=g.text, label=g.label) for g in d.gold[:2]], dict(text="my card hasn't arrived"))
for m in msgs: print(m["role"], repr(m["content"])[:3000]); print()
lm_kwargs = {}
class FakeLM: model="x"; kwargs={}
try:
    ad._prepare_response_format(FakeLM(), lm_kwargs, sig); print(json.dumps(lm_kwargs)[:1500])
except Exception as e: print("ERR", e)
cm = CompactPromptAdapter().format(sig, [], dict(text="my card hasn't arrived"))
print(cm, CompactPromptAdapter().format_assistant_message_content(sig, {"label": d.labels[0]}))
from collections import Counter
print(Counter(g.label for g in d.gold))
