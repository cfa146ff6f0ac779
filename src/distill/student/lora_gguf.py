"""Convert a PEFT LoRA adapter into a llama.cpp LoRA-adapter GGUF, and check it against transformers.

Why this exists: the student is LoRA-finetuned with PEFT on a transformers model that was itself loaded
(and dequantised) from the shipped SmolLM2 GGUF, but it is served by llama-cpp-python from the original
quantised GGUF plus an adapter (`llama_cpp.Llama(model_path=base, lora_path=adapter)`). llama.cpp only
reads adapters in its own GGUF format, and its converter (`convert_lora_to_gguf.py`) needs the base
model's HF `config.json`, which we do not have: our only source of truth is the base GGUF. So we read the
architecture, block and head counts from the base GGUF and write the adapter ourselves with the `gguf`
package (its own tensor-name map and `GGUFWriter`, no hand-written name table).

What llama.cpp expects of a LoRA adapter (src/llama-adapter.cpp, convert_lora_to_gguf.py):

* metadata `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (f32) and a
  `general.architecture` equal to the base model's;
* for each adapted base tensor `<name>` (e.g. `blk.3.attn_q.weight`) a pair `<name>.lora_a` and
  `<name>.lora_b`. In PyTorch (row-major) terms A is `(r, in_features)` and B is `(out_features, r)` --
  exactly PEFT's `lora_A.weight` / `lora_B.weight` layout -- stored as F32;
* llama.cpp computes `W x + scale * B (A x)` with `scale = alpha / r` (r read from the tensor shape), the
  same as PEFT's default; rsLoRA (`alpha / sqrt(r)`) and per-module `alpha_pattern` are folded into B.

Q/K permutation: for llama models llama.cpp's converter permutes the rows of `q_proj` / `k_proj` (the
rotary half-split layout of HF -> the interleaved layout of GGUF). transformers' GGUF loader undoes that
permutation when it loads the base (`LlamaTensorProcessor._reverse_permute_weights`), so the PEFT adapter
was trained in HF layout and the rows of its q/k B matrices (the output side) must be permuted the same
way llama.cpp permutes the base weights. A (the input side) is unchanged.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError

__all__ = ["LogitComparison", "compare_logits", "export_lora_to_gguf", "permute_qk_rows"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# The PEFT target modules this exporter supports: the linear layers of a llama decoder block. Embeddings
# and lm_head are not supported (SmolLM2 ties lm_head to the token embedding, and llama.cpp handles
# embedding adapters differently); neither are extra trained modules (`modules_to_save`).
SUPPORTED_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})

_PEFT_PREFIX = "base_model.model."


def permute_qk_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows (output features) of a q/k projection from HF to llama.cpp (GGUF) layout.

    Same as `LlamaModel.permute` in llama.cpp's converter: per head, HF puts the two rotary halves one after
    the other, GGUF interleaves them. `n_head` is the number of heads of this projection (the KV head
    count for k_proj). Works for any trailing shape, e.g. a LoRA B matrix `(out_features, r)`.
    """
    out = weight.shape[0]
    if out % (2 * n_head):
        raise DistillError(f"cannot permute {out} rows into {n_head} heads of two rotary halves")
    return (
        weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise DistillError(f"base GGUF has no {key!r} metadata")
    return field.contents()


def export_lora_to_gguf(peft_adapter_dir: str | Path, out_path: str | Path, base_gguf: str | Path) -> Path:
    """Write the PEFT LoRA adapter in `peft_adapter_dir` as a llama.cpp LoRA GGUF at `out_path`.

    `peft_adapter_dir` is what `PeftModel.save_pretrained(dir)` writes (adapter_config.json +
    adapter_model.safetensors). `base_gguf` is the GGUF the adapter will be applied to by llama.cpp; its
    architecture, block count, head counts and tensor shapes are read from it (only llama is supported).
    Returns `out_path`. Raises DistillError for a missing/incomplete adapter, an unsupported LoRA variant
    or target module, or an adapter that does not fit the base model.
    """
    import gguf
    from safetensors.numpy import load_file

    adapter_dir, out_path, base_gguf = Path(peft_adapter_dir), Path(out_path), Path(base_gguf)
    for f in (adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS):
        if not f.is_file():
            raise DistillError(f"missing {f}: expected a PEFT LoRA adapter written by save_pretrained()")
    if not base_gguf.is_file():
        raise DistillError(f"base GGUF {base_gguf} not found")

    cfg: dict[str, Any] = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise DistillError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise DistillError(f"{adapter_dir}: LoRA with {flag}=true is not supported by this exporter")
    if cfg.get("lora_bias"):
        raise DistillError(f"{adapter_dir}: LoRA bias terms (lora_bias=true) are not supported")
    if cfg.get("modules_to_save"):
        raise DistillError(f"{adapter_dir}: modules_to_save={cfg['modules_to_save']} is not supported")

    # --- pair up lora_A / lora_B per module -------------------------------------------------------------
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        module, sep, kind = key.rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise DistillError(
                f"{adapter_dir}: unexpected tensor {key!r} (only lora_A/lora_B weights of "
                f"{sorted(SUPPORTED_MODULES)} are supported)"
            )
        pairs.setdefault(module.removeprefix(_PEFT_PREFIX), {})[kind[0]] = value
    if not pairs:
        raise DistillError(f"{adapter_dir / ADAPTER_WEIGHTS} contains no LoRA tensors")

    for module, ab in pairs.items():
        if module.rsplit(".", 1)[-1] not in SUPPORTED_MODULES:
            raise DistillError(
                f"unsupported LoRA target module {module!r}: supported are {sorted(SUPPORTED_MODULES)}"
            )
        if set(ab) != {"A", "B"}:
            raise DistillError(
                f"{adapter_dir}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B"
            )

    # --- base model facts, from the GGUF metadata -------------------------------------------------------
    reader = gguf.GGUFReader(base_gguf)
    arch_name = str(_field(reader, "general.architecture"))
    arch = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch != gguf.MODEL_ARCH.LLAMA:
        raise DistillError(f"{base_gguf}: architecture {arch_name!r} is not supported (only 'llama')")
    n_blocks = int(_field(reader, f"{arch_name}.block_count"))
    n_head = int(_field(reader, f"{arch_name}.attention.head_count"))
    kv_field = reader.fields.get(f"{arch_name}.attention.head_count_kv")
    n_head_kv = int(kv_field.contents()) if kv_field is not None else n_head
    base_shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order (ne0, ne1)
    name_map = gguf.get_tensor_name_map(arch, n_blocks)

    alpha = float(cfg["lora_alpha"])
    default_r = int(cfg["r"])
    out: list[tuple[str, np.ndarray]] = []
    for module, ab in sorted(pairs.items()):
        short = module.rsplit(".", 1)[-1]
        gguf_name = name_map.get_name(module)
        if gguf_name is None:
            raise DistillError(f"module {module!r} has no {arch_name} GGUF tensor name")
        gguf_name += ".weight"
        a = ab["A"].astype(np.float32)  # (r, in)
        b = ab["B"].astype(np.float32)  # (out, r)
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
            raise DistillError(f"{module}: lora_A {a.shape} / lora_B {b.shape} are not a rank-r pair")
        base_shape = base_shapes.get(gguf_name)
        if base_shape != (a.shape[1], b.shape[0]):
            raise DistillError(
                f"{module}: adapter expects a {b.shape[0]}x{a.shape[1]} weight but base GGUF "
                f"tensor {gguf_name} is {base_shape} (ggml order): wrong base model?"
            )

        # llama.cpp scales by alpha / r (r from this tensor). Fold any other PEFT scaling into B.
        m_alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        m_r = int(_pattern_value(cfg.get("rank_pattern"), module, default_r))
        if m_r != r:
            raise DistillError(f"{module}: lora_A has rank {r} but adapter_config says r={m_r}")
        peft_scale = m_alpha / math.sqrt(r) if cfg.get("use_rslora") else m_alpha / r
        if not math.isclose(peft_scale, alpha / r, rel_tol=1e-6):
            b = b * np.float32(peft_scale / (alpha / r))

        if short == "q_proj":
            b = permute_qk_rows(b, n_head)
        elif short == "k_proj":
            b = permute_qk_rows(b, n_head_kv)
        out += [(gguf_name + ".lora_a", a), (gguf_name + ".lora_b", b)]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out_path, arch_name)  # writes general.architecture
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, data in out:
        writer.add_tensor(name, np.ascontiguousarray(data))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return out_path


