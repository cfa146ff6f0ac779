"""Execute README.ipynb headlessly (what `make demo` does): parameters injected papermill-style, the
executed notebook written next to the report, a summary table printed at the end."""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError


def execute_notebook(
    profile: str, notebook: str | Path | None = None, output: str | Path | None = None, timeout_s: float = 3600
) -> Path:
    """Run every cell with `PROFILE = profile`; returns the executed notebook's path (written even on failure)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from distill.config import load_config, project_root

    cfg = load_config(profile)
    src = Path(notebook) if notebook else project_root() / "README.ipynb"
    out = Path(output) if output else cfg.artifacts / "README.executed.ipynb"
    nb = nbformat.read(src, as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1:
        raise DistillError(f"{src} needs exactly one cell tagged 'parameters' (found {len(params)})")
    # papermill's convention: the injected values go in a cell right after the parameters cell
    injected = nbformat.v4.new_code_cell(f"PROFILE = {profile!r}")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(params[0] + 1, injected)
    client = NotebookClient(nb, timeout=int(timeout_s), kernel_name="python3",
                            resources={"metadata": {"path": str(project_root())}})
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.execute()
    except CellExecutionError as e:
        nbformat.write(nb, out)
        raise DistillError(f"{src} failed in a cell (executed notebook: {out}):\n{str(e)[-2000:]}") from None
    finally:
        if not out.exists():
            nbformat.write(nb, out)
    nbformat.write(nb, out)
    return out
