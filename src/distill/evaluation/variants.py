"""Evaluation and prompt optimization of the student: base/finetuned x zero-shot/BFRS-optimized.

`evaluate_and_prompt_optimize` scores the four variants on the synthetic devset (the teacher's labels)
and optimizes each model's prompt with `BootstrapFewShotWithRandomSearch` (trained on the optimizer
trainset, selected on the optimizer valset); every program is saved as JSON with `Module.save` and an
optimized program whose inputs did not change is loaded instead of recompiled.
`run_testset_evaluation` picks the variant to deploy on the devset (ties broken on the optimizer
valset), then scores every variant on the real test set: the test scores are reported, never consulted
(the original notebook picked on the test set). LM calls go through DSPy's cache (inside the artifact
directory), so a re-run costs little.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import dspy
from dspy.utils.callback import BaseCallback
from rich.console import Console
from tqdm import tqdm

from distill import logs
from distill.calls import CallGuard
from distill.data.dataset import write_jsonl
from distill.errors import DistillError
from distill.evaluation.latency import latency_summary
from distill.lm import Prompt, using
from distill.program import IntentClassificationModule, ValidLabel, exact_match, load_program

console = Console()

@dataclass
class EvalResult:
    score: float  # accuracy, 0-1
    valid_rate: float  # share of answers that are one of the labels (a failed call is invalid)
    n: int
    seconds: float
    predictions: list[dict[str, Any]] = field(repr=False, default_factory=list)


@dataclass
class Variant:
    kind: str  # "base" | "finetuned"
    variant: str  # "vanilla" | "bfrs"
    model: str  # the served model id
    program_path: Path
    prompt: Prompt = "full"  # the adapter the program runs with (the finetuned student: compact)


def evaluate(
    program: dspy.Module,
    lm: dspy.LM,
    examples: Sequence[dspy.Example],
    labels: Sequence[str],
    threads: int,
    max_errors: int,
    predictions_path: Path | None = None,
    name: str = "",
    prompt: Prompt = "full",
    labeled: bool = True,
) -> EvalResult:
    """`dspy.Evaluate` with exact match; per-example predictions are kept (and written as JSONL).
    `labeled` False: examples whose label is a placeholder (only the answers are wanted); no score is printed."""
    valid = ValidLabel(labels)
    guard = CallGuard(lm.kwargs.get("api_base"))  # a dead endpoint or a bug in our code: raised as what it is
    t0 = time.perf_counter()
    try:
        with using(lm, prompt):
            result = dspy.Evaluate(
                devset=list(examples), metric=exact_match, num_threads=threads, display_progress=True,
                max_errors=max_errors,
            )(guard.wrap(program))
    except Exception as e:  # noqa: BLE001 - dspy raises a bare Exception once max_errors is exceeded
        guard.raise_cause()
        raise DistillError(f"evaluating {name or lm.model} failed ({type(e).__name__}: {e}); more than "
                           f"{max_errors} calls errored -- is the endpoint {lm.kwargs.get('api_base')} healthy?") from e
    guard.raise_cause()
    seconds = time.perf_counter() - t0
    predictions = [
        {"text": ex.text, "label": ex.label, "predicted": getattr(pred, "label", None) if pred is not None else None,
         "correct": bool(score),
         # the answer's probability among the labels, when the LM asked for logprobs (`make_lm(..., logprobs=True)`)
         **({"confidence": c} if (c := getattr(pred, "confidence", None)) is not None else {})}
        for ex, pred, score in result.results
    ]
    n_valid = sum(1 for ex, pred, _ in result.results if pred is not None and valid(ex, pred))
    if predictions_path is not None:
        write_jsonl(predictions_path, predictions)
    out = EvalResult(result.score / 100.0, n_valid / max(1, len(examples)), len(examples), seconds, predictions)
    score = f"[bold]{out.score:.1%}[/] on {out.n}" if labeled else f"{out.n} answered, unlabeled"
    console.print(f"{name}: {score} (valid {out.valid_rate:.0%}, {seconds:.0f} s)")
    return out


# BFRS scores three programs before its random candidates; by the seed it gives each.
BFRS_BASELINES = {-3: "zero-shot", -2: "labeled demos", -1: "bootstrapped demos"}


def bfrs_optimizer(bfrs: Mapping[str, Any], threads: int, max_errors: int) -> Any:
    """The `BootstrapFewShotWithRandomSearch` each student's program is compiled with: exact match as the
    metric and the profile's `evaluation.bfrs` (max bootstrapped / labeled demos, random candidates).

    The evaluation stage compiles with this optimizer and the notebook prints it (`optimizer_call`), so
    what the notebook shows is what runs.
    """
    from dspy.teleprompt import BootstrapFewShotWithRandomSearch

    with logs.chatter_to_log("bfrs"):  # the constructor prints its sampling plan
        return BootstrapFewShotWithRandomSearch(metric=exact_match, num_threads=threads, max_errors=max_errors,
                                                **bfrs)


def optimizer_call(optimizer: Any) -> str:
    """The optimizer written as the call that makes it, read back from the object's own settings."""
    settings = {
        "metric": getattr(optimizer.metric, "__name__", repr(optimizer.metric)),
        "max_bootstrapped_demos": optimizer.max_num_samples, "max_labeled_demos": optimizer.max_labeled_demos,
        "num_candidate_programs": optimizer.num_candidate_sets, "num_threads": optimizer.num_threads,
        "max_errors": optimizer.max_errors,
    }
    return "BootstrapFewShotWithRandomSearch(" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"


