"""The DSPy program: an intent-classification signature whose label is a `Literal` of the labels in use,
its module, its metrics, saving/loading it, and the deploy parameters that name the program in service.

Typing the label as a `Literal` is what lets the JSON adapter send a schema with an enum, which the
server compiles into a grammar: the model can then only ever answer one of the labels.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import dspy
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, ValidationError
from pydantic_core import core_schema

from distill.config import PromptConfig, project_root, resolve_path
from distill.data.dataset import normalize_label
from distill.errors import DistillError
from distill.lm import Prompt, register


def instructions(labels: Sequence[str], prompt: PromptConfig | None = None,
                 descriptions: Mapping[str, str] | None = None) -> str:
    """The signature's instructions: the task's text with `{n}` the number of labels, then what the labels
    mean, for those the task describes."""
    prompt = prompt or getattr(labels, "prompt", None) or PromptConfig()
    descriptions = descriptions if descriptions is not None else getattr(labels, "descriptions", {})
    # replace, not str.format: a task's instructions may hold braces of their own (a JSON example).
    text = prompt.instructions.replace("{n}", str(len(labels)))
    described = [f"- {label}: {descriptions[label]}" for label in labels if label in descriptions]
    return text if not described else text + "\n\nWhat the labels mean:\n" + "\n".join(described)


def make_signature(labels: Sequence[str], prompt: PromptConfig | None = None,
                   descriptions: Mapping[str, str] | None = None) -> type[dspy.Signature]:
    """`IntentClassification`: text -> label, with `label: Literal[<labels>]`.

    The wording is the task's: `prompt` (default: the one the labels carry, `distill.data.dataset.TaskLabels`, else a
    generic one) and the labels' `descriptions`.
    """
    if not labels:
        raise ValueError("make_signature needs at least one label")
    prompt = prompt or getattr(labels, "prompt", None) or PromptConfig()
    label_type = Literal[tuple(labels)]  # type: ignore[valid-type]
    return dspy.make_signature(
        {
            "text": (str, dspy.InputField(desc=prompt.text)),
            "label": (label_type, dspy.OutputField(desc=prompt.label)),
        },
        instructions(labels, prompt, descriptions),
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


def rationale_signature(labels: Sequence[str], max_chars: int = 400,
                        prompt: PromptConfig | None = None) -> type[dspy.Signature]:
    """`IntentClassification` turned around: text and its label in, the reasoning that leads to that label out.

    What a reasoning (ChainOfThought) student is trained on for a label it was given rather than asked for:
    the teacher's vote picked the label, the LLM writes why (rationalization, as in STaR). The reasoning
    field is ChainOfThought's own name, with the same bound, so the SFT turn looks like any other.
    """
    base = make_signature(labels, prompt)
    given = ("Here the label is already given. Write the short reasoning that leads from the text to this "
             "label, as if you were deciding it.")
    return (base.delete("label")
            .append("label", dspy.InputField(desc="the label this text has"), type_=str)
            .append("reasoning", dspy.OutputField(desc="the reasoning that leads to the label"),
                    type_=bounded_text(max_chars))
            .with_instructions(f"{base.instructions}\n\n{given}"))


class IntentClassificationModule(dspy.Module):
    """Classify a text into one of `labels`, directly or after a bounded reasoning step. The prompt's wording
    is the one `labels` carry (`distill.data.dataset.TaskLabels`), or `prompt`."""

    def __init__(self, labels: Sequence[str], reasoning: bool = False, max_reasoning_chars: int = 400,
                 prompt: PromptConfig | None = None) -> None:
        super().__init__()
        self.labels = list(labels)
        signature = make_signature(labels, prompt)
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
        # Only when the LM asks for logprobs (`make_lm(..., logprobs=True)`) and the server decoded a closed
        # set of answers; absent otherwise, so that callers with a `confidence` of their own (the teacher's
        # vote, `distill.teacher.program`) keep theirs.
        if (confidence := answer_confidence(pred.get("logprobs"))) is not None:
            out["confidence"] = confidence
        return dspy.Prediction(**out)

    def forward(self, text: str, demos: list[dspy.Example] | None = None) -> dspy.Prediction:
        # `demos` overrides the predictor's own demonstrations for this call only (thread-safe).
        extra = {} if demos is None else {"demos": demos}
        return self._wrap(self.classify(text=text, **extra))

    async def aforward(self, text: str, demos: list[dspy.Example] | None = None) -> dspy.Prediction:
        extra = {} if demos is None else {"demos": demos}
        return self._wrap(await self.classify.acall(text=text, **extra))


def answer_confidence(logprobs: Any) -> float | None:
    """The answer's probability from an OpenAI chat `logprobs` object: exp of the sum of its tokens'
    log-probabilities. Our llama.cpp server gives them under the label set (the product of the answer trie's
    branch probabilities, `distill.serving.choices`), so this is the label's probability among the labels.
    vLLM gives one per token of the whole JSON completion (the scaffolding, the label, the end of sequence),
    each renormalised over the tokens the JSON schema allows there (it masks the logits before computing
    them): another number for the same answer, which calibration absorbs (docs/cascade.md)."""
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else getattr(logprobs, "content", None)
    if not content:
        return None
    values = [t.get("logprob") if isinstance(t, Mapping) else getattr(t, "logprob", None) for t in content]
    if any(v is None for v in values):
        return None
    return float(math.exp(min(0.0, sum(values))))


CalibrationMethod = Literal["temperature", "platt", "isotonic", "none"]


class Calibration(BaseModel):
    """A map from the student's raw confidence to a calibrated one, fit on the devset or gold
    (`distill.evaluation.calibration.fit_calibration`). Applied at serve time without scikit-learn."""

    model_config = ConfigDict(extra="forbid")

    method: CalibrationMethod
    temperature: float = Field(1.0, gt=0)  # temperature: sigmoid(logit(p) / T)
    slope: float = Field(1.0, gt=0)  # platt: sigmoid(slope * logit(p) + bias); slope > 0 keeps the order
    bias: float = 0.0
    x: list[float] = []  # isotonic: the fitted step function's knots (interpolated linearly, as sklearn does)
    y: list[float] = []
    n: int = Field(0, ge=0, description="Examples it was fit on.")
    # auto: each method's mean held-out log loss in cross-validation on the fit's data; the lowest was chosen
    cv_log_loss: dict[str, float] = {}
    ece_before: float | None = None  # on the data it was fit on
    ece_after: float | None = None

    def apply_many(self, confidence: Sequence[float]) -> list[float]:
        import numpy as np  # only here: the program module stays light for the serving apps

        p = np.clip(np.asarray(confidence, dtype=np.float64), 1e-6, 1 - 1e-6)
        if self.method == "temperature":
            out = 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / self.temperature))
        elif self.method == "platt":
            out = 1.0 / (1.0 + np.exp(-(self.slope * np.log(p / (1 - p)) + self.bias)))
        elif self.method == "isotonic":
            out = np.interp(p, self.x, self.y) if self.x else p
        else:
            out = np.asarray(confidence, dtype=np.float64)
        return [float(v) for v in out]

    def apply(self, confidence: float) -> float:
        return self.apply_many([confidence])[0]


class CascadeParams(BaseModel):
    """`cascade.json`: when the served student hands a query to the teacher -- its calibrated confidence
    below `threshold`. Written where the threshold is chosen (on the devset or the calibration split,
    `distill.evaluation.calibration.choose_threshold`), read by the cascade (`distill.serving.cascade`)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(..., ge=0, description="The student answers when its calibrated confidence is >= this.")
    calibration: Calibration = Calibration(method="none")
    chosen_on: str = "devset"  # devset | calibration (data.num_calibration): what the devset_* fields describe
    target: float | None = None  # the accuracy the threshold had to reach (the teacher's, by default)
    devset_accuracy: float | None = None  # the cascade's, at this threshold
    devset_fallback_share: float | None = None

    def save(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CascadeParams":
        p = resolve_path(path)
        if not p.is_file():
            raise FileNotFoundError(f"cascade params not found: {p}")
        try:
            return cls.model_validate(json.loads(p.read_text()))
        except (json.JSONDecodeError, ValidationError) as e:
            raise ValueError(f"{p}: not valid cascade params: {e}") from None


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


def load_program(
    path: str | Path, labels: Sequence[str], reasoning: bool = False, max_reasoning_chars: int = 400
) -> IntentClassificationModule:
    """A program saved with `Module.save` (its demos and instructions) on a freshly built module."""
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"saved program not found: {p}")
    register()  # the saved state may reference our provider's LMs
    program = IntentClassificationModule(labels, reasoning, max_reasoning_chars)
    try:
        program.load(str(p))
    except Exception as e:  # noqa: BLE001 - json/KeyError/ValueError from a foreign or corrupt file
        raise DistillError(f"{p}: not a saved IntentClassificationModule ({type(e).__name__}: {e})") from None
    return program


