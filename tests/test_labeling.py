"""Teacher labeling against the real local teacher endpoint, with both engines (threads, Ray Data): a real
kill mid-run, then a resume that labels every query exactly once; the same labels from both engines; SFT
messages equal the student's inference prompt; curation counts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import dspy
import pyarrow.parquet as pq
import pytest

from distill.config import RayDataLabelingConfig, load_config
from distill.data.dataset import prepare_data
from distill.errors import DataError, DistillError
from distill.lm import adapter, make_lm
from distill.program import IntentClassificationModule
from distill.serving.control import serving
from distill.student.curation import curate, normalize_text, sft_messages, to_sft
from distill.teacher.labeling import (
    TeacherQualityError,
    label_queries,
    quality_gate,
    query_id,
    read_records,
    shard_files,
)
from distill.teacher.labeling_ray import label_queries_ray
from distill.teacher.program import GoldIndex, build_teacher, build_vote, embed
from distill.teacher.vote import C_GRID, LabelVote

# Tests that take `teacher_lm` start a real teacher endpoint on Ray Serve.
slow = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N_QUERIES = 24


@pytest.fixture(scope="module")
def cfg():
    # These tests are about labeling, not the vote: every query goes through the LLM.
    return load_config("local_ci", overrides={"teacher": {"vote_confidence": 1.0}})


@pytest.fixture(scope="module")
def data(cfg, banking77_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("BANKING77_DIR", str(banking77_dir))  # the killable subprocess below inherits it
    yield prepare_data(cfg)
    mp.undo()


@pytest.fixture(scope="module")
def teacher_lm(cfg):
    t = cfg.models.teacher
    with serving(cfg.path(t.serve_config), t.api_base, models=[t.model]):
        yield make_lm(t, cache=False)


KILLABLE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from distill.config import RayDataLabelingConfig, load_config
    from distill.data.dataset import prepare_data
    from distill.teacher.labeling import label_queries
    from distill.lm import make_lm
    from distill.teacher.program import build_teacher

    cfg = load_config("local_ci", overrides={"teacher": {"vote_confidence": 1.0}})
    data = prepare_data(cfg)
    teacher = build_teacher(cfg, data.labels, data.gold)
    label_queries(teacher, make_lm(cfg.models.teacher, cache=False), data.to_label[: int(sys.argv[2])],
                  Path(sys.argv[1]), threads=2, fingerprint="t")
    """
)


@slow
def test_killed_labeling_resumes_without_loss_or_duplicates(cfg, data, teacher_lm, tmp_path) -> None:
    out = tmp_path / "labels"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(out), str(N_QUERIES)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    labels = out / "labels.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if labels.is_file() and len(labels.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"labeling ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)  # a real interruption, mid-run
    proc.wait()
    partial = read_records(labels)
    assert 5 <= len(partial) < N_QUERIES

    queries = data.to_label[:N_QUERIES]
    teacher = build_teacher(cfg, data.labels, data.gold)
    result = label_queries(teacher, teacher_lm, queries, out, threads=2, fingerprint="t")
    records = read_records(labels)
    ids = [r["id"] for r in records]
    assert Counter(ids).most_common(1)[0][1] == 1  # nothing labeled twice
    assert set(ids) == {query_id(i, q.text) for i, q in enumerate(queries)}  # nothing lost
    assert result.new == N_QUERIES - len(partial) and result.failed == 0
    assert all(r["label"] in data.labels for r in records)
    # a third run has nothing left to do
    assert label_queries(teacher, teacher_lm, queries, out, threads=2, fingerprint="t").new == 0


# Small batches and shards, so that a job of a few dozen queries writes many shards (and can be killed
# between them); two actors, as the threads engine's two threads.
SMALL_JOB = RayDataLabelingConfig(actors=2, batch_size=2, rows_per_shard=2)


