"""What the two Serve applications (LLM and program) share: builder argument parsing, key checks, text
checks and the HTTP-level limits both apply."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
from typing import Any, Callable, Sequence, TypeVar, Union

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.exceptions import HTTPException
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

A = TypeVar("A", bound=BaseModel)

# FastAPI's docs routes, off unless an app's `docs` arg turns them on (then behind the key like the rest).
NO_DOCS: dict[str, Any] = {"docs_url": None, "redoc_url": None, "openapi_url": None}


def parse_app_args(model: type[A], args: dict[str, Any], import_path: str) -> A:
    """Validate a builder's `args` from a Serve config; the error names the application."""
    try:
        return model.model_validate(args)
    except ValidationError as e:
        raise ValueError(f"invalid args for {import_path}: {e}") from None


def describe_validation_errors(
    errors: list[Any], unknown: str = "unknown field '{}'", missing: str = "missing field '{}'"
) -> tuple[str, str | None]:
    """FastAPI's validation errors as one message, and the first offending key (None for the body)."""
    msgs: list[str] = []
    first: str | None = None
    for e in errors:
        key = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            msgs.append(f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
            continue
        first = first or key or None
        if e.get("type") == "extra_forbidden":
            msgs.append(unknown.format(key))
        elif e.get("type") == "missing":
            msgs.append(missing.format(key or "body"))
        else:
            msgs.append(f"{key or 'body'}: {e.get('msg')}")
    return "; ".join(msgs) or "invalid request", first


# A key's variable, or several (None entries ignored): the first one set holds the key. The LLM app names
# its own key first and the deployment's shared key second, so it has a key of its own only when one is set.
KeyEnv = Union[str, Sequence[Union[str, None]], None]


def key_variable(key_env: KeyEnv) -> str | None:
    """The first variable of `key_env` that is set (to a non-empty value) in this process's environment."""
    names = [key_env] if isinstance(key_env, str) else list(key_env or ())
    return next((n for n in names if n and os.environ.get(n)), None)


def _bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive (RFC 9110
    section 11.1), the token is not."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _same_key(token: str, key: str) -> bool:
    """Constant time whatever the two lengths: digests of equal size are compared, not the texts."""
    return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), hashlib.sha256(key.encode()).digest())


def authorized(authorization: str | None, key_env: KeyEnv) -> bool:
    """True when no key is configured (no variable is set) or the header is `Bearer <key>`.

    The key is read from the replica's environment on each request and compared in constant time; the
    scheme is case-insensitive (RFC 9110 section 11.1), the key is not.
    """
    name = key_variable(key_env)
    if name is None:
        return True
    token = _bearer_token(authorization)
    return token is not None and _same_key(token, os.environ[name])


def bearer_headers(key_env: KeyEnv) -> dict[str, str]:
    """The Authorization header for a service whose key is in `key_env` (none when no variable is set)."""
    name = key_variable(key_env)
    return {"Authorization": f"Bearer {os.environ[name]}"} if name else {}


# The name the holders of the one shared key (`key_env`) get: they cannot be told apart.
SHARED_CLIENT = "default"
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_CLIENT_KEY_CHARS = 16


