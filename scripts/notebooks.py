"""Execute the example notebooks with nbclient; with --store, write them back executed (outputs + widget state).

    .venv/bin/python scripts/notebooks.py [--store] [NAME ...]

A notebook fails when a cell raises, and also when a cell only wrote ``UsageError:`` to stderr (IPython reports
usage errors that way, and nbmake 1.5.5 would call such a notebook passed). Each runs in a fresh scratch folder
(its files go there); kernels get one torch/BLAS thread so the suite stays fast on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

FOLDER = Path(__file__).resolve().parent.parent / "example_notebooks"
CELL_TIMEOUT = 600


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    paths = sorted(FOLDER.glob("*.ipynb"))
    if names:
        paths = [p for p in paths if p.stem in names or p.name in names]
    return paths


def execute(path: Path, workdir: Path | None = None) -> nbformat.NotebookNode:
    """Run every cell of ``path`` in a fresh kernel whose working folder is ``workdir`` (a scratch folder)."""
    notebook = nbformat.read(path, as_version=4)
    scratch = Path(workdir or tempfile.mkdtemp(prefix=f"nbmerge-{path.stem}-"))
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", store_widget_state=True,
                                record_timing=False, resources={"metadata": {"path": str(scratch)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return notebook


def problems(notebook: nbformat.NotebookNode) -> list[str]:
    """Errors and usage errors in the outputs of an executed notebook."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                found.append(f"cell {index}: {output.ename}: {output.evalue}")
            elif output.output_type == "stream" and output.name == "stderr" and "UsageError:" in output.text:
                found.append(f"cell {index}: {output.text.strip()}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="store_true", help="write the executed notebooks back")
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = parser.parse_args(argv)
    failed = 0
    for path in notebook_paths(args.names):
        started = time.perf_counter()
        try:
            notebook = execute(path)
        except CellExecutionError as error:
            print(f"{path.name}: {str(error).strip().splitlines()[-1]}")
            failed += 1
            continue
        found = problems(notebook)
        print(f"{path.name}: {time.perf_counter() - started:.1f} s, {'; '.join(found) or 'ok'}")
        failed += bool(found)
        if args.store and not found:
            nbformat.write(notebook, path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
