"""DSPy finetuning provider that runs our LoRA finetune as a Ray job.

    student_lm = make_lm(cfg.models.student, provider=RayJobProvider())
    job = student_lm.finetune(train_data=sft, train_data_format=None, train_kwargs=finetune_kwargs(cfg, ...))
    finetuned_lm = job.result()   # a dspy.LM for the finetuned student; raises if the job failed

Pass the provider explicitly: DSPy would otherwise pick its OpenAI provider for an OpenAI-style model.

The job's inputs and outputs (spec, SFT data, Ray Train checkpoints, result) go to a job directory under
`train_kwargs["job_storage"]` (`distill.student.storage`): object storage or a shared path the job's node
reaches too. Without it they go to `output_dir`, which only works when the job runs on this machine (local).
With remote storage the adapter is copied back to `<output_dir>/adapter`.
Ctrl-C while waiting in `job.result()` (or `job.cancel()`) stops the Ray job before returning.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

from dspy.clients.provider import Provider, TrainingJob

from distill.errors import DistillError
from distill.logs import JobLog
from distill.student import storage
from distill.student.finetune import TrainJob, load_recipe
from distill.student.jobs import StopRequest, load_job_config, runtime_env, submit_and_wait


class RayTrainingJob(TrainingJob):
    """`result()` raises the job's exception instead of returning it (DSPy's default returns it).

    DSPy runs `provider.finetune` in a thread of its own, so a Ctrl-C reaches the thread waiting in `result()`,
    not the one following the Ray job: `result()` then asks that thread to stop the job (`cancel`), waits until
    Ray reports it stopped, and re-raises.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_requested = StopRequest()

    def result(self, timeout: float | None = None) -> Any:
        try:
            out = super().result(timeout)
        except KeyboardInterrupt:
            print("interrupted: stopping the finetune's Ray job", file=sys.stderr, flush=True)
            self.cancel("interrupted (Ctrl-C)")
            raise
        if isinstance(out, BaseException):
            raise out
        return out

    def cancel(self, reason: str = "cancelled") -> bool:
        """Stop the Ray job: the submitting thread stops it (`stop_job`) and ends once Ray reports it stopped."""
        self.stop_requested.request(reason)
        if self.thread is not None and self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()
        return bool(super().cancel())  # False once the thread has set its result (the exception)

    def status(self) -> str:
        return "done" if self.done() else "running"


class RayJobProvider(Provider):
    def __init__(self) -> None:
        super().__init__()
        self.finetunable = True
        self.TrainingJob = RayTrainingJob

    @staticmethod
    def finetune(
        job: TrainingJob,
        model: str,
        train_data: list[dict[str, Any]],
        train_data_format: Any = None,
        train_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """Write the job's inputs, submit the Ray job, wait; return the finetuned model's id (same provider prefix)."""
        kw = dict(train_kwargs or {})
        missing = {"recipe", "output_dir", "job_config", "address", "finetuned_model"} - set(kw)
        if missing:
            raise DistillError(f"train_kwargs is missing {sorted(missing)}")
        if not train_data:
            raise DistillError("no training data")
        name = kw.get("name", "lora")
        out = Path(kw["output_dir"])  # this machine's: the result and the adapter end up here
        out.mkdir(parents=True, exist_ok=True)
        recipe = load_recipe(kw["recipe"], kw.get("overrides"))
        job_id = storage.new_job_id(name)
        # Where the job reads and writes: its own directory under the job storage, or the stage directory (local)
        job_dir = storage.join(kw["job_storage"], job_id) if kw.get("job_storage") else str(out)
        data = storage.write_text(storage.join(job_dir, "train.jsonl"),
                                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_data))
        spec = TrainJob(recipe=recipe, train_file=data, output_dir=job_dir, name=name)
        spec_path = storage.write_text(storage.join(job_dir, "job.json"), spec.model_dump_json(indent=2))
        result_path = storage.join(job_dir, "result.json")
        storage.delete_file(result_path)
        job_cfg = load_job_config(kw["job_config"])
        entrypoint = job_cfg["entrypoint"].format(
            python=kw.get("python") or sys.executable, job=spec_path, result=result_path
        )
        # The job's log (Ray Train, transformers, TRL) goes to <logs>/finetune-<name>.log, and here when verbose.
        log = JobLog(f"finetune-{spec.name}")
        print(f"finetune: Ray job {job_id}, its inputs and outputs under {job_dir}", flush=True)
        submit_and_wait(kw["address"], entrypoint, runtime_env(job_cfg), timeout_s=kw.get("timeout_s", 3600),
                        on_log=log, submission_id=job_id, entrypoint_resources=job_cfg.get("entrypoint_resources"),
                        entrypoint_num_cpus=job_cfg.get("entrypoint_num_cpus"),
                        stop=getattr(job, "stop_requested", None))
        if not log.verbose:
            print(f"finetune job log: {log.path}")
        if not storage.exists(result_path):
            raise DistillError(f"the finetune job succeeded but wrote no {result_path}")
        result = json.loads(storage.read_text(result_path))
        result.update(ray_job_id=job_id, job_dir=job_dir)
        if storage.is_uri(job_dir):  # the adapter comes back to this machine: the manifest points at a local copy
            result["adapter_uri"] = result["adapter_dir"]
            result["adapter_dir"] = str(storage.download_dir(result["adapter_uri"], out / "adapter"))
            if result.get("adapter_gguf"):
                result["adapter_gguf_uri"] = result["adapter_gguf"]
                result["adapter_gguf"] = storage.copy(result["adapter_gguf_uri"], out / "adapter.gguf")
            (out / "result.json").write_text(json.dumps(result, indent=2))
        job.train_kwargs["result"] = result
        prefix = model.split("/", 1)[0] + "/" if "/" in model else ""
        return f"{prefix}{kw['finetuned_model']}"
