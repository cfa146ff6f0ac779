"""The program application: the saved, optimized DSPy program behind `POST /classify_intent` (Ray Serve).

Two deployments:

* `IntentClassifierApp`, the HTTP ingress: key check (the shared key, or named clients' own keys),
  each named client's share (`max_ongoing_per_client`), input limits (characters, tokens, Unicode, body
  size), `GET /healthz`, and the request's deadline. It does no model work, so it takes many requests at
  once and healthz never waits behind classifications; it reports the LLM's state from a probe that runs
  every `health_probe_s` in the background.
* `ClassifierWorker`: the program, calling the LLM application over its OpenAI API with DSPy's async
  client. `threads` classifications run per replica and `max_queued_requests` more may wait (Ray Serve's
  own admission control); beyond that a request gets a 503 with `Retry-After` at once instead of a
  place in a queue it would time out in.

`timeout_s` counts from the request's arrival at the ingress. When it runs out -- or the client goes
away -- the worker's call is cancelled, which closes its connection to the LLM application, whose
generation then stops at its next token.

Errors are answers, never tracebacks or exception names (those go to the log): bad input, or a request
the LLM rejects as too long or invalid -> 422; missing/wrong key -> 401; body too large -> 413; a named
client over its share -> 429 with `Retry-After`; at capacity, timed out, or the LLM application
unreachable/failing -> 503 with `Retry-After`. The label is
always one of the labels in use: the LLM's grammar enforces it, and anything else is a 502, never
passed on.
"""

# No `from __future__ import annotations` here: FastAPI must see real types to parse bodies.

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any, Awaitable, Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.config import LMConfig
from distill.lm import make_lm, using
from distill.models import ModelSource
from distill.program import DeployParams
from distill.serving.common import (
    NO_DOCS,
    BodyLimits,
    backpressure,
    bearer_headers,
    describe_validation_errors,
    key_variable,
    parse_app_args,
    parse_client_keys,
    require_key,
    valid_unicode,
)
from distill.serving.request_log import RequestLog, RequestLogArgs

logger = logging.getLogger("ray.serve")


