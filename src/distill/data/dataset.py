"""Data stage: the task's data -> its labels -> seeded shuffle -> gold + unlabeled pool -> splits.

The task (`cfg.task`, a YAML file such as configs/tasks/banking77.yaml) says where the data is -- a hub
dataset, or CSV / JSONL / Parquet files -- which columns hold the text and the label, how train and test
are split and which labels are used. A data directory (the task's own variable such as BANKING77_DIR, else
DISTILL_DATA_DIR, else the profile's `data.dir`) holds the task's files when given. Whatever is wrong with
the data is one `DataError` line naming the file and the task key to fix, before anything is started.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import dspy

from distill.config import Columns, Config, PromptConfig, TaskConfig, project_root
from distill.errors import DataError

DATA_DIR_ENV = "DISTILL_DATA_DIR"


def normalize_label(label: str) -> str:
    """`Refund_not_showing_up` -> `refund_not_showing_up`, `reverted_card_payment?` -> `reverted_card_payment`."""
    return str(label).strip().lower().rstrip("?").strip().replace(" ", "_")


def normalize_text(text: str) -> str:
    """Case, accents, punctuation and spacing removed: 'Where is my card?!' == 'where is my  card'."""
    t = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    t = re.sub(r"[^a-z0-9]+", " ", t)
    return " ".join(t.split())


def make_example(text: str, label: str | None = None) -> dspy.Example:
    rec = {"text": text} if label is None else {"text": text, "label": label}
    return dspy.Example(**rec).with_inputs("text")


class TaskLabels(list[str]):
    """The labels in use, and what the task tells the models about them.

    Every stage builds its program from `data.labels`; carrying the task's prompt with them gives each of
    those places the task's wording without threading the config through. It is a plain list to everything
    else (JSON, pydantic, fingerprints), so the labels alone are what gets recorded.
    """

    def __init__(self, names: Iterable[str], prompt: PromptConfig | None = None,
                 descriptions: dict[str, str] | None = None) -> None:
        super().__init__(names)
        self.prompt = prompt or PromptConfig()
        self.descriptions = {k: v for k, v in (descriptions or {}).items() if k in self}


# --- loading -----------------------------------------------------------------------------------


def task_data_dir(cfg: Config) -> tuple[Path, str] | None:
    """The directory the task's files are read from, if one is given, and who gave it: the task's own
    variable (banking77: BANKING77_DIR), DISTILL_DATA_DIR, else `data.dir` in the profile."""
    for var in (cfg.task.source.dir_env, DATA_DIR_ENV):
        if var and os.environ.get(var):
            return Path(os.environ[var]).expanduser(), var
    if cfg.data.dir:
        return cfg.path(cfg.data.dir), "data.dir"
    return None


def _cell(value: Any, path: Path, where: str) -> str:
    if isinstance(value, bytes):  # a Parquet binary column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: {path} is not UTF-8 text (byte 0x{value[e.start]:02x} in a value)") from None
    return "" if value is None or value != value else str(value)  # None / NaN: empty


def read_table(path: Path, columns: Columns, where: str,
               column_where: Callable[[str], str] | None = None) -> list[dspy.Example]:
    """Examples (stripped text, normalised label) from a CSV / JSONL / Parquet file.

    `where` names the task key that names the file (`<task file>: key 'source.files.train'`) and
    `column_where("label")` the key of a column; every error names one of them and the file, in one line.
    """
    import pandas as pd  # a data dependency: the profile's other readers need none of it

    if not path.is_file():
        raise DataError(f"{where}: {path} is missing")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{where}: {path} is an empty file (missing column(s) {columns.text}, {columns.label} "
                        f"and every row)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(io.BytesIO(raw))
        else:
            try:
                text = raw.decode("utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not part of the header
            except UnicodeDecodeError as e:
                line = raw[: e.start].count(b"\n") + 1
                raise DataError(f"{where}: {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                                "save it as UTF-8") from None
            if suffix == ".csv":
                # Every cell a string, none turned into NaN ("NA", "null" are texts too).
                df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
            else:
                df = pd.read_json(io.StringIO(text), lines=True, dtype=False)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types; all mean "cannot be read"
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{where}: {path} is not a readable {suffix[1:].upper()} file "
                        f"({type(e).__name__}: {first})") from None
    names = [str(c) for c in df.columns]
    missing = [(key, c) for key, c in (("text", columns.text), ("label", columns.label)) if c not in names]
    if missing:
        at = column_where(missing[0][0]) if column_where else where
        raise DataError(f"{at}: {path}: missing column(s) {', '.join(c for _, c in missing)}; "
                        f"it has {', '.join(names) or 'none'}")
    if df.empty:
        raise DataError(f"{where}: {path} has a header but no data rows")
    rows = []
    for i, (text, label) in enumerate(zip(df[columns.text].tolist(), df[columns.label].tolist()), start=1):
        text, label = _cell(text, path, where).strip(), _cell(label, path, where).strip()
        if not text or not label:
            raise DataError(f"{where}: {path}: data row {i}: empty {columns.text if not text else columns.label}")
        rows.append(make_example(text, normalize_label(label)))
    return rows


def load_csv_split(directory: Path, split: str) -> list[dspy.Example]:
    """Read banking77's `<directory>/<split>.csv` (columns `text,category`) with normalised labels."""
    if not directory.is_dir():
        raise DataError(f"data directory does not exist: {directory} (set BANKING77_DIR or data.dir)")
    return read_table(directory / f"{split}.csv", Columns(text="text", label="category"), f"banking77 {split}")


