"""Run the fuzz targets of tests/io/test_fuzz.py (safetensors header reader, recipe parser) for a while.

    python scripts/fuzz.py --minutes 10

Rounds of NBMERGE_FUZZ_EXAMPLES examples per target, each round with fresh random draws, until the time is up;
the first failing round stops it and prints hypothesis's minimal failing input.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--examples", type=int, default=5000, help="examples per target and round")
    args = parser.parse_args()
    end, rounds = time.monotonic() + 60 * args.minutes, 0
    env = {**os.environ, "NBMERGE_FUZZ_EXAMPLES": str(args.examples)}
    while time.monotonic() < end:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               str(ROOT / "tests" / "io" / "test_fuzz.py")], env=env, cwd=ROOT)
        rounds += 1
        if done.returncode != 0:
            print(f"fuzz: a finding in round {rounds}")
            return 1
    print(f"fuzz: {rounds} rounds of {args.examples} examples per target, no finding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
