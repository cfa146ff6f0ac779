"""Run tracking (distill.tracking) on a real MLflow store in a temporary artifact directory, read back through
MLflow's own client; the whole pipeline's record is tested at the end (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from distill import cli, tracking
from distill.config import load_config
from distill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

REPORT = {  # a report.json's shape: nested sections, numbers, strings, lists, nulls
    "teacher": {"accuracy_test": 0.62, "accuracy_gold": 0.7, "model": "smollm2", "labels_per_s": None,
                "vote": {"c": 1.0, "loo_accuracy_gold": {"0.1": 0.5, "1": 0.6}}},
    "eval": {"best": {"test_score": 0.58, "kind": "finetuned"}, "testset": {"base": {"vanilla": 0.4}}},
    "finetune": {"loss_history": [2.5, 2.0, 1.25], "first_loss": 2.5, "last_loss": 1.25, "steps": 3},
    "run": {"wall_seconds": 312.5, "profile": "local_ci", "sizes": {"num_gold": 100}},
}


@pytest.fixture
def cfg(tmp_path, monkeypatch, with_banking77):
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "local_ci"))
    monkeypatch.delenv("DISTILL_TRACKING_URI", raising=False)
    monkeypatch.delenv("DISTILL_TRACKING", raising=False)
    yield load_config("local_ci")
    tracking.finish({}, status="KILLED")  # a test that failed half-way leaves no run open


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking.local_uri(cfg))


def _children(client: MlflowClient, exp_id: str, parent: str) -> dict:
    runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    return {r.data.tags[tracking.STAGE_TAG]: r for r in runs}


def _record_run(cfg, skipped: bool, tmp_path: Path) -> str:
    """One pipeline run's worth of tracking calls: a stage that runs (or is current), then the report."""
    plot = tmp_path / "loss_curve.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n fake but a file")
    (tmp_path / "programs").mkdir(exist_ok=True)
    (tmp_path / "programs" / "finetuned_bfrs.json").write_text("{}")
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORT))
    assert tracking.start(cfg) is not None
    with tracking.stage("finetune") as rec:
        if skipped:
            rec.skipped("fp1")
        else:
            rec.ran(REPORT["finetune"], "fp1", [plot, tmp_path / "programs"], {"label_counts.json": {"a": 3}},
                    {"loss": list(zip((5, 10, 15), REPORT["finetune"]["loss_history"]))})
    return tracking.finish(REPORT, [report])


