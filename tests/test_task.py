"""A task is a YAML file (issue 15): banking77 is one and stays byte-identical; a tiny task the tests write
themselves loads from one profile file; each kind of bad task file is one line naming the file and the key."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from distill.config import load_config
from distill.data.dataset import TaskLabels, prepare_data, task_data_dir
from distill.env import check_env
from distill.errors import ConfigError, DataError
from distill.lm import adapter
from distill.program import IntentClassificationModule, make_signature
from distill.stages.base import fingerprint, prompt_fingerprint
from distill.stages.data import DataStage, data_fingerprint

ROOT = Path(__file__).resolve().parents[1]

# --- banking77, pinned ---------------------------------------------------------------------------------

# Recorded before banking77 became configs/tasks/banking77.yaml (commit 338d8ea). They are pinned because
# everything downstream rests on them: every stage's fingerprint, DSPy's LM cache (keyed on the exact
# prompt messages) and the numbers committed in README.md / README.ipynb. If one changes, the demo's
# numbers are no longer the ones the README reports -- that needs a new run, not a new pin.
# data: distill.stages.data.data_fingerprint (labels, gold in order, unlabeled order, test subset, test set);
# summary: the data summary without its `source` (which names the local directory).
BANKING77_DATA = {
    "local": ("071571c2907f", "a04389f88353"),  # num_to_label 500; README's quick numbers are that run's
    "local_full": ("c87409a24482", "0ee58c902946"),
    "local_ci": ("81f0477220ad", "3791d3407756"),
    "cluster": ("c87409a24482", "0ee58c902946"),
}
# distill.stages.base.prompt_fingerprint: the adapter-formatted messages of the full prompt and the
# finetuned student's prompt (student=True), and of the full prompt alone (the teacher's).
BANKING77_PROMPTS = {
    "local": ("5003bc60cd54", "4e8b6ec797af"),
    "local_full": ("5003bc60cd54", "4e8b6ec797af"),
    "local_ci": ("5003bc60cd54", "4e8b6ec797af"),
    "cluster": ("0c70794bda17", "72c70e60cce6"),  # ChainOfThought: another signature
}
BANKING77_INSTRUCTIONS = ("As part of a bank's customer-support triage system, classify the intent of a customer's "
                          "message into exactly one of the 25 intent labels.")


@pytest.mark.parametrize("profile", sorted(BANKING77_DATA))
def test_banking77_is_byte_identical_as_a_task(with_banking77, profile) -> None:
    # pinned before data.num_calibration: without a calibration split, the splits are what they were
    cfg = load_config(profile, overrides={"data": {"num_calibration": 0}})
    assert cfg.task.name == "banking77"
    data = prepare_data(cfg)
    summary = data.summary()
    assert summary.pop("source") == f"csv:{with_banking77}"
    assert (data_fingerprint(data), fingerprint(summary)) == BANKING77_DATA[profile]
    assert (prompt_fingerprint(cfg, data.labels), prompt_fingerprint(cfg, data.labels, student=False)) == \
        BANKING77_PROMPTS[profile]
    program = IntentClassificationModule(data.labels, cfg.program.reasoning, cfg.program.max_reasoning_chars)
    assert program.predictor.signature.instructions == BANKING77_INSTRUCTIONS
    assert (summary["train"], summary["test"], summary["gold"]) == (4171, 1000, 100)


def test_banking77_dir_wins_over_distill_data_dir(with_banking77, tmp_path, monkeypatch) -> None:
    """BANKING77_DIR is banking77's own variable (task.source.dir_env): it is read before DISTILL_DATA_DIR."""
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path / "elsewhere"))
    cfg = load_config("local_ci")
    assert task_data_dir(cfg) == (with_banking77, "BANKING77_DIR")
    # what `check-env` looks into for the task's train.csv / test.csv
    assert any(c.name == "BANKING77_DIR" and c.ok and c.detail == str(with_banking77) for c in check_env(cfg))
    monkeypatch.delenv("BANKING77_DIR")
    assert task_data_dir(cfg) == (tmp_path / "elsewhere", "DISTILL_DATA_DIR")
    with pytest.raises(DataError, match=r"does not exist: .*elsewhere \(from DISTILL_DATA_DIR\)"):
        prepare_data(cfg)