def _pattern_value(pattern: dict[str, Any] | None, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup (as peft.utils.other.get_pattern_key): first key matching."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


# ------------------------------------------------------------------------------------------------------
# Checking the export: transformers (PEFT, fp32) vs llama.cpp (quantised base + adapter)
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitComparison:
    """How far llama.cpp + GGUF adapter is from the PEFT model, relative to how far the two bases are apart.

    All measures are per prompt (one entry per prompt, same order) and are the root-mean-square over the
    vocabulary of a difference of last-token logits. RMS rather than max-abs: a single outlier logit of
    a quantised base dominates a max-abs measure and hides a wrong adapter (see `max_abs_*` for those).

    * `adapter_diff[i]`   = RMS(cpp_adapter - hf_adapter)
    * `base_floor[i]`     = RMS(cpp_base - hf_base): the reference floor. llama.cpp runs the (e.g. Q4_1)
      quantised base while transformers runs dequantised fp32 weights, so even without an adapter they
      differ; a correct adapter adds error of the same order (its own tensors are exported exactly).
    * `adapter_effect[i]` = RMS(cpp_adapter - cpp_base): what the adapter changes in llama.cpp.
    * `hf_effect[i]`      = RMS(hf_adapter - hf_base): what the adapter changes in transformers.

    `hf_*` come from the PEFT model in eval mode, fp32, with the adapter enabled / disabled; `cpp_*` from
    llama.cpp on the base GGUF with / without the adapter GGUF. The same token ids feed both.
    """

    adapter_diff: tuple[float, ...]
    base_floor: tuple[float, ...]
    adapter_effect: tuple[float, ...]
    hf_effect: tuple[float, ...]
    max_abs_adapter_diff: float  # max |cpp_adapter - hf_adapter| over all prompts and the vocabulary
    max_abs_base_floor: float  # max |cpp_base - hf_base| over all prompts and the vocabulary

    def tolerance(self, factor: float = 2.5, atol: float = 0.02) -> tuple[float, ...]:
        """Per prompt: the largest acceptable `adapter_diff`, `factor * base_floor + atol`."""
        return tuple(factor * f + atol for f in self.base_floor)

    def agrees(self, factor: float = 2.5, atol: float = 0.02) -> bool:
        """The stated tolerance, checked per prompt.

        (1) `adapter_diff <= factor * base_floor + atol`: the exported adapter adds no more error than the
        base's quantisation already causes (a correct export measures ~0.3-1.6x the floor on Q4_1 and
        ~1x on an F32 copy of the base, where the floor is ~0.005), and (2) `adapter_effect` exceeds that
        same tolerance, so the adapter visibly changes llama.cpp's logits and (1) is not vacuous.
        """
        tol = self.tolerance(factor, atol)
        return all(d <= t for d, t in zip(self.adapter_diff, tol, strict=True)) and all(
            e > t for e, t in zip(self.adapter_effect, tol, strict=True)
        )


def _hf_last_logits(model: Any, token_ids: list[list[int]]) -> list[np.ndarray]:
    import torch

    rows = []
    with torch.no_grad():
        for ids in token_ids:
            logits = model(input_ids=torch.tensor([ids])).logits
            rows.append(logits[0, -1].float().cpu().numpy())
    return rows


def _cpp_last_logits(
    model_path: Path, lora_path: Path | None, token_ids: list[list[int]], n_threads: int
) -> list[np.ndarray]:
    from llama_cpp import Llama

    n_ctx = max(64, max(len(t) for t in token_ids) + 8)
    llm = Llama(
        model_path=str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=n_threads,
        logits_all=True,
        verbose=False,
    )
    try:
        rows = []
        for ids in token_ids:
            llm.reset()
            llm.eval(ids)  # llama-cpp-python keeps logits in `scores` only with logits_all=True
            rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        return rows
    finally:
        llm.close()


def compare_logits(
    base_gguf: str | Path,
    adapter_gguf: str | Path,
    peft_model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    n_threads: int = 1,
) -> LogitComparison:
    """Compare last-token logits of `peft_model` (transformers) with llama.cpp + `adapter_gguf`.

    The prompts are tokenised once with `tokenizer` (no special tokens added) and the same ids are fed to
    both runtimes. `peft_model` (a PeftModel) is put in eval mode and fp32 and run with the adapter enabled
    and, via `disable_adapter()`, disabled; llama.cpp runs `base_gguf` with and without the adapter.
    `n_threads` is llama.cpp's thread count (1 by default: ggml's spinning workers are very slow when
    the cores are oversubscribed, and a 135M model on a few short prompts needs no more).
    See `LogitComparison` for the measures and `LogitComparison.agrees` for the tolerance.
    """
    if not prompts:
        raise DistillError("compare_logits needs at least one prompt")
    token_ids = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if any(not ids for ids in token_ids):
        raise DistillError("a prompt tokenised to zero tokens")

    was_training = peft_model.training
    peft_model.eval()
    peft_model.float()
    try:
        hf_adapter = _hf_last_logits(peft_model, token_ids)
        with peft_model.disable_adapter():
            hf_base = _hf_last_logits(peft_model, token_ids)
    finally:
        peft_model.train(was_training)
    cpp_base = _cpp_last_logits(Path(base_gguf), None, token_ids, n_threads)
    cpp_adapter = _cpp_last_logits(Path(base_gguf), Path(adapter_gguf), token_ids, n_threads)

    def rms(x: list[np.ndarray], y: list[np.ndarray]) -> tuple[float, ...]:
        return tuple(
            float(np.sqrt(np.mean(np.square(a - b, dtype=np.float64)))) for a, b in zip(x, y, strict=True)
        )

    def max_abs(x: list[np.ndarray], y: list[np.ndarray]) -> float:
        return float(max(np.abs(a - b).max() for a, b in zip(x, y, strict=True)))

    return LogitComparison(
        adapter_diff=rms(cpp_adapter, hf_adapter),
        base_floor=rms(cpp_base, hf_base),
        adapter_effect=rms(cpp_adapter, cpp_base),
        hf_effect=rms(hf_adapter, hf_base),
        max_abs_adapter_diff=max_abs(cpp_adapter, hf_adapter),
        max_abs_base_floor=max_abs(cpp_base, hf_base),
    )
