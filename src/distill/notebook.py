"""Execute README.ipynb headlessly (what `make demo` does): parameters injected papermill-style, the
executed notebook written next to the report, a summary table printed at the end."""

from __future__ import annotations

import os
from pathlib import Path

from distill.config import load_config, project_root
from distill.errors import DistillError


ALWAYS = ("Set-up", "Data")  # every section needs the profile and the data object


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

    With `verbose` the kernel runs with DISTILL_VERBOSE=1: Ray's, Serve's and the finetune job's logs go
    into the notebook as well as to `<artifacts>/logs/`. The executed notebook is written even when a cell
    fails.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError


    cfg = load_config(profile)
    src = Path(notebook) if notebook else project_root() / "README.ipynb"
    out = Path(output) if output else cfg.artifacts / "README.executed.ipynb"
    nb = nbformat.read(src, as_version=4)
    if sections:
        nb.cells = select_sections(nb.cells, sections)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1:
        raise DistillError(f"{src} needs exactly one cell tagged 'parameters' (found {len(params)})")
    # papermill's convention: the injected values go in a cell right after the parameters cell
    injected = nbformat.v4.new_code_cell(f"PROFILE = {profile!r}")
    injected.metadata["tags"] = ["injected-parameters"]
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