def load_hub_split(hub_id: str, revision: str | None, split: str, columns: Columns | None = None,
                   hint: str = "set BANKING77_DIR to a directory with banking77's train.csv/test.csv",
                   where: str = "") -> list[dspy.Example]:
    """Load a split from the hub (or a local copy of the repo's parquet layout) with `datasets`; a
    ClassLabel column is read as its names."""
    import datasets

    columns = columns or Columns()
    prefix = f"{where}: " if where else ""
    try:
        ds = datasets.load_dataset(hub_id, revision=revision, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "could not load"
        raise DataError(
            f"{prefix}could not load {hub_id!r} (revision {revision!r}, split {split!r}) with datasets: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} -- offline? {hint}"
        ) from None
    missing = [c for c in (columns.text, columns.label) if c not in ds.column_names]
    if missing:
        raise DataError(f"{prefix}{hub_id} split {split!r}: missing column(s) {', '.join(missing)}; "
                        f"it has {', '.join(ds.column_names)}")
    names = getattr(ds.features[columns.label], "names", None)
    labels = ds[columns.label] if names is None else [names[i] for i in ds[columns.label]]
    return [make_example(str(t).strip(), normalize_label(lab)) for t, lab in zip(ds[columns.text], labels)]


def split_by_fraction(examples: Sequence[dspy.Example], fraction: float, seed: int,
                      ) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """(train, test): `fraction` of each label's distinct texts held out, chosen with `seed`; both keep the
    file's order. A text that repeats stays on one side."""
    texts_by_label: dict[str, dict[str, None]] = defaultdict(dict)  # a dict: an ordered set
    for ex in examples:
        texts_by_label[ex.label][ex.text] = None
    rng = random.Random(seed)
    held_out: set[str] = set()
    for label in sorted(texts_by_label):
        texts = list(texts_by_label[label])
        rng.shuffle(texts)
        held_out.update(texts[: round(fraction * len(texts))])
    return [ex for ex in examples if ex.text not in held_out], [ex for ex in examples if ex.text in held_out]


def load_task_data(cfg: Config) -> tuple[list[dspy.Example], list[dspy.Example], str]:
    """The task's full train/test records and a description of where they came from."""
    task: TaskConfig = cfg.task
    src, given = task.source, task_data_dir(cfg)
    if given is not None or src.hub is None:
        if src.files is None:
            raise DataError(f"{task.where('source.files')}: a data directory is given ({given[0] if given else ''}, "
                            f"from {given[1] if given else ''}) but the task names no files to read from it")
        base = project_root()
        if given is not None:
            base = given[0]
            if not base.is_dir():
                raise DataError(f"data directory does not exist: {base} (from {given[1]})")

        def read(key: str, names: list[str]) -> list[dspy.Example]:
            return [ex for name in names for ex in read_table(
                base / name, task.columns, task.where(key), lambda c: task.where(f"columns.{c}"))]

        train = read("source.files.train", src.files.train)
        test = read("source.files.test", src.files.test) if src.files.test else None
        kinds = sorted({Path(n).suffix[1:].lower() for n in src.files.train + (src.files.test or [])})
        source = f"{'+'.join(kinds)}:{given[0] if given else ', '.join(src.files.train + (src.files.test or []))}"
    else:
        hub = src.hub
        columns, key = (hub.columns, "source.hub.columns") if hub.columns else (task.columns, "columns")
        files = ", ".join(src.files.train + (src.files.test or [])) if src.files else ""
        hint = (f"set {src.dir_env or DATA_DIR_ENV} to a directory with {files}" if src.files
                else "give the task's data as files (task.source.files)")
        train = load_hub_split(hub.id, hub.revision, hub.train_split, columns, hint, task.where(key))
        test = (load_hub_split(hub.id, hub.revision, hub.test_split, columns, hint, task.where(key))
                if hub.test_split else None)
        source = f"hub:{hub.id}@{hub.revision}"
    if test is None:
        assert task.test_fraction is not None  # TaskConfig requires it when there is no test split
        train, test = split_by_fraction(train, task.test_fraction, cfg.seed)
    return train, test, source


# --- processing -----------------------------------------------------------------------------------


def top_n_labels(examples: Sequence[dspy.Example], n: int, skip: int = 0) -> list[str]:
    """The n most frequent labels after the `skip` most frequent (ranks skip+1 .. skip+n), most frequent
    first, ties broken by name (as the original template)."""
    counts = Counter(ex.label for ex in examples)
    if skip + n > len(counts):
        ranks = f"ranks {skip + 1}-{skip + n}" if skip else f"the top {n} labels"
        raise DataError(f"asked for {ranks} but the data has only {len(counts)} labels")
    return sorted(counts, key=lambda lab: (-counts[lab], lab))[skip: skip + n]


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
class TaskData:
    """Everything the later stages start from."""

    labels: list[str]  # a TaskLabels: the task's prompt travels with them
    train: list[dspy.Example]  # the filtered training set, with gold labels (for analysis only)
    test: list[dspy.Example]  # the real test set, or the profile's stratified subset of it
    gold: list[dspy.Example]  # the few hand labels we are allowed to use
    unlabeled: list[dspy.Example]  # labels stripped: the pool the teacher labels from
    full_test: list[dspy.Example] = field(default_factory=list)  # all test rows of the labels in use
    num_to_label: int | None = None
    source: str = ""
    label_counts: dict[str, int] = field(default_factory=dict)
    selection: str = "random"  # data.selection: random | active
    # Served queries from `data.extra_pool` (distill.pool.merge_pool): decontaminated against test and gold,
    # none an unlabeled query already, in the pool file's ranked order. They come after the task's own
    # queries, so the seeded head that curation takes the devset and optimizer valset from stays the same.
    extra: list[dspy.Example] = field(default_factory=list)
    extra_summary: dict[str, Any] | None = None  # what the merge kept and dropped (None: no extra_pool)
    # data.num_calibration hand labels neither teacher nor student uses: the cascade's calibration split
    calibration: list[dspy.Example] = field(default_factory=list)

    @property
    def pool(self) -> list[dspy.Example]:
        """What the teacher may be asked to label: `to_label` (random), the whole unlabeled pool and the served
        queries (active: the teacher stage picks `num_to_label` of it round by round)."""
        return self.unlabeled + self.extra if self.selection == "active" else self.to_label

    @property
    def full_test_size(self) -> int:
        return len(self.full_test)

    @property
    def to_label(self) -> list[dspy.Example]:
        """The part of the unlabeled pool this profile has the teacher label: the task's first `num_to_label`
        and (random selection) every served query after them; active selection's budget is `num_to_label`."""
        own = self.unlabeled if self.num_to_label is None else self.unlabeled[: self.num_to_label]
        return own + self.extra if self.selection == "random" else own

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
            # only with data.num_calibration, as below
            **({"calibration": len(self.calibration)} if self.calibration else {}),
            # only with data.extra_pool: the pinned summaries of profiles without one stay as they were
            **({"extra_pool": self.extra_summary} if self.extra_summary is not None else {}),
        }


