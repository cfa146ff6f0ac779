"""A run's calibrated student on the task's whole test set (issue 31): the quick `local` profile scores 200
test queries, where a calibrated predictor's ECE exceeds about 0.08 one time in twenty, so its test ECE
cannot say whether the calibration meets 0.05. This scores the run's deployed student (its saved program,
its served adapter) on every test query, applies the run's own calibration and threshold
(cascade/cascade.json, chosen on the calibration split) unchanged, and reports ECE before and after with
its chance level, and the share the threshold sends to the teacher. Nothing is fit or chosen here.

    BANKING77_DIR=... flock /tmp/distill-heavy.lock .venv/bin/python benchmarks/calibration_full_test.py \
        --profile local --artifacts artifacts/local --out docs/calibration/full_test_local.json \
        --teacher-answers artifacts/local_full/teacher/test_predictions.jsonl

The run's own test queries are among them: their confidences must equal what its cascade stage recorded
(the same student, prompt and calibration), or the benchmark stops. With --teacher-answers (a teacher
stage's answers to every test query: `local_full`'s teacher is `local`'s, the same gold labels, routing and
models) it also scores the cascade at the run's threshold against the teacher alone; those answers must
equal the run's own teacher's on the run's test queries, or it stops.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from distill.config import LMConfig, load_config
from distill.data.dataset import prepare_data, read_jsonl
from distill.errors import DistillError
from distill.evaluation.calibration import ece_noise_floor, expected_calibration_error, score_confidence
from distill.lm import make_lm
from distill.program import CascadeParams, DeployParams
from distill.serving.control import serving
from distill_harness.llm_only import llm_only_serve_config


def measure(profile: str, artifacts: Path, port: int, teacher_answers: Path | None = None) -> dict:
    cfg = load_config(profile, overrides={"data": {"test_size": None}})
    test = prepare_data(cfg).test
    params = DeployParams.load(artifacts / "deploy_params.json")
    cascade = CascadeParams.load(artifacts / "cascade" / "cascade.json")
    recorded = {r["text"]: r["confidence"] for r in read_jsonl(artifacts / "cascade" / "predictions" / "testset.jsonl")}
    path = artifacts / "calibration_full_test" / "llm_only.yaml"
    api_base = llm_only_serve_config(artifacts, port, path)
    with serving(path, api_base, models=[params.model]):
        lm = make_lm(LMConfig(model=params.model, api_base=api_base, max_tokens=64), cache=False, logprobs=True)
        conf, correct = score_confidence(params.load_program(), lm, params.program.prompt, test)
    path.unlink()
    # the run's own test queries: the same answers, or this is not the run's student
    drift = [abs(c - recorded[ex.text]) for ex, c in zip(test, conf) if recorded.get(ex.text) is not None]
    if len(drift) != len(recorded) or max(drift, default=0.0) > 1e-3:
        raise DistillError(f"{artifacts}: {len(drift)} of the run's {len(recorded)} test queries found, largest "
                           f"confidence gap {max(drift, default=0):.4f}: not the run's student")
    calibrated = cascade.calibration.apply_many(conf)
    kept = np.array(calibrated) >= cascade.threshold
    cascade_scores = {} if teacher_answers is None else score_cascade(
        artifacts, teacher_answers, test, np.asarray(correct), kept)
    return {
        "profile": profile, "artifacts": str(artifacts), "n": len(test), "n_run_test": len(recorded),
        "calibration": cascade.calibration.method, "threshold": cascade.threshold, "chosen_on": cascade.chosen_on,
        "student_accuracy": round(float(np.mean(correct)), 4),
        "ece_raw": round(expected_calibration_error(conf, correct), 4),
        "ece_calibrated": round(expected_calibration_error(calibrated, correct), 4),
        "ece_chance": round(ece_noise_floor(calibrated), 4),
        "fallback_share": round(float(1 - kept.mean()), 4),
        "student_accuracy_kept": round(float(np.asarray(correct)[kept].mean()), 4) if kept.any() else None,
        "max_confidence_gap_run_test": round(max(drift, default=0.0), 6),
        **cascade_scores,
    }


def score_cascade(artifacts: Path, teacher_answers: Path, test: list, student_ok: np.ndarray,
                  kept: np.ndarray) -> dict:
    """The cascade (the student where kept, else the teacher) and the teacher alone on every test query."""
    answers = {r["text"]: r["predicted"] for r in read_jsonl(teacher_answers)}
    own = read_jsonl(artifacts / "teacher" / "test_predictions.jsonl")
    if missing := [ex.text for ex in test if ex.text not in answers]:
        raise DistillError(f"{teacher_answers}: no teacher answer for {len(missing)} test queries")
    if differ := [r["text"] for r in own if answers[r["text"]] != r["predicted"]]:
        raise DistillError(f"{teacher_answers}: {len(differ)} of the run's {len(own)} test queries answered "
                           "otherwise than by the run's own teacher: not the same teacher")
    teacher_ok = np.array([answers[ex.text] == ex.label for ex in test])
    return {"teacher_answers": str(teacher_answers), "teacher_agrees_on_run_test": len(own),
            "teacher_accuracy": round(float(teacher_ok.mean()), 4),
            "cascade_accuracy": round(float(np.where(kept, student_ok, teacher_ok).mean()), 4)}


def markdown(r: dict, out: Path) -> str:
    rows = [("test queries (the run scored)", f"{r['n']} ({r['n_run_test']})"),
            ("calibration, threshold (chosen on)", f"{r['calibration']}, {r['threshold']:.3f} ({r['chosen_on']})"),
            ("student accuracy", f"{r['student_accuracy']:.1%}"),
            ("ECE: raw / calibrated / chance level", f"{r['ece_raw']:.3f} / {r['ece_calibrated']:.3f} / "
                                                      f"{r['ece_chance']:.3f}"),
            ("share the threshold sends to the teacher", f"{r['fallback_share']:.1%}")]
    if "cascade_accuracy" in r:
        rows.append(("cascade / student alone / teacher alone", f"{r['cascade_accuracy']:.1%} / "
                     f"{r['student_accuracy']:.1%} / {r['teacher_accuracy']:.1%}"))
    return "\n".join([f"<!-- generated: python benchmarks/calibration_full_test.py --from-json {out} -->",
                      "| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), "<!-- end generated -->"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local")
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/calibration/full_test_local.json"))
    ap.add_argument("--port", type=int, default=8032)
    ap.add_argument("--teacher-answers", type=Path,
                    help="a teacher stage's test_predictions.jsonl over every test query (the same teacher)")
    ap.add_argument("--from-json", type=Path, help="print the Markdown of a JSON this wrote; nothing scored")
    a = ap.parse_args()
    if a.from_json:
        print(markdown(json.loads(a.from_json.read_text()), a.from_json))
        return
    artifacts = a.artifacts or load_config(a.profile).artifacts  # DISTILL_ARTIFACTS_DIR wins, as in a run
    result = measure(a.profile, artifacts.resolve(), a.port, a.teacher_answers)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(markdown(result, a.out))


if __name__ == "__main__":
    main()
