"""The run report, `<artifacts>/report.json`, assembled from the stages' manifests.

Nothing is merged across runs: each section is one stage's whole manifest, and a section whose upstream
manifests have changed since it was computed is left out (it is stale until that stage runs again).
`python -m distill report --markdown` prints the measured table the README shows.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from distill.config import Config
from distill.env import installed_versions
from distill.stages.base import Manifest, fingerprint, read_manifest, write_manifest
from distill.stages.graph import manifest_types
from distill.tracking import git_commit

console = Console()


class RunManifest(Manifest):
    """The pipeline run: profile, sizes, versions, wall time (set-up excluded) and set-up time."""

    profile: str
    sizes: dict[str, Any]
    versions: dict[str, str]
    setup_seconds: float | None = None
    # Where and from what the numbers were measured: the report's Markdown table carries it.
    git_commit: str = "unknown"
    cpu_count: int | None = None


def report_path(cfg: Config) -> Path:
    return cfg.artifacts / "report.json"


def current_manifests(cfg: Config) -> dict[str, Manifest]:
    """Each stage's manifest whose recorded upstream fingerprints match the upstream manifests on disk."""
    out: dict[str, Manifest] = {}
    for name, model in manifest_types().items():
        m = read_manifest(cfg.artifacts / name / "manifest.json", model)
        if m is not None and all(up in out and out[up].fingerprint == fp for up, fp in m.inputs.items()):
            out[name] = m
    run = read_manifest(cfg.artifacts / "run" / "manifest.json", RunManifest)
    if run is not None and all(up in out and out[up].fingerprint == fp for up, fp in run.inputs.items()):
        out["run"] = run
    return out


def assemble_report(cfg: Config) -> dict[str, Any]:
    manifests = current_manifests(cfg)
    report: dict[str, Any] = {name: m.model_dump(mode="json") for name, m in manifests.items()}
    # Latency and cost side by side: the teacher and the deployed student, timed on the same test queries.
    calls = {who: report[stage][key] for who, stage, key in (
        ("teacher", "teacher", "calls"), ("teacher_llm_path", "teacher", "calls_llm"), ("student_best", "eval", "calls"))
        if report.get(stage, {}).get(key)}
    tokens = ("prompt_tokens_per_query", "completion_tokens_per_query")
    if calls:
        report["latency"] = {who: {k: v for k, v in c.items() if k not in tokens} for who, c in calls.items()}
        report["cost"] = {who: {k: v for k, v in c.items() if k in (*tokens, "model")} for who, c in calls.items()}
    return report


def write_report(cfg: Config) -> dict[str, Any]:
    """Assemble the report from the manifests and write it atomically."""
    report = assemble_report(cfg)
    p = report_path(cfg)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    tmp.replace(p)
    return report


def load_report(cfg: Config) -> dict[str, Any]:
    """The report as the manifests on disk give it now."""
    return assemble_report(cfg)


