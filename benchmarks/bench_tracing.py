"""What DSPy tracing (`mlflow.dspy.autolog`, as `distill.tracking` turns it on) costs the teacher's labeling.

    flock /tmp/distill-heavy.lock .venv/bin/python benchmarks/bench_tracing.py --profile local_ci

The teacher stage's own teacher and `label_queries` label the same queries, on the served teacher endpoint
with an uncached LM, in passes that alternate: untraced, traced at the profile's `tracking.trace_sample`,
and every call traced. Each pass labels into a fresh scratch directory; each traced pass is an MLflow run
in a scratch store. The overhead is the median traced pass over the median untraced one, minus 1.

`--cache DIR` runs the same passes on a copy of a DSPy cache that holds these calls (a run's
`<artifacts>/dspy_cache`) instead, with no endpoint: no LLM time at all, so the overhead is all there is
to see (the upper bound, and what a re-run of labeling pays). A call the cache lacks fails at once (the
LM points at a closed port) and is counted as a miss.
The JSON result is printed and written to <artifacts>/bench/tracing.json (tracing-cached.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dspy
from rich.console import Console
from rich.table import Table

from distill import tracking
from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.evaluation.latency import write_result
from distill.lm import make_lm
from distill.stages.base import served
from distill.stages.teacher import TeacherStage
from distill.teacher.labeling import label_queries
from distill.teacher.program import GoldIndex, build_teacher, build_vote


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local_ci")
    ap.add_argument("--queries", type=int, default=60, help="queries labeled per pass")
    ap.add_argument("--rounds", type=int, default=3, help="passes per condition (alternating)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="a DSPy cache holding these calls: no endpoint, no LLM time (the upper bound)")
    args = ap.parse_args()
    cached = args.cache is not None

    cfg = load_config(args.profile)
    data = prepare_data(cfg)
    queries = list(data.to_label[: args.queries])
    t = cfg.models.teacher
    if cached:  # DSPy's cache key leaves the endpoint out: a closed port makes a miss fail, not call a server
        t = t.model_copy(update={"api_base": "http://127.0.0.1:9/v1", "timeout_s": 5})
    index = None if cfg.teacher.strategy == "zero_shot" else GoldIndex(data.gold, cfg.teacher.embedder)
    vote = build_vote(index, data.labels) if cfg.teacher.strategy == "vote_llm" else None
    teacher = (build_teacher(cfg, data.labels, data.gold, index=index, vote=vote)
               if cfg.teacher.vote_confidence != "auto"  # auto: the threshold the teacher stage chose
               else TeacherStage(cfg, data).program())
    scratch = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    sample = cfg.tracking.trace_sample
    conditions = {"untraced": None, f"traced {sample:g}": sample, "traced 1": 1.0}
    seconds: dict[str, list[float]] = {c: [] for c in conditions}
    traces: dict[str, int] = {c: 0 for c in conditions}
    misses = 0
    if cached:
        shutil.copytree(args.cache, scratch / "dspy_cache")  # a copy: the run's own cache is not touched
        dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=str(scratch / "dspy_cache"))
    with contextlib.nullcontext() if cached else served(cfg, t):
        lm = make_lm(t, cache=cached)
        if cached:  # the queries the cache answers (one untimed pass): a miss would time a failing call
            warm = label_queries(teacher, lm, queries, scratch / "warm", threads=cfg.teacher.threads)
            hits = {json.loads(line)["text"] for line in warm.path.read_text().splitlines()}
            misses, queries = len(queries) - len(hits), [q for q in queries if q.text in hits]
        for r in range(args.rounds):
            for name, ratio in conditions.items():
                run_cfg = cfg.model_copy(update={
                    "artifacts_dir": str(scratch / f"store-{name.replace(' ', '-')}"),
                    "tracking": cfg.tracking.model_copy(update={"enabled": ratio is not None,
                                                                "trace_sample": ratio or 0.0})})
                tracker = tracking.start(run_cfg)
                started = time.perf_counter()
                done = label_queries(teacher, lm, queries, scratch / f"{name}-{r}", threads=cfg.teacher.threads)
                seconds[name].append(time.perf_counter() - started)
                if done.failed:
                    raise SystemExit(f"{done.failed} calls failed in a timed pass: see {done.path.parent}")
                tracking.finish({})
                if tracker is not None:
                    client = tracking.client(run_cfg)
                    traces[name] = len(client.search_traces(locations=[tracker.experiment_id], max_results=10_000,
                                                            include_spans=False, flush=True))
    base = statistics.median(seconds["untraced"])
    result = {
        "profile": cfg.name, "queries": len(queries), "rounds": args.rounds, "cached": cached, "misses": misses,
        "threads": cfg.teacher.threads, "trace_sample": sample,
        "conditions": {name: {"seconds": [round(s, 2) for s in secs], "median_s": round(statistics.median(secs), 2),
                              "overhead": round(statistics.median(secs) / base - 1, 4),
                              "traces_stored": traces[name]}
                       for name, secs in seconds.items()},
    }
    table = Table(title=f"Labeling {len(queries)} queries ({cfg.name}, {'cached' if cached else 'uncached'} LM)")
    for c in ("condition", "passes (s)", "median (s)", "overhead", "traces stored"):
        table.add_column(c, justify="left" if c == "condition" else "right")
    for name, r in result["conditions"].items():
        table.add_row(name, " ".join(f"{s:.1f}" for s in r["seconds"]), f"{r['median_s']:.1f}",
                      f"{r['overhead']:+.1%}", str(r["traces_stored"]))
    Console().print(table)
    print(json.dumps(result))
    print(write_result(cfg, "tracing-cached" if cached else "tracing", result))


if __name__ == "__main__":
    main()
