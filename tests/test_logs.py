"""Quiet by default (distill.logs): where Ray's, Serve's and the finetune job's logs go, the `verbose`
setting, and the headless notebook keeping one line per progress bar. No Ray here: the slow pipeline test
checks the executed README notebook itself."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nbformat
import pytest

from distill import logs
from distill.config import load_config
from distill.notebook import execute_notebook

pytestmark = pytest.mark.usefixtures("restore_logs")  # tests here reconfigure the process-wide logs


def test_quiet_by_default_sends_logs_to_files(tmp_path: Path) -> None:
    logs.configure(tmp_path / "logs")
    assert logs.ray_init_kwargs() == {"log_to_driver": False, "logging_level": logging.WARNING}
    assert logging.getLogger("ray.serve").level == logging.WARNING
    serve = logs.serve_logging_config()
    assert serve["logs_dir"] == str(tmp_path / "logs" / "serve") and serve["enable_access_log"]
    from ray.serve.schema import LoggingConfig

    LoggingConfig(**serve)  # what serve.start / serve.run are given must be Serve's own schema

    session = tmp_path / "session"
    (session / "logs").mkdir(parents=True)
    logs.link_ray_session(str(session))
    logs.link_ray_session(str(session))  # a second Ray start in the same run replaces the link
    assert (tmp_path / "logs" / "ray").resolve() == (session / "logs").resolve()


def test_verbose_brings_the_logs_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(tmp_path / "logs", verbose=True)
    assert logs.ray_init_kwargs()["log_to_driver"] is True
    assert logging.getLogger("ray").level == logging.INFO
    log = logs.JobLog("finetune-x")
    log("step 1 loss 2.0")
    assert log.path == tmp_path / "logs" / "finetune-x.log" and log.path.read_text() == "step 1 loss 2.0\n"
    assert "step 1 loss 2.0" in capsys.readouterr().out


def test_a_quiet_job_log_only_goes_to_its_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(tmp_path / "logs")
    log = logs.JobLog("finetune-x")
    log("Disassembly of <code object>")
    assert log.path.read_text() == "Disassembly of <code object>\n" and capsys.readouterr().out == ""


def test_verbose_is_a_profile_setting_and_an_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTILL_VERBOSE", raising=False)
    assert load_config("local_ci").verbose is False
    monkeypatch.setenv("DISTILL_VERBOSE", "1")
    assert load_config("local_ci").verbose is True


def _notebook(path: Path, code: str) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('PROFILE = "local_ci"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nbformat.write(nb, path)
    return path


def _lines(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [line for o in nb.cells[-1].outputs for line in str(o.get("text", "")).splitlines()]


def test_the_executed_notebook_keeps_a_progress_bar_s_final_line(tmp_path: Path) -> None:
    # What dspy.Evaluate does: a tqdm bar on stdout whose description is refreshed on every item.
    code = ("import sys\nfrom tqdm import tqdm\n"
            "with tqdm(total=50, file=sys.stdout) as bar:\n"
            "    for i in range(50):\n"
            "        bar.set_description(f'Average Metric: {i}', refresh=True)\n"
            "        bar.update()\n"
            "print('done')")
    out = execute_notebook("local_ci", _notebook(tmp_path / "nb.ipynb", code), tmp_path / "out.ipynb")
    lines = _lines(out)
    assert len(lines) == 2 and "50/50" in lines[0] and lines[1] == "done", lines


def test_notebook_verbose_reaches_the_kernel(tmp_path: Path) -> None:
    code = "from distill.config import load_config\nprint(load_config(PROFILE).verbose)"
    nb = _notebook(tmp_path / "nb.ipynb", code)
    assert _lines(execute_notebook("local_ci", nb, tmp_path / "quiet.ipynb")) == ["False"]
    assert _lines(execute_notebook("local_ci", nb, tmp_path / "verbose.ipynb", verbose=True)) == ["True"]


def test_quiet_drops_ray_s_retry_notices_at_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve.shutdown() makes Ray's driver print '(raylet) Task ServeController.graceful_shutdown failed ...
    will be retried'; quiet sets the RayConfig setting that stops that push (a RAY_* variable Ray reads when
    it is imported), verbose takes it back, and a value the user set is left alone."""
    name = "RAY_enable_output_error_log_if_still_retry"
    monkeypatch.delenv(name, raising=False)
    logs.configure(None, verbose=True)
    logs.configure(None)
    assert os.environ[name] == "0"
    logs.configure(None, verbose=True)
    assert name not in os.environ
    monkeypatch.setenv(name, "1")
    logs.configure(None)
    logs.configure(None, verbose=True)
    assert os.environ[name] == "1"


def test_chatter_goes_to_a_log_file_unless_verbose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(tmp_path / "logs")
    with logs.chatter_to_log("bfrs") as real:
        print("Scores so far: [28.0]")
        print("progress", file=real)
    assert capsys.readouterr().out == "progress\n"
    assert (tmp_path / "logs" / "bfrs.log").read_text() == "Scores so far: [28.0]\n"
    logs.configure(tmp_path / "logs", verbose=True)
    with logs.chatter_to_log("bfrs") as real:
        print("Scores so far: [28.0]")
    assert real is None and capsys.readouterr().out == "Scores so far: [28.0]\n"
