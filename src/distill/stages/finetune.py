"""The finetune stage: LoRA on the curated SFT data as a Ray job, through DSPy's `LM.finetune`; on a
cluster the adapter is published to object storage; the student's Serve config is templated to serve
the finetuned model next to the base one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
from pydantic import BaseModel, ConfigDict

from distill.config import Config
from distill.data.dataset import read_jsonl
from distill.errors import DistillError
from distill.evaluation.plots import plot_loss_curve
from distill.lm import make_lm
from distill.serving.control import ensure_ray, shutdown
from distill.serving.deploy import check_lora_storage, template_serve_config
from distill.stages.base import (
    Manifest,
    Stage,
    Tracked,
    code_version,
    endpoint_fingerprint,
    fingerprint,
    require,
    write_manifest,
)
from distill.stages.curation import CurationStage
from distill.student.finetune import load_recipe
from distill.student.provider import RayJobProvider
from distill.student.publish import adapter_name, publish_adapter
from distill.student.storage import default_job_storage, is_uri


class ValidationPoint(BaseModel):
    model_config = ConfigDict(extra="allow")  # and the metric_for_best_model when it is not the loss

    step: int
    epoch: float
    eval_loss: float


class FinetuneValidation(BaseModel):
    """How the finetune's length was chosen: the loss on held-out SFT examples at each evaluation, the
    checkpoint kept (restored at the end) and why."""

    model_config = ConfigDict(extra="forbid")

    examples: int  # held out of the SFT data (teacher labels, never the test set)
    holdout: float
    patience: int | None
    metric: str
    greater_is_better: bool
    curve: list[ValidationPoint]
    best_step: int | None
    best_epoch: float | None
    best_metric: float | None
    restored: bool  # the adapter is that checkpoint's
    stopped_early: bool
    cap_steps: int
    eval_seconds: float  # the evaluations' share of the training time
    reason: str


class FinetuneManifest(Manifest):
    model: str  # the id the finetuned student is served under
    adapter: str  # the llama.cpp GGUF adapter (local) or the PEFT adapter directory
    serve_config: str  # the student's Serve config with the finetuned model in it
    train_seconds: float | None
    examples: int  # SFT examples given to the job (with validation: trained on + held out)
    epochs: float  # trained (the cap, or where early stopping ended it)
    steps: int
    loss_history: list[float]
    loss_steps: list[int] = []  # the step of each logged loss
    validation: FinetuneValidation | None = None  # None: the recipe does not evaluate
    first_loss: float | None
    last_loss: float | None
    recipe: str
    published: str | None  # where ray.serve.llm loads the adapter from (cluster)
    loss_plot: str | None = None  # the loss curve (None: the trainer logged no loss)
    job_dir: str | None = None  # the Ray job's spec, data, checkpoints and result (a URI on a cluster)
    ray_job_id: str | None = None  # its submission id (`ray job logs <id>`)


@dataclass
class FinetuneCall:
    """DSPy's `LM.finetune` call the stage makes: the student LM with our provider, the SFT data, the kwargs.

    The stage builds it (`FinetuneStage.call`) and runs it; the notebook prints the same object.
    """

    lm: dspy.LM
    train_data: list[dict[str, Any]]
    train_kwargs: dict[str, Any]

    def run(self) -> tuple[dspy.LM, dict[str, Any]]:
        """Submit and wait; the finetuned student's LM and the job's result (raises if the job failed)."""
        job = self.lm.finetune(train_data=self.train_data, train_data_format=None, train_kwargs=self.train_kwargs)
        finetuned = job.result()
        return finetuned, job.train_kwargs["result"]

    def __str__(self) -> str:
        """The call as code, with this run's values."""
        shown = {k: "<the Ray the stage starts>" if k == "address" and v is None else repr(v)
                 for k, v in self.train_kwargs.items()}
        kwargs = "".join(f"        {k!r}: {v},\n" for k, v in shown.items())
        return (f"student = make_lm(cfg.models.student, provider={type(self.lm.provider).__name__}())"
                f"  # {self.lm.model}\n"
                "job = student.finetune(\n"
                f"    train_data=[...],  # {len(self.train_data)} chat examples (the SFT data)\n"
                "    train_data_format=None,\n"
                "    train_kwargs={\n" + kwargs + "    },\n)\n"
                "finetuned = job.result()  # the finetuned student's dspy.LM; raises if the job failed")


def loss_steps(cfg: Config, losses: list[float]) -> list[tuple[int, float]]:
    """The finetune's logged losses (the Ray job's trainer log) at their optimizer steps: the trainer logs
    every `logging_steps` steps (HF's default 500); a fractional setting falls back to 1, 2, 3, ..."""
    every = load_recipe(cfg.path(cfg.finetune.recipe), cfg.finetune.training).training.get("logging_steps", 500)
    every = every if isinstance(every, int) and every >= 1 else 1
    return [((i + 1) * every, loss) for i, loss in enumerate(losses)]


