"""Named client keys (`DISTILL_API_KEYS`): the format, its errors, and the key check that tells clients
apart. Pure Python: the Starlette backend is driven with real connections' scopes, no server."""

from __future__ import annotations

import asyncio
import hmac

import pytest
from starlette.authentication import AuthenticationError
from starlette.requests import HTTPConnection

from distill.serving import common
from distill.serving.common import SHARED_CLIENT, BearerKey, parse_client_keys

SHARED_ENV, KEYS_ENV = "DISTILL_TEST_SHARED_KEY", "DISTILL_TEST_CLIENT_KEYS"


def conn(authorization: str | None) -> HTTPConnection:
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    return HTTPConnection({"type": "http", "method": "GET", "path": "/", "headers": headers})


def who(backend: BearerKey, authorization: str | None) -> tuple[str, bool]:
    _, user = asyncio.run(backend.authenticate(conn(authorization)))
    return user.username, user.named


K1, K2 = "k1-0123456789abcdef", "YWJjZGVmZ2hpamtsbW5vcA=="  # the second with base64 padding


def test_the_format() -> None:
    assert parse_client_keys(f"alice={K1}") == {"alice": K1}
    # whitespace (newlines too) around entries, names and keys is ignored; '=' inside a key is kept
    assert parse_client_keys(f" alice = {K1} ,\n bob.2_x-y={K2} ") == {"alice": K1, "bob.2_x-y": K2}


SECRET = "secret-0123456789"


@pytest.mark.parametrize("value, needle", [
    ("alice", "entry 1 of 1 is not 'name=key'"),
    ("alice=", "entry 1 of 1 is not 'name=key'"),
    (f"={SECRET}", "entry 1 of 1: a client name is"),
    (f"alice={SECRET},", "entry 2 of 2 is not 'name=key'"),  # a trailing comma
    (f"alice={SECRET},,bob={SECRET}x", "entry 2 of 3 is not 'name=key'"),
    (f"al ice={SECRET}", "a client name is"),
    (f"-alice={SECRET}", "a client name is"),
    ("alice=secret-short", "a key is at least 16 characters"),
    (f"alice={SECRET[:5]} {SECRET[5:]}", "a key is at least 16 characters without whitespace"),
    # a name forgotten before a base64 key: its padding would have made "name=key" of it
    (f"alice={K1},{SECRET}Ym9iLWtleQ==", "entry 2 of 2: a key is at least 16 characters"),
    (f"alice={SECRET},alice={SECRET}x", "entry 2 of 2 names the same client as entry 1"),
    (f"alice={SECRET},bob={SECRET}", "entry 2 of 2 has the same key as entry 1"),
    (f"default={SECRET}", "'default' names the shared key's holders"),
])
def test_a_malformed_value_is_a_clear_error_that_never_shows_a_name_or_key(value, needle) -> None:
    with pytest.raises(ValueError) as e:
        parse_client_keys(value, "DISTILL_API_KEYS")
    message = str(e.value)
    assert needle in message and message.startswith("DISTILL_API_KEYS: "), message
    assert not any(s in message for s in ("secret-", "short", "alice", "Ym9i", "0123")), message


def test_a_malformed_value_stops_the_backend_from_being_built(monkeypatch) -> None:
    monkeypatch.setenv(KEYS_ENV, f"alice:{SECRET}")
    with pytest.raises(ValueError, match=f"{KEYS_ENV}: entry 1 of 1 is not 'name=key'"):
        BearerKey(SHARED_ENV, KEYS_ENV)
    # a named client on the shared key could not be told from the shared key's holders
    monkeypatch.setenv(SHARED_ENV, SECRET)
    monkeypatch.setenv(KEYS_ENV, f"alice={SECRET}")
    with pytest.raises(ValueError, match="the same key as DISTILL_TEST_SHARED_KEY"):
        BearerKey(SHARED_ENV, KEYS_ENV)


