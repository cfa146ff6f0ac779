"""Publishing the adapter for ray.serve.llm (here to a file:// store) and pointing the LLMConfig at it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from distill.errors import DistillError
from distill.publish import adapter_name, point_model_config, publish_adapter

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIG = ROOT / "model_config" / "meta-llama--Llama-3_2-1B-Instruct.yaml"


def test_adapter_name_is_the_part_ray_serve_llm_routes_on() -> None:
    assert adapter_name("meta-llama/Llama-3.2-1B-Instruct:distill-lora") == "distill-lora"
    for bad in ("meta-llama/Llama-3.2-1B-Instruct", ":x", "m:a/b"):
        with pytest.raises(DistillError, match="must look like"):
            adapter_name(bad)


def test_publish_copies_the_adapter_under_its_name(tmp_path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 1024)
    store = tmp_path / "store"
    uri = publish_adapter(adapter, f"file://{store}", "distill-lora")
    assert uri == f"file://{store}/distill-lora"
    assert (store / "distill-lora" / "adapter_config.json").read_text() == '{"r": 16}'
    assert (store / "distill-lora" / "adapter_model.safetensors").stat().st_size == 1024
    publish_adapter(adapter, f"file://{store}", "distill-lora")  # idempotent: overwrites in place


def test_publish_errors_are_clear(tmp_path) -> None:
    with pytest.raises(DistillError, match="adapter directory not found"):
        publish_adapter(tmp_path / "missing", f"file://{tmp_path}/store", "a")
    with pytest.raises(DistillError, match="could not publish"):
        publish_adapter(tmp_path, "nosuchscheme://bucket/x", "a")


def test_model_config_is_pointed_at_the_store_and_keeps_comments(tmp_path) -> None:
    try:  # the public name needs vLLM installed; the class it re-exports does not
        from ray.serve.llm import LLMConfig
    except ImportError:
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    cfg = tmp_path / "student.yaml"
    shutil.copy(MODEL_CONFIG, cfg)
    assert point_model_config(cfg, "s3://team-bucket/lora/1b/") is True
    text = cfg.read_text()
    assert "dynamic_lora_loading_path: s3://team-bucket/lora/1b\n" in text and text.startswith("# ray.serve.llm")
    parsed = LLMConfig.model_validate(yaml.safe_load(text))
    assert parsed.lora_config.dynamic_lora_loading_path == "s3://team-bucket/lora/1b"
    assert point_model_config(cfg, "s3://team-bucket/lora/1b") is False  # already there
    (tmp_path / "plain.yaml").write_text("model_loading_config: {model_id: x}\n")
    with pytest.raises(DistillError, match="no lora_config"):
        point_model_config(tmp_path / "plain.yaml", "s3://b")
