"""The Stage abstraction and the report assembled from manifests: skip rules and invalidation.

Fast: a toy stage for the rules, and the real teacher stage on DSPy's DummyLM (a scripted LM) in place of
a served model, so the stale-teacher case runs in seconds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import dspy
import pytest
import yaml
from dspy.utils import DummyLM

from distill.config import load_config
from distill.data.dataset import read_jsonl
from distill.errors import DistillError
from distill.lm import CompactJSONAdapter, CompactPromptAdapter
from distill.program import IntentClassificationModule
from distill.report import assemble_report
from distill.stages.base import Manifest, Stage, code_version, endpoint_cache
from distill.stages.curation import CurationStage
from distill.stages.data import DataStage
from distill.stages.teacher import TeacherStage
from distill.teacher.labeling import TeacherQualityError, read_records


class CountManifest(Manifest):
    value: int
    note: str | None = None


class CountStage(Stage[CountManifest]):
    """Writes `setting` into a file; its fingerprint is the setting."""

    name = "count"
    title = "count"
    manifest_type = CountManifest
    runs: ClassVar[int] = 0

    def __init__(self, cfg: Any, setting: int, fail: bool = False) -> None:
        super().__init__(cfg)
        self.setting, self.fail = setting, fail

    def fingerprint(self) -> str:
        return f"setting={self.setting}"

    def outputs(self, m: CountManifest) -> list[Path]:
        return [self.dir / "value.txt"]

    def run(self) -> CountManifest:
        CountStage.runs += 1
        if self.fail:
            raise DistillError("interrupted")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "value.txt").write_text(str(self.setting))
        # the first run notes something the second does not: nothing may carry over
        return CountManifest(fingerprint=self.fingerprint(), value=self.setting,
                             note="first" if self.setting == 1 else None)


@pytest.fixture
def cfg(tmp_path, monkeypatch, with_banking77):
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    return load_config("local_ci", overrides={"data": {"num_to_label": 8, "test_size": 25, "devset_size": 3, "optimizer_val_size": 2},
                                              # vote_confidence 1: every query goes to the scripted LM
                                              "teacher": {"gate_size": 12, "vote_confidence": 1.0},
                                              # the scripted answers carry the vote's confidence, often below
                                              # local's floor: keep them all (the floor: test_labeling)
                                              "curation": {"min_confidence": None, "sft_source": "teacher"},
                                              "evaluation": {"latency_queries": 2}})


def test_a_current_stage_is_skipped_and_a_changed_one_rewrites_its_whole_manifest(cfg) -> None:
    CountStage.runs = 0
    first = CountStage(cfg, 1).ensure()
    assert first.value == 1 and first.note == "first" and CountStage.runs == 1
    assert CountStage(cfg, 1).is_current() and CountStage(cfg, 1).ensure() == first and CountStage.runs == 1
    second = CountStage(cfg, 2).ensure()
    assert CountStage.runs == 2 and second.value == 2 and second.note is None  # whole, not merged
    assert CountStage(cfg, 2).load() == second


def test_a_missing_output_or_an_interrupted_run_means_not_current(cfg) -> None:
    CountStage.runs = 0
    stage = CountStage(cfg, 1)
    stage.ensure()
    (stage.dir / "value.txt").unlink()
    assert not stage.is_current()
    stage.ensure()
    assert CountStage.runs == 2
    with pytest.raises(DistillError, match="interrupted"):
        CountStage(cfg, 3, fail=True).ensure()
    # the old manifest went before the run started: nothing claims to be done
    assert stage.load() is None and not stage.is_current()


def test_a_manifest_of_another_format_is_not_current(cfg) -> None:
    stage = CountStage(cfg, 1)
    stage.manifest_path.parent.mkdir(parents=True)
    stage.manifest_path.write_text('{"fingerprint": "setting=1", "accuracy": 0.9}')
    assert stage.load() is None and not stage.is_current()


class ScriptedTeacher(TeacherStage):
    """The real teacher stage with DSPy's DummyLM answering instead of a served model."""

    def __init__(self, cfg: Any, data: Any, answer: dict[str, str]) -> None:
        super().__init__(cfg, data)
        self.answer = answer
        self.calls = 0

    def endpoint(self, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def lm(self, lm_cfg: Any, model: str | None = None, cache: bool = True) -> dspy.LM:
        stage = self

        class Counting(DummyLM):
            def __call__(self, *a: Any, **kw: Any) -> Any:
                stage.calls += 1
                return super().__call__(*a, **kw)

        lm = Counting({text: {"label": label} for text, label in self.answer.items()}, adapter=CompactJSONAdapter())
        lm.cache = False  # DSPy keys its cache on the model id: "dummy" would replay the other script
        return lm


def test_changed_teacher_settings_remeasure_the_test_accuracy_and_drop_stale_sections(cfg) -> None:
    data = DataStage(cfg).data
    DataStage(cfg, data).ensure()
    everything = [*data.gold, *data.test]
    right = {ex.text: ex.label for ex in everything} | {ex.text: data.labels[0] for ex in data.to_label}
    first = ScriptedTeacher(cfg, data, right)
    m1 = first.ensure()
    assert m1.accuracy_gold == 1.0 and m1.accuracy_test == 1.0 and m1.labeled == len(data.to_label)
    CurationStage(cfg, data).ensure()
    assert set(assemble_report(cfg)) >= {"data", "teacher", "curation", "latency", "cost"}

    # Another teacher setting, and a teacher that is right on the gold labels but wrong on every test query.
    cfg2 = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"k": 1})})
    wrong = right | {ex.text: next(lab for lab in data.labels if lab != ex.label) for ex in data.test}
    second = ScriptedTeacher(cfg2, data, wrong)
    assert not second.is_current()
    m2 = second.ensure()
    assert second.calls >= len(data.test)  # measured again, not carried over
    assert m2.accuracy_test == 0.0 and m2.k == 1
    report = assemble_report(cfg2)
    assert report["teacher"]["accuracy_test"] == 0.0
    assert "curation" not in report  # computed from the old teacher's labels: stale until it runs again
    assert CurationStage(cfg2, data).is_current() is False


