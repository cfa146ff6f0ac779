"""The finetune job's storage: one set of helpers for local paths and object storage (pyarrow filesystems),
the profile's default, and the scratch directory of a Ray Train worker."""

from __future__ import annotations

import json

import pytest

from distill.config import load_config
from distill.errors import DistillError
from distill.student import finetune, storage
from distill_harness.rehearse import local_s3


def test_the_default_job_storage_is_the_adapters_bucket_or_the_stage_directory() -> None:
    assert storage.default_job_storage(None, None) is None  # local: the stage directory
    assert storage.default_job_storage(None, "s3://bkt/distill/lora/x") == "s3://bkt/distill-jobs"
    assert storage.default_job_storage("gs://other/jobs", "s3://bkt/lora") == "gs://other/jobs"
    assert storage.default_job_storage("/mnt/shared/jobs", None) == "/mnt/shared/jobs"
    for profile in ("cluster", "cluster_cpu"):
        ft = load_config(profile).finetune
        assert storage.is_uri(storage.default_job_storage(ft.job_storage, ft.adapter_storage))
    for profile in ("local", "local_ci"):
        ft = load_config(profile).finetune
        assert storage.default_job_storage(ft.job_storage, ft.adapter_storage) is None


def test_join_keeps_uris_and_paths_apart(tmp_path) -> None:
    assert storage.join("s3://b/jobs/", "id", "job.json") == "s3://b/jobs/id/job.json"
    assert storage.join(tmp_path, "id", "job.json") == str(tmp_path / "id" / "job.json")
    a, b = storage.new_job_id("lora"), storage.new_job_id("lo/ra x")
    assert a != b and a.startswith("distill-finetune-lora-") and "/" not in b and " " not in b


def test_local_paths_round_trip(tmp_path) -> None:
    f = storage.join(tmp_path, "a", "b", "job.json")
    assert not storage.exists(f)
    storage.write_text(f, '{"x": 1}')
    assert storage.exists(f) and json.loads(storage.read_text(f)) == {"x": 1}
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "w.bin").write_bytes(b"\x00" * 10)
    got = storage.download_dir(str(tmp_path / "dir"), tmp_path / "copy")
    assert (got / "w.bin").read_bytes() == b"\x00" * 10
    storage.delete_file(f)
    storage.delete_file(f)  # nothing there: no error
    assert not storage.exists(f)
    with pytest.raises(DistillError, match="could not read"):
        storage.read_text(tmp_path / "absent.json")


def test_object_storage_round_trip_and_download(tmp_path) -> None:
    with local_s3("s3://job-bucket/x"):
        job = storage.join("s3://job-bucket/distill-jobs", storage.new_job_id("lora"))
        storage.write_text(storage.join(job, "train.jsonl"), '{"messages": []}\n')
        assert storage.read_text(storage.join(job, "train.jsonl")) == '{"messages": []}\n'
        assert not storage.exists(storage.join(job, "result.json"))
        src = storage.join(job, "adapter")
        storage.write_text(storage.join(src, "adapter_config.json"), '{"r": 8}')
        storage.write_text(storage.join(src, "sub", "w.txt"), "w")
        local = storage.download_dir(src, tmp_path / "adapter")
        assert json.loads((local / "adapter_config.json").read_text()) == {"r": 8}
        assert (local / "sub" / "w.txt").read_text() == "w"
        assert storage.copy(storage.join(src, "sub", "w.txt"), tmp_path / "one.txt") == str(tmp_path / "one.txt")
        assert (tmp_path / "one.txt").read_text() == "w"


def test_a_train_file_on_object_storage_is_loaded_through_the_scratch_dir(tmp_path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}] * 3
    with local_s3("s3://job-bucket/x"):
        uri = storage.write_text("s3://job-bucket/j/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        ds = finetune.load_sft_dataset(uri, str(tmp_path))
    assert len(ds) == 3 and (tmp_path / "train.jsonl").is_file()


def test_a_train_workers_scratch_directory_is_removed_even_when_training_fails(monkeypatch, tmp_path) -> None:
    seen: list[str] = []

    def fails(config, scratch) -> None:
        seen.append(scratch)
        (tmp_path / "marker").write_text(scratch)
        raise RuntimeError("boom")

    monkeypatch.setattr(finetune, "_train_loop", fails)
    with pytest.raises(RuntimeError, match="boom"):
        finetune.train_loop_per_worker({})
    [scratch] = seen
    assert "distill-hf-" in scratch
    from pathlib import Path

    assert not Path(scratch).exists()


def test_the_result_names_a_checkpoint_on_object_storage_by_its_uri() -> None:
    class Ckpt:
        path = "bucket/distill-jobs/j1/lora/checkpoint_000000"

    assert finetune.checkpoint_uri(Ckpt(), "s3://bucket/distill-jobs/j1") == \
        "s3://bucket/distill-jobs/j1/lora/checkpoint_000000"
    Ckpt.path = "/art/finetune/lora/checkpoint_000000"
    assert finetune.checkpoint_uri(Ckpt(), "/art/finetune") == "/art/finetune/lora/checkpoint_000000"
