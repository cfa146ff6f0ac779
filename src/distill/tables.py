"""What each notebook section ends with: its result as a small table, read from the stage's manifest (rich
tables display as HTML in Jupyter and as text elsewhere), and what the teacher does with a few queries."""

from __future__ import annotations

from typing import Any, Sequence

import dspy
from rich import box
from rich.table import Table

from distill.config import Config
from distill.data.dataset import TaskData
from distill.evaluation.plots import VARIANT_NAMES
from distill.stages.baselines import BaselinesManifest, BaselinesStage
from distill.stages.cascade import CascadeResult, SplitScores
from distill.stages.curation import CurationManifest
from distill.stages.evaluation import BASELINE_NAMES, EvalManifest
from distill.stages.finetune import FinetuneManifest
from distill.stages.teacher import TeacherManifest
from distill.teacher.program import HybridTeacher, RetrievalTeacher, embed


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None,
          header: bool = True) -> Table:
    """A small rich table; the last expression of a notebook cell displays it."""
    # no outer frame: a notebook's output lines are for results, not borders
    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left", show_header=header,
              box=box.MINIMAL_HEAVY_HEAD, show_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(str(v) for v in r))
    return t


def data_table(data: TaskData, examples: int = 3) -> Table:
    """The splits every later section starts from, and a few gold examples."""
    rows: list[list[Any]] = [
        ["gold: hand-labeled, the only labels the models learn from", len(data.gold)],
        *([["calibration split: hand-labeled, only the cascade's calibration and threshold",
            len(data.calibration)]] if data.calibration else []),
        ["unlabeled pool", len(data.unlabeled)], ["  of which the teacher labels", len(data.to_label)],
        ["test queries scored (of the test set's)", f"{len(data.test)} of {data.full_test_size}"],
    ]
    if data.extra_summary is not None:  # data.extra_pool: random selection labels them all, active may pick them
        rows.insert(len(rows) - 1, [f"  served queries added ({data.extra_summary['path']})", len(data.extra)])
    rows += [[f"  e.g. {ex.text!r}", ex.label] for ex in data.gold[:examples]]
    return table(f"The {len(data.labels)} labels in use ({data.source})", ["", ""], rows, header=False)


def baselines_table(baselines: BaselinesManifest) -> Table:
    return table(f"Baselines on the {baselines.test_size} test queries ({baselines.n_gold} gold examples)",
                 ["classifier", "test accuracy"],
                 [[BASELINE_NAMES.get(k, k), _pct(v)] for k, v in baselines.accuracy.items()])


def teacher_table(cfg: Config, data: TaskData, teacher: TeacherManifest) -> Table:
    """The teacher next to the baselines (when their stage has run) on the same test queries."""
    rows: list[list[Any]] = []
    if (b := BaselinesStage(cfg, data).load()) is not None:
        rows += [[BASELINE_NAMES.get(k, k), _pct(v), ""] for k, v in b.accuracy.items()]
    if teacher.vote is not None:
        rows.append([f"the teacher's vote alone (C={teacher.vote.c:g})", _pct(teacher.vote.accuracy_test), ""])
    who = f"{teacher.strategy} ({teacher.model})"
    if teacher.llm_share_test is not None:
        who += f", the LLM answered {teacher.llm_share_test:.0%}"
    rows.append([f"teacher: {who}", _pct(teacher.accuracy_test), _pct(teacher.accuracy_gold)])
    return table(f"Teacher and baselines ({teacher.test_size} test queries)",
                 ["classifier", "test accuracy", "gold, leave-one-out"], rows,
                 caption=f"{teacher.labeled} of {teacher.to_label} queries labeled; quality gate "
                         f"{cfg.teacher.min_accuracy_gold:.0%} on gold")


