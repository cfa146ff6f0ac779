"""docs/serving.md says what the code does: its limits are the code's, and its attack numbers are rendered
from the committed benchmark result, never typed by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

from distill.serving.common import MIN_CLIENT_KEY_CHARS
from distill.serving.grammar import LIMITS
from distill.serving.llm import LLMAppArgs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "serving.md"


def _attack_report():
    spec = importlib.util.spec_from_file_location("attack_report", ROOT / "benchmarks" / "attack_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_grammar_limits_are_the_codes() -> None:
    text = DOC.read_text()
    for phrase in (f"0..{LIMITS.max_repeat}", f"m, n <= {LIMITS.max_repeat}", f"at most {LIMITS.max_pattern_chars} characters",
                   f"1 to {LIMITS.max_enum} values", f"at most {LIMITS.max_literal_chars} characters as JSON",
                   f"{LIMITS.max_depth} levels", f"{LIMITS.max_schema_bytes >> 10} KiB / {LIMITS.max_grammar_bytes >> 10} KiB"):
        assert phrase in text, phrase
    assert f"`body_timeout_s` ({LLMAppArgs.model_fields['body_timeout_s'].default:g} s)" in text


def test_the_documented_client_share_is_the_shipped_configs() -> None:
    apps = yaml.safe_load((ROOT / "local_deploy_dspy.yaml").read_text())["applications"]
    args = next(a["args"] for a in apps if a["import_path"] == "distill.serving.app:build_app")
    share = f"`max_ongoing_per_client` (program app arg; {args['max_ongoing_per_client']} in `local_deploy_dspy.yaml`"
    assert share in DOC.read_text()
    assert f"least {MIN_CLIENT_KEY_CHARS} characters" in DOC.read_text()


def test_the_attack_numbers_are_rendered_from_the_committed_result() -> None:
    report = _attack_report()
    results = [json.loads((ROOT / "docs" / name).read_text()) for name in ("bench_attack.json", "bench_attack_llm_key.json")]
    assert DOC.read_text() == report.update(DOC, results)
    assert [r["attacker_key"] for r in results] == ["classifier", "llm"]
    assert all(r["mode"] == "attack" and r["classify"]["requests"] > 0 for r in results)


def test_the_cascade_benchmark_is_rendered_from_the_committed_result() -> None:
    spec = importlib.util.spec_from_file_location("cascade_bench_report", ROOT / "benchmarks" / "cascade_bench_report.py")
    assert spec and spec.loader
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    result = json.loads((ROOT / "docs" / "bench_cascade.json").read_text())
    doc = (ROOT / "docs" / "cascade.md").read_text()
    assert f"{report.BEGIN}\n{report.render(result)}\n{report.END}" in doc
    # it says what it ran on
    assert result["mode"] == "cascade" and result["ran_on"]["profile"] and result["ran_on"]["artifacts"]
    assert sum(result["cascade"]["answered_by"].values()) == result["cascade"]["status_counts"]["200"]
