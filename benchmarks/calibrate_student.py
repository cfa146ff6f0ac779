"""Calibrate a pipeline run's deployed student (issue 31): its confidence on the curation devset (teacher
labels) and the test set (gold labels), the calibration fit on the devset or the gold labels (`--fit-on`),
the cascade threshold chosen on the devset, ECE before/after on both, a reliability diagram of the test set.

    flock /tmp/distill-heavy.lock .venv/bin/python benchmarks/calibrate_student.py --artifacts <dir> --out docs/calibration
    # the run's own cascade-stage answers for devset and test, only the gold labels scored here:
    ... --artifacts artifacts/local_full --out /tmp/cal --fit-on gold --method auto --reuse-cascade-predictions

Brings up only the run's LLM application (from its deploy_dspy.yaml, on --port) and runs the saved program
with an LM that asks for logprobs. Writes cascade.json (what `distill.serving.cascade` reads),
calibration.json and reliability.png to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distill.config import LMConfig
from distill.data.dataset import make_example, read_jsonl
from distill.evaluation.calibration import calibrate_student, score_confidence
from distill.lm import make_lm
from distill.program import DeployParams
from distill.serving.control import serving
from distill_harness.llm_only import llm_only_serve_config


def summarize(out: Path, artifacts: Path) -> dict:
    """summary.json beside the fit: what docs/cascade.md shows, from calibration.json, cascade.json, scores.json
    and the run's cascade-stage test answers (the teacher's answer per query, for the cascade's accuracy at
    this fit's threshold)."""
    from distill.evaluation.calibration import CalibrationReport
    from distill.program import CascadeParams

    report = CalibrationReport.model_validate_json((out / "calibration.json").read_text())
    params = CascadeParams.load(out / "cascade.json")
    conf, _ = json.loads((out / "scores.json").read_text())["testset"]
    rows = read_jsonl(artifacts / "cascade" / "predictions" / "testset.jsonl")
    kept = [params.calibration.apply(c) >= params.threshold for c in conf]
    right = [(r["student"] if k else r["teacher"]) == r["label"] for r, k in zip(rows, kept)]
    summary = {"fit_on": report.fit_on, "n_fit": report.n_fit, "method": report.method,
               "cv_log_loss": params.calibration.cv_log_loss, "student_accuracy": {
                   "fit": report.accuracy_fit, "devset (agreement)": report.accuracy_devset,
                   "testset": report.accuracy_testset},
               "ece_testset": {"raw": report.ece_testset_before, "calibrated": report.ece_testset_after,
                               "chance": report.ece_testset_noise_floor},
               "threshold": report.threshold, "threshold_rule": report.threshold_rule,
               "testset_fallback_share": report.testset_fallback_share,
               "testset_cascade_accuracy": sum(right) / len(right),
               "testset_teacher_accuracy": sum(r["teacher"] == r["label"] for r in rows) / len(rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def markdown(summary: dict, out: Path, artifacts: Path) -> str:
    acc, ece = summary["student_accuracy"], summary["ece_testset"]
    cv = ", ".join(f"{k} {v:.3f}" for k, v in summary["cv_log_loss"].items())
    how = f"{summary['method']}, chosen by 10-fold log loss ({cv})" if cv else f"{summary['method']}, as asked"
    rows = [("calibration fit on", f"{summary['fit_on']} ({summary['n_fit']} queries): {how}"),
            ("student accuracy: fit data / devset (agreement) / test",
             " / ".join(f"{acc[k]:.1%}" for k in ("fit", "devset (agreement)", "testset"))),
            ("ECE on test: raw / calibrated / chance level", f"{ece['raw']:.3f} / {ece['calibrated']:.3f} / "
                                                             f"{ece['chance']:.3f}"),
            ("threshold, how chosen (devset)", f"{summary['threshold']:.3f}: {summary['threshold_rule']}"),
            ("test: share to the teacher / cascade / teacher alone",
             f"{summary['testset_fallback_share']:.1%} / {summary['testset_cascade_accuracy']:.1%} / "
             f"{summary['testset_teacher_accuracy']:.1%}")]
    return "\n".join([f"<!-- generated: python benchmarks/calibrate_student.py --summarize-only --artifacts "
                      f"{artifacts} --out {out} -->",
                      "| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), "<!-- end generated -->"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--port", type=int, default=8031)
    ap.add_argument("--method", choices=["auto", "temperature", "platt", "isotonic"], default="temperature")
    ap.add_argument("--fit-on", choices=["devset", "gold"], default="devset",
                    help="gold: only for a student that never trained on the gold labels (sft_source: teacher)")
    ap.add_argument("--max-fallback", type=float, default=1.0)
    ap.add_argument("--budget-confidence", type=float, default=None)
    ap.add_argument("--summarize-only", action="store_true",
                    help="nothing scored: summary.json and its Markdown from --out's files (and --artifacts')")
    ap.add_argument("--reuse-cascade-predictions", action="store_true",
                    help="devset and test confidences from the run's cascade stage (predictions/*.jsonl): "
                         "only what the fit needs beyond them is scored")
    a = ap.parse_args()
    if a.summarize_only:
        print(markdown(summarize(a.out, a.artifacts), a.out, a.artifacts))
        return
    params = DeployParams.load(a.artifacts / "deploy_params.json")
    path = a.out / "llm_only.yaml"
    api_base = llm_only_serve_config(a.artifacts, a.port, path)
    dev = [make_example(r["text"], r["label"]) for r in read_jsonl(a.artifacts / "curation" / "devset.jsonl")]
    test = [make_example(r["text"], r["label"]) for r in read_jsonl(a.artifacts / "data" / "test.jsonl")]
    gold = [make_example(r["text"], r["label"]) for r in read_jsonl(a.artifacts / "data" / "gold.jsonl")]
    scored: dict[str, tuple[list[float], list[bool]]] = {}
    if a.reuse_cascade_predictions:  # the cascade stage's own answers (no confidence: 0, as the stage counts it)
        for name in ("devset", "testset"):
            rows = read_jsonl(a.artifacts / "cascade" / "predictions" / f"{name}.jsonl")
            scored[name] = ([r["confidence"] or 0.0 for r in rows], [r["student"] == r["label"] for r in rows])
    todo = {"devset": dev, "testset": test, **({"gold": gold} if a.fit_on == "gold" else {})}
    with serving(path, api_base, models=[params.model]):
        lm = make_lm(LMConfig(model=params.model, api_base=api_base, max_tokens=64), cache=False, logprobs=True)
        program = params.load_program()
        for name, examples in todo.items():
            if name not in scored:
                scored[name] = score_confidence(program, lm, params.program.prompt, examples)
    path.unlink()
    report, _ = calibrate_student(scored["devset"], scored["testset"], a.out, a.method,
                                  title=f"{params.kind} {params.variant} student, test set "
                                        f"({len(scored['testset'][0])} queries; fit on {a.fit_on})",
                                  max_fallback=a.max_fallback, fit=scored.get(a.fit_on), fit_on=a.fit_on,
                                  budget_confidence=a.budget_confidence)
    (a.out / "scores.json").write_text(json.dumps(scored))
    print(report.model_dump_json(indent=2))
    if a.reuse_cascade_predictions:
        print(markdown(summarize(a.out, a.artifacts), a.out, a.artifacts))


if __name__ == "__main__":
    main()
