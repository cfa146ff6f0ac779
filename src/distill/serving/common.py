"""What the two Serve applications (LLM and program) share: builder argument parsing and key checks."""

from __future__ import annotations

import hmac
import os
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

A = TypeVar("A", bound=BaseModel)


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
