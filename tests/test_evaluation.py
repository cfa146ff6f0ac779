"""Evaluation helpers that need no server: best-variant choice, plots, saved-program round trip."""

from __future__ import annotations

import json

import dspy
import matplotlib.image as mpimg
import pytest

from distill.errors import DistillError
from distill.evaluation import choose_best, load_program, write_deploy_params
from distill.program import IntentClassificationModule
from distill.plots import plot_confusion_matrix, plot_variant_scores

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
    bars = plot_variant_scores(scores, tmp_path / "a" / "dev.png", "devset", reference=0.74)
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


def test_deploy_params_name_the_model_program_and_labels(tmp_path) -> None:
    path = write_deploy_params(tmp_path / "deploy_params.json", model="m", program_path=str(tmp_path / "p.json"),
                               labels=LABELS, variant="bfrs", kind="finetuned", score=0.5, reasoning=False,
                               max_reasoning_chars=400)
    params = json.loads(path.read_text())
    assert params["model"] == "m" and params["labels"] == LABELS and params["program_path"].endswith("p.json")
