"""A pipeline run's LLM application alone, for benchmarks that score its deployed student without the
program app in front (`benchmarks/calibrate_student.py`, `benchmarks/probes/calibration_holdout.py`)."""

from __future__ import annotations

from pathlib import Path

import yaml


def llm_only_serve_config(artifacts: Path, port: int, out: Path) -> str:
    """Write to `out` a Serve config holding only the LLM app of the run's deploy_dspy.yaml, at / on `port`,
    without API keys (bound to 127.0.0.1); return the OpenAI base URL it serves."""
    deploy = yaml.safe_load((artifacts / "deploy_dspy.yaml").read_text())
    llm = next(app for app in deploy["applications"] if app["import_path"] == "distill.serving.llm:build_app")
    llm["args"].pop("api_key_env", None)
    llm["args"].pop("api_key_fallback_env", None)
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{**llm, "route_prefix": "/"}]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config))
    return f"http://127.0.0.1:{port}/v1"
