"""Data stage: counts, normalisation, seeded shuffle, gold set, splits; CSV and hub paths agree."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from distill.config import load_config
from distill.data.dataset import (
    delete_labels,
    load_csv_split,
    normalize_label,
    normalize_text,
    prepare_data,
    seeded_shuffle,
    split_devset_and_optimizer_sets,
    stratified_subset,
)
from distill.errors import DataError

# The 25 labels (most frequent first, ties by name) printed by the original template's notebook.
ORIGINAL_TOP_25 = [
    "card_payment_fee_charged", "direct_debit_payment_not_recognised",
    "balance_not_updated_after_cheque_or_cash_deposit", "wrong_amount_of_cash_received",
    "cash_withdrawal_charge", "transaction_charged_twice", "declined_cash_withdrawal", "transfer_fee_charged",
    "balance_not_updated_after_bank_transfer", "transfer_not_received_by_recipient", "request_refund",
    "card_payment_not_recognised", "card_payment_wrong_exchange_rate", "extra_charge_on_statement",
    "wrong_exchange_rate_for_cash_withdrawal", "refund_not_showing_up", "reverted_card_payment",
    "cash_withdrawal_not_recognised", "activate_my_card", "pending_card_payment", "cancel_transfer",
    "beneficiary_not_allowed", "card_arrival", "declined_card_payment", "pending_top_up",
]  # fmt: skip


@pytest.fixture(scope="module")
def full_cfg():
    # The cluster profile uses the full sizes (all test rows, all unlabeled queries).
    return load_config("cluster")


def test_normalize_label_quirks() -> None:
    assert normalize_label("Refund_not_showing_up") == "refund_not_showing_up"
    assert normalize_label("reverted_card_payment?") == "reverted_card_payment"
    assert normalize_label("  Card Arrival ") == "card_arrival"


def test_counts_and_labels_match_the_original(with_banking77, full_cfg) -> None:
    data = prepare_data(full_cfg)
    assert (len(data.train), len(data.test), data.full_test_size) == (4171, 1000, 1000)
    assert data.labels == ORIGINAL_TOP_25
    assert data.label_counts["pending_top_up"] == 149
    assert all(ex.label in set(ORIGINAL_TOP_25) for ex in data.train + data.test)
    # every raw label got normalised: no capitals, no trailing '?'
    raw = load_csv_split(with_banking77, "train")
    assert all(ex.label == ex.label.lower() and not ex.label.endswith("?") for ex in raw)
    assert len({ex.label for ex in raw}) == 77


def test_gold_and_unlabeled(with_banking77, full_cfg) -> None:
    data = prepare_data(full_cfg)
    # the shuffle's last 300 are the calibration split, less the two that curation's normalisation makes
    # the same as a pool query (local_full's teacher labels the whole pool)
    assert len(data.gold) == 100 and len(data.calibration) == full_cfg.data.num_calibration - 2 == 298
    assert len(data.unlabeled) == 4171 - 100 - 300
    assert all(ex.label in data.labels for ex in data.gold)
    assert all("label" not in ex for ex in data.unlabeled)
    assert all(set(ex.inputs().keys()) == {"text"} for ex in data.gold + data.unlabeled)
    # gold, the calibration split and unlabeled come from the filtered training set, disjoint, the split
    # disjoint from the others and from test even after normalisation
    assert not Counter(ex.text for ex in data.gold + data.calibration + data.unlabeled) - \
        Counter(ex.text for ex in data.train)
    assert len(data.gold) + 300 + len(data.unlabeled) == len(data.train)
    others = {normalize_text(ex.text) for ex in data.gold + data.unlabeled + data.test}
    assert not others & {normalize_text(ex.text) for ex in data.calibration}
    # the calibration split's labels are the dataset's own (hand labels)
    truth = {ex.text: ex.label for ex in data.train}
    assert all(ex.label == truth[ex.text] for ex in data.calibration)


def test_the_calibration_split_leaves_gold_and_the_teachers_queries_as_they_were(with_banking77) -> None:
    """The split is the shuffle's tail: gold and the queries the teacher labels are the ones a profile without
    it gets, and none of them (nor the pool's remainder, where the cascade's unlabeled queries come from) is
    a calibration query."""
    with_split, without = prepare_data(load_config("local")), prepare_data(
        load_config("local", overrides={"data": {"num_calibration": 0}}))
    assert len(with_split.calibration) == 300 and not without.calibration
    assert [ex.text for ex in with_split.gold] == [ex.text for ex in without.gold]
    assert [ex.text for ex in with_split.to_label] == [ex.text for ex in without.to_label]
    held = {ex.text for ex in with_split.calibration}
    assert held == {ex.text for ex in without.unlabeled[-300:]}
    assert not held & {ex.text for ex in with_split.gold + with_split.unlabeled}
    assert with_split.summary()["calibration"] == 300 and "calibration" not in without.summary()


def test_a_calibration_split_the_training_data_cannot_hold_is_a_clear_error(with_banking77) -> None:
    cfg = load_config("local", overrides={"data": {"num_calibration": 4000}})
    with pytest.raises(DataError, match=r"fewer than data.num_calibration \(4000\) \+ data.num_gold"):
        prepare_data(cfg)


GOLD_TEXTS = """
import hashlib, json
from distill.config import load_config
from distill.data.dataset import prepare_data
print(hashlib.sha1(json.dumps([ex.text for ex in prepare_data(load_config("cluster")).gold]).encode()).hexdigest())
"""


def test_seeded_shuffle_is_the_same_in_every_process(with_banking77, full_cfg) -> None:
    """The gold set must not depend on the process (hash randomisation, set order): every stage's
    fingerprint and every reported number rests on it."""
    import hashlib
    import os
    import subprocess
    import sys

    here = hashlib.sha1(json.dumps([ex.text for ex in prepare_data(full_cfg).gold]).encode()).hexdigest()
    for hashseed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", GOLD_TEXTS], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hashseed}).stdout.strip()
        assert out == here
    other = prepare_data(full_cfg.model_copy(update={"seed": full_cfg.seed + 1}))
    assert [ex.text for ex in other.gold] != [ex.text for ex in prepare_data(full_cfg).gold]
    xs = list(range(50))
    shuffled = seeded_shuffle(xs, 3)
    assert sorted(shuffled) == xs and shuffled != xs and shuffled != seeded_shuffle(xs, 4)


def test_delete_labels_keeps_first_n(with_banking77) -> None:
    rows = load_csv_split(with_banking77, "test")[:10]
    gold, unlabeled = delete_labels(rows, 4)
    assert [g.label for g in gold] == [r.label for r in rows[:4]]
    assert [u.text for u in unlabeled] == [r.text for r in rows[4:]] and all("label" not in u for u in unlabeled)
    with pytest.raises(DataError, match="no unlabeled"):
        delete_labels(rows, 10)


def test_split_sizes(with_banking77) -> None:
    rows = load_csv_split(with_banking77, "train")[:500]
    dev, train, val = split_devset_and_optimizer_sets(rows, 100, 50, None)
    assert (len(dev), len(train), len(val)) == (100, 350, 50)
    assert not {r.text for r in dev} & {r.text for r in val}
    dev, train, val = split_devset_and_optimizer_sets(rows, 100, 50, 20)
    assert (len(dev), len(train), len(val)) == (100, 20, 50)
    with pytest.raises(DataError, match="lower the sizes"):
        split_devset_and_optimizer_sets(rows, 400, 100, None)


def test_profile_sizes(with_banking77) -> None:
    cfg = load_config("local_ci")
    data = prepare_data(cfg)
    assert len(data.to_label) == cfg.data.num_to_label
    assert len(data.test) == cfg.data.test_size
    per_label = Counter(ex.label for ex in data.test)
    assert max(per_label.values()) - min(per_label.values()) <= 1  # stratified
    assert stratified_subset(data.test, 10, 0) == stratified_subset(data.test, 10, 0)


def _write_hub_layout(src: Path, dst: Path) -> None:
    """The layout of the hub's parquet conversion (default/<split>/0000.parquet, ClassLabel ints)."""
    names = sorted(json.loads((src / "categories.json").read_text()), key=str.lower)  # HF's ClassLabel order
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    for split in ("train", "test"):
        with (src / f"{split}.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        ds = datasets.Dataset.from_dict(
            {"text": [r["text"] for r in rows], "label": [names.index(r["category"]) for r in rows]}, features=features
        )
        (dst / "default" / split).mkdir(parents=True)
        ds.to_parquet(str(dst / "default" / split / "0000.parquet"))