def test_a_run_and_a_rerun_are_recorded_as_mlflow_runs(cfg, tmp_path) -> None:
    first = _record_run(cfg, skipped=False, tmp_path=tmp_path)
    second = _record_run(cfg, skipped=True, tmp_path=tmp_path)
    client = _client(cfg)
    exp = client.get_experiment_by_name("distill-local_ci")
    assert exp.artifact_location == (cfg.artifacts / "mlflow" / "artifacts").as_uri()  # one folder, inside
    parent = client.get_run(first)
    assert parent.info.status == "FINISHED" and parent.data.tags["distill.profile"] == "local_ci"
    assert parent.data.tags["version.dspy"] and parent.data.tags["version.mlflow"]
    assert parent.data.tags["distill.git_commit"] == tracking.git_commit()
    # params: the profile flattened; metrics: every number of the report, by dotted key
    assert parent.data.params["data.num_to_label"] == "60" and parent.data.params["teacher.strategy"] == "vote_llm"
    assert parent.data.params["finetune.training.max_steps"] == "4"
    assert parent.data.metrics == {"teacher.accuracy_test": 0.62, "teacher.accuracy_gold": 0.7,
                                   "teacher.vote.c": 1.0, "teacher.vote.loo_accuracy_gold.0.1": 0.5,
                                   "teacher.vote.loo_accuracy_gold.1": 0.6, "eval.best.test_score": 0.58,
                                   "eval.testset.base.vanilla": 0.4, "finetune.first_loss": 2.5,
                                   "finetune.last_loss": 1.25, "finetune.steps": 3.0, "run.wall_seconds": 312.5,
                                   "run.sizes.num_gold": 100.0}
    assert [a.path for a in client.list_artifacts(first)] == ["report.json"]
    # the stage that ran: its numbers, its loss per step, its files; tagged not skipped
    ft = _children(client, exp.experiment_id, first)["finetune"]
    assert ft.data.tags[tracking.SKIPPED_TAG] == "false" and ft.data.tags["distill.fingerprint"] == "fp1"
    assert ft.data.metrics["last_loss"] == 1.25
    assert [(m.step, m.value) for m in client.get_metric_history(ft.info.run_id, "loss")] == [
        (5, 2.5), (10, 2.0), (15, 1.25)]
    assert {a.path for a in client.list_artifacts(ft.info.run_id)} == {"loss_curve.png", "programs",
                                                                        "label_counts.json"}
    assert parent.data.tags["distill.stages_ran"] == "finetune"
    # the rerun: the same stage current -> tagged skipped, no metric and no step of its own
    ft2 = _children(client, exp.experiment_id, second)["finetune"]
    assert ft2.data.tags[tracking.SKIPPED_TAG] == "true"
    assert ft2.data.metrics == {} and client.get_metric_history(ft2.info.run_id, "loss") == []
    assert client.list_artifacts(ft2.info.run_id) == []
    assert client.get_run(second).data.tags["distill.stages_skipped"] == "finetune"
    # the history: newest first, with the report's headline numbers
    rows = tracking.run_history(cfg, last=5)
    assert [r["run_id"] for r in rows] == [second, first]
    assert rows[0]["teacher"] == 0.62 and rows[0]["student"] == 0.58 and rows[0]["ratio"] == pytest.approx(0.58 / 0.62)
    assert rows[0]["stages_ran"] == "" and rows[1]["stages_ran"] == "finetune"
    assert [r["run_id"] for r in tracking.run_history(cfg, last=1)] == [second]


