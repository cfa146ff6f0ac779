"""What the notebook's sections show: the calls the stages make (the BFRS optimizer, the `LM.finetune` call,
the teacher), and the results they end with (the loss curve, the tables). Fast: DSPy's DummyLM stands in
for a served model; no Ray."""

from __future__ import annotations

import io
from pathlib import Path

import dspy
import pytest
from dspy.utils import DummyLM
from rich.console import Console

from distill import logs, tables
from distill.config import load_config
from distill.data.dataset import make_example, write_jsonl
from distill.evaluation.plots import plot_loss_curve
from distill.evaluation.variants import bfrs_optimizer, optimize, optimizer_call
from distill.program import IntentClassificationModule
from distill.stages.base import CallStats, read_manifest, write_manifest
from distill.stages.curation import CurationManifest, CurationStage
from distill.stages.evaluation import BestVariant, EvalManifest
from distill.stages.finetune import FinetuneManifest, FinetuneStage

pytestmark = pytest.mark.usefixtures("restore_logs")  # tests here reconfigure the process-wide logs


def _text(renderable: object) -> str:
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_the_loss_curve_is_a_png(tmp_path: Path) -> None:
    path = plot_loss_curve([3.5 / (i + 1) for i in range(40)], tmp_path / "loss.png", "loss", steps=120)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_loss_curve([], tmp_path / "empty.png", "no loss")


def _finetune_manifest(**kw: object) -> FinetuneManifest:
    base = dict(fingerprint="f", model="m-ft", adapter="a.gguf", serve_config="s.yaml", train_seconds=12.0,
                examples=8, epochs=3.0, steps=6, loss_history=[2.0, 1.0, 0.5], first_loss=2.0, last_loss=0.5,
                recipe="r.yaml", published=None)
    return FinetuneManifest(**{**base, **kw})


def test_the_finetune_stage_shows_its_own_lm_finetune_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config("local_ci")
    stage = FinetuneStage(cfg, CurationStage(cfg, None))  # type: ignore[arg-type]  # only its paths are used
    sft = [{"messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": "card?"},
                         {"role": "assistant", "content": '{"label": "card_arrival"}'}]}] * 3
    write_jsonl(stage.curation.sft_path, sft)
    call = stage.call(stage.configured_address())
    assert type(call.lm.provider).__name__ == "RayJobProvider" and call.lm.model.endswith(cfg.models.student.model)
    assert call.train_data == sft and call.train_kwargs["output_dir"] == str(stage.dir)
    shown = str(call)
    assert "student.finetune(" in shown and "3 chat examples" in shown and "<the Ray the stage starts>" in shown
    assert repr(cfg.finetune.finetuned_model) in shown and "job.result()" in shown

    # The loss curve is no output of the stage: a manifest without one (older) is still current, and
    # `ensure` redraws the plot from its loss history instead of training again.
    assert stage.loss_plot_path not in stage.outputs(_finetune_manifest())
    m = _finetune_manifest(adapter=str(tmp_path / "a.gguf"), serve_config=str(tmp_path / "s.yaml"))
    write_manifest(stage.manifest_path, m)
    for path in stage.outputs(m):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    stage.fingerprint = lambda: m.fingerprint  # type: ignore[method-assign]  # current without a real finetune
    stage.inputs = lambda: m.inputs  # type: ignore[method-assign]
    redrawn = stage.ensure()
    assert redrawn.loss_plot == str(stage.loss_plot_path) and stage.loss_plot_path.read_bytes()[:4] == b"\x89PNG"
    assert read_manifest(stage.manifest_path, FinetuneManifest).loss_plot == redrawn.loss_plot


