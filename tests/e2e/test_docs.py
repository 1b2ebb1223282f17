"""Every code snippet of the README and of docs/ runs as written, in document order, in a fresh folder per page.

Fence tags and what the test does with them:
- ``python``: executed, one namespace per page (so a page reads top to bottom like a notebook);
- ``ipython``: run cell by cell in one IPython shell per page, after ``%load_ext nbmerge``;
- ``bash``: every ``nbmerge …`` line run as a command (it must exit 0); any other line makes the block need a
  ``<!-- not run: reason -->`` marker on the line before it;
- ``text``: output or a layout, shown not run; ``toml``/``json``/``yaml``: parsed.
A block after ``<!-- not run: reason -->`` is still checked: python is compiled, ipython is transformed, and each
``nbmerge merge|methods|bench|demo`` line has its arguments parsed. Any other tag is an error, so a new kind of
snippet cannot slip past untested.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\n", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")
TAGS = {"python", "ipython", "bash", "text", "toml", "json", "yaml"}
NBMERGE = Path(sys.executable).with_name("nbmerge")


@dataclass
class Snippet:
    page: Path
    line: int
    tag: str
    code: str
    not_run: str | None

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.tag})"


def snippets(page: Path) -> list[Snippet]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        line = text.count("\n", 0, match.start()) + 1
        found.append(Snippet(page, line, match.group(1), match.group(2), marker.group(1) if marker else None))
    return found


def test_every_page_has_its_snippets_found():
    """The fence pattern sees every fence (an odd count means one was missed or left open)."""
    for page in PAGES:
        fences = sum(1 for line in page.read_text().splitlines() if line.startswith("```"))
        assert fences == 2 * len(snippets(page)), page


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_methods_page_names_every_method_and_parameter():
    import nbmerge

    page = (ROOT / "docs" / "methods.md").read_text()
    for method in nbmerge.methods().values():
        section = re.search(rf"^### `{method.name}`\n(.*?)(?=^### |\Z)", page, re.S | re.M)
        assert section, f"docs/methods.md has no section for {method.name}"
        for param in method.params:
            assert f"`{param.name}`" in section.group(1), f"docs/methods.md: {method.name} lacks {param.name}"


def test_plugins_page_names_both_hooks():
    from nbmerge import hookspecs

    page = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert hooks == ["register_merge_methods", "register_task_pools"]
    for hook in hooks:
        assert f"{hook}(register)" in page


def _parse_nbmerge_line(argv: list[str]) -> None:
    """Parse a command line as the CLI would, without running it."""
    from nbmerge import cli
    from nbmerge.arguments import method_parser
    from nbmerge.plugins import get_method

    command, rest = argv[0], argv[1:]
    if command == "merge":
        method = get_method(rest[0])
        method_parser(method, "nbmerge merge", "models").parse_args(rest[1:])
    else:
        assert command in {"methods", "bench", "demo", "search"}, argv
        # the subcommand parsers are built inside their functions: run them with --help swapped for parsing
        with pytest.raises(SystemExit) as exit_info:
            getattr(cli, f"_{command}")([*rest, "--help"])
        assert exit_info.value.code == 0, argv


def _nbmerge_lines(code: str) -> tuple[list[list[str]], list[str]]:
    commands, others = [], []
    for line in code.replace("\\\n", " ").splitlines():
        stripped = line.split(" #", 1)[0].strip()
        if not stripped or stripped.startswith("#"):
            continue
        argv = shlex.split(stripped)
        if argv[0] in ("nbmerge", ".venv/bin/nbmerge"):
            commands.append(argv[1:])
        else:
            others.append(stripped)
    return commands, others


def _run_bash(snippet: Snippet, cwd: Path) -> None:
    commands, others = _nbmerge_lines(snippet.code)
    if snippet.not_run:
        for argv in commands:
            _parse_nbmerge_line(argv)
        return
    assert not others, f"{snippet.where()}: lines other than nbmerge commands need a not-run marker: {others}"
    for argv in commands:
        done = subprocess.run([str(NBMERGE), *argv], cwd=cwd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"})
        assert done.returncode == 0, f"{snippet.where()}: nbmerge {shlex.join(argv)}\n{done.stdout}\n{done.stderr}"


class _IPython:
    def __init__(self):
        from IPython.core.interactiveshell import InteractiveShell

        InteractiveShell.clear_instance()
        self.shell = InteractiveShell.instance()
        self.run("%load_ext nbmerge", "setup")

    def run(self, code: str, where: str) -> None:
        result = self.shell.run_cell(code, store_history=False)
        error = result.error_before_exec or result.error_in_exec
        assert error is None, f"{where}: {type(error).__name__}: {error}"

    def close(self) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        InteractiveShell.clear_instance()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_snippets_run(page, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_snippet__"}
    shell = None
    try:
        for snippet in snippets(page):
            where = snippet.where()
            assert snippet.tag in TAGS, f"{where}: unknown fence tag {snippet.tag!r} (one of {sorted(TAGS)})"
            if snippet.tag == "python":
                compiled = compile(snippet.code, where, "exec")
                if not snippet.not_run:
                    exec(compiled, namespace)
            elif snippet.tag == "ipython":
                shell = shell or _IPython()
                if snippet.not_run:
                    ast.parse(shell.shell.transform_cell(snippet.code))
                else:
                    shell.run(snippet.code, where)
            elif snippet.tag == "bash":
                _run_bash(snippet, tmp_path)
            elif snippet.tag == "toml":
                tomllib.loads(snippet.code)
            elif snippet.tag == "json":
                json.loads(snippet.code)
            elif snippet.tag == "yaml":
                yaml.safe_load(snippet.code)
    finally:
        if shell is not None:
            shell.close()
        # a page may register plugins in-process (docs/plugins.md does): later tests see only the installed ones
        from nbmerge.plugins import reload_plugins

        reload_plugins()
