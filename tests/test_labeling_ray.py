"""The Ray Data labeling engine's parts that need no Ray: the engine setting, Parquet shards folded into
labels.jsonl (torn shards, failed rows, duplicates), the actor UDF itself, and the teacher surviving the
pickling that ships it to the actors. The engine end to end (same labels as threads, a killed job resumed)
is in test_labeling.py; the scale simulation in test_labeling_scale.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle  # what Ray serializes actor constructor arguments with

from distill.config import LMConfig, load_config
from distill.errors import ConfigError
from distill.program import IntentClassificationModule
from distill.teacher.labeling import fold_shards, read_records, start_labeling
from distill.teacher.labeling_ray import SHARD_SCHEMA, TeacherLabeler
from distill.teacher.program import RetrievalTeacher
from distill.teacher.vote import LabelVote
from distill_harness.fake_llm import answer


def test_engine_defaults_to_threads_and_is_checked(tmp_path) -> None:
    cfg = load_config("local")
    assert cfg.teacher.engine == "threads" and cfg.teacher.ray_data.actors >= 1
    ray_cfg = load_config("local_ci", overrides={"teacher": {"engine": "ray_data", "ray_data": {"actors": 3}}})
    assert ray_cfg.teacher.engine == "ray_data" and ray_cfg.teacher.ray_data.actors == 3
    p = tmp_path / "p.yaml"
    p.write_text("extends: local\nteacher:\n  engine: spark\n")
    with pytest.raises(ConfigError, match=r"key 'teacher\.engine'.*'spark'"):
        load_config(str(p))
    p.write_text("extends: local\nteacher:\n  ray_data: {actors: 0}\n")
    with pytest.raises(ConfigError, match=r"key 'teacher\.ray_data\.actors'"):
        load_config(str(p))


def _shard(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path)


def test_fold_shards_into_labels_jsonl(tmp_path) -> None:
    run1, run2 = tmp_path / "shards" / "r1", tmp_path / "shards" / "r2"
    _shard(run1 / "a.parquet", [
        {"id": "1", "text": "t1", "label": "x", "latency_s": 0.1, "source": "llm", "confidence": 0.3},
        {"id": "2", "text": "t2", "error": "APIError: boom"},  # failed: retried, never a label
    ])
    _shard(run2 / "b.parquet", [
        {"id": "3", "text": "t3", "label": "y", "latency_s": 0.2},
        {"id": "1", "text": "t1", "label": "z", "latency_s": 0.1},  # already labeled: the first label wins
    ])
    good = (run2 / "b.parquet").read_bytes()
    (run2 / "c.parquet").write_bytes(good[: len(good) // 2])  # its writer was killed mid-file
    (tmp_path / "labels.jsonl").write_text(json.dumps({"id": "0", "text": "t0", "label": "w", "latency_s": 1}) + "\n"
                                           + '{"id": "9", "te')  # and a line torn by a kill

    assert fold_shards(tmp_path) == 2
    records = read_records(tmp_path / "labels.jsonl")
    assert [r["id"] for r in records] == ["0", "1", "3"]
    assert records[1] == {"id": "1", "text": "t1", "label": "x", "latency_s": 0.1, "source": "llm", "confidence": 0.3}
    assert records[2] == {"id": "3", "text": "t3", "label": "y", "latency_s": 0.2}  # no empty optional fields
    assert (run2 / "c.parquet.torn").is_file() and not (run2 / "c.parquet").exists()  # set aside, not deleted
    assert fold_shards(tmp_path) == 0  # idempotent
    assert len(read_records(tmp_path / "labels.jsonl")) == 3


def test_a_changed_teacher_sets_old_shards_aside(tmp_path) -> None:
    start_labeling(tmp_path, "a")
    _shard(tmp_path / "shards" / "r1" / "a.parquet", [{"id": "1", "text": "t", "label": "x", "latency_s": 0.1}])
    fold_shards(tmp_path)
    start_labeling(tmp_path, "a")  # same teacher: kept
    assert (tmp_path / "shards").is_dir() and (tmp_path / "labels.jsonl").is_file()
    start_labeling(tmp_path, "b")
    assert not (tmp_path / "shards").exists() and (tmp_path / "shards.a" / "r1" / "a.parquet").is_file()
    assert (tmp_path / "labels.a.jsonl").is_file() and not (tmp_path / "labels.jsonl").exists()


LABELS = ["card_arrival", "card_linking", "exchange_rate"]


def test_the_actor_udf_records_failed_calls_in_its_rows() -> None:
    """The UDF as Ray Data calls it, in this process, against an endpoint that is not there."""
    teacher = RetrievalTeacher(IntentClassificationModule(LABELS), None, k=0, restrict=False)
    dead = LMConfig(model="m", api_base="http://127.0.0.1:9/v1", timeout_s=2)
    udf = TeacherLabeler(cloudpickle.loads(cloudpickle.dumps(teacher)), dead, cache=False, cache_dir=None,
                         lm_kwargs={"num_retries": 0})
    out = udf(pa.table({"id": ["a", "b"], "text": ["where is my card", "rate?"]}))
    assert out.schema == SHARD_SCHEMA and out["id"].to_pylist() == ["a", "b"]
    assert out["label"].to_pylist() == [None, None]
    assert all("Error" in e for e in out["error"].to_pylist())


def test_the_vote_survives_pickling() -> None:
    """Ray ships the teacher, vote included, to each actor by pickling it."""
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(9, 4)).astype(np.float32)
    vote = LabelVote(vecs, [LABELS[i % 3] for i in range(9)], rng.normal(size=(3, 4)), LABELS, grid=(1.0,))
    copy = cloudpickle.loads(cloudpickle.dumps(vote))
    assert LabelVote.ranked(copy.model, vecs[0]) == LabelVote.ranked(vote.model, vecs[0])
    assert LabelVote.ranked(copy.without(0), vecs[0])[0]  # its lock was recreated


def test_the_fake_endpoint_answers_a_label_the_schema_allows() -> None:
    body = {"messages": [{"role": "user", "content": "q1"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": {
                "type": "object", "properties": {"label": {"type": "string", "enum": LABELS}}}}}}
    label = json.loads(answer(body))["label"]
    assert label in LABELS and json.loads(answer(body))["label"] == label  # valid and stable
    other = {**body, "messages": [{"role": "user", "content": f"q{i}"} for i in range(2, 30)]}
    assert {json.loads(answer({**other, "messages": [m]}))["label"] for m in other["messages"]} == set(LABELS)
