"""The serving stage: the program and its LLM as one Serve deployment, classifying test queries over HTTP.

With `cascade.enabled` and a threshold from the cascade stage, `/classify_intent` is the cascade
(`serving.cascade_deploy_config`): the student first, below the threshold the teacher program app, deployed
as its own Serve application beside it (`distill.teacher_app`); the manifest then counts who answered.
Otherwise the program app alone (`serving.deploy_config`), as before.

It always runs (a deployment is live state, not an artifact); its manifest records what it measured.
"""

from __future__ import annotations

import os
import statistics
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
        it is deployed (`cascade`: None, as the stage decides; False: the program app alone)."""
        require(self.evaluation.load(), "evaluation")
        ft = require(self.finetune.load(), "finetune")
        cm = self.cascade_manifest() if cascade is not False else None
        if cascade and cm is None:
            raise DistillError("no cascade to deploy: cascade.enabled is false, or the cascade stage has not chosen "
                               "a threshold for the current evaluation (run the cascade stage)")
        source, teacher, params = self.cfg.serving.deploy_config, None, None
        if cm is not None and cm.result is not None:
            source, params = self.cfg.serving.cascade_deploy_config, cm.result.cascade_params
            teacher = {"profile": str(self.profile_snapshot()), "artifacts_dir": str(self.cfg.artifacts)}
            self.check_teacher_llm(source)
        return template_serve_config(
            source, self.cfg.artifacts / "deploy_dspy.yaml",
            base_model=self.cfg.models.student.model, finetuned_model=ft.model, adapter=ft.adapter,
            lora_storage=self.cfg.finetune.adapter_storage, deploy_params=self.evaluation.deploy_params_path,
            cascade_params=params, teacher=teacher)

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
        labels = set(DeployParams.load(self.evaluation.deploy_params_path).labels)
        cascade = self.cascade_manifest() is not None
        if cfg.cascade.enabled and not cascade:
            print("cascade.enabled, but no current cascade stage has chosen a threshold: the student alone is deployed")
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
            answers=str(answers), **extra,
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