# --- a tiny task of our own --------------------------------------------------------------------------

TOPICS = {
    "Weather": ["the forecast for tomorrow", "rain this weekend", "the heatwave next week", "snow on Friday",
                "the wind tonight", "a thunderstorm this afternoon", "the humidity today", "frost overnight",
                "the pollen count", "fog in the morning"],
    "Cooking": ["a recipe for lasagne", "baking sourdough bread", "how long to roast a chicken", "making risotto",
                "a vegan curry", "how to poach an egg", "seasoning a cast iron pan", "homemade pasta dough",
                "caramelising onions", "a quick pancake batter"],
    "Travel": ["a cheap flight to Lisbon", "the train to Edinburgh", "a hotel near the Louvre", "my passport renewal",
               "a road trip through Norway", "luggage limits on the ferry", "a hostel in Kyoto",
               "the visa for Vietnam", "jet lag after a long flight", "a campsite by the lake"],
    "Music": ["learning the guitar", "the new jazz album", "tickets for the symphony", "tuning a violin",
              "writing song lyrics", "a good pair of headphones", "the drum solo in that track",
              "singing lessons", "the festival line-up", "recording a podcast intro"],
    "Sports": ["the football match score", "training for a marathon", "the tennis final", "joining a rowing club",
               "the cycling stage today", "a basketball tryout", "the swimming relay", "stretching after a run",
               "the golf tournament", "the rugby league table"],
    "Gardening": ["pruning the roses", "planting tomato seedlings", "slugs eating my lettuce", "mowing the lawn",
                  "compost for the vegetable bed", "repotting a fern", "watering the hydrangeas",
                  "weeds between the paving", "bulbs for next spring", "the apple tree blossom"],
}
TEMPLATES = ["What do you know about {}?", "Can you tell me about {}?", "I keep thinking about {}.",
             "Any advice on {}?", "Please help me with {}.", "I read something about {}."]
DESCRIPTIONS = {"gardening": "plants, lawns, soil and garden pests", "weather": "forecasts and conditions outside"}
TASK_PROMPT = {"instructions": "Sort a short message into exactly one of the {n} topics.",
               "text": "The message", "label": "The topic of the message"}


def tiny_rows() -> list[dict[str, str]]:
    """6 labels x 60 distinct messages (360 rows), labels in their own spelling (capitals: normalised)."""
    rows = [{"message": t.format(s), "topic": topic}
            for topic, subjects in TOPICS.items() for s, t in itertools.product(subjects, TEMPLATES)]
    assert len({r["message"] for r in rows}) == len(rows) == 360
    # interleaved, as a real export would be, not label by label
    return [r for turn in zip(*[rows[k * 60:(k + 1) * 60] for k in range(len(TOPICS))]) for r in turn]


def tiny_task(**over) -> dict:
    task = {
        "name": "topics",
        "source": {"files": {"train": "topics.csv"}},
        "columns": {"text": "message", "label": "topic"},
        "test_fraction": 0.25,
        "labels": {"names": [t.lower() for t in TOPICS], "descriptions": DESCRIPTIONS},
        "prompt": TASK_PROMPT,
    }
    return {**task, **over}


def write_tiny_task(directory: Path, task: dict | None = None, extends: str = "local_ci",
                    task_file: bool = False, **settings: Any) -> Path:
    """`topics.csv` (360 rows) and a profile `topics.yaml` that extends a shipped profile; the task inline,
    or (task_file) in a file of its own beside it, named by a relative path; `settings` are further keys of
    the profile."""
    directory.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(tiny_rows()).to_csv(directory / "topics.csv", index=False)
    profile: dict = {"extends": extends, **settings}
    if task_file:
        (directory / "topics_task.yaml").write_text(yaml.safe_dump(task or tiny_task(), sort_keys=False))
        profile["task"] = "topics_task.yaml"
    else:
        profile["task"] = task or tiny_task()
    path = directory / "topics.yaml"
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    """The tiny task's profile, its files read from DISTILL_DATA_DIR. BANKING77_DIR stays set: it is
    banking77's variable and must not redirect another task."""
    monkeypatch.setenv("BANKING77_DIR", str(tmp_path / "not-this-one"))
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    return write_tiny_task(tmp_path / "data")


