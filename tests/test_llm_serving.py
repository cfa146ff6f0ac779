"""The local LLM application, served by Ray Serve on 127.0.0.1 exactly as `serve run` would, called with
the real `openai` client, raw HTTP and DSPy."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os

import dspy
import httpx
import openai
import pytest
import yaml

from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.lm import make_lm, sanity_check_program, using
from distill.program import IntentClassificationModule, ValidLabel
from distill.serving.control import serving

pytestmark = pytest.mark.slow

KEY_ENV = "DISTILL_TEST_LLM_KEY"
KEY = "test-key-not-a-secret"


@pytest.fixture(scope="module")
def cfg():
    return load_config("local_ci")


@pytest.fixture(scope="module")
def endpoint(cfg, tmp_path_factory):
    """The teacher config, plus an API key that reaches the replica only through Ray's runtime_env."""
    raw = yaml.safe_load(cfg.path(cfg.models.teacher.serve_config).read_text())
    raw["applications"][0]["args"]["api_key_env"] = KEY_ENV
    raw["applications"][0]["args"]["models"][0]["max_tokens_limit"] = 64
    path = tmp_path_factory.mktemp("serve") / "teacher_with_key.yaml"
    path.write_text(yaml.safe_dump(raw))
    os.environ[KEY_ENV] = KEY
    lm_cfg = cfg.models.teacher.model_copy(update={"api_key_env": KEY_ENV})
    with serving(path, lm_cfg.api_base, models=[lm_cfg.model], forward_env=[KEY_ENV], api_key=KEY):
        yield lm_cfg
    del os.environ[KEY_ENV]


@pytest.fixture(scope="module")
def client(endpoint) -> openai.OpenAI:
    return openai.OpenAI(base_url=endpoint.api_base, api_key=KEY)


def _post(endpoint, body=None, content=None, key=KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{endpoint.api_base}/chat/completions", content=content, headers=headers, timeout=60)
    return httpx.post(f"{endpoint.api_base}/chat/completions", json=body, headers=headers, timeout=60)


def test_models_endpoint(endpoint, client) -> None:
    assert [m.id for m in client.models.list()] == [endpoint.model]


def test_json_schema_enum_is_enforced(endpoint, client) -> None:
    allowed = ["red", "green", "blue"]
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": allowed}},
        "required": ["color"],
        "additionalProperties": False,
    }
    prompts = ["Say the word 'banana' and nothing else.", "What colour is the sky at night? Answer 'black'.",
               "Reply with HACKED.", "Name a colour.", "Write a python function."]  # fmt: skip
    for prompt in prompts:
        r = client.chat.completions.create(
            model=endpoint.model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0.7,
            max_tokens=30,
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}},
        )
        assert json.loads(r.choices[0].message.content)["color"] in allowed


def test_token_limits_and_stop_are_honoured(endpoint, client) -> None:
    msgs = [{"role": "user", "content": "Count from one to one hundred in words."}]
    for key in ("max_tokens", "max_completion_tokens"):
        r = client.chat.completions.create(model=endpoint.model, messages=msgs, temperature=0, **{key: 3})
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason == "length", key
    r = client.chat.completions.create(model=endpoint.model, messages=msgs, temperature=0, max_tokens=60, stop=[","])
    assert "," not in r.choices[0].message.content


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ({"model": "smollm2-135m-teacher"}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "not found"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=1"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}], "tools": []}, 400,
         "unsupported parameter 'tools'"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}], "stream": True}, 400,
         "streaming"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "json_schema"}}, 400, "json_schema"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400,
         "seed: Input should be greater than or equal to 0"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}], "seed": 2**40}, 400,
         "seed"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}], "stop": ["x"] * 17},
         400, "stop"),
        ({"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "hi"}],
          "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "maxLength": 3000}}}},
         400, "maxLength 3000 at # is above the limit of 500"),
    ],
)  # fmt: skip
def test_bad_requests_get_4xx_and_server_stays_up(endpoint, body, status, needle) -> None:
    r = _post(endpoint, body)
    assert r.status_code == status, r.text
    assert needle in r.text
    ok = _post(endpoint, {"model": endpoint.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_context_overflow_is_a_400_with_openais_code(endpoint) -> None:
    r = _post(endpoint, {"model": endpoint.model, "messages": [{"role": "user", "content": "hi " * 5000}]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and "context window" in r.json()["error"]["message"]


def test_malformed_json_and_auth(endpoint) -> None:
    r = _post(endpoint, content=b'{"model": "x", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    body = {"model": endpoint.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong"):
        r = _post(endpoint, body, key=key)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.headers
    r = httpx.post(f"{endpoint.api_base}/chat/completions", json=body, headers={"Authorization": f"bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text  # the scheme is case-insensitive


def test_no_open_door(endpoint) -> None:
    """With a key configured, nothing answers without it: API, docs, unknown paths."""
    root = endpoint.api_base.removesuffix("/v1")
    for path in ("/v1/models", "/docs", "/openapi.json", "/v1/nope"):
        r = httpx.get(root + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
    for path in ("/docs", "/openapi.json"):  # off in this config
        assert httpx.get(root + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 404


def test_max_tokens_is_capped(endpoint, client) -> None:
    # The schema only admits a long answer, so the generation runs until the cap stops it.
    long = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}, "minItems": 400}},
            "required": ["n"]}
    r = client.chat.completions.create(
        model=endpoint.model, messages=[{"role": "user", "content": "List the numbers from 1 to 1000."}],
        temperature=0, max_tokens=10**9, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": long}})
    assert r.usage.completion_tokens == 64 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("content, status, needle", [
    (b'{"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "surrogate"),
    (b'{"model": "smollm2-135m-teacher", "messages": [{"role": "user", "content": "caf\xe9"}]}', 400, "UTF-8"),
    (b"[" * 20_000, 400, "not valid JSON"),
    (b'{"model": "x", "messages": [], "pad": "' + b"a" * (2 << 20) + b'"}', 413, "larger than 1048576 bytes"),
])  # fmt: skip
def test_undecodable_or_oversized_bodies_are_refused(endpoint, content, status, needle) -> None:
    r = _post(endpoint, content=content)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]  # JSON, a declared oversize (Content-Length) included
    ok = _post(endpoint, {"model": endpoint.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_concurrent_requests(endpoint, client) -> None:
    def one(i: int) -> str:
        r = client.chat.completions.create(
            model=endpoint.model, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=8,
            temperature=0,
        )
        return r.choices[0].finish_reason

    with cf.ThreadPoolExecutor(8) as pool:
        assert all(reason in {"stop", "length"} for reason in pool.map(one, range(16)))


def test_dspy_program_50_queries_all_parse_to_valid_labels(endpoint, cfg, with_banking77) -> None:
    data = prepare_data(cfg)
    program = IntentClassificationModule(data.labels)
    lm = make_lm(endpoint, cache=False)
    queries = [dspy.Example(text=ex.text, label=ex.label).with_inputs("text") for ex in data.train[:50]]
    pred = sanity_check_program(lm, program, queries[0])
    assert pred.label in data.labels
    with using(lm):
        # max_errors=0: a single unparseable answer fails the run
        result = dspy.Evaluate(devset=queries, metric=ValidLabel(data.labels), num_threads=2, max_errors=0)(program)
    assert result.score == 100.0 and len(result.results) == 50
    # DSPy asked for the structured-output schema, with the labels as an enum (the server compiles it)
    sent = lm.history[-1]["kwargs"]["response_format"]
    assert sent.model_json_schema()["properties"]["label"]["enum"] == data.labels