class ClassifierAppArgs(BaseModel):
    """What every classifier application (the program app, the cascade, the teacher program app) shares:
    where its LLM is, keys, limits, deadlines and sizes. Which program it serves is the subclass's."""

    model_config = ConfigDict(extra="forbid")

    llm_api_base: str | None = Field(None, description="The LLM application's OpenAI base URL.")
    llm_api_base_env: str | None = Field(None, description="...or the variable holding it (separate services).")
    llm_api_key_env: str | None = Field(
        None, description="Variable holding the LLM application's key; sent when set, nothing when unset.")
    llm_api_key_fallback_env: str | None = Field(
        None, description="...else this variable's key (the deployment's shared key, when the LLM app has no key "
        "of its own). Never set it to a key meant for the classifier's clients when the LLM service is elsewhere.")
    llm_app: str | None = Field(
        None, description="The LLM application's name when it runs in the same Serve instance: its replicas' "
        "state is then read from the Serve controller, so a crashed replica is a fast 503, not a wait.")
    api_key_env: str | None = Field(
        "DISTILL_API_KEY", description="If this variable is set, clients may use its key: one shared key, whose "
        "holders the app cannot tell apart (client name 'default', no per-client limit).")
    api_key_fallback_env: str | None = Field(
        None, description="...else this variable's key (an app whose only client is another app: the teacher program "
        "app takes the LLM app's key, else the deployment's shared one).")
    api_keys_env: str | None = Field(
        "DISTILL_API_KEYS", description="If this variable is set (`name=key,name2=key2`), each named client has a "
        "key of its own, and the app knows who is calling (`request.user`): what `max_ongoing_per_client` counts by.")
    max_ongoing_per_client: int | None = Field(
        None, ge=1, description="Classifications one named client may have in progress per ingress replica; "
        "its next one is a 429 with Retry-After at once. Why: the worker's threads and queue are shared, so "
        "without it one client's burst fills them and every other client is shed with 503s. The shared key "
        "is not limited (its holders cannot be told apart). null: no limit.")
    max_query_chars: int = Field(1000, ge=1)
    max_query_tokens: int = Field(512, ge=1, description="Longer queries are a 422 before the LLM is called.")
    tokenizer: ModelSource | None = Field(
        None, description="GGUF whose vocabulary counts the query's tokens (the served model's). Without one, "
                          "UTF-8 bytes are counted: an upper bound for byte-level BPE vocabularies.")
    timeout_s: float = Field(30.0, gt=0, description="From arrival, LLM call included; then 503 and the call is cancelled.")
    llm_retries: int = Field(1, ge=0, description="Retries of a failed LLM call (DSPy's own retry).")
    max_tokens: int = Field(64, ge=1)
    threads: int = Field(8, ge=1, description="Classifications in progress per replica (the worker's max_ongoing_requests).")
    max_queued_requests: int = Field(
        16, ge=-1, description="Classifications waiting for a thread, per ingress replica; then 503 at once (-1: no limit).")
    max_ongoing_requests: int = Field(
        256, ge=1, description="HTTP requests one ingress replica holds; the proxy queues as many again, then 503.")
    retry_after_s: float | None = Field(2.0, ge=0, description="Retry-After of every 503 and 429 (null: no header).")
    health_probe_s: float = Field(2.0, gt=0, description="How often the ingress probes the LLM for /healthz.")
    max_body_bytes: int = Field(64 << 10, ge=1024, description="Larger request bodies get a 413.")
    body_timeout_s: float = Field(10.0, gt=0, description="A body not in this long after arrival is a 408.")
    docs: bool = Field(False, description="Serve /docs and /openapi.json (behind the key, if one is set).")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, gt=0)
    request_log: RequestLogArgs | None = Field(
        None, description="Append each answered query to this JSONL log (off when null): the next labeling pool.")

    @model_validator(mode="after")
    def _one_base(self) -> "ClassifierAppArgs":
        if (self.llm_api_base is None) == (self.llm_api_base_env is None):
            raise ValueError("give exactly one of 'llm_api_base' or 'llm_api_base_env'")
        return self

    def llm_key_env(self) -> tuple[str | None, str | None]:
        return self.llm_api_key_env, self.llm_api_key_fallback_env

    def llm_base(self) -> str:
        api_base = self.llm_api_base or os.environ.get(self.llm_api_base_env or "")
        if not api_base:
            raise ValueError(f"{self.llm_api_base_env} is not set: the LLM service's URL comes from it")
        return api_base.rstrip("/")

    def key_env(self) -> tuple[str | None, str | None]:
        """The variables of the key clients must send (the first that is set holds it)."""
        return self.api_key_env, self.api_key_fallback_env


class ProgramAppArgs(ClassifierAppArgs):
    deploy_params: str = Field(..., description="deploy_params.json written by the evaluation stage.")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # StrictStr: a number or a list is a 422, not silently stringified
    query: Annotated[StrictStr, AfterValidator(valid_unicode)]


class ClassifyResponse(BaseModel):
    label: str
    model: str
    latency_ms: float
    # The label's probability among the labels, as the model gave it (issue 31); null when the server
    # returned no logprobs (free-text decoding, or a server without them).
    confidence: float | None = None


class UpstreamError(Exception):
    """The LLM application failed, was unreachable or too slow: the client gets a 503."""


class RejectedByLLM(Exception):
    """The LLM application refused the request as too long or invalid: the client gets a 422."""


class BadAnswer(Exception):
    """The LLM's answer did not parse into a label: the client gets a 502."""


def _failure(e: Exception) -> Exception:
    """What an exception of the DSPy call means for the client. Its details go to the log only."""
    from dspy.utils.exceptions import (
        AdapterParseError,
        ContextWindowExceededError,
        LMInvalidRequestError,
        LMUnsupportedModelError,
    )

    logger.warning("LLM call failed: %s: %s", type(e).__name__, str(e)[:500])
    status = getattr(e, "status", None)
    if isinstance(e, ContextWindowExceededError):
        return RejectedByLLM("the query is too long for the model's context window")
    if isinstance(e, LMInvalidRequestError) and not isinstance(e, LMUnsupportedModelError) and status in (None, 400, 413, 422):
        return RejectedByLLM("the LLM rejected the request as invalid")
    if isinstance(e, AdapterParseError):
        return BadAnswer("the LLM's answer could not be read as a label")
    return UpstreamError("the LLM application is unavailable")


