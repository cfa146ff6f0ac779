"""Serve-config templating after a finetune, for both kinds of LLM application, validated with Ray's own
schema (and LLMConfig for ray.serve.llm) -- the cluster path included, which never runs here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from distill.config import load_config
from distill.errors import DistillError
from distill.serving.app import ProgramAppArgs
from distill.serving.deploy import llm_config_class, template_serve_config
from distill.serving.llm import LLMAppArgs

ROOT = Path(__file__).resolve().parents[1]


def _apps(path: Path) -> dict[str, dict]:
    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    return {a["import_path"]: a for a in raw["applications"]}


def test_cluster_student_config_after_a_finetune_points_ray_serve_llm_at_the_adapter(tmp_path) -> None:
    cfg = load_config("cluster")
    tracked = (ROOT / "model_config" / "meta-llama--Llama-3_2-1B-Instruct.yaml").read_text()
    out = template_serve_config(
        cfg.models.student.serve_config, tmp_path / "serve_student.yaml", base_model=cfg.models.student.model,
        finetuned_model=cfg.finetune.finetuned_model, adapter=str(tmp_path / "adapter"),
        lora_storage="s3://team-bucket/lora/1b/")
    llm = _apps(out)["ray.serve.llm:build_openai_app"]
    [config] = llm["args"]["llm_configs"]
    parsed = llm_config_class().model_validate(config)
    assert parsed.model_loading_config.model_id == cfg.models.student.model
    assert parsed.lora_config.dynamic_lora_loading_path == "s3://team-bucket/lora/1b"
    assert parsed.engine_kwargs["enable_lora"] is True
    # the tracked LLMConfig is the template, never edited
    assert (ROOT / "model_config" / "meta-llama--Llama-3_2-1B-Instruct.yaml").read_text() == tracked


def test_ray_serve_llm_refuses_local_adapter_storage_with_a_clear_message(tmp_path) -> None:
    cfg = load_config("cluster")
    for storage in ("file:///shared/lora", "/shared/lora"):
        with pytest.raises(DistillError, match="only from object storage"):
            template_serve_config(cfg.models.student.serve_config, tmp_path / "s.yaml",
                                  base_model=cfg.models.student.model, finetuned_model=cfg.finetune.finetuned_model,
                                  adapter=None, lora_storage=storage)
    assert not (tmp_path / "s.yaml").exists()


def test_cluster_deploy_config_serves_the_program_and_the_published_adapter(tmp_path) -> None:
    cfg = load_config("cluster")
    out = template_serve_config(
        cfg.serving.deploy_config, tmp_path / "deploy.yaml", base_model=cfg.models.student.model,
        finetuned_model=cfg.finetune.finetuned_model, adapter=None, lora_storage=cfg.finetune.adapter_storage,
        deploy_params=tmp_path / "deploy_params.json")
    apps = _apps(out)
    program = ProgramAppArgs.model_validate(apps["distill.serving.app:build_app"]["args"])
    assert program.deploy_params == str(tmp_path / "deploy_params.json")
    [config] = apps["ray.serve.llm:build_openai_app"]["args"]["llm_configs"]
    assert llm_config_class().model_validate(config).lora_config.dynamic_lora_loading_path == \
        cfg.finetune.adapter_storage


def test_local_student_config_gets_the_finetuned_model_next_to_the_base(tmp_path) -> None:
    cfg = load_config("local")
    out = template_serve_config(
        cfg.models.student.serve_config, tmp_path / "serve_student.yaml", base_model=cfg.models.student.model,
        finetuned_model=cfg.finetune.finetuned_model, adapter="/x/adapter.gguf")
    args = LLMAppArgs.model_validate(_apps(out)["distill.serving.llm:build_app"]["args"])
    assert [m.name for m in args.models] == [cfg.models.student.model, cfg.finetune.finetuned_model]
    assert args.models[0].lora_path is None and args.models[1].lora_path == "/x/adapter.gguf"
    assert args.models[1].source == args.models[0].source


def test_local_deploy_config_points_at_this_runs_artifacts(tmp_path) -> None:
    cfg = load_config("local")
    out = template_serve_config(
        cfg.serving.deploy_config, tmp_path / "deploy.yaml", base_model=cfg.models.student.model,
        finetuned_model=cfg.finetune.finetuned_model, adapter="/run/adapter.gguf",
        deploy_params=tmp_path / "deploy_params.json")
    apps = _apps(out)
    assert apps["distill.serving.app:build_app"]["args"]["deploy_params"] == str(tmp_path / "deploy_params.json")
    models = LLMAppArgs.model_validate(apps["distill.serving.llm:build_app"]["args"]).models
    assert {m.name: m.lora_path for m in models} == {cfg.models.student.model: None,
                                                      cfg.finetune.finetuned_model: "/run/adapter.gguf"}


def test_a_config_without_the_base_student_is_refused(tmp_path) -> None:
    cfg = load_config("local")
    with pytest.raises(DistillError, match="does not serve the base student 'other'"):
        template_serve_config(cfg.models.student.serve_config, tmp_path / "s.yaml", base_model="other",
                              finetuned_model="ft", adapter="/a.gguf")


@pytest.mark.parametrize("storage", ["file:///shared/lora", "/shared/lora", None])
def test_cluster_finetune_refuses_storage_ray_serve_llm_cannot_read_before_it_trains(
        storage, tmp_path, monkeypatch) -> None:
    # The real finetune stage on the cluster profile, with SFT data in place: it must stop at the storage
    # check, before Ray starts or a job is submitted (the finetune would otherwise run, then fail to publish).
    from distill.data.dataset import TaskData
    from distill.stages.curation import CurationStage
    from distill.stages.finetune import FinetuneStage

    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config("cluster", overrides={"finetune": {"adapter_storage": storage, "address": None}})
    curation = CurationStage(cfg, TaskData.__new__(TaskData))
    curation.sft_path.parent.mkdir(parents=True)
    curation.sft_path.write_text('{"messages": [{"role": "user", "content": "q"}, '
                                 '{"role": "assistant", "content": "a"}]}\n')
    import ray

    with pytest.raises(DistillError, match="only from object storage"):
        FinetuneStage(cfg, curation).run()
    assert not ray.is_initialized()
    assert not (tmp_path / "art" / "finetune" / "job.json").exists()


def test_object_storage_passes_the_check() -> None:
    from distill.serving.deploy import check_lora_storage

    check_lora_storage("serve_1B.yaml", "s3://bucket/lora")
    check_lora_storage("configs/serve_local_student.yaml", None)  # llama.cpp reads a local GGUF adapter


@pytest.mark.parametrize("profile", ["local", "cluster"])
def test_cascade_deploy_config_points_the_cascade_and_the_teacher_app_at_this_runs_artifacts(profile, tmp_path) -> None:
    from distill.serving.cascade import CascadeAppArgs
    from distill.serving.deploy import CASCADE_APP, TEACHER_APP
    from distill.teacher_app import TeacherAppArgs

    cfg = load_config(profile)
    out = template_serve_config(
        cfg.serving.cascade_deploy_config, tmp_path / "deploy.yaml", base_model=cfg.models.student.model,
        finetuned_model=cfg.finetune.finetuned_model, adapter="/run/adapter.gguf",
        lora_storage=cfg.finetune.adapter_storage, deploy_params=tmp_path / "deploy_params.json",
        cascade_params=tmp_path / "cascade.json",
        teacher={"profile": str(tmp_path / "profile.yaml"), "artifacts_dir": str(tmp_path)})
    apps = _apps(out)
    cascade = CascadeAppArgs.model_validate(apps[CASCADE_APP]["args"])
    teacher = TeacherAppArgs.model_validate(apps[TEACHER_APP]["args"])
    assert (cascade.deploy_params, cascade.cascade.cascade_params) == (str(tmp_path / "deploy_params.json"),
                                                                       str(tmp_path / "cascade.json"))
    assert (teacher.profile, teacher.artifacts_dir) == (str(tmp_path / "profile.yaml"), str(tmp_path))
    if profile == "local":  # the finetune beside the base student, and the teacher's LLM
        models = LLMAppArgs.model_validate(apps["distill.serving.llm:build_app"]["args"]).models
        assert {m.name: m.lora_path for m in models} == {cfg.models.student.model: None,
                                                          cfg.finetune.finetuned_model: "/run/adapter.gguf",
                                                          cfg.models.teacher.model: None}
    else:  # the published adapter on the student's LLMConfig; the 70B's beside it
        configs = [llm_config_class().model_validate(c) for c in apps["ray.serve.llm:build_openai_app"]["args"]["llm_configs"]]
        assert [c.model_loading_config.model_id for c in configs] == [cfg.models.student.model, cfg.models.teacher.model]
        assert configs[0].lora_config.dynamic_lora_loading_path == cfg.finetune.adapter_storage


def _teacher_check(profile: str, source: str | Path) -> None:
    """The serving stage's check that the cascade config serves the teacher's model as it labeled (it reads only
    the profile and the two configs)."""
    from distill.stages.serving import ServingStage

    ServingStage(load_config(profile), None, None, None).check_teacher_llm(str(source))  # type: ignore[arg-type]


def _cascade_config_with(tmp_path: Path, source: str, edit) -> Path:
    """The tracked cascade config with its LLM app's model entries (LLMConfig files loaded) passed through `edit`."""
    raw = yaml.safe_load((ROOT / source).read_text())
    for app in raw["applications"]:
        args = app.get("args") or {}
        if "llm_configs" in args:
            args["llm_configs"] = edit([yaml.safe_load((ROOT / r).read_text()) for r in args["llm_configs"]])
        elif "models" in args and app["import_path"] == "distill.serving.llm:build_app":
            args["models"] = edit(args["models"])
    out = tmp_path / "cascade.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def _teacher_entry(entries: list[dict], model: str) -> dict:
    return next(e for e in entries if e.get("name") == model
                or (e.get("model_loading_config") or {}).get("model_id") == model)


