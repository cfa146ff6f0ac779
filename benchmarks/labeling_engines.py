"""Teacher labeling, threads vs Ray Data, on the profile's real teacher endpoint: throughput and agreement.

    BANKING77_DIR=... flock /tmp/distill-heavy.lock .venv/bin/python benchmarks/labeling_engines.py \
        [--profile local] [--queries 450] [--vote-confidence 0.4]

The same teacher program labels the same queries twice, uncached, once per engine (`teacher.threads`
threads; `teacher.ray_data` actors), into fresh directories. Prints and writes
<artifacts>/bench/labeling_engines.json: queries/s of each, the ratio, and how many labels differ.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.evaluation.latency import write_result
from distill.lm import make_lm
from distill.serving.control import forward_env_names, serving
from distill.stages.teacher import TeacherStage
from distill.teacher.labeling import label_queries, read_records
from distill.teacher.labeling_ray import label_queries_ray
from distill.teacher.program import build_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="local")
    ap.add_argument("--queries", type=int, default=None, help="default: the profile's num_to_label")
    ap.add_argument("--vote-confidence", type=float, default=None, help="override (1.0: every query to the LLM)")
    ap.add_argument("--order", choices=["threads-first", "ray-first"], default="threads-first")
    args = ap.parse_args()
    overrides = {"teacher": {"vote_confidence": args.vote_confidence}} if args.vote_confidence is not None else None
    cfg = load_config(args.profile, overrides=overrides)
    data = prepare_data(cfg)
    queries = data.to_label[: args.queries] if args.queries else data.to_label
    teacher = (build_teacher(cfg, data.labels, data.gold)
               if cfg.teacher.vote_confidence != "auto"  # auto: the threshold the teacher stage chose
               else TeacherStage(cfg, data).program())
    t = cfg.models.teacher
    runs = {}
    with tempfile.TemporaryDirectory() as tmp, serving(cfg.path(t.serve_config), t.api_base, models=[t.model],
                                                     forward_env=forward_env_names(cfg)):
        order = ["threads", "ray_data"] if args.order == "threads-first" else ["ray_data", "threads"]
        for engine in order:
            out = Path(tmp) / engine
            if engine == "threads":
                r = label_queries(teacher, make_lm(t, cache=False), queries, out, threads=cfg.teacher.threads)
            else:
                r = label_queries_ray(teacher, t, queries, out, cfg.teacher.ray_data, cache=False)
            runs[engine] = (r, {rec["id"]: rec["label"] for rec in read_records(r.path)})
    (tr, tl), (rr, rl) = runs["threads"], runs["ray_data"]
    result = {
        "profile": cfg.name, "queries": len(queries), "strategy": cfg.teacher.strategy,
        "vote_confidence": cfg.teacher.vote_confidence, "order": args.order,
        "threads": {"threads": cfg.teacher.threads, "seconds": round(tr.seconds, 2),
                    "queries_per_s": round(tr.new / tr.seconds, 3), "failed": tr.failed},
        "ray_data": {**cfg.teacher.ray_data.model_dump(), "seconds": round(rr.seconds, 2),
                     "queries_per_s": round(rr.new / rr.seconds, 3), "failed": rr.failed},
        "ratio_ray_data_over_threads": round((rr.new / rr.seconds) / (tr.new / tr.seconds), 3),
        "labels_differ": sum(tl[i] != rl.get(i) for i in tl),
        "labels_compared": len(tl),
    }
    path = write_result(cfg, "labeling_engines", result)
    print(f"threads : {result['threads']['queries_per_s']:.3f} queries/s ({tr.new} in {tr.seconds:.1f} s)")
    print(f"ray_data: {result['ray_data']['queries_per_s']:.3f} queries/s ({rr.new} in {rr.seconds:.1f} s)")
    print(f"ray_data / threads: {result['ratio_ray_data_over_threads']:.2f}x; "
          f"{result['labels_differ']} of {result['labels_compared']} labels differ -> {path}")


if __name__ == "__main__":
    main()
