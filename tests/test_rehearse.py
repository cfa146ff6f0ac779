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
from distill_harness.rehearse import (
    PROFILE,
    REHEARSAL_LOGICAL_CPUS,
    RehearsalSummary,
    _routing_rows,
    cascade_answer_problems,
    cascade_probes,
    cascade_record,
    cpu_recipe,
    deployed_cascade_problems,
    derive_configs,
    local_s3,
    serve_logical_cpus,
    to_markdown,
)

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
    for path in (cfg.models.teacher.serve_config, cfg.models.student.serve_config, cfg.serving.deploy_config,
                 cfg.serving.cascade_deploy_config):
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


# --- the cascade on the cluster path -------------------------------------------------------------------


@pytest.fixture
def rehearsal_cfg(tmp_path, monkeypatch):
    """The rehearsal's profile with its derived CPU configs, its artifacts in tmp_path/art."""
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    return load_config(PROFILE, overrides=derive_configs(load_config(PROFILE), tmp_path / "hf"))


def test_the_cascade_config_is_derived_for_cpu_and_fits_the_head(rehearsal_cfg, tmp_path) -> None:
    from distill.serving.deploy import CASCADE_APP, TEACHER_APP

    cfg = rehearsal_cfg
    apps = {a["import_path"]: a for a in yaml.safe_load(Path(cfg.serving.cascade_deploy_config).read_text())["applications"]}
    tracked = {a["import_path"]: a for a in yaml.safe_load(
        (ROOT / "configs/deploy/cluster_deploy_cascade.yaml").read_text())["applications"]}
    for app in (CASCADE_APP, TEACHER_APP):  # as committed: the serving stage points them at the run
        assert apps[app] == tracked[app]
    configs = [llm_config_class().model_validate(c) for c in apps[RAY_LLM_APP]["args"]["llm_configs"]]
    assert [c.model_loading_config.model_id for c in configs] == [cfg.models.student.model, cfg.models.teacher.model]
    assert {c.model_loading_config.model_source for c in configs} == {str(tmp_path / "hf")}
    # Reserved logical CPUs, one config at a time: the OpenAI ingress 1, each vLLM replica 2 (its engine's
    # bundle + the replica actor), each program app 2 deployments x num_replicas x 0.1.
    assert serve_logical_cpus(cfg.models.student.serve_config) == 3
    assert serve_logical_cpus(cfg.serving.deploy_config) == 3 + 2 * 2 * 0.1
    assert serve_logical_cpus(cfg.serving.cascade_deploy_config) == 1 + 2 * 2 + 2 * (2 * 2 * 0.1)
    assert serve_logical_cpus(cfg.serving.cascade_deploy_config) <= REHEARSAL_LOGICAL_CPUS
    assert serve_logical_cpus(ROOT / "serve_70B.yaml") == 1 + (4 + 1)  # on GPUs: tensor parallel 4


class _Done:
    """An upstream stage that has run: `load()` gives its manifest."""

    def __init__(self, manifest, **attrs) -> None:
        self.manifest = manifest
        self.__dict__.update(attrs)

    def load(self):
        return self.manifest


def test_the_serving_stage_points_the_cluster_cascade_at_the_rehearsal_s_run(rehearsal_cfg, tmp_path) -> None:
    # The serving stage's own templating (and its teacher-LLM check) on the rehearsal's derived cascade config:
    # the committed config's artifacts/cluster paths and `profile: cluster` become this run's.
    from types import SimpleNamespace

    from distill.stages.serving import ServingStage

    cfg = rehearsal_cfg
    art = tmp_path / "art"
    raw = yaml.safe_load(Path(cfg.serving.cascade_deploy_config).read_text())
    before = deployed_cascade_problems(raw, cfg, tmp_path / "hf")
    assert any("artifacts/cluster/deploy_params.json" in p for p in before)
    assert any("profile is 'cluster'" in p for p in before)

    ft = SimpleNamespace(model=cfg.finetune.finetuned_model, adapter=str(art / "finetune" / "adapter"))
    stage = ServingStage(cfg, None, _Done(object(), deploy_params_path=art / "deploy_params.json"), _Done(ft))
    stage.cascade_manifest = lambda: SimpleNamespace(result=SimpleNamespace(
        cascade_params=str(art / "cascade" / "cascade.json")))
    deployed = yaml.safe_load(stage.deploy_config(cascade=True).read_text())
    assert deployed_cascade_problems(deployed, cfg, tmp_path / "hf") == []
    teacher = next(a["args"] for a in deployed["applications"] if a["import_path"] == "distill.teacher_app:build_app")
    assert (teacher["profile"], teacher["artifacts_dir"]) == (str(art / "serving" / "profile.yaml"), str(art))
    saved = load_config(teacher["profile"])  # what the teacher app's replicas rebuild the teacher from
    assert saved.artifacts == art and saved.serving.cascade_deploy_config == cfg.serving.cascade_deploy_config
    assert saved.models.teacher == cfg.models.teacher
    llm = next(a["args"] for a in deployed["applications"] if a["import_path"] == RAY_LLM_APP)
    [student] = [c for c in llm["llm_configs"] if c["model_loading_config"]["model_id"] == cfg.models.student.model]
    assert student["lora_config"]["dynamic_lora_loading_path"] == cfg.finetune.adapter_storage.rstrip("/")


