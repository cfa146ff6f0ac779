"""The committed README.ipynb shows outputs of its own code: they come only from `publish_notebook`, which
copies an executed copy's outputs when the code cells are the same and records their hash. Fast: small
notebooks executed in a real kernel (no Ray, no model)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from distill.config import project_root
from distill.errors import DistillError
from distill.notebook import METADATA_KEY, code_hash, execute_notebook, has_outputs, publish_notebook


def test_the_committed_notebook_s_outputs_come_from_its_code() -> None:
    """Outputs in README.ipynb are those of a published run of exactly its code cells (or there are none)."""
    nb = nbformat.read(project_root() / "README.ipynb", as_version=4)
    recorded = nb.metadata.get(METADATA_KEY, {}).get("code_sha256")
    if recorded is None:
        assert not has_outputs(nb), (
            "README.ipynb carries outputs without a record of the run they came from: regenerate them with "
            "`make demo && python -m distill notebook --publish`")
    else:
        assert code_hash(nb) == recorded, (
            "README.ipynb's code cells changed since its outputs were published: run `make demo` and "
            "`python -m distill notebook --publish` again")


def _notebook(path: Path, *code: str, params: str = 'PROFILE = "local_ci"') -> Path:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook"), p]
    for i, c in enumerate(code):
        nb.cells += [nbformat.v4.new_markdown_cell(f"## Section {i}"), nbformat.v4.new_code_cell(c)]
    nbformat.write(nb, path)
    return path


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source, executed copy) of a small notebook run in a real kernel."""
    d = tmp_path_factory.mktemp("nb")
    src = _notebook(d / "src.ipynb", "print(PROFILE)", "x = 6 * 7\nx")
    return src, execute_notebook("local_ci", src, d / "executed.ipynb")


def test_publish_copies_the_outputs_and_records_the_code_they_came_from(executed, tmp_path: Path) -> None:
    src, out = executed
    target = tmp_path / "README.ipynb"
    nb = nbformat.read(src, as_version=4)
    nb.cells[0].source = "# A notebook, its prose edited after the run"  # prose is the target's own
    nbformat.write(nb, target)
    assert code_hash(nb) == code_hash(nbformat.read(out, as_version=4))  # the run's injected cell is not code

    publish_notebook(out, target)
    published = nbformat.read(target, as_version=4)
    code = [c for c in published.cells if c.cell_type == "code"]
    assert [c.outputs[0].get("text", c.outputs[0].get("data", {}).get("text/plain")) for c in code[1:]] == \
        ["local_ci\n", "42"]
    assert published.cells[0].source == "# A notebook, its prose edited after the run"
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in published.cells)
    assert published.metadata[METADATA_KEY] == {"code_sha256": code_hash(published), "profile": "local_ci"}


def test_publish_refuses_outputs_of_other_code(executed, tmp_path: Path) -> None:
    src, out = executed
    target = tmp_path / "README.ipynb"
    nb = nbformat.read(src, as_version=4)
    nb.cells[-1].source = "x = 6 * 9\nx"
    nbformat.write(nb, target)
    with pytest.raises(DistillError, match="code cell 3 differs"):
        publish_notebook(out, target)
    assert not has_outputs(nbformat.read(target, as_version=4))


def test_publish_refuses_a_run_with_other_parameters_or_a_failed_cell(tmp_path: Path) -> None:
    src = _notebook(tmp_path / "src.ipynb", "print('hello')", params='PROFILE = "local_ci"\nVERBOSE = False')
    verbose = execute_notebook("local_ci", src, tmp_path / "verbose.ipynb", verbose=True)
    with pytest.raises(DistillError, match="ran with {'VERBOSE': True}"):
        publish_notebook(verbose, src)

    failing = _notebook(tmp_path / "failing.ipynb", "raise RuntimeError('boom')")
    with pytest.raises(DistillError):
        execute_notebook("local_ci", failing, tmp_path / "failed.ipynb")
    with pytest.raises(DistillError, match="code cell 2 failed"):
        publish_notebook(tmp_path / "failed.ipynb", failing)
    assert not has_outputs(nbformat.read(src, as_version=4)) and not has_outputs(nbformat.read(failing, as_version=4))


def test_execution_never_writes_into_the_notebook_it_reads(tmp_path: Path) -> None:
    src = _notebook(tmp_path / "src.ipynb", "print('hello')")
    before = src.read_bytes()
    with pytest.raises(DistillError, match="--publish"):
        execute_notebook("local_ci", src, src)
    with pytest.raises(DistillError, match="--publish"):
        execute_notebook("local_ci", src, project_root() / "README.ipynb")
    assert src.read_bytes() == before
