"""Run every recipe of the mergekit corpus through nbmerge and mergekit 0.1.5 and write docs/recipe-corpus.md.

    .venv/bin/python scripts/recipe_corpus.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "oracle"))

from recipe_corpus import REPORT, corpus_files, markdown, run_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the stand-in checkpoints and outputs go (default: a temp dir)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nbmerge-corpus-"))
    results = []
    for path in corpus_files():
        result = run_case(path, workdir)
        print(f"{result.name:70s} {result.status:18s} {result.detail[:100]}", flush=True)
        results.append(result)
    REPORT.write_text(markdown(results))
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
