"""A client's JSON schema proven safe for llama.cpp before it reaches generation (issue 30).

llama-cpp-python only stores a grammar's text; llama.cpp parses it when the sampler is built, during
generation. A grammar the parser rejects gives a NULL sampler that llama-cpp-python chains anyway, and
the next `sample` dereferences it (SIGSEGV); some grammars overflow the parser's stack. Either kills the
whole replica, not the request. So a schema goes through three gates before any generation sees it:

1. `check_schema`: documented limits on what the schema asks for (`LIMITS`): repetition counts
   (`minLength`/`maxLength`/`minItems`/`maxItems` and `{m,n}` in a `pattern`), enum size, nesting depth
   and size. Each refusal names the schema feature and where it is.
2. `schema_to_gbnf`: llama-cpp-python's own converter, with its literal escaping fixed (it leaves `\\`
   unescaped, so an enum value with a quote in it became a broken grammar), and a bound on the grammar.
3. `GrammarProver`: llama.cpp's own parser, in a child process under a time and memory limit, builds the
   sampler, checks it is not NULL and applies it once over the whole vocabulary (the first sampling
   step, where the grammar's stacks are expanded). A crash or a timeout there costs the child, never
   the replica; verdicts are cached by grammar text, so a schema in use is checked once.

`python -m distill.serving.grammar <gguf>` is the child (a line of JSON in, a line of JSON out).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

# --- limits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrammarLimits:
    """What a client's schema may ask of llama.cpp's grammar engine (documented in docs/serving.md)."""

    max_repeat: int = 500          # minLength/maxLength/minItems/maxItems, and m, n of {m,n} in a pattern
    max_enum: int = 1024           # values of one enum
    max_literal_chars: int = 1024  # characters of one enum/const value
    max_depth: int = 16            # nesting of the schema's objects and arrays
    max_schema_bytes: int = 64 << 10
    max_pattern_chars: int = 1024
    max_grammar_bytes: int = 256 << 10  # the GBNF text the schema compiles to


LIMITS = GrammarLimits()
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
# {m}, {m,}, {m,n} (and {,n}) quantifiers of a regular expression
_QUANTIFIER = re.compile(r"(?<!\\)\{(\d*)(?:,(\d*))?\}")


class GrammarRefused(ValueError):
    """The schema cannot be served; the message says which feature and why (the client gets a 400)."""


def _where(path: tuple[str, ...]) -> str:
    return "/".join(("#", *path))


def check_schema(schema: Any, limits: GrammarLimits = LIMITS) -> None:
    """Refuse a schema beyond `limits`, naming the feature and its place (`#/properties/x/maxLength`)."""
    size = len(json.dumps(schema))
    if size > limits.max_schema_bytes:
        raise GrammarRefused(f"the schema is {size} bytes; the limit is {limits.max_schema_bytes}")
    _check(schema, (), 0, limits)


def _check(node: Any, path: tuple[str, ...], depth: int, limits: GrammarLimits) -> None:
    if depth > limits.max_depth:
        raise GrammarRefused(f"the schema nests deeper than {limits.max_depth} levels at {_where(path)}")
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check(item, (*path, str(i)), depth + 1, limits)
        return
    if not isinstance(node, dict):
        return
    for key in _COUNTS:
        if key in node:
            v = node[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise GrammarRefused(f"{key} at {_where(path)} must be a non-negative integer, not {v!r}")
            if v > limits.max_repeat:
                raise GrammarRefused(f"{key} {v} at {_where(path)} is above the limit of {limits.max_repeat}")
    for lo, hi in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties")):
        if lo in node and hi in node and node[lo] > node[hi]:
            raise GrammarRefused(f"{lo} {node[lo]} is above {hi} {node[hi]} at {_where(path)}: nothing matches")
    if "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values:
            raise GrammarRefused(f"enum at {_where(path)} must be a non-empty list (an empty enum admits nothing)")
        if len(values) > limits.max_enum:
            raise GrammarRefused(f"enum at {_where(path)} has {len(values)} values; the limit is {limits.max_enum}")
    for key, values in (("enum", node.get("enum") or []), ("const", [node["const"]] if "const" in node else [])):
        for v in values:
            if len(json.dumps(v)) > limits.max_literal_chars:
                raise GrammarRefused(f"a value of {key} at {_where(path)} is longer than {limits.max_literal_chars} "
                                     "characters")
    if "pattern" in node:
        check_pattern(node["pattern"], _where((*path, "pattern")), limits)
    for key, child in node.items():
        if key not in ("enum", "const", "default", "examples"):  # values, not schemas
            _check(child, (*path, str(key)), depth + (isinstance(child, (dict, list))), limits)


def check_pattern(pattern: Any, where: str = "pattern", limits: GrammarLimits = LIMITS) -> None:
    """Refuse a regular expression whose `{m,n}` counts or length are beyond `limits`."""
    if not isinstance(pattern, str):
        raise GrammarRefused(f"{where} must be a string")
    if len(pattern) > limits.max_pattern_chars:
        raise GrammarRefused(f"{where} is {len(pattern)} characters; the limit is {limits.max_pattern_chars}")
    for m in _QUANTIFIER.finditer(pattern):
        for n in m.groups():
            if n and int(n) > limits.max_repeat:
                raise GrammarRefused(f"the repetition {m.group(0)} in {where} is above the limit of {limits.max_repeat}")


# --- conversion -----------------------------------------------------------------------------------

# Every character GBNF gives a meaning to inside a literal, and control characters: a NUL would end the
# C string the grammar is passed as, silently truncating it.
_LITERAL_ESCAPE = re.compile(r'[\\"\x00-\x1f\x7f]')
_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    return _LITERAL_ESCAPES.get(c) or f"\\x{ord(c):02X}"


def schema_to_gbnf(schema: dict[str, Any], limits: GrammarLimits = LIMITS) -> str:
    """The GBNF grammar of `schema` (checked first); raises GrammarRefused naming what is not supported."""
    from llama_cpp.llama_grammar import SchemaConverter

    class Converter(SchemaConverter):
        # llama-cpp-python escapes only quotes and newlines; `a\"b` then ended the literal early.
        def _format_literal(self, literal: str) -> str:
            return '"' + _LITERAL_ESCAPE.sub(_escape, literal) + '"'

    check_schema(schema, limits)
    try:
        converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "input"), "")
        text = converter.format_grammar()
    except RecursionError:
        raise GrammarRefused("the schema's references nest too deeply") from None
    except Exception as e:  # noqa: BLE001 - the converter raises assorted types (AssertionError, KeyError, ...)
        raise GrammarRefused(f"the schema cannot be compiled to a grammar: {type(e).__name__}: {e}"[:500]) from None
    if len(text.encode()) > limits.max_grammar_bytes:
        raise GrammarRefused(f"the schema compiles to a grammar of {len(text.encode())} bytes; "
                             f"the limit is {limits.max_grammar_bytes}")
    return text


# --- the proof, in a child process ----------------------------------------------------------------


class GrammarProver:
    """llama.cpp's verdict on grammar texts, from a child process that may crash without harm.

    Thread-safe (one question at a time). The child is started on first use and again after it died;
    it loads only the model's vocabulary (no weights). Verdicts are kept for `cache_size` texts.
    """

    def __init__(self, model_path: str, timeout_s: float = 10.0, memory_bytes: int = 2 << 30,
                 cache_size: int = 1024) -> None:
        self.model_path, self.timeout_s, self.memory_bytes = model_path, timeout_s, memory_bytes
        self.cache: OrderedDict[str, str | None] = OrderedDict()  # text -> None (proven) or the refusal
        self.cache_size = cache_size
        self.lock = threading.Lock()
        self.child: subprocess.Popen[bytes] | None = None
        self.crashes = 0  # children lost to a grammar (crash, memory or time limit)

    def prove(self, text: str) -> None:
        """Return if llama.cpp builds and applies a sampler for `text`; else raise GrammarRefused."""
        with self.lock:
            if text in self.cache:
                self.cache.move_to_end(text)
                verdict = self.cache[text]
            else:
                verdict = self._ask(text)
                self.cache[text] = verdict
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        if verdict is not None:
            raise GrammarRefused(verdict)

    def close(self) -> None:
        with self.lock:
            self._kill()

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "DISTILL_GRAMMAR_CHILD_MEMORY": str(self.memory_bytes)}
        child = subprocess.Popen([sys.executable, "-m", "distill.serving.grammar", self.model_path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        if self._read(child, self.timeout_s + 30) != {"ready": True}:  # loading the vocabulary: seconds at most
            child.kill()
            child.wait()
            raise RuntimeError(f"the grammar checker did not start (model {self.model_path})")
        return child

    def _kill(self) -> None:
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None

    @staticmethod
    def _read(child: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any] | str:
        """One line of JSON from the child, or "died" / "timeout"."""
        assert child.stdout is not None
        deadline, line = time.monotonic() + timeout_s, b""
        fd = child.stdout.fileno()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return "timeout"
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return "died"
            line += chunk
        return json.loads(line)

    def _ask(self, text: str) -> str | None:
        if self.child is None or self.child.poll() is not None:
            self.child = self._start()
        assert self.child.stdin is not None
        try:
            self.child.stdin.write(json.dumps({"grammar": text}).encode() + b"\n")
            self.child.stdin.flush()
        except BrokenPipeError:
            self._kill()
            return self._ask(text)
        answer = self._read(self.child, self.timeout_s)
        if isinstance(answer, dict):
            return None if answer["ok"] else f"llama.cpp cannot use the schema's grammar: {answer['error']}"
        self.crashes += 1
        self._kill()
        if answer == "timeout":
            return f"llama.cpp took more than {self.timeout_s:g} s to build the schema's grammar"
        return "the schema's grammar crashed llama.cpp's grammar parser (in a separate process; nothing was lost)"


def _child_main(model_path: str) -> None:
    """The child's loop: build and apply a grammar sampler for each text; answer {"ok", "error"}."""
    import ctypes
    import resource

    memory = int(os.environ.get("DISTILL_GRAMMAR_CHILD_MEMORY", 2 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash here is expected now and then: no core files

    import llama_cpp
    from llama_cpp import Llama

    # Why a grammar is refused: the parser prints it to stderr (and logs a generic line through llama.cpp's
    # log), so stderr goes to an in-memory file that is read back after each refusal.
    captured = os.memfd_create("grammar-stderr")
    os.dup2(captured, 2)

    def why() -> str:
        os.lseek(captured, 0, os.SEEK_SET)
        lines = os.read(captured, 1 << 16).decode("utf-8", errors="replace").splitlines()
        os.ftruncate(captured, 0)
        os.lseek(captured, 0, os.SEEK_SET)
        found = [ln.split("error parsing grammar:", 1)[-1].strip() for ln in lines if "error" in ln.lower()]
        return found[0][:300] if found else "the parser refused it"
    model = Llama(model_path=model_path, vocab_only=True, verbose=False)
    vocab = model._model.vocab
    n_vocab = model.n_vocab()
    data = (llama_cpp.llama_token_data * n_vocab)()
    out = sys.stdout.buffer

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    why()  # drop what loading printed
    reply({"ready": True})
    for line in sys.stdin.buffer:
        text = json.loads(line)["grammar"]
        if "\x00" in text:
            reply({"ok": False, "error": "the grammar contains a NUL character"})
            continue
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not sampler:
            reply({"ok": False, "error": why()})
            continue
        # The first sampling step: every token of the vocabulary against the grammar's initial stacks.
        for i in range(n_vocab):
            data[i].id, data[i].logit, data[i].p = i, 0.0, 0.0
        candidates = llama_cpp.llama_token_data_array(data=data, size=n_vocab, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        allowed = sum(1 for i in range(candidates.size) if data[i].logit != float("-inf"))
        llama_cpp.llama_sampler_free(sampler)
        if allowed == 0:
            reply({"ok": False, "error": "the grammar admits no first token (the schema matches nothing)"})
        else:
            reply({"ok": True})


if __name__ == "__main__":
    _child_main(sys.argv[1])
