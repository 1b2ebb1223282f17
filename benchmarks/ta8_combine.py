#!/usr/bin/env python
"""Join the per-seed ta8-text tables (benchmarks/ta8_stages.sh writes bench-ta8-seed<SEED>.json) into one table of
means and spreads over seeds, benchmarks/results/bench-ta8.json, and print it.

Usage: .venv/bin/python benchmarks/ta8_combine.py [SEED ...]     (default: 0 1 2)
"""

from __future__ import annotations

import sys
from pathlib import Path

from nbmerge.workbench.bench import BenchResult, combine_seeds

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    seeds = [int(seed) for seed in sys.argv[1:]] or [0, 1, 2]
    table = combine_seeds([BenchResult.from_json(RESULTS / f"bench-ta8-seed{seed}.json") for seed in seeds])
    table.to_json(RESULTS / "bench-ta8.json")
    print(table)