def _with_hub(cfg, hub_id: str):
    """The profile with its task's hub dataset somewhere else."""
    task = cfg.task
    hub = task.source.hub.model_copy(update={"id": hub_id})
    task = task.model_copy(update={"source": task.source.model_copy(update={"hub": hub})})
    return cfg.model_copy(update={"task": task})


def test_hub_path_gives_the_same_records(monkeypatch, banking77_dir, tmp_path, full_cfg) -> None:
    monkeypatch.setenv("BANKING77_DIR", str(banking77_dir))
    from_csv = prepare_data(full_cfg)

    monkeypatch.delenv("BANKING77_DIR")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _write_hub_layout(banking77_dir, tmp_path / "hub")
    hub_cfg = _with_hub(full_cfg, str(tmp_path / "hub"))
    from_hub = prepare_data(hub_cfg)

    assert from_hub.source.startswith("hub:")
    assert (len(from_hub.train), len(from_hub.test)) == (4171, 1000)
    assert from_hub.labels == from_csv.labels == ORIGINAL_TOP_25
    for name in ("train", "test", "gold", "unlabeled"):
        assert [dict(e) for e in getattr(from_hub, name)] == [dict(e) for e in getattr(from_csv, name)], name


def test_unreachable_hub_is_a_clear_error(monkeypatch, tmp_path, full_cfg) -> None:
    monkeypatch.delenv("BANKING77_DIR", raising=False)
    cfg = _with_hub(full_cfg, str(tmp_path / "nope"))
    with pytest.raises(DataError, match="BANKING77_DIR"):
        prepare_data(cfg)
