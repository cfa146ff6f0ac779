"""Teacher labeling as a Ray Data job (`teacher.engine: ray_data`), for query sets far beyond one process.

    read_parquet(queries) -> drop the ids already labeled
      -> map_batches(TeacherLabeler, ActorPoolStrategy) -> write_parquet(shards/<run>/)

Blocks are kept to a few batches of rows (the job's DataContext.target_max_block_size, from the input's
bytes per row), so the actors share the work even when the input is one file and their labels reach the
writer batch by batch rather than when a whole file is done.

Each actor holds one copy of the teacher program -- the very object the threads engine calls, so the
prompts, retrieval and candidates are the same -- and one DSPy LM client to the served endpoint, where
Serve's replicas do the generation. Ray Data streams the rows with backpressure, so memory does not grow
with the number of queries, and shows its own progress bars.

Durability: Ray Data writes a shard as soon as `rows_per_shard` labeled rows are ready. A shard is a
complete Parquet file, or torn when the job was killed while writing it; a torn shard is set aside and its
queries are labeled again (`distill.teacher.labeling.read_shard`). Every run of either engine starts by folding
the finished shards into `labels.jsonl` (`fold_shards`), skips the ids it holds, and folds again at the
end, so a killed job loses no finished shard and no id is labeled twice into the contract curation
reads. Rows whose call failed carry their `error` in the shard, go to `errors.jsonl` and are retried.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import dspy
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console

from distill.config import LMConfig, RayDataLabelingConfig
from distill.lm import make_lm, using
from distill.teacher.labeling import (
    SHARDS_DIR,
    LabelingResult,
    done_ids,
    error_record,
    fold_shards,
    labeled_ids,
    query_id,
    read_shard,
    record,
    start_labeling,
)

console = Console()

# Every shard has this schema, whichever optional fields the program fills (a batch of vote-only
# answers must not write a shard whose `reasoning` column has another type).
SHARD_SCHEMA = pa.schema([
    ("id", pa.string()), ("text", pa.string()), ("label", pa.string()), ("latency_s", pa.float64()),
    ("source", pa.string()), ("confidence", pa.float64()), ("reasoning", pa.string()), ("error", pa.string()),
])
QUERY_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
# Read, repartition and write tasks only move small tables around: they must not hold a whole CPU,
# which on a 2-core machine is what the Serve replica left.
LIGHT_TASK_CPUS = 0.1


class TeacherLabeler:
    """The Ray Data UDF: one teacher program and one DSPy LM client per actor; a batch in, its rows out."""

    def __init__(self, teacher: dspy.Module, lm_cfg: LMConfig, cache: bool, cache_dir: str | None,
                 lm_kwargs: dict[str, Any]) -> None:
        if cache_dir:  # the driver's DSPy disk cache (an unchanged teacher is not asked twice)
            dspy.configure_cache(enable_disk_cache=True, disk_cache_dir=cache_dir)
        self.teacher = teacher
        self.lm = make_lm(lm_cfg, cache=cache, **lm_kwargs)
        index = getattr(teacher, "index", None)
        if index is not None:  # load the retrieval embedder now, not inside the first batch's first call
            from distill.teacher.program import load_embedder

            load_embedder(index.embedder)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        with using(self.lm):  # DSPy settings are thread-local: set them in the thread that calls
            for qid, text in zip(batch["id"].to_pylist(), batch["text"].to_pylist()):
                t = time.perf_counter()
                try:
                    pred = self.teacher(text=text)
                    rows.append(record(qid, text, pred, time.perf_counter() - t))
                except Exception as e:  # noqa: BLE001 - the row carries its error; it is retried next run
                    rows.append({"id": qid, "text": text, "error": error_record(qid, text, e)["error"]})
        return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)


def _drop_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=done)))


def parquet_files(source: Path) -> list[Path]:
    return sorted(source.glob("*.parquet")) if source.is_dir() else [source]


def block_bytes(files: Sequence[Path], rows: int) -> int:
    """Bytes of `rows` rows of the input (Parquet's uncompressed sizes): the job's target block size."""
    metas = [pq.read_metadata(f) for f in files]
    n = sum(m.num_rows for m in metas)
    size = sum(m.row_group(i).total_byte_size for m in metas for i in range(m.num_row_groups))
    return max(1024, int(rows * size / max(1, n)))


def write_queries(queries: Sequence[dspy.Example], path: Path) -> list[str]:
    """The queries as a Parquet file of (id, text) for the job to read; returns their ids."""
    ids = [query_id(i, q.text) for i, q in enumerate(queries)]
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pydict({"id": ids, "text": [q.text for q in queries]}, schema=QUERY_SCHEMA), tmp)
    tmp.replace(path)
    return ids


def label_queries_ray(
    teacher: dspy.Module,
    lm_cfg: LMConfig,
    queries: Sequence[dspy.Example] | Path,
    out_dir: Path,
    settings: RayDataLabelingConfig = RayDataLabelingConfig(),
    fingerprint: str = "",
    cache: bool = True,
    cache_dir: Path | None = None,
    lm_kwargs: dict[str, Any] | None = None,
) -> LabelingResult:
    """Label every query once with a Ray Data job into `out_dir` (shards + labels.jsonl), resuming.

    `queries` is the query list (ids as the threads engine gives them) or a Parquet file (or a directory
    of them) with `id` and `text` columns, read in streaming (a million queries never sit in this process).
    Runs on the Ray this process is connected to (the one serving the teacher), else starts one.
    """
    import ray

    start_labeling(out_dir, fingerprint)
    path, err_path = out_dir / "labels.jsonl", out_dir / "errors.jsonl"
    fold_shards(out_dir)  # what a killed run finished counts as done
    if isinstance(queries, Path):
        source = queries
        total = sum(pq.read_metadata(f).num_rows for f in parquet_files(source))
        done = labeled_ids(path)
    else:
        source, total = out_dir / "queries.parquet", len(queries)
        done = done_ids(path, write_queries(queries, source))
    todo = total - len(done)
    if todo <= 0:
        console.print(f"labeling: all {total} queries already labeled in {path}")
        return LabelingResult(path, len(done), 0, 0, 0.0)

    if not ray.is_initialized():
        from distill.serving.control import ensure_ray

        ensure_ray()
    run_dir = out_dir / SHARDS_DIR / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    print(f"labeling {todo} of {total} queries with Ray Data: {settings.actors} actors x {settings.calls_per_actor} "
          f"calls, shards of {settings.rows_per_shard} rows in {run_dir}")
    ctx = ray.data.DataContext.get_current()
    default_block, default_v2 = ctx.target_max_block_size, ctx.use_datasource_v2
    # Blocks of about four batches (a dataset keeps the context it was created under: the settings are this
    # job's alone). Not Dataset.repartition, nor the V2 Parquet reader: their tasks (repartition, ListFiles)
    # each ask for a whole CPU, and on 2 cores the Serve replica holds one of the two (a deadlock, seen).
    ctx.target_max_block_size = block_bytes(parquet_files(source), 4 * settings.batch_size)
    ctx.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(str(source), num_cpus=LIGHT_TASK_CPUS)
    finally:
        ctx.target_max_block_size, ctx.use_datasource_v2 = default_block, default_v2
    if done:
        ds = ds.map_batches(_drop_done, fn_kwargs={"done": pa.array(sorted(done), pa.string())},
                            batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_TASK_CPUS)
    ds = ds.map_batches(
        TeacherLabeler,
        fn_constructor_kwargs={"teacher": teacher, "lm_cfg": lm_cfg, "cache": cache,
                               "cache_dir": str(cache_dir) if cache_dir else None, "lm_kwargs": lm_kwargs or {}},
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            size=settings.actors, max_concurrent_calls_per_actor=settings.calls_per_actor,
            enable_true_multi_threading=settings.calls_per_actor > 1),
        num_cpus=settings.num_cpus_per_actor,
    )
    t0 = time.perf_counter()
    ds.write_parquet(str(run_dir), min_rows_per_file=settings.rows_per_shard,
                     ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})
    seconds = time.perf_counter() - t0

    failed = 0
    with err_path.open("a", encoding="utf-8") as err:
        for f in sorted(run_dir.glob("*.parquet")):
            for row in read_shard(f) or []:
                if row["error"] is not None:
                    err.write(json.dumps(error_record(row["id"], row["text"], row["error"]), ensure_ascii=False) + "\n")
                    failed += 1
    new = fold_shards(out_dir)
    labeled = len(labeled_ids(path))
    print(f"labeled {new} queries in {seconds:.1f} s with Ray Data ({new / seconds:.2f} queries/s)")
    if failed:
        console.print(f"[yellow]{failed} queries failed (see {err_path}); rerun to retry them[/]")
    return LabelingResult(path, labeled, new, failed, seconds)
