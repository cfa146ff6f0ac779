"""A Ray Serve application that serves GGUF models with llama-cpp-python behind the OpenAI chat API.

`POST /v1/chat/completions` and `GET /v1/models`. A `response_format` of type `json_schema` (what the
`openai` client and DSPy's JSONAdapter send) is compiled into a llama.cpp grammar with llama-cpp-python's
own JSON-schema converter, so a schema with an enum can only ever produce one of its values. llama.cpp's
own form `{"type": "json_object", "schema": ...}` is accepted too. A schema that admits a closed set of
strings (a classifier's label enum) is decoded over those answers' tokens instead, a forward pass per
branch rather than per token (`distill.serving.choices`; `choice_decoding: false` turns it off).

A `Llama` object is not thread-safe and crashes the process (SIGSEGV, GGML_ASSERT) when two threads drive
it. Each model therefore has its own one-thread executor: a generation is handed to it and the next one
starts only when that thread has really returned, even if the request that started it was cancelled. A
cancelled request (client gone, proxy timeout) sets a flag that the generation reads after every token,
so abandoned work stops at once instead of holding the model. Throughput scales with `num_replicas`.

Work is bounded: `max_tokens` is capped per model, the request body's size and arrival time are capped
(413, 408), generations waiting for a model can be capped (`max_queued_generations`), and beyond
`max_ongoing_requests` + `max_queued_requests` the proxy answers 503 with `Retry-After` at once. A schema
reaches generation only once llama.cpp's parser has built its sampler in a child process
(`distill.serving.grammar`): a grammar it rejects, or one that crashes it, is a 400, never a dead replica.
"""


import asyncio
import json
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Annotated, Any, Literal, Sequence

import llama_cpp
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from llama_cpp import Llama, LlamaGrammar, StoppingCriteriaList
from llama_cpp.llama_grammar import JSON_GBNF
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from distill.config import resolve_path
from distill.models import ModelSource
from distill.serving.choices import ChoiceTrie, Decoded, Streaks, answers_for, decode
from distill.serving.common import (
    NO_DOCS,
    BodyLimits,
    backpressure,
    describe_validation_errors,
    parse_app_args,
    require_key,
    valid_unicode,
)
from distill.serving.grammar import GrammarProver, GrammarRefused, schema_to_gbnf

logger = logging.getLogger("ray.serve")

# --- configuration ------------------------------------------------------------------------------


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="The id clients put in `model`.")
    source: ModelSource
    lora_path: str | None = Field(None, description="A llama.cpp LoRA adapter (GGUF) applied on top.")
    n_ctx: int = Field(2048, ge=128)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(512, ge=1, description="A request's max_tokens is capped at this.")

    @model_validator(mode="after")
    def _default_within_limit(self) -> "ModelSpec":
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit "
                             f"({self.max_tokens_limit})")
        return self


class LLMAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(..., min_length=1)
    n_threads: int = Field(2, ge=1)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per replica; keep below the node's total.")
    max_ongoing_requests: int = Field(
        8, ge=1, description="Requests one replica holds (one generation per model runs, the rest wait for it).")
    max_queued_requests: int = Field(
        64, ge=-1, description="Requests each caller (proxy) queues beyond that; then 503 at once (-1: no limit).")
    max_queued_generations: int | None = Field(
        None, ge=0, description="Generations that may wait for a model (per model, in the replica); then 503 "
        "at once. Lets max_ongoing_requests be large, so that requests still sending their body, which hold a "
        "replica slot, cannot crowd out generations (null: no limit of its own).")
    retry_after_s: float | None = Field(2.0, ge=0, description="Retry-After of those 503s (null: no header).")
    api_key_env: str | None = Field(None, description="If this variable is set, requests need its Bearer key.")
    api_key_fallback_env: str | None = Field(
        None, description="...else this one's (the deployment's shared key): the app has a key of its own only "
        "when `api_key_env` is set.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get a 413.")
    body_timeout_s: float = Field(10.0, gt=0, description="A request body not in this long after the replica got "
                                  "the request is a 408 (slow clients cannot hold a slot).")
    health_check_period_s: float = Field(
        2.0, gt=0, description="How often Serve checks the replica: a crashed one is noticed (and its callers "
        "told) within about this long.")
    docs: bool = Field(False, description="Serve /docs and /openapi.json (behind the key, if one is set).")
    choice_decoding: bool = Field(
        True, description="Decode a schema that admits a closed set of strings over their tokens "
        "(distill.serving.choices) instead of sampling under llama.cpp's grammar; false: always the grammar.")


