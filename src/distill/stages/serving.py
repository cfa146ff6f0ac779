"""The serving stage: the program and its LLM as one Serve deployment, classifying test queries over HTTP.

With `cascade.enabled` and a threshold from the cascade stage, `/classify_intent` is the cascade
(`serving.cascade_deploy_config`): the student first, below the threshold the teacher program app, deployed
as its own Serve application beside it (`distill.teacher_app`); the manifest then counts who answered.
Otherwise the program app alone (`serving.deploy_config`), as before.

With `serving.deploy_gate: devset` (the default) a new student is deployed only if it beats the deployed one
on the devset (`distill.stages.deploy_gate`); otherwise the deployed one is served again, from its copies.

It always runs (a deployment is live state, not an artifact); its manifest records what it measured.
"""

from __future__ import annotations

import os
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import yaml

from distill.config import Config, save_config
from distill.data.dataset import DATA_DIR_ENV, TaskData, write_jsonl
from distill.errors import DistillError
from distill.program import DeployParams
from distill.serving.common import parse_client_keys
from distill.serving.control import (
    forward_env_names,
    load_serve_config,
    shutdown,
    start_serve_config,
    wait_until_healthy,
    wait_until_running,
)
from distill.serving.deploy import (
    CASCADE_APP,
    PROGRAM_APP,
    TEACHER_APP,
    model_entries,
    template_serve_config,
)
from distill.stages.base import Manifest, Stage, code_version, fingerprint, require, serve_config_identity
from distill.stages.cascade import CascadeManifest, CascadeStage
from distill.stages.deploy_gate import (
    DEPLOYED_FILE,
    SNAPSHOTS_DIR,
    Candidate,
    DeployedStudent,
    GateDecision,
    copy_into,
    decide,
    devset_fingerprint,
    prune_snapshots,
    read_deployed,
    student_identity,
    write_deployed,
)
from distill.stages.evaluation import EvaluationStage
from distill.stages.finetune import FinetuneStage
from distill.stages.teacher import TeacherStage


class ServingManifest(Manifest):
    url: str
    config: str
    model: str | None
    queries: int
    ok: int
    valid_share: float
    accuracy: float
    p50_latency_ms: float | None
    # The cascade (None: the program app alone): who answered the queries above, how many answers carried a
    # confidence, and the teacher's failures (the student's answer was returned, marked).
    cascade: bool = False
    answered_by: dict[str, int] | None = None
    teacher_sources: dict[str, int] | None = None  # of the teacher's answers: vote | llm
    with_confidence: int | None = None
    fallback_errors: dict[str, int] | None = None
    threshold: float | None = None
    answers: str | None = None  # answers.jsonl: every query's answer as served
    # The deploy gate: what was deployed (this run's student, or the one deployed before) and why; and the
    # student now deployed (None: an older manifest).
    gate: GateDecision | None = None
    deployed: DeployedStudent | None = None


def program_app_env(path: Path) -> tuple[list[str], dict[str, str]]:
    """Variables the program apps read (forwarded to their replicas) and the client's auth header for
    `/classify_intent`: the shared key's, else, with only named clients' keys set, the first named client's."""
    names: list[str] = []
    headers: dict[str, str] = {}
    for app in yaml.safe_load(path.read_text())["applications"]:
        args = app.get("args", {})
        if app["import_path"] == TEACHER_APP:
            names += [args[k] for k in ("api_key_env", "api_key_fallback_env", "api_keys_env", "llm_api_key_env",
                                        "llm_api_key_fallback_env", "llm_api_base_env") if args.get(k)]
        if app["import_path"] in (PROGRAM_APP, CASCADE_APP):
            names += [args[k] for k in ("api_key_env", "api_keys_env", "llm_api_key_env", "llm_api_base_env")
                      if args.get(k)]
            names += [v for k, v in (args.get("cascade") or {}).items() if k.startswith("teacher_key") and v]
            key = os.environ.get(args.get("api_key_env") or "")
            named = os.environ.get(args.get("api_keys_env") or "", "").strip()
            if not key and named:
                key = next(iter(parse_client_keys(named, args["api_keys_env"]).values()))
            if key:
                headers = {"Authorization": f"Bearer {key}"}
    return names, headers


