"""`python -m distill pool --from-log PATH`: served traffic (the request log) as the next labeling pool.

    request log -> deduplicated (normalised text, as curation does) -> without the test and gold queries
      -> ranked by the active signal (the teacher's vote's uncertainty, `data.active.signal`) -> pool.jsonl

The pool is ranked, not cut: the most uncertain queries first, the ones the teacher should label next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from distill.config import Config
from distill.data.dataset import prepare_data, write_jsonl
from distill.data.selection import Signal, uncertainty
from distill.errors import DistillError
from distill.serving.request_log import RequestRecord, read_request_log
from distill.student.curation import normalize_text


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

    pool, counts = build_pool(records, [ex.text for ex in data.full_test], [ex.text for ex in data.gold], proba,
                              cfg.data.active.signal)
    counts = counts.model_copy(update={"torn": torn})
    out = out or cfg.artifacts / "pool" / "pool.jsonl"
    write_jsonl(out, [p.model_dump() for p in pool])
    return out, counts
