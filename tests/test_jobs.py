"""A failing finetune job surfaces as an exception carrying the job's error, not a hang."""

from __future__ import annotations

import json
import sys

import pytest

from distill.config import load_config
from distill.errors import ConfigError
from distill.serving.control import ensure_ray, shutdown
from distill.student.finetune import TrainJob, load_recipe
from distill.student.jobs import JobFailed, load_job_config, submit_and_wait

# Tests that take `job_server` start a real Ray job server.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def job_server():
    address = "http://" + ensure_ray(dashboard=True)
    yield address
    shutdown()


@slow
def test_missing_training_data_fails_the_job_with_its_error(job_server, tmp_path) -> None:
    cfg = load_config("local_ci")
    job = TrainJob(recipe=load_recipe(cfg.path(cfg.finetune.recipe)), train_file=str(tmp_path / "absent.jsonl"),
                   output_dir=str(tmp_path / "out"))
    (tmp_path / "job.json").write_text(job.model_dump_json())
    entry = load_job_config(cfg.path(cfg.finetune.job_config))["entrypoint"].format(
        python=sys.executable, job=tmp_path / "job.json", result=tmp_path / "result.json"
    )
    with pytest.raises(JobFailed, match="training data not found") as err:
        submit_and_wait(job_server, entry, timeout_s=300, on_log=None)
    assert "FAILED" in str(err.value)


def test_unknown_recipe_key_is_rejected_before_submission(tmp_path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("model: {hub_id: x}\nlora: {target_modules: [q_proj]}\ntraining: {epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"training\.epoch: not an SFTConfig argument"):
        load_recipe(bad)


@slow
def test_job_timeout_stops_the_job(job_server) -> None:
    with pytest.raises(JobFailed, match="did not finish"):
        submit_and_wait(job_server, f"{sys.executable} -c 'import time; time.sleep(60)'", timeout_s=3, on_log=None)


@slow
def test_bad_job_json_is_reported(job_server, tmp_path) -> None:
    (tmp_path / "job.json").write_text(json.dumps({"recipe": {}}))
    entry = f"{sys.executable} -m distill finetune-job --job {tmp_path / 'job.json'} --result {tmp_path / 'r.json'}"
    with pytest.raises(JobFailed, match="bad finetune job"):
        submit_and_wait(job_server, entry, timeout_s=300, on_log=None)
