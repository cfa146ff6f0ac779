"""A pipeline stage: a name, the fingerprint of its inputs, a typed manifest, and a run.

A stage's manifest (`<artifacts>/<stage>/manifest.json`) is written whole, only when the stage has
finished, and records the fingerprint of everything it was computed from (including the manifests of
the stages it reads). A stage is current when its manifest's fingerprint equals the one its inputs give
now and its output files exist; `Stage.ensure()` then returns the manifest instead of running.

`report.json` is assembled from the manifests (see `distill.stages.report`): nothing in it is merged
across runs, so a number measured under other inputs cannot survive a change of them.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import json
import time
from abc import ABC, abstractmethod
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Generic, Iterator, TypeVar

import dspy
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console

from distill.config import Config, LMConfig
from distill.errors import DistillError
from distill.lm import adapter, make_lm
from distill.models import ModelSource, file_identity
from distill.program import IntentClassificationModule
from distill.serving.control import forward_env_names, serving

console = Console()


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (anything else by its str())."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@functools.cache
def code_version(*modules: str) -> str:
    """A hash of the code of these modules (a package: all its modules), comments and docstrings left out:
    a stage whose code changes is not current any more, one whose comments change still is."""
    parts = []
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise DistillError(f"code_version: no module {name!r}")
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if spec.submodule_search_locations else [origin]
        for f in files:
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):  # drop docstrings: they document, they do not compute
                body = getattr(node, "body", None)
                if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                    node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
            parts.append((str(f.relative_to(origin.parent.parent if spec.submodule_search_locations
                                              else origin.parent)), ast.dump(tree)))
    return fingerprint(parts)


# The code of the LLM server: how it decodes (closed-set decoding, grammars) changes what a model answers.
LLM_SERVER_CODE = ("distill.serving.llm", "distill.serving.choices", "distill.serving.common")
# Keys whose directory value is a model (weights and tokenizer files), identified by its files' content.
_MODEL_DIR_KEYS = {"model_source", "model_path", "path", "lora_path"}


def serve_config_identity(cfg: Config, path: str | Path) -> Any:
    """A Serve config as what it serves: its settings, every YAML file it refers to (read in), and every
    model file or model directory it names, by content (`distill.models.file_identity`)."""

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            if node and set(node) <= {"path", "package", "file"}:
                try:
                    return {"model": file_identity(ModelSource(**node).resolve())}
                except (ValueError, DistillError) as e:
                    return {"unresolved": str(e), **node}
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key) for v in node]
        if isinstance(node, str) and node and not node.startswith(("http:", "https:", "s3:", "gs:")):
            p = cfg.path(node)
            try:
                if p.suffix in (".yaml", ".yml") and p.is_file():
                    return {"file": node, "content": walk(yaml.safe_load(p.read_text()))}
                if p.is_file() and key in _MODEL_DIR_KEYS:
                    return {"file": node, "identity": file_identity(p)}
                if p.is_dir() and key in _MODEL_DIR_KEYS and (p / "config.json").is_file():
                    return {"dir": node, "identity": file_identity(p)}
            except OSError:
                pass
        return node

    p = cfg.path(path)
    if not p.is_file():
        raise DistillError(f"serve config not found: {p}")
    return walk(yaml.safe_load(p.read_text()))


def endpoint_fingerprint(cfg: Config, lm_cfg: LMConfig, serve_config: str | Path | None = None) -> str:
    """Everything that decides what an endpoint answers: the client's settings (model id, max_tokens,
    temperature), the Serve config with the model files it loads, and the server's decoding code."""
    client = lm_cfg.model_dump(exclude={"api_base", "api_key_env", "timeout_s", "serve_config"})
    path = serve_config or lm_cfg.serve_config
    return fingerprint(client, serve_config_identity(cfg, path) if path else None, code_version(*LLM_SERVER_CODE))


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


class Tracked(BaseModel):
    """What a stage that ran leaves in its MLflow run besides its manifest: files, JSON files, loss series."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    files: list[Path] = []
    dicts: dict[str, Any] = {}
    series: dict[str, list[tuple[int, float]]] = {}


class Stage(ABC, Generic[M]):
    name: ClassVar[str]
    title: ClassVar[str]  # the rule printed when the stage starts
    manifest_type: ClassVar[type[Manifest]]
    # The stages whose outputs this one reads, by name: the pipeline's order, the report's sections and the
    # staleness checks derive from it (`distill.stages.graph`). `inputs()` returns their fingerprints.
    upstream: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build(cls, graph: Any) -> "Stage[Any]":
        """This stage as the pipeline builds it, from the graph's config, data and upstream stages
        (`graph.stage(name)`); a stage whose constructor is `(cfg, data)` needs no override."""
        return cls(graph.cfg, graph.data)  # type: ignore[call-arg]

    def tracked(self, manifest: M) -> Tracked:
        """What tracking records of this stage besides its manifest's numbers."""
        return Tracked()

    def on_recorded(self, record: Any, manifest: M) -> None:
        """Called after tracking recorded a stage that ran (e.g. to register a model)."""

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

    def lm(self, lm_cfg: LMConfig, model: str | None = None, cache: bool = True, **kwargs: Any) -> dspy.LM:
        """The DSPy LM for an endpoint of the profile (`kwargs`: e.g. `logprobs=True`)."""
        return make_lm(lm_cfg, model=model, cache=cache, **kwargs)

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
        if undeclared := set(self.inputs()) - set(self.upstream):
            raise DistillError(f"stage {self.name!r} reads {sorted(undeclared)}, which its `upstream` does not "
                               f"declare ({self.upstream})")
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
                 timeout_s=cfg.serving.timeout_s), \
            endpoint_cache(cfg, endpoint_fingerprint(cfg, lm_cfg, serve_config)):
        yield


@contextlib.contextmanager
def endpoint_cache(cfg: Config, key: str) -> Iterator[None]:
    """DSPy's LM cache for this block kept per endpoint identity (`endpoint_fingerprint`).

    DSPy keys its cache on the model id and the request, not on the weights or the decoding behind the id:
    a teacher whose GGUF, serve config or server code changed would otherwise be answered from the old
    teacher's cache. With DSPy's disk cache off, it stays off.
    """
    previous = dspy.cache
    if not getattr(previous, "enable_disk_cache", False):
        yield
        return
    dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(cfg.artifacts / "dspy_cache_endpoints" / key))
    try:
        yield
    finally:
        dspy.cache = previous
