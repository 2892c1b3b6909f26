"""The notebooks under notebooks/ run top to bottom at small sizes, and are committed without outputs.

Each notebook's first code cell reads ``LAYERLIE_NB_SMALL``; the tests set it to 1 so that a
notebook takes seconds (one photo, 32 px, one or two groups). The kernel is ``python3``, which
resolves to the interpreter running the tests when ipykernel is installed beside it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks"
NOTEBOOKS = ("quickstart", "layer_attribution", "aliasing_ablation", "reproduce_figures", "learned_equivariance")


def execute(name: str) -> nbformat.NotebookNode:
    """Run one notebook in a fresh kernel, from its own folder, at small sizes; raise on the
    first cell that errors."""
    book = nbformat.read(FOLDER / f"{name}.ipynb", as_version=4)
    env = {"LAYERLIE_NB_SMALL": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           # the kernel imports this checkout's layerlie, as the test process does
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "Agg"}
    client = nbclient.NotebookClient(book, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(FOLDER)}})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def outputs(book: nbformat.NotebookNode) -> str:
    """All the text a notebook's code cells printed."""
    return "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name: str) -> None:
    book = execute(name)
    assert all(c.get("execution_count") for c in book.cells if c.cell_type == "code")
    if name == "quickstart":  # it prints the kernel's interpreter: the one running the tests
        assert sys.executable in outputs(book)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name: str) -> None:
    book = nbformat.read(FOLDER / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}.ipynb holds outputs; clear them"


def test_a_failing_cell_fails() -> None:
    """The runner does not swallow errors: a notebook with a raising cell raises."""
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('boom')")])
    client = nbclient.NotebookClient(book, kernel_name="python3", timeout=60)
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="boom"):
        client.execute()
