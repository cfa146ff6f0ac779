"""DSPy finetuning provider that runs our LoRA finetune as a Ray job.

    student_lm = make_lm(cfg.models.student, provider=RayJobProvider())
    job = student_lm.finetune(train_data=sft, train_data_format=None, train_kwargs=finetune_kwargs(cfg, ...))
    finetuned_lm = job.result()   # a dspy.LM for the finetuned student; raises if the job failed

Pass the provider explicitly: DSPy would otherwise pick its OpenAI provider for an OpenAI-style model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dspy.clients.provider import Provider, TrainingJob

from distill.data.dataset import write_jsonl
from distill.errors import DistillError
from distill.logs import JobLog
from distill.student.finetune import TrainJob, load_recipe
from distill.student.jobs import load_job_config, runtime_env, submit_and_wait


class RayTrainingJob(TrainingJob):
    """`result()` raises the job's exception instead of returning it (DSPy's default returns it)."""

    def result(self, timeout: float | None = None) -> Any:
        out = super().result(timeout)
        if isinstance(out, BaseException):
            raise out
        return out

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
        """Write the data, submit the Ray job, wait; return the finetuned model's id (same provider prefix)."""
        kw = dict(train_kwargs or {})
        missing = {"recipe", "output_dir", "job_config", "address", "finetuned_model"} - set(kw)
        if missing:
            raise DistillError(f"train_kwargs is missing {sorted(missing)}")
        if not train_data:
            raise DistillError("no training data")
        out = Path(kw["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        data_path = out / "train.jsonl"
        write_jsonl(data_path, train_data)
        recipe = load_recipe(kw["recipe"], kw.get("overrides"))
        spec = TrainJob(recipe=recipe, train_file=str(data_path), output_dir=str(out), name=kw.get("name", "lora"))
        spec_path, result_path = out / "job.json", out / "result.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        result_path.unlink(missing_ok=True)
        job_cfg = load_job_config(kw["job_config"])
        entrypoint = job_cfg["entrypoint"].format(
            python=kw.get("python") or sys.executable, job=spec_path, result=result_path
        )
        # The job's log (Ray Train, transformers, TRL) goes to <logs>/finetune-<name>.log, and here when verbose.
        log = JobLog(f"finetune-{spec.name}")
        submit_and_wait(kw["address"], entrypoint, runtime_env(job_cfg), timeout_s=kw.get("timeout_s", 3600),
                        on_log=log)
        if not log.verbose:
            print(f"finetune job log: {log.path}")
        if not result_path.is_file():
            raise DistillError(f"the finetune job succeeded but wrote no {result_path}")
        job.train_kwargs["result"] = json.loads(result_path.read_text())
        prefix = model.split("/", 1)[0] + "/" if "/" in model else ""
        return f"{prefix}{kw['finetuned_model']}"

