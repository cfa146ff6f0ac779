"""Student LoRA finetune: TRL's SFTTrainer + PEFT inside a Ray Train TorchTrainer.

The same function runs on 2 CPU cores (`local`: SmolLM2 loaded from its GGUF, dequantised by
transformers) and on GPUs (`cluster`: Llama-3.2-1B from the hub). Loss is on the assistant turn only:
the SFT records are converted to TRL's conversational prompt/completion form. Recipes live in
`configs/training/lora/*.yaml`.

`python -m distill finetune-job --job job.json --result out.json` is what the Ray job runs (configs/job.yaml).
The job's spec, SFT data, checkpoints and result are paths or object-storage URIs (`distill.student.storage`):
the job reads and writes nothing else of the submitting machine's.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distill.errors import ConfigError, DistillError
from distill.models import ModelSource
from distill.student import storage
from distill.student.lora_gguf import export_lora_to_gguf


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelSpec(_Strict):
    gguf: ModelSource | None = None
    hub_id: str | None = None
    # How the weights are loaded (transformers' from_pretrained); mixed precision is SFTConfig's `bf16`.
    dtype: Literal["float32", "bfloat16"] = "float32"
    attn_implementation: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "BaseModelSpec":
        if (self.gguf is None) == (self.hub_id is None):
            raise ValueError("model: give exactly one of 'gguf' or 'hub_id'")
        return self


class LoraSpec(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str]
    # Adapt only the top N decoder layers: backpropagation then stops there, so a step costs ~forward +
    # N/L of the backward. null: every layer.
    top_layers: int | None = Field(None, ge=1)


class ValidationSpec(_Strict):
    """Early stopping on a slice of the SFT data held out from training (teacher labels, never the test set).

    It is on when the recipe's `training` evaluates (`eval_strategy: epoch` or `steps`); then the best
    checkpoint is kept by SFTConfig's own `load_best_model_at_end` / `metric_for_best_model`, and
    `num_train_epochs` is a cap. The slice is drawn once, seeded, stratified by the answer (the label).
    """

    holdout: float = Field(0.1, ge=0, description="Share (< 1) or count (>= 1) of the SFT examples held out.")
    # transformers' EarlyStoppingCallback: evaluations without improvement before training stops; null: train
    # to the cap and still restore the best checkpoint.
    patience: int | None = Field(1, ge=1)
    min_delta: float = Field(0.0, ge=0, description="EarlyStoppingCallback's early_stopping_threshold.")


# Set by the job itself, never by a recipe: where HF writes scratch checkpoints, and the hooks that turn
# its saves into Ray Train checkpoints and keep the loss on the answer only. With a validation slice a
# checkpoint is saved at every evaluation (save_strategy/save_steps follow eval_strategy/eval_steps), so the
# best one can be restored.
MANAGED_SFT_ARGS = {
    "output_dir": None, "completion_only_loss": True, "save_strategy": "epoch", "save_only_model": True,
    "report_to": "none", "dataset_num_proc": 1,
}
MANAGED_SFT_KEYS = {*MANAGED_SFT_ARGS, "save_steps"}


def evaluates(training: dict[str, Any]) -> bool:
    """Whether a recipe's `training:` section evaluates during training (then a validation slice is held out)."""
    return str(training.get("eval_strategy", "no")) not in ("no", "IntervalStrategy.NO", "None")


def sft_config(training: dict[str, Any], output_dir: str, use_cpu: bool) -> Any:
    """TRL's `SFTConfig` from a recipe's `training:` section, passed through as its own keyword arguments."""
    from trl import SFTConfig

    if clash := sorted(set(training) & MANAGED_SFT_KEYS):
        raise ConfigError(f"training: {clash} are set by the finetune job, not the recipe")
    if unknown := sorted(set(training) - {f.name for f in dataclasses.fields(SFTConfig)}):
        raise ConfigError("; ".join(f"training.{k}: not an SFTConfig argument" for k in unknown))
    managed: dict[str, Any] = dict(MANAGED_SFT_ARGS)
    if evaluates(training):  # a checkpoint at every evaluation: the best one can be restored
        managed["save_strategy"] = training["eval_strategy"]
        if training["eval_strategy"] == "steps":
            managed["save_steps"] = training.get("eval_steps") or training.get("logging_steps") or 500
    kwargs = {**managed, **training, "output_dir": output_dir, "use_cpu": use_cpu}
    if kwargs.get("gradient_checkpointing") and "gradient_checkpointing_kwargs" not in training:
        # Non-reentrant checkpointing needs no gradient on the inputs, so with `top_layers` the backward
        # pass (and the recomputation) still stops at the lowest adapted layer.
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    try:
        with warnings.catch_warnings():
            # transformers 5 renamed gradient_checkpointing* to activation_checkpointing* and keeps the old
            # names as aliases until v6; the recipes (and TRL's docs) use the old ones, which still work.
            warnings.filterwarnings("ignore", message=r"`gradient_checkpointing(_kwargs)?` is deprecated",
                                    category=FutureWarning)
            return SFTConfig(**kwargs)
    except TypeError as e:  # an unknown keyword: name it
        raise ConfigError(f"training: not an SFTConfig argument ({e})") from None
    except ValueError as e:
        raise ConfigError(f"training: SFTConfig refused it: {e}") from None


