"""Teacher stage: quality gate on unseen gold labels, accuracy on test queries, resumable labeling.

Labels are appended to `<artifacts>/labels/labels.jsonl` one line per query as they arrive, from the
main thread only. A rerun skips every query already there, so a run killed half-way resumes without
losing or duplicating a record. Failed calls go to `errors.jsonl` with their error and are retried on
the next run; they never reach `labels.jsonl`.

The Ray Data engine (`distill.teacher.labeling_ray`) writes Parquet shards under `shards/` instead; every run
of either engine first folds the finished shards' labels into `labels.jsonl` (`fold_shards`), so
`labels.jsonl` stays the one contract curation reads, whichever engine wrote the labels.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import dspy
from rich.console import Console
from tqdm import tqdm

from distill.calls import CallGuard, is_call_failure, is_unreachable, unreachable
from distill.errors import DistillError
from distill.lm import using
from distill.program import ValidLabel, exact_match

console = Console()


class TeacherQualityError(DistillError):
    """The teacher is not good enough to label data with."""


@dataclass
class TeacherScore:
    accuracy: float  # 0-1
    valid_rate: float  # share of answers that are one of the labels (failures count as invalid)
    n: int
    seconds: float
    llm_share: float | None = None  # vote_llm: share of the queries the LLM answered (the vote the rest)

    @property
    def per_s(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0


def score_teacher(
    teacher: dspy.Module, lm: dspy.LM, examples: Sequence[dspy.Example], labels: Sequence[str], threads: int
) -> TeacherScore:
    """Accuracy and valid-label rate of `teacher` on labeled `examples` (dspy.Evaluate, explicit max_errors).

    A failed call scores 0, but a dead endpoint raises `EndpointUnreachable` (with the URL) and a bug in our
    code raises itself: neither is the teacher being bad.
    """
    valid = ValidLabel(labels)
    guard = CallGuard(lm.kwargs.get("api_base"))
    t0 = time.perf_counter()
    with using(lm):
        result = dspy.Evaluate(
            devset=list(examples), metric=exact_match, num_threads=threads, display_progress=True,
            max_errors=len(examples) + 1,  # a failed call scores 0; it must not abort the measurement
        )(guard.wrap(teacher))
    guard.raise_cause()
    seconds = time.perf_counter() - t0
    n_valid = sum(1 for ex, pred, _ in result.results if pred is not None and valid(ex, pred))
    sources = [pred.get("source") for _, pred, _ in result.results if pred is not None]
    llm_share = sources.count("llm") / max(1, len(examples)) if any(sources) else None
    return TeacherScore(result.score / 100.0, n_valid / max(1, len(examples)), len(examples), seconds, llm_share)


def quality_gate(accuracy: float, n: int, floor: float) -> None:
    """Stop, with a clear message, when the teacher is below the profile's floor on unseen gold labels."""
    console.print(f"teacher accuracy on {n} unseen gold labels: [bold]{accuracy:.1%}[/] (floor {floor:.0%})")
    if accuracy < floor:
        raise TeacherQualityError(
            f"teacher accuracy on unseen gold labels is {accuracy:.1%}, below the floor "
            f"teacher.min_accuracy_gold={floor:.0%}: improve the teacher (strategy, k, model) before labeling"
        )


# --- labeling ---------------------------------------------------------------------------------------


