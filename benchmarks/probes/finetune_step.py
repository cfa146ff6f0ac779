"""What a finetune step costs on this machine, with random batches against length-grouped batches.

The quick profile's finetune is the largest single cost of `make demo`. Its SFT examples (compact prompt)
vary from ~64 to ~130 tokens, and a batch is padded to its longest: this probe measures the padding share
of random batches, then times the same recipe's steps with TRL's `train_sampling_strategy` `random` (the
default) and `group_by_length`, alternating A/B/A/B so that a drift in the host's speed hits both.

The SFT data is the quick profile's shape: its 500 queries to label (labels cycled through the task's, in
place of the teacher's) plus its 100 gold with theirs; no test query is read. Prints the numbers and writes them as JSON.

    python benchmarks/probes/finetune_step.py --steps 12 --out docs/finetune_step.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.lm import adapter
from distill.program import IntentClassificationModule
from distill.serving.deploy import usable_cpus
from distill.student.curation import to_sft
from distill.student.finetune import TrainJob, build_trainer, load_base, load_recipe
from distill.tracking import git_commit

STRATEGIES = ("random", "group_by_length")


def padding_share(lengths: np.ndarray, batch: int, seed: int = 0, draws: int = 200) -> dict[str, float]:
    """Padded tokens over real tokens, for random batches (mean over draws) and for sorted batches."""
    rng = np.random.default_rng(seed)

    def ratio(order: np.ndarray) -> float:
        batches = [lengths[order[i:i + batch]] for i in range(0, len(order), batch)]
        return float(sum(len(b) * b.max() for b in batches) / lengths.sum())

    return {"random": round(float(np.mean([ratio(rng.permutation(len(lengths))) for _ in range(draws)])), 4),
            "sorted": round(ratio(np.argsort(lengths)), 4)}


def time_steps(recipe_path: Path, training: dict, train_file: Path, steps: int, strategy: str) -> dict[str, float]:
    recipe = load_recipe(recipe_path, {**training, "max_steps": steps, "eval_strategy": "no",
                                       "load_best_model_at_end": False,
                                       "train_sampling_strategy": strategy})
    with tempfile.TemporaryDirectory() as out:
        trainer, _, _ = build_trainer(TrainJob(recipe=recipe, train_file=str(train_file), output_dir=out), out)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": round(seconds, 1), "s_per_step": round(seconds / steps, 3), "first_loss": losses[0],
            "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="local")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds")
    ap.add_argument("--out", type=Path, default=Path("docs/finetune_step.json"))
    args = ap.parse_args()

    cfg = load_config(args.profile)
    data = prepare_data(cfg)
    program = IntentClassificationModule(data.labels)
    # The queries to label carry no label here (the teacher gives them one): cycle through the labels, so
    # the answers' lengths are the task's; a step's cost does not depend on which label an example has.
    records = [{"text": ex.text, "label": data.labels[i % len(data.labels)]} for i, ex in enumerate(data.to_label)]
    records += [{"text": ex.text, "label": ex.label} for ex in data.gold]
    sft = to_sft(records, program, adapter(cfg.program.student_prompt))
    recipe_path = cfg.path(cfg.finetune.recipe)
    recipe = load_recipe(recipe_path)
    _, tokenizer = load_base(recipe.model)
    lengths = np.array([len(tokenizer(tokenizer.apply_chat_template(e["messages"], tokenize=False))["input_ids"])
                        for e in sft])
    batch = int(recipe.training.get("per_device_train_batch_size", 8))
    pad = padding_share(lengths, batch)
    print(f"{len(sft)} SFT examples, tokens mean {lengths.mean():.1f} (min {lengths.min()}, max {lengths.max()}); "
          f"padded/real tokens in batches of {batch}: random {pad['random']:.3f}, sorted {pad['sorted']:.3f}")

    runs: dict[str, list[dict[str, float]]] = {s: [] for s in STRATEGIES}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        train_file.write_text("".join(json.dumps(e) + "\n" for e in sft))
        for r in range(args.rounds):
            for s in STRATEGIES:
                res = time_steps(recipe_path, cfg.finetune.training, train_file, args.steps, s)
                runs[s].append(res)
                print(f"round {r + 1} {s:<16} {res['s_per_step']:.2f} s/step ({args.steps} steps, "
                      f"loss {res['first_loss']:.3f} -> {res['last_loss']:.3f})")
    per_step = {s: round(float(np.median([x["s_per_step"] for x in runs[s]])), 3) for s in STRATEGIES}
    saving = round(1 - per_step["group_by_length"] / per_step["random"], 3)
    print(f"median s/step: random {per_step['random']:.2f}, group_by_length {per_step['group_by_length']:.2f} "
          f"({saving:.0%} less)")
    args.out.write_text(json.dumps({
        "what": "finetune step time, random vs length-grouped batches (benchmarks/probes/finetune_step.py)",
        "profile": args.profile, "recipe": str(cfg.finetune.recipe), "steps_per_run": args.steps,
        "sft_examples": len(sft), "batch_size": batch,
        "tokens": {"mean": round(float(lengths.mean()), 1), "min": int(lengths.min()), "max": int(lengths.max())},
        "padded_over_real_tokens": pad, "runs": runs, "median_s_per_step": per_step, "saving": saving,
        "commit": git_commit(), "cpus": len(usable_cpus()), "machine": platform.machine(),
    }, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
