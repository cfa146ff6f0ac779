"""`python -m distill pool --from-log PATH`: served traffic (the request log) as the next labeling pool.

    request log -> deduplicated (normalised text, as curation does) -> without the test and gold queries
      -> ranked by the active signal (the teacher's vote's uncertainty, `data.active.signal`) -> pool.jsonl

The pool is ranked, not cut: the most uncertain queries first, the ones the teacher should label next.

`data.extra_pool: <pool.jsonl>` feeds it to the data stage (`with_extra_pool`): read with the same
`PoolRecord` it was written with, decontaminated again against the test and gold queries (the task or the
seed may have changed since it was built), deduplicated against the task's unlabeled queries, and appended
after them (`TaskData.extra`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from distill.config import Config
from distill.data.dataset import TaskData, make_example, normalize_text, prepare_data, write_jsonl
from distill.data.selection import Signal, uncertainty
from distill.errors import ConfigError, DistillError
from distill.serving.request_log import RequestRecord, read_request_log


class PoolRecord(BaseModel):
    """One line of pool.jsonl: a served query, once, with why it ranks where it does."""

    model_config = ConfigDict(extra="forbid")
    text: str
    score: float  # the active signal's uncertainty: higher = the teacher should label it sooner
    signal: str
    served: int  # times it was asked (normalised text)
    served_label: str  # the served model's last answer
    model: str
    first_seen: float
    last_seen: float


class PoolCounts(BaseModel):
    requests: int
    torn: int = 0  # log lines a killed server left unfinished (skipped)
    duplicate: int
    test_overlap: int
    gold_overlap: int
    kept: int


def build_pool(records: Sequence[RequestRecord], test_texts: Sequence[str], gold_texts: Sequence[str],
               proba: Callable[[list[str]], np.ndarray], signal: Signal = "margin",
               ) -> tuple[list[PoolRecord], PoolCounts]:
    """The ranked pool and what each step dropped. `proba` gives the vote's class probabilities per text."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(normalize_text(r.query), []).append(r)
    test_keys = {normalize_text(t) for t in test_texts}
    gold_keys = {normalize_text(t) for t in gold_texts}
    in_test = [k for k in groups if k in test_keys]
    in_gold = [k for k in groups if k in gold_keys and k not in test_keys]
    keep = [k for k in groups if k not in test_keys and k not in gold_keys and k]
    counts = PoolCounts(requests=len(records), duplicate=len(records) - len(groups), test_overlap=len(in_test),
                        gold_overlap=len(in_gold), kept=len(keep))
    if not keep:
        return [], counts
    texts = [groups[k][0].query for k in keep]  # the first wording asked
    scores = uncertainty(proba(texts), signal)
    pool = [PoolRecord(text=t, score=round(float(s), 4), signal=signal, served=len(groups[k]),
                       served_label=groups[k][-1].label, model=groups[k][-1].model,
                       first_seen=groups[k][0].time, last_seen=groups[k][-1].time)
            for k, t, s in zip(keep, texts, scores)]
    # Most uncertain first; then the more often asked, then the earlier seen (a stable order).
    pool.sort(key=lambda p: (-p.score, -p.served, p.first_seen, p.text))
    return pool, counts


def pool_from_log(cfg: Config, log: Path, out: Path | None = None) -> tuple[Path, PoolCounts]:
    """Build the pool from the profile's data (test + gold to leave out) and teacher vote; write it."""
    from distill.active import PoolScorer
    from distill.teacher.program import GoldIndex, build_vote, embed

    records, torn = read_request_log(log)
    if not records:
        raise DistillError(f"request log {log} holds no answered queries yet")
    data = prepare_data(cfg)
    index = GoldIndex(data.gold, cfg.teacher.embedder)
    vote = build_vote(index, data.labels)

    def proba(texts: list[str]) -> np.ndarray:
        return PoolScorer(vote, embed(cfg.teacher.embedder, texts), refit=False).proba({})

    # the calibration split's hand labels are held out like gold: counted with it
    held = [ex.text for ex in data.gold + data.calibration]
    pool, counts = build_pool(records, [ex.text for ex in data.full_test], held, proba,
                              cfg.data.active.signal)
    counts = counts.model_copy(update={"torn": torn})
    out = out or cfg.artifacts / "pool" / "pool.jsonl"
    write_jsonl(out, [p.model_dump() for p in pool])
    return out, counts