def curation_table(m: CurationManifest) -> Table:
    return table("Curation: the teacher's labels to training data", ["", "queries"], [
        ["labeled by the teacher", m.input], ["- label not one of the labels", m.invalid_label],
        ["- teacher less sure than curation.min_confidence", m.low_confidence], ["- duplicate query", m.duplicate], ["- also in the test set", m.test_overlap], ["kept", m.kept],
        ["synthetic devset (scoring)", m.devset], ["optimizer valset (BFRS picks)", m.optimizer_val],
        ["optimizer trainset (BFRS demos, SFT data)", m.optimizer_train], ["SFT examples", m.sft_examples],
    ], header=False)


def finetune_table(m: FinetuneManifest) -> Table:
    loss = f"{m.first_loss:.3f} -> {m.last_loss:.3f}" if m.first_loss is not None and m.last_loss is not None else ""
    return table(f"Finetune: {m.model}", ["", ""], [
        ["SFT examples x epochs", f"{m.examples} x {m.epochs:.3g}"], ["optimizer steps", m.steps],
        ["training loss, first -> last", loss],
        *([["validation loss per evaluation (epoch: loss)",
            ", ".join(f"{p.epoch:g}: {p.eval_loss:.3f}" for p in m.validation.curve)],
           ["kept", m.validation.reason]] if m.validation else []),
        ["training time", f"{m.train_seconds:.0f} s" if m.train_seconds is not None else ""],
        ["recipe", m.recipe], ["adapter", m.published or m.adapter],
    ], header=False)


def evaluation_table(m: EvalManifest) -> Table:
    """The four variants on every split; the deployed one (chosen on the devset, ties: valset) is marked."""
    rows = []
    for kind in m.testset:
        for variant in m.testset[kind]:
            chosen = "<- deployed" if (kind, variant) == (m.best.kind, m.best.variant) else ""
            rows.append([f"{kind} student, {VARIANT_NAMES.get(variant, variant)}",
                         _pct(m.devset.get(kind, {}).get(variant)), _pct(m.optimizer_val.get(kind, {}).get(variant)),
                         _pct(m.testset[kind][variant]), chosen])
    return table("The four variants (the deployed one is chosen on the devset, never on the test set)",
                 ["", f"devset ({m.sizes.get('devset', '?')})", f"valset, ties ({m.sizes.get('optimizer_val', '?')})",
                  f"test set ({m.sizes.get('testset', '?')})", ""], rows,
                 caption=f"BFRS: up to {m.bfrs.get('max_bootstrapped_demos')} bootstrapped + "
                         f"{m.bfrs.get('max_labeled_demos')} labeled demos, {m.bfrs.get('num_candidate_programs')} "
                         f"random candidates; demos from {m.sizes.get('optimizer_train', '?')} queries, picked on "
                         f"{m.sizes.get('optimizer_val', '?')}")


def cascade_table(r: CascadeResult) -> Table:
    """The cascade at the threshold chosen on dev data, next to the student and the teacher alone."""
    d, t = r.devset, r.testset

    def ece(s: SplitScores) -> str:
        floor = "" if s.ece_noise_floor is None else f" (chance: {s.ece_noise_floor:.3f})"
        return f"{s.ece_raw:.3f} -> {s.ece_calibrated:.3f}{floor}"

    rows = [[f"devset ({d.n}, teacher labels: agreement)", _pct(d.student_accuracy), _pct(d.teacher_accuracy),
             _pct(d.cascade_accuracy), _pct(d.fallback_share), ece(d)],
            *([[f"gold ({f.n}, fits the calibration)", _pct(f.student_accuracy), "", "", "",
                f"{f.ece_raw:.3f} -> {f.ece_calibrated:.3f} (in-sample)"]]
              if (f := r.fit) is not None and f.split == "gold" else []),
            *([[f"calibration split ({c.n} hand labels: fit and threshold)", _pct(c.student_accuracy),
                _pct(c.teacher_accuracy), _pct(c.cascade_accuracy), _pct(c.fallback_share),
                f"{c.ece_raw:.3f} -> {c.ece_calibrated:.3f} (in-sample)"]]
              if (c := r.calibration_split) is not None else []),
            [f"test set ({t.n}, scored only)", _pct(t.student_accuracy), _pct(t.teacher_accuracy),
             _pct(t.cascade_accuracy), _pct(t.fallback_share), ece(t)]]
    cost = (f"; per query, estimated from per-call p50s: {r.cost.seconds_p50:.3f} s and "
            f"{r.cost.tokens_per_query:.0f} tokens (student alone {r.cost.student.p50_s:.3f} s)" if r.cost else "")
    return table(f"Cascade: {r.kind} {r.variant} student ({r.model}), the teacher below {r.threshold:.3f} "
                 f"({r.calibration.method} calibration, fit on {r.fit.split if r.fit else 'devset'})",
                 ["", "student", "teacher", "cascade", "to the teacher", "ECE raw -> calibrated"], rows,
                 caption=f"threshold: {r.threshold_rule}{cost}. ECE's chance level: the ECE a perfectly calibrated "
                         f"predictor exceeds 5% of the time at that size")