def finish_run(cfg: Config, started: float | None, setup_seconds: float | None = None,
               commit: str | None = None) -> dict[str, Any]:
    """Write the run manifest (wall time since `started`, sizes, versions) and the report.

    `setup_seconds` defaults to what `make setup` recorded when it built this environment; `commit` (the
    one checked out when the run started) to the one checked out now.
    """
    if setup_seconds is None and (recorded := Path(sys.prefix) / "setup-seconds").is_file():
        setup_seconds = float(recorded.read_text().strip() or 0)
    stages = {name: m.fingerprint for name, m in current_manifests(cfg).items() if name != "run"}
    run = RunManifest(
        fingerprint=fingerprint(stages), inputs=stages, profile=cfg.name,
        sizes={"task": cfg.task.name, "labels": cfg.task.labels.top_n or len(cfg.task.labels.names or []),
               **cfg.data.model_dump(exclude={"dir", "hub_id", "hub_revision", "top_n_labels"}),
               "finetune_training": cfg.finetune.training, "bfrs": cfg.evaluation.bfrs.model_dump()},
        versions=installed_versions(),
        wall_seconds=round(time.time() - started, 1) if started is not None else 0.0,
        setup_seconds=setup_seconds, git_commit=commit or git_commit(cfg.root), cpu_count=os.cpu_count(),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),  # the report's footer says when
    )
    write_manifest(cfg.artifacts / "run" / "manifest.json", run)
    return write_report(cfg)


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers of a report, as (what, value) rows."""
    t, c, f, e, r = (report.get(k, {}) for k in ("teacher", "curation", "finetune", "eval", "run"))
    lat, cost, srv = report.get("latency", {}), report.get("cost", {}), report.get("serving", {})
    base = report.get("baselines", {})
    rows = []
    if base:
        rows.append((f"baselines on the {base['n_gold']} gold embeddings: 1-NN / logistic regression (test)",
                     " / ".join(_pct(base["accuracy"].get(k)) for k in ("nearest_neighbour", "logistic_regression"))))
    if t:
        rows.append(("teacher accuracy: gold (leave-one-out) / test",
                     f"{_pct(t['accuracy_gold'])} / {_pct(t['accuracy_test'])} ({t['test_size']} test queries)"))
        if rt := t.get("routing"):
            rows.append((f"teacher routing, chosen {'on gold (leave-one-out)' if rt['chosen_by'] == 'auto' else 'by the profile'}"
                         ": vote_confidence / gold accuracy / LLM share on gold",
                         f"{rt['vote_confidence']:g} / {_pct(rt['accuracy_gold'])} / {_pct(rt['llm_share_gold'])}"))
        if t.get("vote"):
            rows.append(("teacher: its vote alone (test) / share of test queries the LLM answered",
                         f"{_pct(t['vote']['accuracy_test'])} / {_pct(t['llm_share_test'])}"))
    if t or c:
        rows.append(("labeled -> kept after curation", f"{t.get('labeled', '-')} -> {c.get('kept', '-')}"))
    if f:
        loss = (f"{f['first_loss']:.3f} -> {f['last_loss']:.3f}" if f.get("first_loss") is not None else "-")
        rows.append(("finetune: steps, training loss first -> last, wall",
                     f"{f['steps']}, {loss}, {f['wall_seconds']:.0f} s"))
        if v := f.get("validation"):
            best = (f"epoch {v['best_epoch']:g} (step {v['best_step']}), {v['metric']} {v['best_metric']:.3f}"
                    if v.get("best_step") is not None else "no evaluation before the cap")
            rows.append((f"finetune: checkpoint kept on {v['examples']} held-out examples",
                         best + (", stopped early" if v.get("stopped_early") else "")))
    for split in ("devset", "testset"):
        for kind, variants in e.get(split, {}).items():
            rows.append((f"{split}: {kind} student zero-shot / BFRS",
                         f"{_pct(variants.get('vanilla'))} / {_pct(variants.get('bfrs'))}"))
    if b := e.get("best"):  # chosen on the devset (ties: optimizer valset); its test score is only reported
        rows.append(("deployed variant (chosen on the devset): devset / test",
                     f"{b['kind']} {b['variant']} ({b['model']}) {_pct(b['devset_score'])} / {_pct(b['test_score'])}"))
        if t.get("accuracy_test"):
            rows.append(("deployed student / teacher (test set)", f"{b['test_score'] / t['accuracy_test']:.2f}x"))
    for who in ("teacher", "teacher_llm_path", "student_best"):
        if who in lat:
            rows.append((f"{who}: p50 per call, tokens/query (prompt + completion)",
                         f"{lat[who]['p50_s']:.3f} s, {cost[who]['prompt_tokens_per_query']:.0f} + "
                         f"{cost[who]['completion_tokens_per_query']:.0f}"))
    teacher_lat = lat.get("teacher_llm_path") or lat.get("teacher")
    if teacher_lat and "student_best" in lat and teacher_lat["p50_s"]:
        rows.append(("deployed student p50 / teacher p50 (through its LLM)",
                     f"{lat['student_best']['p50_s'] / teacher_lat['p50_s']:.2f}x"))
    if cr := (report.get("cascade") or {}).get("result"):
        ct, cd = cr["testset"], cr["devset"]
        on = cr.get("chosen_on", "devset")
        cc = cr.get("calibration_split") if on == "calibration" else None
        where = "the calibration split" if cc else "the devset"
        rows.append((f"cascade on test (threshold chosen on {where}): cascade / student alone / teacher alone",
                     f"{_pct(ct['cascade_accuracy'])} / {_pct(ct['student_accuracy'])} / "
                     f"{_pct(ct['teacher_accuracy'])} ({ct['n']} test queries)"))
        if cc:
            rows.append((f"cascade on the calibration split ({cc['n']} hand labels neither model learned from; in-sample): "
                         "cascade / student alone / teacher alone",
                         f"{_pct(cc['cascade_accuracy'])} / {_pct(cc['student_accuracy'])} / "
                         f"{_pct(cc['teacher_accuracy'])}"))
        shares = (("calibration split", cc), ("devset", cd)) if cc else (("devset", cd),)
        rows.append((f"cascade: share of queries the teacher answered, {' / '.join(n for n, _ in shares)} / test",
                     " / ".join(_pct(x["fallback_share"]) for _, x in shares) + f" / {_pct(ct['fallback_share'])}"))
        method = cr["calibration"]["method"]
        conf = "raw confidence (no calibration did better)" if method == "none" else f"{method}-calibrated confidence"
        rows.append((f"cascade threshold on the {conf}, how chosen "
                     + (f"(calibration split, {cc['n']} hand labels)" if cc else f"(devset, {cd['n']} teacher labels)"),
                     f"{cr['threshold']:.3f}: {cr['threshold_rule']}"))
        floor = ct.get("ece_noise_floor")
        fit = cr.get("fit") or {"split": "devset"}
        fit_on = "the devset" if fit["split"] == "devset" else f"{fit['n']} {fit['split']} labels"
        rows.append((f"student confidence ECE on test: raw / calibrated (fit on {fit_on})"
                     + ("" if floor is None else " / a calibrated predictor's at this size (95th percentile)"),
                     f"{ct['ece_raw']:.3f} / {ct['ece_calibrated']:.3f}"
                     + ("" if floor is None else f" / {floor:.3f}")))
        if cost := cr.get("cost"):
            llm = cr.get("cost_llm_path")
            rows.append(("cascade per query, estimated from per-call p50s (student always, teacher on fallback): "
                         "seconds, tokens", f"{cost['seconds_p50']:.3f} s, {cost['tokens_per_query']:.0f} "
                         + (f"(every fallback through the teacher's LLM: {llm['seconds_p50']:.3f} s, "
                            f"{llm['tokens_per_query']:.0f}; " if llm else "(")
                         + f"student alone {cost['student']['p50_s']:.3f} s)"))
    if srv:
        if g := srv.get("gate"):  # which student is served: this run's, or the one deployed before (the devset)
            rows.append((f"deploy gate ({g['mode']}): {'this run' if g['deploy'] == 'new' else 'kept the deployed'}"
                         " student", g["reason"]))
        rows.append(("served /classify_intent: ok, valid labels, accuracy",
                     f"{srv['ok']}/{srv['queries']}, {_pct(srv['valid_share'])}, {_pct(srv['accuracy'])}"))
        if srv.get("cascade"):
            by = srv.get("answered_by") or {}
            rows.append(("served /classify_intent is the cascade: answered by the student / the teacher",
                         f"{by.get('student', 0)} / {by.get('teacher', 0)}"
                         + (f" ({sum((srv.get('fallback_errors') or {}).values())} teacher failures: the student's "
                            f"answer, marked)" if srv.get("fallback_errors") else "")))
    if r.get("wall_seconds"):
        wall = f"{r['wall_seconds'] / 60:.1f} min"
        # A run that skipped current stages took less than the pipeline costs: say what those stages took
        # when they ran (each manifest keeps its own wall time), so a resumed run is not read as a fast one.
        stages = sum(v.get("wall_seconds", 0.0) for k, v in report.items() if k != "run" and isinstance(v, dict))
        if stages > r["wall_seconds"] + 60:
            wall += f" (this run; every stage's own time, summed: {stages / 60:.1f} min)"
        rows.append(("wall time (set-up excluded)", wall))
    if r.get("setup_seconds"):
        rows.append(("one-time set-up of this environment (make setup)", f"{r['setup_seconds'] / 60:.1f} min"))
    return rows


def print_summary(report: dict[str, Any]) -> None:
    table = Table(title=f"distill run summary ({report.get('run', {}).get('profile', '?')})", show_header=False)
    for k, v in summary_rows(report):
        table.add_row(k, v)
    Console(width=max(console.width, 110)).print(table)


def markdown(report: dict[str, Any]) -> str:
    """The summary as a Markdown table (what README.md shows, pasted from this output)."""
    run = report.get("run", {})
    profile = run.get("profile", "?")
    lines = [f"| measured on `{profile}` | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(report)]
    if run:  # provenance travels with the numbers, not in the prose around them
        lines.append("")
        lines.append(f"Measured at commit `{run.get('git_commit', 'unknown')[:12]}` on {run.get('cpu_count') or '?'} "
                     f"CPU cores, finished {run.get('finished_at', '?')}; accuracies on the profile's own test "
                     f"queries, latencies one call at a time.")
    return "\n".join(lines)