class ProgramParams(BaseModel):
    """How the saved program's module is built (it must match the one that was saved)."""

    model_config = ConfigDict(extra="forbid")

    reasoning: bool = False
    max_reasoning_chars: int = 400
    prompt: Prompt = "full"  # the adapter the program runs with (`distill.lm.adapter`)


class DeployParams(BaseModel):
    """`deploy_params.json`: the deployed variant's model id, its saved program and the labels -- written by
    the evaluation stage, read by the serving application. One model for writer and reader. The variant
    was chosen on the devset (`devset_score`); `test_score` is reported, it took no part in the choice."""

    model_config = ConfigDict(extra="forbid")

    model: str
    program_path: str  # relative to the project root when inside it; absolute once loaded
    labels: list[str] = Field(..., min_length=2)
    variant: str
    kind: str
    test_score: float
    devset_score: float | None = None
    program: ProgramParams = ProgramParams()

    def save(self, path: Path) -> Path:
        """Write atomically; a program path inside the checkout is stored relative, so the checkout can move."""
        program = Path(self.program_path).resolve()
        try:
            program = program.relative_to(project_root())
        except ValueError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_copy(update={"program_path": str(program)}).model_dump_json(indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "DeployParams":
        """Relative paths (`path`, and the program path in it) are taken from the project root."""
        p = resolve_path(path)
        if not p.is_file():
            raise FileNotFoundError(f"deploy params not found: {p} (run the evaluation stage first)")
        try:
            params = cls.model_validate(json.loads(p.read_text()))
        except (json.JSONDecodeError, ValidationError) as e:
            raise ValueError(f"{p}: not valid deploy params: {e}") from None
        return params.model_copy(update={"program_path": str(resolve_path(params.program_path))})

    def load_program(self) -> IntentClassificationModule:
        return load_program(self.program_path, self.labels, self.program.reasoning, self.program.max_reasoning_chars)
