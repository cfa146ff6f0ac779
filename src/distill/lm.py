"""The DSPy client: `dspy.LM`s for the profile's endpoints and every adapter that formats their prompts.

The LMs are declared so that DSPy's structured output is really enforced.

For an unknown self-hosted model DSPy assumes no response-schema support: its native engine sends no
`response_format` and the litellm path sends plain `json_object`. We declare our endpoints (the local
llama.cpp application and vLLM behind ray.serve.llm both implement OpenAI `json_schema`) as a provider
that supports response schemas, so the JSONAdapter sends the signature's schema -- with the label as an
enum -- and the server constrains the answer to it (a grammar, or decoding over the enum's answers).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Literal, Sequence, get_origin

# DSPy otherwise tries to download a model-price map from the internet at first use (5 s timeout offline).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402
from dspy.lm15 import (  # noqa: E402
    AccessPolicy,
    ModelSupport,
    OpenAIChatCompat,
    ProviderDefinition,
    register_provider,
)

from distill.config import LMConfig  # noqa: E402
from distill.errors import DistillError  # noqa: E402

PROVIDER_ID = "distill-serve"
_PLACEHOLDER_KEY = "sk-no-key-required"

_DEFINITION = ProviderDefinition.chat(
    # base_url is only a default: each LM passes its own api_base.
    AccessPolicy(provider=PROVIDER_ID, base_url="http://127.0.0.1:8000/v1"),
    compat=OpenAIChatCompat(max_tokens_field="max_tokens", instruction_role="system", json_schema="send"),
    placeholder_key=_PLACEHOLDER_KEY,
)


def register() -> None:
    """Declare the provider (idempotent). Must happen before an LM -- or a saved program's LM -- is built."""
    register_provider(_DEFINITION, supports=ModelSupport(response_schema=True))


def make_lm(lm_cfg: LMConfig, model: str | None = None, cache: bool = True, **kwargs: Any) -> dspy.LM:
    """The `dspy.LM` for an endpoint of the profile (`model` overrides the served id, e.g. a finetune)."""
    register()
    api_key = os.environ.get(lm_cfg.api_key_env) if lm_cfg.api_key_env else None
    if lm_cfg.api_key_env and not api_key:
        raise DistillError(f"{lm_cfg.api_key_env} is not set: the endpoint {lm_cfg.api_base} needs its key")
    extra = {"api_key": api_key} if api_key else {}  # an empty key is refused by DSPy; omit it instead
    return dspy.LM(
        f"{PROVIDER_ID}/{model or lm_cfg.model}",
        api_base=lm_cfg.api_base,
        temperature=lm_cfg.temperature,
        max_tokens=lm_cfg.max_tokens,
        timeout=lm_cfg.timeout_s,
        cache=cache,
        **extra,
        **kwargs,
    )


Prompt = Literal["full", "compact"]


def adapter(prompt: Prompt = "full") -> dspy.Adapter:
    """JSON output, so the server can constrain it; ChatAdapter output is unparseable from tiny models.

    `full`: the signature's fields, types and label list spelled out (what a model that was never trained
    on the task needs). `compact`: the task in one line and the bare query (a finetuned student).
    """
    return CompactPromptAdapter() if prompt == "compact" else CompactJSONAdapter()


@contextlib.contextmanager
def using(lm: dspy.LM, prompt: Prompt = "full") -> Iterator[dspy.LM]:
    """`with using(lm): program(...)` -- the LM and the JSON adapter for this block (thread-local)."""
    with dspy.context(lm=lm, adapter=adapter(prompt)):
        yield lm


def sanity_check_program(lm: dspy.LM, program: dspy.Module, example: dspy.Example) -> dspy.Prediction:
    """Run one example through the program with `lm` and print what went in and came out (traced whole in
    MLflow while a tracked run is in progress)."""
    from distill.tracking import call_traced  # the serving apps import this module; they never track

    with using(lm):
        pred = call_traced("sanity_check", program, **example.inputs())
    print(f"Program input: {example}")
    print(f"Program output label: {pred.label}")
    return pred


class CompactJSONAdapter(dspy.JSONAdapter):
    """DSPy's JSONAdapter without the output types repeated at the end of every user message.

    The system message already states each field's type (with the full label list) and the server's
    grammar enforces it. Repeating the 25 labels after each query costs ~250 prompt tokens that
    llama.cpp cannot reuse from its prefix cache: 4x slower per query on CPU.
    """

    def format_field_description(self, signature: type[dspy.Signature]) -> str:
        # The output structure below already lists a Literal's allowed values once ("one of: ..."); the
        # field list would repeat them as `Literal[...]`. Once is enough for the model and halves the
        # system prompt -- which the student is finetuned on, so training is ~2x cheaper.
        plain = signature
        for name, field in signature.output_fields.items():
            if get_origin(field.annotation) is Literal:
                plain = plain.with_updated_fields(name, type_=str)
        return super().format_field_description(plain)

    def user_message_output_requirements(self, signature: type[dspy.Signature]) -> str:
        return "Respond with a JSON object with the fields " + ", then ".join(
            f"`{name}`" for name in signature.output_fields
        ) + "."


class CandidateJSONAdapter(CompactJSONAdapter):
    """Formats prompts with every label (so the long system prompt stays identical and prefix-cached)
    but asks the server to constrain the answer to `candidates` only."""

    def __init__(self, candidates: Sequence[str]) -> None:
        super().__init__()
        self.candidates = tuple(candidates)

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[dspy.Signature]) -> None:
        # DSPy 3.4 builds the response schema here from the signature's output types.
        narrowed = signature.with_updated_fields("label", type_=Literal[self.candidates])  # type: ignore[valid-type]
        super()._prepare_response_format(lm, lm_kwargs, narrowed)


class CompactPromptAdapter(CompactJSONAdapter):
    """The finetuned student's prompt: the signature's instructions as the system turn, the input as the
    user turn, the answer as the JSON object -- no field descriptions, no label list, no format rules.

    The student learns the format and the labels from its SFT data (built with this same adapter, so
    training and inference see identical messages); the server's grammar still enforces the label enum
    through the response schema, which is prepared exactly as for the full prompt. About a tenth of the
    full prompt's tokens: training and inference cost scale with them.
    """

    def format(self, signature: type[dspy.Signature], demos: list[dict[str, Any]],
               inputs: dict[str, Any]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [{"role": "system", "content": signature.instructions.strip()}]
        for demo in demos:
            messages.append({"role": "user", "content": self._user_content(signature, demo)})
            messages.append({"role": "assistant", "content": self.format_assistant_message_content(signature, demo)})
        messages.append({"role": "user", "content": self._user_content(signature, inputs)})
        return messages

    def format_assistant_message_content(self, signature: type[dspy.Signature], outputs: dict[str, Any],
                                         missing_field_message: str | None = None) -> str:
        return json.dumps({k: outputs[k] for k in signature.output_fields if k in outputs}, ensure_ascii=False)

    @staticmethod
    def _user_content(signature: type[dspy.Signature], values: dict[str, Any]) -> str:
        fields = [k for k in signature.input_fields if k in values]
        if len(fields) == 1:
            return str(values[fields[0]])
        return "\n".join(f"{k}: {values[k]}" for k in fields)
