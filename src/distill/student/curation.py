"""Curation of the teacher's labels and conversion into chat SFT data for the student.

Steps, each counted: keep valid labels -> drop labels the teacher was unsure of (optional) -> drop exact
and near-exact duplicate queries (normalised text) -> drop queries that also appear in the test set
(decontamination).

SFT examples are exactly the messages the student sees at inference -- built with the same adapter's
own `format(...)` (no demos) -- plus the teacher's answer as the assistant turn, formatted by the same
adapter. (DSPy's JSONAdapter.format_finetune_data is not implemented in 3.4.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import dspy
from rich.console import Console
from rich.table import Table

from distill.data.dataset import normalize_text, write_jsonl
from distill.errors import DataError
from distill.program import IntentClassificationModule

console = Console()


@dataclass
class CurationResult:
    kept: list[dict[str, Any]]
    counts: dict[str, int]
    label_counts: dict[str, int] = field(default_factory=dict)


def curate(records: Sequence[dict[str, Any]], labels: Sequence[str], test_texts: Sequence[str],
           min_confidence: float | None = None) -> CurationResult:
    """The kept records and how many each step dropped. `min_confidence` drops records whose `confidence`
    (the teacher's, see `HybridTeacher`) is below it; records without one are an error then."""
    valid = set(labels)
    counts = {"input": len(records)}
    step = [r for r in records if r.get("label") in valid]
    counts["invalid_label"] = len(records) - len(step)
    if min_confidence is not None:
        if unrated := sum(1 for r in step if r.get("confidence") is None):
            raise DataError(f"curation.min_confidence is set but {unrated} teacher labels carry no confidence "
                            "(only teacher.strategy vote_llm records one); unset it or change the strategy")
        sure = [r for r in step if r["confidence"] >= min_confidence]
        counts["low_confidence"], step = len(step) - len(sure), sure
    else:
        counts["low_confidence"] = 0
    seen: set[str] = set()
    deduped = []
    for r in step:
        key = normalize_text(r["text"])
        if key not in seen:
            seen.add(key)
            deduped.append(r)
    counts["duplicate"] = len(step) - len(deduped)
    test_keys = {normalize_text(t) for t in test_texts}
    kept = [r for r in deduped if normalize_text(r["text"]) not in test_keys]
    counts["test_overlap"] = len(deduped) - len(kept)
    counts["kept"] = len(kept)
    by_label = Counter(r["label"] for r in kept)
    return CurationResult(kept, counts, {lab: by_label.get(lab, 0) for lab in labels})


def print_curation(result: CurationResult) -> None:
    steps = Table(title="curation")
    steps.add_column("step")
    steps.add_column("records", justify="right")
    for k, v in result.counts.items():
        steps.add_row(k if k in ("input", "kept") else f"dropped: {k}", str(v))
    console.print(steps)
    dist = Table(title="label distribution of the kept set")
    dist.add_column("label")
    dist.add_column("count", justify="right")
    for lab, n in sorted(result.label_counts.items(), key=lambda kv: -kv[1]):
        dist.add_row(lab, str(n))
    console.print(dist)


def plot_label_distribution(label_counts: dict[str, int], path: Path, title: str = "teacher labels kept") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI, Ray workers
    import matplotlib.pyplot as plt

    items = sorted(label_counts.items(), key=lambda kv: -kv[1])
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#4c72b0")
    ax.set_xlabel("examples")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sft_messages(
    program: IntentClassificationModule, adapter: dspy.Adapter, text: str, outputs: dict[str, Any]
) -> list[dict[str, str]]:
    """The zero-shot inference prompt for `text` plus `outputs` as the assistant turn."""
    signature = program.predictor.signature
    messages = adapter.format(signature, demos=[], inputs={"text": text})
    messages.append({"role": "assistant", "content": adapter.format_assistant_message_content(signature, outputs)})
    return messages


def to_sft(
    records: Sequence[dict[str, Any]], program: IntentClassificationModule, adapter: dspy.Adapter
) -> list[dict[str, Any]]:
    fields = list(program.predictor.signature.output_fields)
    return [
        {"messages": sft_messages(program, adapter, r["text"], {f: r[f] for f in fields if f in r})}
        for r in records
    ]


def save_sft(examples: Sequence[dict[str, Any]], path: Path) -> Path:
    write_jsonl(path, examples)
    return path
