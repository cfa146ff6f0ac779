"""Served traffic feeds the data stage (issue 32, item 3): `data.extra_pool` names a pool.jsonl that
`python -m distill pool --from-log` wrote; its queries, checked again against test and gold and deduplicated
against the task's unlabeled queries, come after the task's own (random) or join the candidates (active).

Fast: the tiny task of tests/test_task.py and real pool files in tmp_path. The rerun that labels a pool and
deploys behind the gate is tests/test_deploy_gate.py's slow test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.test_task import TOPICS, write_tiny_task

from distill.cli import main
from distill.config import load_config
from distill.data.dataset import prepare_data, read_jsonl
from distill.errors import ConfigError
from distill.pool import PoolRecord, merge_pool, read_pool, with_extra_pool
from distill.stages.data import DataManifest, DataStage, data_fingerprint

# Topical, but none of the tiny task's wordings ("What do you know about ...?" and five more templates).
NEW = [f"Is there a beginners' guide to {s}?" for subjects in TOPICS.values() for s in subjects[:2]]


def pool_line(text: str, score: float = 0.5, served: int = 1) -> dict:
    return PoolRecord(text=text, score=score, signal="margin", served=served, served_label="cooking",
                      model="student", first_seen=1.0, last_seen=2.0).model_dump()


def write_pool(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **data: object) -> Path:
    monkeypatch.setenv("BANKING77_DIR", str(tmp_path / "not-this-one"))
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    sizes = {"num_to_label": 40, "devset_size": 10, "optimizer_val_size": 6, "test_size": 24, **data}
    return write_tiny_task(tmp_path / "data", data=sizes)


# --- the setting -----------------------------------------------------------------------------------------


def test_the_settings_are_checked_at_load_and_the_file_when_the_data_stage_reads_it(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"data.extra_pool': 'pool.csv' is not a .jsonl file"):
        load_config(str(tiny_profile(tmp_path, monkeypatch, extra_pool="pool.csv")))
    with pytest.raises(ConfigError, match="data.extra_pool_max caps data.extra_pool, which is not set"):
        load_config(str(tiny_profile(tmp_path, monkeypatch, extra_pool_max=5)))
    with pytest.raises(ConfigError, match="extra_pool_max': Input should be greater than or equal to 1"):
        load_config(str(tiny_profile(tmp_path, monkeypatch, extra_pool=str(tmp_path / "p.jsonl"), extra_pool_max=0)))

    # The file is read by the data stage, not at load: `distill pool --from-log` must load the profile that
    # names the pool it is about to write.
    missing = tmp_path / "pool" / "pool.jsonl"
    cfg = load_config(str(tiny_profile(tmp_path, monkeypatch, extra_pool=str(missing))))
    with pytest.raises(ConfigError) as e:
        DataStage(cfg)
    assert str(e.value) == (f"data.extra_pool: {missing} does not exist (write it with `python -m distill pool "
                            f"--from-log LOG --out {missing}`, or unset data.extra_pool)")
    assert main(["data", "--profile", str(tmp_path / "data" / "topics.yaml")]) == 2  # one line, no traceback

    write_pool(missing, [pool_line(NEW[0])])
    with missing.open("a") as f:
        f.write('{"text": "no score"}\n')
    with pytest.raises(ConfigError, match=rf"{missing}:2 is not a pool record \(score: Field required\)") as e:
        DataStage(cfg)
    assert "\n" not in str(e.value)
    missing.write_text("not json\n")
    with pytest.raises(ConfigError, match=rf"{missing}:1 is not a pool record \(Invalid JSON"):
        read_pool(missing)
    missing.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=rf"{missing} is not UTF-8 text"):
        read_pool(missing)


def test_the_pool_command_writes_what_the_reader_reads(tmp_path) -> None:
    """One PoolRecord for the writer (distill.pool.build_pool -> pool.jsonl) and the reader."""
    rows = [pool_line(t, score=1 - i / 10, served=i + 1) for i, t in enumerate(NEW[:3])]
    path = write_pool(tmp_path / "pool.jsonl", rows)
    assert [r.model_dump() for r in read_pool(path)] == rows == read_jsonl(path)


# --- the merge -------------------------------------------------------------------------------------------


def test_the_pool_is_decontaminated_deduplicated_and_kept_in_its_ranked_order(tmp_path, monkeypatch) -> None:
    cfg = load_config(str(tiny_profile(tmp_path, monkeypatch)))
    data = prepare_data(cfg)
    test_q, gold_q, unlabeled_q = data.full_test[0].text, data.gold[0].text, data.unlabeled[-1].text
    texts = [NEW[0], test_q.upper() + " !", NEW[1], gold_q.lower(), "  " + unlabeled_q + "?", NEW[0] + "!!",
             "?!", NEW[2], NEW[3]]
    merged = merge_pool(data, read_pool(write_pool(tmp_path / "pool.jsonl", [pool_line(t) for t in texts])),
                        "pool.jsonl", max_queries=2)
    assert [ex.text for ex in merged.extra] == [NEW[0], NEW[1]]  # the file's (ranked) order, then the cap
    assert merged.extra_summary == {"path": "pool.jsonl", "records": 9, "empty": 1, "test_overlap": 1,
                                    "gold_overlap": 1, "duplicate": 2, "over_max": 2, "added": 2}
    # the task's own splits are untouched
    assert [ex.text for ex in merged.unlabeled] == [ex.text for ex in data.unlabeled]
    assert merged.gold == data.gold and merged.test == data.test
    uncapped = merge_pool(data, read_pool(tmp_path / "pool.jsonl"), "pool.jsonl")
    assert [ex.text for ex in uncapped.extra] == [NEW[0], NEW[1], NEW[2], NEW[3]]


def test_the_pool_is_checked_against_the_test_and_gold_of_now_not_of_when_it_was_built(tmp_path, monkeypatch) -> None:
    """Another seed picks other gold examples: a pool query that was unlabeled then is a gold query now."""
    cfg = load_config(str(tiny_profile(tmp_path, monkeypatch)))
    other = load_config(str(tmp_path / "data" / "topics.yaml"), {"seed": 1})
    now = prepare_data(other)
    was_unlabeled = next(ex.text for ex in now.gold if ex.text in {u.text for u in prepare_data(cfg).unlabeled})
    path = write_pool(tmp_path / "pool.jsonl", [pool_line(was_unlabeled), pool_line(NEW[0])])
    merged = merge_pool(now, read_pool(path), str(path))
    assert [ex.text for ex in merged.extra] == [NEW[0]] and merged.extra_summary["gold_overlap"] == 1


# --- random and active selection, and the fingerprint ------------------------------------------------------


def test_random_labels_the_pool_after_the_tasks_own_and_the_devset_head_stays(tmp_path, monkeypatch) -> None:
    path = write_pool(tmp_path / "pool.jsonl", [pool_line(t) for t in NEW[:5]])
    plain = DataStage(load_config(str(tiny_profile(tmp_path, monkeypatch))))
    cfg = load_config(str(tiny_profile(tmp_path, monkeypatch, extra_pool=str(path), extra_pool_max=4)))
    stage = DataStage(cfg)
    own = [ex.text for ex in plain.data.to_label]
    assert len(own) == 40
    # The task's first num_to_label first (curation's devset and valset come from them), the pool after.
    assert [ex.text for ex in stage.data.to_label] == own + NEW[:4]
    assert stage.data.pool == stage.data.to_label
    m = stage.ensure()
    assert isinstance(m, DataManifest) and m.to_label == 44 and m.extra_pool is not None
    assert (m.extra_pool.added, m.extra_pool.over_max) == (4, 1)
    assert [r["text"] for r in read_jsonl(stage.dir / "unlabeled.jsonl")] == own + NEW[:4]
    # What the data command prints is what the run uses.
    assert main(["data", "--profile", str(tmp_path / "data" / "topics.yaml"), "--compact"]) == 0


def test_active_adds_the_pool_to_the_candidates_and_keeps_the_seed_round(tmp_path, monkeypatch) -> None:
    path = write_pool(tmp_path / "pool.jsonl", [pool_line(t) for t in NEW[:5]])
    active = {"selection": "active", "num_to_label": 40, "active": {"rounds": 2, "batch_size": 10}}
    plain = DataStage(load_config(str(tiny_profile(tmp_path, monkeypatch, **active))))
    cfg = load_config(str(tiny_profile(tmp_path, monkeypatch, extra_pool=str(path), **active)))
    data = DataStage(cfg).data
    # The budget is num_to_label as before; the served queries are candidates after the task's unlabeled ones,
    # so the random seed round (the first seed_size of the pool) is the same queries.
    assert [ex.text for ex in data.pool] == [ex.text for ex in plain.data.pool] + NEW[:5]
    assert data.to_label == plain.data.to_label and len(data.to_label) == 40
    seed = cfg.data.seed_size
    assert [ex.text for ex in data.pool[:seed]] == [ex.text for ex in plain.data.pool[:seed]]
    assert data_fingerprint(data) != data_fingerprint(plain.data)


def test_the_fingerprint_moves_with_the_pool_s_queries_and_not_without_a_pool(tmp_path, monkeypatch) -> None:
    path = tmp_path / "pool.jsonl"
    plain_cfg = load_config(str(tiny_profile(tmp_path, monkeypatch)))
    plain = prepare_data(plain_cfg)
    assert with_extra_pool(plain_cfg, plain) is plain  # unset: the data (and its pinned fingerprints) as before

    cfg = load_config(str(tiny_profile(tmp_path, monkeypatch, extra_pool=str(path))))

    def fp(rows: list[dict]) -> str:
        write_pool(path, rows)
        return data_fingerprint(DataStage(cfg).data)

    first = fp([pool_line(t) for t in NEW[:3]])
    assert first != data_fingerprint(plain)
    assert fp([pool_line(t) for t in NEW[:3]]) == first  # the same file: the same fingerprint
    assert fp([pool_line(t) for t in [NEW[0], NEW[1], NEW[4]]]) != first  # another query
    assert fp([pool_line(t) for t in [NEW[1], NEW[0], NEW[2]]]) != first  # another order (labeling order)
    # Only the bookkeeping changed (how often each was asked, its score): the queries labeled are the same,
    # and so is everything computed from them.
    assert fp([pool_line(t, score=0.1, served=9) for t in NEW[:3]]) == first
    # A pool with nothing new in it changes nothing.
    assert fp([pool_line(plain.unlabeled[0].text), pool_line(plain.full_test[0].text)]) == data_fingerprint(plain)
