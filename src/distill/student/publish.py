"""Publish a finetuned LoRA adapter where the cluster's LLM serving loads it from.

`ray.serve.llm` loads LoRA adapters only from object storage: a model id `<base>:<name>` is read from
`<dynamic_lora_loading_path>/<name>`. The finetune stage copies the adapter there (a pyarrow filesystem
URI: s3:// or gs://) and `distill.serving.deploy` points the templated student LLMConfig at it.
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError


def adapter_name(finetuned_model: str) -> str:
    """`meta-llama/Llama-3.2-1B-Instruct:distill-lora` -> `distill-lora` (the id ray.serve.llm routes on)."""
    base, sep, name = finetuned_model.rpartition(":")
    if not sep or not base or not name or "/" in name:
        raise DistillError(f"finetuned_model {finetuned_model!r} must look like '<base model>:<adapter name>'")
    return name


def publish_adapter(adapter_dir: str | Path, storage_uri: str, name: str) -> str:
    """Copy the adapter directory to `<storage_uri>/<name>`; returns that URI."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(storage_uri)
        src_fs, src = pafs.FileSystem.from_uri(str(adapter_dir)) if "://" in str(adapter_dir) else (
            pafs.LocalFileSystem(), str(Path(adapter_dir).resolve()))
        if src_fs.get_file_info(src).type != pafs.FileType.Directory:
            raise DistillError(f"adapter directory not found: {adapter_dir}")
        dest = f"{root.rstrip('/')}/{name}"
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(src, dest, source_filesystem=src_fs, destination_filesystem=fs)
    except (OSError, ValueError) as e:  # pyarrow's errors for bad URIs, credentials, permissions
        raise DistillError(f"could not publish the adapter to {storage_uri}: {e}") from None
    return f"{storage_uri.rstrip('/')}/{name}"
