"""The cascade (issue 31): `/classify_intent` asks the student; when its calibrated confidence is below the
threshold chosen on dev data, it asks the teacher program, deployed as its own Serve application (or any
service answering `POST {"query": ...}` with `{"label": ...}`), and says who answered.

The student's ingress, worker and error handling are the program application's (`distill.serving.app`);
this module only decides after the student has answered. The teacher is reached over HTTP, so it can run,
restart or be deleted on its own. If it is down, slow past its deadline, or answers anything but a label
in use, the client still gets the student's answer, marked with `fallback_error` -- never a 5xx for a
teacher fault. Errors of the student itself (bad input, LLM down) are the program app's own answers.

Not configured (`distill.serving.app:build_app`), serving is unchanged.
"""

# No `from __future__ import annotations` here: FastAPI must see real types to parse bodies.

import logging
import time
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from distill.program import CascadeParams
from distill.serving.app import (
    ClassifyRequest,
    ClassifyResponse,
    IntentClassifierApp,
    Outcome,
    ProgramAppArgs,
    bind_ingress,
)
from distill.serving.common import bearer_headers, parse_app_args

logger = logging.getLogger("ray.serve")


class CascadeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cascade_params: str = Field(..., description="cascade.json: threshold and calibration, chosen on dev data.")
    teacher_url: str = Field(..., description="The teacher program's classify URL, e.g. http://127.0.0.1:8000/teacher.")
    teacher_key_env: str | None = Field(None, description="Variable holding the teacher app's key (sent when set).")
    teacher_key_fallback_env: str | None = Field(
        None, description="...else this variable's key (the teacher program app takes the LLM app's key, else the "
        "deployment's shared one: name the same two here).")
    teacher_timeout_s: float = Field(
        10.0, gt=0, description="The teacher's deadline (also bounded by the request's own `timeout_s`); past it "
        "the student's answer is returned, marked.")


class CascadeAppArgs(ProgramAppArgs):
    cascade: CascadeArgs


class CascadeResponse(ClassifyResponse):
    answered_by: Literal["student", "teacher"]
    # `confidence` is the student's, calibrated (cascade.json); `student_label` what the student answered.
    student_label: str
    threshold: float
    fallback_error: str | None = None  # the teacher was asked and failed: the answer is the student's
    teacher_source: str | None = None  # who in the teacher answered, when it says (the vote teacher: vote | llm)


class TeacherFailed(Exception):
    pass


_Ingress: Any = IntentClassifierApp.func_or_class.__mro__[1]  # the program app's class under Serve's wrapper


class CascadeIngress(_Ingress):
    async def __init__(self, args: dict[str, Any], worker: DeploymentHandle) -> None:
        parsed = CascadeAppArgs.model_validate(args)
        await super().__init__(parsed.model_dump(exclude={"cascade"}), worker)
        self.cascade_args = parsed.cascade
        self.cascade = CascadeParams.load(parsed.cascade.cascade_params)
        self.teacher_headers = bearer_headers((parsed.cascade.teacher_key_env, parsed.cascade.teacher_key_fallback_env))
        self.teacher = httpx.AsyncClient()

    async def ask_teacher(self, query: str, deadline: float) -> tuple[str, str | None]:
        """The teacher's label, and who in it answered (its `source`, if it says)."""
        budget = min(self.cascade_args.teacher_timeout_s, deadline - time.time())
        if budget <= 0:
            raise TeacherFailed("no time left for the teacher")
        try:
            r = await self.teacher.post(self.cascade_args.teacher_url, json={"query": query},
                                        headers=self.teacher_headers, timeout=budget)
        except httpx.TimeoutException:
            raise TeacherFailed(f"teacher gave no answer within {budget:.1f} s") from None
        except httpx.HTTPError as e:
            logger.warning("teacher call failed: %s: %s", type(e).__name__, e)
            raise TeacherFailed("teacher unavailable") from None
        if r.status_code != 200:
            logger.warning("teacher answered HTTP %d: %s", r.status_code, r.text[:300])
            raise TeacherFailed(f"teacher unavailable (HTTP {r.status_code})")
        try:
            body = r.json()
            label, source = body["label"], body.get("source")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TeacherFailed("teacher's answer is not a label") from None
        if label not in self.labels:
            raise TeacherFailed("teacher answered outside the label set")
        return label, source if isinstance(source, str) else None

    async def classify(self, body: ClassifyRequest) -> Any:
        started, deadline = time.perf_counter(), time.time() + self.args.timeout_s
        outcome = await self.ask(body, deadline)
        if not isinstance(outcome, Outcome):  # the student's own errors are the program app's answers
            return outcome
        # No confidence (the LLM returned no logprobs) counts as unsure: the teacher is asked.
        confidence = None if outcome.confidence is None else self.cascade.calibration.apply(outcome.confidence)
        threshold = self.cascade.threshold
        label, by, error, source = outcome.label, "student", None, None
        if confidence is None or confidence < threshold:
            try:
                (label, source), by = await self.ask_teacher(body.query.strip(), deadline), "teacher"
            except TeacherFailed as e:
                error = str(e)
        return CascadeResponse(label=label, model=self.params.model, confidence=confidence, answered_by=by,
                               student_label=outcome.label, threshold=threshold, fallback_error=error,
                               teacher_source=source, latency_ms=round(1000 * (time.perf_counter() - started), 1))


CascadeApp = serve.deployment(serve.ingress()(CascadeIngress), name="CascadeApp")


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve builder (`import_path: distill.serving.cascade:build_app`): the program app's arguments
    plus `cascade` (CascadeArgs)."""
    parsed = parse_app_args(CascadeAppArgs, args, "distill.serving.cascade:build_app")
    return bind_ingress(CascadeApp, parsed, parsed.model_dump(), parsed.model_dump(exclude={"cascade"}))
