"""Publishing the adapter for ray.serve.llm: the copy itself, tested against a file:// store."""

from __future__ import annotations

import pytest

from distill.errors import DistillError
from distill.student.publish import adapter_name, publish_adapter


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
    (adapter / "adapter_config.json").write_text('{"r": 8}')  # a retrained adapter, same name
    assert publish_adapter(adapter, f"file://{store}", "distill-lora") == uri
    assert (store / "distill-lora" / "adapter_config.json").read_text() == '{"r": 8}'  # replaced in place


def test_publish_errors_are_clear(tmp_path) -> None:
    with pytest.raises(DistillError, match="adapter directory not found"):
        publish_adapter(tmp_path / "missing", f"file://{tmp_path}/store", "a")
    with pytest.raises(DistillError, match="could not publish"):
        publish_adapter(tmp_path, "nosuchscheme://bucket/x", "a")
