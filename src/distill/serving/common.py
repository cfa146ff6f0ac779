"""What the two Serve applications (LLM and program) share: builder argument parsing, key checks, text
checks and the HTTP-level limits both apply."""

from __future__ import annotations

import hmac
import os
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, SimpleUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response

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


def authorized(authorization: str | None, key_env: str | None) -> bool:
    """True when no key is configured (the variable is unset) or the header is `Bearer <key>`.

    The key is read from the replica's environment on each request and compared in constant time.
    """
    key = os.environ.get(key_env) if key_env else None
    return not key or hmac.compare_digest((authorization or "").encode(), f"Bearer {key}".encode())


def bearer_headers(key_env: str | None) -> dict[str, str]:
    """The Authorization header for a service whose key is in `key_env` (none when the variable is unset)."""
    key = os.environ.get(key_env) if key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


class BearerKey(AuthenticationBackend):
    """Starlette authentication: every request needs `Authorization: Bearer <key>` while `key_env` is set."""

    message = "missing or wrong API key (send 'Authorization: Bearer <key>')"

    def __init__(self, key_env: str | None) -> None:
        self.key_env = key_env

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser]:
        if not authorized(conn.headers.get("authorization"), self.key_env):
            raise AuthenticationError(self.message)
        return AuthCredentials(["authenticated"]), SimpleUser("client")


def require_key(app: Starlette, key_env: str | None,
                on_error: Callable[[HTTPConnection, AuthenticationError], Response]) -> None:
    """Put every route of `app` -- docs, unknown paths and bodies that would not parse included -- behind
    the key: the check runs before routing and before the body is read."""
    app.add_middleware(AuthenticationMiddleware, backend=BearerKey(key_env), on_error=on_error)


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
