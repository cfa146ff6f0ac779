"""The CLI as users run it: JSON out on success, one error line and a non-zero exit on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "distill", *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120
    )


def test_data_command(banking77_dir) -> None:
    r = run_cli("data", "--profile", "local", env={"BANKING77_DIR": str(banking77_dir)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["train"], out["test"], out["gold"]) == (4171, 1000, 100)
    assert len(out["labels"]) == 25 and out["labels"][0] == "card_payment_fee_charged"
    assert sum(out["label_counts"].values()) == 4171


def _assert_one_clear_line(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_data_dir(tmp_path) -> None:
    r = run_cli("data", env={"BANKING77_DIR": str(tmp_path / "absent")})
    _assert_one_clear_line(r, "does not exist", "absent")


def test_data_dir_without_csvs(tmp_path) -> None:
    r = run_cli("data", env={"BANKING77_DIR": str(tmp_path)})
    _assert_one_clear_line(r, "train.csv is missing")


@pytest.mark.parametrize(
    "content,needle",
    [("text,label\nhello,card_arrival\n", "missing column(s) category"), ("", "missing column(s) text, category")],
)
def test_malformed_csv(tmp_path, content: str, needle: str) -> None:
    (tmp_path / "train.csv").write_text(content)
    (tmp_path / "test.csv").write_text("text,category\nhi,card_arrival\n")
    r = run_cli("data", env={"BANKING77_DIR": str(tmp_path)})
    _assert_one_clear_line(r, needle)


def test_unknown_config_key(tmp_path, banking77_dir) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("extends: local\nseeed: 3\n")
    r = run_cli("data", "--profile", str(cfg), env={"BANKING77_DIR": str(banking77_dir)})
    _assert_one_clear_line(r, "unknown key 'seeed'")


def test_check_env_never_prints_secrets(banking77_dir) -> None:
    secret = "hf_do_not_print_me_123"
    r = run_cli("check-env", "--profile", "cluster", env={"HF_TOKEN": secret, "BANKING77_DIR": str(banking77_dir)})
    assert secret not in r.stdout + r.stderr
    assert "[ok] HF_TOKEN: set" in r.stdout
    r = run_cli("check-env", "--profile", "cluster", env={"HF_TOKEN": "", "BANKING77_DIR": str(banking77_dir)})
    assert r.returncode == 1 and "[MISSING] HF_TOKEN" in r.stdout
