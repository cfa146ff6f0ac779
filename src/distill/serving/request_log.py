"""The opt-in request log of `/classify_intent`: served traffic as the teacher's next labeling pool.

Off unless the program app's args carry `request_log: {path: ...}`. Each answered query is one JSON line
(`RequestRecord`: time, query, label, model, latency, confidence when the answer has one) -- never a
header, a client address or the API key.

Each record is one `os.write` of the encoded line on a file opened `O_APPEND`: the replicas of one app
append to the same file without interleaving within a line, and a killed server loses no complete line.
A SIGKILL can still cut a large write short (Linux stops copying at a page when a fatal signal is pending;
tests/test_request_log.py does it): the torn piece is the file's end, and the next record written -- by any
replica -- starts with a newline when the file does not end with one, so a torn piece never joins a
complete line. Readers skip torn pieces (a proper prefix of a record is never valid JSON) and count them.

Retention: when the file passes `max_bytes` it is renamed `<path>.1` (the older ones shift to `.2`, ...,
beyond `keep` they are deleted), and rotated files older than `max_age_s` are deleted. A replica whose file
was rotated by another one notices (the path's inode changed) and reopens. `read_request_log` reads the
current file and the rotated ones.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from distill.errors import DistillError

logger = logging.getLogger("ray.serve")


class RequestLogArgs(BaseModel):
    """`request_log:` in the program app's args (serve config)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, description="JSONL file the answered queries are appended to.")
    max_bytes: int = Field(64 << 20, ge=1024, description="Rotate the file to <path>.1 past this size.")
    keep: int = Field(3, ge=0, description="Rotated files kept (<path>.1 .. .keep); older ones are deleted.")
    max_age_s: float | None = Field(None, gt=0, description="Delete rotated files older than this (null: by count only).")


class RequestRecord(BaseModel):
    """One line of the request log (its writer and its readers share this model)."""

    model_config = ConfigDict(extra="forbid")

    time: float  # epoch seconds the answer was sent
    query: str
    label: str
    model: str
    latency_ms: float | None = None
    confidence: float | None = None  # when the answer carries one


class RequestLog:
    """Appends `RequestRecord`s, one `os.write` each, rotating by size."""

    def __init__(self, args: RequestLogArgs) -> None:
        self.args = args
        self.path = Path(args.path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # rotation and reopen; the write itself needs none
        self._fd = self._open()

    def _open(self) -> int:
        # 0o600: the queries are the users' words; only the server's user reads them.
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, record: RequestRecord) -> None:
        line = (record.model_dump_json() + "\n").encode("utf-8")
        with self._lock:
            self._follow()
            size = os.fstat(self._fd).st_size
            if size and os.pread(self._fd, 1, size - 1) != b"\n":  # a killed writer's torn piece: end it
                line = b"\n" + line
            os.write(self._fd, line)  # one call: never interleaved with another replica's line
            if os.fstat(self._fd).st_size > self.args.max_bytes:
                self._rotate()

    def answered(self, query: str, label: str, model: str, latency_ms: float | None = None,
                 confidence: float | None = None) -> None:
        """Log one answer; a log that cannot be written (disk full) is a warning, never a failed request."""
        try:
            self.append(RequestRecord(time=round(time.time(), 3), query=query, label=label, model=model,
                                      latency_ms=latency_ms, confidence=confidence))
        except OSError as e:
            logger.warning("request log %s: %s (the answer was sent, not logged)", self.path, e)

    def _follow(self) -> None:
        """Reopen when another writer rotated the file (our fd then points at `<path>.1`)."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(self._fd)
            self._fd = self._open()

    def _rotate(self) -> None:
        a = self.args
        for i in range(a.keep, 0, -1):
            src = self.path if i == 1 else rotated(self.path, i - 1)
            if src.exists():
                os.replace(src, rotated(self.path, i))
        if a.keep == 0:
            self.path.unlink(missing_ok=True)
        for old in rotated_files(self.path)[a.keep:]:
            old.unlink(missing_ok=True)
        if a.max_age_s is not None:
            cutoff = time.time() - a.max_age_s
            for f in rotated_files(self.path):
                if f.stat().st_mtime < cutoff:
                    f.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = self._open()

    def close(self) -> None:
        os.close(self._fd)


def rotated(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def rotated_files(path: Path) -> list[Path]:
    """`<path>.1`, `<path>.2`, ... that exist, newest first."""
    found = [(int(p.name.rsplit(".", 1)[1]), p) for p in path.parent.glob(f"{path.name}.*")
             if p.name.rsplit(".", 1)[1].isdigit()]
    return [p for _, p in sorted(found)]


RECORD_START = '{"time":'  # how every record's JSON begins (`time` is its first field)


def read_request_log(path: Path) -> tuple[list[RequestRecord], int]:
    """Every complete record of the log and its rotated files, oldest first, and how many torn pieces
    (writes cut short by a kill) were skipped. Any other line that is not a record is an error naming it."""
    path = Path(path)
    files = [*reversed(rotated_files(path)), path]
    if not any(f.is_file() for f in files):
        raise DistillError(f"request log {path} does not exist (is request_log set in the serve config's args?)")
    out: list[RequestRecord] = []
    torn = 0
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for i, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                out.append(RequestRecord.model_validate_json(line))
            except ValidationError as e:
                cut = line.startswith(RECORD_START) or RECORD_START.startswith(line)
                if cut and all(err["type"] == "json_invalid" for err in e.errors()):
                    torn += 1  # a record's beginning whose end was never written
                    continue
                raise DistillError(f"{f}:{i} is not a request record ({e.errors()[0]['msg']})") from None
    return out, torn