BANKING_WORDS = ("bank", "banking", "card", "customer", "intent", "payment", "transfer")


def test_a_profile_path_that_extends_a_shipped_profile_is_the_task(tiny) -> None:
    cfg = load_config(str(tiny))
    ci = load_config("local_ci")
    assert cfg.name == "topics" and cfg.task.name == "topics"
    assert cfg.data == ci.data and cfg.models == ci.models and cfg.finetune == ci.finetune  # sizes, models, recipe
    data = prepare_data(cfg)
    names = [t.lower() for t in TOPICS]
    assert data.labels == names and isinstance(data.labels, TaskLabels)
    assert data.source == f"csv:{tiny.parent}"
    # 25% of each label's 60 messages held out, seeded: 45 + 15 per label
    assert (len(data.train), data.full_test_size) == (270, 90)
    assert data.label_counts == dict.fromkeys(names, 45)
    assert Counter(ex.label for ex in data.full_test) == dict.fromkeys(names, 15)
    assert not {ex.text for ex in data.train} & {ex.text for ex in data.full_test}
    assert (len(data.gold), len(data.to_label), len(data.test)) == (100, 60, 50)  # local_ci's sizes
    again = prepare_data(load_config(str(tiny)))
    assert data_fingerprint(again) == data_fingerprint(data)  # the seeded split is the same every time


def test_the_tiny_tasks_prompts_are_its_own(tiny) -> None:
    cfg = load_config(str(tiny))
    data = prepare_data(cfg)
    program = IntentClassificationModule(data.labels, cfg.program.reasoning, cfg.program.max_reasoning_chars)
    sig = program.predictor.signature
    assert sig.instructions == ("Sort a short message into exactly one of the 6 topics.\n\nWhat the labels mean:\n"
                                "- weather: forecasts and conditions outside\n"
                                "- gardening: plants, lawns, soil and garden pests")
    query = data.test[0].text
    for prompt in ("full", "compact"):  # the teacher's and base student's, and the finetuned student's
        messages = adapter(prompt).format(sig, [], {"text": query})
        text = " ".join(m["content"] for m in messages).lower()
        assert "sort a short message" in text and query.lower() in text
        assert not [w for w in BANKING_WORDS if w in text], text
    full = " ".join(m["content"] for m in adapter("full").format(sig, [], {"text": query}))
    assert "The topic of the message" in full and all(name in full for name in data.labels)
    # what the stages fingerprint moves with the task's wording
    reworded = tiny_task(prompt={**TASK_PROMPT, "text": "A note"})
    other = load_config(str(write_tiny_task(tiny.parent / "other", reworded)))
    assert prompt_fingerprint(other, prepare_data(other).labels) != prompt_fingerprint(cfg, data.labels)


def test_a_plain_label_list_gets_a_generic_prompt() -> None:
    sig = make_signature(["x", "y", "z"])
    assert sig.instructions == "Classify the message into exactly one of the 3 labels."
    assert "bank" not in json.dumps(adapter("full").format(sig, [], {"text": "q"})).lower()


def test_a_task_file_named_by_a_relative_path_and_top_n(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DISTILL_DATA_DIR", raising=False)
    # no data directory: an absolute file path; top_n instead of names (all 6 have 60 rows: ties by name)
    task = tiny_task(source={"files": {"train": str(tmp_path / "topics.csv")}}, labels={"top_n": 4})
    cfg = load_config(str(write_tiny_task(tmp_path, task, task_file=True)))
    assert cfg.task.where("labels.top_n") == f"{tmp_path / 'topics_task.yaml'}: key 'labels.top_n'"
    data = prepare_data(cfg)
    assert data.labels == ["cooking", "gardening", "music", "sports"]
    assert data.source == f"csv:{tmp_path / 'topics.csv'}"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_give_the_same_records_as_csv(tiny, suffix) -> None:
    frame = pd.DataFrame(tiny_rows())
    if suffix == ".jsonl":
        frame.to_json(tiny.parent / f"topics{suffix}", orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(tiny.parent / f"topics{suffix}")
    other = write_tiny_task(tiny.parent / "other", tiny_task(source={"files": {"train": f"topics{suffix}"}}))
    from_csv, from_other = prepare_data(load_config(str(tiny))), prepare_data(load_config(str(other)))
    assert data_fingerprint(from_other) == data_fingerprint(from_csv)
    assert from_other.source == f"{suffix[1:]}:{tiny.parent}"


def test_given_train_and_test_files(tmp_path, monkeypatch) -> None:
    """Train and test as files of their own (a list of files for train), no fraction."""
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path))
    rows = tiny_rows()
    pd.DataFrame(rows[:150]).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows[150:300]).to_csv(tmp_path / "b.csv", index=False)
    pd.DataFrame(rows[300:]).to_csv(tmp_path / "t.csv", index=False)
    task = tiny_task(source={"files": {"train": ["a.csv", "b.csv"], "test": "t.csv"}}, test_fraction=None)
    task.pop("test_fraction")
    data = prepare_data(load_config(str(write_tiny_task(tmp_path / "p", task))))
    assert (len(data.train), data.full_test_size) == (300, 60)
    assert [ex.text for ex in data.full_test] == [r["message"] for r in rows[300:]]