class FinetuneStage(Stage[FinetuneManifest]):
    name = "finetune"
    title = "finetune the student (Ray job)"
    manifest_type = FinetuneManifest
    upstream = ("curation",)

    @classmethod
    def build(cls, graph: Any) -> "FinetuneStage":
        return cls(graph.cfg, graph.stage("curation"))

    def tracked(self, m: FinetuneManifest) -> Tracked:
        series = {"loss": list(zip(m.loss_steps, m.loss_history)) if len(m.loss_steps) == len(m.loss_history)
                  else loss_steps(self.cfg, m.loss_history)}
        if m.validation:
            series["eval_loss"] = [(p.step, p.eval_loss) for p in m.validation.curve]
        return Tracked(files=[Path(m.loss_plot)] if m.loss_plot else [], series=series)

    def __init__(self, cfg: Config, curation: CurationStage) -> None:
        super().__init__(cfg)
        self.curation = curation

    def inputs(self) -> dict[str, str]:
        return {"curation": require(self.curation.load(), "curation").fingerprint}

    def fingerprint(self) -> str:
        # Content, not the curation manifest: re-curating to the same SFT data does not retrain.
        ft, sft = self.cfg.finetune, self.curation.sft_path
        if not sft.is_file():
            raise DistillError("no SFT data yet: run the curation stage first")
        return fingerprint(sft.read_text(), self.cfg.path(ft.recipe).read_text(), ft.training, ft.finetuned_model,
                           ft.adapter_storage, endpoint_fingerprint(self.cfg, self.cfg.models.student),
                           code_version("distill.student"))

    @property
    def loss_plot_path(self) -> Path:
        return self.dir / "loss_curve.png"

    def outputs(self, m: FinetuneManifest) -> list[Path]:
        # Not the loss plot: it is redrawn from the manifest (`ensure`), never a reason to train again.
        return [Path(m.serve_config), Path(m.adapter)] if not m.published else [Path(m.serve_config)]

    def ensure(self) -> FinetuneManifest:
        m = super().ensure()
        if m.loss_history and not (m.loss_plot and Path(m.loss_plot).is_file()):
            # e.g. a manifest from before the plot existed, or a deleted PNG: seconds, not a finetune
            m = m.model_copy(update={"loss_plot": str(self._plot_losses(m))})
            write_manifest(self.manifest_path, m)
        return m

    def _plot_losses(self, m: FinetuneManifest) -> Path:
        v = m.validation
        held = f", {v.examples} held out" if v else ""
        return plot_loss_curve(
            m.loss_history, self.loss_plot_path,
            f"LoRA finetune of {self.cfg.models.student.model}\n({m.examples} examples{held}, {m.epochs:.3g} epochs)",
            steps=m.steps, loss_steps=m.loss_steps or None,
            validation=[(p.step, p.eval_loss) for p in v.curve] if v else None,
            chosen_step=v.best_step if v and v.restored else None)

    def configured_address(self) -> str | None:
        """The Ray job server the profile names (or RAY_ADDRESS); None: the stage starts a local Ray."""
        address = self.cfg.finetune.address or os.environ.get("RAY_ADDRESS")
        return None if address == "local" else address  # RAY_ADDRESS=local: start one, as ray.init does

    def job_storage(self) -> str | None:
        """Where the Ray job's inputs and outputs go (`finetune.job_storage`, or the adapters' bucket); None: the
        stage directory, which only a job running on this machine reaches (local profiles)."""
        where = default_job_storage(self.cfg.finetune.job_storage, self.cfg.finetune.adapter_storage)
        return where if where is None or is_uri(where) else str(self.cfg.path(where))

    def call(self, address: str | None) -> FinetuneCall:
        """The `LM.finetune` call on the curated SFT data (`address`: the Ray job server; None until started)."""
        cfg, ft, st = self.cfg, self.cfg.finetune, self.cfg.models.student
        return FinetuneCall(
            lm=make_lm(st, provider=RayJobProvider()), train_data=read_jsonl(self.curation.sft_path),
            train_kwargs={
                "recipe": str(cfg.path(ft.recipe)), "overrides": ft.training, "output_dir": str(self.dir),
                "job_config": str(cfg.path(ft.job_config)), "address": address, "python": ft.python,
                "finetuned_model": ft.finetuned_model, "timeout_s": ft.timeout_s,
                "job_storage": self.job_storage(),
            },
        )

    def describe(self, m: FinetuneManifest) -> str:
        return f"{m.model}, adapter {m.adapter}"

    def run(self) -> FinetuneManifest:
        cfg, ft, st = self.cfg, self.cfg.finetune, self.cfg.models.student
        load_recipe(cfg.path(ft.recipe), ft.training)  # a bad recipe fails here, before Ray starts
        check_lora_storage(st.serve_config or "", ft.adapter_storage)  # and storage ray.serve.llm cannot read
        address = self.configured_address()
        started_ray = address is None
        try:
            if started_ray:  # a local Ray with its job server; the job's trainer uses both cores
                address = "http://" + ensure_ray(dashboard=True)
            finetuned, result = self.call(address).run()  # raises if the job failed
        finally:
            if started_ray:
                shutdown()
        published = None
        if ft.adapter_storage:  # cluster: where ray.serve.llm loads the adapter from
            published = publish_adapter(result["adapter_dir"], ft.adapter_storage, adapter_name(ft.finetuned_model))
            print(f"adapter published to {published}")
        adapter = result.get("adapter_gguf") or result["adapter_dir"]
        serve_config = template_serve_config(
            st.serve_config or "", self.dir / "serve_student.yaml", base_model=st.model,
            finetuned_model=ft.finetuned_model, adapter=adapter, lora_storage=ft.adapter_storage)
        losses = [float(x) for x in result.get("loss_history") or []]
        validation = FinetuneValidation(**result["validation"]) if result.get("validation") else None
        if validation is not None:
            print(f"validation: {validation.reason}")
        m = FinetuneManifest(
            fingerprint=self.fingerprint(), model=finetuned.model.split("/", 1)[-1], adapter=adapter,
            serve_config=str(serve_config), train_seconds=result.get("train_seconds"), examples=result["examples"],
            epochs=result["epochs"], steps=result["steps"], loss_history=losses,
            loss_steps=[int(x) for x in result.get("loss_steps") or []], validation=validation,
            first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None, recipe=ft.recipe,
            published=published, job_dir=result.get("job_dir"), ray_job_id=result.get("ray_job_id"),
        )
        return m.model_copy(update={"loss_plot": str(self._plot_losses(m))}) if losses else m
