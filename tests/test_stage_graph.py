"""The stage graph is declared once (`distill.stages.graph.STAGES` + each stage's `upstream`): a stage added
with one file and one registration line appears in the pipeline's order, the report and tracking."""

from __future__ import annotations

from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from distill import pipeline, tracking
from distill.config import load_config
from distill.errors import DistillError
from distill.report import assemble_report
from distill.stages import graph
from distill.stages.base import Manifest, Stage, Tracked
from distill.stages.data import data_fingerprint


class ToyManifest(Manifest):
    gold: int


class ToyStage(Stage[ToyManifest]):
    """What a new stage is: a name, its upstream stages, a fingerprint, a run (this file is all of it)."""

    name = "toy"
    title = "toy: count the gold examples"
    manifest_type = ToyManifest
    upstream = ("data",)

    def inputs(self) -> dict[str, str]:
        return {"data": data_fingerprint(self.data)}

    def __init__(self, cfg: Any, data: Any) -> None:
        super().__init__(cfg)
        self.data = data

    def fingerprint(self) -> str:
        return "toy-" + data_fingerprint(self.data)

    def run(self) -> ToyManifest:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "gold.txt").write_text(str(len(self.data.gold)))
        return ToyManifest(fingerprint=self.fingerprint(), gold=len(self.data.gold))

    def tracked(self, m: ToyManifest) -> Tracked:
        return Tracked(files=[self.dir / "gold.txt"], dicts={"toy.json": {"gold": m.gold}})


@pytest.fixture
def cfg(tmp_path, monkeypatch, with_banking77):
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    monkeypatch.delenv("DISTILL_TRACKING_URI", raising=False)
    monkeypatch.delenv("DISTILL_TRACKING", raising=False)
    yield load_config("local_ci")
    tracking.finish({}, status="KILLED")


def test_the_order_follows_the_upstream_declarations() -> None:
    names = [s.name for s in graph.ordered()]
    assert names == ["data", "baselines", "teacher", "curation", "finetune", "eval", "cascade", "serving"]
    for i, s in enumerate(graph.ordered()):
        assert set(s.upstream) <= set(names[:i]), s.name
    assert list(graph.manifest_types()) == names


def test_a_bad_declaration_is_refused_with_the_stage_named() -> None:
    class Orphan(ToyStage):
        name, upstream = "orphan", ("nowhere",)

    class A(ToyStage):
        name, upstream = "a", ("b",)

    class B(ToyStage):
        name, upstream = "b", ("a",)

    with pytest.raises(DistillError, match="orphan.*nowhere"):
        graph.ordered([*graph.STAGES, Orphan])
    with pytest.raises(DistillError, match="cycle"):
        graph.ordered([A, B])


def test_a_new_stage_is_one_file_and_one_line(cfg, monkeypatch) -> None:
    # the one registration line (in graph.py it is a line of STAGES); declared before the data: the order
    # still puts it after its upstream
    monkeypatch.setattr(graph, "STAGES", [ToyStage, *graph.STAGES])
    names = [s.name for s in graph.ordered()]
    assert names.index("toy") == names.index("data") + 1
    # the pipeline runs it (through tracking), the report shows it
    assert tracking.start(cfg) is not None
    pipeline.stage(cfg, "data")
    m = pipeline.stage(cfg, "toy")
    assert isinstance(m, ToyManifest) and m.gold == cfg.data.num_gold
    report = assemble_report(cfg)
    assert report["toy"]["gold"] == cfg.data.num_gold and report["toy"]["inputs"] == {"data": report["data"]["fingerprint"]}
    # its tracking: a nested run with its numbers and the files it names
    run_id = tracking.finish(report, [])
    client = MlflowClient(tracking.local_uri(cfg))
    exp = client.get_experiment_by_name(f"distill-{cfg.name}")
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    toy = next(r for r in children if r.data.tags[tracking.STAGE_TAG] == "toy")
    assert toy.data.metrics["gold"] == cfg.data.num_gold
    assert {a.path for a in client.list_artifacts(toy.info.run_id)} == {"gold.txt", "toy.json"}
    assert graph.StageGraph(cfg).stage("toy").is_current()  # built by the graph like every stage


def test_a_stage_reading_an_undeclared_stage_is_refused(cfg) -> None:
    class Sneaky(ToyStage):
        name, upstream = "sneaky", ()

    with pytest.raises(DistillError, match="sneaky.*data.*upstream"):
        Sneaky(cfg, graph.StageGraph(cfg).data).ensure()
