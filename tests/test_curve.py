"""The learning curve's points (their profiles: budget, selection), its CSV, table and chart; measuring a point
is in test_pipeline."""

from __future__ import annotations

import math
import re

import pytest

from distill.config import load_config, project_root
from distill.errors import DistillError
from distill.stages.base import endpoint_fingerprint
from distill.student.finetune import load_recipe
from distill_harness.curve import (
    Budget,
    active_data,
    point_config,
    profile_budget,
    reuse_teacher_cache,
    series,
    write_point_recipe,
)
from distill_harness.learning_curve import (
    TABLE_COMMAND,
    CurveRow,
    comparisons,
    comparisons_markdown,
    curve_block,
    curve_csv,
    merge_rows,
    plot_curve,
    read_curve,
    standard_error,
    to_markdown,
    write_curve,
)


def test_a_point_is_the_profile_cut_to_n_labels_and_trains_at_least_min_steps() -> None:
    full = load_config("local_full")
    rate = {"learning_rate": 1.0e-3}  # the profile's other training settings travel with every point
    assert full.finetune.training == {"num_train_epochs": 1, **rate}
    small = point_config(full, "teacher", 100, min_steps=120)  # one epoch would be 13 steps of 8
    assert small.data.optimizer_train_size == 100 and small.curation.sft_source == "teacher"
    assert small.finetune.training == {"max_steps": 120, **rate} and small.finetune.recipe == full.finetune.recipe
    assert small.artifacts == full.artifacts / "curve" / "teacher_100"
    big = point_config(full, "teacher", 1000, min_steps=120)  # 125 steps in one epoch: the profile's own
    assert big.finetune.training == full.finetune.training and big.data.optimizer_train_size == 1000
    gold = point_config(full, "gold", 100, min_steps=120)
    assert gold.curation.sft_source == "gold" and gold.data == full.data
    assert gold.artifacts.name == "gold_100" and gold.finetune.training == {"max_steps": 120, **rate}
    sure = point_config(full, "teacher", 1000, min_steps=120, min_confidence=0.5)  # a curation lever at n
    assert sure.curation.min_confidence == 0.5 and sure.artifacts.name == "teacher_1000_conf0.5"
    assert series("teacher", 0.5) == "teacher labels, confidence >= 0.5" and series("gold") == "gold labels"
    # everything upstream of curation is the profile's: the points reuse its labels
    assert (gold.teacher, gold.models, gold.program) == (full.teacher, full.models, full.program)
    # no floor unless asked: the points differ from each other only in the labels they hold
    assert small.curation.min_confidence is None and full.curation.min_confidence == "auto"


def test_an_exact_budget_is_the_same_for_every_point_and_named_in_it() -> None:
    full = load_config("local_full")
    steps = Budget("steps", 440)
    for n in (100, 300, 1000):  # the same steps whatever the size: labels separated from training compute
        p = point_config(full, "teacher", n, budget=steps)
        assert p.finetune.training == {"max_steps": 440, "learning_rate": 1.0e-3} and p.artifacts.name == f"teacher_{n}_steps440"
        assert p.finetune.recipe == str(p.artifacts / "recipe.yaml")  # no early stopping (written by the point)
    epochs = Budget("epochs", 3)
    p = point_config(full, "gold", 100, budget=epochs)
    assert p.finetune.training == {"num_train_epochs": 3, "learning_rate": 1.0e-3}
    assert p.artifacts.name == "gold_100_epochs3"
    assert [b.label for b in (steps, epochs, Budget("epochs", 1), Budget("min_steps", 120))] == \
        ["440 steps", "3 epochs", "1 epoch", "min 120 steps"]
    assert not Budget("min_steps", 120).exact and steps.exact and epochs.exact
    assert profile_budget(full) == "1 epoch" and profile_budget(load_config("local")) == "3 epochs"
    for bad in (("steps", 0), ("steps", 2.5), ("epochs", -1)):
        with pytest.raises(ValueError):
            Budget(*bad)  # type: ignore[arg-type]