def query_id(index: int, text: str) -> str:
    """Position in the profile's query list plus a text hash: a changed list is detected, not mixed up."""
    return f"{index:06d}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def read_records(path: Path) -> list[dict[str, Any]]:
    """JSONL records; a torn last line (the process was killed mid-write) is dropped and rewritten."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records, good = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise DistillError(f"{path}:{i + 1} is corrupt (not the last line): inspect or delete the file")
            path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return records


SHARDS_DIR = "shards"


def labeled_ids(path: Path) -> set[str]:
    """The ids in a JSONL file, read line by line (a million records' texts never sit in memory at once)."""
    if not path.is_file():
        return set()
    ids = set()
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                ids.add(json.loads(line)["id"])
            except json.JSONDecodeError:  # a torn line: read_records drops it (last) or names it (not last)
                return {r["id"] for r in read_records(path)}
    return ids


def record(qid: str, text: str, pred: dspy.Prediction, seconds: float) -> dict[str, Any]:
    """One line of labels.jsonl: the same fields whichever engine labeled the query."""
    rec = {"id": qid, "text": text, "label": pred.label, "latency_s": round(seconds, 3)}
    if "reasoning" in pred:  # ChainOfThought programs: the SFT assistant turn needs it
        rec["reasoning"] = pred.reasoning
    for key in ("source", "confidence"):  # vote_llm: who answered, how sure the vote was
        if key in pred:
            rec[key] = pred[key]
    return rec


def error_record(qid: str, text: str, error: BaseException | str) -> dict[str, Any]:
    """One line of errors.jsonl."""
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"id": qid, "text": text, "error": msg, "time": time.time()}


def start_labeling(out_dir: Path, fingerprint: str) -> None:
    """Set aside the labels (and shards) of another teacher or data; record the current fingerprint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path, shards = out_dir / "labels.jsonl", out_dir / "meta.json", out_dir / SHARDS_DIR
    if meta_path.is_file() and (path.is_file() or shards.is_dir()):
        old = json.loads(meta_path.read_text()).get("fingerprint")
        if old != fingerprint:  # another teacher or data: start over, keep the old files for reference
            if path.is_file():
                path.replace(out_dir / f"labels.{old}.jsonl")
            if shards.is_dir():
                shards.replace(out_dir / f"{SHARDS_DIR}.{old}")
            console.print(f"teacher/data changed since the last labeling run; moved old labels to *.{old}*")
    meta_path.write_text(json.dumps({"fingerprint": fingerprint}))


def shard_files(out_dir: Path) -> list[Path]:
    """The Parquet shards of every Ray Data run (`shards/<run>/*.parquet`), oldest run first."""
    return sorted((out_dir / SHARDS_DIR).glob("*/*.parquet"))


def read_shard(path: Path) -> list[dict[str, Any]] | None:
    """A shard's rows, or None when it is torn (its writer was killed before the footer): it is renamed
    `*.torn` so that it is never read again, and its queries are labeled again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        torn = path.with_name(path.name + ".torn")
        path.replace(torn)
        console.print(f"[yellow]{path} is incomplete ({e}); set aside as {torn.name}, its queries are relabeled[/]")
        return None


def shard_record(row: dict[str, Any]) -> dict[str, Any]:
    """A labeled shard row as a labels.jsonl record (the optional fields only when the program gave them)."""
    rec = {"id": row["id"], "text": row["text"], "label": row["label"], "latency_s": row["latency_s"]}
    for key in ("reasoning", "source", "confidence"):
        if row.get(key) is not None:
            rec[key] = row[key]
    return rec


def fold_shards(out_dir: Path) -> int:
    """Append the labeled rows of every finished shard that labels.jsonl lacks; returns how many.

    Idempotent, and safe to interrupt: an id already in labels.jsonl is never written again (the first
    label of a query wins), and a torn last line is dropped by `read_records` on the next call.
    """
    files = shard_files(out_dir)
    if not files:
        return 0
    path = out_dir / "labels.jsonl"
    have = labeled_ids(path)
    added = 0
    with path.open("a", encoding="utf-8") as out:
        for f in files:
            for row in read_shard(f) or []:
                if row["error"] is None and row["id"] not in have:
                    out.write(json.dumps(shard_record(row), ensure_ascii=False) + "\n")
                    have.add(row["id"])
                    added += 1
    return added


def done_ids(path: Path, ids: Sequence[str]) -> set[str]:
    """The ids labels.jsonl holds, all of them among `ids` (else a clear error: the query list changed)."""
    known = set(ids)
    done = set()
    for r in read_records(path):
        if r["id"] not in known:
            raise DistillError(f"{path} holds a record for a query not in this run ({r['id']}); delete it to relabel")
        done.add(r["id"])
    return done