class CandidateProgress(BaseCallback):
    """One progress line for a BFRS run: a step per candidate program scored on the valset, and the best score.

    BFRS scores each candidate with `dspy.Evaluate` and nothing else in its compile does, so DSPy's
    `on_evaluate_end` hook fires once per candidate.
    """

    def __init__(self, total: int, desc: str, file: Any) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="candidate", file=file)
        self.scores: list[float] = []

    def on_evaluate_end(self, call_id: str, outputs: Any | None, exception: BaseException | None = None) -> None:
        if outputs is not None:
            self.scores.append(float(outputs.score))
            self.bar.set_postfix_str(f"best {max(self.scores):.1f}%", refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def candidate_summary(optimized: dspy.Module) -> str:
    """BFRS's candidates by score, e.g. 'zero-shot 28.0, random #1 26.0, ...' (best first)."""
    ranked = getattr(optimized, "candidate_programs", [])
    names = [BFRS_BASELINES.get(c["seed"], f"random #{c['seed']}") for c in ranked]
    return ", ".join(f"{n} {c['score']:.1f}" for n, c in zip(names, ranked))


def optimize(
    program: dspy.Module,
    lm: dspy.LM,
    trainset: Sequence[dspy.Example],
    valset: Sequence[dspy.Example],
    bfrs: Mapping[str, Any],
    threads: int,
    max_errors: int,
    prompt: Prompt = "full",
    name: str = "",
) -> dspy.Module:
    """BootstrapFewShotWithRandomSearch: demos bootstrapped from the trainset, candidates picked on the valset.

    BFRS prints its running scores after every candidate; unless verbose they go to `<logs>/bfrs.log` and
    one progress line per run stands for them, followed by the candidates' scores.
    """
    optimizer = bfrs_optimizer(bfrs, threads, max_errors)
    with logs.chatter_to_log("bfrs") as real_stdout:
        progress = None
        callbacks: list[BaseCallback] = []
        if real_stdout is not None:
            progress = CandidateProgress(optimizer.num_candidate_sets + len(BFRS_BASELINES),
                                         f"BFRS {name}".strip(), real_stdout)
            callbacks.append(progress)
        try:
            with using(lm, prompt), dspy.context(callbacks=[*dspy.settings.get("callbacks", []), *callbacks]):
                optimized = optimizer.compile(program, trainset=list(trainset), valset=list(valset))
        finally:
            if progress is not None:
                progress.close()
    # print, not the rich console: one unwrapped line in the notebook and in the log
    print(f"BFRS {name}: candidates on {len(valset)} valset queries: {candidate_summary(optimized)}")
    return optimized


def _meta(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate_and_prompt_optimize(
    models: Mapping[str, dspy.LM],
    labels: Sequence[str],
    devset: Sequence[dspy.Example],
    trainset: Sequence[dspy.Example],
    valset: Sequence[dspy.Example],
    out_dir: Path,
    bfrs: Mapping[str, Any],
    threads: int = 2,
    max_errors: int = 5,
    fingerprints: Mapping[str, str] | None = None,
    reasoning: bool = False,
    max_reasoning_chars: int = 400,
    prompts: Mapping[str, Prompt] | None = None,
) -> tuple[dict[str, dict[str, float]], list[Variant]]:
    """Devset scores {kind: {"vanilla": x, "bfrs": y}} of each model, and the saved programs.

    `fingerprints[kind]` identifies everything an optimized program depends on; a saved program with the
    same fingerprint is loaded instead of recompiled. `prompts[kind]` is the adapter each model's programs
    run with (default: the full prompt).
    """
    programs_dir = out_dir / "programs"
    programs_dir.mkdir(parents=True, exist_ok=True)
    meta_path = programs_dir / "meta.json"
    meta = _meta(meta_path)
    scores: dict[str, dict[str, float]] = {}
    variants: list[Variant] = []
    for kind, lm in models.items():
        model = lm.model.split("/", 1)[-1]
        prompt = (prompts or {}).get(kind, "full")
        vanilla = IntentClassificationModule(labels, reasoning, max_reasoning_chars)
        vanilla_path = programs_dir / f"{kind}_vanilla.json"
        vanilla.save(str(vanilla_path))
        bfrs_path = programs_dir / f"{kind}_bfrs.json"
        fp = (fingerprints or {}).get(kind)
        if fp is not None and meta.get(kind) == fp and bfrs_path.is_file():
            console.print(f"{kind}: optimized program is current ({bfrs_path}); loaded, not recompiled")
            optimized = load_program(bfrs_path, labels, reasoning, max_reasoning_chars)
        else:
            console.rule(f"BootstrapFewShotWithRandomSearch: {kind} student ({model})")
            optimized = optimize(IntentClassificationModule(labels, reasoning, max_reasoning_chars), lm, trainset,
                                 valset, bfrs, threads, max_errors, prompt, name=f"{kind} student")
            optimized.save(str(bfrs_path))
            meta[kind] = fp
            meta_path.write_text(json.dumps(meta, indent=2))
        scores[kind] = {}
        for variant, program, path in (("vanilla", vanilla, vanilla_path), ("bfrs", optimized, bfrs_path)):
            result = evaluate(program, lm, devset, labels, threads, max_errors,
                              out_dir / "predictions" / "devset" / f"{kind}_{variant}.jsonl", f"devset {kind} {variant}",
                              prompt)
            scores[kind][variant] = round(result.score, 4)
            variants.append(Variant(kind, variant, model, path, prompt))
    return scores, variants


# Variants that score the same on the devset and the tie-break split: the one with fewer demonstrations (a
# shorter prompt, a cheaper call) is preferred, then the order the variants were listed in.
SIMPLER_FIRST = {"vanilla": 0, "bfrs": 1}


def choose_best(dev_scores: Mapping[str, Mapping[str, float]],
                tiebreak_scores: Mapping[str, Mapping[str, float]] | None = None) -> tuple[str, str]:
    """(kind, variant) with the highest devset score; ties go to the higher tie-break score (the optimizer
    valset), then to the simpler variant (zero-shot before BFRS), then to the first listed.

    The test set is not a parameter: the deployed variant is chosen before, and without, any test score
    (docs/evaluation.md says why the devset decides and the valset only breaks ties).
    """
    candidates = [(kind, variant) for kind in dev_scores for variant in dev_scores[kind]]
    if not candidates:
        raise DistillError("no evaluated variants to choose from")
    tie = tiebreak_scores or {}
    order = {kv: i for i, kv in enumerate(candidates)}
    return max(candidates, key=lambda kv: (dev_scores[kv[0]][kv[1]], tie.get(kv[0], {}).get(kv[1], 0.0),
                                           -SIMPLER_FIRST.get(kv[1], len(SIMPLER_FIRST)), -order[kv]))


def score_variants(
    models: Mapping[str, dspy.LM],
    variants: Sequence[Variant],
    labels: Sequence[str],
    examples: Sequence[dspy.Example],
    out_dir: Path,
    split: str,
    threads: int = 2,
    max_errors: int = 5,
    reasoning: bool = False,
    max_reasoning_chars: int = 400,
) -> dict[str, dict[str, float]]:
    """Every saved variant scored on `examples` ({kind: {variant: accuracy}}); predictions in
    `<out_dir>/predictions/<split>/<kind>_<variant>.jsonl`."""
    scores: dict[str, dict[str, float]] = {}
    for v in variants:
        program = load_program(v.program_path, labels, reasoning, max_reasoning_chars)
        result = evaluate(program, models[v.kind], examples, labels, threads, max_errors,
                          out_dir / "predictions" / split / f"{v.kind}_{v.variant}.jsonl",
                          f"{split} {v.kind} {v.variant}", v.prompt)
        scores.setdefault(v.kind, {})[v.variant] = round(result.score, 4)
    return scores


def run_testset_evaluation(
    models: Mapping[str, dspy.LM],
    variants: Sequence[Variant],
    labels: Sequence[str],
    testset: Sequence[dspy.Example],
    out_dir: Path,
    threads: int = 2,
    max_errors: int = 5,
    dev_scores: Mapping[str, Mapping[str, float]] | None = None,
    tiebreak_scores: Mapping[str, Mapping[str, float]] | None = None,
    reasoning: bool = False,
    max_reasoning_chars: int = 400,
) -> tuple[Variant, dict[str, dict[str, float]]]:
    """The variant to deploy, chosen on `dev_scores` (ties: `tiebreak_scores`) before the test set is
    touched, and every variant's test score `{kind: {variant: accuracy}}` (reported, never consulted)."""
    if dev_scores is None:
        raise DistillError("run_testset_evaluation needs the devset scores: the deployed variant is chosen on them")
    kind, variant = choose_best(dev_scores, tiebreak_scores)
    chosen = next(v for v in variants if (v.kind, v.variant) == (kind, variant))
    scores = score_variants(models, variants, labels, testset, out_dir, "testset", threads, max_errors,
                            reasoning, max_reasoning_chars)
    return chosen, scores


def measure_calls(program: dspy.Module, lm: dspy.LM, examples: Sequence[dspy.Example],
                  prompt: Prompt = "full") -> dict[str, Any]:
    """Latency per call (sequential, one at a time) and tokens per query of `program` on `lm`.

    Pass an LM built with `cache=False`: a cached answer measures nothing.
    """
    if lm.cache:
        raise DistillError("measure_calls needs an LM without cache (make_lm(..., cache=False))")
    times = []
    with using(lm, prompt), dspy.track_usage() as usage:
        for ex in examples:
            t0 = time.perf_counter()
            program(**ex.inputs())
            times.append(time.perf_counter() - t0)
    totals = usage.get_total_tokens().get(lm.model, {})
    n = len(examples)
    return {
        **latency_summary(times),
        "prompt_tokens_per_query": round(totals.get("prompt_tokens", 0) / n, 1),
        "completion_tokens_per_query": round(totals.get("completion_tokens", 0) / n, 1),
    }
