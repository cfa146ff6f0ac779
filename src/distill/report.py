"""The run report, `<artifacts>/report.json`: every stage writes its measured numbers into its own block."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from distill.config import Config

_lock = threading.Lock()


def report_path(cfg: Config) -> Path:
    return cfg.artifacts / "report.json"


def load_report(cfg: Config) -> dict[str, Any]:
    p = report_path(cfg)
    return json.loads(p.read_text()) if p.is_file() else {}


def update_report(cfg: Config, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into `report[section]` and write the file atomically."""
    with _lock:
        report = load_report(cfg)
        report.setdefault(section, {}).update(values)
        p = report_path(cfg)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
        tmp.replace(p)
        return report
