"""The request log (`distill.serving.request_log`): whole lines under SIGKILL and concurrent writers, rotation
and retention; and `distill pool --from-log`: dedup, decontamination, ranking by the vote's uncertainty."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill.cli import main
from distill.config import load_config
from distill.data.dataset import prepare_data, read_jsonl
from distill.errors import DistillError
from distill.pool import build_pool
from distill.serving.request_log import (
    RequestLog,
    RequestLogArgs,
    RequestRecord,
    read_request_log,
    rotated_files,
)

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import sys
    from distill.serving.request_log import RequestLog, RequestLogArgs, RequestRecord

    log = RequestLog(RequestLogArgs(path=sys.argv[1], max_bytes=1 << 40))
    i = 0
    while True:  # records from 10 bytes to ~60 kB: large writes are the ones a kill could tear
        log.append(RequestRecord(time=i, query=sys.argv[2] + str(i) + "x" * ((i * 7919) % 60_000),
                                 label="card_arrival", model="m"))
        if i == 20:
            print("writing", flush=True)
        i += 1
    """
)


def _writers(path: Path, tags: str) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], env=env, stdout=subprocess.PIPE)
             for tag in tags]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == b"writing\n"  # it is writing
    return procs


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


def _check_writers(lines: list[bytes], tags: str) -> None:
    records = [RequestRecord.model_validate_json(line) for line in lines]
    for tag in tags:  # each writer's records in order, none lost before its kill
        times = [r.time for r in records if r.query.startswith(tag)]
        assert len(times) > 10 and times == list(range(len(times))), tag


def test_a_killed_writer_loses_no_complete_line(tmp_path) -> None:
    path = tmp_path / "requests.jsonl"
    for attempt in range(5):  # a kill lands mid-write often, not always
        path.unlink(missing_ok=True)
        procs = _writers(path, "a")
        time.sleep(0.3)
        _kill(procs)
        raw = path.read_bytes()
        *complete, tail = raw.split(b"\n")
        _check_writers(complete, "a")  # every complete line parses
        records, torn = read_request_log(path)
        assert len(records) == len(complete) and torn == (1 if tail else 0)
        if tail:  # the write the kill cut short: a record's beginning, never a record
            assert tail.startswith(b'{"time":')
            break


def test_two_writers_one_killed_mid_write_no_line_joins_a_torn_one(tmp_path) -> None:
    """Two replicas on one file: the survivor's next line starts on a line of its own after the other's
    torn write."""
    path = tmp_path / "requests.jsonl"
    procs = _writers(path, "ab")
    time.sleep(0.3)
    _kill(procs[:1])
    time.sleep(0.2)
    _kill(procs[1:])
    lines = [line for line in path.read_bytes().split(b"\n") if line]
    good = []
    for line in lines:
        try:
            RequestRecord.model_validate_json(line)
            good.append(line)
        except ValueError:
            assert line.startswith(b'{"time":')  # only a torn write (at most one per killed writer) fails
    assert len(lines) - len(good) <= 2
    _check_writers(good, "ab")
    records, torn = read_request_log(path)
    assert len(records) == len(good) and torn == len(lines) - len(good)


def test_a_torn_last_line_is_skipped_and_a_bad_middle_line_named(tmp_path) -> None:
    path = tmp_path / "requests.jsonl"
    good = RequestRecord(time=1.0, query="hi", label="x", model="m").model_dump_json()
    path.write_text(good + "\n" + good[:10])
    assert read_request_log(path) == ([RequestRecord.model_validate_json(good)], 1)
    path.write_text(good + "\n" + good[:10] + "\n" + good + "\n")  # torn, then a later writer's line
    assert len(read_request_log(path)[0]) == 2
    path.write_text(good + "\n{\"nope\": 1}\n" + good + "\n")
    with pytest.raises(DistillError, match="requests.jsonl:2"):
        read_request_log(path)
    with pytest.raises(DistillError, match="does not exist"):
        read_request_log(tmp_path / "missing.jsonl")


def test_rotation_keeps_the_newest_files_and_drops_old_ones(tmp_path) -> None:
    path = tmp_path / "log" / "requests.jsonl"
    log = RequestLog(RequestLogArgs(path=str(path), max_bytes=1024, keep=2))
    for i in range(200):
        log.answered(f"query {i} " + "y" * 40, "label", "m", latency_ms=1.0)
    assert [p.name for p in rotated_files(path)] == ["requests.jsonl.1", "requests.jsonl.2"]
    assert all(p.stat().st_size <= 1024 + 200 for p in [path, *rotated_files(path)])
    numbers = [int(r.query.split()[1]) for r in read_request_log(path)[0]]
    assert numbers == list(range(numbers[0], 200))  # oldest first, contiguous, ending with the newest
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # A second writer (another replica) keeps appending to the current file after the first one rotated.
    other = RequestLog(RequestLogArgs(path=str(path), max_bytes=1024, keep=2))
    for i in range(200, 260):
        (log if i % 2 else other).answered(f"query {i}", "label", "m")
    numbers = sorted(int(r.query.split()[1]) for r in read_request_log(path)[0])
    assert numbers == list(range(numbers[0], 260)) and len(numbers) > 15  # none lost across the rotations
    # Retention by age: a rotated file older than max_age_s is gone at the next rotation.
    aged = RequestLog(RequestLogArgs(path=str(path), max_bytes=1024, keep=5, max_age_s=3600))
    old = rotated_files(path)[-1]
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    for i in range(40):
        aged.answered(f"query late {i} " + "z" * 40, "label", "m")
    assert not old.exists() or old.stat().st_mtime > time.time() - 3600


@pytest.fixture(scope="module")
def cfg():
    return load_config("local_ci")


