"""Every notebook executes top to bottom (with the small settings it ships with)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_are_generated_from_make_notebooks():
    import notebooks.make_notebooks as make

    assert {p.name for p in NOTEBOOKS} == set(make.NOTEBOOKS)


SLOW = {"lexical.ipynb", "sentiment.ipynb"}  # they train proposals on the embedded model: minutes on 2 cores
USER_MODEL = {"gemma_tpu.ipynb"}  # needs a model folder: run on a tiny random Gemma by test_notebook_gemma.py


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p for p in NOTEBOOKS
                                  if p.name not in USER_MODEL],
                         ids=lambda p: p.name)
def test_notebook_executes(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