ROWS = [  # served cascade answers at threshold 0.5 (confidence: calibrated, as the cascade reports it)
    {"text": "a", "status": 200, "label": "x", "student_label": "x", "confidence": 0.9, "answered_by": "student",
     "threshold": 0.5, "fallback_error": None},
    {"text": "b", "status": 200, "label": "y", "student_label": "x", "confidence": 0.2, "answered_by": "teacher",
     "threshold": 0.5, "fallback_error": None},
    {"text": "c", "status": 200, "label": "y", "student_label": "x", "confidence": None, "answered_by": "teacher",
     "threshold": 0.5, "fallback_error": None},
    {"text": "d", "status": 200, "label": "x", "student_label": "x", "confidence": 0.1, "answered_by": "student",
     "threshold": 0.5, "fallback_error": "teacher unavailable (HTTP 404)"},  # the teacher failed: marked
    {"text": "e", "status": 200, "label": "x", "student_label": "x", "confidence": 0.5, "answered_by": "student",
     "threshold": 0.5, "fallback_error": None},  # at the threshold: the student
]


def test_the_served_cascade_s_answers_are_checked_against_its_own_rule() -> None:
    labels = {"x", "y"}
    assert cascade_answer_problems(ROWS, 0.5, labels) == []
    wrong = [
        {**ROWS[0], "answered_by": "teacher"},  # confident, yet the teacher
        {**ROWS[1], "answered_by": "student", "label": "x"},  # below, no teacher failure, yet the student
        {**ROWS[2], "answered_by": "student", "label": "x"},  # no confidence: the teacher must be asked
        {**ROWS[0], "label": "y"},  # the student's answer is not its own label
        {**ROWS[0], "threshold": 0.4},  # not the deployed threshold
        {**ROWS[1], "label": "z"},  # not a label in use
        {**ROWS[0], "status": 503},
    ]
    problems = [cascade_answer_problems([r], 0.5, labels) for r in wrong]
    assert all(len(p) == 1 for p in problems), problems
    assert "the rule says teacher" in problems[1][0] and "not its 'x'" in problems[3][0]


def test_probes_are_the_stage_s_extremes_only_when_clearly_past_the_threshold() -> None:
    from distill.program import Calibration, CascadeParams

    rows = [{"text": t, "confidence": c} for t, c in (("low", 0.1), ("mid", 0.45), ("high", 0.9), ("none", None))]
    params = CascadeParams(threshold=0.5, calibration=Calibration(method="none"))
    assert {route: r["text"] for route, r in cascade_probes(rows, params).items()} == {"teacher": "low",
                                                                                       "student": "high"}
    near = [{"text": "a", "confidence": 0.47}, {"text": "b", "confidence": 0.53}]  # within 10% of the threshold
    assert cascade_probes(near, params) == {}
    assert cascade_probes([{"text": "a", "confidence": None}], params) == {}
    # On the calibrated scale: T = 0.5 sharpens, so 0.35 raw is 0.225 calibrated, past a 0.3 threshold even at +10%
    sharp = CascadeParams(threshold=0.3, calibration=Calibration(method="temperature", temperature=0.5))
    assert set(cascade_probes([{"text": "a", "confidence": 0.35}, {"text": "b", "confidence": 0.36}], sharp)) == {"teacher"}


