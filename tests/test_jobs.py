"""A failing finetune job surfaces as an exception carrying the job's error, not a hang."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from distill.config import load_config
from distill.errors import ConfigError
from distill.serving.control import ensure_ray, shutdown
from distill.student.finetune import TrainJob, load_recipe
from distill.student.jobs import JobFailed, JobStopped, load_job_config, submit_and_wait

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
    from ray.job_submission import JobStatus, JobSubmissionClient

    with pytest.raises(JobStopped, match="did not finish in 3s; stopped it") as err:
        submit_and_wait(job_server, f"{sys.executable} -c 'import time; time.sleep(60)'", timeout_s=3, on_log=None)
    assert JobSubmissionClient(job_server).get_job_status(str(err.value).split()[2]) == JobStatus.STOPPED


@slow
def test_bad_job_json_is_reported(job_server, tmp_path) -> None:
    (tmp_path / "job.json").write_text(json.dumps({"recipe": {}}))
    entry = f"{sys.executable} -m distill finetune-job --job {tmp_path / 'job.json'} --result {tmp_path / 'r.json'}"
    with pytest.raises(JobFailed, match="bad finetune job"):
        submit_and_wait(job_server, entry, timeout_s=300, on_log=None)


@slow
def test_the_log_streams_while_the_job_runs(job_server) -> None:
    seen: list[tuple[float, str]] = []
    code = "import time\nfor i in range(3):\n    print(f'line {i}', flush=True)\n    time.sleep(2)\n"
    logs = submit_and_wait(job_server, f"{sys.executable} -c {shlex.quote(code)}", timeout_s=120,
                           on_log=lambda text: seen.append((time.monotonic(), text)))
    assert [line for _, text in seen for line in text.splitlines() if line.startswith("line")] == \
        ["line 0", "line 1", "line 2"]
    assert len(seen) >= 2 and seen[-1][0] - seen[0][0] > 2  # chunks as they came, not one fetch at the end
    assert "line 2" in logs


@slow
def test_a_stop_request_stops_the_job_and_says_so(job_server, capsys) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    stop = threading.Event()
    threading.Timer(5, stop.set).start()
    with pytest.raises(JobStopped, match="stop requested") as err:
        submit_and_wait(job_server, f"{sys.executable} -c 'import time; time.sleep(120)'", timeout_s=120,
                        on_log=None, stop=stop, submission_id=f"distill-test-stop-{uuid.uuid4().hex[:6]}")
    job_id = str(err.value).split()[2]
    assert JobSubmissionClient(job_server).get_job_status(job_id) == JobStatus.STOPPED
    assert f"stopping Ray job {job_id}" in capsys.readouterr().err


# What the interrupted process runs: the finetune stage's own call (DSPy's LM.finetune with our provider),
# a real finetune job, long enough to be interrupted while it trains.
_FINETUNE = """
import sys
from distill.config import load_config
from distill.lm import make_lm
from distill.stages.finetune import FinetuneCall
from distill.student.provider import RayJobProvider

cfg = load_config("local_ci")
ft = cfg.finetune
row = {"messages": [{"role": "user", "content": "where is my card?"}, {"role": "assistant", "content": "card_arrival"}]}
FinetuneCall(
    lm=make_lm(cfg.models.student, provider=RayJobProvider()), train_data=[row] * 32,
    train_kwargs={"recipe": str(cfg.path(ft.recipe)), "overrides": {"max_steps": 10000}, "output_dir": sys.argv[2],
                  "job_config": str(cfg.path(ft.job_config)), "address": sys.argv[1], "python": None,
                  "finetuned_model": ft.finetuned_model, "timeout_s": 900, "job_storage": None},
).run()
"""


@slow
def test_ctrl_c_during_a_finetune_stops_its_ray_job(job_server, tmp_path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    proc = subprocess.Popen([sys.executable, "-c", _FINETUNE, job_server, str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = JobSubmissionClient(job_server)
    try:
        job_id = None
        for line in proc.stdout:  # "finetune: Ray job <id>, its inputs and outputs under ..."
            if line.startswith("finetune: Ray job "):
                job_id = line.split()[3].rstrip(",")
                break
        assert job_id, "the finetune printed no job id"

        def training() -> bool:  # the job runs and its Ray Train worker is up: Ctrl-C lands mid-finetune
            try:
                status = client.get_job_status(job_id)
            except RuntimeError:  # printed just before submission: not there yet
                return False
            workers = list_actors(address=job_server, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
            return status == JobStatus.RUNNING and any("RayTrainWorker" in (a.class_name or "") for a in workers)

        deadline = time.monotonic() + 300
        while not training():
            assert time.monotonic() < deadline and proc.poll() is None, "the finetune never started training"
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # no hang: DSPy's finetune thread ends too
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert f"stopping Ray job {job_id} (interrupted" in err and "STOPPED" in err
    listed = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "list", "--address", job_server],
                            capture_output=True, text=True, check=True).stdout
    [entry] = [e for e in listed.split("JobDetails(") if f"submission_id='{job_id}'" in e]
    assert "status=<JobStatus.STOPPED" in entry
    alive = list_actors(address=job_server, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    assert not [a for a in alive if "RayTrainWorker" in (a.class_name or "") or "TrainController" in (a.class_name or "")]