def test_a_hub_source_without_a_test_split(tiny, tmp_path, monkeypatch) -> None:
    """A hub dataset (here a local copy of the hub's parquet layout) with string labels and only a train
    split: the same records as the CSV, split by the same seeded fraction."""
    import datasets

    monkeypatch.delenv("DISTILL_DATA_DIR")  # a data directory would mean: read the files instead
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "hub" / "default" / "train").mkdir(parents=True)
    datasets.Dataset.from_list(tiny_rows()).to_parquet(str(tmp_path / "hub" / "default" / "train" / "0000.parquet"))
    task = tiny_task(source={"hub": {"id": str(tmp_path / "hub"), "test_split": None}})
    from_hub = prepare_data(load_config(str(write_tiny_task(tmp_path / "p", task))))
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tiny.parent))
    assert from_hub.source == f"hub:{tmp_path / 'hub'}@None"
    assert data_fingerprint(from_hub) == data_fingerprint(prepare_data(load_config(str(tiny))))


def test_the_cli_data_command_on_a_profile_path(tiny) -> None:
    r = subprocess.run([sys.executable, "-m", "distill", "data", "--profile", str(tiny)], capture_output=True,
                       text=True, env=dict(os.environ), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["labels"] == [t.lower() for t in TOPICS] and (out["train"], out["test"], out["gold"]) == (270, 90, 100)


# --- bad task files: one line, the file and the key, nothing started ---------------------------------


def _data_error(profile: Path) -> str:
    """The one line a bad task gives, from the data stage -- the pipeline's first -- before it writes anything."""
    cfg = load_config(str(profile))
    with pytest.raises(DataError) as e:
        DataStage(cfg)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert not cfg.artifacts.exists() or not any(cfg.artifacts.iterdir())  # nothing written, nothing started
    return msg


def test_bad_task_missing_column(tiny) -> None:
    bad = write_tiny_task(tiny.parent, tiny_task(columns={"text": "message", "label": "intent"}))
    msg = _data_error(bad)
    assert msg.startswith(f"{bad}: key 'task.columns.label': ") and "missing column(s) intent" in msg
    assert "it has message, topic" in msg


def test_bad_task_label_that_never_occurs(tiny) -> None:
    names = [t.lower() for t in TOPICS] + ["astronomy"]
    bad = write_tiny_task(tiny.parent, tiny_task(labels={"names": names}))
    msg = _data_error(bad)
    assert msg.startswith(f"{bad}: key 'task.labels.names': 'astronomy' never occur")


def test_bad_task_fewer_examples_than_gold_and_devset(tiny) -> None:
    bad = write_tiny_task(tiny.parent, tiny_task(labels={"names": ["weather", "music"]}))  # 90 training rows
    msg = _data_error(bad)
    assert msg.startswith(f"{bad}: key 'task.source': 90 training examples")
    assert "data.num_gold (100) + data.devset_size (20)" in msg and "profile 'topics'" in msg


def test_bad_task_duplicate_texts_across_train_and_test(tiny) -> None:
    rows = tiny_rows()
    pd.DataFrame(rows).to_csv(tiny.parent / "train.csv", index=False)
    pd.DataFrame(rows[:3] + rows[-40:]).to_csv(tiny.parent / "test.csv", index=False)
    task = tiny_task(source={"files": {"train": "train.csv", "test": "test.csv"}})
    task.pop("test_fraction")
    bad = write_tiny_task(tiny.parent, task)
    msg = _data_error(bad)
    assert msg.startswith(f"{bad}: key 'task.source': 43 text(s) are in both the train and the test split")


def test_bad_task_empty_file(tiny) -> None:
    (tiny.parent / "topics.csv").write_text("")
    msg = _data_error(tiny)
    assert msg.startswith(f"{tiny}: key 'task.source.files.train': ") and "topics.csv is an empty file" in msg
    (tiny.parent / "topics.csv").write_text("message,topic\n")
    assert "has a header but no data rows" in _data_error(tiny)


def test_bad_task_not_utf8(tiny) -> None:
    csv = tiny.parent / "topics.csv"
    csv.write_bytes(csv.read_bytes().replace(b"Lisbon", "Lisboa \u00e9".encode("latin-1"), 1))
    line = next(i for i, ln in enumerate(csv.read_bytes().splitlines(), start=1) if b"Lisboa" in ln)
    msg = _data_error(tiny)
    assert msg.startswith(f"{tiny}: key 'task.source.files.train': ")
    assert f"topics.csv is not UTF-8 text (byte 0xe9 on line {line})" in msg


def test_bad_task_missing_file_and_empty_cell(tiny) -> None:
    (tiny.parent / "topics.csv").rename(tiny.parent / "gone.csv")
    assert "topics.csv is missing" in _data_error(tiny)
    rows = tiny_rows()
    rows[7]["topic"] = ""
    pd.DataFrame(rows).to_csv(tiny.parent / "topics.csv", index=False)
    assert "data row 8: empty topic" in _data_error(tiny)


# --- bad task configs: the loader's errors name the file and the key ----------------------------------


def test_unknown_key_in_a_task_file_names_the_task_file(tmp_path) -> None:
    task = tiny_task(labels={"top_m": 3})
    path = write_tiny_task(tmp_path, task, task_file=True)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'topics_task.yaml'}: unknown key 'labels\.top_m'"):
        load_config(str(path))


