"""The program application: the saved, optimized DSPy program behind `POST /classify_intent` (Ray Serve).

It loads the deploy parameters written by the evaluation stage (best model id, saved program, labels)
at start-up and calls the LLM application over its OpenAI API. DSPy's calls are blocking, so they run in
a thread pool sized by `threads`, each under its own `dspy.context`; the event loop only waits.

Errors are answers, never tracebacks: bad input -> 422, missing/wrong key -> 401, the LLM application
unreachable, failing or slow -> 503. The label is always one of the labels in use: the LLM's grammar
enforces it, and an answer outside them is a 502, never passed on.
"""

# No `from __future__ import annotations` here: Ray Serve's ingress must see real types to parse bodies.

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator
from ray import serve

from distill.config import LMConfig
from distill.lm import make_lm, using
from distill.program import DeployParams
from distill.serving.common import authorized, describe_validation_errors, parse_app_args

logger = logging.getLogger("ray.serve")


class ProgramAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deploy_params: str = Field(..., description="deploy_params.json written by the evaluation stage.")
    llm_api_base: str | None = Field(None, description="The LLM application's OpenAI base URL.")
    llm_api_base_env: str | None = Field(None, description="...or the variable holding it (separate services).")
    llm_api_key_env: str | None = Field(None, description="Variable holding the LLM application's key.")
    api_key_env: str | None = Field("DISTILL_API_KEY", description="If this variable is set, clients need its key.")
    max_query_chars: int = Field(1000, ge=1)
    timeout_s: float = Field(30.0, gt=0, description="Per request, LLM call included; then 503.")
    llm_retries: int = Field(1, ge=0, description="Retries of a failed LLM call (DSPy's own retry).")
    max_tokens: int = Field(64, ge=1)
    threads: int = Field(8, ge=1, description="Concurrent DSPy calls per replica.")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, gt=0)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(-1, ge=-1, description="Beyond this the proxy answers 503 (-1: no limit).")

    @model_validator(mode="after")
    def _one_base(self) -> "ProgramAppArgs":
        if (self.llm_api_base is None) == (self.llm_api_base_env is None):
            raise ValueError("give exactly one of 'llm_api_base' or 'llm_api_base_env'")
        return self


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: StrictStr  # a number or a list is a 422, not silently stringified


class ClassifyResponse(BaseModel):
    label: str
    model: str
    latency_ms: float


class UpstreamError(Exception):
    """The LLM application failed, was unreachable or too slow: the client gets a 503."""


api = FastAPI(title="distill intent classifier", description="POST /classify_intent {'query': '...'}")


class _ExactPrefix:
    """Route a request for exactly the route prefix (`POST /classify_intent`) to the app's "/".

    Otherwise Starlette answers it with a 307 redirect to `/classify_intent/`, which many clients do not
    follow for a POST; a route with an empty path is not allowed in a Serve ingress.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("root_path") and scope["path"] == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/", "raw_path": scope.get("raw_path", b"").rstrip(b"/") + b"/"}
        await self.app(scope, receive, send)


api.add_middleware(_ExactPrefix)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message, **extra})


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, _ = describe_validation_errors(list(exc.errors()), unknown="unknown field '{}' (send {{\"query\": ...}})",
                                            missing="missing field '{}' (send {{\"query\": ...}})")
    return _error(422, message)


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error in /classify_intent")  # the traceback stays in the server log
    return _error(500, f"internal error ({type(exc).__name__}); see the server log")


class Classifier:
    """The saved program + its LM; usable without Ray (the deployment wraps one)."""

    def __init__(self, args: ProgramAppArgs) -> None:
        self.args = args
        self.params = DeployParams.load(args.deploy_params)
        self.labels = frozenset(self.params.labels)
        self.program = self.params.load_program()
        api_base = args.llm_api_base or os.environ.get(args.llm_api_base_env or "")
        if not api_base:
            raise ValueError(f"{args.llm_api_base_env} is not set: the LLM service's URL comes from it")
        self.api_base = api_base
        lm_cfg = LMConfig(model=self.params.model, api_base=api_base, api_key_env=args.llm_api_key_env,
                          max_tokens=args.max_tokens, temperature=0.0, timeout_s=args.timeout_s)
        # No cache: a served answer must come from the model in service, not from an earlier run's disk cache.
        self.lm = make_lm(lm_cfg, cache=False, num_retries=args.llm_retries)
        self.pool = ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="dspy")

    def predict(self, query: str) -> str:
        try:
            with using(self.lm):
                label = self.program(text=query).label
        except Exception as e:  # noqa: BLE001 - litellm/lm15/httpx/adapter errors all mean: the LLM failed us
            raise UpstreamError(f"{type(e).__name__}: {str(e)[:300]}") from None
        return label

    async def classify(self, query: str) -> str:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.pool, self.predict, query), self.args.timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamError(f"no answer from the LLM application within {self.args.timeout_s:.0f}s") from None


@serve.deployment
@serve.ingress(api)
class IntentClassifierApp:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = ProgramAppArgs.model_validate(args)
        self.classifier = Classifier(self.args)

    def _authorize(self, authorization: str | None) -> JSONResponse | None:
        if not authorized(authorization, self.args.api_key_env):
            return _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        return None

    @api.get("/healthz")
    async def healthz(self, authorization: str | None = Header(None)) -> JSONResponse:
        if (denied := self._authorize(authorization)) is not None:
            return denied
        c = self.classifier
        headers = {"Authorization": f"Bearer {os.environ[c.args.llm_api_key_env]}"} if (
            c.args.llm_api_key_env and os.environ.get(c.args.llm_api_key_env)) else {}
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                r = await client.get(f"{c.api_base.rstrip('/')}/models", headers=headers)
            llm = "up" if r.status_code == 200 else f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            llm = f"unreachable ({type(e).__name__})"
        body = {"status": "ok" if llm == "up" else "degraded", "model": c.params.model, "llm": llm,
                "labels": len(c.labels)}
        return JSONResponse(status_code=200 if llm == "up" else 503, content=body)

    # At route_prefix /classify_intent, POST /classify_intent reaches "/" (see _ExactPrefix); deployed
    # alone at route "/", the same handler answers POST /classify_intent.
    @api.post("/")
    @api.post("/classify_intent")
    async def classify_intent(self, body: ClassifyRequest, authorization: str | None = Header(None)) -> Any:
        if (denied := self._authorize(authorization)) is not None:
            return denied
        query = body.query.strip()
        if not query:
            return _error(422, "query: must not be empty or whitespace only")
        if len(query) > self.args.max_query_chars:
            return _error(422, f"query: longer than {self.args.max_query_chars} characters ({len(query)})")
        started = time.perf_counter()
        try:
            label = await self.classifier.classify(query)
        except UpstreamError as e:
            return _error(503, f"the LLM application is unavailable: {e}")
        if label not in self.classifier.labels:  # cannot happen under the grammar; never pass free text on
            return _error(502, "the LLM answered outside the label set")
        return ClassifyResponse(label=label, model=self.classifier.params.model,
                                latency_ms=round(1000 * (time.perf_counter() - started), 1))


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve builder (`import_path: distill.serving.app:build_app`)."""
    parsed = parse_app_args(ProgramAppArgs, args, "distill.serving.app:build_app")
    return IntentClassifierApp.options(
        num_replicas=parsed.num_replicas,
        max_ongoing_requests=parsed.max_ongoing_requests,
        max_queued_requests=parsed.max_queued_requests,
        ray_actor_options={"num_cpus": parsed.num_cpus},
    ).bind(parsed.model_dump())
