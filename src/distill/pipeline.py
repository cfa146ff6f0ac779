"""The main job: the pipeline's stages in order, on one profile. The notebook calls the same functions.

Every stage reads its inputs from and writes its outputs to the profile's artifact directory, and a
stage whose outputs are current (same fingerprint of the settings that produced them) is skipped with
a one-line message, so sections can be re-run alone after a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import dspy
from rich.console import Console

from distill.config import Config, load_config
from distill.curation import curate, plot_label_distribution, print_curation, save_sft, to_sft
from distill.data import (
    Banking77Data,
    make_example,
    prepare_data,
    read_jsonl,
    save_data,
    split_devset_and_optimizer_sets,
    write_jsonl,
)
from distill.env import check_env, missing
from distill.errors import DistillError
from distill.labeling import label_queries, quality_gate, read_records, score_teacher
from distill.program import IntentClassificationModule
from distill.report import load_report, update_report
from distill.serving.control import forward_env_names, serving
from distill.serving.lm import adapter, make_lm
from distill.teacher import GoldIndex, build_teacher

console = Console()

# Stages that are not built yet are listed, never faked.
PENDING_STAGES = [
    "evaluation and BootstrapFewShotWithRandomSearch (issue 6)",
    "serving /classify_intent (issue 7)",
]


def fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def setup(cfg: Config) -> None:
    """Environment check and DSPy's LM cache inside the artifact directory (so re-runs reuse calls)."""
    checks = check_env(cfg)
    for c in checks:
        console.print(c.line(), markup=False)
    if bad := missing(checks):
        raise DistillError("environment incomplete: " + "; ".join(c.line() for c in bad))
    cfg.artifacts.mkdir(parents=True, exist_ok=True)
    dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(cfg.artifacts / "dspy_cache"))


def data_stage(cfg: Config) -> Banking77Data:
    console.rule("data")
    data = prepare_data(cfg)
    save_data(data, cfg.artifacts / "data")
    s = data.summary()
    console.print(
        f"{s['source']}: train {s['train']}, test {s['test']} (using {s['test_used']}), {len(s['labels'])} labels, "
        f"gold {s['gold']}, unlabeled {s['unlabeled']} (teacher labels {s['to_label']})"
    )
    return data


def prompt_fingerprint(cfg: Config, labels: list[str]) -> str:
    """Changes whenever the prompt the program sends changes (adapter, signature, labels)."""
    program = IntentClassificationModule(labels, cfg.program.reasoning, cfg.program.max_reasoning_chars)
    return fingerprint(adapter().format(program.predictor.signature, [], {"text": ""}))


def teacher_fingerprint(cfg: Config, data: Banking77Data) -> str:
    return fingerprint(
        cfg.teacher.model_dump(exclude={"threads", "min_accuracy_gold"}), cfg.models.teacher.model,
        prompt_fingerprint(cfg, data.labels), [ex.text for ex in data.gold], [ex.text for ex in data.to_label],
    )