def test_unknown_key_in_an_inline_task_names_the_profile(tmp_path) -> None:
    path = write_tiny_task(tmp_path, tiny_task(colums={"text": "message"}))
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'task\.colums'"):
        load_config(str(path))


@pytest.mark.parametrize("task,needle", [
    (tiny_task(labels={"top_n": 3, "names": ["a", "b"]}), "exactly one of top_n .* or names"),
    (tiny_task(source={}), "task.source needs hub .* or files"),
    (tiny_task(test_fraction=None), "task.test_fraction is needed"),
    (tiny_task(source={"files": {"train": "a.csv", "test": "b.csv"}}), "but it has one"),
    (tiny_task(source={"files": {"train": "topics.xlsx"}}), r"key 'task\.source\.files\.train'.*not one of .csv"),
    (tiny_task(test_fraction=1.5), r"key 'task\.test_fraction'"),
])
def test_task_rules_are_one_line_naming_the_key(tmp_path, task, needle) -> None:
    path = write_tiny_task(tmp_path, task)
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_missing_task_file_and_old_data_keys_that_disagree(tmp_path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("extends: local\ntask: no_such_task\n")
    with pytest.raises(ConfigError, match=r"task file not found: .*configs/tasks/no_such_task\.yaml"):
        load_config(str(p))
    # The old spelling of banking77's source (data.hub_id, data.top_n_labels) may stay in a profile only if it
    # agrees with the task
    p.write_text("extends: cluster\ndata: {top_n_labels: 10}\n")
    with pytest.raises(ConfigError, match=r"data\.top_n_labels is 10 but task 'banking77' has task\.labels\.top_n 25"):
        load_config(str(p))
    write_tiny_task(tmp_path / "t", task_file=True)
    p.write_text(f"extends: cluster\ntask: {tmp_path / 't' / 'topics_task.yaml'}\ndata: {{hub_id: PolyAI/banking77}}\n")
    with pytest.raises(ConfigError,
                       match=r"data\.hub_id is 'PolyAI/banking77' but task 'topics' has task\.source\.hub\.id None"):
        load_config(str(p))
    p.write_text(f"extends: cluster\ntask: {tmp_path / 't' / 'topics_task.yaml'}\n")  # cluster.yaml names a task
    assert load_config(str(p)).task.name == "topics"


# --- the whole pipeline on the tiny task --------------------------------------------------------------


# The tiny task's pipeline run (tests/conftest.py's `tiny_task_run`, shared with test_deploy_gate.py's loop):
# smaller than local_ci where the sizes only cost time. Every stage still runs on served models, and
# test_pipeline.py covers local_ci's sizes (and tracking, test_tracking.py).
TINY_RUN_SIZES = {"num_to_label": 40, "devset_size": 10, "optimizer_val_size": 6, "test_size": 24}
TINY_RUN_SETTINGS = dict(teacher={"gate_size": 24}, finetune={"training": {"max_steps": 2}},
                         evaluation={"latency_queries": 3}, serving={"sample_queries": 4},
                         tracking={"enabled": False})


@pytest.mark.slow
def test_the_whole_pipeline_runs_the_tiny_task_from_one_yaml_file(tiny_task_run) -> None:
    """The real served models, Ray job and Serve, on a task the test wrote: one file
    (`topics.yaml`, extends local_ci) and one CSV. Minutes on 2 cores (the run is conftest's `tiny_task_run`;
    its artifacts are read here as the run left them)."""
    art, run = tiny_task_run.snapshot, tiny_task_run
    names = [t.lower() for t in TOPICS]

    cfg = run.cfg
    assert cfg.name == "topics" and cfg.artifacts == run.artifacts
    report = run.report
    for block in ("data", "baselines", "teacher", "curation", "finetune", "eval", "serving", "run", "latency", "cost"):
        assert block in report, sorted(report)
    d = report["data"]
    assert d["labels"] == names and d["label_counts"] == dict.fromkeys(names, 45)
    assert (d["train"], d["test"], d["test_used"], d["gold"], d["to_label"]) == (270, 90, 24, 100, 40)
    assert d["source"] == f"csv:{run.data_dir}"
    t = report["teacher"]
    assert t["accuracy_gold"] >= cfg.teacher.min_accuracy_gold and t["labeled"] == 40 and t["valid_rate"] == 1.0
    labels = [json.loads(x) for x in (art / "teacher" / "labels.jsonl").read_text().splitlines()]
    assert {r["label"] for r in labels} <= set(names)
    c = report["curation"]
    assert (c["devset"], c["optimizer_val"]) == (10, 6) and set(c["label_counts"]) <= set(names)
    assert report["finetune"]["steps"] == 2
    ev = report["eval"]
    assert set(ev["testset"]) == {"base", "finetuned"} and 0.0 <= ev["best"]["test_score"] <= 1.0
    params = json.loads((art / "deploy_params.json").read_text())
    assert params["labels"] == names
    s = report["serving"]
    assert s["queries"] > 0 and s["ok"] == s["queries"] and s["valid_share"] == 1.0

    # No banking77 word in any prompt: the SFT messages the student was trained on (what it is sent at
    # inference), and every saved program's instructions and demonstrations.
    sft = (art / "curation" / "sft.jsonl").read_text()
    programs = [p.read_text() for p in (art / "eval" / "programs").glob("*.json") if p.name != "meta.json"]
    assert programs and "Sort a short message into exactly one of the 6 topics." in sft
    for text in (sft, *programs):
        assert "exactly one of the 6 topics" in text
        assert not [w for w in BANKING_WORDS if w in text.lower()]


def _yaml_block(path: Path, heading: str) -> str:
    import re

    section = path.read_text().split(heading, 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_the_readme_task_loads_as_printed(tmp_path, monkeypatch) -> None:
    """README.md's short "Bring your own task" profile, as printed, runs the data stage on the tiny task."""
    (tmp_path / "mytask.yaml").write_text(_yaml_block(ROOT / "README.md", "## Bring your own task"))
    pd.DataFrame(tiny_rows()).to_csv(tmp_path / "topics.csv", index=False)
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path))
    cfg = load_config(str(tmp_path / "mytask.yaml"))
    # local's sizes, but no calibration split: the tiny task's 270 training rows cannot spare 300
    assert cfg.data == load_config("local", overrides={"data": {"num_calibration": 0}}).data
    assert cfg.artifacts.name == "mytask" and cfg.calibration_split == "devset"
    data = prepare_data(cfg)
    assert (len(data.train), data.full_test_size, len(data.labels)) == (270, 90, 6)


