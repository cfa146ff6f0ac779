"""Serve-config templating: the student's config after a finetune, and the deploy config of a run.

Both kinds of LLM application are handled:
- ours (`distill.serving.llm:build_app`, local): `args.models`, a GGUF base plus a llama.cpp LoRA adapter;
- `ray.serve.llm:build_openai_app` (cluster): `args.llm_configs`, LLMConfigs whose LoRA adapters are loaded
  from `lora_config.dynamic_lora_loading_path` (object storage only).
The templated configs are written under the artifact directory; the tracked configs are never edited.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from distill.config import resolve_path
from distill.errors import DistillError
from distill.serving.control import load_serve_config

LOCAL_LLM_APP = "distill.serving.llm:build_app"
RAY_LLM_APP = "ray.serve.llm:build_openai_app"
PROGRAM_APP = "distill.serving.app:build_app"
CASCADE_APP = "distill.serving.cascade:build_app"
TEACHER_APP = "distill.teacher_app:build_app"  # above the stages (it rebuilds the teacher): named, not imported
# Applications that serve a program (their args are ProgramAppArgs-like), not an LLM.
PROGRAM_APPS = (PROGRAM_APP, CASCADE_APP, TEACHER_APP)
# What ray.serve.llm's LoraConfig accepts for dynamic_lora_loading_path.
OBJECT_STORAGE = ("s3://", "gs://", "abfss://", "azure://")


def llm_config_class() -> Any:
    try:  # the public name needs vLLM installed ...
        from ray.serve.llm import LLMConfig
    except ImportError:  # ... the class it re-exports does not
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    return LLMConfig


def _load_llm_config(ref: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(ref, dict):
        return copy.deepcopy(ref)
    p = resolve_path(ref)
    if not p.is_file():
        raise DistillError(f"LLMConfig file not found: {p}")
    return yaml.safe_load(p.read_text()) or {}


def with_finetuned_student(app: dict[str, Any], base_model: str, finetuned_model: str,
                           adapter: str | None, lora_storage: str | None = None) -> dict[str, Any]:
    """The LLM application `app`, serving `finetuned_model` (base + adapter) next to `base_model`."""
    app = copy.deepcopy(app)
    args = app.setdefault("args", {})
    if app["import_path"] == LOCAL_LLM_APP:
        models = args.get("models") or []
        base = next((m for m in models if m["name"] == base_model), None)
        if base is None:
            raise DistillError(f"application {app.get('name')!r} does not serve the base student {base_model!r}")
        tuned = next((m for m in models if m["name"] == finetuned_model), None)
        if tuned is None:
            models.append({**base, "name": finetuned_model, "lora_path": adapter})
        else:
            tuned["lora_path"] = adapter
        return app
    if app["import_path"] == RAY_LLM_APP:
        configs = [_load_llm_config(ref) for ref in args.get("llm_configs") or []]
        base = next((c for c in configs if c.get("model_loading_config", {}).get("model_id") == base_model), None)
        if base is None:
            raise DistillError(f"application {app.get('name')!r} has no LLMConfig with model_id {base_model!r}")
        if lora_storage is not None:
            _require_object_storage(lora_storage)
            base.setdefault("lora_config", {})["dynamic_lora_loading_path"] = lora_storage.rstrip("/")
        if not (base.get("lora_config") or {}).get("dynamic_lora_loading_path"):
            raise DistillError(f"the LLMConfig of {base_model!r} has no lora_config.dynamic_lora_loading_path: "
                               f"{finetuned_model!r} could not be served")
        llm_config_class().model_validate(base)  # Ray's own validation, before anything is deployed
        args["llm_configs"] = configs
        return app
    raise DistillError(f"application {app.get('name')!r}: unknown LLM application {app['import_path']!r} "
                       f"(expected {LOCAL_LLM_APP} or {RAY_LLM_APP})")


def model_entries(raw: dict[str, Any], model: str) -> list[dict[str, Any]]:
    """How the LLM applications of a Serve config (`raw`) serve `model`: each llama.cpp app's model entry of
    that name, and each ray.serve.llm app's LLMConfig with that model_id (its file loaded) without its
    `deployment_config` -- replica counts and request limits size a deployment, they do not change what the
    model answers. Two configs that give the same entries serve the model alike."""
    out: list[dict[str, Any]] = []
    for app in raw["applications"]:
        args = app.get("args") or {}
        if app["import_path"] == LOCAL_LLM_APP:
            out += [copy.deepcopy(m) for m in args.get("models") or [] if m.get("name") == model]
        elif app["import_path"] == RAY_LLM_APP:
            for ref in args.get("llm_configs") or []:
                c = _load_llm_config(ref)
                if (c.get("model_loading_config") or {}).get("model_id") == model:
                    c.pop("deployment_config", None)
                    out.append(c)
    return out


def check_lora_storage(serve_config: str | Path, lora_storage: str | None) -> None:
    """Refuse, before a finetune starts, adapter storage the student's LLM application cannot load from.

    ray.serve.llm's LoraConfig reads adapters from object storage only: a local path or a file:// URI would be
    published after an hour of training and then fail when the student config is templated or served.
    """
    raw = load_serve_config(resolve_path(serve_config))
    if not any(app["import_path"] == RAY_LLM_APP for app in raw["applications"]):
        return  # our llama.cpp app loads the adapter from a local file
    if lora_storage is None:
        raise DistillError(f"{serve_config} serves the student with ray.serve.llm, which loads LoRA adapters only "
                           f"from object storage: set finetune.adapter_storage ({', '.join(OBJECT_STORAGE)})")
    _require_object_storage(lora_storage)


def _require_object_storage(lora_storage: str) -> None:
    if not lora_storage.startswith(OBJECT_STORAGE):
        raise DistillError(
            f"ray.serve.llm loads LoRA adapters only from object storage ({', '.join(OBJECT_STORAGE)}), "
            f"not {lora_storage!r}: set finetune.adapter_storage to a bucket")


def template_serve_config(source: str | Path, out: Path, *, base_model: str, finetuned_model: str,
                          adapter: str | None, lora_storage: str | None = None,
                          deploy_params: str | Path | None = None, cascade_params: str | Path | None = None,
                          teacher: dict[str, str] | None = None) -> Path:
    """Copy a Serve config with the finetuned student in its LLM application (and, for a multi-app deploy
    config, the program or cascade app pointed at `deploy_params`, the cascade at `cascade_params`, the
    teacher program app's args updated with `teacher`: its `profile` and `artifacts_dir`); validated with
    Ray's schema before it is written."""
    raw = load_serve_config(resolve_path(source))
    apps = []
    for app in raw["applications"]:
        if app["import_path"] in PROGRAM_APPS:
            app = copy.deepcopy(app)
            args = app.setdefault("args", {})
            if deploy_params is not None and app["import_path"] != TEACHER_APP:
                args["deploy_params"] = str(deploy_params)
            if cascade_params is not None and app["import_path"] == CASCADE_APP:
                args["cascade"]["cascade_params"] = str(cascade_params)
            if teacher is not None and app["import_path"] == TEACHER_APP:
                args.update(teacher)
        else:
            app = with_finetuned_student(app, base_model, finetuned_model, adapter, lora_storage)
        apps.append(app)
    raw["applications"] = apps
    return _write_serve_config(raw, out)


# --- the cluster configs on CPU (the rehearsal: vLLM's CPU build behind ray.serve.llm) ----------------

# Engine settings only a GPU has; the CPU build refuses or ignores them.
GPU_ENGINE_KWARGS = ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization")


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """The dtype vLLM's CPU build computes in here: bfloat16 where the CPU has bf16 instructions (AVX-512 BF16
    or AMX), else float32. Without them vLLM's bf16 kernels convert on every operation, and the rehearsal's
    teacher calls took minutes on an AVX2-only host."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = set(cpuinfo.split())
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity where the OS has one, else every CPU)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; not macOS
    return sorted(affinity(0)) if affinity else list(range(os.cpu_count() or 1))


def cpu_llm_config(llm_config: dict[str, Any], model_source: str, max_model_len: int = 2048,
                   kv_cache_gib: int = 2) -> dict[str, Any]:
    """A cluster LLMConfig as vLLM's CPU build runs it: the same model id, LoRA and engine settings, with
    local weights (`model_source`), a CPU accelerator, one replica and a shorter context.

    What changes, and why: `accelerator_type` (a GPU name) becomes `accelerator_config: {kind: cpu}`;
    tensor/pipeline parallelism and GPU memory share go (one CPU worker); `max_model_len` is capped so the
    KV cache fits `kv_cache_gib` (VLLM_CPU_KVCACHE_SPACE); autoscaling is pinned to one replica (each
    would be another vLLM engine on the same cores); eager mode, and vLLM's kernels on every core this
    process may use. Validated with Ray's LLMConfig.
    """
    c = copy.deepcopy(llm_config)
    c.pop("accelerator_type", None)
    c["accelerator_config"] = {"kind": "cpu"}
    c.setdefault("model_loading_config", {})["model_source"] = model_source
    engine = c.setdefault("engine_kwargs", {})
    for key in GPU_ENGINE_KWARGS:
        engine.pop(key, None)
    engine["max_model_len"] = min(int(engine.get("max_model_len", max_model_len)), max_model_len)
    engine["dtype"] = cpu_dtype()  # the exported weights are bf16; vLLM casts them at load
    # No torch.compile: on CPU it cost the cold start more than a minute, and calls were no faster with it
    # (benchmarks/probes/vllm_cpu_start.py).
    engine["enforce_eager"] = True
    deployment = c.setdefault("deployment_config", {})
    if "autoscaling_config" in deployment:
        deployment["autoscaling_config"] = {**deployment["autoscaling_config"], "min_replicas": 1,
                                            "max_replicas": 1}
    env = c.setdefault("runtime_env", {}).setdefault("env_vars", {})
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    # vLLM keeps one core for its scheduler and binds its kernels to the rest: one core of two. Every core
    # this process may use made its calls ~25% faster (benchmarks/probes/vllm_cpu_start.py).
    env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(cpu) for cpu in usable_cpus())
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    llm_config_class().model_validate(c)
    return c


def cpu_serve_config(source: str | Path, out: Path, model_source: str, max_model_len: int = 2048) -> Path:
    """Copy a Serve config with every ray.serve.llm application's LLMConfigs made `cpu_llm_config`s (inlined);
    the other applications are kept as they are. Validated with Ray's schema before it is written."""
    raw = load_serve_config(resolve_path(source))
    found = False
    for app in raw["applications"]:
        if app["import_path"] == RAY_LLM_APP:
            args = app.setdefault("args", {})
            args["llm_configs"] = [cpu_llm_config(_load_llm_config(ref), model_source, max_model_len)
                                   for ref in args.get("llm_configs") or []]
            found = found or bool(args["llm_configs"])
    if not found:
        raise DistillError(f"{source}: no {RAY_LLM_APP} application with llm_configs to run on CPU")
    return _write_serve_config(raw, out)


def _write_serve_config(raw: dict[str, Any], out: Path) -> Path:
    """Write `raw` to `out` only once Ray's schema accepts it (through a temporary file, so a bad config
    never replaces a good one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_serve_config(tmp)
    tmp.replace(out)
    return out