def test_runs_command_prints_the_history(cfg, tmp_path, capsys) -> None:
    assert cli.main(["runs", "--profile", "local_ci"]) == 2
    assert "no run of 'local_ci' recorded" in capsys.readouterr().err
    run_id = _record_run(cfg, skipped=False, tmp_path=tmp_path)
    capsys.readouterr()
    assert cli.main(["runs", "--profile", "local_ci", "--last", "3"]) == 0
    out = capsys.readouterr().out
    assert run_id[:8] in out and "62.0%" in out and "58.0%" in out and "0.94x" in out and "5.2 min" in out
    assert tracking.ui_command(cfg) in out
    assert cli.main(["runs", "--profile", "local_ci", "--last", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_switched_off_nothing_is_recorded(cfg, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILL_TRACKING", "0")
    off = load_config("local_ci")
    assert not off.tracking.enabled and tracking.start(off) is None
    with tracking.stage("data") as rec:
        rec.ran({"n": 1}, "fp")  # a no-op without a run
    assert tracking.finish(REPORT) is None
    assert not (off.artifacts / "mlflow").exists()
    assert not load_config("local_ci", overrides={"tracking": {"enabled": False}}).tracking.enabled


def test_the_tracking_block_is_validated(with_banking77) -> None:
    with pytest.raises(ConfigError, match="unknown key 'tracking.uri'"):
        load_config("local_ci", overrides={"tracking": {"uri": "http://mlflow:5000"}})  # URIs come from the env
    with pytest.raises(ConfigError, match="tracking.trace_sample"):
        load_config("local_ci", overrides={"tracking": {"trace_sample": 1.5}})


def test_an_unreachable_server_falls_back_to_the_local_store(cfg, tmp_path, monkeypatch, capsys) -> None:
    unreachable = "http://127.0.0.1:9"  # the discard port: connection refused
    monkeypatch.setenv("DISTILL_TRACKING_URI", unreachable)
    started = time.perf_counter()
    run_id = _record_run(cfg, skipped=False, tmp_path=tmp_path)
    assert time.perf_counter() - started < 60  # one quick try, not MLflow's minutes of retries
    out = capsys.readouterr().out
    assert "DISTILL_TRACKING_URI is unreachable" in out and "local store" in out
    run = _client(cfg).get_run(run_id)  # nothing lost: the whole run is in the local store
    assert run.info.status == "FINISHED" and run.data.metrics["eval.best.test_score"] == 0.58
    assert run.data.tags["distill.remote_unreachable"] == "DISTILL_TRACKING_URI"
    # the URI itself was taken from the environment and written nowhere
    store = cfg.artifacts / "mlflow"
    assert not any(unreachable.encode() in p.read_bytes() for p in store.rglob("*") if p.is_file())


def test_a_tracking_failure_mid_run_warns_once_and_the_run_goes_on(cfg, tmp_path, capsys) -> None:
    t = tracking.start(cfg)
    assert t is not None
    # The store's artifact folder is gone and a file is in its place: MLflow cannot write an artifact.
    (cfg.artifacts / "mlflow" / "artifacts").write_text("not a folder")
    plot = tmp_path / "label_distribution.png"
    plot.write_bytes(b"\x89PNG")
    with tracking.stage("curation") as rec:
        rec.ran({"kept": 3}, "fp", [plot])  # the metrics land, the plot fails
        rec.ran({"kept": 4}, "fp")  # after a failure tracking is off for this run: not attempted, no error
    assert t.broken
    # Whitespace collapsed: rich wraps the warning at the console's width, and where the break falls depends
    # on the length of the paths in it (the tmp directory's).
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("MLflow tracking failed") == 1 and "the run goes on without tracking" in out
    assert tracking.finish(REPORT) == t.run_id
    client = _client(cfg)
    assert client.get_run(t.run_id).info.status == "FINISHED"  # closed, not left looking in progress
    child = _children(client, t.experiment_id, t.run_id)["curation"]
    assert child.data.metrics == {"kept": 3.0} and child.info.status == "FINISHED"


# --- the pipeline's own record (slow: the local_ci run of conftest, then a second run) -------------------

STAGES = {"data", "baselines", "teacher", "curation", "finetune", "eval", "cascade", "serving"}
LOAD_AND_CLASSIFY = """
import json, sys
import mlflow, mlflow.dspy
mlflow.set_tracking_uri(sys.argv[1])
program = mlflow.dspy.load_model(f"models:/{sys.argv[2]}/latest")
print(json.dumps([program(text=q).label for q in json.loads(sys.argv[3])]))
"""


@pytest.mark.slow
def test_the_pipeline_is_recorded_and_a_rerun_adds_a_run_of_skipped_stages(pipeline_artifacts, banking77_dir,
                                                                           monkeypatch) -> None:
    import httpx

    from distill import pipeline
    from distill.serving.control import shutdown

    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(pipeline_artifacts))
    monkeypatch.setenv("BANKING77_DIR", str(banking77_dir))
    monkeypatch.delenv("DISTILL_TRACKING_URI", raising=False)
    cfg = load_config("local_ci")
    client = _client(cfg)
    exp_id = client.get_experiment_by_name(tracking.experiment_name(cfg)).experiment_id

    def pipeline_runs() -> list:
        return client.search_runs([exp_id], filter_string=f"tags.`{tracking.PIPELINE_TAG}` = 'true'",
                                  order_by=["attributes.start_time ASC"])

    report = json.loads((pipeline_artifacts / "report.json").read_text())

    def computed(name: str):
        """The stage run that computed the stage's current outputs: it ran (was not skipped) with the
        fingerprint its manifest holds now. On a fresh artifact directory that is the fixture's run; with
        DISTILL_TEST_ARTIFACTS kept between sessions the fixture skips current stages (tagged skipped, see
        the rerun below) and their numbers are on the earlier session's run, which the kept store holds."""
        runs = client.search_runs([exp_id], filter_string=f"tags.`{tracking.STAGE_TAG}` = '{name}' AND "
                                                          f"tags.`{tracking.SKIPPED_TAG}` = 'false' AND "
                                                          f"tags.`distill.fingerprint` = '{report[name]['fingerprint']}'",
                                  order_by=["attributes.start_time DESC"])
        assert runs, f"no recorded run computed the current {name} stage"
        return runs[0]

    stage_runs = {name: computed(name) for name in ("teacher", "curation", "finetune", "eval")}
    for name, run in stage_runs.items():
        assert run.info.status == "FINISHED", name
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.info.status == "FINISHED" and parent.data.params["data.num_to_label"] == "60"
        # every pipeline run records all eight stages, run or skipped
        children = _children(client, exp_id, parent.info.run_id)
        assert set(children) == STAGES and all(c.info.status == "FINISHED" for c in children.values())
        # the stage's numbers, as report.json holds them
        # the step series (the finetune's loss and validation loss per step) are not report numbers
        latest = {k: v for k, v in run.data.metrics.items() if k not in ("loss", "eval_loss")}
        assert latest == tracking.numbers(report[name]), name
    ft_run = stage_runs["finetune"].info.run_id
    losses = client.get_metric_history(ft_run, "loss")
    # local_ci's recipe logs the loss every step: steps 1, 2, ..., max_steps
    assert [(m.step, m.value) for m in losses] == list(enumerate(report["finetune"]["loss_history"], start=1))
    assert len(losses) >= 2
    # the plots, the saved programs, deploy_params.json, the label counts and the report, as artifacts
    paths = {name: {a.path for a in client.list_artifacts(r.info.run_id)} for name, r in stage_runs.items()}
    assert {"label_distribution.png", "label_counts.json"} <= paths["curation"]
    assert "loss_curve.png" in paths["finetune"]
    plots = {Path(p).name for p in report["eval"]["plots"].values()}
    assert {"devset_scores.png", "testset_scores.png", "confusion_best.png"} <= plots <= paths["eval"]
    assert {"programs", "deploy_params.json"} <= paths["eval"]
    assert {a.path for a in client.list_artifacts(stage_runs["eval"].info.run_id, "programs")} >= {
        "programs/base_bfrs.json", "programs/finetuned_bfrs.json"}
    eval_parent = stage_runs["eval"].data.tags["mlflow.parentRunId"]
    assert {"report.json", "deploy_params.json"} <= {a.path for a in client.list_artifacts(eval_parent)}
    counts = json.loads(Path(client.download_artifacts(stage_runs["curation"].info.run_id, "label_counts.json",
                                                       tempfile.mkdtemp())).read_text())
    assert counts == report["curation"]["label_counts"]
    # sampled DSPy traces of the teacher's and the evaluation's calls
    assert len(client.search_traces(locations=[exp_id], max_results=5, include_spans=False)) >= 1
    # the best program: a version registered by each evaluation that ran, the newest by the current one
    versions = client.search_model_versions(f"name = '{tracking.model_name(cfg)}'",
                                            order_by=["version_number DESC"])
    assert versions and versions[0].run_id == stage_runs["eval"].info.run_id
    evaluations = client.search_runs([exp_id], filter_string=f"tags.`{tracking.STAGE_TAG}` = 'eval' AND "
                                                             f"tags.`{tracking.SKIPPED_TAG}` = 'false'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in evaluations)  # one each
    assert versions[0].source.startswith("models:/")  # an MLflow 3 logged model, beside the run's artifacts

    # A second run, nothing changed. Serving is left up to compare the registered program with it.
    before = {r.info.run_id for r in pipeline_runs()}
    started = pipeline.setup(cfg)
    data = pipeline.data_stage(cfg)
    for stage in (pipeline.baselines_stage, pipeline.teacher_stage, pipeline.curation_stage,
                  pipeline.finetune_stage, pipeline.evaluation_stage, pipeline.cascade_stage):
        stage(cfg, data)
    try:
        pipeline.serving_stage(cfg, data, keep_running=True)
        pipeline.finish_run(cfg, started)
        queries = [ex.text for ex in data.test[:4]]
        bodies = [httpx.post(cfg.serving.url, json={"query": q}, timeout=60).json() for q in queries]
        # the served student's own answer: the cascade's `student_label` (its `label` may be the teacher's)
        served = [b.get("student_label", b["label"]) for b in bodies]
        # mlflow.dspy.load_model in a fresh process: the program and the LM it was logged with
        out = subprocess.run([sys.executable, "-c", LOAD_AND_CLASSIFY, tracking.local_uri(cfg),
                              tracking.model_name(cfg), json.dumps(queries)],
                             capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
    finally:
        shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == served
    new = [r for r in pipeline_runs() if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    children2 = _children(client, exp_id, new[0].info.run_id)
    assert set(children2) == STAGES
    assert {n for n, c in children2.items() if c.data.tags[tracking.SKIPPED_TAG] == "true"} == STAGES - {"serving"}
    for name in STAGES - {"serving"}:  # a current stage logs nothing of its own
        assert children2[name].data.metrics == {} and client.list_artifacts(children2[name].info.run_id) == []
    assert client.get_metric_history(children2["finetune"].info.run_id, "loss") == []
    assert len(client.search_model_versions(f"name = '{tracking.model_name(cfg)}'")) == len(versions)  # none new
    # the parent holds the report this run wrote, number for number
    report = json.loads((pipeline_artifacts / "report.json").read_text())
    assert new[0].data.metrics == tracking.numbers(report)
    assert new[0].data.metrics["eval.best.test_score"] == report["eval"]["best"]["test_score"]
    assert new[0].data.tags["distill.stages_ran"] == "serving"
    rows = tracking.run_history(cfg, last=2)
    assert rows[0]["run_id"] == new[0].info.run_id and rows[0]["teacher"] == report["teacher"]["accuracy_test"]


def test_the_sanity_check_is_traced_whole_and_other_calls_are_sampled(cfg, capsys) -> None:
    import dspy
    from dspy.utils import DummyLM

    from distill.lm import CompactJSONAdapter, sanity_check_program, using
    from distill.program import IntentClassificationModule

    labels = ["card_arrival", "lost_or_stolen_card"]
    program = IntentClassificationModule(labels)
    lm = DummyLM([{"label": "card_arrival"}] * 300, adapter=CompactJSONAdapter())  # a scripted LM, no server
    # a tiny ratio: of the calls below, almost none traced (P(more than 3 of 200) is ~1e-9)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"trace_sample": 0.001})})
    t = tracking.start(cfg)
    assert t is not None and t.traces
    pred = sanity_check_program(lm, program, dspy.Example(text="where is my card?").with_inputs("text"))
    assert pred.label == "card_arrival" and "Program output label: card_arrival" in capsys.readouterr().out
    with using(lm):
        for _ in range(200):
            program(text="my card has not come")
    tracking.finish({})
    with using(lm):  # after the run: DSPy is no longer traced
        program(text="my card has not come")
    client = _client(cfg)
    traces = client.search_traces(locations=[t.experiment_id], max_results=500, flush=True)
    sanity = [tr for tr in traces if tr.data.spans[0].name == "sanity_check"]
    assert len(sanity) == 1 and len(traces) <= 4
    spans = [s.name for s in sanity[0].data.spans]
    assert "IntentClassificationModule.forward" in spans and "DummyLM.__call__" in spans
