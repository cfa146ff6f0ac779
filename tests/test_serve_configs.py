"""Every serve config validates with Ray's own schemas and references only files that exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from distill.serving.app import ProgramAppArgs
from distill.serving.deploy import llm_config_class
from distill.serving.llm import LLMAppArgs

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_CONFIGS = ["serve_70B.yaml", "serve_1B.yaml"]
LOCAL_CONFIGS = ["configs/serve_local_teacher.yaml", "configs/serve_local_student.yaml"]
DEPLOY_CONFIGS = ["local_deploy_dspy.yaml", "configs/deploy/cluster_deploy_dspy.yaml",
                  "configs/deploy/program_service.yaml"]
# The cascade (issue 31) and the program-app-alone config each one stands beside.
CASCADE_CONFIGS = {"configs/deploy/local_deploy_cascade.yaml": "local_deploy_dspy.yaml",
                   "configs/deploy/cluster_deploy_cascade.yaml": "configs/deploy/cluster_deploy_dspy.yaml"}


def _apps(path: str) -> list[dict]:
    raw = yaml.safe_load((ROOT / path).read_text())
    ServeDeploySchema.model_validate(raw)
    return raw["applications"]


@pytest.mark.parametrize("path", CLUSTER_CONFIGS)
def test_cluster_configs_use_ray_serve_llm(path: str) -> None:
    LLMConfig = llm_config_class()
    for app in _apps(path):
        assert app["import_path"] == "ray.serve.llm:build_openai_app"
        for ref in app["args"]["llm_configs"]:
            f = ROOT / ref
            assert f.is_file(), f"{path} references missing {ref}"
            cfg = LLMConfig.model_validate(yaml.safe_load(f.read_text()))
            assert cfg.engine_kwargs.get("tensor_parallel_size", 0) >= 1
            assert cfg.deployment_config.get("autoscaling_config")


def test_student_has_lora() -> None:
    LLMConfig = llm_config_class()
    cfg = LLMConfig.model_validate(yaml.safe_load((ROOT / "model_config/meta-llama--Llama-3_2-1B-Instruct.yaml").read_text()))
    assert cfg.lora_config is not None and cfg.lora_config.dynamic_lora_loading_path.startswith(("s3://", "gs://"))


@pytest.mark.parametrize("path", LOCAL_CONFIGS)
def test_local_configs(path: str) -> None:
    for app in _apps(path):
        assert app["import_path"] == "distill.serving.llm:build_app"
        args = LLMAppArgs.model_validate(app["args"])
        for m in args.models:
            assert m.source.resolve().is_file()


@pytest.mark.parametrize("path", DEPLOY_CONFIGS)
def test_deploy_configs_serve_the_program_and_name_their_llm(path: str) -> None:
    apps = {a["import_path"]: a for a in _apps(path)}
    program = ProgramAppArgs.model_validate(apps["distill.serving.app:build_app"]["args"])
    # every shipped deploy config names the key variables itself, not through a default that could change
    assert apps["distill.serving.app:build_app"]["args"]["api_key_env"] == "DISTILL_API_KEY"
    assert apps["distill.serving.app:build_app"]["args"]["api_keys_env"] == "DISTILL_API_KEYS"
    # a named client's share: enough to keep the worker busy, never the whole of its threads and queue
    assert program.max_ongoing_per_client == program.threads < program.threads + program.max_queued_requests
    if path == "configs/deploy/program_service.yaml":  # alone: the LLM service's URL/key from the environment
        assert len(apps) == 1 and program.llm_api_base_env and program.llm_api_key_env
        assert apps["distill.serving.app:build_app"]["route_prefix"] == "/"
        return
    assert apps["distill.serving.app:build_app"]["route_prefix"] == "/classify_intent"
    assert program.llm_api_base.startswith("http://127.0.0.1:8000/")
    if path == "local_deploy_dspy.yaml":
        llm = LLMAppArgs.model_validate(apps["distill.serving.llm:build_app"]["args"])
        assert any(m.lora_path for m in llm.models)  # the finetuned student: base GGUF + adapter
    else:
        assert apps["ray.serve.llm:build_openai_app"]["args"]["llm_configs"] == [
            "model_config/meta-llama--Llama-3_2-1B-Instruct.yaml"]


def _secret_like(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if str(k).lower() in {"hf_token", "token", "secret", "password", "api_key", "authorization"} and v:
                yield f"{path}.{k}"
            yield from _secret_like(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _secret_like(v, f"{path}[{i}]")


@pytest.mark.parametrize("path", CASCADE_CONFIGS)
def test_cascade_configs_serve_the_student_first_and_the_teacher_program_app_on_their_profiles_llm(path: str) -> None:
    from distill.config import load_config
    from distill.serving.cascade import CascadeAppArgs
    from distill.serving.deploy import CASCADE_APP, TEACHER_APP
    from distill.teacher_app import TeacherAppArgs

    apps = {a["import_path"]: a for a in _apps(path)}
    alone = {a["import_path"]: a for a in _apps(CASCADE_CONFIGS[path])}
    cascade_app, teacher_app = apps[CASCADE_APP], apps[TEACHER_APP]
    cascade, teacher = CascadeAppArgs.model_validate(cascade_app["args"]), TeacherAppArgs.model_validate(teacher_app["args"])
    # /classify_intent is the cascade, with the program app's own clients, keys and share
    program = alone["distill.serving.app:build_app"]
    assert cascade_app["route_prefix"] == program["route_prefix"] == "/classify_intent"
    for key in ("deploy_params", "api_key_env", "api_keys_env", "llm_api_base", "max_query_tokens", "threads",
                "max_queued_requests", "max_ongoing_per_client"):
        assert cascade_app["args"].get(key) == program["args"].get(key), key
    # the teacher app: its route is the cascade's teacher_url, and its only client, the cascade, sends the key it
    # takes (the LLM app's, else the shared one); no named clients of its own
    assert cascade.cascade.teacher_url == f"http://127.0.0.1:8000{teacher_app['route_prefix']}"
    assert (teacher.api_key_env, teacher.api_key_fallback_env, teacher.api_keys_env) == (
        "DISTILL_LLM_API_KEY", "DISTILL_API_KEY", None)
    assert (cascade.cascade.teacher_key_env, cascade.cascade.teacher_key_fallback_env) == teacher.key_env()
    assert teacher.llm_api_base == cascade.llm_api_base and cascade.cascade.teacher_timeout_s < cascade.timeout_s
    profile = load_config(teacher.profile)
    assert teacher.artifacts_dir == profile.artifacts_dir and profile.serving.cascade_deploy_config == path
    assert cascade.cascade.cascade_params == f"{profile.artifacts_dir}/cascade/cascade.json"
    # one LLM app serves the student and the teacher's LLM
    if path.startswith("configs/deploy/local"):
        llm = apps["distill.serving.llm:build_app"]["args"]
        student_llm = alone["distill.serving.llm:build_app"]["args"]
        assert {k: v for k, v in llm.items() if k != "models"} == {k: v for k, v in student_llm.items() if k != "models"}
        teacher_llm = _apps(profile.models.teacher.serve_config)[0]["args"]["models"]
        assert llm["models"] == student_llm["models"] + [m for m in teacher_llm if m["name"] == profile.models.teacher.model]
        LLMAppArgs.model_validate(llm)
    else:
        refs = apps["ray.serve.llm:build_openai_app"]["args"]["llm_configs"]
        ids = [llm_config_class().model_validate(yaml.safe_load((ROOT / r).read_text())).model_loading_config.model_id
               for r in refs]
        assert ids == [profile.models.student.model, profile.models.teacher.model]


def test_no_secrets_in_configs() -> None:
    files = [*CLUSTER_CONFIGS, *LOCAL_CONFIGS, *DEPLOY_CONFIGS, *CASCADE_CONFIGS, *(str(x.relative_to(ROOT)) for x in (ROOT / "model_config").glob("*.yaml"))]
    for p in files:
        assert not list(_secret_like(yaml.safe_load((ROOT / p).read_text()))), p


def test_vllm_on_cpu_computes_in_bf16_only_where_the_cpu_has_bf16_instructions() -> None:
    from distill.serving.deploy import cpu_dtype

    assert cpu_dtype("flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16") == "bfloat16"
    assert cpu_dtype("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile") == "bfloat16"
    assert cpu_dtype("flags\t\t: fpu sse2 avx2 fma avx512f") == "float32"
    assert cpu_dtype("") == "float32"
