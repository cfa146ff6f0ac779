"""The curation stage: the teacher's labels curated, split (devset / optimizer val / optimizer train),
and the optimizer trainset written as SFT data -- exactly the messages the student sees at inference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import Config
from distill.data.dataset import (
    TaskData,
    make_example,
    read_jsonl,
    split_devset_and_optimizer_sets,
    write_jsonl,
)
from distill.errors import DistillError
from distill.lm import adapter
from distill.program import IntentClassificationModule
from distill.stages.base import (
    Manifest,
    Stage,
    Tracked,
    code_version,
    fingerprint,
    prompt_fingerprint,
    require,
)
from distill.stages.data import data_fingerprint
from distill.stages.teacher import TeacherStage
from distill.student.curation import curate, plot_label_distribution, print_curation, save_sft, to_sft
from distill.teacher.labeling import read_records

SPLITS = ("devset", "optimizer_train", "optimizer_val")


class CurationManifest(Manifest):
    input: int
    invalid_label: int
    low_confidence: int = 0  # below curation.min_confidence
    min_confidence: float | None = None  # the floor applied (auto: the teacher's routing chose it)
    duplicate: int
    test_overlap: int
    kept: int
    devset: int
    optimizer_train: int
    optimizer_val: int
    sft_examples: int
    sft_source: str = "teacher"  # curation.sft_source: teacher | gold | both
    label_counts: dict[str, int]
    plot: str


class CurationStage(Stage[CurationManifest]):
    name = "curation"
    title = "curation and SFT data"
    manifest_type = CurationManifest
    upstream = ("teacher",)

    @classmethod
    def build(cls, graph: Any) -> "CurationStage":
        stage = cls(graph.cfg, graph.data)
        stage.teacher = graph.stage("teacher")
        return stage

    def tracked(self, m: CurationManifest) -> Tracked:
        return Tracked(files=[Path(m.plot)], dicts={"label_counts.json": m.label_counts})

    def __init__(self, cfg: Config, data: TaskData) -> None:
        super().__init__(cfg)
        self.data = data
        self.teacher = TeacherStage(cfg, data)

    @property
    def sft_path(self) -> Path:
        return self.dir / "sft.jsonl"

    def split_path(self, name: str) -> Path:
        return self.dir / f"{name}.jsonl"

    def splits(self) -> dict[str, list]:
        """The curated devset / optimizer trainset / optimizer valset as dspy.Examples."""
        return {n: [make_example(r["text"], r["label"]) for r in read_jsonl(self.split_path(n))] for n in SPLITS}

    def inputs(self) -> dict[str, str]:
        return {"teacher": require(self.teacher.load(), "teacher").fingerprint}

    def fingerprint(self) -> str:
        d = self.cfg.data
        return fingerprint(self.inputs(), data_fingerprint(self.data), prompt_fingerprint(self.cfg, self.data.labels),
                           d.devset_size, d.optimizer_val_size, d.optimizer_train_size, self.cfg.program.model_dump(),
                           self.cfg.curation.model_dump(), code_version("distill.student.curation", "distill.program"))

    def outputs(self, m: CurationManifest) -> list[Path]:
        return [self.sft_path, Path(m.plot), *(self.split_path(n) for n in SPLITS)]

    def describe(self, m: CurationManifest) -> str:
        return f"{m.input} labels -> {m.kept} kept, {m.sft_examples} SFT examples in {self.sft_path}"

    def min_confidence(self) -> float | None:
        """curation.min_confidence, or with `auto` the floor the teacher stage chose on gold (its routing)."""
        floor = self.cfg.curation.min_confidence
        if floor != "auto":
            return floor
        routing = require(self.teacher.load(), "teacher").routing
        if routing is None or routing.min_confidence is None:
            raise DistillError("curation.min_confidence is auto but the teacher's manifest has no routing floor: "
                               "run the teacher stage again (teacher.strategy vote_llm)")
        print(f"curation floor (auto): {routing.min_confidence:g}, the LLM's gold leave-one-out accuracy in its band "
              f"being {routing.llm_band_accuracy if routing.llm_band_accuracy is not None else 'n/a'} "
              f"on {routing.llm_band_n}")
        return routing.min_confidence

    def run(self) -> CurationManifest:
        cfg, data = self.cfg, self.data
        # In query order (an id starts with its query's position), not the order labels.jsonl was written in:
        # concurrent labeling finishes out of order (vote answers before LLM calls), so the first labels -- the
        # devset and optimizer valset -- would lean to the queries the vote answered, and a teacher run again
        # (e.g. with data.extra_pool) would draw another devset from the same queries, which the deploy gate
        # could then not compare on.
        records = sorted(read_records(self.teacher.labels_path), key=lambda r: r["id"])
        # Decontaminate against the whole test set, not only the profile's subset of it.
        floor = self.min_confidence()
        result = curate(records, data.labels, [ex.text for ex in data.full_test], floor)
        print_curation(result)
        plot = plot_label_distribution(result.label_counts, self.dir / "label_distribution.png")
        examples = [make_example(r["text"], r["label"]) for r in result.kept]
        dev, train, val = split_devset_and_optimizer_sets(
            examples, cfg.data.devset_size, cfg.data.optimizer_val_size, cfg.data.optimizer_train_size)
        for name, split in zip(SPLITS, (dev, train, val)):
            write_jsonl(self.split_path(name), [dict(ex.items()) for ex in split])
        # The student is finetuned on the optimizer trainset only: the synthetic devset stays unseen.
        train_texts = {ex.text for ex in train}
        source = cfg.curation.sft_source
        sft_records = [r for r in result.kept if r["text"] in train_texts] if source != "gold" else []
        if source != "teacher":  # the gold labels (disjoint from the queries the teacher labels)
            sft_records += [{"text": ex.text, "label": ex.label} for ex in data.gold]
        program = IntentClassificationModule(data.labels, cfg.program.reasoning, cfg.program.max_reasoning_chars)
        # Exactly the messages the finetuned student's program sends at inference (its prompt style).
        sft = to_sft(sft_records, program, adapter(cfg.program.student_prompt))
        save_sft(sft, self.sft_path)
        print(f"wrote {len(sft)} SFT examples to {self.sft_path}, label chart {plot}")
        return CurationManifest(
            fingerprint=self.fingerprint(), **result.counts, devset=len(dev), optimizer_train=len(train),
            optimizer_val=len(val), sft_examples=len(sft), sft_source=source, min_confidence=floor,
            label_counts=result.label_counts, plot=str(plot))