def parse_client_keys(value: str, variable: str = "DISTILL_API_KEYS") -> dict[str, str]:
    """Named client keys, `name=key,name2=key2` (whitespace around entries, names and keys is ignored), as
    {name: key}. A name is 1-64 of `A-Za-z0-9_.-` (first a letter or digit); a key is everything after the
    first `=` (so base64 padding is fine): at least 16 characters, no whitespace or comma.

    Raises ValueError naming `variable` and the entry's position -- never a name or a key, since a
    mistyped entry's "name" may be part of a key -- for an entry that is not `name=key`, a bad name or key,
    a name given twice, two clients with one key (they could not be told apart), or the name reserved for
    the shared key's holders.
    """
    keys: dict[str, str] = {}
    where: dict[str, int] = {}
    entries = value.split(",")
    for i, entry in enumerate(entries, 1):
        name, eq, key = (part.strip() for part in entry.partition("="))
        at = f"{variable}: entry {i} of {len(entries)}"
        if not eq or not key:
            raise ValueError(f"{at} is not 'name=key' (the format: {variable}=name=key,name2=key2)")
        if not _CLIENT_NAME.fullmatch(name):
            raise ValueError(f"{at}: a client name is 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
        if len(key) < MIN_CLIENT_KEY_CHARS or any(c.isspace() for c in key):
            raise ValueError(f"{at}: a key is at least {MIN_CLIENT_KEY_CHARS} characters without whitespace "
                             "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
        if name == SHARED_CLIENT:
            raise ValueError(f"{at}: {SHARED_CLIENT!r} names the shared key's holders; choose another name")
        if name in keys:
            raise ValueError(f"{at} names the same client as entry {where[name]}")
        if key in keys.values():
            other = next(where[n] for n, k in keys.items() if k == key)
            raise ValueError(f"{at} has the same key as entry {other}: the two clients could not be told apart")
        keys[name], where[name] = key, i
    return keys


class Client(SimpleUser):
    """The caller as the key check knows it (Starlette's `request.user`): `username` is the client's name --
    its name in the named keys, `SHARED_CLIENT` for the shared key, "anonymous" while no key is set --
    and `named` is True only for a key of its own, the only caller a per-client limit can tell apart."""

    def __init__(self, username: str, named: bool = False) -> None:
        super().__init__(username)
        self.named = named


class BearerKey(AuthenticationBackend):
    """Starlette authentication: every request needs `Authorization: Bearer <key>` while a key is set.

    The keys: the shared one in `key_env` (read on each request, as `authorized`), and the named clients'
    in `clients_env` (`parse_client_keys`; read once, here, so a malformed value stops the replica from
    starting). A token is compared with every key in constant time, without stopping at a match, so the
    answer's timing does not tell which key, or how much of one, was right.
    """

    message = "missing or wrong API key (send 'Authorization: Bearer <key>')"

    def __init__(self, key_env: KeyEnv, clients_env: str | None = None) -> None:
        self.key_env = key_env
        raw = os.environ.get(clients_env or "", "").strip()
        self.clients = parse_client_keys(raw, clients_env or "") if raw else {}
        shared = key_variable(key_env)
        if shared and os.environ[shared] in self.clients.values():
            raise ValueError(f"{clients_env}: a named client has the same key as {shared} (the shared key); "
                             "give it a key of its own")

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        header = conn.headers.get("authorization")
        shared = key_variable(self.key_env)
        if not self.clients and shared is None:
            return AuthCredentials(["authenticated"]), Client("anonymous")
        token = _bearer_token(header)
        if token is None:
            raise AuthenticationError(self.message)
        matches = [name for name, key in self.clients.items() if _same_key(token, key)]  # all compared
        if shared is not None and _same_key(token, os.environ[shared]):
            return AuthCredentials(["authenticated"]), Client(SHARED_CLIENT)
        if matches:
            return AuthCredentials(["authenticated"]), Client(matches[0], named=True)
        raise AuthenticationError(self.message)


def require_key(app: Starlette, key_env: KeyEnv,
                on_error: Callable[[HTTPConnection, AuthenticationError], Response],
                clients_env: str | None = None) -> None:
    """Put every route of `app` -- docs, unknown paths and bodies that would not parse included -- behind
    the key (or, with `clients_env`, the named clients' keys too; see `BearerKey`): the check runs before
    routing and before the body is read, and `request.user` is the `Client`. A 401 says which scheme to use
    (`WWW-Authenticate: Bearer`, RFC 6750)."""
    def challenge(conn: HTTPConnection, exc: AuthenticationError) -> Response:
        response = on_error(conn, exc)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    app.add_middleware(AuthenticationMiddleware, backend=BearerKey(key_env, clients_env), on_error=challenge)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyTimeout(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"request body not received within {timeout_s:g} s", headers={"Connection": "close"})


class BodyLimits:
    """ASGI middleware: a request body must be at most `max_bytes` and arrive within `timeout_s`.

    Why here: Ray Serve's proxy hands a request to a replica as soon as its headers are in and streams the
    body after it, so a body trickled at a byte a second holds a replica slot (`max_ongoing_requests`) for
    as long as the client likes; the proxy's HTTP options (Ray 2.60: `request_timeout_s`,
    `keep_alive_timeout_s`) have no body deadline. The replica is the first place that sees the body, so
    the deadline is kept here, from the moment the replica gets the request.

    A declared Content-Length over the limit is answered at once, before anything is read; a body that
    grows past it while streaming, or is late, raises `BodyTooLarge` / `BodyTimeout` (HTTPExceptions that
    FastAPI passes through to the app's handler), so every answer is the app's JSON error. Starlette's own
    limit (FastAPI's `max_body_size`) answered a declared oversize with a text/plain 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float,
                 error: Callable[[int, str, dict[str, str] | None], Response]) -> None:
        self.app, self.max_bytes, self.timeout_s, self.error = app, max_bytes, timeout_s, error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            exc = BodyTooLarge(self.max_bytes)
            return await self.error(413, exc.detail, {"Connection": "close"})(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        size, done = 0, False

        async def limited() -> Message:
            nonlocal size, done
            if done:  # the body is in; later calls wait for a disconnect, which is not ours to bound
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                done = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)


def valid_unicode(text: str) -> str:
    """`text` if it can be encoded as UTF-8; a JSON string may carry a lone surrogate ("\\ud800"), which
    would otherwise fail deep inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (it contains a lone surrogate)") from None
    return text


def backpressure(retry_after_s: float | None) -> dict[str, Any]:
    """Ray Serve's answer to requests beyond `max_queued_requests`: a 503 at once, with `Retry-After`."""
    return {"status_code": 503, "retry_after_s": retry_after_s}
