"""A Ray Serve application that serves GGUF models with llama-cpp-python behind the OpenAI chat API.

`POST /v1/chat/completions` and `GET /v1/models`. A `response_format` of type `json_schema` (what the
`openai` client and DSPy's JSONAdapter send) is compiled into a llama.cpp grammar with llama-cpp-python's
own JSON-schema converter, so a schema with an enum can only ever produce one of its values. llama.cpp's
own form `{"type": "json_object", "schema": ...}` is accepted too.

A `Llama` object is not thread-safe: each model has a lock and generation runs in a worker thread, so
the replica's event loop stays free; throughput scales with `num_replicas`.
"""


import asyncio
import json
import time
import uuid
from functools import lru_cache
from typing import Any, Literal

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from distill.config import resolve_path
from distill.models import ModelSource
from distill.serving.common import authorized, describe_validation_errors, parse_app_args

# --- configuration ------------------------------------------------------------------------------


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="The id clients put in `model`.")
    source: ModelSource
    lora_path: str | None = Field(None, description="A llama.cpp LoRA adapter (GGUF) applied on top.")
    n_ctx: int = Field(2048, ge=128)
    default_max_tokens: int = Field(256, ge=1)


class LLMAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(..., min_length=1)
    n_threads: int = Field(2, ge=1)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per replica; keep below the node's total.")
    max_ongoing_requests: int = Field(16, ge=1)
    api_key_env: str | None = Field(None, description="If this variable is set, requests need its Bearer key.")


# --- OpenAI request shapes -------------------------------------------------------------------------


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextPart(_Req):
    type: Literal["text"]
    text: str


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class JSONSchemaSpec(_Req):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(..., alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama.cpp's json_object + schema form

    def schema_dict(self) -> dict[str, Any] | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format of type json_schema needs a 'json_schema' object")
            return self.json_schema.schema_
        return self.schema_ if self.type == "json_object" else None


class ChatCompletionRequest(_Req):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    stream: bool = False
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, v: bool) -> bool:
        if v:
            raise ValueError("streaming is not supported by this server; send stream=false")
        return v

    def token_budget(self, default: int) -> int:
        # `max_completion_tokens` is the newer OpenAI name (DSPy's native engine sends it).
        given = [t for t in (self.max_tokens, self.max_completion_tokens) if t is not None]
        return min(given) if given else default


# --- errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": type_, "param": param}})


api = FastAPI(title="distill llama.cpp OpenAI server")


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_errors(
        list(exc.errors()), unknown="unsupported parameter '{}'", missing="missing required parameter '{}'")
    return error_response(400, message, param=param)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.type, exc.param)


# --- the engine -----------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _grammar(schema_json: str):  # noqa: ANN202 - LlamaGrammar, imported lazily
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_json_schema(schema_json, verbose=False)


def grammar_for(fmt: ResponseFormat | None):  # noqa: ANN201
    """The grammar that enforces `fmt`, or None for free text. Never silently drops a schema."""
    if fmt is None or fmt.type == "text":
        return None
    try:
        schema = fmt.schema_dict()
    except ValueError as e:
        raise APIError(400, str(e), param="response_format") from None
    if schema is None:  # plain JSON mode
        from llama_cpp import LlamaGrammar
        from llama_cpp.llama_grammar import JSON_GBNF

        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    try:
        return _grammar(json.dumps(schema, sort_keys=True))
    except Exception as e:  # noqa: BLE001 - the converter raises assorted types
        raise APIError(400, f"response_format schema cannot be compiled to a grammar: {e}", param="response_format")


class LlamaCppEngine:
    """The models of one replica, each a `llama_cpp.Llama` with its own lock. Usable without Ray."""

    def __init__(self, args: LLMAppArgs) -> None:
        from llama_cpp import Llama

        self.args = args
        self.specs = {m.name: m for m in args.models}
        self.llamas: dict[str, Llama] = {}
        for m in args.models:
            self.llamas[m.name] = Llama(
                model_path=str(m.source.resolve()),
                lora_path=str(resolve_path(m.lora_path)) if m.lora_path else None,
                n_ctx=m.n_ctx,
                n_threads=args.n_threads,
                n_threads_batch=args.n_threads,
                verbose=False,
            )
        self.locks = {name: asyncio.Lock() for name in self.llamas}
        self.created = int(time.time())

    def model_list(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": self.created, "owned_by": "distill"} for n in self.llamas],
        }

    def _generate(self, req: ChatCompletionRequest, grammar: Any) -> dict[str, Any]:
        spec, llama = self.specs[req.model], self.llamas[req.model]
        try:
            out = llama.create_chat_completion(
                messages=[{"role": m.role, "content": m.text()} for m in req.messages],
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.token_budget(spec.default_max_tokens),
                stop=req.stop or [],
                seed=req.seed,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                grammar=grammar,
            )
        except ValueError as e:  # e.g. "Requested tokens (...) exceed context window of ..."
            raise APIError(400, str(e), param="messages") from None
        out["model"] = req.model
        out["id"] = f"chatcmpl-{uuid.uuid4().hex}"
        return out

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        if req.model not in self.llamas:
            raise APIError(404, f"model '{req.model}' not found; available: {sorted(self.llamas)}", param="model",
                           type_="not_found_error")
        grammar = grammar_for(req.response_format)
        async with self.locks[req.model]:
            return await asyncio.to_thread(self._generate, req, grammar)


# --- the Ray Serve deployment ---------------------------------------------------------------------


@serve.deployment
@serve.ingress(api)
class LlamaCppServer:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = LLMAppArgs.model_validate(args)
        self.engine = LlamaCppEngine(self.args)

    def _authorize(self, authorization: str | None) -> None:
        if not authorized(authorization, self.args.api_key_env):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           type_="authentication_error")

    @api.get("/v1/models")
    async def models(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        self._authorize(authorization)
        return self.engine.model_list()

    @api.post("/v1/chat/completions")
    async def chat_completions(
        self, body: ChatCompletionRequest, authorization: str | None = Header(None)
    ) -> dict[str, Any]:
        self._authorize(authorization)
        return await self.engine.chat(body)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve builder (`import_path: distill.serving.llm:build_app`)."""
    parsed = parse_app_args(LLMAppArgs, args, "distill.serving.llm:build_app")
    return LlamaCppServer.options(
        num_replicas=parsed.num_replicas,
        max_ongoing_requests=parsed.max_ongoing_requests,
        ray_actor_options={"num_cpus": parsed.num_cpus},
    ).bind(parsed.model_dump(by_alias=True))