def test_bfrs_runs_quietly_with_one_progress_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The optimizer the stage compiles with is the one the notebook prints; its per-candidate prints go to
    <logs>/bfrs.log and one progress line plus the candidates' scores stand for them."""
    logs.configure(tmp_path / "logs")
    bfrs = {"max_bootstrapped_demos": 2, "max_labeled_demos": 2, "num_candidate_programs": 1}
    assert optimizer_call(bfrs_optimizer(bfrs, threads=1, max_errors=3)) == (
        "BootstrapFewShotWithRandomSearch(metric=exact_match, max_bootstrapped_demos=2, max_labeled_demos=2, "
        "num_candidate_programs=1, num_threads=1, max_errors=3)")
    labels = ["card_arrival", "pending_top_up"]
    train = [make_example(f"where is my card {i}", "card_arrival") for i in range(4)]
    val = [make_example(f"top up pending {i}", "pending_top_up") for i in range(3)]
    lm = DummyLM([{"label": "pending_top_up"}] * 100, adapter=dspy.JSONAdapter())
    capsys.readouterr()
    optimize(IntentClassificationModule(labels), lm, train, val, bfrs, threads=1, max_errors=3, name="base student")
    out = capsys.readouterr()
    assert "Scores so far" not in out.out + out.err and "Going to sample" not in out.out + out.err
    assert "Scores so far" in (tmp_path / "logs" / "bfrs.log").read_text()
    lines = [line for line in out.out.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == ("BFRS base student: candidates on 3 valset queries: zero-shot 100.0, labeled demos 100.0, "
                         "bootstrapped demos 100.0, random #0 100.0")
    assert "4/4" in lines[-2] and "best 100.0%" in lines[-2], lines


def test_verbose_bfrs_prints_as_dspy_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(tmp_path / "logs", verbose=True)
    lm = DummyLM([{"label": "a"}] * 50, adapter=dspy.JSONAdapter())
    optimize(IntentClassificationModule(["a", "b"]), lm, [make_example("x", "a")] * 2, [make_example("y", "a")],
             {"max_bootstrapped_demos": 1, "max_labeled_demos": 1, "num_candidate_programs": 0}, 1, 3)
    assert "Scores so far" in capsys.readouterr().out and not (tmp_path / "logs" / "bfrs.log").exists()


def test_the_evaluation_table_shows_the_four_variants_and_the_best() -> None:
    m = EvalManifest(
        fingerprint="f", devset={"base": {"vanilla": 0.3, "bfrs": 0.31}, "finetuned": {"vanilla": 0.7, "bfrs": 0.69}},
        optimizer_val={"base": {"vanilla": 0.28, "bfrs": 0.33}, "finetuned": {"vanilla": 0.66, "bfrs": 0.68}},
        testset={"base": {"vanilla": 0.25, "bfrs": 0.26}, "finetuned": {"vanilla": 0.72, "bfrs": 0.7}},
        best=BestVariant(kind="finetuned", variant="vanilla", model="m-ft", program_path="p.json", test_score=0.72,
                         devset_score=0.7),
        sizes={"devset": 100, "testset": 200, "optimizer_train": 148, "optimizer_val": 50},
        bfrs={"max_bootstrapped_demos": 3, "max_labeled_demos": 3, "num_candidate_programs": 2}, plots={},
        calls=CallStats(model="m-ft", n=1, p50_s=0.1, p95_s=0.1, prompt_tokens_per_query=1,
                        completion_tokens_per_query=1))
    rows = [line for line in _text(tables.evaluation_table(m)).splitlines() if "student" in line]
    assert len(rows) == 4
    assert [r for r in rows if "deployed" in r] == [r for r in rows if "finetuned student, zero-shot" in r]
    assert "72.0%" in rows[2] and "70.0%" in rows[2]


def test_the_finetune_table_reads_the_manifest() -> None:
    text = _text(tables.finetune_table(_finetune_manifest()))
    assert "2.000 -> 0.500" in text and "8 x 3" in text and "12 s" in text


def test_the_teacher_table_puts_the_teacher_next_to_the_baselines(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.stages.base import write_manifest
    from distill.stages.baselines import BaselinesManifest
    from distill.stages.teacher import TeacherManifest, VoteSummary

    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path))
    cfg = load_config("local_ci")
    calls = CallStats(model="t", n=1, p50_s=0.1, p95_s=0.1, prompt_tokens_per_query=1, completion_tokens_per_query=1)
    teacher = TeacherManifest(
        fingerprint="t", model="smollm2", strategy="vote_llm", k=2, candidate_k=6, accuracy_gold=0.81,
        valid_rate_gold=1.0, n_gold=100, accuracy_test=0.775, valid_rate=1.0, test_size=200, test_queries_per_s=5.0,
        labeled=450, to_label=450, labels_per_s=None, calls=calls, llm_share_test=0.11,
        vote=VoteSummary(c=1000.0, loo_accuracy_gold={"1000": 0.7}, accuracy_test=0.77))
    assert "1-NN" not in _text(tables.teacher_table(cfg, None, teacher))  # type: ignore[arg-type]  # no baselines yet
    write_manifest(tmp_path / "baselines" / "manifest.json", BaselinesManifest(
        fingerprint="b", accuracy={"nearest_neighbour": 0.68, "logistic_regression": 0.73}, params={},
        test_size=200, n_gold=100, embedder="e"))
    text = _text(tables.teacher_table(cfg, None, teacher))  # type: ignore[arg-type]
    rows = [line for line in text.splitlines() if "%" in line and "│" in line]
    assert [r.split("│")[0].strip() for r in rows] == [
        "1-NN on gold", "log. regression on gold", "the teacher's vote alone (C=1000)",
        "teacher: vote_llm (smollm2), the LLM answered 11%"]
    assert "77.5%" in rows[-1] and "81.0%" in rows[-1] and "450 of 450 queries labeled" in text


