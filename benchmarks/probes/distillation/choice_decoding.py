"""Finite-choice decoding against llama.cpp's grammar sampler, through the served product path.

    DISTILL_ARTIFACTS_DIR=... .venv/bin/python benchmarks/probes/distillation/choice_decoding.py \
        --profile local_full --queries 200

For each setting of the llama.cpp application's `choice_decoding`, the finetune's serve config is
deployed on Ray Serve and the same test queries go through (a) the teacher with every query sent to its
LLM (vote_confidence 1.0, as the teacher stage times it) and (b) the deployed student program. Prints
and writes accuracy, agreement between the two decoders, p50 latency and tokens per query
(<artifacts>/bench/choice_decoding.json).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from distill.evaluation.latency import latency_summary, write_result
from distill.config import load_config
from distill.data.dataset import prepare_data
from distill.lm import make_lm, using
from distill.program import DeployParams
from distill.serving.control import serving
from distill.stages.finetune import FinetuneManifest
from distill.teacher.program import HybridTeacher, build_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="local_full")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    cfg = load_config(args.profile)
    data = prepare_data(cfg)
    test = data.test[: args.queries]
    ft = FinetuneManifest.model_validate_json((cfg.artifacts / "finetune" / "manifest.json").read_text())
    params = DeployParams.load(cfg.artifacts / "deploy_params.json")
    serve_cfg = yaml.safe_load(Path(ft.serve_config).read_text())
    base_model = serve_cfg["applications"][0]["args"]["models"][0]["name"]

    teacher = build_teacher(cfg, data.labels, data.gold)
    assert isinstance(teacher, HybridTeacher)
    always_llm = HybridTeacher(teacher.program, teacher.index, teacher.vote, teacher.k, teacher.candidate_m,
                               vote_confidence=1.0)
    student = params.load_program()
    runs = {"teacher_llm": (always_llm, base_model, "full"), "student": (student, params.model, params.program.prompt)}

    results: dict[str, dict[str, dict]] = {}
    for setting in (True, False):
        serve_cfg["applications"][0]["args"]["choice_decoding"] = setting
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump(serve_cfg, f)
            f.flush()
            with serving(f.name, cfg.models.student.api_base, models=[base_model, params.model]):
                for name, (program, model, prompt) in runs.items():
                    lm = make_lm(cfg.models.student, model=model, cache=False)
                    preds, times = [], []
                    with using(lm, prompt):
                        program(**test[0].inputs())  # warm the prefix cache
                        lm.history.clear()
                        for ex in test:
                            t0 = time.perf_counter()
                            preds.append(program(**ex.inputs()).label)
                            times.append(time.perf_counter() - t0)
                    usage = [h.get("usage") or {} for h in lm.history]
                    results.setdefault(name, {})["choices" if setting else "grammar"] = {
                        "accuracy": sum(p == ex.label for p, ex in zip(preds, test)) / len(test),
                        **latency_summary(times),
                        "completion_tokens_per_call": round(sum(u.get("completion_tokens", 0) for u in usage)
                                                            / max(len(usage), 1), 1),
                        "preds": preds,
                    }
    for name, r in results.items():
        r["agreement"] = sum(a == b for a, b in zip(r["choices"]["preds"], r["grammar"]["preds"])) / len(test)
        for k in ("choices", "grammar"):
            print(f"{name:12s} {k:8s} accuracy {r[k]['accuracy']:.1%}  p50 {r[k]['p50_s']:.3f} s  "
                  f"completion tokens {r[k]['completion_tokens_per_call']}")
        print(f"{name:12s} the two decoders agree on {r['agreement']:.1%} of {len(test)} queries")
    for k in ("choices", "grammar"):
        print(f"student / teacher LLM path p50, {k}: "
              f"{results['student'][k]['p50_s'] / results['teacher_llm'][k]['p50_s']:.2f}x")
    print(f"wrote {write_result(cfg, 'choice_decoding', {'queries': len(test), **results})}")


if __name__ == "__main__":
    main()