def test_an_exact_budget_trains_under_a_recipe_without_early_stopping(tmp_path) -> None:
    full = load_config("local_full").model_copy(update={"artifacts_dir": str(tmp_path)})
    p = point_config(full, "teacher", 300, budget=Budget("steps", 440))
    write_point_recipe(full, p)
    recipe, profile_recipe = load_recipe(p.finetune.recipe, p.finetune.training), load_recipe(
        full.path(full.finetune.recipe), full.finetune.training)
    assert recipe.validation.patience is None and recipe.training["load_best_model_at_end"] is False
    # still holding out and evaluating the same slice every epoch (the validation curve is recorded)
    assert recipe.validation.holdout == profile_recipe.validation.holdout
    assert recipe.training["eval_strategy"] == "epoch" and recipe.training["max_steps"] == 440
    assert (recipe.model, recipe.lora, recipe.scaling) == (profile_recipe.model, profile_recipe.lora,
                                                           profile_recipe.scaling)
    before = (path := tmp_path / "curve" / "teacher_300_steps440" / "recipe.yaml").stat().st_mtime_ns
    write_point_recipe(full, p)  # unchanged: not rewritten, so the finetune's fingerprint stays
    assert path.stat().st_mtime_ns == before


def test_an_active_point_labels_devset_valset_and_n_in_a_seed_round_then_uncertainty_rounds() -> None:
    full = load_config("local_full")
    assert (full.data.devset_size, full.data.optimizer_val_size) == (300, 50)  # the rule's premise
    for n, rounds, batch in ((300, 2, 100), (1000, 9, 100), (100, 1, 50), (250, 1, 100)):
        d = active_data(full.data, n)
        assert (d.selection, d.num_to_label, d.optimizer_train_size) == ("active", 350 + n, None)
        assert (d.active.rounds, d.active.batch_size) == (rounds, batch)
        assert d.seed_size == 350 + batch + n % batch  # devset + valset + one random batch (+ the remainder)
        assert d.seed_size + d.active.rounds * d.active.batch_size == d.num_to_label
        assert (d.active.signal, d.active.diversity, d.active.refit) == (
            full.data.active.signal, full.data.active.diversity, full.data.active.refit)
    budget = Budget("steps", 440)
    active = point_config(full, "teacher", 300, budget=budget, selection="active")
    random = point_config(full, "teacher", 300, budget=budget)
    assert active.artifacts.name == "active_300_steps440" and active.data == active_data(full.data, 300)
    # only the selection differs from the random point at the same n: curation (no floor), training, teacher
    assert (active.curation, active.finetune.training, active.teacher, active.models) == \
        (random.curation, random.finetune.training, random.teacher, random.models)
    assert random.data.selection == "random" and random.data.num_to_label is None
    with pytest.raises(DistillError):
        point_config(full, "gold", 100, selection="active")
    with pytest.raises(DistillError):
        active_data(full.data, 1)


def test_an_active_point_answers_from_a_copy_of_the_full_runs_teacher_cache(tmp_path) -> None:
    full = load_config("local_full").model_copy(update={"artifacts_dir": str(tmp_path / "full")})
    p = point_config(full, "teacher", 300, budget=Budget("steps", 440), selection="active")
    key = endpoint_fingerprint(full, full.models.teacher)
    assert endpoint_fingerprint(p, p.models.teacher) == key  # the point's teacher is the same endpoint
    assert reuse_teacher_cache(full, p) is False  # nothing to copy: the teacher would call its LLM
    (src := full.artifacts / "dspy_cache_endpoints" / key).mkdir(parents=True)
    (src / "cache.db").write_text("calls")
    assert reuse_teacher_cache(full, p) is True
    copied = p.artifacts / "dspy_cache_endpoints" / key / "cache.db"
    assert copied.read_text() == "calls"
    (src / "cache.db").write_text("changed later")
    assert reuse_teacher_cache(full, p) is True and copied.read_text() == "calls"  # copied once, then its own


