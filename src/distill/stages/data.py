"""The data stage: the profile's task loaded and checked, its labels kept, shuffled, labels deleted, splits written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import Config
from distill.data.dataset import TaskData, prepare_data, save_data
from distill.pool import PoolMerge, describe_merge, with_extra_pool
from distill.stages.base import Manifest, Stage, fingerprint


class DataManifest(Manifest):
    source: str
    train: int
    test: int
    test_used: int
    labels: list[str]
    label_counts: dict[str, int]
    gold: int
    calibration: int = 0  # data.num_calibration: hand labels only the cascade's calibration reads
    unlabeled: int
    to_label: int
    extra_pool: PoolMerge | None = None  # data.extra_pool: the served queries added, and those left out


def data_fingerprint(data: TaskData) -> str:
    """Changes whenever any split the later stages read changes (texts, labels, order)."""
    # Active selection picks from the whole pool; random selection's fingerprint is what it always was.
    # data.extra_pool's queries are in `to_label` (random) or `pool` (active): they change it when there are
    # any, and a profile without one keeps its fingerprint.
    pool = ([ex.text for ex in data.pool],) if data.selection == "active" else ()
    calibration = ([(ex.text, ex.label) for ex in data.calibration],) if data.calibration else ()
    return fingerprint(
        data.labels, [(ex.text, ex.label) for ex in data.gold], [ex.text for ex in data.to_label],
        [(ex.text, ex.label) for ex in data.test], [ex.text for ex in data.full_test], *pool, *calibration,
    )


class DataStage(Stage[DataManifest]):
    name = "data"
    title = "data"
    manifest_type = DataManifest

    @classmethod
    def build(cls, graph: Any) -> "DataStage":
        return cls(graph.cfg, graph._data)  # the data the graph was given, or the profile's

    def __init__(self, cfg: Config, data: TaskData | None = None) -> None:
        super().__init__(cfg)
        # ~2 s: every stage needs it in memory. data.extra_pool's served queries join here, read (and checked)
        # before any stage starts.
        self.data = data if data is not None else with_extra_pool(cfg, prepare_data(cfg))
        self._fp = data_fingerprint(self.data)

    def fingerprint(self) -> str:
        return self._fp

    def outputs(self, manifest: DataManifest) -> list[Path]:
        return [self.dir / f"{name}.jsonl"
                for name in ("gold", "unlabeled", "test", *(("calibration",) if manifest.calibration else ()))]

    def describe(self, m: DataManifest) -> str:
        held = f"calibration {m.calibration}, " if m.calibration else ""
        return (f"{m.source}: train {m.train}, test {m.test} (using {m.test_used}), {len(m.labels)} labels, "
                f"gold {m.gold}, {held}unlabeled {m.unlabeled} (teacher labels {m.to_label})"
                + (f", {m.extra_pool.added} served queries added (data.extra_pool)" if m.extra_pool else ""))

    def run(self) -> DataManifest:
        save_data(self.data, self.dir)
        m = DataManifest(fingerprint=self._fp, **self.data.summary())
        print(self.describe(m))
        if m.extra_pool is not None:
            print(describe_merge(m.extra_pool))
        return m
