"""The finetune's length is chosen on held-out SFT examples: the split, the SFTConfig it needs, and (slow) a
real LoRA run on SmolLM2 as a Ray Train job that records the validation curve and ends on the weights of
its best evaluation."""

from __future__ import annotations

import importlib.metadata as md
import json
from collections import Counter
from pathlib import Path

import pytest

from distill.config import load_config
from distill.errors import ConfigError
from distill.student.finetune import TrainJob, holdout_split, load_recipe, run_training, sft_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_holdout_is_seeded_stratified_and_never_takes_everything() -> None:
    answers = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    train, held = holdout_split(answers, 0.1, seed=0)
    assert len(held) == 10 and sorted(train + held) == list(range(100)) and not set(train) & set(held)
    assert Counter(answers[i] for i in held) == {"a": 5, "b": 3, "c": 2}  # in proportion to each label
    assert holdout_split(answers, 0.1, seed=0) == (train, held)  # the same slice on every worker and re-run
    assert holdout_split(answers, 0.1, seed=1)[1] != held
    assert len(holdout_split(answers, 7, seed=0)[1]) == 7  # a count
    assert holdout_split(["a", "b"], 5, seed=0)[0]  # at least one example trains
    assert holdout_split(answers, 0, seed=0) == (list(range(100)), [])


def test_checkpoints_follow_the_evaluations_and_the_recipe_must_be_coherent(tmp_path) -> None:
    args = sft_config({"eval_strategy": "steps", "eval_steps": 3, "load_best_model_at_end": True,
                       "metric_for_best_model": "eval_loss"}, str(tmp_path), use_cpu=True)
    assert args.save_strategy == "steps" and args.save_steps == 3 and args.load_best_model_at_end
    assert sft_config({}, str(tmp_path), use_cpu=True).save_strategy == "epoch"  # no validation: as before
    with pytest.raises(ConfigError, match="set by the finetune job"):
        sft_config({"save_steps": 2}, str(tmp_path), use_cpu=True)
    recipe = ROOT / "configs" / "training" / "lora" / "smollm2-135m-cpu.yaml"
    with pytest.raises(ConfigError, match="holdout is 0"):
        bad = tmp_path / "r.yaml"
        bad.write_text(recipe.read_text() + "\n")
        text = bad.read_text().replace("holdout: 0.1", "holdout: 0")
        bad.write_text(text)
        load_recipe(bad)
    # validation off from the profile: evaluate nothing and keep the last weights (the recipe's own arguments)
    off = load_recipe(recipe, {"eval_strategy": "no", "load_best_model_at_end": False})
    assert off.training["eval_strategy"] == "no"


def test_the_shipped_recipes_choose_the_length_on_validation() -> None:
    for profile in ("local", "cluster"):
        cfg = load_config(profile)
        r = load_recipe(cfg.path(cfg.finetune.recipe), cfg.finetune.training)
        assert r.training["eval_strategy"] == "epoch" and r.training["load_best_model_at_end"]
        assert r.training["metric_for_best_model"] == "eval_loss" and r.training["greater_is_better"] is False
        assert 0 < r.validation.holdout < 1 and r.validation.patience == 1
    assert load_config("local").finetune.training["num_train_epochs"] == 3  # a cap within the quick budget


def _sft_records(n: int) -> list[dict]:
    queries = {
        "card_arrival": ["when will my card arrive", "my card has not come yet", "where is my new card",
                         "how long does card delivery take", "card still not delivered", "is my card on its way"],
        "pending_top_up": ["my top up is still pending", "why is the top-up pending", "top up not showing yet",
                           "pending top up for hours", "top up stuck as pending", "when does my top up go through"],
        "cash_withdrawal_charge": ["why was I charged for withdrawing cash", "fee on my ATM withdrawal",
                                   "cash withdrawal charge is wrong", "charged for taking out money",
                                   "ATM fee on my statement", "why a fee for cash"],
    }
    rows = [(text, label) for label, texts in queries.items() for text in texts]
    return [{"messages": [
        {"role": "system", "content": "Classify the banking customer's message into its intent label."},
        {"role": "user", "content": text},
        {"role": "assistant", "content": json.dumps({"label": label})}]} for text, label in rows[:n]]


@pytest.mark.slow  # a real LoRA finetune of SmolLM2 as a Ray Train job (about a minute on 2 cores)
def test_a_real_finetune_records_the_validation_curve_and_ends_on_its_best_checkpoint(tmp_path) -> None:
    from safetensors.torch import load_file

    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in _sft_records(18)))
    recipe = load_recipe(ROOT / "configs" / "training" / "lora" / "smollm2-135m-cpu.yaml", {
        "max_steps": 8, "eval_strategy": "steps", "eval_steps": 2, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8, "logging_steps": 1, "warmup_steps": 0,
        # The highest validation loss is "best" here, so the best evaluation is the first (training lowers
        # the loss) and patience 1 stops at the second: the restored weights must be the first's, not the last's.
        "greater_is_better": True,
    })
    recipe = recipe.model_copy(update={
        "lora": recipe.lora.model_copy(update={"top_layers": 2}),
        "validation": recipe.validation.model_copy(update={"holdout": 6, "patience": 1}),
        "scaling": recipe.scaling.model_copy(update={"cpus_per_worker": 1}),
    })
    out = tmp_path / "run"
    import ray

    from distill.serving.control import shutdown_ray

    # A Ray of its own ("local"): a bare ray.init() would try to join whatever cluster /tmp/ray last recorded.
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:  # the job's driver does the same inside its Ray job: TorchTrainer.fit on the current Ray
        result = run_training(TrainJob(recipe=recipe, train_file=str(train_file), output_dir=str(out), name="val"))
    finally:
        shutdown_ray()

    v = result["validation"]
    assert v["examples"] == 6 and result["examples"] == 18
    steps = [p["step"] for p in v["curve"]]
    losses = [p["eval_loss"] for p in v["curve"]]
    assert steps == [2, 4] and all(x > 0 for x in losses), v  # an evaluation every 2 steps, 2 in all
    assert losses[1] < losses[0], v  # training lowered the held-out loss...
    assert v["best_step"] == 2 and v["stopped_early"] and v["restored"] and result["steps"] == 4, v
    assert "stopped early" in v["reason"] and v["eval_seconds"] > 0
    assert len(result["loss_history"]) == len(result["loss_steps"]) == 4

    # Ray Train's storage holds HF's checkpoint of each evaluation; the final adapter is the best one's.
    checkpoints = {json.loads(p.read_text())["global_step"]: p.parent for p in out.rglob("trainer_state.json")}
    assert set(checkpoints) == {2, 4}, checkpoints
    final = load_file(Path(result["adapter_dir"]) / "adapter_model.safetensors")
    best, last = (load_file(checkpoints[s] / "adapter_model.safetensors") for s in (2, 4))
    assert set(final) == set(best)
    assert all((final[k] == best[k]).all() for k in final)
    assert any(not (final[k] == last[k]).all() for k in final)
    assert Path(result["adapter_gguf"]).is_file()  # and llama.cpp gets that adapter
    assert md.version("transformers")  # (the versions the run used are in the report)