class ServingStage(Stage[ServingManifest]):
    name = "serving"
    title = "serving: POST /classify_intent"
    manifest_type = ServingManifest
    # cascade and teacher: read only when the cascade is deployed (the threshold; the teacher app rebuilds the
    # teacher from the teacher stage's manifest).
    upstream = ("eval", "finetune", "cascade", "teacher")

    @classmethod
    def build(cls, graph: Any) -> "ServingStage":
        return cls(graph.cfg, graph.data, graph.stage("eval"), graph.stage("finetune"),
                   graph.options.get("keep_running", False), cascade=graph.stage("cascade"),
                   teacher=graph.stage("teacher"))

    def __init__(self, cfg: Config, data: TaskData, evaluation: EvaluationStage, finetune: FinetuneStage,
                 keep_running: bool = False, cascade: CascadeStage | None = None,
                 teacher: TeacherStage | None = None) -> None:
        super().__init__(cfg)
        self.data, self.evaluation, self.finetune, self.keep_running = data, evaluation, finetune, keep_running
        self.cascade, self.teacher = cascade, teacher

    def cascade_manifest(self) -> CascadeManifest | None:
        """The cascade stage's manifest when the cascade is to be deployed: `cascade.enabled`, and a threshold
        chosen by a current cascade stage (for the student being deployed, under the profile's cascade settings)."""
        if not self.cfg.cascade.enabled or self.cascade is None or self.teacher is None:
            return None
        m = self.cascade.load()
        if m is None or m.result is None or not self.cascade.is_current():
            return None
        return m

    def inputs(self) -> dict[str, str]:
        out = {"eval": require(self.evaluation.load(), "evaluation").fingerprint}
        if (c := self.cascade_manifest()) is not None and self.teacher is not None:
            out["cascade"] = c.fingerprint
            out["teacher"] = require(self.teacher.load(), "teacher").fingerprint
        return out

    def source_config(self) -> str:
        """The committed deploy config this run deploys: the cascade's, or the program app's."""
        s = self.cfg.serving
        return s.cascade_deploy_config if self.cascade_manifest() is not None else s.deploy_config

    def fingerprint(self) -> str:
        return fingerprint(self.inputs(), serve_config_identity(self.cfg, self.source_config()),
                           code_version("distill.serving"))

    def is_current(self) -> bool:
        return False

    def deploy_config(self, cascade: bool | None = None) -> Path:
        """The profile's multi-app Serve config with this run's artifact paths filled in: the cascade's when
        it is deployed (`cascade`: None, as the stage decides; False: the program app alone). This run's
        student, whatever the deploy gate decides (the deployed one's config: `deployed.json`)."""
        require(self.evaluation.load(), "evaluation")
        ft = require(self.finetune.load(), "finetune")
        cm = self.cascade_manifest() if cascade is not False else None
        if cascade and cm is None:
            raise DistillError("no cascade to deploy: cascade.enabled is false, or the cascade stage has not chosen "
                               "a threshold for the current evaluation (run the cascade stage)")
        params, profile = None, None
        if cm is not None and cm.result is not None:
            params, profile = Path(cm.result.cascade_params), self.profile_snapshot()
            self.check_teacher_llm(self.cfg.serving.cascade_deploy_config)
        return self._template(self.cfg.artifacts / "deploy_dspy.yaml", ft.adapter, self.evaluation.deploy_params_path,
                              params, profile)

    def _template(self, out: Path, adapter: str | None, deploy_params: Path, cascade_params: Path | None,
                  profile: Path | None) -> Path:
        """The deploy config (the cascade's when `cascade_params` is given) with these files filled in."""
        s, ft = self.cfg.serving, require(self.finetune.load(), "finetune")
        teacher = {"profile": str(profile), "artifacts_dir": str(self.cfg.artifacts)} if profile else None
        return template_serve_config(
            s.cascade_deploy_config if cascade_params is not None else s.deploy_config, out,
            base_model=self.cfg.models.student.model, finetuned_model=ft.model, adapter=adapter,
            lora_storage=self.cfg.finetune.adapter_storage, deploy_params=deploy_params,
            cascade_params=cascade_params, teacher=teacher)

    # --- the deploy gate (distill.stages.deploy_gate) ---------------------------------------------------

    @property
    def deployed_path(self) -> Path:
        return self.dir / DEPLOYED_FILE

    def candidate(self) -> Candidate:
        """This run's student as the gate compares it: the variant the evaluation stage chose on the devset."""
        ev = require(self.evaluation.load(), "evaluation")
        ft = require(self.finetune.load(), "finetune")
        params = DeployParams.load(self.evaluation.deploy_params_path)
        dev = self.evaluation.curation.splits()["devset"]
        return Candidate(
            identity=student_identity(params.model, params.kind, params.variant, Path(params.program_path),
                                      params.program.model_dump(), ft.adapter),
            kind=ev.best.kind, variant=ev.best.variant, model=ev.best.model, devset_score=ev.best.devset_score,
            devset_fingerprint=devset_fingerprint(dev), devset_size=len(dev))

    def gate(self) -> GateDecision:
        return decide(self.cfg.serving.deploy_gate, self.candidate(), read_deployed(self.deployed_path))

    def record_deployment(self, new: Candidate, cascade: bool) -> DeployedStudent:
        """Copy what this run deployed to `serving/deployed/<identity>/` with a Serve config pointing at the
        copies (the next run's evaluation and finetune write over the originals), and record it."""
        ft = require(self.finetune.load(), "finetune")
        dest = self.dir / SNAPSHOTS_DIR / new.identity
        record: dict[str, Any] = {**new.model_dump(), "cascade": cascade,
                                  "deployed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if ft.published:  # ray.serve.llm loads it by name from object storage, where the next finetune writes
            record.update(config=None, not_restorable=f"its adapter is published to {ft.published}, which the next "
                                                      "finetune overwrites")
        else:
            params = DeployParams.load(self.evaluation.deploy_params_path)
            sources = {"program": Path(params.program_path), "adapter": Path(ft.adapter)}
            cm = self.cascade_manifest() if cascade else None
            if cm is not None and cm.result is not None:  # the student's calibration and threshold
                sources["cascade_params"] = Path(cm.result.cascade_params)
            copies = copy_into(dest, sources)
            copies["deploy_params"] = params.model_copy(update={"program_path": str(copies["program"])}).save(
                dest / "deploy_params.json")
            # The cascade's teacher app is not copied: it rebuilds the current teacher stage's teacher from the
            # profile this stage writes on every run (serving/profile.yaml), which must match that stage's data.
            config = self._template(dest / "deploy.yaml", str(copies["adapter"]), copies["deploy_params"],
                                    copies.get("cascade_params"), self.profile_snapshot() if cm is not None else None)
            record.update(config=str(config), files={k: str(v) for k, v in sorted(copies.items())})
        deployed = DeployedStudent(**record)
        write_deployed(self.deployed_path, deployed)
        prune_snapshots(self.dir / SNAPSHOTS_DIR, keep=new.identity)
        return deployed

    def profile_snapshot(self) -> Path:
        """This run's profile, written whole, for the teacher app's replicas to rebuild the teacher from."""
        return save_config(self.cfg, self.dir / "profile.yaml")

    def check_teacher_llm(self, source: str) -> None:
        """The cascade config's LLM application must serve the teacher's model as the teacher stage's endpoint
        served it, or the served teacher would not be the one that labeled: the same llama.cpp model entry
        (local), the same ray.serve.llm LLMConfig but for its deployment_config (cluster:
        `distill.serving.deploy.model_entries`)."""
        t = self.cfg.models.teacher
        ours = model_entries(load_serve_config(self.cfg.path(source)), t.model)
        if not ours:
            raise DistillError(f"{source}: no LLM application serves the teacher's model {t.model!r}")
        theirs = model_entries(load_serve_config(self.cfg.path(t.serve_config or "")), t.model)
        if theirs and ours[0] != theirs[0]:
            differ = "; ".join(f"{k}: {ours[0].get(k)} vs {theirs[0].get(k)}" for k in sorted({*ours[0], *theirs[0]})
                               if ours[0].get(k) != theirs[0].get(k))
            raise DistillError(f"{source} serves the teacher's model {t.model!r} otherwise than {t.serve_config} "
                               f"(the endpoint it labeled with): {differ}")

    def run(self) -> ServingManifest:
        """With `keep_running` (the notebook) the deployment stays up for you to query; `shutdown()` ends it.
        On any failure it is torn down before the error propagates."""
        cfg = self.cfg
        new = self.candidate()
        decision = decide(cfg.serving.deploy_gate, new, previous := read_deployed(self.deployed_path))
        print(decision.line())
        if decision.deploy == "deployed":
            # The student deployed before, served again as it was (its cascade, if it had one), from its copies.
            assert previous is not None and previous.config is not None  # decide() keeps only a servable one
            path, cascade = Path(previous.config), previous.cascade
            labels = set(DeployParams.load(previous.files["deploy_params"]).labels)
            if cascade:  # its teacher app reads this run's profile (the current teacher's data and settings)
                self.profile_snapshot()
        else:
            labels = set(DeployParams.load(self.evaluation.deploy_params_path).labels)
            cascade = self.cascade_manifest() is not None
            if cfg.cascade.enabled and not cascade:
                print("cascade.enabled, but no current cascade stage has chosen a threshold: the student alone is "
                      "deployed")
            path = self.deploy_config()
        env_names, headers = program_app_env(path)
        if cascade:  # the teacher app's replicas read the task's data (the gold examples)
            env_names += [v for v in (cfg.task.source.dir_env, DATA_DIR_ENV) if v]
        url = cfg.serving.url
        try:
            names = start_serve_config(path, forward_env=[*forward_env_names(cfg), *env_names])
            if cascade:  # the teacher's worker rebuilds the teacher (data, embedder): ready before the first query
                wait_until_running(names, cfg.serving.timeout_s)
            health = wait_until_healthy(f"{url}/healthz", cfg.serving.timeout_s, headers)
            rows = []
            with httpx.Client(timeout=120, headers=headers) as client:
                for ex in self.data.test[: cfg.serving.sample_queries]:
                    r = client.post(url, json={"query": ex.text})
                    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                    rows.append({"text": ex.text, "status": r.status_code, "label": body.get("label"), "gold": ex.label,
                                 "latency_ms": body.get("latency_ms"),
                                 **{k: body.get(k) for k in ("confidence", "answered_by", "student_label",
                                                             "teacher_source", "threshold", "fallback_error")
                                    if k in body}})
        except BaseException:
            shutdown()
            raise
        if not self.keep_running:
            shutdown()
        # Recorded once the deployment answered: a deployment that failed never becomes the one to beat.
        deployed = self.record_deployment(new, cascade) if decision.deploy == "new" else previous
        ok = [r for r in rows if r["status"] == 200]
        answers = self.dir / "answers.jsonl"
        write_jsonl(answers, rows)
        extra: dict[str, Any] = {}
        if cascade:
            extra = {"cascade": True, "answered_by": _count(r.get("answered_by") for r in ok),
                     "teacher_sources": _count(r.get("teacher_source") for r in ok if r.get("answered_by") == "teacher"),
                     "with_confidence": sum(r.get("confidence") is not None for r in ok),
                     "fallback_errors": _count(r.get("fallback_error") for r in ok if r.get("fallback_error")),
                     "threshold": next((r["threshold"] for r in ok if r.get("threshold") is not None), None)}
        m = ServingManifest(
            fingerprint=self.fingerprint(), url=url, config=str(path), model=health.get("model"), queries=len(rows),
            ok=len(ok), valid_share=round(sum(r["label"] in labels for r in ok) / max(1, len(rows)), 4),
            accuracy=round(sum(r["label"] == r["gold"] for r in ok) / max(1, len(rows)), 4),
            p50_latency_ms=round(statistics.median(r["latency_ms"] for r in ok), 1) if ok else None,
            answers=str(answers), gate=decision, deployed=deployed, **extra,
        )
        for r in rows[:5]:
            by = f", {r['answered_by']}" if r.get("answered_by") else ""
            print(f"  {r['status']} {r['label']!s:45} (true: {r['gold']}, {r['latency_ms']} ms{by})")
        print(f"{m.ok}/{m.queries} answered over HTTP, valid labels {m.valid_share:.0%}, accuracy {m.accuracy:.0%}"
              + (f"; the cascade: answered by {m.answered_by}" if cascade else "")
              + (f"; still serving at {url}" if self.keep_running else ""))
        return m


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