def test_each_key_is_its_clients_name(monkeypatch) -> None:
    monkeypatch.setenv(SHARED_ENV, "shared-key")
    monkeypatch.setenv(KEYS_ENV, "alice=alice-key-0123456789,bob=bob-key-0123456789")
    backend = BearerKey(SHARED_ENV, KEYS_ENV)
    assert who(backend, "Bearer alice-key-0123456789") == ("alice", True)
    assert who(backend, "bearer bob-key-0123456789") == ("bob", True)
    assert who(backend, "Bearer shared-key") == (SHARED_CLIENT, False)  # as today: one unnamed client
    # a key is the whole token: a client's name with it, another client's name, a prefix -- all refused
    a = "alice-key-0123456789"
    for header in (f"Bearer alice={a}", f"Bearer bob={a}", f"Bearer {a[:-1]}", f"Bearer {a}0", f"Bearer {a.upper()}",
                   f"Basic {a}", a, "", None):
        with pytest.raises(AuthenticationError):
            who(backend, header)


def test_named_keys_alone_close_the_door(monkeypatch) -> None:
    monkeypatch.delenv(SHARED_ENV, raising=False)
    monkeypatch.setenv(KEYS_ENV, f"alice={K1}")
    backend = BearerKey(SHARED_ENV, KEYS_ENV)
    assert who(backend, f"Bearer {K1}") == ("alice", True)
    for header in (None, "Bearer ", "Bearer anything"):
        with pytest.raises(AuthenticationError):
            who(backend, header)
    monkeypatch.delenv(KEYS_ENV)
    assert who(BearerKey(SHARED_ENV, KEYS_ENV), None) == ("anonymous", False)  # no key at all: open, as today


def test_every_key_is_compared_in_constant_time(monkeypatch) -> None:
    """Whatever the token -- the first client's, the last's, the shared one, none, a long one -- every key is
    compared, each as a 32-byte digest: neither the count nor the lengths depend on the token."""
    compared: list[tuple[int, int]] = []
    compare = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return compare(a, b)

    monkeypatch.setattr(common.hmac, "compare_digest", recording)
    monkeypatch.setenv(SHARED_ENV, "shared-key")
    monkeypatch.setenv(KEYS_ENV, ",".join(f"c{i}=key-{i}-0123456789abcdef" for i in range(5)))
    backend = BearerKey(SHARED_ENV, KEYS_ENV)
    for token in ("key-0-0123456789abcdef", "key-4-0123456789abcdef", "shared-key", "nope", "x" * 5000):
        compared.clear()
        try:
            who(backend, f"Bearer {token}")
        except AuthenticationError:
            pass
        assert compared == [(32, 32)] * 6, token


def test_the_pipeline_forwards_the_named_keys_and_classifies_as_a_named_client(tmp_path, monkeypatch) -> None:
    """The serving stage forwards DISTILL_API_KEYS to the replicas; with only named keys set it calls as the
    first named client (with the shared key set, as that key's holder, as before)."""
    from distill.config import load_config
    from distill.serving.control import forward_env_names
    from distill.stages.serving import program_app_env

    assert "DISTILL_API_KEYS" in forward_env_names(load_config("local"))
    config = tmp_path / "deploy.yaml"
    config.write_text("applications:\n  - name: classify-intent\n    import_path: distill.serving.app:build_app\n"
                      "    args: {api_key_env: DISTILL_API_KEY, api_keys_env: DISTILL_API_KEYS}\n")
    monkeypatch.delenv("DISTILL_API_KEY", raising=False)
    monkeypatch.setenv("DISTILL_API_KEYS", f"pipeline={K1},bob={K2}")
    names, headers = program_app_env(config)
    assert {"DISTILL_API_KEY", "DISTILL_API_KEYS"} <= set(names) and headers == {"Authorization": f"Bearer {K1}"}
    monkeypatch.setenv("DISTILL_API_KEY", SECRET)
    assert program_app_env(config)[1] == {"Authorization": f"Bearer {SECRET}"}
