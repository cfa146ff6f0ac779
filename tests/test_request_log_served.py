"""The request log on the real deployment: `local_deploy_dspy.yaml` on Ray Serve (program app + llama.cpp LLM
app, the base SmolLM2 student with a zero-shot saved program), the log switched on in the program app's
args; queries over HTTP, then `distill pool --from-log` on what it wrote."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
import yaml

from distill.cli import main
from distill.config import load_config
from distill.data.dataset import prepare_data, read_jsonl
from distill.program import DeployParams, IntentClassificationModule, ProgramParams
from distill.serving.control import shutdown, start_serve_config, wait_until_healthy
from distill.serving.request_log import read_request_log
from distill.student.curation import normalize_text

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000/classify_intent"
KEY = "test-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {KEY}"}
BASE = "smollm2-135m-student"


def test_served_traffic_becomes_a_deduplicated_decontaminated_ranked_pool(tmp_path, monkeypatch,
                                                                         banking77_dir) -> None:
    monkeypatch.setenv("BANKING77_DIR", str(banking77_dir))
    monkeypatch.setenv("DISTILL_API_KEY", KEY)
    monkeypatch.delenv("DISTILL_LLM_API_KEY", raising=False)
    cfg = load_config("local_ci")
    data = prepare_data(cfg)
    program_path = tmp_path / "program.json"
    IntentClassificationModule(data.labels).save(str(program_path))
    params = DeployParams(model=BASE, program_path=str(program_path), labels=data.labels, variant="zero-shot",
                          kind="base", test_score=0.0, program=ProgramParams(prompt="full"))
    params.save(tmp_path / "deploy_params.json")
    raw = yaml.safe_load((ROOT / "local_deploy_dspy.yaml").read_text())
    log_path = tmp_path / "logs" / "requests.jsonl"
    for app in raw["applications"]:
        if app["name"] == "classify-intent":
            app["args"]["deploy_params"] = str(tmp_path / "deploy_params.json")
            app["args"]["request_log"] = {"path": str(log_path)}
        else:  # the base student only: no finetuned adapter in this test
            app["args"]["models"] = [m for m in app["args"]["models"] if m["name"] == BASE]
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump(raw))

    fresh = [ex.text for ex in data.unlabeled[:6]]
    sent = fresh + [fresh[0].upper() + "!!", fresh[1] + " ", data.full_test[0].text, data.gold[0].text]
    try:
        start_serve_config(config, forward_env=["DISTILL_API_KEY"])
        wait_until_healthy(f"{URL}/healthz", 300, AUTH)
        answers = []
        for q in sent:
            r = httpx.post(URL, json={"query": q}, headers=AUTH, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json())
        assert httpx.post(URL, json={"query": "no key"}, timeout=60).status_code == 401
        assert httpx.post(URL, json={"query": " "}, headers=AUTH, timeout=60).status_code == 422
    finally:
        shutdown()

    text = log_path.read_text()
    assert KEY not in text and "Bearer" not in text
    records, torn = read_request_log(log_path)
    assert torn == 0
    assert [(r.query, r.label, r.model) for r in records] == [
        (q.strip(), a["label"], BASE) for q, a in zip(sent, answers)]  # every answer, no refusal

    out = tmp_path / "pool.jsonl"
    assert main(["pool", "--from-log", str(log_path), "--profile", "local_ci", "--out", str(out)]) == 0
    pool = read_jsonl(out)
    assert sorted(p["text"] for p in pool) == sorted(fresh)  # duplicates once; test and gold queries gone
    assert {p["text"]: p["served"] for p in pool}[fresh[0]] == 2
    assert normalize_text(data.full_test[0].text) not in {normalize_text(p["text"]) for p in pool}
    scores = [p["score"] for p in pool]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