# --- the pool as the data stage's extra queries (data.extra_pool) -------------------------------------


class PoolMerge(BaseModel):
    """What the data stage took from `data.extra_pool`, and what it left out (the data manifest's extra_pool)."""

    model_config = ConfigDict(extra="forbid")
    path: str
    records: int  # lines in the file
    empty: int = 0  # nothing left once normalised
    test_overlap: int  # a test query now (the test split or the labels in use may have changed since)
    gold_overlap: int  # a gold query now (another seed or num_gold picks other gold examples)
    duplicate: int  # an unlabeled query of the task already, or an earlier line of the file
    over_max: int  # past data.extra_pool_max
    added: int


def read_pool(path: Path, key: str = "data.extra_pool") -> list[PoolRecord]:
    """pool.jsonl's records, in its (ranked) order; a missing or malformed file is one ConfigError line naming
    the profile key that points at it."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist (write it with `python -m distill pool --from-log LOG "
                          f"--out {path}`, or unset {key})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: {path} is not UTF-8 text (byte {e.start}); rebuild it with "
                          "`python -m distill pool --from-log`") from None
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(PoolRecord.model_validate_json(line))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"{key}: {path}:{i} is not a pool record ({where + ': ' if where else ''}"
                              f"{first['msg']}); rebuild it with `python -m distill pool --from-log`") from None
    return out


def merge_pool(data: TaskData, records: Sequence[PoolRecord], path: str, max_queries: int | None = None,
               ) -> TaskData:
    """`data` with the pool's new queries as `extra`, in the pool's order: without the test and gold queries,
    the task's unlabeled queries and repeats (normalised text, as curation compares), then the first
    `max_queries` of those. The task's own splits are untouched."""
    test_keys = {normalize_text(ex.text) for ex in data.full_test}
    gold_keys = {normalize_text(ex.text) for ex in data.gold + data.calibration}  # both held out
    seen = {normalize_text(ex.text) for ex in data.unlabeled}
    kept: list[str] = []
    counts = dict.fromkeys(("empty", "test_overlap", "gold_overlap", "duplicate"), 0)
    for r in records:
        text = r.text.strip()
        key = normalize_text(text)
        # One reason per query, the first that applies: decontamination before deduplication, as curation.
        why = ("empty" if not key else "test_overlap" if key in test_keys else "gold_overlap" if key in gold_keys
               else "duplicate" if key in seen else None)
        if why:
            counts[why] += 1
            continue
        seen.add(key)
        kept.append(text)
    added = kept if max_queries is None else kept[:max_queries]
    summary = PoolMerge(path=path, records=len(records), **counts, over_max=len(kept) - len(added), added=len(added))
    return dataclasses.replace(data, extra=[make_example(t) for t in added], extra_summary=summary.model_dump())


def with_extra_pool(cfg: Config, data: TaskData) -> TaskData:
    """The task's data with `data.extra_pool`'s queries (unchanged when it is not set)."""
    d = cfg.data
    if d.extra_pool is None:
        return data
    return merge_pool(data, read_pool(cfg.path(d.extra_pool)), d.extra_pool, d.extra_pool_max)


def describe_merge(m: PoolMerge) -> str:
    """One line: what the data stage added from the pool file, and what it left out."""
    left = [f"{n} {what}" for what, n in (("in the test set", m.test_overlap), ("gold", m.gold_overlap),
                                          ("already unlabeled or repeated", m.duplicate), ("empty", m.empty),
                                          ("past data.extra_pool_max", m.over_max)) if n]
    return (f"extra pool {m.path}: {m.added} of {m.records} served queries added"
            + (f" (left out: {', '.join(left)})" if left else ""))
