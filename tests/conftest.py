from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def restore_logs():
    """Put distill.logs back as it was: tests that call `logs.configure` change process-wide settings."""
    from distill import logs

    before = logs.settings()
    yield
    logs.configure(before.dir, before.verbose)
