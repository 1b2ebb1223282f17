#!/usr/bin/env python
"""The hard workbench's plots, from ``benchmarks/results/bench-hard.json`` (written by ``nbmerge bench``):

- ``docs/bench-hard-tasks.png``: per-task test accuracy of individual, pretrained, best_static, adamerging, we_moe
  (means over the seeds);
- ``docs/bench-hard-normalized.png``: normalised accuracy of every row (mean ± std over seeds);
- ``docs/bench-hard-routing.png``: WE-MoE's routing weights per routed layer and expert, averaged over each task's
  test inputs, for a WE-MoE built on seed 0 with the parameters of the table's ``we_moe`` row (minutes: it
  adapts the routers again; ``--no-routing`` skips it).

Usage: .venv/bin/python benchmarks/vision_plots.py [--json benchmarks/results/bench-hard.json] [--no-routing]
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
SHOWN = ("individual", "pretrained", "best_static", "adamerging", "we_moe")


def routing_by_task(pool, params: dict) -> tuple[dict, list[str], list[str]]:
    from nbmerge_plugins.we_moe.layers import routing_weights

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
    parser.add_argument("--no-routing", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    bench = BenchResult.from_json(args.json)
    shown = BenchResult(bench.pool, bench.seeds, [row for row in bench.rows if row.label in SHOWN])
    plots.accuracy_bars(shown).savefig(out / "bench-hard-tasks.png", dpi=90)
    plots.normalized_accuracy(bench).savefig(out / "bench-hard-normalized.png", dpi=90)
    print(f"wrote {out / 'bench-hard-tasks.png'} and {out / 'bench-hard-normalized.png'}")
    if not args.no_routing:
        torch.set_num_threads(1)
        params = dict(bench.row("we_moe").params[0])
        pool = nbmerge.task_pool(bench.pool, seed=bench.seeds[0])
        weights, layers, experts = routing_by_task(pool, params)
        plots.routing_heatmap(weights, layers, experts).savefig(out / "bench-hard-routing.png", dpi=80)
        (out / "bench-hard-routing.json").write_text(json.dumps(
            {"params": params, "layers": layers, "experts": experts,
             "weights": {task: w.tolist() for task, w in weights.items()}}))
        print(f"wrote {out / 'bench-hard-routing.png'}")


if __name__ == "__main__":
    main()
