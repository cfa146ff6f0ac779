"""Calibrate a pipeline run's deployed student (issue 31): its confidence on the curation devset (teacher
labels) and the test set (gold labels), the calibration and the cascade threshold fit on the devset, ECE
before/after on both, a reliability diagram of the test set.

    flock /tmp/distill-heavy.lock .venv/bin/python benchmarks/calibrate_student.py --artifacts <dir> --out docs/calibration

Brings up only the run's LLM application (from its deploy_dspy.yaml, on --port) and runs the saved program
with an LM that asks for logprobs. Writes cascade.json (what `distill.serving.cascade` reads),
calibration.json and reliability.png to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from distill.config import LMConfig
from distill.data.dataset import make_example, read_jsonl
from distill.evaluation.calibration import calibrate_student, score_confidence
from distill.lm import make_lm
from distill.program import DeployParams
from distill.serving.control import serving


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--port", type=int, default=8031)
    ap.add_argument("--method", choices=["temperature", "isotonic"], default="temperature")
    a = ap.parse_args()
    params = DeployParams.load(a.artifacts / "deploy_params.json")
    deploy = yaml.safe_load((a.artifacts / "deploy_dspy.yaml").read_text())
    llm = next(app for app in deploy["applications"] if app["import_path"] == "distill.serving.llm:build_app")
    llm["args"].pop("api_key_env", None)
    llm["args"].pop("api_key_fallback_env", None)
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": a.port},
              "applications": [{**llm, "route_prefix": "/"}]}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "llm_only.yaml"
    path.write_text(yaml.safe_dump(config))
    api_base = f"http://127.0.0.1:{a.port}/v1"
    dev = [make_example(r["text"], r["label"]) for r in read_jsonl(a.artifacts / "curation" / "devset.jsonl")]
    test = [make_example(r["text"], r["label"]) for r in read_jsonl(a.artifacts / "data" / "test.jsonl")]
    with serving(path, api_base, models=[params.model]):
        lm = make_lm(LMConfig(model=params.model, api_base=api_base, max_tokens=64), cache=False, logprobs=True)
        program = params.load_program()
        scored_dev = score_confidence(program, lm, params.program.prompt, dev)
        scored_test = score_confidence(program, lm, params.program.prompt, test)
    path.unlink()
    report, _ = calibrate_student(scored_dev, scored_test, a.out, a.method,
                                  title=f"{params.kind} {params.variant} student, test set ({len(test)} queries)")
    (a.out / "scores.json").write_text(json.dumps({"devset": scored_dev, "testset": scored_test}))
    print(report.model_dump_json(indent=2))


if __name__ == "__main__":
    main()
