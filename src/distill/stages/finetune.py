"""The finetune stage: LoRA on the curated SFT data as a Ray job, through DSPy's `LM.finetune`; on a
cluster the adapter is published to object storage; the student's Serve config is templated to serve
the finetuned model next to the base one."""

from __future__ import annotations

import os
from pathlib import Path

from distill.config import Config
from distill.data import read_jsonl
from distill.deploy import template_serve_config
from distill.errors import DistillError
from distill.finetune import load_recipe
from distill.lm import make_lm
from distill.provider import RayJobProvider
from distill.publish import adapter_name, publish_adapter
from distill.serving.control import ensure_ray, shutdown
from distill.stages.base import Manifest, Stage, fingerprint, require
from distill.stages.curation import CurationStage


class FinetuneManifest(Manifest):
    model: str  # the id the finetuned student is served under
    adapter: str  # the llama.cpp GGUF adapter (local) or the PEFT adapter directory
    serve_config: str  # the student's Serve config with the finetuned model in it
    train_seconds: float | None
    examples: int
    epochs: float
    steps: int
    loss_history: list[float]
    first_loss: float | None
    last_loss: float | None
    recipe: str
    published: str | None  # where ray.serve.llm loads the adapter from (cluster)


class FinetuneStage(Stage[FinetuneManifest]):
    name = "finetune"
    title = "finetune the student (Ray job)"
    manifest_type = FinetuneManifest

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
                           ft.adapter_storage, self.cfg.path(self.cfg.models.student.serve_config).read_text())

    def outputs(self, m: FinetuneManifest) -> list[Path]:
        return [Path(m.serve_config), Path(m.adapter)] if not m.published else [Path(m.serve_config)]

    def describe(self, m: FinetuneManifest) -> str:
        return f"{m.model}, adapter {m.adapter}"

    def run(self) -> FinetuneManifest:
        cfg, ft, st = self.cfg, self.cfg.finetune, self.cfg.models.student
        load_recipe(cfg.path(ft.recipe), ft.training)  # a bad recipe fails here, before Ray starts
        address = ft.address or os.environ.get("RAY_ADDRESS")
        started_ray = address is None
        try:
            if started_ray:  # a local Ray with its job server; the job's trainer uses both cores
                address = "http://" + ensure_ray(dashboard=True)
            student = make_lm(st, provider=RayJobProvider())
            job = student.finetune(
                train_data=read_jsonl(self.curation.sft_path), train_data_format=None,
                train_kwargs={
                    "recipe": str(cfg.path(ft.recipe)), "overrides": ft.training, "output_dir": str(self.dir),
                    "job_config": str(cfg.path(ft.job_config)), "address": address, "python": ft.python,
                    "finetuned_model": ft.finetuned_model, "timeout_s": ft.timeout_s,
                },
            )
            finetuned = job.result()  # raises if the job failed
        finally:
            if started_ray:
                shutdown()
        result = job.train_kwargs["result"]
        published = None
        if ft.adapter_storage:  # cluster: where ray.serve.llm loads the adapter from
            published = publish_adapter(result["adapter_dir"], ft.adapter_storage, adapter_name(ft.finetuned_model))
            print(f"adapter published to {published}")
        adapter = result.get("adapter_gguf") or result["adapter_dir"]
        serve_config = template_serve_config(
            st.serve_config or "", self.dir / "serve_student.yaml", base_model=st.model,
            finetuned_model=ft.finetuned_model, adapter=adapter, lora_storage=ft.adapter_storage)
        losses = [float(x) for x in result.get("loss_history") or []]
        return FinetuneManifest(
            fingerprint=self.fingerprint(), model=finetuned.model.split("/", 1)[-1], adapter=adapter,
            serve_config=str(serve_config), train_seconds=result.get("train_seconds"), examples=result["examples"],
            epochs=result["epochs"], steps=result["steps"], loss_history=losses,
            first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None, recipe=ft.recipe,
            published=published,
        )
