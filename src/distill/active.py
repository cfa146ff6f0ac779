"""Active labeling (`data.selection: active`): the teacher labels what teaches the student most.

It drives the teacher's labeling (both engines) and sits above `distill.teacher`, outside it: the teacher
code's fingerprint -- and so random selection's labels -- stay as they were.

    seed round: the first `seed_size` queries of the shuffled pool (exactly random selection's first ones)
    round r = 1..rounds: the vote, refitted on gold + the teacher's labels so far, scores the rest of the
        pool (`distill.data.selection.uncertainty`); `select_batch` picks `batch_size` diverse ones among
        the most uncertain; the teacher labels them.

`selection.jsonl` (next to labels.jsonl) records each picked query: its pool row, round and score, one
`SelectionRecord` a line. A round's picks are written whole (atomically) before the teacher sees them, and
labeling resumes as always (labels.jsonl, by query id = position in the concatenated rounds), so a killed
run continues where it stopped and picks nothing twice. The seed round comes first in labels.jsonl, so
curation's devset and optimizer valset (its first records) are a random sample (DataConfig checks it fits).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import dspy
import numpy as np
from pydantic import BaseModel, ConfigDict

from distill.config import ActiveSelectionConfig
from distill.data.selection import Signal, select_batch, uncertainty
from distill.errors import DistillError
from distill.teacher.labeling import LabelingResult, query_id, read_records
from distill.teacher.vote import LabelVote, fit_lr

SELECTION_FILE = "selection.jsonl"


class SelectionRecord(BaseModel):
    """One line of selection.jsonl: which round picked a pool query, and why."""

    model_config = ConfigDict(extra="forbid")
    pool_index: int  # row of the data stage's pool (artifacts/data/unlabeled.jsonl)
    text: str
    round: int  # 0: the random seed round
    signal: str  # "random" (seed round) or the uncertainty signal
    score: float | None = None  # the signal's uncertainty when it was picked (None: seed round)


class RoundSummary(BaseModel):
    round: int
    picked: int
    mean_score: float | None  # of the picked queries (seed round: None)
    pool_mean_score: float | None  # of every query that could have been picked: how much the picks stand out
    select_seconds: float


def read_selection(path: Path) -> list[SelectionRecord]:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(SelectionRecord.model_validate_json(line))
            except ValueError as e:
                raise DistillError(f"{path}:{i} is not a selection record ({e.__class__.__name__}); "
                                   "delete the file to select again") from None
    return out


def write_selection(path: Path, records: Sequence[SelectionRecord]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(r.model_dump_json() + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)  # whole rounds only: a killed run never leaves half a round


def start_selection(out_dir: Path, fingerprint: str) -> None:
    """Set aside the selection of another teacher, data or selection setting (as `start_labeling` does
    with the labels, which it is called just before)."""
    meta, path = out_dir / "meta.json", out_dir / SELECTION_FILE
    if meta.is_file() and path.is_file():
        old = json.loads(meta.read_text()).get("fingerprint")
        if old != fingerprint:
            path.replace(out_dir / f"selection.{old}.jsonl")


def check_selection(records: Sequence[SelectionRecord], pool: Sequence[dspy.Example], path: Path) -> None:
    for r in records:
        if r.pool_index >= len(pool) or pool[r.pool_index].text != r.text:
            raise DistillError(f"{path}: pool row {r.pool_index} is not {r.text[:60]!r} any more (the pool changed "
                               "under the same fingerprint); delete the file to select again")


class PoolScorer:
    """The vote's class probabilities over the pool, refitted on gold + the teacher's labels so far."""

    def __init__(self, vote: LabelVote, pool_vecs: np.ndarray, refit: bool = True) -> None:
        self.vote, self.pool_vecs, self.refit = vote, pool_vecs, refit

    def proba(self, labeled: dict[int, str]) -> np.ndarray:
        """P(label) for every pool row; `labeled`: pool row -> the teacher's label (labels outside the
        vote's set -- invalid answers -- are left out of the refit)."""
        model = self.vote.model
        known = set(self.vote.names[1])
        rows = [i for i, lab in sorted(labeled.items()) if lab in known]
        if self.refit and rows:
            # The vote's C, chosen on gold; the teacher's labels join gold and the label names.
            x = np.vstack([self.vote.gold_vecs, self.vote.names[0], self.pool_vecs[rows]])
            y = self.vote.gold_labels + self.vote.names[1] + [labeled[i] for i in rows]
            model = fit_lr(x, y, self.vote.c, balanced=True)
        return model.predict_proba(self.pool_vecs)