def test_the_docs_walk_through_is_the_tiny_task(tmp_path, monkeypatch) -> None:
    """docs/task.md's walk-through profile, as printed, loads the tests' tiny task."""
    import re

    section = (ROOT / "docs" / "task.md").read_text().split("# Bring your own task", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "topics.yaml").write_text(block)
    pd.DataFrame(tiny_rows()).to_csv(tmp_path / "topics.csv", index=False)
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path))
    cfg = load_config(str(tmp_path / "topics.yaml"))
    assert cfg.task.model_dump() == load_config(str(write_tiny_task(tmp_path / "t"))).task.model_dump()
    assert cfg.data == load_config("local_ci").data and cfg.artifacts.name == "topics"
    data = prepare_data(cfg)
    assert (len(data.train), data.full_test_size, len(data.labels)) == (270, 90, 6)


# --- the held-out task: banking77's intents ranked 26-50 ------------------------------------------------


def test_banking77_next25_is_the_next_25_intents_from_the_same_files(with_banking77) -> None:
    top = prepare_data(load_config("local"))
    cfg = load_config("local_next25")
    assert cfg.task.name == "banking77_next25" and cfg.artifacts_dir == "artifacts/local_next25"
    # local's settings, no knob changed: only the task and the artifact directory differ
    local = load_config("local")
    assert cfg.model_dump(exclude={"name", "task", "artifacts_dir"}) == local.model_dump(
        exclude={"name", "task", "artifacts_dir"})
    data = prepare_data(cfg)
    assert len(data.labels) == 25 and not set(data.labels) & set(top.labels)
    assert data.labels[0] == "pending_transfer" and data.labels[-1] == "exchange_via_app"  # ranks 26 and 50
    counts = data.label_counts
    assert max(counts.values()) < min(top.label_counts.values())  # every one rarer than banking77's 25th
    # 3240 training rows, less the one text that is in the test split too (dropped from train, not from test)
    assert len(data.train) == 3239 and data.full_test_size == 1000  # 40 test rows per intent
    assert not {ex.text for ex in data.train} & {ex.text for ex in data.full_test}
    assert len(data.gold) == 100 and len(data.to_label) == 500 and len(data.test) == 200
    assert Counter(ex.label for ex in data.test) == {lab: 8 for lab in data.labels}