@pytest.fixture(scope="module")
def data(cfg, banking77_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("BANKING77_DIR", str(banking77_dir))
    yield prepare_data(cfg)
    mp.undo()


def _served(texts: list[str], t0: float = 1000.0) -> list[RequestRecord]:
    return [RequestRecord(time=t0 + i, query=q, label="card_arrival", model="student") for i, q in enumerate(texts)]


def test_pool_is_deduplicated_decontaminated_and_ranked_by_uncertainty(cfg, data, tmp_path, monkeypatch,
                                                                      banking77_dir) -> None:
    from distill.teacher.program import GoldIndex, build_vote, embed

    fresh = [ex.text for ex in data.unlabeled[:12]]
    test_q, gold_q = data.full_test[0].text, data.gold[0].text
    texts = fresh + [fresh[0].upper() + " !!", "  " + fresh[1].lower(), test_q, test_q.lower() + "?", gold_q]
    records = _served(texts)
    index = GoldIndex(data.gold, cfg.teacher.embedder)
    vote = build_vote(index, data.labels)

    def proba(qs: list[str]) -> np.ndarray:
        return vote.model.predict_proba(embed(cfg.teacher.embedder, qs))

    pool, counts = build_pool(records, [ex.text for ex in data.full_test], [ex.text for ex in data.gold], proba)
    assert counts.model_dump() == {"requests": 17, "torn": 0, "duplicate": 3, "test_overlap": 1,
                                     "gold_overlap": 1, "kept": 12}
    assert sorted(p.text for p in pool) == sorted(fresh)
    assert {p.text: p.served for p in pool}[fresh[0]] == 2
    # Ranked by the vote's margin, recomputed here from its probabilities: most uncertain first.
    p = np.sort(proba([x.text for x in pool]), axis=1)
    margin = 1 - (p[:, -1] - p[:, -2])
    assert [x.score for x in pool] == pytest.approx(margin, abs=1e-4)
    assert all(a.score >= b.score for a, b in zip(pool, pool[1:]))

    # The command: the same pool from a log file.
    log = RequestLog(RequestLogArgs(path=str(tmp_path / "requests.jsonl")))
    for r in records:
        log.append(r)
    monkeypatch.setenv("BANKING77_DIR", str(banking77_dir))
    out = tmp_path / "pool.jsonl"
    assert main(["pool", "--from-log", str(tmp_path / "requests.jsonl"), "--profile", "local_ci",
                 "--out", str(out)]) == 0
    assert [r["text"] for r in read_jsonl(out)] == [x.text for x in pool]
    assert main(["pool", "--from-log", str(tmp_path / "nothing.jsonl"), "--profile", "local_ci"]) == 2


def test_ingress_logs_answers_only_and_never_the_key(tmp_path, monkeypatch) -> None:
    """The real ingress (as one replica builds it, over ASGI; the worker behind it stands in, see
    test_serving_ingress) with the log on: answered queries logged, refused ones and the key never."""
    import asyncio

    import httpx
    from tests.test_serving_ingress import AUTH, KEY, KEY_ENV, LABELS, Worker

    from distill.serving import app as program_app

    monkeypatch.setenv(KEY_ENV, KEY)
    params = tmp_path / "deploy_params.json"
    params.write_text(json.dumps({"model": "m", "program_path": str(tmp_path / "p.json"), "labels": LABELS,
                                  "variant": "v", "kind": "k", "test_score": 0.5}))
    log_path = tmp_path / "requests.jsonl"
    args = {"deploy_params": str(params), "llm_api_base": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV,
            "request_log": {"path": str(log_path)}}
    ingress_cls = program_app.IntentClassifierApp.func_or_class.__mro__[1]

    async def run() -> None:
        worker = Worker()
        ingress = ingress_cls.__new__(ingress_cls)
        await ingress.__init__(args, worker)
        try:
            transport = httpx.ASGITransport(app=program_app.make_api(ingress))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for q in ("where is my card", "  where is my card  ", "how do I top up"):
                    assert (await client.post("/", json={"query": q}, headers=AUTH)).status_code == 200
                assert (await client.post("/", json={"query": "x"})).status_code == 401
                assert (await client.post("/", json={"query": ""}, headers=AUTH)).status_code == 422
                worker.mode = "rejected"
                assert (await client.post("/", json={"query": "too long"}, headers=AUTH)).status_code == 422
        finally:
            ingress.probe.task.cancel()

    asyncio.run(run())
    raw = log_path.read_text()
    assert KEY not in raw and "Bearer" not in raw and "Authorization" not in raw
    records, torn = read_request_log(log_path)
    assert torn == 0
    assert [(r.query, r.label, r.model) for r in records] == [
        ("where is my card", LABELS[3], "m"), ("where is my card", LABELS[3], "m"), ("how do I top up", LABELS[3], "m")]
    assert all(r.latency_ms is not None and r.latency_ms >= 0 and r.time > 0 for r in records)


def test_the_log_is_off_by_default_and_bad_settings_name_the_key(tmp_path) -> None:
    from pydantic import ValidationError

    from distill.serving.app import ProgramAppArgs

    base = {"deploy_params": "p.json", "llm_api_base": "http://127.0.0.1:9/v1"}
    assert ProgramAppArgs.model_validate(base).request_log is None
    for app in yaml.safe_load((ROOT / "local_deploy_dspy.yaml").read_text())["applications"]:
        assert "request_log" not in app["args"]  # the committed deployment logs nothing
    with pytest.raises(ValidationError, match="request_log.max_bytes"):
        ProgramAppArgs.model_validate({**base, "request_log": {"path": "x.jsonl", "max_bytes": 10}})
    with pytest.raises(ValidationError, match="request_log.path"):
        ProgramAppArgs.model_validate({**base, "request_log": {"max_bytes": 4096}})
