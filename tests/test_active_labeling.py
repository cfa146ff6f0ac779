"""Active labeling end to end with the real teacher vote (vote_llm at vote_confidence 0: the vote answers
every query, so no LLM endpoint is needed): rounds, what selection.jsonl records, resuming from the states a
killed run leaves, and the same picks through the Ray Data engine."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from distill.active import SELECTION_FILE, PoolScorer, active_label, read_selection, write_selection
from distill.config import ActiveSelectionConfig, load_config
from distill.data.dataset import prepare_data
from distill.errors import DistillError
from distill.lm import make_lm
from distill.teacher.labeling import label_queries, read_records
from distill.teacher.labeling_ray import label_queries_ray
from distill.teacher.program import GoldIndex, build_teacher, build_vote, embed

POOL = 400
SETTINGS = ActiveSelectionConfig(rounds=2, batch_size=20, candidates=4)
SEED = 60


@pytest.fixture(scope="module")
def cfg():
    return load_config("local_ci", overrides={"teacher": {"vote_confidence": 0.0}})


@pytest.fixture(scope="module")
def parts(cfg, banking77_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("BANKING77_DIR", str(banking77_dir))
    data = prepare_data(cfg)
    mp.undo()
    index = GoldIndex(data.gold, cfg.teacher.embedder)
    vote = build_vote(index, data.labels)
    teacher = build_teacher(cfg, data.labels, data.gold, index=index, vote=vote)
    pool = data.unlabeled[:POOL]
    vecs = embed(cfg.teacher.embedder, [ex.text for ex in pool]).astype(np.float32)
    return data, teacher, vote, pool, vecs


def run(cfg, parts, out: Path, settings: ActiveSelectionConfig = SETTINGS, engine: str = "threads"):
    data, teacher, vote, pool, vecs = parts
    lm = make_lm(cfg.models.teacher, cache=False)  # never called: the vote answers at vote_confidence 0

    def label(queries):
        if engine == "ray_data":
            return label_queries_ray(teacher, cfg.models.teacher, queries, out, cfg.teacher.ray_data,
                                     fingerprint="fp", cache=False)
        return label_queries(teacher, lm, queries, out, threads=2, fingerprint="fp")

    return active_label(pool, PoolScorer(vote, vecs), settings, SEED, label, out, fingerprint="fp")


def test_rounds_pick_uncertain_diverse_queries_and_record_why(cfg, parts, tmp_path) -> None:
    data, teacher, vote, pool, vecs = parts
    result = run(cfg, parts, tmp_path)
    sel = read_selection(tmp_path / SELECTION_FILE)
    assert Counter(r.round for r in sel) == {0: SEED, 1: 20, 2: 20}
    assert [r.pool_index for r in sel if r.round == 0] == list(range(SEED))  # the seed round is random's draw
    assert len({r.pool_index for r in sel}) == len(sel)  # nothing picked twice
    assert all(pool[r.pool_index].text == r.text for r in sel)
    assert all(r.score is None and r.signal == "random" for r in sel if r.round == 0)
    assert all(r.score is not None and r.signal == "margin" for r in sel if r.round > 0)
    labels = read_records(tmp_path / "labels.jsonl")
    assert len(labels) == result.labeling.labeled == result.picked == SEED + 40
    # The seed round comes first (in the order its calls finished): curation's devset is drawn from it.
    assert {x["text"] for x in labels[:SEED]} == {pool[i].text for i in range(SEED)}
    assert {x["text"] for x in labels} == {r.text for r in sel}
    # The picks are more uncertain than the pool they came from, and spread out: no two near-copies.
    for s in result.rounds[1:]:
        assert s.mean_score is not None and s.pool_mean_score is not None and s.mean_score > s.pool_mean_score
    active = [r.pool_index for r in sel if r.round > 0]
    sims = vecs[active] @ vecs[active].T
    assert (sims - np.eye(len(active)) * 2).max() < 0.95


def test_resumes_from_what_a_killed_run_leaves(cfg, parts, tmp_path) -> None:
    full = run(cfg, parts, tmp_path / "full")
    want = [(r.pool_index, r.round, r.score) for r in read_selection(tmp_path / "full" / SELECTION_FILE)]
    out = tmp_path / "killed"
    out.mkdir()
    # Killed while labeling round 1: rounds 0-1 chosen, round 1 half labeled (files are written whole lines).
    sel = read_selection(tmp_path / "full" / SELECTION_FILE)
    write_selection(out / SELECTION_FILE, [r for r in sel if r.round <= 1])
    lines = (tmp_path / "full" / "labels.jsonl").read_text().splitlines()
    (out / "labels.jsonl").write_text("\n".join(lines[: SEED + 10]) + "\n" + lines[SEED + 10][:17])  # a torn line
    (out / "meta.json").write_text(json.dumps({"fingerprint": "fp"}))
    resumed = run(cfg, parts, out)
    assert [(r.pool_index, r.round, r.score) for r in read_selection(out / SELECTION_FILE)] == want
    labels = read_records(out / "labels.jsonl")
    assert len(labels) == len({x["id"] for x in labels}) == full.picked == resumed.labeling.labeled
    assert resumed.labeling.new == 40 - 10  # only what the killed run had not labeled
    # Run again: nothing new is picked or labeled.
    again = run(cfg, parts, out)
    assert again.labeling.new == 0 and len(read_selection(out / SELECTION_FILE)) == len(want)


def test_another_fingerprint_sets_the_old_selection_aside(cfg, parts, tmp_path) -> None:
    data, teacher, vote, pool, vecs = parts
    run(cfg, parts, tmp_path, ActiveSelectionConfig(rounds=1, batch_size=5))
    lm = make_lm(cfg.models.teacher, cache=False)
    active_label(pool, PoolScorer(vote, vecs), ActiveSelectionConfig(rounds=1, batch_size=5, signal="entropy"),
                 SEED, lambda q: label_queries(teacher, lm, q, tmp_path, fingerprint="fp2"), tmp_path, "fp2")
    assert (tmp_path / "selection.fp.jsonl").is_file()
    assert {r.signal for r in read_selection(tmp_path / SELECTION_FILE)} == {"random", "entropy"}


def test_a_changed_pool_is_a_clear_error(cfg, parts, tmp_path) -> None:
    data, teacher, vote, pool, vecs = parts
    run(cfg, parts, tmp_path, ActiveSelectionConfig(rounds=1, batch_size=5))
    with pytest.raises(DistillError, match="pool row"):
        active_label(pool[1:], PoolScorer(vote, vecs[1:]), ActiveSelectionConfig(rounds=1, batch_size=5), SEED,
                     lambda q: None, tmp_path, "fp")  # type: ignore[arg-type,return-value]


@pytest.mark.slow
def test_ray_data_engine_picks_what_threads_pick(cfg, parts, tmp_path) -> None:
    settings = ActiveSelectionConfig(rounds=1, batch_size=10)
    run(cfg, parts, tmp_path / "threads", settings)
    run(cfg, parts, tmp_path / "ray", settings, engine="ray_data")
    got = {d: [(r.pool_index, r.round, r.score) for r in read_selection(tmp_path / d / SELECTION_FILE)]
           for d in ("threads", "ray")}
    assert got["threads"] == got["ray"]
    labels = {d: {x["text"]: x["label"] for x in read_records(tmp_path / d / "labels.jsonl")} for d in got}
    assert labels["threads"] == labels["ray"] and len(labels["ray"]) == SEED + 10
