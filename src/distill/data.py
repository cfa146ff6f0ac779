"""Data stage: banking77 -> top-n labels -> seeded shuffle -> 100 gold + unlabeled pool -> splits.

Two sources give the same records: the Hugging Face hub (the dataset's parquet conversion) or a
directory holding the original `train.csv` / `test.csv` (BANKING77_DIR or `data.dir`).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import dspy

from distill.config import Config
from distill.errors import DataError

CSV_COLUMNS = ("text", "category")
SPLITS = ("train", "test")


def normalize_label(label: str) -> str:
    """`Refund_not_showing_up` -> `refund_not_showing_up`, `reverted_card_payment?` -> `reverted_card_payment`."""
    return str(label).strip().lower().rstrip("?").strip().replace(" ", "_")


def make_example(text: str, label: str | None = None) -> dspy.Example:
    rec = {"text": text} if label is None else {"text": text, "label": label}
    return dspy.Example(**rec).with_inputs("text")


# --- loading -----------------------------------------------------------------------------------


def data_dir(cfg: Config | None = None) -> Path | None:
    """The CSV directory to use, if any: BANKING77_DIR, else `data.dir` in the profile."""
    env = os.environ.get("BANKING77_DIR")
    if env:
        return Path(env).expanduser()
    if cfg is not None and cfg.data.dir:
        return cfg.path(cfg.data.dir)
    return None


def load_csv_split(directory: Path, split: str) -> list[dspy.Example]:
    """Read `<directory>/<split>.csv` (columns `text,category`) with normalised labels."""
    if not directory.is_dir():
        raise DataError(f"banking77 directory does not exist: {directory} (set BANKING77_DIR or data.dir)")
    path = directory / f"{split}.csv"
    if not path.is_file():
        raise DataError(f"{path} is missing: the banking77 directory needs train.csv and test.csv")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)}; "
                    f"expected a header '{','.join(CSV_COLUMNS)}', got {reader.fieldnames}"
                )
            rows = []
            for lineno, row in enumerate(reader, start=2):
                text, cat = (row.get("text") or "").strip(), (row.get("category") or "").strip()
                if not text or not cat:
                    raise DataError(f"{path}:{lineno}: empty text or category")
                rows.append(make_example(text, normalize_label(cat)))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable UTF-8 CSV ({e})") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    return rows


def load_hub_split(hub_id: str, revision: str | None, split: str) -> list[dspy.Example]:
    """Load a split from the hub (or a local copy of the repo's parquet layout) with `datasets`."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, revision=revision, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not load"
        raise DataError(
            f"could not load {hub_id!r} (revision {revision!r}, split {split!r}) with datasets: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "-- offline? set BANKING77_DIR to a directory with banking77's train.csv/test.csv"
        ) from None
    missing = [c for c in ("text", "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{hub_id} split {split!r}: missing column(s) {missing}; got {ds.column_names}")
    names = getattr(ds.features["label"], "names", None)
    if names is None:
        raise DataError(f"{hub_id}: the 'label' column is not a ClassLabel with names")
    return [make_example(t.strip(), normalize_label(names[i])) for t, i in zip(ds["text"], ds["label"])]


def load_banking77(cfg: Config) -> tuple[list[dspy.Example], list[dspy.Example], str]:
    """Full train/test records and a description of where they came from."""
    d = data_dir(cfg)
    if d is not None:
        return load_csv_split(d, "train"), load_csv_split(d, "test"), f"csv:{d}"
    train, test = (load_hub_split(cfg.data.hub_id, cfg.data.hub_revision, s) for s in SPLITS)
    return train, test, f"hub:{cfg.data.hub_id}@{cfg.data.hub_revision}"


# --- processing -----------------------------------------------------------------------------------


def top_n_labels(examples: Sequence[dspy.Example], n: int) -> list[str]:
    """The n most frequent labels, most frequent first, ties broken by name (as the original template)."""
    counts = Counter(ex.label for ex in examples)
    if n > len(counts):
        raise DataError(f"asked for the top {n} labels but the data has only {len(counts)}")
    return sorted(counts, key=lambda lab: (-counts[lab], lab))[:n]


def filter_labels(examples: Sequence[dspy.Example], labels: Sequence[str]) -> list[dspy.Example]:
    keep = set(labels)
    return [ex for ex in examples if ex.label in keep]


def seeded_shuffle(examples: Sequence[dspy.Example], seed: int) -> list[dspy.Example]:
    out = list(examples)
    random.Random(seed).shuffle(out)
    return out


def delete_labels(examples: Sequence[dspy.Example], num_gold: int) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """Keep the first `num_gold` examples' labels as the gold set; strip the label from all others."""
    if num_gold >= len(examples):
        raise DataError(f"data.num_gold={num_gold} leaves no unlabeled queries out of {len(examples)}")
    gold = [make_example(ex.text, ex.label) for ex in examples[:num_gold]]
    unlabeled = [make_example(ex.text) for ex in examples[num_gold:]]
    return gold, unlabeled


def split_devset_and_optimizer_sets(
    examples: Sequence[dspy.Example], devset_size: int, optimizer_val_size: int, optimizer_train_size: int | None = None
) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    """(synthetic devset, optimizer trainset, optimizer valset), disjoint, in the given order."""
    need = devset_size + optimizer_val_size + (optimizer_train_size or 1)
    if len(examples) < need:
        raise DataError(
            f"{len(examples)} labeled examples cannot fill devset={devset_size} + optimizer_val={optimizer_val_size}"
            f" + optimizer_train={optimizer_train_size or 'rest'} (need {need}); lower the sizes in the profile"
        )
    dev = list(examples[:devset_size])
    val = list(examples[devset_size : devset_size + optimizer_val_size])
    rest = examples[devset_size + optimizer_val_size :]
    train = list(rest if optimizer_train_size is None else rest[:optimizer_train_size])
    return dev, train, val


def stratified_subset(examples: Sequence[dspy.Example], size: int, seed: int) -> list[dspy.Example]:
    """`size` examples with labels as balanced as possible, chosen reproducibly."""
    if size >= len(examples):
        return list(examples)
    by_label: dict[str, list[dspy.Example]] = defaultdict(list)
    for ex in seeded_shuffle(examples, seed):
        by_label[ex.label].append(ex)
    out: list[dspy.Example] = []
    queues = [by_label[k] for k in sorted(by_label)]
    i = 0
    while len(out) < size:
        q = queues[i % len(queues)]
        if q:
            out.append(q.pop(0))
        i += 1
    return out


@dataclass
class Banking77Data:
    """Everything the later stages start from."""

    labels: list[str]
    train: list[dspy.Example]  # the filtered training set, with gold labels (for analysis only)
    test: list[dspy.Example]  # the real test set, or the profile's stratified subset of it
    gold: list[dspy.Example]  # the few hand labels we are allowed to use
    unlabeled: list[dspy.Example]  # labels stripped: the pool the teacher labels from
    full_test: list[dspy.Example] = field(default_factory=list)  # all test rows of the labels in use
    num_to_label: int | None = None
    source: str = ""
    label_counts: dict[str, int] = field(default_factory=dict)

    @property
    def full_test_size(self) -> int:
        return len(self.full_test)

    @property
    def to_label(self) -> list[dspy.Example]:
        """The part of the unlabeled pool this profile has the teacher label."""
        return self.unlabeled if self.num_to_label is None else self.unlabeled[: self.num_to_label]

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "train": len(self.train),
            "test": self.full_test_size,
            "test_used": len(self.test),
            "labels": self.labels,
            "label_counts": self.label_counts,
            "gold": len(self.gold),
            "unlabeled": len(self.unlabeled),
            "to_label": len(self.to_label),
        }


def prepare_data(cfg: Config) -> Banking77Data:
    """Load, normalise, keep the top-n labels, shuffle with the profile's seed and delete labels."""
    full_train, full_test, source = load_banking77(cfg)
    labels = top_n_labels(full_train, cfg.data.top_n_labels)
    train, test = filter_labels(full_train, labels), filter_labels(full_test, labels)
    gold, unlabeled = delete_labels(seeded_shuffle(train, cfg.seed), cfg.data.num_gold)
    test_used = stratified_subset(test, cfg.data.test_size, cfg.seed) if cfg.data.test_size else test
    counts = Counter(ex.label for ex in train)
    return Banking77Data(
        labels=labels,
        train=train,
        test=test_used,
        gold=gold,
        unlabeled=unlabeled,
        full_test=test,
        num_to_label=cfg.data.num_to_label,
        source=source,
        label_counts={lab: counts[lab] for lab in labels},
    )


# --- persistence ----------------------------------------------------------------------------------


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: a killed run never leaves half a file behind


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_data(data: Banking77Data, directory: Path) -> dict[str, Path]:
    """Write the splits under `directory` (the profile's artifacts/data; the data stage's manifest holds
    the summary)."""
    files = {
        "gold": directory / "gold.jsonl",
        "unlabeled": directory / "unlabeled.jsonl",
        "test": directory / "test.jsonl",
    }
    for name in ("gold", "test"):
        write_jsonl(files[name], [dict(ex.items()) for ex in getattr(data, name)])
    write_jsonl(files["unlabeled"], [dict(ex.items()) for ex in data.to_label])
    return files