def test_standard_error_is_binomial() -> None:
    assert standard_error(0.5, 1000) == pytest.approx(math.sqrt(0.25 / 1000))
    assert standard_error(1.0, 200) == 0.0 and math.isnan(standard_error(0.5, 0))
    row = CurveRow(kind="student", name="teacher labels", labels=300, test_accuracy=0.703, test_size=1000)
    assert row.se == pytest.approx(0.01445, abs=1e-5)


OLD_CSV = """kind,name,labels,steps,epochs,train_seconds,test_accuracy,test_size
student,teacher labels,300,120,3.16,1218.7,0.703,1000
reference,teacher,,,,,0.78,1000
"""


def test_the_curve_survives_its_csv_old_and_new_and_draws(tmp_path) -> None:
    (tmp_path / "old.csv").write_text(OLD_CSV)  # a CSV from before the selection/budget/commit columns
    old = read_curve(tmp_path / "old.csv")
    assert [(r.name, r.labels, r.selection, r.budget, r.commit) for r in old] == \
        [("teacher labels", 300, None, None, None), ("teacher", None, None, None, None)]
    rows = [CurveRow(kind="student", name="teacher labels", selection="random", budget="440 steps", labels=300,
                     steps=440, epochs=13.0, train_seconds=None, test_accuracy=0.71, test_size=1000, labeled=4071,
                     kept=4060, commit="abc123def456", point="teacher_300_steps440"),
            CurveRow(kind="student", name="teacher labels", selection="active", budget="440 steps", labels=298,
                     steps=440, epochs=13.1, train_seconds=1100.0, test_accuracy=0.73, test_size=1000, labeled=650,
                     kept=648, commit="abc123def456", point="active_300_steps440"),
            CurveRow(kind="student", name="gold labels", selection="random", budget="min 120 steps", labels=100,
                     steps=120, epochs=9.6, train_seconds=501.2, test_accuracy=0.55, test_size=1000, point="gold_100"),
            CurveRow(kind="student", name="teacher labels, confidence >= 0.4", selection="random", budget="1 epoch",
                     labels=3507, steps=439, test_accuracy=0.787, test_size=1000, point="local_full"),
            CurveRow(kind="reference", name="teacher", test_accuracy=0.77, test_size=1000)]
    assert read_curve(write_curve(rows, tmp_path / "curve.csv")) == rows
    table = to_markdown(rows).splitlines()
    assert table[2] == "| student on gold labels | random | min 120 steps | 100 | 120 | 55.0% ± 1.6 of 1000 |"
    assert table[3].startswith("| student on teacher labels | random | 440 steps | 300 | 440 | 71.0% ± 1.4")
    assert table[4].startswith("| student on teacher labels | active | 440 steps | 298 |")
    assert table[5].startswith("| student on teacher labels, confidence >= 0.4 | random | 1 epoch | 3507 |")
    assert table[-1] == "| teacher | - | - | - | - | 77.0% ± 1.3 of 1000 |"
    block = curve_block(rows)
    assert "Measured at commit `abc123def456` (2 student rows from before" in block
    # a point measured again replaces its old row, and a new full run the old one's (whatever its floor and
    # label count); other points add to the curve
    again = rows[0].model_copy(update={"test_accuracy": 0.72})
    rerun = rows[3].model_copy(update={"name": "teacher labels, confidence >= 0.42", "labels": 3307})
    new = CurveRow(kind="student", name="teacher labels", selection="random", budget="1 epoch", labels=300,
                   test_accuracy=0.6, test_size=1000, point="teacher_300_epochs1")
    teacher = rows[4].model_copy(update={"test_accuracy": 0.781})
    assert merge_rows(rows, [rerun, teacher, again, new]) == [again, *rows[1:3], rerun, teacher, new]
    png = plot_curve([*rows, new], tmp_path / "curve.png", "t", this_run=rows[2].model_copy(update={"name": "local"}))
    assert png.stat().st_size > 10_000


