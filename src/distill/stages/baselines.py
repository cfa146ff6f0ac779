"""The baselines stage: 1-NN and logistic regression on the gold examples' embeddings, scored on the same
test queries as the teacher and the students, so every run shows what the LLMs add."""

from __future__ import annotations

from pathlib import Path

from distill.config import Config
from distill.data.dataset import TaskData, write_jsonl
from distill.evaluation.baselines import run_baselines
from distill.stages.base import Manifest, Stage, code_version, fingerprint
from distill.stages.data import data_fingerprint


class BaselinesManifest(Manifest):
    accuracy: dict[str, float]  # baseline name -> accuracy on the test queries
    params: dict[str, dict[str, float]]
    test_size: int
    n_gold: int
    embedder: str


class BaselinesStage(Stage[BaselinesManifest]):
    name = "baselines"
    title = "baselines: 1-NN and logistic regression on the gold embeddings"
    manifest_type = BaselinesManifest
    upstream = ("data",)

    def __init__(self, cfg: Config, data: TaskData) -> None:
        super().__init__(cfg)
        self.data = data

    def inputs(self) -> dict[str, str]:
        return {"data": data_fingerprint(self.data)}

    def fingerprint(self) -> str:
        # "lr-loo": how C is chosen; baselines computed with the former 5-fold CV are not current.
        return fingerprint(self.inputs(), self.cfg.teacher.embedder, "lr-loo",
                           code_version("distill.evaluation.baselines", "distill.teacher.vote", "distill.teacher.program"))

    def outputs(self, m: BaselinesManifest) -> list[Path]:
        return [self.dir / "predictions" / f"{name}.jsonl" for name in m.accuracy]

    def describe(self, m: BaselinesManifest) -> str:
        return ", ".join(f"{k} {v:.1%}" for k, v in m.accuracy.items()) + f" on {m.test_size} test queries"

    def run(self) -> BaselinesManifest:
        data, embedder = self.data, self.cfg.teacher.embedder
        results = run_baselines(data.gold, data.test, embedder)
        for name, r in results.items():
            write_jsonl(self.dir / "predictions" / f"{name}.jsonl", [
                {"text": ex.text, "label": ex.label, "predicted": p, "correct": p == ex.label}
                for ex, p in zip(data.test, r.predictions)])
        m = BaselinesManifest(
            fingerprint=self.fingerprint(), accuracy={k: r.accuracy for k, r in results.items()},
            params={k: r.params for k, r in results.items() if r.params}, test_size=len(data.test),
            n_gold=len(data.gold), embedder=embedder)
        print(self.describe(m))
        return m
