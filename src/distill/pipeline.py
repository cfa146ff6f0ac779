"""The main job: the pipeline's stages in order, on one profile. The notebook calls the same functions."""

from __future__ import annotations

from rich.console import Console

from distill.config import Config, load_config
from distill.data import prepare_data, save_data
from distill.env import check_env, missing
from distill.errors import DistillError

console = Console()

# Stages that are not built yet are listed, never faked.
PENDING_STAGES = [
    "teacher endpoint + quality gate + labeling + curation (issue 4)",
    "LoRA finetune of the student as a Ray job (issue 5)",
    "evaluation and BootstrapFewShotWithRandomSearch (issue 6)",
    "serving /classify_intent (issue 7)",
]


def run(profile: str | None = None) -> Config:
    cfg = load_config(profile)
    console.rule(f"distill: profile [bold]{cfg.name}[/] ({cfg.profile})")
    checks = check_env(cfg)
    for c in checks:
        console.print(c.line())
    if bad := missing(checks):
        raise DistillError("environment incomplete: " + "; ".join(c.line() for c in bad))

    console.rule("data")
    data = prepare_data(cfg)
    files = save_data(data, cfg.artifacts / "data")
    s = data.summary()
    console.print(
        f"{s['source']}: train {s['train']}, test {s['test']} (using {s['test_used']}), "
        f"{len(s['labels'])} labels, gold {s['gold']}, unlabeled {s['unlabeled']} (teacher labels {s['to_label']})"
    )
    console.print(f"wrote {', '.join(str(p.relative_to(cfg.root)) for p in files.values())}")

    console.rule("not run yet")
    for stage in PENDING_STAGES:
        console.print(f"[yellow]not implemented yet[/]: {stage}")
    return cfg
