"""Evaluation helpers that need no server: best-variant choice, plots, saved-program round trip."""

from __future__ import annotations

import json

import dspy
import matplotlib.image as mpimg
import pytest

from distill.errors import DistillError
from distill.evaluation.plots import plot_confusion_matrix, plot_variant_scores
from distill.evaluation.variants import choose_best
from distill.program import DeployParams, IntentClassificationModule, ProgramParams, load_program

LABELS = ["card_arrival", "pending_top_up", "cash_withdrawal_charge"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_best_variant_follows_the_test_scores() -> None:
    test = {"base": {"vanilla": 0.31, "bfrs": 0.35}, "finetuned": {"vanilla": 0.42, "bfrs": 0.40}}
    assert choose_best(test) == ("finetuned", "vanilla")
    test["base"]["bfrs"] = 0.5
    assert choose_best(test) == ("base", "bfrs")


def test_a_test_score_tie_goes_to_the_better_devset_score() -> None:
    test = {"base": {"vanilla": 0.4, "bfrs": 0.4}, "finetuned": {"vanilla": 0.4, "bfrs": 0.3}}
    dev = {"base": {"vanilla": 0.30, "bfrs": 0.33}, "finetuned": {"vanilla": 0.50, "bfrs": 0.9}}
    assert choose_best(test, dev) == ("finetuned", "vanilla")


def test_no_variants_is_an_error() -> None:
    with pytest.raises(DistillError, match="no evaluated variants"):
        choose_best({})


def test_plots_are_valid_pngs(tmp_path) -> None:
    scores = {"base": {"vanilla": 0.31, "bfrs": 0.35}, "finetuned": {"vanilla": 0.42, "bfrs": 0.4}}
    bars = plot_variant_scores(scores, tmp_path / "a" / "dev.png", "devset", references={"teacher": 0.74, "1-NN": 0.69})
    gold = ["card_arrival", "pending_top_up", "cash_withdrawal_charge", "card_arrival"]
    pred = ["card_arrival", "card_arrival", None, "not_a_label"]
    cm = plot_confusion_matrix(gold, pred, LABELS, tmp_path / "cm.png", "best")
    for p in (bars, cm):
        assert p.read_bytes()[:8] == PNG
        h, w, _ = mpimg.imread(p).shape
        assert h > 100 and w > 100


def test_saved_program_round_trips_its_demos(tmp_path) -> None:
    program = IntentClassificationModule(LABELS)
    program.predictor.demos = [dspy.Example(text="where is my card?", label="card_arrival").with_inputs("text")]
    path = tmp_path / "p.json"
    program.save(str(path))
    loaded = load_program(path, LABELS)
    assert [dict(d) for d in loaded.predictor.demos] == [dict(d) for d in program.predictor.demos]
    assert loaded.predictor.signature.instructions == program.predictor.signature.instructions


def test_loading_a_missing_or_foreign_program_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DistillError, match="saved program not found"):
        load_program(tmp_path / "nope.json", LABELS)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(DistillError, match="not a saved IntentClassificationModule"):
        load_program(bad, LABELS)


def test_deploy_params_round_trip_through_one_model(tmp_path) -> None:
    program = tmp_path / "p.json"
    IntentClassificationModule(LABELS).save(str(program))
    written = DeployParams(model="m", program_path=str(program), labels=LABELS, variant="bfrs", kind="finetuned",
                           test_score=0.5, program=ProgramParams(reasoning=False, max_reasoning_chars=300))
    path = written.save(tmp_path / "deploy_params.json")
    read = DeployParams.load(path)
    assert read == written  # outside the checkout the program path stays absolute
    assert read.load_program().labels == LABELS


def test_deploy_params_reject_unknown_keys_and_missing_files(tmp_path) -> None:
    path = tmp_path / "deploy_params.json"
    path.write_text(json.dumps({"model": "m", "program_path": "p.json", "labels": LABELS, "variant": "bfrs",
                                "kind": "base", "test_score": 0.1, "modle": "typo"}))
    with pytest.raises(ValueError, match="modle"):
        DeployParams.load(path)
    with pytest.raises(FileNotFoundError, match="run the evaluation stage first"):
        DeployParams.load(tmp_path / "missing.json")
