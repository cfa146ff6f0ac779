"""Where should the student's confidence be calibrated? On the gold labels, or on labeled queries neither
the teacher nor the student ever used?

Gold is not held out from the student: a student that trains on gold (`sft_source: both`) has seen it, and
one that does not (`teacher`) has learned from the teacher's labels, which the local teacher gives by a vote
over the gold labels' nearest neighbours, so the queries near a gold query carry that query's label. This
probe scores a pipeline run's deployed student (with its confidence) on the gold labels, on `--fresh`
training queries the run never labeled nor used (their dataset labels read here, standing for hand labels
kept away from teacher and student), and on the whole test set; fits the calibration on gold and on the
fresh queries (`auto`, and temperature and platt as asked); prints each fit's ECE on test, and keeps the
scores, so a refit needs no LLM.

    flock /tmp/distill-heavy.lock .venv/bin/python benchmarks/probes/calibration_holdout.py \
        --artifacts artifacts/local --out docs/calibration/holdout_local.json

Brings up only the run's LLM application (its deploy_dspy.yaml) on --port.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from distill.config import LMConfig, load_config
from distill.data.dataset import make_example, prepare_data, read_jsonl, seeded_shuffle
from distill.evaluation.calibration import (ece_noise_floor, expected_calibration_error, fit_calibration,
                                            score_confidence)
from distill.lm import make_lm
from distill.program import DeployParams
from distill.serving.control import serving
from distill.tracking import git_commit
from distill_harness.llm_only import llm_only_serve_config


def markdown(doc: dict, source: Path) -> str:
    """The fits' ECE on the whole test set, one row each, with the accuracy of every split scored."""
    acc, n = doc["accuracy"], doc["n"]
    rows = [f"<!-- generated: python benchmarks/probes/calibration_holdout.py --from-json {source} -->",
            "| calibration fit on, method asked (chosen) | test ECE after | mean test confidence |", "|---|---|---|",
            f"| no calibration | {doc['ece_test_raw']:.3f} | - |"]
    rows += [f"| {name} ({f['method']}) | {f['ece_test']:.3f} | {f['mean_confidence_test']:.1%} |"
             for name, f in doc["fits"].items()]
    rows += ["", f"Student ({doc['variant']}, `{doc['artifacts']}`) accuracy: "
             + ", ".join(f"{k} {acc[k]:.1%} of {n[k]}" for k in acc)
             + f". A calibrated predictor's test ECE at this size (95th percentile): {doc['ece_test_chance']:.3f}."
             f" Measured at commit `{doc['commit'][:12]}{'+dirty' if doc['commit'].endswith('+dirty') else ''}`.", "<!-- end generated -->"]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--profile", default="local")
    ap.add_argument("--fresh", type=int, default=300, help="never-labeled training queries scored")
    ap.add_argument("--port", type=int, default=8031)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--from-json", type=Path, help="score nothing: the table from a JSON this probe wrote")
    a = ap.parse_args()
    if a.from_json:
        print(markdown(json.loads(a.from_json.read_text()), a.from_json))
        return

    cfg = load_config(a.profile)
    data = prepare_data(cfg)
    used = {r["text"] for name in ("gold", "unlabeled") for r in read_jsonl(a.artifacts / "data" / f"{name}.jsonl")}
    used |= {r["text"] for r in read_jsonl(a.artifacts / "curation" / "devset.jsonl")}
    fresh = [ex for ex in seeded_shuffle(data.train, cfg.seed + 1) if ex.text not in used][:a.fresh]
    gold = [make_example(r["text"], r["label"]) for r in read_jsonl(a.artifacts / "data" / "gold.jsonl")]
    test = list(data.full_test)

    params = DeployParams.load(a.artifacts / "deploy_params.json")
    path = a.out.with_suffix(".serve.yaml")
    api_base = llm_only_serve_config(a.artifacts, a.port, path)
    scored = {}
    with serving(path, api_base, models=[params.model]):
        lm = make_lm(LMConfig(model=params.model, api_base=api_base, max_tokens=64), cache=False, logprobs=True)
        program = params.load_program()
        for name, examples in (("gold", gold), ("fresh", fresh), ("test", test)):
            scored[name] = score_confidence(program, lm, params.program.prompt, examples)
    path.unlink()

    test_p, test_y = np.array(scored["test"][0]), np.array(scored["test"][1], dtype=float)
    result = {"what": "student calibration fit on gold vs on never-labeled queries; ECE on the whole test set "
                      "(benchmarks/probes/calibration_holdout.py)",
              "artifacts": str(a.artifacts), "model": params.model, "variant": f"{params.kind} {params.variant}",
              "commit": git_commit(),
              "accuracy": {k: float(np.mean(v[1])) for k, v in scored.items()},
              "n": {k: len(v[0]) for k, v in scored.items()},
              "ece_test_raw": expected_calibration_error(test_p, test_y),
              "ece_test_chance": ece_noise_floor(test_p), "fits": {}}
    fits = {"gold (100)": scored["gold"], "fresh (first 100)": (scored["fresh"][0][:100], scored["fresh"][1][:100]),
            f"fresh ({len(fresh)})": scored["fresh"]}
    for name, (p, y) in fits.items():
        for method in ("auto", "temperature", "platt"):  # what auto chose, and the parametric fits as asked
            cal = fit_calibration(p, y, method)
            test_c = np.array(cal.apply_many(list(test_p)))
            result["fits"][f"{name}, {method}"] = {
                "method": cal.method, "cv_log_loss": cal.cv_log_loss,
                "ece_test": expected_calibration_error(test_c, test_y), "mean_confidence_test": float(test_c.mean())}
    result["scores"] = scored  # (confidence, correct) per split: refits need no LLM
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result, a.out))


if __name__ == "__main__":
    main()