class ScalingSpec(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    # Other Ray resources each worker asks for, e.g. a custom node resource that places the workers on the
    # nodes meant for training (the rehearsal pins them to its job node this way).
    resources: dict[str, float] = Field(default_factory=dict)


class Recipe(_Strict):
    model: BaseModelSpec
    lora: LoraSpec
    training: dict[str, Any] = Field(default_factory=dict, description="TRL SFTConfig keyword arguments.")
    validation: ValidationSpec = ValidationSpec()
    scaling: ScalingSpec = ScalingSpec()

    @model_validator(mode="after")
    def _validation(self) -> "Recipe":
        if evaluates(self.training) and not self.validation.holdout:
            raise ValueError("training.eval_strategy evaluates, but validation.holdout is 0: nothing to evaluate on")
        if self.validation.patience is not None and evaluates(self.training) and \
                not self.training.get("load_best_model_at_end"):
            raise ValueError("validation.patience (early stopping) needs training.load_best_model_at_end: true")
        return self


class TrainJob(_Strict):
    """Everything one finetune needs; serialised to JSON for the Ray job."""

    recipe: Recipe
    train_file: str = Field(..., description="The SFT JSONL: a path or a URI the job's node reaches.")
    output_dir: str = Field(..., description="The job's directory and Ray Train's storage (a shared path, or "
                                             "s3://... / gs://... on a cluster).")
    name: str = "lora"


def load_recipe(path: str | Path, training: dict[str, Any] | None = None) -> Recipe:
    """A recipe, with the profile's `finetune.training` (e.g. max_steps) over its `training:` section.

    `training` is validated by constructing TRL's SFTConfig from it, so a misspelt argument fails here,
    on the driver, before a job is submitted.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"training recipe not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    raw["training"] = {**(raw.get("training") or {}), **(training or {})}
    try:
        recipe = Recipe.model_validate(raw)
        # CPU here: the hardware checks belong to the job's machine, the argument names to the recipe.
        with tempfile.TemporaryDirectory(prefix="distill-check-") as scratch:  # SFTConfig wants an output_dir
            sft_config(recipe.training, scratch, use_cpu=True)
    except ValidationError as e:
        raise ConfigError(f"{p}: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return recipe


# --- inside the Ray Train workers -----------------------------------------------------------------


def load_base(spec: BaseModelSpec) -> tuple[Any, Any]:
    """Model and tokenizer; a GGUF is dequantised by transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": getattr(torch, spec.dtype)}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.gguf is not None:
        path = spec.gguf.resolve()
        src, extra = str(path.parent), {"gguf_file": path.name}
    else:
        src, extra = spec.hub_id, {}
    tokenizer = AutoTokenizer.from_pretrained(src, **extra)
    model = AutoModelForCausalLM.from_pretrained(src, **extra, **kwargs)
    if spec.gguf is not None:
        # The GGUF weights are already dequantised to plain tensors; only the quantizer marker remains,
        # and it makes Trainer refuse to train (and save_pretrained refuse to save). Drop it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def to_prompt_completion(record: dict[str, Any]) -> dict[str, Any]:
    """{"messages": [..., assistant]} -> TRL's conversational prompt/completion (loss on the completion)."""
    messages = record["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("each SFT record must end with the assistant turn")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


ADAPTER_SUBDIR = "adapter"


def _top_layers(model: Any, n: int | None) -> list[int] | None:
    if n is None:
        return None
    total = model.config.num_hidden_layers
    if n > total:
        raise DistillError(f"lora.top_layers={n}, but the model has {total} layers")
    return list(range(total - n, total))


def holdout_split(answers: list[str], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): `holdout` (a share below 1, else a count) of the examples, drawn
    per answer in proportion to its frequency (largest remainder), seeded; at least one example trains."""
    n = len(answers)
    k = min(n - 1, int(holdout) if holdout >= 1 else round(holdout * n)) if n else 0
    if k <= 0:
        return list(range(n)), []
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        groups.setdefault(a, []).append(i)
    quota = {a: k * len(ix) / n for a, ix in groups.items()}
    take = {a: int(q) for a, q in quota.items()}
    rest = sorted(groups, key=lambda a: (quota[a] - take[a], rng.random()), reverse=True)
    for a in rest[: k - sum(take.values())]:
        take[a] += 1
    held: list[int] = []
    for a, ix in groups.items():
        held += rng.sample(ix, take[a])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)


def load_sft_dataset(train_file: str, scratch: str) -> Any:
    """The SFT JSONL as a `datasets.Dataset`; a URI is copied into `scratch` first."""
    import datasets

    if storage.is_uri(train_file):
        train_file = storage.copy(train_file, Path(scratch) / "train.jsonl")
    return datasets.load_dataset("json", data_files=train_file, split="train")


def build_trainer(job: TrainJob, output_dir: str, callbacks: list[Any] | None = None) -> tuple[Any, int, int]:
    """TRL's SFTTrainer for `job` (HF checkpoints, and a URI's SFT data, in `output_dir`); (trainer, SFT
    examples, held out).

    With validation on (the recipe's `training` evaluates), `validation.holdout` of the SFT examples is the
    eval_dataset and `EarlyStoppingCallback` stops after `validation.patience` evaluations without
    improvement; SFTConfig's `load_best_model_at_end` restores the best checkpoint's adapter.
    """
    from peft import LoraConfig
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    recipe, lora, val = job.recipe, job.recipe.lora, job.recipe.validation
    model, tokenizer = load_base(recipe.model)
    ds = load_sft_dataset(job.train_file, output_dir)
    ds = ds.map(to_prompt_completion, remove_columns=ds.column_names)
    n_examples, eval_ds = len(ds), None
    callbacks = list(callbacks or [])
    if evaluates(recipe.training):
        answers = [json.dumps(c, sort_keys=True) for c in ds["completion"]]
        train_idx, held = holdout_split(answers, val.holdout, int(recipe.training.get("seed", 0)))
        if not held:
            raise DistillError(f"validation.holdout={val.holdout} holds out nothing of {n_examples} SFT examples")
        ds, eval_ds = ds.select(train_idx), ds.select(held)
        if val.patience is not None:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=val.patience,
                                                   early_stopping_threshold=val.min_delta))
    args = sft_config(recipe.training, output_dir, use_cpu=not recipe.scaling.use_gpu)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            task_type="CAUSAL_LM", layers_to_transform=_top_layers(model, lora.top_layers),
        ),
        callbacks=callbacks,
    )
    return trainer, n_examples, 0 if eval_ds is None else len(eval_ds)


def validation_summary(trainer: Any, spec: ValidationSpec, held_out: int) -> dict[str, Any] | None:
    """The validation curve and the chosen checkpoint, from the trainer's own state after `train()`."""
    if not held_out:
        return None
    state, args = trainer.state, trainer.args
    metric = args.metric_for_best_model or "loss"
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    curve = [{"step": int(h["step"]), "epoch": round(float(h["epoch"]), 4), "eval_loss": float(h["eval_loss"]),
              **({key: float(h[key])} if key != "eval_loss" and key in h else {})}
             for h in state.log_history if "eval_loss" in h]
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[-1])
    elif curve:  # no checkpoint kept: the best evaluation by the metric (first of equals, as transformers)
        pick = (max if args.greater_is_better else min)
        best_step = pick(curve, key=lambda p: p.get(key, p["eval_loss"]))["step"]
    best = next((p for p in curve if p["step"] == best_step), None)
    stopped_early = state.global_step < state.max_steps
    restored = bool(args.load_best_model_at_end and best is not None)
    cap = (f"{args.max_steps} steps" if args.max_steps and args.max_steps > 0 else
           f"{args.num_train_epochs:g} epochs ({state.max_steps} steps)")
    if best is None:
        reason = f"no evaluation ran before the cap ({cap}): the last weights are kept"
    else:
        value = best.get(key, best["eval_loss"])
        reason = (f"{'highest' if args.greater_is_better else 'lowest'} {key} {value:.4f} at epoch "
                  f"{best['epoch']:g} (step {best['step']}) of {len(curve)} evaluations on {held_out} held-out "
                  "examples; " + (f"stopped early after {spec.patience} evaluation(s) without improvement"
                                  if stopped_early else f"trained to the cap, {cap}")
                  + ("; that checkpoint's weights restored" if restored else "; the last weights kept"))
    return {
        "examples": held_out, "holdout": spec.holdout, "patience": spec.patience, "metric": key,
        "greater_is_better": bool(args.greater_is_better), "curve": curve,
        "best_step": best["step"] if best else None, "best_epoch": best["epoch"] if best else None,
        "best_metric": best.get(key, best["eval_loss"]) if best else None, "restored": restored,
        "stopped_early": stopped_early, "cap_steps": int(state.max_steps),
        "eval_seconds": round(sum(float(h.get("eval_runtime", 0.0)) for h in state.log_history), 1),
        "reason": reason,
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker's finetune; its scratch directory (HF's own checkpoints) is removed afterwards."""
    scratch = tempfile.mkdtemp(prefix="distill-hf-")
    try:
        _train_loop(config, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train_loop(config: dict[str, Any], scratch: str) -> None:
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    job = TrainJob.model_validate(config)
    if not job.recipe.scaling.use_gpu:  # Ray pins OMP threads to 1 unless told otherwise
        torch.set_num_threads(max(1, int(job.recipe.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    # HF's own checkpoints are scratch: RayTrainReportCallback copies each into Ray Train's storage.
    trainer, n_examples, held_out = build_trainer(
        job, str(Path(scratch) / f"hf-{ctx.get_world_rank()}"), [RayTrainReportCallback()])
    trainer = prepare_trainer(trainer)
    started = time.perf_counter()
    trainer.train()  # with validation: ends on the best checkpoint's weights (load_best_model_at_end)
    history = trainer.state.log_history
    metrics = {
        "loss_history": [h["loss"] for h in history if "loss" in h],
        "loss_steps": [int(h["step"]) for h in history if "loss" in h],
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch, "examples": n_examples,
        "train_seconds": round(time.perf_counter() - started, 1),
        "validation": validation_summary(trainer, job.recipe.validation, held_out),
    }
    # The final adapter (with validation: the best checkpoint's) and the metrics as the run's last
    # checkpoint (rank 0 writes it).
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            trainer.model.save_pretrained(Path(tmp) / ADAPTER_SUBDIR)
            (Path(tmp) / "train_result.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in metrics.items() if k != "validation"}, checkpoint=checkpoint)


# --- on the driver (the Ray job) --------------------------------------------------------------------


def run_training(job: TrainJob) -> dict[str, Any]:
    """Fit the TorchTrainer; returns the metrics and where the final adapter checkpoint is."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not storage.exists(job.train_file):
        raise DistillError(f"training data not found: {job.train_file}")
    s = job.recipe.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.model_dump(),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={**s.resources, "CPU": s.cpus_per_worker}),
        # A URI: Ray Train writes its checkpoints to object storage through pyarrow, from every worker's node.
        run_config=RunConfig(storage_path=job.output_dir, name=job.name),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise DistillError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        metrics = json.loads((Path(ckpt) / "train_result.json").read_text())
    adapter_dir = storage.join(checkpoint_uri(result.checkpoint, job.output_dir), ADAPTER_SUBDIR)
    out: dict[str, Any] = {"adapter_dir": adapter_dir, "wall_seconds": round(time.perf_counter() - started, 1),
                           **metrics}
    if job.recipe.model.gguf is not None:  # local: llama.cpp serves base GGUF + a GGUF LoRA adapter
        out["adapter_gguf"] = export_gguf(adapter_dir, job)
    return out


