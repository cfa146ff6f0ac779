"""Evaluation helpers that need no server: the deployed variant's choice (devset, never test), plots,
saved-program round trip."""

from __future__ import annotations

import inspect
import itertools
import json
from pathlib import Path

import dspy
import matplotlib.image as mpimg
import pytest

from distill.errors import DistillError
from distill.evaluation import variants as variants_module
from distill.evaluation.plots import plot_confusion_matrix, plot_loss_curve, plot_variant_scores
from distill.evaluation.variants import EvalResult, Variant, choose_best, run_testset_evaluation
from distill.program import DeployParams, IntentClassificationModule, ProgramParams, load_program

LABELS = ["card_arrival", "pending_top_up", "cash_withdrawal_charge"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_the_deployed_variant_follows_the_devset_scores() -> None:
    dev = {"base": {"vanilla": 0.31, "bfrs": 0.35}, "finetuned": {"vanilla": 0.42, "bfrs": 0.40}}
    assert choose_best(dev) == ("finetuned", "vanilla")
    dev["base"]["bfrs"] = 0.5
    assert choose_best(dev) == ("base", "bfrs")


def test_a_devset_tie_goes_to_the_valset_then_to_the_simpler_variant() -> None:
    dev = {"base": {"vanilla": 0.4, "bfrs": 0.4}, "finetuned": {"vanilla": 0.4, "bfrs": 0.3}}
    val = {"base": {"vanilla": 0.30, "bfrs": 0.33}, "finetuned": {"vanilla": 0.50, "bfrs": 0.9}}
    assert choose_best(dev, val) == ("finetuned", "vanilla")  # finetuned bfrs is better on val, not on dev
    same = {"finetuned": {"bfrs": 0.6, "vanilla": 0.6}}  # e.g. BFRS kept the zero-shot program
    assert choose_best(same, same) == ("finetuned", "vanilla")


def test_choose_best_cannot_see_the_test_scores() -> None:
    params = inspect.signature(choose_best).parameters
    assert list(params) == ["dev_scores", "tiebreak_scores"]
    assert not any("test" in name for name in inspect.signature(run_testset_evaluation).parameters
                   if name not in ("testset",))


def test_permuting_the_test_scores_does_not_change_the_deployed_variant(tmp_path, monkeypatch) -> None:
    """The real `run_testset_evaluation`, with every evaluation scripted: the devset and valset scores stay,
    the test scores are permuted over the four variants in every order; the choice never moves, and the
    reported test scores are the permuted ones."""
    kinds = [("base", "vanilla"), ("base", "bfrs"), ("finetuned", "vanilla"), ("finetuned", "bfrs")]
    variants = [Variant(k, v, f"m-{k}", tmp_path / f"{k}_{v}.json") for k, v in kinds]
    dev = {"base": {"vanilla": 0.30, "bfrs": 0.45}, "finetuned": {"vanilla": 0.45, "bfrs": 0.40}}
    val = {"base": {"vanilla": 0.30, "bfrs": 0.40}, "finetuned": {"vanilla": 0.50, "bfrs": 0.20}}
    monkeypatch.setattr(variants_module, "load_program", lambda path, *a, **kw: Path(path).stem)
    chosen = set()
    for perm in itertools.permutations([0.9, 0.7, 0.5, 0.1]):
        test = {f"{k}_{v}": s for (k, v), s in zip(kinds, perm)}

        def scripted(program, lm, examples, labels, threads, max_errors, predictions_path=None, name="",
                     prompt="full", test=test):
            return EvalResult(test[program], 1.0, len(examples), 0.0)

        monkeypatch.setattr(variants_module, "evaluate", scripted)
        best, scores = run_testset_evaluation({"base": None, "finetuned": None}, variants, LABELS, [], tmp_path,
                                              dev_scores=dev, tiebreak_scores=val)
        assert scores == {k: {v: test[f"{k}_{v}"] for v in ("vanilla", "bfrs")} for k in ("base", "finetuned")}
        chosen.add((best.kind, best.variant))
    assert chosen == {("finetuned", "vanilla")}  # devset tie with base bfrs, won on the valset


def test_no_variants_is_an_error() -> None:
    with pytest.raises(DistillError, match="no evaluated variants"):
        choose_best({})


def test_plots_are_valid_pngs(tmp_path) -> None:
    scores = {"base": {"vanilla": 0.31, "bfrs": 0.35}, "finetuned": {"vanilla": 0.42, "bfrs": 0.4}}
    bars = plot_variant_scores(scores, tmp_path / "a" / "dev.png", "devset", references={"teacher": 0.74, "1-NN": 0.69})
    gold = ["card_arrival", "pending_top_up", "cash_withdrawal_charge", "card_arrival"]
    pred = ["card_arrival", "card_arrival", None, "not_a_label"]
    cm = plot_confusion_matrix(gold, pred, LABELS, tmp_path / "cm.png", "best")
    loss = plot_loss_curve([2.0, 1.5, 1.1, 0.9, 0.7, 0.6], tmp_path / "loss.png", "loss", steps=6,
                           loss_steps=[1, 2, 3, 4, 5, 6], validation=[(2, 1.4), (4, 1.0), (6, 1.05)], chosen_step=4)
    for p in (bars, cm, loss):
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
