"""The serving stage: the program and its LLM as one Serve deployment, classifying test queries over HTTP.

It always runs (a deployment is live state, not an artifact); its manifest records what it measured.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import httpx
import yaml

from distill.config import Config
from distill.data.dataset import TaskData
from distill.program import DeployParams
from distill.serving.common import parse_client_keys
from distill.serving.control import forward_env_names, shutdown, start_serve_config, wait_until_healthy
from distill.serving.deploy import PROGRAM_APP, template_serve_config
from distill.stages.base import Manifest, Stage, code_version, fingerprint, require, serve_config_identity
from distill.stages.evaluation import EvaluationStage
from distill.stages.finetune import FinetuneStage


class ServingManifest(Manifest):
    url: str
    config: str
    model: str | None
    queries: int
    ok: int
    valid_share: float
    accuracy: float
    p50_latency_ms: float | None


def program_app_env(path: Path) -> tuple[list[str], dict[str, str]]:
    """Variables the program app reads (forwarded to its replicas) and the client's auth header: the shared
    key's, else, with only named clients' keys set, the first named client's."""
    names: list[str] = []
    headers: dict[str, str] = {}
    for app in yaml.safe_load(path.read_text())["applications"]:
        if app["import_path"] == PROGRAM_APP:
            args = app.get("args", {})
            names += [args[k] for k in ("api_key_env", "api_keys_env", "llm_api_key_env", "llm_api_base_env")
                      if args.get(k)]
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
    upstream = ("eval", "finetune")

    @classmethod
    def build(cls, graph: Any) -> "ServingStage":
        return cls(graph.cfg, graph.data, graph.stage("eval"), graph.stage("finetune"),
                   graph.options.get("keep_running", False))

    def __init__(self, cfg: Config, data: TaskData, evaluation: EvaluationStage, finetune: FinetuneStage,
                 keep_running: bool = False) -> None:
        super().__init__(cfg)
        self.data, self.evaluation, self.finetune, self.keep_running = data, evaluation, finetune, keep_running

    def inputs(self) -> dict[str, str]:
        return {"eval": require(self.evaluation.load(), "evaluation").fingerprint}

    def fingerprint(self) -> str:
        return fingerprint(self.inputs(), serve_config_identity(self.cfg, self.cfg.serving.deploy_config),
                           code_version("distill.serving"))

    def is_current(self) -> bool:
        return False

    def deploy_config(self) -> Path:
        """The profile's multi-app Serve config with this run's artifact paths filled in."""
        require(self.evaluation.load(), "evaluation")
        ft = require(self.finetune.load(), "finetune")
        return template_serve_config(
            self.cfg.serving.deploy_config, self.cfg.artifacts / "deploy_dspy.yaml",
            base_model=self.cfg.models.student.model, finetuned_model=ft.model, adapter=ft.adapter,
            lora_storage=self.cfg.finetune.adapter_storage, deploy_params=self.evaluation.deploy_params_path)

    def run(self) -> ServingManifest:
        """With `keep_running` (the notebook) the deployment stays up for you to query; `shutdown()` ends it.
        On any failure it is torn down before the error propagates."""
        cfg = self.cfg
        labels = set(DeployParams.load(self.evaluation.deploy_params_path).labels)
        path = self.deploy_config()
        env_names, headers = program_app_env(path)
        url = cfg.serving.url
        try:
            start_serve_config(path, forward_env=[*forward_env_names(cfg), *env_names])
            health = wait_until_healthy(f"{url}/healthz", cfg.serving.timeout_s, headers)
            rows = []
            with httpx.Client(timeout=120, headers=headers) as client:
                for ex in self.data.test[: cfg.serving.sample_queries]:
                    r = client.post(url, json={"query": ex.text})
                    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                    rows.append({"status": r.status_code, "label": body.get("label"), "gold": ex.label,
                                 "latency_ms": body.get("latency_ms")})
        except BaseException:
            shutdown()
            raise
        if not self.keep_running:
            shutdown()
        ok = [r for r in rows if r["status"] == 200]
        m = ServingManifest(
            fingerprint=self.fingerprint(), url=url, config=str(path), model=health.get("model"), queries=len(rows),
            ok=len(ok), valid_share=round(sum(r["label"] in labels for r in ok) / max(1, len(rows)), 4),
            accuracy=round(sum(r["label"] == r["gold"] for r in ok) / max(1, len(rows)), 4),
            p50_latency_ms=round(statistics.median(r["latency_ms"] for r in ok), 1) if ok else None,
        )
        for r in rows[:5]:
            print(f"  {r['status']} {r['label']!s:45} (true: {r['gold']}, {r['latency_ms']} ms)")
        print(f"{m.ok}/{m.queries} answered over HTTP, valid labels {m.valid_share:.0%}, accuracy {m.accuracy:.0%}"
              + (f"; still serving at {url}" if self.keep_running else ""))
        return m
