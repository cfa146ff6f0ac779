"""The deploy gate (`serving.deploy_gate: devset`, the default): a run deploys its new student only if it beats
the deployed one on the devset -- never on the test set, which stays a report.

The serving stage records what it deployed in `<artifacts>/serving/deployed.json` (`DeployedStudent`): the
student's identity (adapter, saved program, model id, by content), its devset accuracy as the evaluation stage
measured it when choosing the variant, and the devset that was (`devset_fingerprint`: its texts and teacher
labels). It also copies the student (deploy params, saved program, adapter, and with the cascade its
calibration and threshold) to `serving/deployed/<identity>/` with a Serve config pointing at the copies, since
the next run's evaluation and finetune write over the originals. A kept cascade falls back to the current
teacher stage's teacher (its app rebuilds it from this run's profile and manifests, as for a new student).
The next run's serving stage asks `decide`:

- no deployed student recorded, the gate off, or the new student is the deployed one: deploy the new one;
- another devset (the task, the seed, the sizes, the teacher or curation changed): the two accuracies are not
  comparable; the new student is deployed, and the line says so. Re-scoring the deployed student on the new
  devset would mean serving its adapter again beside the new one: not done;
- the same devset: the new student is deployed only if its accuracy is strictly higher. A tie keeps the
  deployed one: equal accuracy on the same queries is no evidence that the new one is better, and swapping
  would change the answers clients get for no measured gain;
- a new student that does not beat the deployed one while the deployed one cannot be served again (its copies
  are gone, or its adapter was published under a name the new finetune reused): the new one, said so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

from distill.errors import DistillError
from distill.models import file_identity
from distill.stages.base import fingerprint

DEPLOYED_FILE = "deployed.json"
SNAPSHOTS_DIR = "deployed"


class Candidate(BaseModel):
    """The student a run would deploy: what the gate compares."""

    model_config = ConfigDict(extra="forbid")
    identity: str
    kind: str
    variant: str
    model: str
    devset_score: float  # the evaluation stage's, for the chosen variant
    devset_fingerprint: str
    devset_size: int

    def name(self) -> str:
        return f"{self.kind} {self.variant} ({self.model})"


class DeployedStudent(Candidate):
    """`<artifacts>/serving/deployed.json`: the student the serving stage last deployed (one model for the
    serving stage that writes it and the next run's gate that reads it)."""

    cascade: bool  # deployed behind the cascade (its cascade params are among `files`)
    # Its copies (deploy_params, program, adapter, cascade_params) and the Serve config that deploys them: the
    # student as it was deployed, whatever later runs write over.
    config: str | None
    files: dict[str, str] = {}
    not_restorable: str | None = None  # why it cannot be deployed again (then `config` is None)
    deployed_at: str

    def missing(self) -> str | None:
        """Why this deployment cannot be served again now, or None."""
        if self.not_restorable:
            return self.not_restorable
        gone = [p for p in [self.config or "", *self.files.values()] if not Path(p).exists()]
        return f"its copies are gone ({', '.join(gone)})" if gone else None


class GateDecision(BaseModel):
    """What the serving stage deployed, and why (its manifest's `gate`)."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["devset", "off"]
    deploy: Literal["new", "deployed"]  # deployed: the student deployed before is served again
    reason: str
    new_devset_score: float
    deployed_devset_score: float | None = None
    devset_fingerprint: str
    deployed_devset_fingerprint: str | None = None

    def line(self) -> str:
        return f"deploy gate ({self.mode}): {self.reason}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def decide(mode: Literal["devset", "off"], new: Candidate, deployed: DeployedStudent | None) -> GateDecision:
    """Deploy the new student, or serve the deployed one again (rules: the module's docstring)."""
    out: dict[str, Any] = {"mode": mode, "new_devset_score": new.devset_score,
                           "devset_fingerprint": new.devset_fingerprint}
    if deployed is not None:
        out.update(deployed_devset_score=deployed.devset_score, deployed_devset_fingerprint=deployed.devset_fingerprint)

    def go(deploy: Literal["new", "deployed"], reason: str) -> GateDecision:
        return GateDecision(deploy=deploy, reason=reason, **out)

    if mode == "off":
        return go("new", f"serving.deploy_gate is off: the new student {new.name()} is deployed")
    if deployed is None:
        return go("new", f"no student deployed before: the new student {new.name()} is deployed "
                         f"({_pct(new.devset_score)} on the devset)")
    if deployed.identity == new.identity:
        return go("new", f"the new student is the deployed one ({new.name()}, same adapter and program): deployed")
    if deployed.devset_fingerprint != new.devset_fingerprint:
        return go("new", f"the deployed student {deployed.name()} was scored on another devset "
                         f"({deployed.devset_size} queries, {deployed.devset_fingerprint}) than the new one "
                         f"({new.devset_size} queries, {new.devset_fingerprint}): not comparable, so the new student "
                         f"{new.name()} is deployed (the deployed one is not re-scored on this devset)")
    scores = (f"{_pct(new.devset_score)} vs {_pct(deployed.devset_score)} on the same devset "
              f"({new.devset_size} queries)")
    if new.devset_score > deployed.devset_score:
        return go("new", f"the new student {new.name()} beats the deployed {deployed.name()}: {scores}; deployed")
    if (why := deployed.missing()) is not None:
        return go("new", f"the new student {new.name()} does not beat the deployed {deployed.name()} ({scores}), "
                         f"but the deployed one cannot be served again ({why}): the new student is deployed")
    tie = "; a tie keeps the deployed one" if new.devset_score == deployed.devset_score else ""
    return go("deployed", f"the new student {new.name()} does not beat the deployed {deployed.name()} "
                          f"({scores}{tie}): the deployed student is kept and served again")


def devset_fingerprint(examples: Sequence[Any]) -> str:
    """The devset a score was measured on: its texts and teacher labels (as a set: an accuracy does not depend
    on the order)."""
    return fingerprint(sorted((ex.text, ex.label) for ex in examples))


def student_identity(model: str, kind: str, variant: str, program: Path, program_params: dict[str, Any],
                     adapter: str | None) -> str:
    """What is served as the student, by content: the model id and variant, the saved program (its
    instructions and demonstrations), its settings, and the finetuned adapter's files."""
    path = Path(adapter) if adapter else None
    adapter_id: Any = file_identity(path) if path is not None and path.exists() else adapter
    return fingerprint(model, kind, variant, program.read_text(encoding="utf-8"), program_params, adapter_id)


def read_deployed(path: Path) -> DeployedStudent | None:
    """The deployed student's record, or None when nothing was deployed (with the gate on, a record that does
    not read is an error: the gate would otherwise pass anything)."""
    if not path.is_file():
        return None
    try:
        return DeployedStudent.model_validate_json(path.read_text())
    except ValidationError as e:
        raise DistillError(f"{path} is not a deployed-student record ({e.error_count()} error(s), first: "
                           f"{e.errors()[0]['msg']}); delete it to deploy this run's student without a comparison, "
                           f"or set serving.deploy_gate: off") from None


def write_deployed(path: Path, record: DeployedStudent) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    tmp.replace(path)  # atomic: a killed run leaves the previous record, never half of one


def copy_into(dest: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Copy each file (or directory: a PEFT adapter) into `dest`, keeping its name; name -> the copy."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, src in files.items():
        target = dest / src.name
        if src.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
        out[name] = target
    return out


def prune_snapshots(root: Path, keep: str) -> None:
    """Remove every deployment copy under `root` but `keep` (the deployed one): one deployment is kept."""
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name != keep:
                shutil.rmtree(d, ignore_errors=True)
