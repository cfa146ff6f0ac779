"""Execute README.ipynb headlessly (what `make demo` does): parameters injected papermill-style, the
executed notebook written next to the report, a summary table printed at the end.

The committed README.ipynb gets outputs from one place only, `publish_notebook` (`python -m distill
notebook --publish`): it copies the outputs of an executed copy into it when both have the same code
cells, and records the hash of those code cells in the notebook's metadata, so a test can tell that the
committed outputs came from the committed code. Execution never writes to README.ipynb.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from distill.config import load_config, project_root
from distill.errors import DistillError

ALWAYS = ("Set-up", "Data")  # every section needs the profile and the data object
INJECTED = "injected-parameters"  # papermill's tag for the cell that carries a run's parameters
METADATA_KEY = "distill"  # README.ipynb's metadata: {"code_sha256": ..., "profile": ...} of the published run
PUBLISH_WARN_BYTES = 3_000_000  # a README notebook much larger than this is slow to open on a code host


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def code_cells(nb: Any) -> list[Any]:
    """The notebook's code cells, without a run's injected parameters."""
    return [c for c in nb.cells if c.cell_type == "code" and INJECTED not in _tags(c)]


def code_sources(nb: Any) -> list[str]:
    """The notebook's code, cell by cell, without a run's injected parameters."""
    return [c.source for c in code_cells(nb)]


def code_hash(nb: Any) -> str:
    """sha256 of the code cells (`code_sources`): what a published notebook's outputs were computed from."""
    return hashlib.sha256(json.dumps(code_sources(nb)).encode()).hexdigest()


def has_outputs(nb: Any) -> bool:
    return any(c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
               for c in nb.cells)


def _assignments(source: str) -> dict[str, Any]:
    """`NAME = <literal>` statements of a parameters cell, as values."""
    out: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def select_sections(cells: list, sections: list[str]) -> list:
    """The parameters cell and the cells of the named sections (a `## <name>` heading up to the next one).

    Set-up and Data always run: every later section uses their `cfg` and `data`.
    """
    wanted = [w.lower() for w in (*ALWAYS, *sections)]
    keep, current, found = [], None, set()
    for cell in cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            title = cell.source[3:].splitlines()[0].lower()
            current = next((w for w in wanted if title.startswith(w)), None)
            if current:
                found.add(current)
        if current or "parameters" in cell.metadata.get("tags", []):
            keep.append(cell)
    if missing := [w for w in wanted if w not in found]:
        raise DistillError(f"no notebook section starting with {missing}")
    return keep