# --- OpenAI request shapes -------------------------------------------------------------------------

Text = Annotated[str, AfterValidator(valid_unicode)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextPart(_Req):
    type: Literal["text"]
    text: Text


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _unicode(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        # Checked here rather than in the type: an error inside a union would be reported once per branch.
        return valid_unicode(v) if isinstance(v, str) else v

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
    stop: Annotated[Text, Field(max_length=1000)] | Annotated[list[Annotated[Text, Field(max_length=1000)]], Field(max_length=16)] | None = None
    n: int = 1
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="llama.cpp's seed is an unsigned 32-bit integer.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    response_format: ResponseFormat | None = None
    stream: bool = False
    user: str | None = None
    # Token log-probabilities are given for closed-set answers only (`distill.serving.choices`): there they
    # are the model's distribution over the tokens the answers allow, so the answer's probability is the
    # exp of their sum. On the grammar path llama.cpp would need logits for every position: `null` instead.
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

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

    def token_budget(self, default: int, limit: int | None = None) -> int:
        # `max_completion_tokens` is the newer OpenAI name (DSPy's native engine sends it).
        given = [t for t in (self.max_tokens, self.max_completion_tokens) if t is not None]
        budget = min(given) if given else default
        return budget if limit is None else min(budget, limit)


# --- errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return JSONResponse(status_code=status, content={"error": error}, headers=headers)


# --- the engine -----------------------------------------------------------------------------------


def _schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    try:
        return fmt.schema_dict() if fmt is not None and fmt.type != "text" else None
    except ValueError as e:
        raise APIError(400, str(e), param="response_format") from None


@lru_cache(maxsize=256)
def _gbnf(schema_json: str) -> str:
    return schema_to_gbnf(json.loads(schema_json))


def grammar_text(fmt: ResponseFormat | None) -> str | None:
    """The GBNF text that enforces `fmt`, or None for free text. Never silently drops a schema; a schema
    beyond `distill.serving.grammar.LIMITS`, or one the converter cannot express, is a 400 naming why.
    Not yet proven: `LlamaCppEngine.chat` has llama.cpp's parser check it in a child process first."""
    if fmt is None or fmt.type == "text":
        return None
    schema = _schema(fmt)
    if schema is None:  # plain JSON mode
        return JSON_GBNF
    try:
        return _gbnf(json.dumps(schema, sort_keys=True))
    except GrammarRefused as e:
        raise APIError(400, f"response_format: {e}", param="response_format", code="unsupported_schema") from None


def proven_grammar(req: ChatCompletionRequest, prover: GrammarProver) -> LlamaGrammar | None:
    """The request's grammar once llama.cpp's parser, in `prover`'s child process, has built and applied
    it; else a 400 naming why. Blocking (the engine runs it on its grammar-check thread)."""
    text = grammar_text(req.response_format)
    if text is None:
        return None
    try:
        prover.prove(text)
    except GrammarRefused as e:
        raise APIError(400, f"response_format: {e}", param="response_format", code="unsupported_schema") from None
    return LlamaGrammar.from_string(text, verbose=False)


def choices_for(req: ChatCompletionRequest) -> list[str] | None:
    """The closed set of answers to decode over (`distill.serving.choices`), or None for the grammar path:
    the schema must admit a closed set, and nothing in the request may act on the text as it is generated."""
    schema = _schema(req.response_format)
    if schema is None or req.stop or req.presence_penalty or req.frequency_penalty:
        return None
    return answers_for(schema)


class ServedLlama(Llama):
    """A `Llama` whose completions end as soon as `stop_flag` is set, and that decodes a closed set of
    `answers` (see `distill.serving.choices`) instead of sampling under the grammar.

    `create_chat_completion` takes neither, but every chat handler formats and tokenizes the messages and
    then calls `create_completion`, which is where both take effect: the stopping criterion is read after
    each generated token, and the answers are decoded from the same prompt tokens the grammar path would
    see. Only the model's own executor thread sets the two attributes, one generation at a time.
    """

    stop_flag: threading.Event | None = None
    answers: list[str] | None = None
    TRIES = 64  # answer sets whose tries are kept (a student has one; a teacher's candidate sets vary)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tries: dict[tuple[str, ...], ChoiceTrie] = {}
        self._streaks: Streaks = {}
        self._grammars_ok: set[str] = set()

    def _check_grammar(self, grammar: LlamaGrammar) -> None:
        """Build the grammar's sampler here, as generation will, and refuse it if llama.cpp returns NULL:
        llama-cpp-python would chain the NULL sampler and crash at the first `sample`. Only grammars the
        child process has proven reach this point, so the parser cannot crash this process here."""
        if grammar._grammar in self._grammars_ok:
            return
        sampler = llama_cpp.llama_sampler_init_grammar(self._model.vocab, grammar._grammar.encode(), b"root")
        if not sampler:
            raise APIError(400, "response_format: llama.cpp cannot build a sampler for the schema's grammar",
                           param="response_format", code="unsupported_schema")
        llama_cpp.llama_sampler_free(sampler)
        if len(self._grammars_ok) >= 1024:
            self._grammars_ok.clear()
        self._grammars_ok.add(grammar._grammar)

    def _trie(self, answers: list[str]) -> ChoiceTrie:
        # Tokenizing every answer costs a good part of a forward pass: once per answer set, not per request.
        key = tuple(answers)
        if (trie := self._tries.pop(key, None)) is None:
            trie = ChoiceTrie(answers, lambda s: self.tokenize(s.encode(), add_bos=False, special=False))
            if len(self._tries) >= self.TRIES:
                self._tries.pop(next(iter(self._tries)))  # the least recently used
        self._tries[key] = trie
        return trie

    def create_completion(self, prompt: Any, *args: Any,
                          stopping_criteria: StoppingCriteriaList | None = None, **kwargs: Any) -> Any:
        if (grammar := kwargs.get("grammar")) is not None:
            self._check_grammar(grammar)
        flag = self.stop_flag
        if self.answers is not None and not args and isinstance(prompt, list):
            trie = self._trie(self.answers)
            max_tokens = kwargs.get("max_tokens")
            # Otherwise the grammar path truncates the answer or refuses the prompt, as for any schema.
            if (max_tokens is None or max_tokens <= 0 or trie.longest <= max_tokens) \
                    and len(prompt) + trie.longest <= self.n_ctx():
                return self._complete_choice(trie, prompt, flag, **kwargs)
        kwargs["logprobs"] = None  # the grammar path: see ChatCompletionRequest.logprobs
        if flag is not None:
            stopping_criteria = StoppingCriteriaList([lambda _ids, _logits: flag.is_set(), *(stopping_criteria or [])])
        return super().create_completion(prompt, *args, stopping_criteria=stopping_criteria, **kwargs)

    def _complete_choice(self, trie: ChoiceTrie, prompt: list[int], flag: threading.Event | None,
                         temperature: float = 0.8, top_p: float = 0.95, seed: int | None = None,
                         logprobs: int | None = None, **_: Any) -> dict[str, Any]:
        # The chat template's stop strings end free text; an answer from the set ends by itself (requests
        # with stop strings or penalties of their own never come here: `choices_for`).
        if len(self._streaks) > 4096:  # paths through many answer sets: start over rather than grow
            self._streaks.clear()
        out = decode(trie, prompt, self._forward, temperature, top_p, np.random.default_rng(seed),
                     stopped=(flag.is_set if flag is not None else lambda: False), streaks=self._streaks)
        text = out.answer if out.answer is not None else self.detokenize(out.tokens).decode(errors="ignore")
        return {
            "id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_path,
            "choices": [{"text": text, "index": 0, "finish_reason": "stop",
                         "logprobs": None if logprobs is None else self._logprobs(out, logprobs)}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(out.tokens),
                      "total_tokens": len(prompt) + len(out.tokens)},
        }

    def _logprobs(self, out: Decoded, top: int) -> dict[str, Any]:
        """llama-cpp-python's completion logprobs (its chat handler turns them into OpenAI's), restricted
        to the answers: the alternatives are the allowed tokens, most likely first, at most `top`."""
        words = [self.detokenize([t]).decode(errors="replace") for t in out.tokens]
        offsets = np.cumsum([0, *map(len, words)])[:-1].tolist()
        tops = [{self.detokenize([t]).decode(errors="replace"): lp
                 for t, lp in sorted(alt.items(), key=lambda kv: -kv[1])[:top]} for alt in out.alternatives]
        return {"tokens": words, "text_offset": offsets, "token_logprobs": out.logprobs, "top_logprobs": tops}

    def _forward(self, tokens: list[int], ahead: Sequence[int] = ()) -> list[np.ndarray]:
        """The next-token logits after `tokens` (and after `tokens + ahead`, from the same pass), reusing
        the KV cache of the longest prefix already evaluated (as `Llama.generate` does), so shared system
        prompts are not evaluated again."""
        seq = [*tokens, *ahead]
        reuse = min(self.longest_token_prefix(self._input_ids, seq), len(tokens) - 1)
        if reuse <= 0 or not self._ctx.kv_cache_seq_rm(-1, reuse, -1):
            reuse = 0
            self._ctx.kv_cache_seq_rm(-1, 0, -1)  # nothing to reuse: the batch below starts at position 0
        self.n_tokens = reuse
        # `Llama.eval` up to the last batch; that one asks llama.cpp for logits at both positions.
        start = max(reuse, len(seq) - self.n_batch)
        if start > len(tokens) - 1:  # `ahead` alone fills a batch: two passes (never for a label set)
            return [self._forward(tokens)[0], *self._forward(seq)]
        if start > reuse:
            self.eval(seq[reuse:start])
        ends = [len(tokens), len(seq)] if ahead else [len(seq)]
        self._batch.set_batch(batch=seq[start:], n_past=start, logits_all=False)
        for end in ends:
            self._batch.batch.logits[end - 1 - start] = True
        self._ctx.decode(self._batch)
        self.input_ids[start:len(seq)] = seq[start:]
        self.n_tokens = len(seq)
        return [np.ctypeslib.as_array(self._ctx.get_logits_ith(end - 1 - start), shape=(self.n_vocab(),)).copy()
                for end in ends]


class LlamaCppEngine:
    """The models of one replica, each a `Llama` driven by its own one-thread executor. Usable without Ray."""

    def __init__(self, args: LLMAppArgs) -> None:
        self.args = args
        self.specs = {m.name: m for m in args.models}
        self.llamas: dict[str, ServedLlama] = {}
        for m in args.models:
            self.llamas[m.name] = ServedLlama(
                model_path=str(m.source.resolve()),
                lora_path=str(resolve_path(m.lora_path)) if m.lora_path else None,
                n_ctx=m.n_ctx,
                n_threads=args.n_threads,
                n_threads_batch=args.n_threads,
                verbose=False,
            )
        # The executor is the model's lock: its single thread is the only one that ever touches the Llama.
        self.executors = {name: ThreadPoolExecutor(1, thread_name_prefix=f"llama-{name}") for name in self.llamas}
        # One grammar checker per distinct GGUF (a LoRA does not change the vocabulary); checks take turns
        # on their own thread, never on a model's.
        by_path: dict[str, GrammarProver] = {}
        self.provers = {name: by_path.setdefault(llama.model_path, GrammarProver(llama.model_path))
                        for name, llama in self.llamas.items()}
        self.prover_executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-check")
        self.in_flight = {name: 0 for name in self.llamas}  # generations running or waiting, per model
        self.created = int(time.time())

        for prover in by_path.values():  # start each checker now rather than on the first request
            prover.prove(JSON_GBNF)

    async def grammar_for(self, req: ChatCompletionRequest) -> LlamaGrammar | None:
        return await asyncio.get_running_loop().run_in_executor(
            self.prover_executor, proven_grammar, req, self.provers[req.model])

    def model_list(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": self.created, "owned_by": "distill"} for n in self.llamas],
        }

    def _generate(self, req: ChatCompletionRequest, grammar: LlamaGrammar | None, stop: threading.Event) -> dict[str, Any]:
        spec, llama = self.specs[req.model], self.llamas[req.model]
        if stop.is_set():  # cancelled while it waited for the model
            return {}
        started = time.perf_counter()
        llama.stop_flag = stop
        llama.answers = choices_for(req) if self.args.choice_decoding else None
        try:
            out = llama.create_chat_completion(
                messages=[{"role": m.role, "content": m.text()} for m in req.messages],
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=req.token_budget(spec.default_max_tokens, spec.max_tokens_limit),
                stop=req.stop or [],
                seed=req.seed,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                grammar=grammar,
                # llama-cpp-python asks for none unless top_logprobs is given too
                logprobs=req.logprobs,
                top_logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            )
        except ValueError as e:  # e.g. "Requested tokens (...) exceed context window of ..."
            # OpenAI's code for it, which clients (DSPy included) turn into a context-window error.
            code = "context_length_exceeded" if "context window" in str(e) else None
            raise APIError(400, str(e), param="messages", code=code) from None
        finally:
            llama.stop_flag = None
            llama.answers = None
        if stop.is_set():
            logger.info("generation for a cancelled request stopped after %d tokens, %.2f s",
                        out["usage"]["completion_tokens"], time.perf_counter() - started)
        out["model"] = req.model
        out["id"] = f"chatcmpl-{uuid.uuid4().hex}"
        return out

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        if req.model not in self.llamas:
            raise APIError(404, f"model '{req.model}' not found; available: {sorted(self.llamas)}", param="model",
                           type_="not_found_error")
        grammar = await self.grammar_for(req)
        limit = self.args.max_queued_generations
        if limit is not None and self.in_flight[req.model] > limit:  # one running + `limit` waiting
            retry = self.args.retry_after_s
            raise APIError(503, f"model '{req.model}' is at capacity; retry later", type_="server_error",
                           headers={"Retry-After": str(math.ceil(retry))} if retry is not None else None)
        stop = threading.Event()
        self.in_flight[req.model] += 1
        job = asyncio.get_running_loop().run_in_executor(self.executors[req.model], self._generate, req, grammar, stop)
        try:
            return await job
        except asyncio.CancelledError:
            # Cancelling `job` dequeues a generation that has not started; a running one cannot be
            # interrupted from here, so it is told to stop at its next token. Either way the executor
            # starts nothing else on this model until its thread is free.
            stop.set()
            raise
        finally:
            self.in_flight[req.model] -= 1


# --- the HTTP application -------------------------------------------------------------------------


def make_api(engine: LlamaCppEngine, args: LLMAppArgs) -> FastAPI:
    """The OpenAI-compatible FastAPI app over `engine`, built per replica from its args (usable without Ray)."""
    api = FastAPI(title="distill llama.cpp OpenAI server", **({} if args.docs else NO_DOCS))
    api.add_middleware(BodyLimits, max_bytes=args.max_body_bytes, timeout_s=args.body_timeout_s,
                       error=lambda status, message, headers: error_response(status, message, headers=headers))
    # Added last, so it runs first: no body is read for a caller without the key.
    require_key(api, (args.api_key_env, args.api_key_fallback_env), lambda _conn, exc: error_response(401, str(exc), "authentication_error"))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(
            list(exc.errors()), unknown="unsupported parameter '{}'", missing="missing required parameter '{}'")
        return error_response(400, message, param=param)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers an undecodable or too deeply nested body with a bare 400, an oversized one with 413.
        messages = {400: "request body is not valid JSON text (UTF-8)"}
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)), headers=exc.headers)

    @api.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, code=exc.code, headers=exc.headers)

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in the LLM application")  # the details stay in the server log
        return error_response(500, "internal error; see the server log", type_="server_error")

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return engine.model_list()

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> dict[str, Any]:
        return await engine.chat(body)

    return api


# --- the Ray Serve deployment ---------------------------------------------------------------------


@serve.deployment
@serve.ingress()
class LlamaCppServer:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = LLMAppArgs.model_validate(args)
        self.engine = LlamaCppEngine(self.args)

    def __serve_build_asgi_app__(self) -> FastAPI:  # Ray Serve calls this once the replica is constructed
        return make_api(self.engine, self.args)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve builder (`import_path: distill.serving.llm:build_app`)."""
    parsed = parse_app_args(LLMAppArgs, args, "distill.serving.llm:build_app")
    return LlamaCppServer.options(
        num_replicas=parsed.num_replicas,
        max_ongoing_requests=parsed.max_ongoing_requests,
        max_queued_requests=parsed.max_queued_requests,
        backpressure_config=backpressure(parsed.retry_after_s),
        health_check_period_s=parsed.health_check_period_s,
        ray_actor_options={"num_cpus": parsed.num_cpus},
    ).bind(parsed.model_dump(by_alias=True))
