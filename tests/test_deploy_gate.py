"""The deploy gate (issue 32, item 3): a run deploys its new student only if it beats the deployed one on the
devset (never the test set); a tie keeps the deployed one; another devset is not comparable (the new one is
deployed, said so); a deployed student whose copies are gone cannot be kept.

Fast: the rule, the record, and the serving stage's record and copies on real files in tmp_path. Slow (not in
the fast tier): the tiny task's pipeline run, a pool from served queries, a rerun behind the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distill.config import load_config
from distill.data.dataset import TaskData, TaskLabels, make_example, read_jsonl, write_jsonl
from distill.errors import DistillError
from distill.program import DeployParams
from distill.report import summary_rows
from distill.stages.base import CallStats, write_manifest
from distill.stages.curation import CurationStage
from distill.stages.deploy_gate import (
    Candidate,
    DeployedStudent,
    decide,
    devset_fingerprint,
    read_deployed,
    student_identity,
    write_deployed,
)
from distill.stages.evaluation import BestVariant, EvalManifest, EvaluationStage
from distill.stages.finetune import FinetuneManifest, FinetuneStage
from distill.stages.serving import ServingManifest, ServingStage
from distill.stages.teacher import TeacherManifest


@pytest.fixture(autouse=True)
def own_digest_cache(tmp_path, monkeypatch) -> None:
    """Adapter digests (distill.models.file_identity) cached in tmp_path, not in ~/.cache."""
    monkeypatch.setattr("distill.models._DIGESTS", tmp_path / "digests.json")


def candidate(score: float, identity: str = "new", devset: str = "dev-a", size: int = 20) -> Candidate:
    return Candidate(identity=identity, kind="finetuned", variant="bfrs", model="student-ft", devset_score=score,
                     devset_fingerprint=devset, devset_size=size)


def deployed(tmp_path: Path, score: float, identity: str = "old", devset: str = "dev-a", size: int = 20,
             **over: object) -> DeployedStudent:
    """A deployed student whose copies exist (real files)."""
    d = tmp_path / "deployed" / identity
    d.mkdir(parents=True, exist_ok=True)
    files = {name: d / f"{name}.bin" for name in ("deploy_params", "program", "adapter")}
    for p in [*files.values(), d / "deploy.yaml"]:
        p.write_text(p.name)
    fields = dict(identity=identity, kind="finetuned", variant="vanilla", model="student-ft", devset_score=score,
                  devset_fingerprint=devset, devset_size=size, cascade=False, config=str(d / "deploy.yaml"),
                  files={k: str(v) for k, v in files.items()}, deployed_at="2025-01-01T00:00:00+00:00")
    return DeployedStudent(**{**fields, **over})


# --- the rule -------------------------------------------------------------------------------------------


def test_without_a_deployed_student_or_with_the_gate_off_the_new_one_is_deployed(tmp_path) -> None:
    d = decide("devset", candidate(0.5), None)
    assert d.deploy == "new" and d.reason.startswith("no student deployed before") and "50.0%" in d.reason
    off = decide("off", candidate(0.5), deployed(tmp_path, 0.9))
    assert off.deploy == "new" and "serving.deploy_gate is off" in off.line()
    assert off.deployed_devset_score == 0.9  # recorded, even when not compared


def test_a_better_student_on_the_same_devset_is_deployed(tmp_path) -> None:
    d = decide("devset", candidate(0.85), deployed(tmp_path, 0.80))
    assert d.deploy == "new" and "beats the deployed" in d.reason and "85.0% vs 80.0% on the same devset" in d.reason
    assert (d.new_devset_score, d.deployed_devset_score) == (0.85, 0.80)


def test_a_worse_student_keeps_the_deployed_one_and_a_tie_too(tmp_path) -> None:
    worse = decide("devset", candidate(0.75), deployed(tmp_path, 0.80))
    assert worse.deploy == "deployed" and "does not beat" in worse.reason and "tie" not in worse.reason
    assert worse.line().startswith("deploy gate (devset): the new student finetuned bfrs (student-ft) does not beat")
    tie = decide("devset", candidate(0.80), deployed(tmp_path, 0.80))
    assert tie.deploy == "deployed" and "a tie keeps the deployed one" in tie.reason


def test_another_devset_is_not_comparable_and_the_new_student_is_deployed(tmp_path) -> None:
    # Lower on paper, but on other queries (or other teacher labels): the numbers say nothing about each other.
    d = decide("devset", candidate(0.60, devset="dev-b", size=30), deployed(tmp_path, 0.95, devset="dev-a"))
    assert d.deploy == "new" and "another devset" in d.reason and "not comparable" in d.reason
    assert "20 queries, dev-a" in d.reason and "30 queries, dev-b" in d.reason
    assert (d.devset_fingerprint, d.deployed_devset_fingerprint) == ("dev-b", "dev-a")


def test_the_same_student_is_deployed_again_without_a_comparison(tmp_path) -> None:
    d = decide("devset", candidate(0.5, identity="same"), deployed(tmp_path, 0.9, identity="same"))
    assert d.deploy == "new" and "is the deployed one" in d.reason


def test_a_deployed_student_that_cannot_be_served_again_is_not_kept(tmp_path) -> None:
    gone = deployed(tmp_path, 0.9)
    Path(gone.files["adapter"]).unlink()
    d = decide("devset", candidate(0.5), gone)
    assert d.deploy == "new" and "cannot be served again (its copies are gone" in d.reason
    published = deployed(tmp_path, 0.9, config=None, not_restorable="its adapter is published to s3://b/x")
    d = decide("devset", candidate(0.5), published)
    assert d.deploy == "new" and "s3://b/x" in d.reason


# --- the record and the identity -------------------------------------------------------------------------


def test_the_record_round_trips_and_a_bad_one_is_one_line(tmp_path) -> None:
    path = tmp_path / "serving" / "deployed.json"
    assert read_deployed(path) is None
    record = deployed(tmp_path, 0.8)
    write_deployed(path, record)
    assert read_deployed(path) == record
    path.write_text(json.dumps({"identity": "x"}))
    with pytest.raises(DistillError) as e:
        read_deployed(path)
    assert "\n" not in str(e.value) and "delete it" in str(e.value) and "deploy_gate: off" in str(e.value)


def test_the_identity_is_the_student_s_content_not_where_its_files_lie(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "program.json").write_text('{"demos": []}')
        (d / "adapter.gguf").write_bytes(b"lora")
    ident = student_identity("ft", "finetuned", "bfrs", a / "program.json", {"prompt": "compact"}, str(a / "adapter.gguf"))
    assert ident == student_identity("ft", "finetuned", "bfrs", b / "program.json", {"prompt": "compact"},
                                     str(b / "adapter.gguf"))
    (b / "adapter.gguf").write_bytes(b"lora, retrained")
    assert ident != student_identity("ft", "finetuned", "bfrs", b / "program.json", {"prompt": "compact"},
                                     str(b / "adapter.gguf"))
    (a / "program.json").write_text('{"demos": [1]}')
    assert ident != student_identity("ft", "finetuned", "bfrs", a / "program.json", {"prompt": "compact"},
                                     str(a / "adapter.gguf"))


def test_the_devset_fingerprint_is_its_texts_and_labels() -> None:
    dev = [make_example("a", "x"), make_example("b", "y")]
    assert devset_fingerprint(dev) == devset_fingerprint([make_example("a", "x"), make_example("b", "y")])
    assert devset_fingerprint(dev) == devset_fingerprint(dev[::-1])  # an accuracy has no order
    assert devset_fingerprint(dev) != devset_fingerprint([make_example("a", "x"), make_example("b", "z")])
    assert devset_fingerprint(dev) != devset_fingerprint([make_example("a", "x"), make_example("c", "y")])


def test_a_relabeled_run_draws_the_same_devset_whatever_order_the_labels_were_written_in(tmp_path,
                                                                                         monkeypatch) -> None:
    """Concurrent labeling writes labels.jsonl in the order calls finish; a teacher run again (a new pool) writes
    them in another. Curation takes the devset in query order, so the gate compares on the same devset."""
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    cfg = load_config("local_ci", {"data": {"devset_size": 3, "optimizer_val_size": 2},
                                   "curation": {"min_confidence": None, "sft_source": "teacher"}})
    data = TaskData(labels=TaskLabels(["a", "b"]), train=[], test=[], gold=[], unlabeled=[])
    calls = CallStats(model="t", n=1, p50_s=0.1, p95_s=0.1, prompt_tokens_per_query=1.0, completion_tokens_per_query=1.0)
    write_manifest(cfg.artifacts / "teacher" / "manifest.json", TeacherManifest(
        fingerprint="t", model="t", strategy="zero_shot", k=0, candidate_k=1, accuracy_gold=1.0, valid_rate_gold=1.0,
        n_gold=1, accuracy_test=1.0, valid_rate=1.0, test_size=1, test_queries_per_s=1.0, labeled=10, to_label=10,
        labels_per_s=None, calls=calls))
    records = [{"id": f"{i:06d}-x", "text": f"query {i}", "label": "ab"[i % 2]} for i in range(10)]
    devsets = []
    for order in ([1, 0, 3, 2, 4, 6, 5, 7, 9, 8], [2, 0, 1, 5, 3, 4, 9, 6, 7, 8]):
        write_jsonl(cfg.artifacts / "teacher" / "labels.jsonl", [records[i] for i in order])
        CurationStage(cfg, data).run()
        devsets.append(read_jsonl(cfg.artifacts / "curation" / "devset.jsonl"))
    assert devsets[0] == devsets[1] == [{"text": f"query {i}", "label": "ab"[i % 2]} for i in range(3)]


# --- the serving stage's record and copies, on real artifacts ----------------------------------------------


def _artifacts(cfg, devset_score: float, program: str, adapter: bytes, devset: list[tuple[str, str]]) -> None:
    """What the evaluation, finetune and curation stages leave for the serving stage: their manifests, the
    deploy params, the saved program, the adapter and the devset."""
    art = cfg.artifacts
    prog = art / "eval" / "programs" / "finetuned_bfrs.json"
    prog.parent.mkdir(parents=True, exist_ok=True)
    prog.write_text(program)
    adapter_path = art / "finetune" / "adapter.gguf"
    adapter_path.parent.mkdir(parents=True, exist_ok=True)
    adapter_path.write_bytes(adapter)
    ft_model = cfg.finetune.finetuned_model
    write_manifest(art / "finetune" / "manifest.json", FinetuneManifest(
        fingerprint="ft", model=ft_model, adapter=str(adapter_path), serve_config="x.yaml", train_seconds=None,
        examples=1, epochs=1.0, steps=1, loss_history=[], first_loss=None, last_loss=None, recipe="r", published=None))
    scores = {"finetuned": {"bfrs": devset_score}}
    write_manifest(art / "eval" / "manifest.json", EvalManifest(
        fingerprint=f"ev-{devset_score}", devset=scores, optimizer_val=scores, testset=scores,
        best=BestVariant(kind="finetuned", variant="bfrs", model=ft_model, program_path=str(prog),
                         devset_score=devset_score, test_score=0.5),
        sizes={}, bfrs={}, plots={}, calls=CallStats(model=ft_model, n=1, p50_s=0.1, p95_s=0.1,
                                                     prompt_tokens_per_query=1.0, completion_tokens_per_query=1.0)))
    DeployParams(model=ft_model, program_path=str(prog), labels=["a", "b"], variant="bfrs", kind="finetuned",
                 test_score=0.5, devset_score=devset_score).save(art / "deploy_params.json")
    for name, rows in (("devset", devset), ("optimizer_train", devset[:1]), ("optimizer_val", devset[:1])):
        write_jsonl(art / "curation" / f"{name}.jsonl", [{"text": t, "label": lab} for t, lab in rows])


def _stage(cfg) -> ServingStage:
    data = TaskData(labels=["a", "b"], train=[], test=[], gold=[], unlabeled=[])
    curation = CurationStage(cfg, data)
    finetune = FinetuneStage(cfg, curation)
    return ServingStage(cfg, data, EvaluationStage(cfg, data, curation, finetune), finetune)


def test_the_serving_stage_copies_what_it_deployed_and_the_gate_keeps_serving_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(tmp_path / "art"))
    cfg = load_config("local_ci", {"cascade": {"enabled": False}})
    dev = [("where is my card", "a"), ("top up failed", "b")]
    _artifacts(cfg, 0.80, '{"v": 1}', b"adapter one", dev)
    stage = _stage(cfg)
    first = stage.candidate()
    assert (first.devset_score, first.devset_size) == (0.80, 2)
    assert stage.gate().deploy == "new"  # nothing deployed yet
    record = stage.record_deployment(first, cascade=False)
    assert read_deployed(stage.deployed_path) == record and record.identity == first.identity
    # The copies, and a Serve config that serves them: the deploy params point at the copied program, the LLM
    # app loads the copied adapter.
    copies = {k: Path(v) for k, v in record.files.items()}
    assert set(copies) == {"adapter", "deploy_params", "program"}
    assert all(p.parent == stage.dir / "deployed" / first.identity for p in copies.values())
    assert DeployParams.load(copies["deploy_params"]).program_path == str(copies["program"].resolve())
    apps = {a["import_path"]: a for a in yaml.safe_load(Path(record.config).read_text())["applications"]}
    assert apps["distill.serving.app:build_app"]["args"]["deploy_params"] == str(copies["deploy_params"])
    [tuned] = [m for m in apps["distill.serving.llm:build_app"]["args"]["models"]
               if m["name"] == cfg.finetune.finetuned_model]
    assert tuned["lora_path"] == str(copies["adapter"])

    # The next run: a retrained adapter and program, lower on the same devset. The gate keeps the deployed
    # student, whose copies are the first run's, whatever the new run wrote over the originals.
    _artifacts(cfg, 0.75, '{"v": 2}', b"adapter two", dev)
    worse = stage.candidate()
    assert worse.identity != first.identity and worse.devset_fingerprint == first.devset_fingerprint
    d = stage.gate()
    assert d.deploy == "deployed" and "75.0% vs 80.0%" in d.reason
    assert copies["adapter"].read_bytes() == b"adapter one" and copies["program"].read_text() == '{"v": 1}'
    assert read_deployed(stage.deployed_path).missing() is None

    # A better one on the same devset is deployed, recorded, and the old copies go.
    _artifacts(cfg, 0.85, '{"v": 3}', b"adapter three", dev)
    better = stage.candidate()
    assert stage.gate().deploy == "new"
    stage.record_deployment(better, cascade=False)
    assert [p.name for p in (stage.dir / "deployed").iterdir()] == [better.identity]

    # The teacher relabels the devset (or the task changes): not comparable, the new one is deployed.
    _artifacts(cfg, 0.5, '{"v": 4}', b"adapter four", [("where is my card", "b"), ("top up failed", "b")])
    d = stage.gate()
    assert d.deploy == "new" and "another devset" in d.reason


def test_the_report_says_which_student_is_served_and_why(tmp_path) -> None:
    d = decide("devset", candidate(0.75), deployed(tmp_path, 0.80))
    m = ServingManifest(fingerprint="s", url="u", config="c", model="m", queries=2, ok=2, valid_share=1.0,
                        accuracy=0.5, p50_latency_ms=1.0, gate=d)
    rows = dict(summary_rows({"serving": m.model_dump(mode="json")}))
    assert rows["deploy gate (devset): kept the deployed student"] == d.reason


# --- the loop, end to end: served queries -> pool -> rerun -> gated deploy (slow) --------------------------


@pytest.mark.slow
def test_served_queries_become_a_pool_and_a_rerun_deploys_only_a_better_student(tiny_task_run, tmp_path,
                                                                                 monkeypatch) -> None:
    """The tiny task's pipeline (tests/test_task.py's run: conftest's `tiny_task_run`); served queries logged
    and turned into a pool with `distill pool --from-log`; a rerun with `data.extra_pool` labels them after
    the task's own, retrains, and the serving stage keeps the deployed student when the new one does not beat
    it on the devset -- the same devset, since the pool comes after the queries curation draws it from. Then,
    with the gate off, the new student is deployed. Minutes on 2 cores."""
    from tests.test_task import TINY_RUN_SETTINGS, TINY_RUN_SIZES, TOPICS, write_tiny_task

    from distill import pipeline
    from distill.cli import main
    from distill.report import load_report
    from distill.serving.request_log import RequestLog, RequestLogArgs, RequestRecord

    # Run 1, the shared tiny run (this test goes on in its artifact directory): nothing deployed before, so
    # the gate deployed the first student and recorded it.
    art, data_dir = tiny_task_run.artifacts, tiny_task_run.data_dir
    monkeypatch.setenv("DISTILL_ARTIFACTS_DIR", str(art))
    monkeypatch.setenv("DISTILL_DATA_DIR", str(data_dir))
    monkeypatch.delenv("BANKING77_DIR", raising=False)
    sizes, settings = TINY_RUN_SIZES, TINY_RUN_SETTINGS
    profile, cfg, report = tiny_task_run.profile, tiny_task_run.cfg, tiny_task_run.report
    assert report["serving"]["gate"]["deploy"] == "new"
    first = read_deployed(art / "serving" / "deployed.json")
    assert first is not None and first.config and first.missing() is None
    devset = read_jsonl(art / "curation" / "devset.jsonl")

    # Served traffic: new wordings (and a test query and a repeat, which the pool leaves out) -> pool.jsonl.
    new = [f"Is there a beginners' guide to {s}?" for subjects in TOPICS.values() for s in subjects[:2]]
    log = RequestLog(RequestLogArgs(path=str(tmp_path / "requests.jsonl")))
    test_query = read_jsonl(art / "data" / "test.jsonl")[0]["text"]
    for i, q in enumerate([*new, test_query, new[0].upper()]):
        log.append(RequestRecord(time=1000.0 + i, query=q, label="cooking", model=cfg.finetune.finetuned_model))
    pool = tmp_path / "pool.jsonl"
    assert main(["pool", "--from-log", str(tmp_path / "requests.jsonl"), "--profile", str(profile),
                 "--out", str(pool)]) == 0
    assert sorted(r["text"] for r in read_jsonl(pool)) == sorted(new)

    # A deployed student no new one can beat on this devset (a tie keeps it too): the rerun must keep it.
    write_deployed(art / "serving" / "deployed.json", first.model_copy(update={"devset_score": 1.0}))

    # Run 2: the pool is labeled after the task's 40 queries; the devset is the same; the gate keeps the first
    # student, served from its copies, and says so. (One more step: another adapter for sure, so the gate
    # compares two students rather than finding the same one.)
    settings = {**settings, "finetune": {"training": {"max_steps": 3}}}
    profile = write_tiny_task(data_dir, data={**sizes, "extra_pool": str(pool)}, **settings)
    cfg = pipeline.run(str(profile))
    report = load_report(cfg)
    assert report["data"]["extra_pool"]["added"] == len(new) and report["data"]["to_label"] == 40 + len(new)
    assert report["teacher"]["labeled"] == 40 + len(new)
    labeled = [r["text"] for r in read_jsonl(art / "teacher" / "labels.jsonl")]
    assert set(new) <= set(labeled)
    assert read_jsonl(art / "curation" / "devset.jsonl") == devset
    s = report["serving"]
    assert s["gate"]["deploy"] == "deployed" and s["gate"]["devset_fingerprint"] == first.devset_fingerprint
    assert s["config"] == first.config and s["ok"] == s["queries"] > 0
    assert read_deployed(art / "serving" / "deployed.json").identity == first.identity
    rows = dict(summary_rows(report))
    assert "kept the deployed" in " ".join(rows) and "does not beat" in " ".join(rows.values())

    # Run 3, the gate off: the same stages are current; serving deploys this run's student and records it.
    profile = write_tiny_task(data_dir, data={**sizes, "extra_pool": str(pool)},
                              **{**settings, "serving": {"sample_queries": 4, "deploy_gate": "off"}})
    cfg = pipeline.run(str(profile))
    s = load_report(cfg)["serving"]
    assert s["gate"]["deploy"] == "new" and s["config"] == str(art / "deploy_dspy.yaml")
    now = read_deployed(art / "serving" / "deployed.json")
    assert now.identity != first.identity and now.identity == s["deployed"]["identity"]