def select_labels(cfg: Config, train: Sequence[dspy.Example], source: str) -> TaskLabels:
    """The task's labels: the top n of the train split, or its list (each must occur in train)."""
    task = cfg.task
    spec = task.labels
    if spec.names is not None:
        names = [normalize_label(n) for n in spec.names]
        if dupes := sorted(n for n, c in Counter(names).items() if c > 1):
            raise DataError(f"{task.where('labels.names')}: {', '.join(dupes)} listed more than once "
                            "(labels are compared lower-case, spaces as _)")
        present = {ex.label for ex in train}
        if never := [n for n in names if n not in present]:
            raise DataError(f"{task.where('labels.names')}: {', '.join(repr(n) for n in never)} never occur(s) in "
                            f"the train split ({source}); it has {', '.join(sorted(present)[:30])}")
    else:
        assert spec.top_n is not None
        try:
            names = top_n_labels(train, spec.top_n, spec.skip_top)
        except DataError as e:
            raise DataError(f"{task.where('labels.skip_top' if spec.skip_top else 'labels.top_n')}: {e}") from None
    descriptions = {normalize_label(k): v for k, v in spec.descriptions.items()}
    if unknown := sorted(set(descriptions) - set(names)):
        raise DataError(f"{task.where('labels.descriptions')}: {', '.join(unknown)} not among the labels in use "
                        f"({', '.join(names)})")
    return TaskLabels(names, task.prompt, descriptions)


