"""What `teacher.vote_confidence: auto` chooses for a profile, on its gold labels only (no test query is read).

    BANKING77_DIR=... flock /tmp/distill-heavy.lock .venv/bin/python benchmarks/teacher_routing.py \
        [--profile local] [--out routing.json]

Serves the profile's teacher, runs the teacher stage's leave-one-out pass on the gold labels it gates on
(one LLM call per gold example) and prints the grid: for each threshold, the leave-one-out accuracy and the
LLM's share, the point chosen and curation's floor. The same numbers as the teacher stage's `routing`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.lm import make_lm
from distill.serving.control import forward_env_names, serving
from distill.teacher.program import GoldIndex, build_teacher, build_vote
from distill.teacher.routing import LLM_ALWAYS, tune_routing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="local")
    ap.add_argument("--out", type=Path, default=None, help="write the routing report as JSON here")
    args = ap.parse_args()
    cfg = load_config(args.profile)
    data = prepare_data(cfg)
    gold = data.gold[: cfg.teacher.gate_size] if cfg.teacher.gate_size else data.gold
    index = GoldIndex(data.gold, cfg.teacher.embedder)
    vote = build_vote(index, data.labels)
    loo = build_teacher(cfg, data.labels, data.gold, exclude_identical=True, index=index, vote=vote,
                        vote_confidence=LLM_ALWAYS)
    t = cfg.models.teacher
    with serving(cfg.path(t.serve_config), t.api_base, models=[t.model], forward_env=forward_env_names(cfg)):
        r = tune_routing(loo, make_lm(t, cache=False), gold, cfg.teacher.threads,
                         floor_auto=cfg.curation.min_confidence == "auto")
    print(f"{cfg.name} / task {cfg.task.name}: {r.n_gold} gold, vote C={vote.c:g}, {r.seconds:.0f} s, "
          f"{r.llm_failures} failed LLM calls")
    print("threshold  loo_accuracy  llm_share")
    for p in r.grid:
        mark = "  <- chosen" if p.threshold == r.vote_confidence else ""
        print(f"{p.threshold:9.4f}  {p.accuracy:12.1%}  {p.llm_share:9.1%}{mark}")
    print(f"chosen vote_confidence {r.vote_confidence:g}: {r.accuracy_gold:.1%} leave-one-out, the LLM on "
          f"{r.llm_share_gold:.0%}; the LLM's band: {r.llm_band_accuracy} on {r.llm_band_n}; "
          f"curation floor {r.min_confidence}")
    if args.out:
        args.out.write_text(json.dumps({"profile": cfg.name, "task": cfg.task.name, "vote_c": vote.c,
                                        **r.model_dump()}, indent=2))


if __name__ == "__main__":
    main()
