"""Every example notebook runs from top to bottom in a fresh kernel (nbclient), with no error and no UsageError,
and is stored executed: outputs and widget state, so it renders on GitHub and in JupyterLab without a kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from notebooks import execute, notebook_paths, problems  # noqa: E402

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
NOTEBOOKS = notebook_paths()


def test_there_are_example_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"01_quickstart_magics", "02_panels"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_clean(path, tmp_path):
    executed = execute(path, tmp_path)
    assert problems(executed) == []
    stored = nbformat.read(path, as_version=4)
    # the stored copy went through the same cells (re-store with `make notebooks` after editing one)
    assert [c.source for c in stored.cells] == [c.source for c in executed.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed_with_widget_state(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1))
    assert problems(notebook) == []
    views = {o.data[WIDGET_VIEW]["model_id"] for c in code_cells for o in c.outputs if WIDGET_VIEW in o.get("data", {})}
    state = notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    assert views <= set(state), "a widget shown in the notebook has no stored state"


def test_a_usage_error_fails_the_run(tmp_path):
    """The runner cannot report a notebook as passing when a magic only wrote a UsageError (nbmake's blind spot)."""
    from nbclient.exceptions import CellExecutionError
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    path = tmp_path / "bad.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("%load_ext nbmerge"), new_code_cell("%merge tise a b")]), path)
    with pytest.raises(CellExecutionError, match="unknown merge method 'tise'"):
        execute(path, tmp_path)
    stored = new_notebook(cells=[new_code_cell("%merge tise a b", outputs=[
        new_output("stream", name="stderr", text="UsageError: nbmerge: unknown merge method 'tise'\n")])])
    assert problems(stored) == ["cell 0: UsageError: nbmerge: unknown merge method 'tise'"]