def test_the_quality_gate_holds_for_a_current_teacher_too(cfg) -> None:
    data = DataStage(cfg).data
    right = {ex.text: ex.label for ex in [*data.gold, *data.test]} | {ex.text: data.labels[0] for ex in data.to_label}
    ScriptedTeacher(cfg, data, right).ensure()
    stricter = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"min_accuracy_gold": 1.0})})
    assert ScriptedTeacher(stricter, data, right).ensure().accuracy_gold == 1.0  # still passes at 100%
    gold_wrong = right | {ex.text: next(lab for lab in data.labels if lab != ex.label) for ex in data.gold}
    tuned = stricter.model_copy(update={"teacher": stricter.teacher.model_copy(update={"k": 3})})
    with pytest.raises(TeacherQualityError, match="below the floor"):
        ScriptedTeacher(tuned, data, gold_wrong).ensure()
    assert TeacherStage(tuned, data).load() is None  # a failed gate leaves no manifest behind


def test_a_confident_vote_answers_without_the_llm_and_the_manifest_says_so(cfg) -> None:
    data = DataStage(cfg).data
    DataStage(cfg, data).ensure()
    vote_only = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"vote_confidence": 0.0})})
    stage = ScriptedTeacher(vote_only, data, {ex.text: ex.label for ex in data.test})  # for the LLM-path timing
    m = stage.ensure()
    assert stage.calls == vote_only.evaluation.latency_queries  # only the timing of the LLM path
    assert m.llm_share_gold == 0.0 and m.llm_share_test == 0.0 and m.labeled == len(data.to_label)
    assert m.vote is not None and m.vote.accuracy_test == m.accuracy_test  # the vote alone is the teacher
    assert m.vote.accuracy_test > 0.4  # far above chance (4%) with 100 gold examples over 25 labels
    assert f"{m.vote.c:g}" in m.vote.loo_accuracy_gold
    records = read_records(stage.labels_path)
    assert {r["source"] for r in records} == {"vote"} and all(0 < r["confidence"] <= 1 for r in records)


