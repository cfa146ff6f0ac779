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