def test_the_curation_table_counts_every_step_it_dropped_labels_at() -> None:
    m = CurationManifest(fingerprint="c", input=100, invalid_label=1, low_confidence=7, duplicate=2, test_overlap=0,
                         kept=90, devset=20, optimizer_train=60, optimizer_val=10, sft_examples=60,
                         label_counts={"a": 90}, plot="p.png")
    rows = dict((cell.strip() for cell in line.split("│")) for line in _text(tables.curation_table(m)).splitlines()
                if "│" in line)
    assert rows["- teacher less sure than curation.min_confidence"] == "7" and rows["kept"] == "90"


def test_a_resumed_run_says_what_its_skipped_stages_took() -> None:
    from distill.report import summary_rows

    def wall(report: dict) -> str:
        return dict(summary_rows(report))["wall time (set-up excluded)"]

    fresh = {"data": {"wall_seconds": 600.0}, "curation": {"wall_seconds": 300.0}, "run": {"wall_seconds": 960.0}}
    assert wall(fresh) == "16.0 min"  # every stage ran in this run: its wall time says it all
    resumed = {**fresh, "run": {"wall_seconds": 330.0}}  # the data stage was current and skipped
    assert wall(resumed) == "5.5 min (this run; every stage's own time, summed: 15.0 min)"


def test_the_run_manifest_says_when_the_run_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Markdown table's footer (pasted into the docs) carries the commit, the cores and the finish time."""
    import re
    import time

    from distill.report import finish_run, markdown

    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path))
    cfg = load_config("local_ci")
    report = finish_run(cfg, time.time() - 5.0, setup_seconds=1.0)
    assert report["run"]["wall_seconds"] >= 5.0
    assert re.search(r"finished 20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00;", markdown(report)), markdown(report)


def test_the_run_records_the_commit_it_started_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit made while a run goes on is not the code that ran: the run manifest keeps the one `setup` saw."""
    from distill import pipeline, report

    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path))
    cfg = load_config("local_ci", overrides={"tracking": {"enabled": False}})
    started = pipeline.setup(cfg)
    at_start = pipeline._commit_at_start[cfg.artifacts]
    assert at_start == report.git_commit(cfg.root)
    monkeypatch.setattr(report, "git_commit", lambda root=None: "committed-during-the-run")
    assert pipeline.finish_run(cfg, started)["git_commit"] == at_start
    # without setup (a report rebuilt later), the commit checked out then
    assert report.finish_run(cfg, started)["run"]["git_commit"] == "committed-during-the-run"