def teacher_stage(cfg: Config, data: Banking77Data) -> dict[str, Any]:
    """Quality gate on unseen gold, accuracy on the test queries (each measured once), then labeling."""
    console.rule("teacher: quality gate and labeling")
    fp = teacher_fingerprint(cfg, data)
    labels_dir, queries, floor = cfg.artifacts / "labels", data.to_label, cfg.teacher.min_accuracy_gold
    measured = load_report(cfg).get("teacher", {})
    if measured.get("fingerprint") != fp:
        measured = {}
    n_done = len(read_records(labels_dir / "labels.jsonl")) if _labels_current(labels_dir, fp) else 0
    if "accuracy_test" in measured and n_done == len(queries):
        quality_gate(measured["accuracy_gold"], measured["n_gold"], floor)
        console.print(f"teacher stage is current: {n_done} labels in {labels_dir / 'labels.jsonl'}; skipped")
        return measured

    t = cfg.models.teacher
    with serving(cfg.path(t.serve_config), t.api_base, models=[t.model], forward_env=forward_env_names(cfg)):
        lm = make_lm(t)
        index = None if cfg.teacher.strategy == "zero_shot" else GoldIndex(data.gold, cfg.teacher.embedder)
        if "accuracy_gold" not in measured:
            loo = build_teacher(cfg, data.labels, data.gold, exclude_identical=True, index=index)
            gate_set = data.gold[: cfg.teacher.gate_size] if cfg.teacher.gate_size else data.gold
            gate = score_teacher(loo, lm, gate_set, data.labels, cfg.teacher.threads)
            measured = update_report(cfg, "teacher", {
                "fingerprint": fp, "model": t.model, **cfg.teacher.model_dump(include={"strategy", "k", "candidate_k"}),
                "accuracy_gold": round(gate.accuracy, 4), "valid_rate_gold": round(gate.valid_rate, 4),
                "n_gold": gate.n,
            })["teacher"]
        quality_gate(measured["accuracy_gold"], measured["n_gold"], floor)
        teacher = build_teacher(cfg, data.labels, data.gold, index=index)
        if "accuracy_test" not in measured:
            test = score_teacher(teacher, lm, data.test, data.labels, cfg.teacher.threads)
            console.print(f"teacher accuracy on {test.n} test queries: [bold]{test.accuracy:.1%}[/] "
                          f"(valid {test.valid_rate:.1%})")
            update_report(cfg, "teacher", {
                "accuracy_test": round(test.accuracy, 4), "valid_rate": round(test.valid_rate, 4),
                "test_size": test.n, "test_queries_per_s": round(test.per_s, 3),
            })
        result = label_queries(teacher, lm, queries, labels_dir, threads=cfg.teacher.threads, fingerprint=fp)
    values: dict[str, Any] = {"labeled": result.labeled, "to_label": len(queries), "failed_last_run": result.failed}
    if result.new:
        values["labels_per_s"] = round(result.new / result.seconds, 3)
    report = update_report(cfg, "teacher", values)
    if result.labeled < len(queries):
        raise DistillError(f"{len(queries) - result.labeled} queries are not labeled yet (errors in "
                           f"{labels_dir / 'errors.jsonl'}); run the teacher stage again to retry them")
    return report["teacher"]


def _labels_current(labels_dir: Path, fp: str) -> bool:
    meta = labels_dir / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp


def curation_stage(cfg: Config, data: Banking77Data) -> dict[str, Any]:
    """Curate the labels, split them (devset / optimizer val / optimizer train) and write SFT data."""
    console.rule("curation and SFT data")
    records = read_records(cfg.artifacts / "labels" / "labels.jsonl")
    if not records:
        raise DistillError("no teacher labels yet: run the teacher stage first")
    # Decontaminate against the whole test set, not only the profile's subset of it.
    result = curate(records, data.labels, [ex.text for ex in data.full_test])
    print_curation(result)
    out = cfg.artifacts / "curated"
    plot = plot_label_distribution(result.label_counts, out / "label_distribution.png")
    examples = [make_example(r["text"], r["label"]) for r in result.kept]
    dev, train, val = split_devset_and_optimizer_sets(
        examples, cfg.data.devset_size, cfg.data.optimizer_val_size, cfg.data.optimizer_train_size
    )
    for name, split in (("devset", dev), ("optimizer_train", train), ("optimizer_val", val)):
        write_jsonl(out / f"{name}.jsonl", [dict(ex.items()) for ex in split])
    # The student is finetuned on the optimizer trainset only: the synthetic devset stays unseen.
    train_texts = {ex.text for ex in train}
    program = IntentClassificationModule(data.labels, cfg.program.reasoning, cfg.program.max_reasoning_chars)
    sft = to_sft([r for r in result.kept if r["text"] in train_texts], program, adapter())
    save_sft(sft, out / "sft.jsonl")
    console.print(f"wrote {len(sft)} SFT examples to {out / 'sft.jsonl'}, label chart {plot}")
    return update_report(cfg, "curation", {
        **result.counts, "devset": len(dev), "optimizer_train": len(train), "optimizer_val": len(val),
        "sft_examples": len(sft), "label_counts": result.label_counts,
    })["curation"]


