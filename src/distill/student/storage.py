"""Where a finetune job's inputs and outputs live: a place the submitting process and the job both reach.

A Ray job runs on whichever node Ray picks, and on a real cluster that node does not share the submitting
machine's disk. So the job spec, the SFT data, Ray Train's checkpoints (`RunConfig.storage_path`) and the
job's result all go to one job directory under `finetune.job_storage`:

- a URI (`s3://bucket/prefix`, `gs://...`): object storage, through pyarrow's filesystems, the same ones Ray
  Train resolves its `storage_path` with (credentials and `AWS_ENDPOINT_URL` from the environment);
- a plain path: a directory every node mounts (NFS, a local disk when everything runs on one machine).

Unset, a profile with object storage for its adapters (`finetune.adapter_storage`) uses that bucket
(`<scheme>://<bucket>/distill-jobs`), and a local profile keeps everything in its stage directory.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from distill.errors import DistillError

JOBS_PREFIX = "distill-jobs"


def is_uri(location: str | os.PathLike[str]) -> bool:
    return "://" in str(location)


def _resolve(location: str | os.PathLike[str]) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(str(location))
        except (OSError, ValueError) as e:  # an unknown scheme, a bucket that cannot be resolved
            raise DistillError(f"storage {location}: {e}") from None
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base/part/...`: a URI stays a URI, a path a path."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def default_job_storage(job_storage: str | None, adapter_storage: str | None) -> str | None:
    """The profile's job storage: `finetune.job_storage`, else `<adapter_storage's bucket>/distill-jobs` when
    adapters go to object storage, else None (the stage directory: a local profile)."""
    if job_storage:
        return job_storage
    if adapter_storage and is_uri(adapter_storage):
        p = urlparse(adapter_storage)
        return f"{p.scheme}://{p.netloc}/{JOBS_PREFIX}"
    return None


def new_job_id(name: str) -> str:
    """A Ray submission id and the job directory's name: `distill-finetune-<name>-<UTC time>-<random>`."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    return f"distill-finetune-{safe}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def _errors(what: str, location: str | os.PathLike[str]) -> Iterator[None]:
    """pyarrow's OSError/ValueError (credentials, permissions, a missing file) as a DistillError naming `location`."""
    try:
        yield
    except DistillError:
        raise
    except (OSError, ValueError) as e:
        raise DistillError(f"could not {what} {location}: {e}") from None


def exists(location: str | os.PathLike[str]) -> bool:
    import pyarrow.fs as pafs

    fs, path = _resolve(location)
    with _errors("look up", location):
        return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_text(location: str | os.PathLike[str]) -> str:
    fs, path = _resolve(location)
    with _errors("read", location):
        with fs.open_input_stream(path) as f:
            return bytes(f.read()).decode("utf-8")


def write_text(location: str | os.PathLike[str], text: str) -> str:
    """Write `text` to `location` (its directory created); returns `location`."""
    fs, path = _resolve(location)
    with _errors("write", location):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))
    return str(location)


def delete_file(location: str | os.PathLike[str]) -> None:
    """Remove a file; nothing happens when there is none."""
    if exists(location):
        fs, path = _resolve(location)
        with _errors("delete", location):
            fs.delete_file(path)


def copy(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> str:
    """Copy a file or a directory tree between any two locations (local, shared or object storage)."""
    import pyarrow.fs as pafs

    src_fs, src = _resolve(source)
    dst_fs, dst = _resolve(dest)
    with _errors("copy", f"{source} -> {dest}"):
        info = src_fs.get_file_info(src)
        if info.type == pafs.FileType.NotFound:
            raise DistillError(f"not found: {source}")
        if info.type == pafs.FileType.Directory:
            dst_fs.create_dir(dst, recursive=True)
        else:
            dst_fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    return str(dest)


def download_dir(source: str, dest: str | os.PathLike[str]) -> Path:
    """A remote directory copied to a fresh local `dest` (replacing what was there); returns `dest`."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent if dest.parent.exists() else None))
    try:
        copy(source, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
