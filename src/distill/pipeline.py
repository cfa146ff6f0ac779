"""The main job: the pipeline's stages in order, on one profile. The notebook calls the same functions.

Every stage reads its inputs from and writes its outputs to the profile's artifact directory, and a
stage whose outputs are current (same fingerprint of the settings that produced them) is skipped with
a one-line message, so sections can be re-run alone after a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

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
from distill.evaluation import (
    evaluate_and_prompt_optimize,
    measure_calls,
    run_testset_evaluation,
)
from distill.lm import adapter, make_lm
from distill.labeling import label_queries, quality_gate, read_records, score_teacher
from distill.plots import plot_confusion_matrix, plot_variant_scores
from distill.program import DeployParams, IntentClassificationModule, ProgramParams, load_program
from distill.report import load_report, update_report
from distill.serving.control import forward_env_names, serving
from distill.teacher import GoldIndex, build_teacher

console = Console()


def fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


_run_started: float | None = None


def setup(cfg: Config) -> None:
    """Environment check and DSPy's LM cache inside the artifact directory (so re-runs reuse calls)."""
    global _run_started
    _run_started = time.time()
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
    latency_current = load_report(cfg).get("latency", {}).get("teacher", {}).get("fingerprint") == fp
    if "accuracy_test" in measured and n_done == len(queries) and latency_current:
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
        if not latency_current:  # the same test queries the best student is timed on later
            calls = measure_calls(teacher, make_lm(t, cache=False), data.test[: cfg.evaluation.latency_queries])
            _record_calls(cfg, "teacher", {**calls, "model": t.model, "fingerprint": fp})
    values: dict[str, Any] = {"labeled": result.labeled, "to_label": len(queries), "failed_last_run": result.failed}
    if result.new:
        values["labels_per_s"] = round(result.new / result.seconds, 3)
    report = update_report(cfg, "teacher", values)
    if result.labeled < len(queries):
        raise DistillError(f"{len(queries) - result.labeled} queries are not labeled yet (errors in "
                           f"{labels_dir / 'errors.jsonl'}); run the teacher stage again to retry them")
    return report["teacher"]


def _record_calls(cfg: Config, who: str, calls: dict[str, Any]) -> None:
    """Latency per call into `latency`, tokens per query into `cost`, under the same name."""
    tokens = {k: calls.pop(k) for k in ("prompt_tokens_per_query", "completion_tokens_per_query")}
    update_report(cfg, "latency", {who: calls})
    update_report(cfg, "cost", {who: {**tokens, "model": calls["model"]}})
    console.print(f"{who} ({calls['model']}): p50 {calls['p50_s']:.3f} s per call, "
                  f"{tokens['prompt_tokens_per_query']:.0f} prompt + {tokens['completion_tokens_per_query']:.0f} "
                  f"completion tokens per query")


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
    published = None
    if ft.adapter_storage:  # cluster: where ray.serve.llm loads the adapter from
        from distill.publish import adapter_name, point_model_config, publish_adapter

        published = publish_adapter(result["adapter_dir"], ft.adapter_storage, adapter_name(ft.finetuned_model))
        if ft.model_config_path and point_model_config(cfg.path(ft.model_config_path), ft.adapter_storage):
            console.print(f"{ft.model_config_path}: dynamic_lora_loading_path -> {ft.adapter_storage}")
        console.print(f"adapter published to {published}")
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
        "recipe": ft.recipe, "published": published,
    })["finetune"]


def evaluation_fingerprint(cfg: Config, data: Banking77Data) -> str:
    curated = cfg.artifacts / "curated"
    return fingerprint(
        prompt_fingerprint(cfg, data.labels), load_report(cfg).get("finetune", {}).get("fingerprint"),
        [(curated / f"{n}.jsonl").read_text() for n in ("devset", "optimizer_train", "optimizer_val")],
        [ex.text for ex in data.test], cfg.evaluation.model_dump(exclude={"threads", "max_errors"}),
        cfg.models.student.model, cfg.program.model_dump(), cfg.seed,
    )