@pytest.mark.parametrize("source", ["gold", "both"])
def test_the_student_can_learn_from_the_gold_labels_alone_or_with_the_teachers(cfg, source) -> None:
    data = DataStage(cfg).data
    DataStage(cfg, data).ensure()
    right = {ex.text: ex.label for ex in [*data.gold, *data.test]} | {ex.text: data.labels[0] for ex in data.to_label}
    ScriptedTeacher(cfg, data, right).ensure()
    teacher_only = CurationStage(cfg, data).ensure()
    other = cfg.model_copy(update={"curation": cfg.curation.model_copy(update={"sft_source": source})})
    stage = CurationStage(other, data)
    assert not stage.is_current()  # another SFT set: the finetune must not reuse the old one
    m = stage.ensure()
    sft_users = [ex["messages"][-2]["content"] for ex in read_jsonl(stage.sft_path)]
    gold_users = [m_["content"] for ex in data.gold for m_ in CompactPromptAdapter().format(
        IntentClassificationModule(data.labels).predictor.signature, [], {"text": ex.text}) if m_["role"] == "user"]
    assert m.sft_source == source and set(gold_users) <= set(sft_users)
    assert m.sft_examples == len(data.gold) + (teacher_only.sft_examples if source == "both" else 0)
    assert (m.devset, m.optimizer_val) == (teacher_only.devset, teacher_only.optimizer_val)  # teacher-labeled


def _teacher_serve_config(cfg: Any, tmp_path: Path, weights: Path, n_ctx: int = 4096) -> Any:
    """The profile's teacher endpoint with its own serve config: the same app, these weights and context."""
    raw = yaml.safe_load(cfg.path(cfg.models.teacher.serve_config).read_text())
    model = raw["applications"][0]["args"]["models"][0]
    model["source"], model["n_ctx"] = {"path": str(weights)}, n_ctx
    path = tmp_path / f"serve_teacher_{n_ctx}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return cfg.model_copy(update={"models": cfg.models.model_copy(update={
        "teacher": cfg.models.teacher.model_copy(update={"serve_config": str(path)})})})


def test_a_swapped_teacher_model_or_serve_config_runs_the_teacher_and_what_follows_again(cfg, tmp_path) -> None:
    """The stale-teacher case: the same model id behind other weights or other serve settings is another
    teacher. Its stage, and the stages computed from its labels, are not current any more."""
    data = DataStage(cfg).data
    DataStage(cfg, data).ensure()
    weights = tmp_path / "teacher.gguf"
    weights.write_bytes(b"GGUF" + b"\0" * 64)
    right = {ex.text: ex.label for ex in [*data.gold, *data.test]} | {ex.text: data.labels[0] for ex in data.to_label}
    first_cfg = _teacher_serve_config(cfg, tmp_path, weights)
    ScriptedTeacher(first_cfg, data, right).ensure()
    CurationStage(first_cfg, data).ensure()
    assert ScriptedTeacher(first_cfg, data, right).is_current() and CurationStage(first_cfg, data).is_current()

    # other weights under the same path, model id and size: only their content differs
    weights.write_bytes(b"GGUF" + b"\1" * 64)
    assert not ScriptedTeacher(first_cfg, data, right).is_current()
    second = ScriptedTeacher(first_cfg, data, right)
    second.ensure()
    assert second.calls > 0 and second.skipped is False
    assert not CurationStage(first_cfg, data).is_current() and "curation" not in assemble_report(first_cfg)
    CurationStage(first_cfg, data).ensure()

    # the same weights, another serve setting (the context length)
    third_cfg = _teacher_serve_config(cfg, tmp_path, weights, n_ctx=2048)
    assert not ScriptedTeacher(third_cfg, data, right).is_current()
    # ... and decoding settings the client sends
    hotter = first_cfg.model_copy(update={"models": first_cfg.models.model_copy(update={
        "teacher": first_cfg.models.teacher.model_copy(update={"temperature": 0.7})})})
    assert not ScriptedTeacher(hotter, data, right).is_current()
    assert ScriptedTeacher(first_cfg, data, right).is_current()  # nothing else moved it


