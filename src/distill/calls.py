"""What a failed LM call was: the endpoint unreachable, one call that failed, or a bug in our code.

`dspy.Evaluate` catches every exception a program raises, scores it 0 and, past `max_errors`, raises a bare
`Exception`. A dead endpoint then reads as "the teacher is bad", and a `TypeError` in a program as "calls
errored". `CallGuard` wraps the program for one evaluation, keeps the first failure of each kind and, once
one is seen, fails the remaining calls at once; `raise_cause()` then raises what really happened:
`EndpointUnreachable` with the URL, or the bug itself with its own traceback.
"""

from __future__ import annotations

import threading
from typing import Any

import dspy
from dspy.utils.exceptions import AdapterParseError, LMError, LMTransportError

from distill.errors import DistillError


class EndpointUnreachable(DistillError):
    """The LM endpoint refused or dropped the connection (or never answered)."""


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def is_unreachable(e: BaseException) -> bool:
    """No answer came back: connection refused or reset, a timeout, DNS (DSPy's transport error)."""
    return any(isinstance(c, (LMTransportError, ConnectionError, TimeoutError)) for c in _chain(e))


def is_call_failure(e: BaseException) -> bool:
    """A call that failed for a reason outside this process's code: transport, the server's error answer,
    or an answer the adapter could not parse. Anything else is a bug and must surface as itself."""
    return is_unreachable(e) or isinstance(e, (LMError, AdapterParseError))


def unreachable(api_base: str | None, e: BaseException) -> EndpointUnreachable:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return EndpointUnreachable(f"endpoint unreachable: {api_base or '<no api_base>'} ({first}); is the server up?")


class _Stopped(Exception):
    """A call skipped because an earlier one showed the endpoint is down (or our code is broken)."""


class CallGuard:
    """Wrap a program for one evaluation; afterwards `raise_cause()` names the real cause of failures."""

    def __init__(self, api_base: str | None) -> None:
        self.api_base = api_base
        self.bug: BaseException | None = None
        self.down: BaseException | None = None
        self._lock = threading.Lock()

    def wrap(self, program: dspy.Module) -> dspy.Module:
        return _Guarded(program, self)

    def call(self, program: Any, **inputs: Any) -> Any:
        if self.bug is not None or self.down is not None:
            raise _Stopped("an earlier call failed: see the error raised after the evaluation")
        try:
            return program(**inputs)
        except Exception as e:
            with self._lock:
                if not is_call_failure(e):
                    self.bug = self.bug or e
                elif is_unreachable(e):
                    self.down = self.down or e
            raise

    def raise_cause(self) -> None:
        """Raise the bug (as itself) or `EndpointUnreachable` if either was seen; else nothing."""
        if self.bug is not None:
            raise self.bug
        if self.down is not None:
            raise unreachable(self.api_base, self.down) from self.down


class _Guarded(dspy.Module):
    def __init__(self, program: dspy.Module, guard: CallGuard) -> None:
        super().__init__()
        self.program, self._guard = program, guard

    def forward(self, **inputs: Any) -> Any:
        return self._guard.call(self.program, **inputs)
