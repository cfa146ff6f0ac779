"""The DSPy program: an intent-classification signature whose label is a `Literal` of the labels in use.

Typing the label as a `Literal` is what lets the JSON adapter send a schema with an enum, which the
server compiles into a grammar: the model can then only ever answer one of the labels.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, get_origin

import dspy
from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

from distill.data import normalize_label

INSTRUCTIONS = (
    "As part of a bank's customer-support triage system, classify the intent of a customer's message "
    "into exactly one of the {n} intent labels."
)


def make_signature(labels: Sequence[str]) -> type[dspy.Signature]:
    """`IntentClassification`: text -> label, with `label: Literal[<labels>]`."""
    if not labels:
        raise ValueError("make_signature needs at least one label")
    label_type = Literal[tuple(labels)]  # type: ignore[valid-type]
    return dspy.make_signature(
        {
            "text": (str, dspy.InputField(desc="The customer's message")),
            "label": (label_type, dspy.OutputField(desc="The intent label of the message")),
        },
        INSTRUCTIONS.format(n=len(labels)),
        signature_name="IntentClassification",
    )


class _BoundedText(str):
    max_chars = 400

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.str_schema(max_length=cls.max_chars)


def bounded_text(max_chars: int) -> type[str]:
    """A `str` type whose JSON schema carries `maxLength`.

    DSPy builds the response schema from a field's bare annotation and drops `Annotated` metadata,
    so the bound has to live in the type itself.
    """
    return type("str", (_BoundedText,), {"max_chars": max_chars, "__module__": __name__})


class IntentClassificationModule(dspy.Module):
    """Classify a banking query into one of `labels`, directly or after a bounded reasoning step."""

    def __init__(self, labels: Sequence[str], reasoning: bool = False, max_reasoning_chars: int = 400) -> None:
        super().__init__()
        self.labels = list(labels)
        signature = make_signature(self.labels)
        if reasoning:
            # Bounded reasoning: the schema's maxLength becomes part of the server's grammar, so the
            # model cannot ramble into max_tokens and leave truncated JSON.
            self.classify = dspy.ChainOfThought(signature, rationale_field_type=bounded_text(max_reasoning_chars))
        else:
            self.classify = dspy.Predict(signature)

    @property
    def predictor(self) -> dspy.Predict:
        """The one Predict inside (ChainOfThought wraps one): its signature is what the LM sees."""
        return self.classify if isinstance(self.classify, dspy.Predict) else self.classify.predict

    def _wrap(self, pred: dspy.Prediction) -> dspy.Prediction:
        out: dict[str, Any] = {"label": normalize_label(pred.label)}
        if "reasoning" in pred:
            out["reasoning"] = pred.reasoning
        return dspy.Prediction(**out)

    def forward(self, text: str, demos: list[dspy.Example] | None = None) -> dspy.Prediction:
        # `demos` overrides the predictor's own demonstrations for this call only (thread-safe).
        extra = {} if demos is None else {"demos": demos}
        return self._wrap(self.classify(text=text, **extra))

    async def aforward(self, text: str, demos: list[dspy.Example] | None = None) -> dspy.Prediction:
        extra = {} if demos is None else {"demos": demos}
        return self._wrap(await self.classify.acall(text=text, **extra))


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


def exact_match(example: dspy.Example, pred: dspy.Prediction, trace: Any = None) -> bool:
    """Correct iff the predicted label equals the gold label after normalisation."""
    got = getattr(pred, "label", None)
    return got is not None and normalize_label(got) == normalize_label(example.label)


class ValidLabel:
    """Metric: the prediction is one of the labels in use (what the teacher's labeling keeps)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = frozenset(labels)

    def __call__(self, example: dspy.Example, pred: dspy.Prediction, trace: Any = None) -> bool:
        got = getattr(pred, "label", None)
        return got is not None and normalize_label(got) in self.labels