def checkpoint_uri(checkpoint: Any, storage_path: str) -> str:
    """Where a Ray Train checkpoint is, as `storage_path` names places: a URI on object storage
    (`Checkpoint.path` drops the scheme there), else a local path."""
    if storage.is_uri(storage_path):
        return f"{storage_path.split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"
    return str(checkpoint.path)


def export_gguf(adapter_dir: str, job: TrainJob) -> str:
    """The adapter in llama.cpp's GGUF LoRA format, next to the job's other outputs."""
    assert job.recipe.model.gguf is not None
    dest = storage.join(job.output_dir, "adapter.gguf")
    if not storage.is_uri(job.output_dir):
        return str(export_lora_to_gguf(Path(adapter_dir), Path(dest), job.recipe.model.gguf.resolve()))
    with tempfile.TemporaryDirectory(prefix="distill-gguf-") as tmp:  # converted here, then uploaded
        local = storage.copy(adapter_dir, Path(tmp) / ADAPTER_SUBDIR)
        gguf = export_lora_to_gguf(Path(local), Path(tmp) / "adapter.gguf", job.recipe.model.gguf.resolve())
        return storage.copy(gguf, dest)


def job_main(job_path: str, result_path: str) -> int:
    """The Ray job's entrypoint (`python -m distill finetune-job ...`): run one finetune, write the result.

    Run through the `distill` CLI rather than as `python -m distill.student.finetune`, so that the training
    function is pickled by reference to this module, not by value from `__main__`.
    """
    try:
        job = TrainJob.model_validate_json(storage.read_text(job_path))
    except (DistillError, ValidationError) as e:
        print(f"error: bad finetune job {job_path}: {e}", file=sys.stderr)
        return 2
    try:
        result = run_training(job)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    storage.write_text(result_path, json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("loss_history", "loss_steps", "validation")}))
    if v := result.get("validation"):
        print(f"validation: {v['reason']}")
    return 0