@dataclass
class ActiveResult:
    labeling: LabelingResult
    rounds: list[RoundSummary]
    picked: int


def active_label(pool: Sequence[dspy.Example], scorer: PoolScorer, settings: ActiveSelectionConfig,
                 seed_size: int, label: Callable[[list[dspy.Example]], LabelingResult], out_dir: Path,
                 fingerprint: str, seed: int = 0) -> ActiveResult:
    """Label a random seed round then `settings.rounds` active rounds of `pool` with `label` (an engine's
    resumable labeling of a query list into `out_dir`); resumes from selection.jsonl and labels.jsonl.

    Stops early (without picking more) when a round is not fully labeled: the caller reports what is missing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SELECTION_FILE
    start_selection(out_dir, fingerprint)
    records = read_selection(path)
    check_selection(records, pool, path)
    if not records:
        records = [SelectionRecord(pool_index=i, text=pool[i].text, round=0, signal="random")
                   for i in range(min(seed_size, len(pool)))]
        write_selection(path, records)
    # Round k+1 is picked only once rounds <= k are all labeled: a resumed run labels from the last picked round.
    last = max(rec.round for rec in records)
    summaries = [RoundSummary(round=k, picked=len(rs), mean_score=_mean([x.score for x in rs if x.score is not None]),
                              pool_mean_score=None, select_seconds=0.0)
                 for k in range(last + 1) if (rs := [x for x in records if x.round == k])]
    result: LabelingResult | None = None
    signal: Signal = settings.signal
    new = failed = 0
    seconds = 0.0
    for r in range(last, settings.rounds + 1):
        picked = [rec for rec in records if rec.round <= r]
        result = label([pool[rec.pool_index] for rec in picked])
        new, failed, seconds = new + result.new, failed + result.failed, seconds + result.seconds
        if result.labeled < len(picked) or r == settings.rounds:
            break
        t0 = time.perf_counter()
        by_id = {query_id(i, rec.text): rec.pool_index for i, rec in enumerate(picked)}
        labeled = {by_id[x["id"]]: x["label"] for x in read_records(result.path) if x["id"] in by_id}
        scores = uncertainty(scorer.proba(labeled), signal)
        taken = {rec.pool_index for rec in picked}
        available = [i for i in range(len(pool)) if i not in taken]
        if not available:
            break
        centers = np.vstack([scorer.vote.gold_vecs, scorer.pool_vecs[sorted(taken)]])
        batch = select_batch(scorer.pool_vecs, scores, available, settings.batch_size, settings.diversity,
                             settings.candidates, centers=centers, seed=seed + r)
        chosen = [SelectionRecord(pool_index=i, text=pool[i].text, round=r + 1, signal=signal,
                                  score=round(float(scores[i]), 4)) for i in batch]
        records = records + chosen
        write_selection(path, records)
        summaries.append(RoundSummary(
            round=r + 1, picked=len(chosen), mean_score=_mean([float(scores[i]) for i in batch]),
            pool_mean_score=_mean([float(scores[i]) for i in available]),
            select_seconds=round(time.perf_counter() - t0, 3)))
        print(f"active round {r + 1}: {len(chosen)} queries, mean {signal} {summaries[-1].mean_score} "
              f"(pool {summaries[-1].pool_mean_score})")
    assert result is not None
    # Every round's labeling call in this run: what labels_per_s is computed from.
    total = LabelingResult(result.path, result.labeled, new, failed, seconds)
    return ActiveResult(labeling=total, rounds=summaries, picked=sum(s.picked for s in summaries))


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None
