"""A pipeline stage: a name, the fingerprint of its inputs, a typed manifest, and a run.

A stage's manifest (`<artifacts>/<stage>/manifest.json`) is written whole, only when the stage has
finished, and records the fingerprint of everything it was computed from (including the manifests of
the stages it reads). A stage is current when its manifest's fingerprint equals the one its inputs give
now and its output files exist; `Stage.ensure()` then returns the manifest instead of running.

`report.json` is assembled from the manifests (see `distill.stages.report`): nothing in it is merged
across runs, so a number measured under other inputs cannot survive a change of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Generic, Iterator, TypeVar

import dspy
from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console

from distill.config import Config, LMConfig
from distill.errors import DistillError
from distill.lm import adapter, make_lm
from distill.program import IntentClassificationModule
from distill.serving.control import forward_env_names, serving

console = Console()


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (anything else by its str())."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Manifest(BaseModel):
    """What every stage records; each stage's manifest adds its measured numbers."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    # The fingerprints of the upstream manifests this one was computed from (stage name -> fingerprint):
    # the report drops a section whose upstream has changed since.
    inputs: dict[str, str] = {}
    finished_at: str = ""
    wall_seconds: float = 0.0


M = TypeVar("M", bound=Manifest)


class Stage(ABC, Generic[M]):
    name: ClassVar[str]
    title: ClassVar[str]  # the rule printed when the stage starts
    manifest_type: ClassVar[type[Manifest]]

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # After `ensure()`: True when the stage was current and did not run (run tracking tags it so).
        self.skipped: bool | None = None

    @property
    def dir(self) -> Path:
        return self.cfg.artifacts / self.name

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @abstractmethod
    def fingerprint(self) -> str:
        """Everything the outputs depend on; a change means the stage must run again."""

    def outputs(self, manifest: M) -> list[Path]:
        """Files that must still exist for the stage to count as current."""
        return []

    @abstractmethod
    def run(self) -> M:
        """Compute the outputs and return the manifest (without finished_at/wall_seconds)."""

    def describe(self, manifest: M) -> str:
        """One line saying what a current stage holds (printed when it is skipped)."""
        return str(self.manifest_path)

    def inputs(self) -> dict[str, str]:
        """The upstream manifests' fingerprints this stage reads (recorded in its manifest)."""
        return {}

    def endpoint(self, lm_cfg: LMConfig, serve_config: str | Path | None = None,
                 models: list[str] | None = None) -> contextlib.AbstractContextManager[Any]:
        """The served endpoint for this block (a stage's tests may bring their own)."""
        return served(self.cfg, lm_cfg, serve_config, models)

    def lm(self, lm_cfg: LMConfig, model: str | None = None, cache: bool = True) -> dspy.LM:
        """The DSPy LM for an endpoint of the profile."""
        return make_lm(lm_cfg, model=model, cache=cache)

    def check(self, manifest: M) -> None:
        """Raise if a current stage's result must not be used now (e.g. the teacher's quality gate)."""

    def load(self) -> M | None:
        """The stage's manifest, or None when there is none (or it is not one: an older format)."""
        return read_manifest(self.manifest_path, self.manifest_type)  # type: ignore[return-value]

    def is_current(self) -> bool:
        m = self.load()
        return m is not None and m.fingerprint == self.fingerprint() and all(p.exists() for p in self.outputs(m))

    def ensure(self) -> M:
        """The current manifest, running the stage first when it is not current."""
        console.rule(self.title)
        if self.is_current():
            m = self.load()
            assert m is not None
            if m.inputs != self.inputs():
                # Upstream ran again but gave what this stage was computed from (its fingerprint is
                # content-based): still current, now for the new upstream manifests.
                m = m.model_copy(update={"inputs": self.inputs()})
                write_manifest(self.manifest_path, m)
            console.print(f"{self.name} is current: {self.describe(m)}; skipped")
            self.check(m)
            self.skipped = True
            return m
        # The old manifest goes before the work starts: an interrupted run leaves no stale "done".
        self.manifest_path.unlink(missing_ok=True)
        started = time.perf_counter()
        m = self.run()
        m = m.model_copy(update={"inputs": self.inputs(),
                                 "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "wall_seconds": round(time.perf_counter() - started, 1)})
        write_manifest(self.manifest_path, m)
        self.skipped = False
        return m


def read_manifest(path: Path, model: type[M]) -> M | None:
    if not path.is_file():
        return None
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError:
        return None  # another version's format: the stage runs again


def write_manifest(path: Path, manifest: Manifest) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2))
    tmp.replace(path)


def require(manifest: M | None, what: str) -> M:
    """An upstream stage's manifest, or a clear error naming the stage to run first."""
    if manifest is None:
        raise DistillError(f"no {what} yet: run the {what} stage first")
    return manifest


class CallStats(BaseModel):
    """Latency per call (one at a time, uncached) and tokens per query, on the same test queries."""

    model_config = ConfigDict(extra="forbid")

    model: str
    n: int
    p50_s: float
    p95_s: float
    prompt_tokens_per_query: float
    completion_tokens_per_query: float

    def line(self, who: str) -> str:
        return (f"{who} ({self.model}): p50 {self.p50_s:.3f} s per call, {self.prompt_tokens_per_query:.0f} prompt + "
                f"{self.completion_tokens_per_query:.0f} completion tokens per query")


def prompt_fingerprint(cfg: Config, labels: list[str], student: bool = True) -> str:
    """Changes whenever a prompt the program sends changes (adapter, signature, labels): the full prompt
    (teacher, base student) and, with `student`, the finetuned student's."""
    program = IntentClassificationModule(labels, cfg.program.reasoning, cfg.program.max_reasoning_chars)
    prompts = ("full", cfg.program.student_prompt) if student else ("full",)
    return fingerprint([adapter(p).format(program.predictor.signature, [], {"text": ""}) for p in prompts])


@contextlib.contextmanager
def served(cfg: Config, lm_cfg: LMConfig, serve_config: str | Path | None = None,
           models: list[str] | None = None) -> Iterator[None]:
    """The endpoint of `lm_cfg` up (from its Serve config, or `serve_config`) for this block."""
    path = cfg.path(serve_config or lm_cfg.serve_config or "")
    # serving.timeout_s, not serving()'s 180 s default: vLLM loading a cluster model takes longer than that
    with serving(path, lm_cfg.api_base, models=models or [lm_cfg.model], forward_env=forward_env_names(cfg),
                 timeout_s=cfg.serving.timeout_s):
        yield