def _summary(**extra) -> RehearsalSummary:
    return RehearsalSummary(
        profile=PROFILE, model_dir="/m", export_seconds=0, s3="http://127.0.0.1:1", venv={"gib": 4.5},
        wall_seconds=780, startup_seconds={"serve_student.yaml": 42.0},
        stage_seconds={"eval": 228.0, "cascade": 80.0, "serving": 120.0},
        teacher={"labels_per_s": 21.3, "valid_rate": 1.0, "strategy": "knn"},
        finetune={"steps": 12, "examples": 40, "first_loss": 3.6, "last_loss": 0.6, "train_seconds": 112,
                  "s3_objects": ["a"], "published": "s3://b/lora"},
        evaluation={"testset": {"base": {"vanilla": 0.2}, "finetuned": {"vanilla": 0.3}}, "p50_s": 2.5},
        serving={"ok": 10, "queries": 10, "valid_share": 1.0, "cascade": bool(extra)},
        models_listed=[], lora_agreement={"agree": 0.9, "agree_text": 0.9, "changed": 1.0, "n": 16}, **extra)


def test_the_rehearsal_table_gets_the_cascade_s_rows() -> None:
    from types import SimpleNamespace

    from distill.program import Calibration
    from distill.stages.cascade import SplitScores

    def split(n, student, cascade, share, no_conf=0):
        return SplitScores(n=n, student_accuracy=student, teacher_accuracy=0.6, cascade_accuracy=cascade,
                           fallback_share=share, ece_raw=0.3, ece_calibrated=0.1, no_confidence=no_conf)

    result = SimpleNamespace(threshold=0.1234, calibration=Calibration(method="temperature", temperature=0.8, n=10),
                             threshold_rule="the most accurate one within the budget", threshold_reached=False,
                             max_fallback=0.25, devset=split(10, 0.5, 0.7, 0.2), testset=split(30, 0.3, 0.4, 0.3))
    serving = SimpleNamespace(answered_by={"student": 7, "teacher": 3}, teacher_sources={"llm": 1, "vote": 2},
                              with_confidence=10, fallback_errors={})
    probes = {"teacher": {"text": "q1", "confidence": 0.01}, "student": {"text": "q2", "confidence": 0.9}}
    probed = {"teacher": {"answered_by": "teacher"}, "student": {"answered_by": "student"}}
    direct = {"n": 5, "ok": 5, "same": 4, "vote_n": 3, "vote_same": 3, "sources": {"vote": 4, "llm": 1}, "rows": [{}]}
    record = cascade_record(result, "configs/deploy/cluster_deploy_cascade.yaml", [0.01, 0.5, 0.9], serving, probes,
                            probed, direct)
    assert "rows" not in record["served"]["teacher_app"]  # the summary keeps counts, not every answer
    table = to_markdown(_summary(cascade=record))
    rows = dict(line.strip("|").split(" | ", 1) for line in table.splitlines()[2:])
    rows = {k.strip(): v.strip(" |") for k, v in rows.items()}
    assert rows["cascade threshold (temperature calibration, chosen on the devset of 10)"] == \
        "0.123: the most accurate one within the budget"
    assert rows["cascade: share sent to the teacher, devset / test"] == "20.0% / 30.0%"
    assert rows["test accuracy (30 queries): cascade / student alone / teacher alone"] == "40.0% / 30.0% / 60.0%"
    assert rows["student confidence on vLLM (logprobs under the JSON schema): answers with one, devset / test"] == \
        "10/10 / 30/30, raw 0.01 to 0.9"
    assert rows["served cascade (`cluster_deploy_cascade.yaml` on CPU): answered by"] == (
        "student 7, teacher 3 (vote 2, LLM 1) of the samples; teacher failures 0; forced: least confident query -> "
        "teacher, most confident query -> student")
    assert rows["`POST /teacher` (the teacher app, rebuilt from this run)"] == \
        "5/5 answered; the teacher stage's label on 4/5 (vote both times: 3/3)"
    assert rows["`POST /classify_intent` (the cascade)"].startswith("10/10 answered")
    assert "cascade 80 s" in rows["stages"]
    # a summary written before the cascade was rehearsed still renders, without its rows
    old = to_markdown(_summary())
    assert "cascade threshold" not in old and "`POST /classify_intent` | 10/10" in old
    assert RehearsalSummary.model_validate_json(_summary(cascade=record).model_dump_json()).cascade == record
