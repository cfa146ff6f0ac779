"""The finetune job on a node that cannot see the driver's disk (issue 33), as on a real cluster.

Two Ray nodes on this machine (`distill_harness.cluster`): the head, and a job node in a mount namespace of
its own with an empty tmpfs over the driver's directory. The job is pinned to the job node with a custom
resource. A job directory on the driver's disk -- the finetune's layout before job storage -- fails there;
so does a driver-local path inside a job spec on shared storage; through object storage (a local moto S3) the
finetune runs on the job node and its adapter comes back to the driver.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from distill.config import load_config
from distill.lm import make_lm
from distill.stages.finetune import FinetuneCall
from distill.student import storage
from distill.student.finetune import TrainJob, load_recipe
from distill.student.jobs import JobFailed, load_job_config, submit_and_wait
from distill.student.provider import RayJobProvider
from distill_harness.cluster import JOB_NODE, hidden_from_node, job_node, ray_head
from distill_harness.rehearse import local_s3

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "s3://two-node-jobs"
ROWS = [{"messages": [{"role": "user", "content": f"where is my card {i}?"},
                      {"role": "assistant", "content": '{"label": "card_arrival"}'}]} for i in range(8)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    driver = tmp_path_factory.mktemp("driver")  # the driver's artifacts: hidden from the job node
    (driver / "marker").write_text("only the driver sees this")
    logs = tmp_path_factory.mktemp("logs")
    with local_s3(f"{BUCKET}/x"):  # first: both nodes inherit its endpoint, as cluster nodes have their store
        with ray_head(num_cpus=2, log=logs / "head.log") as head:
            with job_node(head, hide=[driver], log=logs / "job_node.log", num_cpus=2) as node:
                yield head, node, driver


def _pinned(tmp: Path) -> tuple[str, str]:
    """A job config pinned to the job node, and a recipe whose Train workers are pinned there too."""
    job = yaml.safe_load((ROOT / "configs/job.yaml").read_text())
    job["entrypoint_resources"] = {JOB_NODE: 1}
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    recipe = yaml.safe_load((ROOT / "configs/training/lora/smollm2-135m-cpu.yaml").read_text())
    recipe["scaling"]["resources"] = {JOB_NODE: 1}
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return str(tmp / "job.yaml"), str(tmp / "recipe.yaml")


def _call(head, tmp: Path, output_dir: Path, job_storage: str | None) -> FinetuneCall:
    cfg = load_config("local_ci")
    job_config, recipe = _pinned(tmp)
    return FinetuneCall(
        lm=make_lm(cfg.models.student, provider=RayJobProvider()), train_data=ROWS,
        train_kwargs={"recipe": recipe, "overrides": {"max_steps": 1}, "output_dir": str(output_dir),
                      "job_config": job_config, "address": head.dashboard, "python": None,
                      "finetuned_model": cfg.finetune.finetuned_model, "timeout_s": 600, "job_storage": job_storage})


def _driver_node(head, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard).get_job_info(job_id).driver_node_id or ""


def test_the_job_node_cannot_see_the_driver_s_directory(cluster) -> None:
    head, node, driver = cluster
    hidden, log = hidden_from_node(head, node, driver / "marker")
    assert hidden, log


def test_a_job_directory_on_the_driver_s_disk_fails_on_the_job_node(cluster, tmp_path) -> None:
    """The layout before job storage (spec, data and result in the stage directory): what a cluster breaks."""
    head, node, driver = cluster
    out = driver / "finetune-local-layout"
    with pytest.raises(JobFailed, match=r"bad finetune job .*job\.json") as err:
        _call(head, tmp_path, out, job_storage=None).run()
    assert (out / "job.json").is_file()  # it is there, on the driver's disk
    job_id = str(err.value).split()[2]
    assert _driver_node(head, job_id) == node.node_id


def test_a_driver_local_path_in_the_job_spec_fails_on_the_job_node(cluster, tmp_path) -> None:
    head, node, driver = cluster
    cfg = load_config("local_ci")
    data = driver / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    job_dir = storage.join(BUCKET, "jobs", storage.new_job_id("driver-local"))
    spec = TrainJob(recipe=load_recipe(cfg.path(cfg.finetune.recipe)), train_file=str(data), output_dir=job_dir)
    spec_uri = storage.write_text(storage.join(job_dir, "job.json"), spec.model_dump_json())
    entry = load_job_config(ROOT / "configs/job.yaml")["entrypoint"].format(
        python=sys.executable, job=spec_uri, result=storage.join(job_dir, "result.json"))
    with pytest.raises(JobFailed, match=f"training data not found: {data}"):
        submit_and_wait(head.dashboard, entry, timeout_s=300, on_log=None, entrypoint_resources={JOB_NODE: 1})


def test_the_finetune_runs_on_the_job_node_through_object_storage(cluster, tmp_path) -> None:
    head, node, driver = cluster
    out = driver / "finetune"
    job = _call(head, tmp_path, out, job_storage=f"{BUCKET}/jobs")
    finetuned, result = job.run()
    assert result["job_dir"].startswith(f"{BUCKET}/jobs/distill-finetune-lora-")
    assert _driver_node(head, result["ray_job_id"]) == node.node_id
    assert result["steps"] == 1
    # the job's inputs, checkpoints and result are in the job directory; the adapter came back to the driver
    for name in ("job.json", "train.jsonl", "result.json"):
        assert storage.exists(storage.join(result["job_dir"], name)), name
    assert result["adapter_uri"].startswith(result["job_dir"]) and storage.exists(result["adapter_uri"])
    assert Path(result["adapter_dir"]) == out / "adapter" and (out / "adapter" / "adapter_config.json").is_file()
    assert Path(result["adapter_gguf"]) == out / "adapter.gguf" and (out / "adapter.gguf").stat().st_size > 0
    assert json.loads((out / "result.json").read_text())["ray_job_id"] == result["ray_job_id"]