def evaluation_stage(cfg: Config, data: Banking77Data) -> dict[str, Any]:
    """Base and finetuned student, zero-shot and BFRS-optimized: devset, test set, best, plots, deploy params."""
    console.rule("evaluation and prompt optimization (BootstrapFewShotWithRandomSearch)")
    finetuned = load_report(cfg).get("finetune", {})
    serve_config = Path(finetuned.get("serve_config", "/nonexistent"))
    curated = cfg.artifacts / "curated"
    if not serve_config.is_file() or not (curated / "devset.jsonl").is_file():
        raise DistillError("no finetuned student yet: run the curation and finetune stages first")
    out, ev, st = cfg.artifacts / "eval", cfg.evaluation, cfg.models.student
    fp = evaluation_fingerprint(cfg, data)
    done = load_report(cfg).get("eval", {})
    if done.get("fingerprint") == fp and deploy_params_path(cfg).is_file() and all(
        Path(p).is_file() for p in done.get("plots", {}).values()
    ):
        b = done["best"]
        console.print(f"evaluation is current: best {b['kind']} {b['variant']} ({b['model']}) "
                      f"{b['test_score']:.1%} on the test set; skipped")
        return done

    dev, train, val = (
        [make_example(r["text"], r["label"]) for r in read_jsonl(curated / f"{n}.jsonl")]
        for n in ("devset", "optimizer_train", "optimizer_val")
    )
    kinds = {"base": st.model, "finetuned": finetuned["model"]}
    program_kw = {"reasoning": cfg.program.reasoning, "max_reasoning_chars": cfg.program.max_reasoning_chars}
    bfrs = ev.bfrs.model_dump()
    opt_fp = {k: fingerprint(m, finetuned.get("fingerprint") if k == "finetuned" else None, bfrs, cfg.seed,
                             prompt_fingerprint(cfg, data.labels), [ex.text for ex in train + val],
                             [ex.label for ex in train + val])
              for k, m in kinds.items()}
    started = time.perf_counter()
    with _lm_cache(cfg.artifacts / "dspy_cache_eval" / str(finetuned.get("fingerprint")), cfg.artifacts / "dspy_cache"), \
            serving(serve_config, st.api_base, models=list(kinds.values()), forward_env=forward_env_names(cfg)):
        lms = {k: make_lm(st, model=m) for k, m in kinds.items()}
        dev_scores, variants = evaluate_and_prompt_optimize(
            lms, data.labels, dev, train, val, out, bfrs, ev.threads, ev.max_errors, opt_fp, **program_kw)
        best_path, best_model, best_score, test_scores = run_testset_evaluation(
            lms, variants, data.labels, data.test, out, ev.threads, ev.max_errors, dev_scores, **program_kw)
        best = next(v for v in variants if str(v.program_path) == best_path)
        calls = measure_calls(load_program(best_path, data.labels, **program_kw),
                              make_lm(st, model=best_model, cache=False), data.test[: ev.latency_queries])
    _record_calls(cfg, "student_best", {**calls, "model": best_model, "variant": f"{best.kind} {best.variant}"})

    teacher = load_report(cfg).get("teacher", {})
    plots = {
        "devset": plot_variant_scores(dev_scores, out / "devset_scores.png",
                                      f"Synthetic devset ({len(dev)} teacher-labeled queries)",
                                      teacher.get("accuracy_gold"), "teacher on gold (leave-one-out)"),
        "testset": plot_variant_scores(test_scores, out / "testset_scores.png",
                                       f"Test set ({len(data.test)} queries)", teacher.get("accuracy_test"), "teacher"),
    }
    preds = read_jsonl(out / "predictions" / "testset" / f"{best.kind}_{best.variant}.jsonl")
    plots["confusion"] = plot_confusion_matrix(
        [p["label"] for p in preds], [p["predicted"] for p in preds], data.labels, out / "confusion_best.png",
        f"Best variant on the test set: {best.kind} {best.variant} ({best_score:.1%})")
    DeployParams(model=best_model, program_path=best_path, labels=data.labels, variant=best.variant, kind=best.kind,
                 test_score=best_score, program=ProgramParams(**program_kw)).save(deploy_params_path(cfg))
    console.print(f"best: [bold]{best.kind} {best.variant}[/] ({best_model}) {best_score:.1%} on the test set -> "
                  f"{deploy_params_path(cfg)}")
    return update_report(cfg, "eval", {
        "fingerprint": fp, "devset": dev_scores, "testset": test_scores,
        "best": {"kind": best.kind, "variant": best.variant, "model": best_model, "program_path": best_path,
                 "test_score": best_score, "devset_score": dev_scores[best.kind][best.variant]},
        "sizes": {"devset": len(dev), "testset": len(data.test), "optimizer_train": len(train),
                  "optimizer_val": len(val)},
        "bfrs": bfrs, "plots": {k: str(v) for k, v in plots.items()},
        "wall_seconds": round(time.perf_counter() - started, 1),
    })["eval"]