def per_label_table(r: CascadeResult, n: int = 8) -> Table:
    """The test set's worst labels for the cascade (`distill.evaluation.cascade_report.per_label_report`)."""
    return table(f"Per label on the test set, the {min(n, len(r.per_label))} worst for the cascade (of "
                 f"{len(r.per_label)})", ["label", "n", "student", "teacher", "cascade", "agreement", "to the teacher"],
                 [[x.label, x.count, _pct(x.student_accuracy), _pct(x.teacher_accuracy), _pct(x.cascade_accuracy),
                   _pct(x.agreement), _pct(x.fallback_rate)] for x in r.per_label[:n]])


def teacher_walkthrough(teacher: dspy.Module, examples: Sequence[dspy.Example], embedder: str, n: int = 1) -> str:
    """What the teacher does with a few queries, short of calling the LLM: the vote's shortlist and confidence,
    who answers, and the gold demonstrations the LLM is shown (nearest last). For a vote + LLM teacher, the
    first `n` queries the vote answers and the first `n` it leaves to the LLM."""
    lines: list[str] = []
    if isinstance(teacher, HybridTeacher):
        lines.append(f"HybridTeacher: the vote answers above confidence {teacher.vote_confidence:g}; below, the LLM "
                     f"picks one of the vote's top {teacher.candidate_m}, shown the {teacher.k} nearest gold examples")
        taken = {True: 0, False: 0}
        for ex in examples:
            if min(taken.values()) >= n:
                break
            vector = embed(embedder, [ex.text])[0]
            shortlist, confidence = teacher.shortlist(ex.text, vector)
            vote = confidence > teacher.vote_confidence
            if taken[vote] >= n:
                continue
            taken[vote] += 1
            lines += [f"{ex.text!r} (true label: {ex.label})",
                      f"  vote: {', '.join(shortlist)} (confidence {confidence:.2f}) -> "
                      + (f"answers {shortlist[0]}" if vote else "the LLM answers, one of these")]
            if not vote:
                demos = reversed(teacher.index.nearest(ex.text, teacher.k, vector=vector))
                lines += [f"  demonstration: {d.text!r} -> {d.label}" for d in demos]
    elif isinstance(teacher, RetrievalTeacher):
        lines.append(f"RetrievalTeacher: the LLM is shown the {teacher.k} nearest gold examples"
                     + (f" and may answer only their {teacher.candidate_k} nearest's labels" if teacher.restrict else ""))
        for ex in examples[:n]:
            near = teacher.neighbours(ex.text)
            allowed = list(dict.fromkeys(d.label for d in near[: teacher.candidate_k])) if teacher.restrict else []
            lines.append(f"{ex.text!r} (true label: {ex.label})")
            if allowed:
                lines.append(f"  allowed: {', '.join(allowed)}")
            lines += [f"  demonstration: {d.text!r} -> {d.label}" for d in reversed(near[: teacher.k])]
    else:
        lines.append(f"{type(teacher).__name__}: the LLM alone, without demonstrations")
    return "\n".join(lines)