def execute_notebook(
    profile: str,
    notebook: str | Path | None = None,
    output: str | Path | None = None,
    timeout_s: float = 3600,
    sections: list[str] | None = None,
    verbose: bool = False,
) -> Path:
    """Run the notebook (or only `sections`) with `PROFILE = profile`; returns the executed notebook's path.

    With `verbose` (injected as `VERBOSE = True`; the kernel also gets DISTILL_VERBOSE=1) Ray's, Serve's
    and the finetune job's logs go into the notebook as well as to `<artifacts>/logs/`. The executed
    notebook is written even when a cell fails; never over the notebook it was read from.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError


    cfg = load_config(profile)
    src = Path(notebook) if notebook else project_root() / "README.ipynb"
    out = Path(output) if output else cfg.artifacts / "README.executed.ipynb"
    if out.resolve() in (src.resolve(), (project_root() / "README.ipynb").resolve()):
        # README.ipynb gets outputs only through publish_notebook, which records what code they came from.
        raise DistillError(f"{out}: the executed notebook is a copy; to put its outputs into README.ipynb, "
                           "run `python -m distill notebook --publish`")
    nb = nbformat.read(src, as_version=4)
    if sections:
        nb.cells = select_sections(nb.cells, sections)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1:
        raise DistillError(f"{src} needs exactly one cell tagged 'parameters' (found {len(params)})")
    # papermill's convention: the injected values go in a cell right after the parameters cell. Not papermill
    # itself: it runs on this same nbclient, and one injected cell is all we use of it (no new dependency).
    injected = nbformat.v4.new_code_cell(f"PROFILE = {profile!r}" + ("\nVERBOSE = True" if verbose else ""))
    injected.metadata["tags"] = [INJECTED]
    nb.cells.insert(params[0] + 1, injected)
    # coalesce_streams: a cell's stream output is merged and its carriage returns applied, as Jupyter shows
    # it, so a progress bar that updates in place (tqdm, dspy.Evaluate) keeps its final line, not one per item.
    client = NotebookClient(nb, timeout=int(timeout_s), kernel_name="python3", coalesce_streams=True,
                            resources={"metadata": {"path": str(project_root())}})
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"DISTILL_VERBOSE": "1"} if verbose else {})}
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        nbformat.write(nb, out)
        raise DistillError(f"{src} failed in a cell (executed notebook: {out}):\n{str(e)[-2000:]}") from None
    finally:
        if not out.exists():
            nbformat.write(nb, out)
    nbformat.write(nb, out)
    return out


def publish_notebook(executed: str | Path, target: str | Path | None = None) -> Path:
    """Copy the outputs of `executed` (what `make demo` wrote) into `target` (README.ipynb), with provenance.

    Refused when the two notebooks' code cells differ (outputs of other code would be shown under this
    code), when the run's injected parameters differ from the notebook's own (e.g. a `local_ci` or verbose
    run), or when a cell failed or did not run. Only outputs and execution counts are copied: the target's
    markdown and metadata stay its own, plus `metadata.distill.code_sha256` (`code_hash`).
    """
    import nbformat

    executed = Path(executed)
    target = Path(target) if target else project_root() / "README.ipynb"
    if not executed.is_file():
        raise DistillError(f"no executed notebook at {executed}: run `make demo` first")
    run, nb = nbformat.read(executed, as_version=4), nbformat.read(target, as_version=4)
    params = [c for c in nb.cells if "parameters" in _tags(c)]
    defaults = _assignments(params[0].source) if params else {}
    ran_with: dict[str, Any] = {}
    for cell in run.cells:
        if INJECTED in _tags(cell):
            ran_with.update(_assignments(cell.source))
    if changed := {k: v for k, v in ran_with.items() if defaults.get(k) != v}:
        own = {k: defaults.get(k) for k in changed}
        raise DistillError(f"{executed} ran with {changed}, but {target.name} says {own}: publish a run "
                           "with the notebook's own parameters (`make demo`)")
    run_code, own_code = code_sources(run), code_sources(nb)
    if run_code != own_code:
        where = next((i for i, (a, b) in enumerate(zip(run_code, own_code)) if a != b),
                     min(len(run_code), len(own_code)))
        raise DistillError(f"{executed} was executed from other code than {target.name} (code cell {where + 1} "
                           f"differs; {len(run_code)} vs {len(own_code)} code cells): run `make demo` again")
    run_cells, own_cells = code_cells(run), code_cells(nb)
    for i, cell in enumerate(run_cells, 1):
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            raise DistillError(f"{executed}: code cell {i} failed; publish a run that finished")
        if cell.get("execution_count") is None:
            raise DistillError(f"{executed}: code cell {i} did not run; publish a run that finished")
    for own_cell, ran in zip(own_cells, run_cells, strict=True):
        own_cell.outputs, own_cell.execution_count = ran.outputs, ran.execution_count
    if "language_info" in run.metadata:
        nb.metadata["language_info"] = run.metadata["language_info"]
    nb.metadata[METADATA_KEY] = {"code_sha256": code_hash(nb),
                                 "profile": ran_with.get("PROFILE", defaults.get("PROFILE"))}
    nbformat.validate(nb)
    nbformat.write(nb, target)
    size = target.stat().st_size
    print(f"published the outputs of {executed} into {target} ({size / 1e6:.1f} MB)")
    if size > PUBLISH_WARN_BYTES:
        print(f"warning: {target.name} is over {PUBLISH_WARN_BYTES / 1e6:.0f} MB; code hosts render it slowly")
    return target
