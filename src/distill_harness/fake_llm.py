"""A fixed-latency OpenAI-compatible endpoint on Ray Serve: the fixture of the labeling scale benchmark.

It stands in for a teacher whose speed we choose, so that what is measured is the labeling pipeline
(distill.teacher.labeling_ray) and not a model: every chat completion waits `latency_s` and answers a valid
JSON label -- one of the `enum` values in the request's JSON schema, picked from a hash of the last
message, so a query always gets the same label. A replica serves at most `max_ongoing_requests` at a time
(more wait in Serve's queue): the endpoint saturates at num_replicas x max_ongoing_requests / latency_s
requests per second.

    serve.run(build_app({"latency_s": 0.05, "num_replicas": 2}), route_prefix="/")
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself in the Serve ingress (as a
# string it took it for a query parameter and answered 422, as distill.serving.llm also avoids).
import asyncio
import hashlib
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from distill.serving.common import NO_DOCS, parse_app_args


class FakeLLMArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("fake-teacher", description="The id it serves.")
    latency_s: float = Field(0.05, ge=0.0, description="Every completion takes this long.")
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(2, ge=1, description="Concurrent completions per replica.")
    num_cpus: float = Field(0.1, gt=0, description="It only sleeps: a sliver of a CPU.")


def _enum(schema: Any) -> list[str] | None:
    """The first `enum` in a JSON schema (the label's allowed values), depth first."""
    if isinstance(schema, dict):
        if isinstance(schema.get("enum"), list):
            return [str(v) for v in schema["enum"]]
        children = schema.values()
    elif isinstance(schema, list):
        children = schema
    else:
        return None
    for child in children:
        if (found := _enum(child)) is not None:
            return found
    return None


def answer(body: dict[str, Any]) -> str:
    """A label the request's schema allows, the same one for the same last message."""
    fmt = body.get("response_format") or {}
    labels = _enum(fmt.get("json_schema", fmt)) or ["unknown"]
    last = str((body.get("messages") or [{}])[-1].get("content", ""))
    pick = int(hashlib.sha1(last.encode()).hexdigest(), 16) % len(labels)
    return json.dumps({"label": labels[pick]})


api = FastAPI(**NO_DOCS)


@serve.deployment
@serve.ingress(api)
class FixedLatencyLLM:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = FakeLLMArgs.model_validate(args)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.args.model, "object": "model", "owned_by": "distill"}]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        await asyncio.sleep(self.args.latency_s)
        content = answer(body)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.args.model),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve builder (`import_path: distill_harness.fake_llm:build_app`)."""
    parsed = parse_app_args(FakeLLMArgs, args, "distill_harness.fake_llm:build_app")
    return FixedLatencyLLM.options(
        num_replicas=parsed.num_replicas, max_ongoing_requests=parsed.max_ongoing_requests,
        ray_actor_options={"num_cpus": parsed.num_cpus},
    ).bind(parsed.model_dump())