def check_sizes(cfg: Config, train: Sequence[dspy.Example]) -> None:
    """Enough training examples for the gold set and the teacher-labeled sets the profile asks for."""
    d = cfg.data
    # The curation stage splits the teacher's labels into devset + optimizer valset + at least one to train
    # on (how many more, optimizer_train_size, it checks itself: the teacher's valid labels decide).
    need = d.num_gold + d.devset_size + d.optimizer_val_size + 1
    if len(train) < need + d.num_calibration:
        held = f"data.num_calibration ({d.num_calibration}) + " if d.num_calibration else ""
        raise DataError(
            f"{cfg.task.where('source')}: {len(train)} training examples of the {len(set(ex.label for ex in train))} "
            f"labels in use, fewer than {held}data.num_gold ({d.num_gold}) + data.devset_size ({d.devset_size}) + "
            f"data.optimizer_val_size ({d.optimizer_val_size}) + 1 to train on = {need + d.num_calibration}; "
            f"lower those sizes in profile '{cfg.name}' or give more data")
    if d.num_to_label is not None and d.num_to_label < need - d.num_gold:
        raise DataError(
            f"profile '{cfg.name}': data.num_to_label ({d.num_to_label}) cannot fill data.devset_size "
            f"({d.devset_size}) + data.optimizer_val_size ({d.optimizer_val_size}) + 1 to train on "
            f"= {need - d.num_gold}")


def check_no_test_texts_in_train(cfg: Config, train: Sequence[dspy.Example], test: Sequence[dspy.Example],
                                 source: str) -> None:
    """A test text that is also a training text would be scored on what the models were shown."""
    both = {ex.text for ex in train} & {ex.text for ex in test}
    if both:
        example = sorted(both)[0]
        raise DataError(f"{cfg.task.where('source')}: {len(both)} text(s) are in both the train and the test split "
                        f"({source}), e.g. {example[:80]!r}; remove them from one of the two, or set "
                        f"task.train_test_overlap: drop_from_train")


def prepare_data(cfg: Config) -> TaskData:
    """Load the task, keep its labels, check it, shuffle with the profile's seed and delete labels."""
    full_train, full_test, source = load_task_data(cfg)
    labels = select_labels(cfg, full_train, source)
    train, test = filter_labels(full_train, labels), filter_labels(full_test, labels)
    if not test:
        raise DataError(f"{cfg.task.where('source')}: the test split ({source}) has no example of the labels in use")
    if cfg.task.train_test_overlap == "drop_from_train":
        test_texts = {ex.text for ex in full_test}
        train = [ex for ex in train if ex.text not in test_texts]
    check_no_test_texts_in_train(cfg, train, test, source)
    check_sizes(cfg, train)
    shuffled = seeded_shuffle(train, cfg.seed)
    # The calibration split is the shuffle's tail: gold (its head) and the teacher's queries stay the same.
    cut = len(shuffled) - cfg.data.num_calibration
    gold, unlabeled = delete_labels(shuffled[:cut], cfg.data.num_gold)
    test_used = stratified_subset(test, cfg.data.test_size, cfg.seed) if cfg.data.test_size else test
    counts = Counter(ex.label for ex in train)
    data = TaskData(
        labels=labels,
        train=train,
        test=test_used,
        gold=gold,
        unlabeled=unlabeled,
        full_test=test,
        num_to_label=cfg.data.num_to_label,
        source=source,
        label_counts={lab: counts[lab] for lab in labels},
        selection=cfg.data.selection,
    )
    # Held out means held out as curation compares texts: a tail query that is the same after normalize_text
    # as one the models may learn from (gold, what the teacher may be asked to label: `pool`) or are scored
    # on (test) is left out of the split.
    seen = {normalize_text(ex.text) for ex in [*data.gold, *data.pool, *test]}
    data.calibration = [make_example(ex.text, ex.label) for ex in shuffled[cut:] if normalize_text(ex.text) not in seen]
    return data


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


def save_data(data: TaskData, directory: Path) -> dict[str, Path]:
    """Write the splits under `directory` (the profile's artifacts/data; the data stage's manifest holds
    the summary)."""
    files = {
        "gold": directory / "gold.jsonl",
        "unlabeled": directory / "unlabeled.jsonl",
        "test": directory / "test.jsonl",
    }
    if data.calibration:
        files["calibration"] = directory / "calibration.jsonl"
    for name in ("gold", "test", "calibration"):
        if name in files:
            write_jsonl(files[name], [dict(ex.items()) for ex in getattr(data, name)])
    write_jsonl(files["unlabeled"], [dict(ex.items()) for ex in data.pool])
    return files
