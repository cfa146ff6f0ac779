"""The teacher program application (issue 31): the teacher a pipeline run labeled with, behind the program
app's ingress and worker (`distill.serving.app`: keys, limits, deadlines, error answers), answering
`POST {"query": ...}` with `{"label", "model", "latency_ms", "confidence", "source"}` -- what the cascade
(`distill.serving.cascade`) asks below its threshold.

The teacher is not a saved program: on `vote_llm` it is a vote over the gold examples' MiniLM embeddings in
front of the LLM (`distill.teacher.program.HybridTeacher`). Each worker replica rebuilds it as the pipeline
does, `TeacherStage(cfg, data).program()`: from the profile, the task's data (its gold examples) and the
threshold the teacher stage chose (its manifest's `vote_confidence`). A replica refuses to start when the
data differ from the ones the teacher stage was computed from. `confidence` is the vote's, `source` says
who answered (`vote` or `llm`).

Its LLM calls go to the profile's teacher model (`models.teacher`: model id, max_tokens, temperature -- as it
labeled; the app's own `max_tokens` is not used) at the app's `llm_api_base`, with the app's key settings.
The program has no async path: a call runs in a thread, so a request past its deadline is answered with a
503 at once while its LLM call runs on to the LLM client's timeout (the app's `timeout_s`).

This module sits above the stages (it rebuilds the teacher from the teacher stage's manifest), not in
`distill.serving`, which depends only on the program, the DSPy client and the configuration.
"""

# No `from __future__ import annotations` here: FastAPI must see real types to parse bodies.

import asyncio
from typing import Any

from pydantic import Field
from ray import serve

from distill.config import Config, load_config
from distill.data.dataset import prepare_data
from distill.errors import DistillError
from distill.lm import make_lm
from distill.pool import with_extra_pool
from distill.program import DeployParams, ProgramParams
from distill.serving.app import (
    Classifier,
    ClassifierAppArgs,
    ClassifierWorker,
    ClassifyResponse,
    IntentClassifierApp,
    Outcome,
    bind_ingress,
)
from distill.serving.common import parse_app_args
from distill.stages.base import read_manifest, require
from distill.stages.data import DataManifest, data_fingerprint
from distill.stages.teacher import TeacherManifest, TeacherStage

IMPORT_PATH = "distill.teacher_app:build_app"


class TeacherAppArgs(ClassifierAppArgs):
    profile: str = Field(
        ..., description="The profile the teacher was built with: a name (`local`) or a YAML path. The serving "
        "stage names the run's own, written whole (<artifacts>/serving/profile.yaml).")
    artifacts_dir: str | None = Field(
        None, description="The run's artifacts (the data and teacher stages' manifests); null: the profile's.")


class TeacherResponse(ClassifyResponse):
    # `confidence` is the vote's (how sure the vote was of its top label), not an LLM probability.
    source: str | None = None  # vote | llm (vote_llm); null for a teacher that does not say


def teacher_config(args: TeacherAppArgs) -> Config:
    cfg = load_config(args.profile)
    return cfg.model_copy(update={"artifacts_dir": args.artifacts_dir}) if args.artifacts_dir else cfg


def teacher_manifest(cfg: Config) -> TeacherManifest:
    m = read_manifest(cfg.artifacts / TeacherStage.name / "manifest.json", TeacherManifest)
    return require(m, "teacher")  # type: ignore[arg-type]


def teacher_params(cfg: Config) -> DeployParams:
    """What the teacher app serves, from the manifests alone (no data, no embedder): the teacher's model id,
    the labels, and the prompt it labeled with (the full one)."""
    m = teacher_manifest(cfg)
    data = require(read_manifest(cfg.artifacts / "data" / "manifest.json", DataManifest), "data")
    return DeployParams(
        model=m.model, program_path=str(cfg.artifacts / TeacherStage.name / "manifest.json"),
        labels=list(data.labels), variant=m.strategy, kind="teacher", test_score=m.accuracy_test,
        program=ProgramParams(reasoning=cfg.program.reasoning, max_reasoning_chars=cfg.program.max_reasoning_chars,
                              prompt="full"))


class TeacherClassifier(Classifier):
    """The teacher, rebuilt from the run's profile, data and teacher manifest, + its LM."""

    args: TeacherAppArgs

    def load_program(self) -> tuple[DeployParams, Any]:
        self.cfg = cfg = teacher_config(self.args)
        params, m = teacher_params(cfg), teacher_manifest(cfg)
        # The data stage's data, data.extra_pool's served queries included (the pool file must be readable where
        # this replica runs, as the task's files are): the fingerprint the teacher stage recorded covers them.
        data = with_extra_pool(cfg, prepare_data(cfg))
        if m.inputs.get("data") != data_fingerprint(data):
            raise DistillError(f"the task's data ({data.source}) are not the ones the teacher stage in {cfg.artifacts} "
                               f"was computed from: run the pipeline again, or point the app at that run's data")
        if list(data.labels) != params.labels:
            raise DistillError(f"the task's labels differ from the data stage's in {cfg.artifacts}")
        return params, TeacherStage(cfg, data).program()

    def make_lm(self, key_env: str | None) -> Any:
        lm_cfg = self.cfg.models.teacher.model_copy(update={
            "model": self.params.model, "api_base": self.api_base, "api_key_env": key_env,
            "timeout_s": self.args.timeout_s})
        return make_lm(lm_cfg, cache=False, num_retries=self.args.llm_retries)

    async def answer(self, query: str) -> Any:
        return await asyncio.to_thread(self.call, query)  # the vote and DSPy's sync call, off the event loop


class _TeacherWorker(ClassifierWorker.func_or_class):  # type: ignore[name-defined, misc]
    classifier_type = TeacherClassifier
    args_type = TeacherAppArgs


TeacherWorker = serve.deployment(_TeacherWorker, name="TeacherWorker")

_Ingress: Any = IntentClassifierApp.func_or_class.__mro__[1]  # the program app's class under Serve's wrapper


class TeacherIngress(_Ingress):
    args_type = TeacherAppArgs

    def served_params(self) -> DeployParams:
        return teacher_params(teacher_config(self.args))

    def response(self, outcome: Outcome, latency_ms: float) -> TeacherResponse:
        return TeacherResponse(label=outcome.label, model=self.params.model, confidence=outcome.confidence,
                               latency_ms=latency_ms, source=outcome.source)


TeacherApp = serve.deployment(serve.ingress()(TeacherIngress), name="TeacherApp")


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve builder (`import_path: distill.teacher_app:build_app`): the program app's arguments, with
    `profile` and `artifacts_dir` in place of `deploy_params`."""
    parsed = parse_app_args(TeacherAppArgs, args, IMPORT_PATH)
    teacher_params(teacher_config(parsed))  # refused here, at deploy time, when the run has no teacher yet
    raw = parsed.model_dump()
    return bind_ingress(TeacherApp, parsed, raw, raw, worker=TeacherWorker)