@contextlib.contextmanager
def _lm_cache(path: Path, restore: Path) -> Iterator[None]:
    """DSPy's LM cache in `path` for this block, then `restore`.

    DSPy keys its cache on the model id and the request, not on the weights behind the id: a retrained
    adapter is served under the same id, so the evaluation keeps one cache per finetune (by fingerprint).
    """
    dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(path))
    try:
        yield
    finally:
        dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(restore))


def deploy_params_path(cfg: Config) -> Path:
    """The profile's deploy parameters: best model id, saved program, labels (read by the serving app)."""
    return cfg.artifacts / "deploy_params.json"


def deploy_config(cfg: Config) -> Path:
    """The profile's multi-app Serve config with this run's artifact paths filled in."""
    import yaml

    from distill.serving.control import load_serve_config

    raw = load_serve_config(cfg.path(cfg.serving.deploy_config))
    adapter_path = load_report(cfg).get("finetune", {}).get("adapter")
    for app in raw["applications"]:
        if app["import_path"] == "distill.serving.app:build_app":
            app["args"]["deploy_params"] = str(deploy_params_path(cfg))
        elif app["import_path"] == "distill.serving.llm:build_app" and adapter_path:
            for m in app["args"]["models"]:
                if m.get("lora_path"):
                    m["lora_path"] = adapter_path
    out = cfg.artifacts / "deploy_dspy.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _program_app_env(path: Path) -> tuple[list[str], dict[str, str]]:
    """Variables the program app reads (forwarded to its replicas) and the client's auth header."""
    import yaml

    names: list[str] = []
    headers: dict[str, str] = {}
    for app in yaml.safe_load(path.read_text())["applications"]:
        if app["import_path"] == "distill.serving.app:build_app":
            args = app.get("args", {})
            names += [args[k] for k in ("api_key_env", "llm_api_key_env", "llm_api_base_env") if args.get(k)]
            key = os.environ.get(args.get("api_key_env") or "")
            if key:
                headers = {"Authorization": f"Bearer {key}"}
    return names, headers


def client_headers(cfg: Config) -> dict[str, str]:
    """The Authorization header a client of the profile's program app sends (if its key is set)."""
    return _program_app_env(cfg.path(cfg.serving.deploy_config))[1]


def serving_stage(cfg: Config, data: Banking77Data, keep_running: bool = False) -> dict[str, Any]:
    """Deploy the program and its LLM as one Serve deployment and classify test queries over HTTP.

    With `keep_running` (the notebook) the deployment stays up for you to query; `shutdown()` ends it.
    On any failure it is torn down before the error propagates.
    """
    import httpx

    from distill.serving.control import shutdown, start_serve_config, wait_until_healthy

    console.rule("serving: POST /classify_intent")
    if not deploy_params_path(cfg).is_file():
        raise DistillError("no deploy params yet: run the evaluation stage first")
    labels = set(DeployParams.load(deploy_params_path(cfg)).labels)
    path = deploy_config(cfg)
    env_names, headers = _program_app_env(path)
    url = cfg.serving.url
    try:
        start_serve_config(path, forward_env=[*forward_env_names(cfg), *env_names])
        health = wait_until_healthy(f"{url}/healthz", cfg.serving.timeout_s, headers)
        rows = []
        with httpx.Client(timeout=120, headers=headers) as client:
            for ex in data.test[: cfg.serving.sample_queries]:
                r = client.post(url, json={"query": ex.text})
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                rows.append({"status": r.status_code, "label": body.get("label"), "gold": ex.label,
                             "latency_ms": body.get("latency_ms")})
    except BaseException:
        shutdown()
        raise
    if not keep_running:
        shutdown()
    ok = [r for r in rows if r["status"] == 200]
    summary = {
        "url": url, "config": str(path), "model": health.get("model"), "queries": len(rows), "ok": len(ok),
        "valid_share": round(sum(r["label"] in labels for r in ok) / max(1, len(rows)), 4),
        "accuracy": round(sum(r["label"] == r["gold"] for r in ok) / max(1, len(rows)), 4),
        "p50_latency_ms": round(statistics.median(r["latency_ms"] for r in ok), 1) if ok else None,
    }
    for r in rows[:5]:
        console.print(f"  {r['status']} {r['label']!s:45} (true: {r['gold']}, {r['latency_ms']} ms)", markup=False)
    console.print(f"{summary['ok']}/{summary['queries']} answered over HTTP, valid labels {summary['valid_share']:.0%}, "
                  f"accuracy {summary['accuracy']:.0%}" + (f"; still serving at {url}" if keep_running else ""))
    return update_report(cfg, "serving", summary)["serving"]