def finetune_stage(cfg: Config) -> dict[str, Any]:
    """LoRA-finetune the student on the SFT data as a Ray job, through DSPy's `LM.finetune`."""
    import yaml

    from distill.provider import RayJobProvider
    from distill.serving.control import ensure_ray, shutdown

    console.rule("finetune the student (Ray job)")
    ft = cfg.finetune
    sft_path = cfg.artifacts / "curated" / "sft.jsonl"
    if not sft_path.is_file():
        raise DistillError("no SFT data yet: run the curation stage first")
    out = cfg.artifacts / "finetune"
    overrides = {"training": {k: v for k, v in (("max_steps", ft.max_steps), ("epochs", ft.epochs)) if v is not None}}
    fp = fingerprint(sft_path.read_text(), cfg.path(ft.recipe).read_text(), overrides, ft.finetuned_model)
    done = load_report(cfg).get("finetune", {})
    if done.get("fingerprint") == fp and Path(done.get("serve_config", "/nonexistent")).is_file():
        console.print(f"finetune is current ({done['model']}, adapter {done['adapter']}); skipped")
        return done

    address = ft.address or os.environ.get("RAY_ADDRESS")
    started_ray = address is None
    try:
        if started_ray:  # a local Ray with its job server; the job's trainer uses both cores
            address = "http://" + ensure_ray(dashboard=True)
        student = make_lm(cfg.models.student, provider=RayJobProvider())
        job = student.finetune(
            train_data=read_jsonl(sft_path), train_data_format=None,
            train_kwargs={
                "recipe": str(cfg.path(ft.recipe)), "overrides": overrides, "output_dir": str(out),
                "job_config": str(cfg.path(ft.job_config)), "address": address, "python": ft.python,
                "finetuned_model": ft.finetuned_model, "timeout_s": ft.timeout_s,
            },
        )
        finetuned = job.result()  # raises if the job failed
    finally:
        if started_ray:
            shutdown()
    result = job.train_kwargs["result"]
    # The student application, now serving the base student and the finetuned one (base GGUF + adapter).
    serve_cfg = yaml.safe_load(cfg.path(cfg.models.student.serve_config).read_text())
    models = serve_cfg["applications"][0]["args"]["models"]
    base = next(m for m in models if m["name"] == cfg.models.student.model)
    models[:] = [base, {**base, "name": ft.finetuned_model, "lora_path": result.get("adapter_gguf")}]
    serve_path = out / "serve_student.yaml"
    serve_path.write_text(yaml.safe_dump(serve_cfg, sort_keys=False))
    losses = result.get("loss_history") or [None]
    return update_report(cfg, "finetune", {
        "fingerprint": fp, "model": finetuned.model.split("/", 1)[-1], "adapter": result.get("adapter_gguf") or
        result["adapter_dir"], "serve_config": str(serve_path), "wall_seconds": result["wall_seconds"],
        "train_seconds": result.get("train_seconds"), "examples": result.get("examples"),
        "epochs": result.get("epochs"), "steps": result.get("steps"), "first_loss": losses[0], "last_loss": losses[-1],
        "recipe": ft.recipe,
    })["finetune"]


def run(profile: str | None = None) -> Config:
    cfg = load_config(profile)
    console.rule(f"distill: profile [bold]{cfg.name}[/] ({cfg.profile})")
    setup(cfg)
    data = data_stage(cfg)
    teacher_stage(cfg, data)
    curation_stage(cfg, data)
    finetune_stage(cfg)
    console.rule("not run yet")
    for stage in PENDING_STAGES:
        console.print(f"[yellow]not implemented yet[/]: {stage}")
    return cfg
