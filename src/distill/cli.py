"""`python -m distill <command>`: the same functions the notebook calls.

Each command imports what it needs when it runs: `--help` and the light commands stay fast without
loading DSPy, Ray or torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from distill.errors import DistillError


def _cmd_data(args: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.data.dataset import prepare_data, save_data
    from distill.pool import with_extra_pool

    cfg = load_config(args.profile)
    data = with_extra_pool(cfg, prepare_data(cfg))  # what the data stage gives the run
    if args.save:
        save_data(data, cfg.artifacts / "data")
    print(json.dumps(data.summary(), indent=None if args.compact else 2))
    return 0


def _cmd_pool(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distill.config import load_config
    from distill.pool import pool_from_log

    cfg = load_config(args.profile)
    out, counts = pool_from_log(cfg, Path(args.from_log), Path(args.out) if args.out else None)
    print(json.dumps({"pool": str(out), **counts.model_dump()}))
    return 0


def _cmd_check_env(args: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.env import check_env, missing

    cfg = load_config(args.profile)
    checks = check_env(cfg)
    for c in checks:
        print(c.line())
    bad = missing(checks)
    if bad:
        print(f"{len(bad)} requirement(s) missing for profile '{cfg.name}'", file=sys.stderr)
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import time

    from distill.config import load_config
    from distill.serving.control import forward_env_names, shutdown, start_serve_config, wait_until_ready

    cfg = load_config(args.profile)
    lm_cfg = getattr(cfg.models, args.role)
    path = cfg.path(args.config or lm_cfg.serve_config)
    try:
        start_serve_config(path, forward_env=forward_env_names(cfg))
        ids = wait_until_ready(lm_cfg.api_base, args.timeout, str(path))
        print(f"serving {ids} at {lm_cfg.api_base} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        shutdown()


def _cmd_finetune_job(args: argparse.Namespace) -> int:
    from distill.student.finetune import job_main

    return job_main(args.job, args.result)


def _cmd_run(args: argparse.Namespace) -> int:
    from distill.pipeline import run

    run(args.profile, verbose=args.verbose or None)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.report import load_report, markdown, print_summary

    cfg = load_config(args.profile)
    report = load_report(cfg)
    if not report:
        raise DistillError(f"no stage has finished yet under {cfg.artifacts}: run `python -m distill run` first")
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif args.markdown:
        print(markdown(report))
    else:
        print_summary(report)
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from rich.console import Console

    from distill.config import load_config
    from distill.tracking import history_table, run_history, ui_command

    cfg = load_config(args.profile)
    rows = run_history(cfg, args.last)
    if not rows:
        raise DistillError(f"no run of '{cfg.name}' recorded in MLflow yet ({ui_command(cfg)}): "
                           f"run `python -m distill run --profile {cfg.name}` first")
    Console(width=max(Console().width, 140)).print(
        history_table(rows, f"{cfg.name}: the last {len(rows)} pipeline run(s), newest first"))
    print(f"browse them: {ui_command(cfg)}")
    return 0


def _cmd_notebook(args: argparse.Namespace) -> int:
    from distill.config import load_config
    from distill.notebook import execute_notebook, publish_notebook
    from distill.report import load_report, print_summary

    profile = args.profile or load_config(None).name
    if args.publish:  # no execution: the outputs of the last `make demo` go into README.ipynb
        publish_notebook(args.output or load_config(profile).artifacts / "README.executed.ipynb", args.notebook)
        return 0
    out = execute_notebook(profile, args.notebook, args.output, args.timeout, args.section or None, args.verbose)
    print(f"executed notebook: {out}")
    print_summary(load_report(load_config(profile)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--profile", default=None, help="profile name in configs/ or a YAML path (default: $DISTILL_PROFILE or local)"
    )
    p = argparse.ArgumentParser(prog="distill", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="load banking77, keep the top-n labels, print sizes and labels as JSON", parents=[common])
    d.add_argument("--save", action="store_true", help="also write the splits under <artifacts>/data")
    d.add_argument("--compact", action="store_true", help="one-line JSON")
    d.set_defaults(func=_cmd_data)

    pl = sub.add_parser("pool", help="the served requests' log as the next labeling pool: deduplicated, without "
                        "test and gold queries, most uncertain (for the teacher's vote) first", parents=[common])
    pl.add_argument("--from-log", required=True, help="the request log (request_log.path in the serve config's args)")
    pl.add_argument("--out", default=None, help="default: <artifacts>/pool/pool.jsonl")
    pl.set_defaults(func=_cmd_pool)

    e = sub.add_parser("check-env", help="report what the profile needs from the environment", parents=[common])
    e.set_defaults(func=_cmd_check_env)

    s = sub.add_parser("serve", help="bring up a serve config (the profile's teacher/student by default)", parents=[common])
    s.add_argument("config", nargs="?", help="serve config YAML (default: the role's serve_config)")
    s.add_argument("--role", choices=["teacher", "student"], default="teacher")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for /v1/models")
    s.set_defaults(func=_cmd_serve)

    f = sub.add_parser("finetune-job", help="run one LoRA finetune (what the Ray job executes)")
    f.add_argument("--job", required=True, help="TrainJob JSON")
    f.add_argument("--result", required=True, help="where to write the result JSON")
    f.set_defaults(func=_cmd_finetune_job)

    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true",
                         help="show Ray's, Serve's and the finetune job's logs too (always written to <artifacts>/logs/)")

    r = sub.add_parser("run", help="run the pipeline's stages in order", parents=[common, verbose])
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("report", help="the measured numbers of the profile's current stages", parents=[common])
    fmt = rp.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="the table README.md shows")
    fmt.add_argument("--json", action="store_true", help="the whole report, as report.json holds it")
    rp.set_defaults(func=_cmd_report)

    h = sub.add_parser("runs", help="the run history recorded in MLflow: the last N pipeline runs, newest first",
                       parents=[common])
    h.add_argument("--last", type=int, default=10, help="how many runs (default 10)")
    h.set_defaults(func=_cmd_runs)

    n = sub.add_parser("notebook", help="execute README.ipynb headlessly (make demo), then print the summary",
                       parents=[common, verbose])
    n.add_argument("--notebook", default=None, help="default: README.ipynb at the project root")
    n.add_argument("--output", default=None, help="default: <artifacts>/README.executed.ipynb")
    n.add_argument("--timeout", type=float, default=3600, help="seconds per cell")
    n.add_argument("--section", action="append", help="run only this section (repeatable; set-up and data always run)")
    n.add_argument("--publish", action="store_true",
                   help="execute nothing: copy the outputs of the executed notebook (--output, default "
                        "<artifacts>/README.executed.ipynb) into README.ipynb (--notebook), if its code cells are "
                        "README.ipynb's, and record their hash")
    n.set_defaults(func=_cmd_notebook)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from distill.env import load_env

    args = build_parser().parse_args(argv)
    load_env()
    try:
        return args.func(args)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