def token_counter(source: ModelSource | None) -> Callable[[str], int]:
    """Counts a query's tokens: with a GGUF's vocabulary (llama.cpp, no weights loaded), else its UTF-8 bytes."""
    if source is None:
        return lambda text: len(text.encode("utf-8"))
    from llama_cpp import Llama

    vocab = Llama(model_path=str(source.resolve()), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))


class Classifier:
    """The saved program + its LM; usable without Ray (the worker deployment wraps one).

    Another program (the teacher's, `distill.teacher_app`) is served by overriding `load_program` and
    `make_lm` (and `answer`, for a program that has no async path)."""

    def __init__(self, args: ClassifierAppArgs) -> None:
        self.args = args
        self.api_base = args.llm_base()
        key_env = key_variable(args.llm_key_env())
        if args.llm_api_key_env and key_env is None:
            logger.warning("%s is not set: calling the LLM application without a key", args.llm_api_key_env)
        self.params, self.program = self.load_program()
        self.labels = frozenset(self.params.labels)
        self.lm = self.make_lm(key_env)

    def load_program(self) -> tuple[DeployParams, Any]:
        """What is served (model id, labels, prompt) and the program."""
        params = DeployParams.load(self.args.deploy_params)  # type: ignore[attr-defined]
        return params, params.load_program()

    def make_lm(self, key_env: str | None) -> Any:
        args = self.args
        lm_cfg = LMConfig(model=self.params.model, api_base=self.api_base, api_key_env=key_env,
                          max_tokens=args.max_tokens, temperature=0.0, timeout_s=args.timeout_s)
        # No cache: a served answer must come from the model in service, not from an earlier run's disk cache.
        # logprobs: the answer's probability comes back with it (`distill.program.answer_confidence`).
        return make_lm(lm_cfg, cache=False, num_retries=args.llm_retries, logprobs=True)

    def predict(self, query: str) -> str:
        """One classification, blocking (scripts); raises UpstreamError, RejectedByLLM or BadAnswer."""
        return self.call(query).label

    def call(self, query: str) -> Any:
        """As `predict`, the whole prediction."""
        try:
            with using(self.lm, self.params.program.prompt):
                return self.program(text=query)
        except Exception as e:  # noqa: BLE001 - classified by _failure
            raise _failure(e) from None

    async def classify(self, query: str) -> str:
        """One classification on the event loop. Cancelling it closes the connection to the LLM application,
        which stops the generation; raises UpstreamError, RejectedByLLM or BadAnswer."""
        return (await self.answer(query)).label

    async def answer(self, query: str) -> Any:
        """As `classify`, the whole prediction (label and confidence)."""
        try:
            with using(self.lm, self.params.program.prompt):  # a ContextVar: private to this task
                return await self.program.acall(text=query)
        except Exception as e:  # noqa: BLE001 - classified by _failure; CancelledError is not an Exception
            raise _failure(e) from None


@dataclass
class Outcome:
    """A worker's answer to the ingress: a label, or the status and message for the client."""

    status: int
    label: str | None = None
    detail: str | None = None
    confidence: float | None = None
    source: str | None = None  # who in the program answered, when it says (the teacher: vote | llm)


@serve.deployment
class ClassifierWorker:
    classifier_type: type[Classifier] = Classifier
    args_type: type[ClassifierAppArgs] = ProgramAppArgs

    def __init__(self, args: dict[str, Any]) -> None:
        self.classifier = self.classifier_type(self.args_type.model_validate(args))

    async def classify(self, query: str, deadline: float) -> Outcome:
        """Classify `query` unless `deadline` (epoch seconds) passes first; then the LLM call is cancelled."""
        remaining = deadline - time.time()
        timed_out = Outcome(503, detail=f"no answer within {self.classifier.args.timeout_s:g} s")
        if remaining <= 0:  # it waited for a thread until its time was up
            return timed_out
        try:
            pred = await asyncio.wait_for(self.classifier.answer(query), remaining)
        except asyncio.TimeoutError:
            return timed_out
        except RejectedByLLM as e:
            return Outcome(422, detail=str(e))
        except BadAnswer as e:
            return Outcome(502, detail=str(e))
        except UpstreamError as e:
            return Outcome(503, detail=str(e))
        if pred.label not in self.classifier.labels:  # cannot happen under the grammar; never pass free text on
            return Outcome(502, detail="the LLM answered outside the label set")
        return Outcome(200, label=pred.label, confidence=pred.get("confidence"), source=pred.get("source"))


