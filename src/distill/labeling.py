"""Teacher stage: quality gate on unseen gold labels, accuracy on test queries, resumable labeling.

Labels are appended to `<artifacts>/labels/labels.jsonl` one line per query as they arrive, from the
main thread only. A rerun skips every query already there, so a run killed half-way resumes without
losing or duplicating a record. Failed calls go to `errors.jsonl` with their error and are retried on
the next run; they never reach `labels.jsonl`.
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

from distill.errors import DistillError
from distill.program import ValidLabel, exact_match
from distill.lm import using

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
    """Accuracy and valid-label rate of `teacher` on labeled `examples` (dspy.Evaluate, explicit max_errors)."""
    valid = ValidLabel(labels)
    t0 = time.perf_counter()
    with using(lm):
        result = dspy.Evaluate(
            devset=list(examples), metric=exact_match, num_threads=threads, display_progress=True,
            max_errors=len(examples),  # a failed call scores 0; it must not abort the measurement
        )(teacher)
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
) -> LabelingResult:
    """Label every query once into `out_dir/labels.jsonl`, resuming from what is already there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, err_path, meta_path = out_dir / "labels.jsonl", out_dir / "errors.jsonl", out_dir / "meta.json"
    if meta_path.is_file() and path.is_file():
        old = json.loads(meta_path.read_text()).get("fingerprint")
        if old != fingerprint:  # another teacher or data: start over, keep the old file for reference
            stale = out_dir / f"labels.{old}.jsonl"
            path.replace(stale)
            console.print(f"teacher/data changed since the last labeling run; moved old labels to {stale.name}")
    meta_path.write_text(json.dumps({"fingerprint": fingerprint}))

    ids = [query_id(i, q.text) for i, q in enumerate(queries)]
    known = set(ids)
    done = set()
    for r in read_records(path):
        if r["id"] not in known:
            raise DistillError(f"{path} holds a record for a query not in this run ({r['id']}); delete it to relabel")
        done.add(r["id"])
    todo = [(qid, q) for qid, q in zip(ids, queries) if qid not in done]
    if not todo:
        console.print(f"labeling: all {len(ids)} queries already labeled in {path}")
        return LabelingResult(path, len(done), 0, 0, 0.0)

    def label_one(q: dspy.Example) -> tuple[dspy.Prediction, float]:
        t = time.perf_counter()
        with using(lm):  # DSPy settings are thread-local: set them in the worker
            pred = teacher(text=q.text)
        return pred, time.perf_counter() - t

    new = failed = 0
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
                    rec = {"id": qid, "text": q.text, "label": pred.label, "latency_s": round(seconds, 3)}
                    if "reasoning" in pred:  # ChainOfThought programs: the SFT assistant turn needs it
                        rec["reasoning"] = pred.reasoning
                    for key in ("source", "confidence"):  # vote_llm: who answered, how sure the vote was
                        if key in pred:
                            rec[key] = pred[key]
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.flush()
                    new += 1
                except Exception as e:  # noqa: BLE001 - recorded and retried next run, never dropped silently
                    rec = {"id": qid, "text": q.text, "error": f"{type(e).__name__}: {e}", "time": time.time()}
                    err.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    err.flush()
                    failed += 1
                progress.update()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    seconds = time.perf_counter() - t0
    if failed:
        console.print(f"[yellow]{failed} queries failed (see {err_path}); rerun to retry them[/]")
    return LabelingResult(path, len(done) + new, new, failed, seconds)