@slow
def test_ray_data_gives_the_labels_threads_give(cfg, data, teacher_lm, tmp_path) -> None:
    queries = data.to_label[:12]
    teacher = build_teacher(cfg, data.labels, data.gold)
    threads = label_queries(teacher, teacher_lm, queries, tmp_path / "threads", threads=2, fingerprint="t")
    ray_data = label_queries_ray(teacher, cfg.models.teacher, queries, tmp_path / "ray", SMALL_JOB, fingerprint="t",
                                 cache=False)
    assert (threads.new, ray_data.new, ray_data.failed) == (12, 12, 0)
    assert len(shard_files(tmp_path / "ray")) >= 2  # the labels came through Parquet shards

    def fields(path):  # everything but the timing
        return {r["id"]: {k: v for k, v in r.items() if k != "latency_s"} for r in read_records(path)}

    assert fields(threads.path) == fields(ray_data.path)  # same labels, same record fields (greedy, same prompts)


KILLABLE_RAY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ray import cloudpickle
    from distill.config import RayDataLabelingConfig, load_config
    from distill.teacher.labeling_ray import label_queries_ray

    teacher, queries = cloudpickle.loads(Path(sys.argv[2]).read_bytes())
    cfg = load_config("local_ci")
    label_queries_ray(teacher, cfg.models.teacher, queries, Path(sys.argv[1]),
                      RayDataLabelingConfig(actors=2, batch_size=2, rows_per_shard=2), fingerprint="t", cache=False)
    """
)


def _finished_shards(out: Path) -> int:
    n = 0
    for f in shard_files(out):
        try:
            n += pq.read_metadata(f).num_rows > 0
        except Exception:  # noqa: BLE001 - being written
            pass
    return n


@slow
def test_killed_ray_data_job_resumes_without_loss_or_duplicates(cfg, data, teacher_lm, tmp_path) -> None:
    import ray
    from ray import cloudpickle

    queries = data.to_label[:N_QUERIES]
    teacher = build_teacher(cfg, data.labels, data.gold)
    job = tmp_path / "job.pkl"
    job.write_bytes(cloudpickle.dumps((teacher, queries)))
    out = tmp_path / "labels"
    # A second driver on the Ray that serves the teacher (as the pipeline's own job would be), killed mid-run.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = tmp_path / "job.log"  # a file, not a pipe: Ray Data's progress bars would fill a pipe and stall it
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE_RAY, str(out), str(job)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and _finished_shards(out) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, f"labeling ended before it could be killed: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # Ray stops the dead driver's actors and tasks
    before = _finished_shards(out)
    assert 2 <= before and not (out / "labels.jsonl").exists()  # killed before its end-of-job fold

    result = label_queries_ray(teacher, cfg.models.teacher, queries, out, SMALL_JOB, fingerprint="t", cache=False)
    records = read_records(out / "labels.jsonl")
    ids = [r["id"] for r in records]
    assert Counter(ids).most_common(1)[0][1] == 1  # nothing labeled twice
    assert set(ids) == {query_id(i, q.text) for i, q in enumerate(queries)}  # nothing lost
    assert 0 < result.new < N_QUERIES and result.failed == 0  # the killed job's finished shards were kept
    shard_ids = [i for f in shard_files(out) for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert Counter(shard_ids).most_common(1)[0][1] == 1  # no id in two shards either
    assert all(r["label"] in data.labels for r in records)
    assert label_queries_ray(teacher, cfg.models.teacher, queries, out, SMALL_JOB, fingerprint="t").new == 0


@slow
def test_ray_data_records_failed_calls_and_retries_them(cfg, data, teacher_lm, tmp_path) -> None:
    queries = data.to_label[:3]
    teacher = build_teacher(cfg, data.labels, data.gold)
    dead = cfg.models.teacher.model_copy(update={"api_base": "http://127.0.0.1:9/v1", "timeout_s": 2})
    failed = label_queries_ray(teacher, dead, queries, tmp_path, SMALL_JOB, fingerprint="t", cache=False,
                               lm_kwargs={"num_retries": 0})
    assert (failed.new, failed.failed) == (0, 3)
    assert len(read_records(tmp_path / "errors.jsonl")) == 3 and not read_records(tmp_path / "labels.jsonl")
    retried = label_queries_ray(teacher, cfg.models.teacher, queries, tmp_path, SMALL_JOB, fingerprint="t", cache=False)
    assert (retried.new, retried.failed, retried.labeled) == (3, 0, 3)


def test_failed_calls_are_recorded_and_retried(cfg, data, tmp_path) -> None:
    queries = data.to_label[:3]
    teacher = build_teacher(cfg, data.labels, data.gold)
    dead = make_lm(cfg.models.teacher.model_copy(update={"api_base": "http://127.0.0.1:9/v1", "timeout_s": 2}),
                   cache=False, num_retries=0)
    result = label_queries(teacher, dead, queries, tmp_path, threads=2, fingerprint="t")
    assert (result.new, result.failed) == (0, 3)
    assert len(read_records(tmp_path / "errors.jsonl")) == 3 and not read_records(tmp_path / "labels.jsonl")


@slow
def test_changed_teacher_starts_a_new_labels_file(cfg, data, teacher_lm, tmp_path) -> None:
    queries = data.to_label[:2]
    teacher = build_teacher(cfg, data.labels, data.gold)
    label_queries(teacher, teacher_lm, queries, tmp_path, fingerprint="a")
    assert label_queries(teacher, teacher_lm, queries, tmp_path, fingerprint="b").new == 2
    assert (tmp_path / "labels.a.jsonl").is_file()


@slow
def test_sft_example_is_the_inference_prompt(cfg, data, teacher_lm) -> None:
    program = IntentClassificationModule(data.labels)
    text = data.to_label[0].text
    with dspy.context(lm=teacher_lm, adapter=adapter()):
        pred = program(text=text)  # zero-shot, as the student runs
    sent = teacher_lm.history[-1]["messages"]
    sft = sft_messages(program, adapter(), text, {"label": pred.label})
    assert len(sft) == len(sent) + 1
    for got, want in zip(sft[:-1], sent):
        assert got == want
    assert sft[-1]["role"] == "assistant"
    assert adapter().parse(program.predictor.signature, sft[-1]["content"]) == {"label": pred.label}


def test_teacher_leave_one_out_never_sees_its_own_label(cfg, data) -> None:
    index = GoldIndex(data.gold, cfg.teacher.embedder)
    q = data.gold[0]
    assert index.nearest(q.text, 1)[0].text == q.text
    assert all(ex.text != q.text for ex in index.nearest(q.text, 8, exclude_identical=True))


def test_the_votes_leave_one_out_model_never_saw_the_held_out_example(cfg, data) -> None:
    index = GoldIndex(data.gold, cfg.teacher.embedder)
    vote = build_vote(index, data.labels)
    assert set(vote.loo_accuracy) == set(C_GRID) and vote.c in C_GRID
    assert max(vote.loo_accuracy.values()) == vote.loo_accuracy[vote.c] > 0.5
    for i in range(5):
        ex, vec = data.gold[i], index.vectors[i]
        seen = dict(zip(*LabelVote.ranked(vote.model, vec)))[ex.label]
        unseen = dict(zip(*LabelVote.ranked(vote.without(i), vec)))[ex.label]
        assert unseen < seen  # trained on it, the vote is surer of its label than without it


def test_quality_gate() -> None:
    quality_gate(0.70, 100, 0.65)
    with pytest.raises(TeacherQualityError, match="below the floor"):
        quality_gate(0.50, 100, 0.65)


def test_curation_counts_and_sft_only_from_kept(data) -> None:
    labels = data.labels
    records = [
        {"text": "Where is my card?", "label": "card_arrival"},
        {"text": "where is my card", "label": "card_arrival"},  # near-exact duplicate
        {"text": "WHERE IS MY CARD!!", "label": "card_arrival"},  # near-exact duplicate
        {"text": "I want a refund", "label": "hacked"},  # invalid label
        {"text": data.test[0].text.upper(), "label": data.test[0].label},  # in the test set
        {"text": "My top-up is still pending", "label": "pending_top_up"},
    ]
    result = curate(records, labels, [ex.text for ex in data.test])
    assert result.counts == {"input": 6, "invalid_label": 1, "low_confidence": 0, "duplicate": 2, "test_overlap": 1,
                             "kept": 2}
    assert [r["text"] for r in result.kept] == ["Where is my card?", "My top-up is still pending"]
    assert normalize_text("Café, 100%!") == "cafe 100"
    sft = to_sft(result.kept, IntentClassificationModule(labels), adapter())
    assert len(sft) == 2 and all('"hacked"' not in m["content"] for ex in sft for m in ex["messages"])


def test_curation_drops_the_labels_the_teacher_was_unsure_of(data) -> None:
    a, b = data.labels[:2]
    records = [{"text": "sure", "label": a, "confidence": 0.9}, {"text": "unsure", "label": a, "confidence": 0.3},
               {"text": "at the floor", "label": b, "confidence": 0.5}, {"text": "bad", "label": "x", "confidence": 1.0}]
    result = curate(records, data.labels, [], min_confidence=0.5)
    assert result.counts["invalid_label"] == 1 and result.counts["low_confidence"] == 1
    assert [r["text"] for r in result.kept] == ["sure", "at the floor"]
    assert curate(records, data.labels, []).counts["low_confidence"] == 0  # no floor: all valid labels kept
    with pytest.raises(DataError, match="1 teacher labels carry no confidence"):
        curate([{"text": "old", "label": a}], data.labels, [], min_confidence=0.5)


def test_corrupt_middle_line_is_an_error(tmp_path) -> None:
    p = tmp_path / "labels.jsonl"
    p.write_text('{"id": "a"}\n{broken\n{"id": "b"}\n')
    with pytest.raises(DistillError, match="corrupt"):
        read_records(p)
    p.write_text('{"id": "a"}\n{"id": "b", "te')  # torn last line: dropped and rewritten
    assert [r["id"] for r in read_records(p)] == ["a"] and p.read_text() == '{"id": "a"}\n'


def test_sft_for_a_reasoning_program_carries_the_reasoning(data) -> None:
    program = IntentClassificationModule(data.labels, reasoning=True, max_reasoning_chars=200)
    rec = {"text": "where is my card?", "label": "card_arrival", "reasoning": "The customer awaits a card."}
    (ex,) = to_sft([rec], program, adapter())
    parsed = adapter().parse(program.predictor.signature, ex["messages"][-1]["content"])
    assert parsed == {"reasoning": rec["reasoning"], "label": "card_arrival"}


def test_vote_llm_with_a_reasoning_program_explains_the_votes_labels(cfg, data) -> None:
    reasoning = cfg.model_copy(update={"program": cfg.program.model_copy(update={"reasoning": True,
                                                                                 "max_reasoning_chars": 120})})
    teacher = build_teacher(reasoning, data.labels, data.gold)
    sig = teacher.explain.signature
    assert list(sig.input_fields) == ["text", "label"] and list(sig.output_fields) == ["reasoning"]
    assert sig.output_fields["reasoning"].annotation.max_chars == 120
    assert sig.instructions.startswith(teacher.program.predictor.signature.instructions)
    assert build_teacher(cfg, data.labels, data.gold).explain is None  # no reasoning program: no extra call


@slow
def test_vote_answers_of_a_reasoning_teacher_carry_the_llms_reasoning(cfg, data, teacher_lm, tmp_path) -> None:
    """The vote picks the label; the LLM writes why, and the SFT turn carries both."""
    reasoning = cfg.model_copy(update={
        "program": cfg.program.model_copy(update={"reasoning": True, "max_reasoning_chars": 160}),
        "teacher": cfg.teacher.model_copy(update={"vote_confidence": 0.0})})  # the vote answers every query
    teacher = build_teacher(reasoning, data.labels, data.gold)
    queries = data.to_label[:3]
    result = label_queries(teacher, teacher_lm, queries, tmp_path, threads=2, fingerprint="r")
    records = {r["text"]: r for r in read_records(result.path)}
    assert result.new == len(queries) and len(records) == len(queries)
    for q in queries:
        rec = records[q.text]
        vote_label = teacher.shortlist(q.text, embed(teacher.index.embedder, [q.text])[0])[0][0]
        assert rec["source"] == "vote" and rec["label"] == vote_label
        assert isinstance(rec["reasoning"], str) and 0 < len(rec["reasoning"]) <= 160
    first = records[queries[0].text]
    (ex,) = to_sft([first], teacher.program, adapter())
    parsed = adapter().parse(teacher.program.predictor.signature, ex["messages"][-1]["content"])
    assert parsed == {"reasoning": first["reasoning"], "label": first["label"]}