class LabelingStopped(DistillError):
    """Labeling stopped after too many failed calls in a row; what was labeled is kept."""


@dataclass
class LabelingResult:
    path: Path
    labeled: int  # records in the file after this run
    new: int  # labeled in this run
    failed: int  # calls that failed in this run (to be retried next run)
    seconds: float


def label_queries(
    teacher: dspy.Module,
    lm: dspy.LM,
    queries: Sequence[dspy.Example],
    out_dir: Path,
    threads: int = 2,
    fingerprint: str = "",
    max_consecutive_failures: int = 10,
) -> LabelingResult:
    """Label every query once into `out_dir/labels.jsonl`, resuming from what is already there.

    Failed calls go to `errors.jsonl` and are retried next run. After `max_consecutive_failures` of them in a
    row the run stops with one line (`LabelingStopped`, naming the endpoint when it is unreachable), keeping
    every label written; a bug in our code (not a failed call) stops it at once, as itself.
    """
    start_labeling(out_dir, fingerprint)
    path, err_path = out_dir / "labels.jsonl", out_dir / "errors.jsonl"
    fold_shards(out_dir)  # labels a killed Ray Data run left in its shards count as done here too
    ids = [query_id(i, q.text) for i, q in enumerate(queries)]
    done = done_ids(path, ids)
    todo = [(qid, q) for qid, q in zip(ids, queries) if qid not in done]
    if not todo:
        console.print(f"labeling: all {len(ids)} queries already labeled in {path}")
        return LabelingResult(path, len(done), 0, 0, 0.0)

    def label_one(q: dspy.Example) -> tuple[dspy.Prediction, float]:
        t = time.perf_counter()
        with using(lm):  # DSPy settings are thread-local: set them in the worker
            pred = teacher(text=q.text)
        return pred, time.perf_counter() - t

    new = failed = streak = 0
    t0 = time.perf_counter()
    # tqdm's text bar, as dspy.Evaluate's: it updates in place in a terminal and in Jupyter, and an executed
    # notebook keeps its final line (distill.notebook). rich's live display needs ipywidgets in Jupyter.
    with (
        ThreadPoolExecutor(threads) as pool,
        tqdm(total=len(ids), initial=len(done), desc="labeling", unit="query", file=sys.stdout) as progress,
        path.open("a", encoding="utf-8") as out,
        err_path.open("a", encoding="utf-8") as err,
    ):
        futures = {pool.submit(label_one, q): (qid, q) for qid, q in todo}
        try:
            for fut in as_completed(futures):
                qid, q = futures[fut]
                try:
                    pred, seconds = fut.result()
                    out.write(json.dumps(record(qid, q.text, pred, seconds), ensure_ascii=False) + "\n")
                    out.flush()
                    new += 1
                    streak = 0
                except Exception as e:  # noqa: BLE001 - recorded and retried next run, never dropped silently
                    if not is_call_failure(e):
                        raise  # a bug: as itself, not as a failed call to retry
                    err.write(json.dumps(error_record(qid, q.text, e), ensure_ascii=False) + "\n")
                    err.flush()
                    failed += 1
                    streak += 1
                    if streak >= max_consecutive_failures:
                        raise stopped(lm, e, streak, len(done) + new, len(ids), path) from e
                progress.update()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    seconds = time.perf_counter() - t0
    if failed:
        console.print(f"[yellow]{failed} queries failed (see {err_path}); rerun to retry them[/]")
    return LabelingResult(path, len(done) + new, new, failed, seconds)


def stopped(lm: dspy.LM, e: BaseException, streak: int, labeled: int, total: int, path: Path) -> LabelingStopped:
    """The one line a labeling run stops with: the cause, and that what was labeled is kept."""
    cause = str(unreachable(lm.kwargs.get("api_base"), e)) if is_unreachable(e) else \
        f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return LabelingStopped(f"labeling stopped after {streak} failed calls in a row ({cause}); {labeled} of {total} "
                           f"queries are labeled in {path} and kept: rerun to resume")