def test_skip_top_needs_top_n_and_enough_labels(tmp_path, with_banking77) -> None:
    path = write_tiny_task(tmp_path, tiny_task(labels={"names": ["weather", "music"], "skip_top": 2}))
    with pytest.raises(ConfigError, match="skip_top counts down the frequency ranks: it needs top_n"):
        load_config(str(path))
    p = tmp_path / "far.yaml"
    task = yaml.safe_load((ROOT / "configs" / "tasks" / "banking77_next25.yaml").read_text())
    task["labels"]["skip_top"] = 60
    p.write_text(yaml.safe_dump({"extends": "local", "artifacts_dir": str(tmp_path / "a"), "task": task}))
    with pytest.raises(DataError, match=r"key 'task\.labels\.skip_top'.*ranks 61-85 but the data has only 77 labels"):
        prepare_data(load_config(str(p)))


@pytest.mark.parametrize("profile", ["local", "local_ci", "local_full", "local_next25", "local_active", "cluster", "cluster_cpu", "tiny"])
def test_a_saved_config_loads_back_equal(profile, tiny, tmp_path) -> None:
    """The serving stage hands its run's settings to the teacher app's replicas as a saved profile; it must
    load back, for banking77 and for a task without a hub source alike."""
    from distill.config import save_config

    cfg = load_config(str(tiny) if profile == "tiny" else profile)
    back = load_config(str(save_config(cfg, tmp_path / "saved" / "profile.yaml")))
    assert back.model_dump() == cfg.model_dump()
