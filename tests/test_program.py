"""The DSPy program's signature types the label as a Literal of exactly the labels in use."""

from __future__ import annotations

import typing

import dspy
import pytest

from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.program import IntentClassificationModule, ValidLabel, exact_match, make_signature


def test_signature_label_type_is_the_labels_in_use(with_banking77) -> None:
    labels = prepare_data(load_config("local_ci")).labels
    sig = make_signature(labels)
    assert sig.__name__ == "IntentClassification"
    assert list(sig.input_fields) == ["text"] and list(sig.output_fields) == ["label"]
    ann = sig.output_fields["label"].annotation
    assert typing.get_origin(ann) is typing.Literal
    assert list(typing.get_args(ann)) == labels


def test_module_variants() -> None:
    labels = ["card_arrival", "pending_top_up"]
    plain = IntentClassificationModule(labels)
    assert isinstance(plain.classify, dspy.Predict)
    cot = IntentClassificationModule(labels, reasoning=True, max_reasoning_chars=120)
    fields = cot.classify.predict.signature.output_fields
    assert list(fields) == ["reasoning", "label"]
    # the reasoning bound reaches the JSON schema the adapter sends (and so the server's grammar)
    from dspy.adapters.json_adapter import _get_structured_outputs_response_format

    schema = _get_structured_outputs_response_format(cot.classify.predict.signature).model_json_schema()
    assert schema["properties"]["reasoning"]["maxLength"] == 120
    assert schema["properties"]["label"]["enum"] == labels
    with pytest.raises(ValueError):
        make_signature([])


def test_metrics() -> None:
    ex = dspy.Example(text="q", label="Reverted_card_payment?").with_inputs("text")
    assert exact_match(ex, dspy.Prediction(label="reverted_card_payment"))
    assert not exact_match(ex, dspy.Prediction(label="card_arrival"))
    assert not exact_match(ex, dspy.Prediction())
    valid = ValidLabel(["card_arrival"])
    assert valid(ex, dspy.Prediction(label="Card_Arrival")) and not valid(ex, dspy.Prediction(label="hacked"))


def test_candidate_adapter_narrows_the_answer_but_keeps_the_prompt() -> None:
    """The teacher's per-query restriction: the response schema's enum is the candidates only, while the
    prompt (and so llama.cpp's cached prefix) is the same as the unrestricted program's."""
    LABELS = ["card_arrival", "pending_top_up", "cash_withdrawal_charge", "activate_my_card"]
    from distill.config import load_config
    from distill.lm import CandidateJSONAdapter, CompactJSONAdapter, make_lm

    sig = make_signature(LABELS)
    lm = make_lm(load_config("local_ci").models.teacher)
    kw: dict = {}
    CandidateJSONAdapter(["card_arrival", "activate_my_card"])._prepare_response_format(lm, kw, sig)
    schema = kw["response_format"].model_json_schema()
    assert schema["properties"]["label"]["enum"] == ["card_arrival", "activate_my_card"]
    full: dict = {}
    CompactJSONAdapter()._prepare_response_format(lm, full, sig)
    assert full["response_format"].model_json_schema()["properties"]["label"]["enum"] == LABELS
    inputs = {"text": "where is my card?"}
    assert CandidateJSONAdapter(["card_arrival"]).format(sig, [], inputs) == CompactJSONAdapter().format(sig, [], inputs)


def test_finetuned_students_sft_messages_are_its_inference_messages_with_the_compact_prompt() -> None:
    """What the student is trained on is exactly what its program sends when served: the compact prompt
    (instructions, then the bare query; no label list) and the JSON answer the adapter parses back."""
    from dspy.utils import DummyLM

    from distill.lm import adapter, using
    from distill.student.curation import sft_messages

    labels = ["card_arrival", "pending_top_up", "activate_my_card"]
    program = IntentClassificationModule(labels)
    text = "My card still has not arrived"
    lm = DummyLM([{"label": "card_arrival"}], adapter=dspy.JSONAdapter())
    with using(lm, "compact"):
        pred = program(text=text)
    sent = lm.history[-1]["messages"]
    sft = sft_messages(program, adapter("compact"), text, {"label": pred.label})
    assert sft[:-1] == sent and sft[-1]["role"] == "assistant"
    assert [m["role"] for m in sent] == ["system", "user"] and sent[1]["content"] == text
    assert not any(label in sent[0]["content"] for label in labels)  # the grammar carries the label set
    assert adapter("compact").parse(program.predictor.signature, sft[-1]["content"]) == {"label": "card_arrival"}
    full = adapter("full").format(program.predictor.signature, [], {"text": text})
    assert len("".join(m["content"] for m in sent)) * 4 < len("".join(m["content"] for m in full))
