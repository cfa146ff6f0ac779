"""The stage graph, declared once: `STAGES` lists the stages, each names its upstream stages
(`Stage.upstream`), and the pipeline's order, the report's sections and each stage's tracking all derive from
it. Adding a stage: one module in this package (a `Stage` subclass), and one line in `STAGES`."""

from __future__ import annotations

from typing import Any, Sequence

from distill.config import Config
from distill.data.dataset import TaskData
from distill.errors import DistillError
from distill.stages.base import Manifest, Stage
from distill.stages.baselines import BaselinesStage
from distill.stages.cascade import CascadeStage
from distill.stages.curation import CurationStage
from distill.stages.data import DataStage
from distill.stages.evaluation import EvaluationStage
from distill.stages.finetune import FinetuneStage
from distill.stages.serving import ServingStage
from distill.stages.teacher import TeacherStage

STAGES: list[type[Stage[Any]]] = [
    DataStage,
    BaselinesStage,
    TeacherStage,
    CurationStage,
    FinetuneStage,
    EvaluationStage,
    CascadeStage,
    ServingStage,
]


def ordered(stages: Sequence[type[Stage[Any]]] | None = None) -> list[type[Stage[Any]]]:
    """The stages in an order where each comes after its upstream stages (ties: the order of `STAGES`)."""
    stages = list(STAGES if stages is None else stages)
    by_name = {s.name: s for s in stages}
    if len(by_name) != len(stages):
        raise DistillError(f"two stages share a name: {[s.name for s in stages]}")
    for s in stages:
        if unknown := [u for u in s.upstream if u not in by_name]:
            raise DistillError(f"stage {s.name!r} reads {unknown}, which no stage in STAGES is called")
    done: list[type[Stage[Any]]] = []
    pending = list(stages)
    while pending:
        ready = next((s for s in pending if all(by_name[u] in done for u in s.upstream)), None)
        if ready is None:
            raise DistillError(f"the stages' upstream declarations form a cycle among {[s.name for s in pending]}")
        done.append(ready)
        pending.remove(ready)
    return done


def manifest_types() -> dict[str, type[Manifest]]:
    """Each stage's manifest type, in pipeline order (what the report reads)."""
    return {s.name: s.manifest_type for s in ordered()}


class StageGraph:
    """The stages of one profile and one task's data, each built once, its upstream stages first.

    `options` reach the stages' `build` (e.g. `keep_running` for the serving stage)."""

    def __init__(self, cfg: Config, data: TaskData | None = None, **options: Any) -> None:
        self.cfg, self.options = cfg, options
        self._data = data
        self._built: dict[str, Stage[Any]] = {}
        self.order = ordered()

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = self.stage("data").data  # type: ignore[attr-defined]
        return self._data

    def stage(self, name: str) -> Stage[Any]:
        if name not in self._built:
            cls = next((s for s in self.order if s.name == name), None)
            if cls is None:
                raise DistillError(f"no stage {name!r}; the stages: {[s.name for s in self.order]}")
            self._built[name] = cls.build(self)
        return self._built[name]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self.stage(s.name) for s in self.order)
