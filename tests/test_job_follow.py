"""`submit_and_wait` against a stand-in for Ray's job client (no Ray): the log is streamed chunk by chunk,
and a timeout, a stop request or a Ctrl-C stops the job and says so. tests/test_jobs.py runs the real one."""

from __future__ import annotations

import asyncio
import threading

import pytest
from ray.job_submission import JobStatus

from distill.student import jobs
from distill.student.jobs import JobFailed, JobStopped, submit_and_wait


class FakeClient:
    """A job that logs `chunks` (one per `every` seconds), then ends in `final`; `stop_job` stops it."""

    instances: list["FakeClient"] = []

    def __init__(self, address, chunks=("a\n", "b\n"), every=0.05, final=JobStatus.SUCCEEDED, interrupt=False):
        self.chunks, self.every, self.final, self.interrupt = list(chunks), every, final, interrupt
        self.status, self.stopped, self.submitted = JobStatus.PENDING, False, {}
        FakeClient.instances.append(self)

    def submit_job(self, **kw):
        self.submitted = kw
        self.status = JobStatus.RUNNING
        return kw.get("submission_id") or "raysubmit_fake"

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            await asyncio.sleep(self.every)
            if self.interrupt:
                raise KeyboardInterrupt
            if self.stopped:
                return
            yield chunk
        while self.final is None and not self.stopped:  # runs until stopped
            await asyncio.sleep(0.05)
        if not self.stopped:
            self.status = self.final

    def get_job_status(self, job_id):
        return self.status

    def stop_job(self, job_id):
        self.stopped, self.status = True, JobStatus.STOPPED
        return True

    def get_job_info(self, job_id):
        class Info:
            message = "Job entrypoint command failed with exit code 2"
        return Info()


@pytest.fixture
def client(monkeypatch):
    FakeClient.instances.clear()

    def use(**kw):
        import ray.job_submission

        monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: FakeClient(address, **kw))

    return use


def test_the_log_is_passed_on_chunk_by_chunk(client) -> None:
    client(chunks=["one\n", "two\nthree\n"])
    seen: list[str] = []
    out = submit_and_wait("http://x", "true", on_log=seen.append, submission_id="distill-1",
                          entrypoint_resources={"job_node": 1})
    assert seen == ["one", "two\nthree"] and out == "one\ntwo\nthree\n"
    assert FakeClient.instances[0].submitted["entrypoint_resources"] == {"job_node": 1}
    assert FakeClient.instances[0].submitted["submission_id"] == "distill-1"


def test_a_failed_job_raises_with_its_message_and_log_tail(client) -> None:
    client(chunks=["error: training data not found: /x\n"], final=JobStatus.FAILED)
    with pytest.raises(JobFailed, match=r"(?s)FAILED: Job entrypoint.*training data not found"):
        submit_and_wait("http://x", "false", on_log=None)


def test_a_timeout_stops_the_job_and_says_so(client, capsys) -> None:
    client(chunks=["working\n"], final=None)
    with pytest.raises(JobStopped, match=r"(?s)did not finish in 0s; stopped it \(STOPPED\).*working"):
        submit_and_wait("http://x", "sleep 100", timeout_s=0.3, on_log=None)
    assert FakeClient.instances[0].stopped
    err = capsys.readouterr().err
    assert "stopping Ray job raysubmit_fake (did not finish in 0s)" in err and "STOPPED" in err


def test_a_stop_request_from_another_thread_stops_the_job(client) -> None:
    client(chunks=[], final=None)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(JobStopped, match="stop requested"):
        submit_and_wait("http://x", "sleep 100", on_log=None, stop=stop)
    assert FakeClient.instances[0].stopped


def test_nothing_is_submitted_once_a_stop_was_requested(client) -> None:
    client()
    stop = threading.Event()
    stop.set()
    with pytest.raises(JobStopped, match="nothing submitted"):
        submit_and_wait("http://x", "true", on_log=None, stop=stop)
    assert FakeClient.instances[0].submitted == {}


def test_ctrl_c_stops_the_job_then_propagates(client, capsys) -> None:
    client(chunks=["x\n"], final=None, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        submit_and_wait("http://x", "sleep 100", on_log=None)
    assert FakeClient.instances[0].stopped
    assert "(interrupted (Ctrl-C))" in capsys.readouterr().err


def test_it_also_runs_where_an_event_loop_is_running(client) -> None:
    """A notebook cell: the log is followed from a helper thread."""
    client(chunks=["nb\n"])

    async def cell() -> str:
        return submit_and_wait("http://x", "true", on_log=None)

    assert asyncio.run(cell()) == "nb\n"


def test_job_config_keys() -> None:
    assert {"entrypoint_resources", "entrypoint_num_cpus"} <= jobs.JOB_CONFIG_KEYS


def test_ctrl_c_in_result_stops_the_job_that_dspy_s_thread_follows(client) -> None:
    """DSPy's LM.finetune follows the job in its own thread: Ctrl-C reaches the thread waiting in result()."""
    import concurrent.futures

    from distill.student.provider import RayTrainingJob

    class CtrlC(concurrent.futures.Future):  # after RayTrainingJob in the MRO: its super().result() lands here
        interrupted = False

        def result(self, timeout=None):
            if not CtrlC.interrupted:
                CtrlC.interrupted = True
                raise KeyboardInterrupt
            return super().result(timeout)

    class Job(RayTrainingJob, CtrlC):
        pass

    client(chunks=[], final=None)
    job = Job(thread=None, model="m")

    def follow() -> None:
        try:
            job.set_result(submit_and_wait("http://x", "sleep 100", on_log=None, stop=job.stop_requested))
        except Exception as e:  # what DSPy's thread does with an exception
            job.set_result(e)

    job.thread = threading.Thread(target=follow)
    job.thread.start()
    while not FakeClient.instances or FakeClient.instances[0].status != JobStatus.RUNNING:
        pass
    with pytest.raises(KeyboardInterrupt):
        job.result()
    assert not job.thread.is_alive() and FakeClient.instances[0].stopped
    with pytest.raises(JobStopped, match=r"interrupted \(Ctrl-C\); stopped it \(STOPPED\)"):
        job.result()
