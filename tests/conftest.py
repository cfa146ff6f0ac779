from __future__ import annotations

import copy
import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test-fast` runs 2 workers) each worker's torch and BLAS would start one thread per
# core, and on 2 cores their spinning barriers cost more than the threads save. Each worker takes its share of
# the cores instead; set before torch or numpy is imported (no plugin imports them), and an explicit
# OMP_NUM_THREADS wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cpus // _WORKERS)))


# An xdist worker holds everything torch, transformers, DSPy, MLflow and Ray import, and each full garbage
# collection walks all of it. The modules and test items there when collection ends stay for the whole
# session, so they are frozen out of the collections, and a full collection is considered after 100
# collections of the middle generation instead of 10. Frozen again once the session is over, everything is
# left to the OS instead of to a last collection at exit (the run ends when the last worker has exited).
# Only in workers: a process that goes on after pytest.main keeps its collector as it was.
def _xdist_worker() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def pytest_collection_finish(session: pytest.Session) -> None:
    if _xdist_worker():
        import gc

        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, 100)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _xdist_worker():
        import gc

        gc.freeze()


@pytest.fixture(scope="session")
def banking77_dir() -> Path:
    """The original banking77 CSVs: BANKING77_DIR, else ../shared/data/banking77 beside the repo."""
    d = Path(os.environ.get("BANKING77_DIR") or ROOT.parent / "shared" / "data" / "banking77")
    if not (d / "train.csv").is_file():
        pytest.fail(f"banking77 CSVs not found at {d}: set BANKING77_DIR (CI sets it to ../shared/data/banking77)")
    return d


@pytest.fixture
def with_banking77(monkeypatch: pytest.MonkeyPatch, banking77_dir: Path) -> Path:
    monkeypatch.setenv("BANKING77_DIR", str(banking77_dir))
    return banking77_dir


@pytest.fixture(scope="session")
def pipeline_artifacts(tmp_path_factory: pytest.TempPathFactory, banking77_dir: Path) -> Path:
    """The main job run once on the smallest profile (`local_ci`), in a temporary artifact directory.

    Shared by the pipeline, notebook and serving tests (~10 min on 2 cores); the environment it sets is
    undone right after the run, so tests that need it set it again. DISTILL_TEST_ARTIFACTS names a
    directory to keep between test sessions while developing: current stages are then skipped.
    """
    from distill import pipeline

    keep = os.environ.get("DISTILL_TEST_ARTIFACTS")
    art = Path(keep) if keep else tmp_path_factory.mktemp("artifacts") / "local_ci"
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("DISTILL_ARTIFACTS_DIR", str(art))
        mp.setenv("BANKING77_DIR", str(banking77_dir))
        pipeline.run("local_ci")
    finally:
        mp.undo()
    return art


@dataclass(frozen=True)
class TinyRun:
    """The tiny task's pipeline run (`tiny_task_run`)."""

    cfg: Any  # distill.config.Config, as pipeline.run returned it
    report: dict[str, Any]  # load_report right after the run
    profile: Path  # <data_dir>/topics.yaml as the run read it (the loop rewrites it for its reruns)
    data_dir: Path  # DISTILL_DATA_DIR of the run: topics.csv and the profile
    artifacts: Path  # DISTILL_ARTIFACTS_DIR of the run; test_deploy_gate's loop goes on running in it
    snapshot: Path  # a copy of `artifacts` as the run left them (not its logs), for tests that only read them


@pytest.fixture(scope="session")
def tiny_task_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """tests/test_task.py's tiny task (`topics.yaml` extending local_ci, one CSV) through the whole pipeline
    once, at test_task.TINY_RUN_SIZES / TINY_RUN_SETTINGS.

    test_task.py's whole-pipeline test and the first run of test_deploy_gate.py's loop are this one run
    (minutes on 2 cores). The loop goes on in `artifacts` (reruns, the gate's record), so a test that only
    reads the run reads `snapshot` and `report`. The environment it sets is undone right after the run;
    adapter digests are cached in the run's own directory, not in ~/.cache."""
    from tests.test_task import TINY_RUN_SETTINGS, TINY_RUN_SIZES, write_tiny_task

    from distill import pipeline
    from distill.report import load_report

    root = tmp_path_factory.mktemp("tiny_task_run")
    art, data_dir = root / "artifacts", root / "data"
    profile = write_tiny_task(data_dir, data=TINY_RUN_SIZES, **TINY_RUN_SETTINGS)
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("DISTILL_ARTIFACTS_DIR", str(art))
        mp.setenv("DISTILL_DATA_DIR", str(data_dir))
        mp.delenv("BANKING77_DIR", raising=False)  # nothing of banking77 is needed, or read
        mp.setattr("distill.models._DIGESTS", root / "digests.json")
        cfg = pipeline.run(str(profile))
        report = load_report(cfg)
    finally:
        mp.undo()
    snapshot = root / "snapshot"  # not the logs: one may still grow
    shutil.copytree(art, snapshot, symlinks=True, ignore=shutil.ignore_patterns("logs"))
    return TinyRun(cfg=cfg, report=report, profile=profile, data_dir=data_dir, artifacts=art,
                   snapshot=snapshot)


@pytest.fixture
def restore_logs():
    """Put distill.logs back as it was: tests that call `logs.configure` change process-wide settings."""
    from distill import logs

    before = logs.settings()
    yield
    logs.configure(before.dir, before.verbose)


# --- the same deterministic work, done once per session ----------------------------------------------------
#
# The teacher tests build the real vote over the real gold embeddings again and again: every TeacherStage.run
# embeds the same gold, test and gate queries (one MiniLM call per query) and refits the same leave-one-out
# logistic regressions. Both are deterministic functions of their inputs, so the session keeps each answer by
# the exact input (every text and setting of an embedding call; the bytes of x, y, C and the class weights of a
# fit) and hands back a copy. Nothing is faked: every distinct input is still computed by the real model, and a
# caller that embeds other texts or fits other rows gets its own real answer.


class _Memo:
    def __init__(self) -> None:
        self.answers: dict[Any, Any] = {}
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.answers:
                self.hits += 1
                return copy.deepcopy(self.answers[key])
        value = compute()  # outside the lock: the product calls these from threads
        with self.lock:
            self.misses += 1
            self.answers.setdefault(key, copy.deepcopy(value))
        return value


EMBEDDINGS, FITS = _Memo(), _Memo()


def _memo_encode(model: Any, spec: str) -> Any:
    if getattr(model, "_distill_test_memo", False):
        return model
    encode = model.encode

    def memo_encode(sentences: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(sentences, str) or args:
            return encode(sentences, *args, **kwargs)
        key = (spec, tuple(sentences), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        return EMBEDDINGS.get(key, lambda: encode(sentences, **kwargs))

    model.encode = memo_encode
    model._distill_test_memo = True
    return model


@pytest.fixture(scope="session", autouse=True)
def _deterministic_work_once():
    """Embeddings (per loaded embedder and exact call) and logistic-regression fits kept for the session."""
    import numpy as np

    from distill import active
    from distill.evaluation import baselines
    from distill.teacher import program, vote

    load_embedder, fit_lr = program.load_embedder, vote.fit_lr

    def memo_load_embedder(spec: str) -> Any:
        return _memo_encode(load_embedder(spec), spec)

    def memo_fit_lr(x: np.ndarray, y: Any, c: float, balanced: bool = False) -> Any:
        x = np.ascontiguousarray(x)
        key = (hashlib.sha256(x.tobytes()).hexdigest(), x.shape, str(x.dtype), tuple(map(str, y)), float(c),
               bool(balanced))
        return FITS.get(key, lambda: fit_lr(x, y, c, balanced))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(program, "load_embedder", memo_load_embedder)
        for module in (vote, active, baselines):
            mp.setattr(module, "fit_lr", memo_fit_lr)
        yield
