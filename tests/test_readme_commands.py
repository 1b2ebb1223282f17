"""The README's two commands, run as a user runs them: ``make demo`` (in its quick mode) must exit 0 having merged
with every registered method, and ``make test`` must be the command CI runs (``.ci/run``) and resolve to the suite.

``make test`` is the command that runs this file, so it is not run again from inside it (that would recurse):
CI executes it, and this test checks that CI's script calls exactly it and that make resolves it to pytest."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_make_demo_quick_merges_with_every_method(tmp_path):
    from nbmerge.plugins import all_methods

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run(["make", "--no-print-directory", "demo", f"DEMO_ARGS=--quick --workdir {tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    for method in all_methods().values():
        assert method.name in rows, f"make demo printed no row for {method.name}:\n{done.stdout}"
        if method.build_module is None:  # a tensor-wise method wrote a loadable folder
            assert (tmp_path / "merged" / method.name / "config.json").is_file(), method.name


def test_make_test_is_what_ci_runs_and_resolves_to_the_suite():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\b", readme, re.M), "the README no longer names `make test`"
    ci_commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci_commands == ["make test"], ci_commands
    dry_run = subprocess.run(["make", "-n", "--no-print-directory", "test"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert dry_run.returncode == 0, dry_run.stderr
    assert re.search(r"python -m pytest\b", dry_run.stdout), dry_run.stdout
