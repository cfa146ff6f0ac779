"""The cluster rehearsal's pieces that run without vLLM: the CPU configs derived from the cluster's own
(validated by Ray's LLMConfig and Serve schema), the CPU recipe, and the local S3 that `publish_adapter`
writes to. The rehearsal itself (`make rehearse`) needs its own venv with vLLM's CPU build."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill.config import load_config
from distill.errors import DistillError
from distill.serving.deploy import (
    RAY_LLM_APP,
    cpu_llm_config,
    cpu_serve_config,
    llm_config_class,
    usable_cpus,
)
from distill.student.finetune import load_recipe
from distill.student.publish import publish_adapter
from distill_harness.rehearse import PROFILE, _routing_rows, cpu_recipe, derive_configs, local_s3

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted((ROOT / "model_config").glob("*.yaml"))


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_each_cluster_llm_config_becomes_a_valid_cpu_one(path: Path, tmp_path) -> None:
    tracked = path.read_text()
    gpu = yaml.safe_load(tracked)
    cpu = cpu_llm_config(gpu, str(tmp_path / "hf"))
    parsed = llm_config_class().model_validate(cpu)  # Ray's own validation
    assert "accelerator_type" not in cpu and cpu["accelerator_config"] == {"kind": "cpu"}
    assert parsed.model_loading_config.model_id == gpu["model_loading_config"]["model_id"]  # what clients send
    assert parsed.model_loading_config.model_source == str(tmp_path / "hf")
    assert cpu["engine_kwargs"]["max_model_len"] == 2048
    assert not {"tensor_parallel_size", "gpu_memory_utilization"} & set(cpu["engine_kwargs"])
    assert cpu["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    # no compile step, and the kernels on every core (vLLM would keep one for its scheduler)
    assert cpu["engine_kwargs"]["enforce_eager"] is True
    cores = cpu["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"].split(",")
    assert [int(c) for c in cores] == usable_cpus() and len(cores) >= 1
    assert cpu["runtime_env"]["env_vars"]["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    # everything else is the cluster's: a change there is rehearsed
    for key in ("enable_prefix_caching", "enable_lora", "max_lora_rank", "max_loras"):
        assert cpu["engine_kwargs"].get(key) == gpu["engine_kwargs"].get(key)
    assert cpu.get("lora_config") == gpu.get("lora_config")
    assert cpu["deployment_config"]["max_ongoing_requests"] == gpu["deployment_config"]["max_ongoing_requests"]
    assert cpu["deployment_config"]["autoscaling_config"]["max_replicas"] == 1
    assert path.read_text() == tracked  # the tracked file is the template, never edited


def test_cluster_serve_configs_are_derived_not_copied(tmp_path) -> None:
    out = cpu_serve_config("configs/deploy/cluster_deploy_dspy.yaml", tmp_path / "deploy.yaml", "/m")
    apps = {a["import_path"]: a for a in yaml.safe_load(out.read_text())["applications"]}
    tracked = {a["import_path"]: a for a in yaml.safe_load(
        (ROOT / "configs/deploy/cluster_deploy_dspy.yaml").read_text())["applications"]}
    assert apps["distill.serving.app:build_app"] == tracked["distill.serving.app:build_app"]  # the program app as is
    [llm] = apps[RAY_LLM_APP]["args"]["llm_configs"]
    assert llm["model_loading_config"]["model_source"] == "/m"
    assert llm["lora_config"] == yaml.safe_load((ROOT / "model_config/meta-llama--Llama-3_2-1B-Instruct.yaml")
                                                .read_text())["lora_config"]


def test_a_serve_config_without_ray_serve_llm_is_refused(tmp_path) -> None:
    with pytest.raises(DistillError, match="no ray.serve.llm:build_openai_app application"):
        cpu_serve_config("configs/serve_local_student.yaml", tmp_path / "x.yaml", "/m")
    assert not (tmp_path / "x.yaml").exists()


def test_the_gpu_recipe_runs_on_cpu_with_the_hf_base(tmp_path) -> None:
    gpu = yaml.safe_load((ROOT / "configs/training/lora/llama-3.2-1b-gpu.yaml").read_text())
    recipe = load_recipe(cpu_recipe(ROOT / "configs/training/lora/llama-3.2-1b-gpu.yaml", tmp_path / "r.yaml",
                                    tmp_path / "hf"))
    assert recipe.model.hub_id == str(tmp_path / "hf") and recipe.model.gguf is None  # the hub code path
    assert not recipe.scaling.use_gpu and recipe.model.attn_implementation is None
    assert recipe.training["bf16"] is False
    assert recipe.lora.model_dump(exclude={"top_layers"}) == {**gpu["lora"]}
    assert recipe.training["learning_rate"] == gpu["training"]["learning_rate"]
    with pytest.raises(DistillError, match="not a hub-model recipe"):
        cpu_recipe(ROOT / "configs/training/lora/smollm2-135m-cpu.yaml", tmp_path / "x.yaml", tmp_path / "hf")


def test_the_rehearsal_profile_is_the_cluster_profile_with_derived_configs(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    base = load_config(PROFILE)
    cluster = load_config("cluster")
    assert base.profile == "cluster" and base.finetune.finetuned_model == cluster.finetune.finetuned_model
    # the cluster's model ids and configs: the rehearsal derives CPU versions of exactly these
    for role in ("teacher", "student"):
        assert getattr(base.models, role).model == getattr(cluster.models, role).model
        assert getattr(base.models, role).serve_config == getattr(cluster.models, role).serve_config
    assert (base.serving.deploy_config, base.finetune.recipe) == (cluster.serving.deploy_config, cluster.finetune.recipe)
    assert base.finetune.adapter_storage.startswith("s3://")
    cfg = load_config(PROFILE, overrides=derive_configs(base, tmp_path / "hf"))
    for path in (cfg.models.teacher.serve_config, cfg.models.student.serve_config, cfg.serving.deploy_config):
        assert Path(path).is_relative_to(tmp_path / "art" / "rehearsal")
    assert load_recipe(cfg.finetune.recipe).model.hub_id == str(tmp_path / "hf")
    # the finetune job and its Train worker pinned to the job node; its storage on the rehearsal's S3
    from distill.student.jobs import load_job_config
    from distill.student.storage import default_job_storage
    from distill_harness.cluster import JOB_NODE

    assert load_recipe(cfg.finetune.recipe).scaling.resources == {JOB_NODE: 1}
    job = load_job_config(cfg.finetune.job_config)
    assert job["entrypoint_resources"] == {JOB_NODE: 1}
    assert {k: v for k, v in job.items() if k != "entrypoint_resources"} == {
        k: v for k, v in load_job_config(ROOT / "configs/job.yaml").items() if k != "entrypoint_resources"}
    assert default_job_storage(cfg.finetune.job_storage, cfg.finetune.adapter_storage).startswith("s3://")
    assert cluster.finetune.job_storage.startswith("s3://")  # the cluster's too: its nodes cannot read our disk
    # the cluster's teacher routing is the local rule, chosen on gold, and so is the rehearsal's
    assert (base.teacher.strategy, base.teacher.vote_confidence) == (cluster.teacher.strategy, "auto") == \
        ("vote_llm", "auto")
    assert base.curation.min_confidence == cluster.curation.min_confidence == "auto"


def test_the_rehearsal_table_says_what_routing_the_teacher_chose() -> None:
    chosen = {"strategy": "vote_llm", "vote_confidence": 0.4399, "llm_share_gold": 0.05, "llm_share_test": 0.2333,
              "accuracy_gold": 0.825, "accuracy_test": 0.6333}
    (threshold, accuracy) = _routing_rows(chosen)
    assert threshold[1] == "0.4399, 5%/23%" and accuracy[1] == "82.5% / 63.3%"
    assert _routing_rows({"strategy": "knn"}) == [("teacher strategy", "knn")]


@pytest.mark.slow  # a moto server, and ~30 s: pyarrow retries moto's CompleteMultipartUpload answers
def test_publish_adapter_writes_to_s3_on_a_local_moto_server(tmp_path) -> None:
    import boto3

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x01" * 2048)
    with local_s3("s3://rehearsal-bucket/lora") as url:
        uri = publish_adapter(adapter, "s3://rehearsal-bucket/lora", "distill-lora")
        s3 = boto3.client("s3")
        keys = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="rehearsal-bucket", Prefix="lora/")["Contents"]
                if not o["Key"].endswith("/")}  # pyarrow also writes empty directory markers
        body = s3.get_object(Bucket="rehearsal-bucket", Key="lora/distill-lora/adapter_config.json")["Body"].read()
    assert uri == "s3://rehearsal-bucket/lora/distill-lora"
    assert keys == {"lora/distill-lora/adapter_config.json": 8, "lora/distill-lora/adapter_model.safetensors": 2048}
    assert body == b'{"r": 8}'
    import httpx

    with pytest.raises(httpx.HTTPError):  # stopped with the block
        httpx.get(url, timeout=2)


def test_local_s3_needs_an_s3_bucket_uri() -> None:
    for bad in ("gs://b/x", "s3:///x", "/local/dir"):
        with pytest.raises(DistillError, match="needs an s3://<bucket>"):
            with local_s3(bad):
                pass


def test_the_rehearsal_empties_only_its_own_artifact_directory(tmp_path) -> None:
    from distill_harness.rehearse import _fresh_artifacts

    real = tmp_path / "local"
    real.mkdir()
    (real / "report.json").write_text("{}")
    with pytest.raises(DistillError, match="no rehearsal wrote"):
        _fresh_artifacts(real)
    assert (real / "report.json").is_file()
    ours = tmp_path / "cluster_cpu"
    _fresh_artifacts(ours)
    (ours / "teacher").mkdir()
    _fresh_artifacts(ours)  # its own: emptied
    assert [p.name for p in ours.iterdir()] == [".rehearsal"]