def test_the_llm_cache_is_kept_per_endpoint_identity(cfg) -> None:
    """DSPy keys its cache on the model id and the request: another endpoint behind the same id must not be
    answered from the first one's cache."""
    request = {"model": "openai/smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}]}
    dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(cfg.artifacts / "dspy_cache"))
    with endpoint_cache(cfg, "teacher-a"):
        dspy.cache.put(request, "answer of a")
        assert dspy.cache.get(request) == "answer of a"
    with endpoint_cache(cfg, "teacher-b"):
        assert dspy.cache.get(request) is None
    with endpoint_cache(cfg, "teacher-a"):  # on disk: a fresh Cache object over the same directory
        assert dspy.cache.get(request) == "answer of a"
    assert dspy.cache.get(request) is None  # the profile's own cache is back


def test_code_versions_ignore_comments_and_docstrings_but_not_code(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "codever_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    mod = pkg / "m.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    versions = []
    for source in ('"""doc"""\nX = 1\n', '"""other doc"""\n# a comment\nX = 1\n', 'X = 2\n'):
        mod.write_text(source)
        code_version.cache_clear()
        versions.append(code_version("codever_pkg.m"))
    assert versions[0] == versions[1] != versions[2]
    code_version.cache_clear()
    assert code_version("codever_pkg") != ""  # a package: all its modules


def test_active_selection_labels_in_rounds_and_curation_draws_dev_from_the_random_seed(tmp_path,
                                                                                      monkeypatch) -> None:
    """data.selection active through the real teacher and curation stages (the vote answers: no LLM call
    but the timing of the LLM path, on the scripted LM).

    On the tiny task of test_task.py (a pool of 170 queries): the rounds, files and resume are the same
    mechanics on any task, and banking77's pool (4,071 queries) costs ~9 s of embedding. Active selection on
    banking77 itself, where the picks' uncertainty and spread are checked, is tests/test_active_labeling.py."""
    from tests.test_task import write_tiny_task

    monkeypatch.setenv("BANKING77_DIR", str(tmp_path / "not-this-one"))
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    profile = write_tiny_task(
        tmp_path / "data",
        data={"num_to_label": 11, "test_size": 25, "devset_size": 3, "optimizer_val_size": 2,
              "selection": "active", "active": {"rounds": 2, "batch_size": 3}},
        teacher={"gate_size": 12, "vote_confidence": 0.0},
        curation={"min_confidence": None, "sft_source": "teacher"}, evaluation={"latency_queries": 2})
    cfg = load_config(str(profile))
    assert cfg.task.name == "topics"
    data = DataStage(cfg).data
    assert len(data.pool) == len(data.unlabeled) > len(data.to_label) == 11
    DataStage(cfg, data).ensure()
    assert len(read_jsonl(tmp_path / "art" / "data" / "unlabeled.jsonl")) == len(data.pool)
    stage = ScriptedTeacher(cfg, data, {ex.text: ex.label for ex in data.test})
    m = stage.ensure()
    assert m.selection == "active" and m.labeled == m.to_label == 11
    assert [(r.round, r.picked) for r in m.active_rounds or []] == [(0, 5), (1, 3), (2, 3)]
    sel = read_jsonl(stage.dir / "selection.jsonl")
    assert [r["round"] for r in sel] == [0] * 5 + [1] * 3 + [2] * 3
    assert [r["pool_index"] for r in sel[:5]] == [0, 1, 2, 3, 4]  # the seed round: random's first draw
    assert all(r["score"] is not None for r in sel[5:])
    assert ScriptedTeacher(cfg, data, {}).is_current()  # resumable: a second run is a no-op
    # Curation's devset (3) and optimizer valset (2) are the seed round's: a random sample to choose on.
    CurationStage(cfg, data).ensure()
    seed_texts = {r["text"] for r in sel[:5]}
    chosen_on = [r["text"] for name in ("devset", "optimizer_val")
                 for r in read_jsonl(tmp_path / "art" / "curation" / f"{name}.jsonl")]
    assert len(chosen_on) == 5 and set(chosen_on) == seed_texts
    # Random selection (the default) still labels the first num_to_label of the shuffled pool.
    assert TeacherStage(cfg.model_copy(update={"data": cfg.data.model_copy(update={"selection": "random"})}),
                        data).selection_parts() == ()
