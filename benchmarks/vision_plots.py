#!/usr/bin/env python
"""A bench table's plots, by default the hard workbench's from ``benchmarks/results/bench-hard.json`` (written by
``nbmerge bench``; ``--json benchmarks/results/bench-ta8.json --name bench-ta8`` for the ta8-text pool):

- ``docs/bench-hard-tasks.png``: per-task test accuracy of individual, pretrained, best_static, adamerging, we_moe
  (means over the seeds);
- ``docs/bench-hard-normalized.png``: normalised accuracy of every row (mean ± std over seeds);
- ``docs/bench-hard-routing.png``: WE-MoE's routing weights per routed layer and expert, averaged over each task's
  test inputs, for a WE-MoE built on seed 0 with the parameters of the table's ``we_moe`` row (minutes: it
  adapts the routers again; ``--no-routing`` skips it).

(``bench-hard`` is ``--name``.)

Usage: .venv/bin/python benchmarks/vision_plots.py [--json benchmarks/results/bench-hard.json] [--name bench-hard]
       [--no-routing]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import nbmerge
from nbmerge.workbench import plots
from nbmerge.workbench.bench import BenchResult

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("individual", "pretrained", "zero_shot", "best_static", "adamerging", "adamerging_layer",
         "we_moe_task_batches", "we_moe")


def routing_by_task(pool, params: dict) -> tuple[dict, list[str], list[str]]:
    from nbmerge_plugins.test_time.we_moe.layers import routing_weights

    experts = list(pool.individual_models())
    moe = nbmerge.merge("we_moe", pool.individual_models(), base=pool.base, pool=pool, **params)
    weights = {}
    with torch.inference_mode():
        for task in pool.tasks:
            task.logits(moe.module, task.inputs("test"))
            by_layer = routing_weights(moe.module)
            weights[task.name] = torch.stack([w.mean(0) if w.dim() == 2 else w for w in by_layer.values()]).numpy()
    layers = [path.replace("blocks.", "block ") for path in by_layer]
    return weights, layers, experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "bench-hard.json"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--name", default="bench-hard", help="the plots' file-name prefix")
    parser.add_argument("--no-routing", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    bench = BenchResult.from_json(args.json)
    shown = BenchResult(bench.pool, bench.seeds, [row for row in bench.rows if row.label in SHOWN])
    name = args.name
    plots.accuracy_bars(shown).savefig(out / f"{name}-tasks.png", dpi=90)
    plots.normalized_accuracy(bench).savefig(out / f"{name}-normalized.png", dpi=90)
    print(f"wrote {out / f'{name}-tasks.png'} and {out / f'{name}-normalized.png'}")
    if not args.no_routing:
        torch.set_num_threads(1)
        params = dict(bench.row("we_moe").params[0])
        pool = nbmerge.task_pool(bench.pool, seed=bench.seeds[0])
        weights, layers, experts = routing_by_task(pool, params)
        plots.routing_heatmap(weights, layers, experts).savefig(out / f"{name}-routing.png", dpi=80)
        (out / f"{name}-routing.json").write_text(json.dumps(
            {"params": params, "layers": layers, "experts": experts,
             "weights": {task: w.tolist() for task, w in weights.items()}}))
        print(f"wrote {out / f'{name}-routing.png'}")


if __name__ == "__main__":
    main()