@pytest.mark.parametrize("profile", ["local", "cluster"])
def test_the_cascade_must_serve_the_teacher_s_model_as_the_teacher_stage_did(profile, tmp_path) -> None:
    # The shipped configs pass: on the cluster, cluster_deploy_cascade.yaml and serve_70B.yaml name the same
    # LLMConfig file; locally, the same model entry as configs/serve_local_teacher.yaml.
    cfg = load_config(profile)
    teacher = cfg.models.teacher.model
    _teacher_check(profile, cfg.serving.cascade_deploy_config)

    def changed(entries: list[dict]) -> list[dict]:  # a setting that changes the answers (the context length)
        e = _teacher_entry(entries, teacher)
        if "engine_kwargs" in e:
            e["engine_kwargs"]["max_model_len"] = 1024
        else:
            e["n_ctx"] = 1024
        return entries

    with pytest.raises(DistillError, match="otherwise than .*(engine_kwargs|n_ctx)"):
        _teacher_check(profile, _cascade_config_with(tmp_path, cfg.serving.cascade_deploy_config, changed))

    def gone(entries: list[dict]) -> list[dict]:
        return [e for e in entries if e is not _teacher_entry(entries, teacher)]

    with pytest.raises(DistillError, match="no LLM application serves the teacher's model"):
        _teacher_check(profile, _cascade_config_with(tmp_path, cfg.serving.cascade_deploy_config, gone))


def test_a_cluster_cascade_may_size_the_teacher_s_deployment_otherwise(tmp_path) -> None:
    # Replica counts and request limits (deployment_config) decide capacity, not answers.
    cfg = load_config("cluster")

    def resized(entries: list[dict]) -> list[dict]:
        e = _teacher_entry(entries, cfg.models.teacher.model)
        e["deployment_config"] = {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2},
                                  "max_ongoing_requests": 64}
        return entries

    _teacher_check("cluster", _cascade_config_with(tmp_path, cfg.serving.cascade_deploy_config, resized))