class LLMProbe:
    """The LLM application's state, refreshed in the background: `GET /models`, answered or not in 3 s.

    With `llm_app` (the LLM application in the same Serve instance) the Serve controller is also asked,
    every `CONTROLLER_S`, whether the application has a running replica. Through the proxy a crashed
    replica looks slow, not down: requests to it wait for its successor (3-11 s). The controller knows.
    `down` is set while it has none, so that classifications fail at once instead of waiting.
    """

    HEALTHY = ("up", "busy")
    CONTROLLER_S = 0.25

    def __init__(self, api_base: str, headers: dict[str, str], period_s: float, llm_app: str | None = None) -> None:
        self.url, self.headers, self.period_s, self.llm_app = f"{api_base}/models", headers, period_s, llm_app
        self.timeout_s = 3.0
        self.state, self.checked = "not probed yet", float("-inf")
        self.down = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())
        if self.llm_app:
            self.watch = asyncio.get_running_loop().create_task(self._watch())

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            while True:
                self.state, self.checked = await self.probe(client), time.monotonic()
                await asyncio.sleep(self.period_s)

    async def _watch(self) -> None:
        while True:
            try:
                running = await asyncio.to_thread(_running_replicas, self.llm_app)
            except Exception as e:  # noqa: BLE001 - the controller busy or restarting: no news, not "down"
                logger.warning("LLM replica watch: %s: %s", type(e).__name__, e)
                running = None
            if running == 0:
                if not self.down.is_set():
                    logger.warning("the LLM application %r has no running replica: failing fast", self.llm_app)
                self.down.set()
            elif running:
                self.down.clear()
            await asyncio.sleep(self.CONTROLLER_S)

    async def probe(self, client: httpx.AsyncClient) -> str:
        try:
            r = await client.get(self.url, headers=self.headers)
        except httpx.TimeoutException:
            return "busy"  # queued behind generations: answering, slowly
        except httpx.HTTPError as e:
            logger.warning("LLM probe: %s: %s", type(e).__name__, e)
            return "unreachable"
        if r.status_code == 200:
            return "up"
        if r.status_code in (429, 503) and "retry-after" in r.headers:
            return "busy"  # load shedding: alive, at capacity
        if r.status_code in (401, 403):
            return "refuses our key"
        return f"HTTP {r.status_code}"

    def snapshot(self) -> tuple[str, float | None]:
        """The last state and its age in seconds (None before the first probe has answered)."""
        if self.down.is_set():
            return "down", 0.0
        if self.checked == float("-inf"):
            return self.state, None
        age = time.monotonic() - self.checked
        stale = age > 2 * self.period_s + self.timeout_s  # the probe itself is stuck
        return ("unknown (probe stale)" if stale else self.state), age


def _running_replicas(app: str) -> int | None:
    """Running replicas of the Serve application `app` (None if there is no such application)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return None
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


class ClientLimit:
    """Classifications in progress per named client, at most `limit` each (None: no limit).

    One per ingress replica, used from its one event loop only: counting needs no lock. `hold` releases
    the place however the request ends -- answer, error, timeout, or the client going away (Serve then
    cancels the handler, and the CancelledError passes through the `finally`).
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.ongoing: dict[str, int] = {}

    def admit(self, client: str) -> bool:
        """Take a place for `client` if it has one left."""
        n = self.ongoing.get(client, 0)
        if self.limit is not None and n >= self.limit:
            return False
        self.ongoing[client] = n + 1
        return True

    def release(self, client: str) -> None:
        n = self.ongoing.get(client, 0) - 1
        if n > 0:
            self.ongoing[client] = n
        else:
            self.ongoing.pop(client, None)  # no entry per client ever seen: the dict stays as small as the load

    async def hold(self, user: Any, work: Callable[[], Awaitable[Any]],
                   refused: Callable[[], Any]) -> Any:
        """`work()` inside a place of `user`'s (a named `Client`; anyone else is not counted), else `refused()`."""
        if not getattr(user, "named", False):
            return await work()
        name = user.username
        if not self.admit(name):
            return refused()
        try:
            return await work()
        finally:
            self.release(name)


