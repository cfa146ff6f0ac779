"""README.ipynb runs top to bottom (headless, nbclient) on the smallest profile."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_readme_notebook_executes(with_banking77, tmp_path) -> None:
    nb = nbformat.read(ROOT / "README.ipynb", as_version=4)
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "README.ipynb needs exactly one cell tagged `parameters`"
    # papermill's convention: injected values go in a cell right after the parameters cell
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell('PROFILE = "local_ci"'))
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "'train': 4171" in outputs and "Program output label:" in outputs
    nbformat.write(nb, tmp_path / "README.executed.ipynb")