def finish_run(cfg: Config) -> dict[str, Any]:
    """Write the report's `run` block (wall time since `setup`, sizes, versions) and print the summary."""
    import importlib.metadata as md

    values: dict[str, Any] = {
        "profile": cfg.name,
        "sizes": {**cfg.data.model_dump(exclude={"dir", "hub_id", "hub_revision"}),
                  "finetune_max_steps": cfg.finetune.max_steps, "bfrs": cfg.evaluation.bfrs.model_dump()},
        "versions": {d: md.version(d) for d in ("dspy", "ray", "llama_cpp_python", "torch", "transformers", "peft",
                                                 "trl")},
    }
    if _run_started is not None:
        values["wall_seconds"] = round(time.time() - _run_started, 1)
    report = update_report(cfg, "run", values)
    print_summary(report)
    return report["run"]


def print_summary(report: dict[str, Any]) -> None:
    """The headline numbers of a report as one table."""
    from rich.table import Table

    t, c, f, e, r = (report.get(k, {}) for k in ("teacher", "curation", "finetune", "eval", "run"))
    lat, cost, srv = report.get("latency", {}), report.get("cost", {}), report.get("serving", {})

    def pct(x: Any) -> str:
        return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"

    table = Table(title=f"distill run summary ({r.get('profile', '?')})", show_header=False)
    rows = [
        ("teacher accuracy: gold (leave-one-out) / test", f"{pct(t.get('accuracy_gold'))} / {pct(t.get('accuracy_test'))}"),
        ("labeled -> kept after curation", f"{t.get('labeled', '-')} -> {c.get('kept', '-')}"),
        ("finetune: steps, loss first -> last, wall",
         f"{f.get('steps', '-')}, {f.get('first_loss', 0):.3f} -> {f.get('last_loss', 0):.3f}, {f.get('wall_seconds', '-')} s"
         if f else "-"),
    ]
    for split in ("devset", "testset"):
        for kind, variants in e.get(split, {}).items():
            rows.append((f"{split}: {kind} student zero-shot / BFRS",
                         f"{pct(variants.get('vanilla'))} / {pct(variants.get('bfrs'))}"))
    if b := e.get("best"):
        rows.append(("best variant (test set)", f"{b['kind']} {b['variant']} ({b['model']}) {pct(b['test_score'])}"))
    for who in ("teacher", "student_best"):
        if who in lat:
            rows.append((f"{who}: p50 per call, tokens/query (prompt + completion)",
                         f"{lat[who]['p50_s']:.3f} s, {cost.get(who, {}).get('prompt_tokens_per_query', '-')} + "
                         f"{cost.get(who, {}).get('completion_tokens_per_query', '-')}"))
    if srv:
        rows.append(("served /classify_intent: ok, valid labels, accuracy",
                     f"{srv['ok']}/{srv['queries']}, {pct(srv['valid_share'])}, {pct(srv['accuracy'])}"))
    if "wall_seconds" in r:
        rows.append(("wall time", f"{r['wall_seconds'] / 60:.1f} min"))
    for k, v in rows:
        table.add_row(k, v)
    Console(width=max(console.width, 110)).print(table)


def run(profile: str | None = None) -> Config:
    cfg = load_config(profile)
    console.rule(f"distill: profile [bold]{cfg.name}[/] ({cfg.profile})")
    setup(cfg)
    data = data_stage(cfg)
    teacher_stage(cfg, data)
    curation_stage(cfg, data)
    finetune_stage(cfg)
    evaluation_stage(cfg, data)
    serving_stage(cfg, data)
    finish_run(cfg)
    return cfg