@serve.deployment
@serve.ingress()
class IntentClassifierApp:
    args_type: type[ClassifierAppArgs] = ProgramAppArgs

    async def __init__(self, args: dict[str, Any], worker: DeploymentHandle) -> None:
        self.args = self.args_type.model_validate(args)
        self.params = self.served_params()
        self.labels = frozenset(self.params.labels)
        self.count_tokens = token_counter(self.args.tokenizer)
        self.worker = worker
        self.probe = LLMProbe(self.args.llm_base(), bearer_headers(self.args.llm_key_env()), self.args.health_probe_s,
                              self.args.llm_app)
        self.probe.start()
        self.request_log = RequestLog(self.args.request_log) if self.args.request_log else None
        self.client_limit = ClientLimit(self.args.max_ongoing_per_client)

    def __serve_build_asgi_app__(self) -> FastAPI:  # Ray Serve calls this once the replica is constructed
        return make_api(self)

    def served_params(self) -> DeployParams:
        """The served model's id and labels (the worker loads the program itself)."""
        return DeployParams.load(self.args.deploy_params)  # type: ignore[attr-defined]

    def response(self, outcome: Outcome, latency_ms: float) -> ClassifyResponse:
        return ClassifyResponse(label=outcome.label, model=self.params.model, confidence=outcome.confidence,
                                latency_ms=latency_ms)

    def _unavailable(self, message: str) -> JSONResponse:
        retry = self.args.retry_after_s
        return _error(503, message, headers={"Retry-After": str(math.ceil(retry))} if retry is not None else None)

    def _over_limit(self) -> JSONResponse:
        retry, limit = self.args.retry_after_s, self.args.max_ongoing_per_client
        return _error(429, f"this client already has {limit} classifications in progress, the most one client may "
                      f"have (max_ongoing_per_client: {limit}); retry when one has ended",
                      headers={"Retry-After": str(math.ceil(retry))} if retry is not None else None)

    async def classify_for(self, user: Any, body: ClassifyRequest) -> Any:
        """`classify`, within the calling client's share (`max_ongoing_per_client`): else a 429 at once."""
        return await self.client_limit.hold(user, lambda: self.classify(body), self._over_limit)

    def healthz(self) -> JSONResponse:
        llm, age = self.probe.snapshot()
        body = {"status": "ok" if llm in LLMProbe.HEALTHY else "degraded", "model": self.params.model, "llm": llm,
                "llm_checked_s_ago": None if age is None else round(age, 1), "labels": len(self.labels)}
        return JSONResponse(status_code=200 if llm in LLMProbe.HEALTHY else 503, content=body)

    async def classify(self, body: ClassifyRequest) -> Any:
        """The student's answer as the client gets it: a ClassifyResponse or an error response."""
        started = time.perf_counter()
        outcome = await self.ask(body, time.time() + self.args.timeout_s)
        if not isinstance(outcome, Outcome):
            return outcome
        latency_ms = round(1000 * (time.perf_counter() - started), 1)
        if self.request_log is not None:
            self.request_log.answered(body.query.strip(), outcome.label or "", self.params.model, latency_ms,
                                      outcome.confidence)
        return self.response(outcome, latency_ms)

    async def ask(self, body: ClassifyRequest, deadline: float) -> "Outcome | JSONResponse":
        """The worker's answer (status 200), or the error response for the client."""
        query = body.query.strip()
        if not query:
            return _error(422, "query: must not be empty or whitespace only")
        if len(query) > self.args.max_query_chars:
            return _error(422, f"query: longer than {self.args.max_query_chars} characters ({len(query)})")
        if (n := self.count_tokens(query)) > self.args.max_query_tokens:
            return _error(422, f"query: longer than {self.args.max_query_tokens} tokens ({n})")
        if self.probe.down.is_set():
            return self._unavailable("the LLM application is unavailable (no running replica); retry later")
        response = self.worker.classify.remote(query, deadline)
        # The worker keeps the deadline itself; this bound (plus a moment for its answer to come back)
        # also covers the time spent waiting for a free worker. If the LLM's replica goes down meanwhile,
        # the call would wait for its successor: it is withdrawn at once instead.
        answer = asyncio.ensure_future(asyncio.wait_for(response, deadline - time.time() + 0.25))
        went_down = asyncio.ensure_future(self.probe.down.wait())
        try:
            await asyncio.wait({answer, went_down}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                answer.cancel()
                response.cancel()
                return self._unavailable("the LLM application is unavailable (no running replica); retry later")
            outcome: Outcome = answer.result()
        except BackPressureError:
            return self._unavailable("the classifier is at capacity; retry later")
        except asyncio.TimeoutError:
            response.cancel()
            return self._unavailable(f"no answer within {self.args.timeout_s:g} s")
        except asyncio.CancelledError:  # the client went away: so does the work
            answer.cancel()
            response.cancel()
            raise
        except Exception:  # noqa: BLE001 - a failed worker replica, logged with its traceback
            logger.exception("classification failed in the worker")
            return self._unavailable("the classifier is unavailable")
        finally:
            went_down.cancel()
        if outcome.status == 503:
            return self._unavailable(outcome.detail or "the LLM application is unavailable")
        if outcome.status != 200:
            return _error(outcome.status, outcome.detail or "")
        return outcome


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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message}, headers=headers)