def test_the_committed_table_is_the_csvs() -> None:
    # docs/measurements.md shows `curve_block(read_curve())` as printed by TABLE_COMMAND: regenerate, not edit
    rows = read_curve()
    assert all(r.selection and r.budget and r.point for r in rows if r.kind == "student")  # how and where
    text = (project_root() / "docs" / "measurements.md").read_text()
    blocks = re.findall(rf"<!-- generated: {re.escape(TABLE_COMMAND)} -->.*?<!-- end generated -->", text, re.S)
    assert blocks == [curve_block(rows)], f"regenerate it: {TABLE_COMMAND}"
    assert curve_csv().with_suffix(".png").is_file()


def test_the_differences_the_prose_cites_are_found_by_rule() -> None:
    def student(selection: str, budget: str, labels: int, steps: int, acc: float) -> CurveRow:
        return CurveRow(kind="student", name="teacher labels", selection=selection, budget=budget, labels=labels,
                        steps=steps, test_accuracy=acc, test_size=1000, point=f"{selection}_{labels}_{steps}")

    full = student("random", "1 epoch", 3710, 418, 0.779)
    short = student("random", "min 120 steps", 1000, 125, 0.678)
    rnd, act = student("random", "220 steps", 1000, 220, 0.754), student("active", "220 steps", 998, 220, 0.689)
    ref = CurveRow(kind="reference", name="teacher", test_accuracy=0.78, test_size=1000)
    pairs = [(a.point, b.point) for _, a, b in comparisons([full, short, rnd, act, ref])]
    # active against random at about the same labels; more steps on the same labels; exact budgets against
    # the full run (a "min" budget is not compared with it: its steps grow with the labels)
    assert pairs == [(act.point, rnd.point), (rnd.point, short.point), (rnd.point, full.point),
                     (act.point, full.point)]
    table = comparisons_markdown([full, short, rnd, act, ref])
    assert "| active against random selection (teacher labels, 220 steps; 998 / 1000 labels) | -6.5 ± 2.0 | -3.3 |" \
        in table
    assert comparisons_markdown([full, ref]) == ""  # nothing to compare: no table


def test_active_rounds_reports_each_round_s_teacher_accuracy_against_the_dataset(tmp_path, with_banking77) -> None:
    """benchmarks/active_rounds.py: per round, what was picked and how often the teacher's label was right."""
    import importlib.util
    import json

    from distill.data.dataset import prepare_data, write_jsonl

    spec = importlib.util.spec_from_file_location("active_rounds", project_root() / "benchmarks" / "active_rounds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = prepare_data(load_config("local_ci"))
    train = data.train[:4]
    truth = {ex.text: ex.label for ex in train}
    wrong = next(lab for lab in data.labels if lab != train[3].label)
    (tmp_path / "teacher").mkdir()
    write_jsonl(tmp_path / "teacher" / "selection.jsonl",
                [{"text": ex.text, "round": 0 if i < 2 else 1} for i, ex in enumerate(train[:4])])
    write_jsonl(tmp_path / "teacher" / "labels.jsonl",  # round 1: one right, one wrong, one from the LLM
                [{"text": ex.text, "label": wrong if i == 3 else ex.label, "source": "llm" if i == 2 else "vote"}
                 for i, ex in enumerate(train[:4])])
    (tmp_path / "teacher" / "manifest.json").write_text(json.dumps({"active_rounds": [
        {"round": 0, "mean_score": None, "pool_mean_score": None},
        {"round": 1, "mean_score": 0.7, "pool_mean_score": 0.1}]}))
    rows = mod.rounds_table(tmp_path, truth)
    assert [(r["round"], r["signal"], r["picked"], r["llm_answered"], r["teacher_label_accuracy"]) for r in rows] == [
        (0, "random", 2, 0, 1.0), (1, "uncertainty", 2, 1, 0.5)]
    assert "| 1 | uncertainty | 2 | 0.700 (0.100) | 1 | 50.0% |" in mod.markdown(rows, "p")
    # docs/measurements.md shows the committed JSON's table as the script prints it: regenerate, not edit
    committed = json.loads((project_root() / "docs" / "active_rounds.json").read_text())
    docs = (project_root() / "docs" / "measurements.md").read_text()
    assert mod.markdown(committed["rounds"], committed["point"]) in docs