def make_api(app: IntentClassifierApp) -> FastAPI:
    """The FastAPI app of one ingress replica, built from its args."""
    args = app.args
    api = FastAPI(title="distill intent classifier", description="POST /classify_intent {'query': '...'}",
                  **({} if args.docs else NO_DOCS))
    api.add_middleware(_ExactPrefix)
    api.add_middleware(BodyLimits, max_bytes=args.max_body_bytes, timeout_s=args.body_timeout_s, error=_error)
    # Added last, so it runs first: no body is read for a caller without the key.
    require_key(api, args.key_env(), lambda _conn, exc: _error(401, str(exc)), clients_env=args.api_keys_env)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, _ = describe_validation_errors(
            list(exc.errors()), unknown="unknown field '{}' (send {{\"query\": ...}})",
            missing="missing field '{}' (send {{\"query\": ...}})")
        return _error(422, message)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers an undecodable or too deeply nested body with a bare 400: for us that is bad input.
        if exc.status_code == 400:
            return _error(422, "request body is not valid JSON text (UTF-8)")
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in /classify_intent")  # the traceback stays in the server log
        return _error(500, "internal error; see the server log")

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        return app.healthz()

    # At route_prefix /classify_intent, POST /classify_intent reaches "/" (see _ExactPrefix); deployed
    # alone at route "/", the same handler answers POST /classify_intent.
    @api.post("/")
    @api.post("/classify_intent")
    async def classify_intent(request: Request, body: ClassifyRequest) -> Any:
        return await app.classify_for(request.user, body)

    return api


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve builder (`import_path: distill.serving.app:build_app`)."""
    parsed = parse_app_args(ProgramAppArgs, args, "distill.serving.app:build_app")
    raw = parsed.model_dump()
    return bind_ingress(IntentClassifierApp, parsed, raw, raw)


def bind_ingress(ingress: Any, parsed: ClassifierAppArgs, raw: dict[str, Any],
                 worker_args: dict[str, Any], worker: Any = ClassifierWorker) -> serve.Application:
    """`ingress` (bound with `raw`) in front of its `worker` deployment (bound with `worker_args`), both sized
    and load-shed from `parsed`: the program app, the cascade and the teacher program app deploy the same way."""
    if parsed.api_keys_env and os.environ.get(parsed.api_keys_env, "").strip():
        # A malformed value is refused here, at deploy time, where the replicas would only fail to start.
        parse_client_keys(os.environ[parsed.api_keys_env], parsed.api_keys_env)
    shed = backpressure(parsed.retry_after_s)
    bound_worker = worker.options(
        num_replicas=parsed.num_replicas,
        max_ongoing_requests=parsed.threads,
        max_queued_requests=parsed.max_queued_requests,
        backpressure_config=shed,
        ray_actor_options={"num_cpus": parsed.num_cpus},
    ).bind(worker_args)
    return ingress.options(
        num_replicas=parsed.num_replicas,
        max_ongoing_requests=parsed.max_ongoing_requests,
        max_queued_requests=parsed.max_ongoing_requests,
        backpressure_config=shed,
        ray_actor_options={"num_cpus": parsed.num_cpus},
    ).bind(raw, bound_worker)
