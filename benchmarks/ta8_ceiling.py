#!/usr/bin/env python
"""Add the labelled ceiling of layer-wise AdaMerging to a ta8-text bench table.

The merge is layer-wise AdaMerging's, θ = θ₀ + Σ_k λ_k^g τ_k with one λ per task and tensor, starting at λ₀ = 0.3
(``nbmerge_plugins.test_time.adamerging.AdaMergedModule``). Its coefficients are trained by Adam (lr 1e-3, 16
inputs per task per step, the per-task losses summed, as AdaMerging) on the cross-entropy of each task's
*labelled validation* split instead of the entropy of unlabeled test inputs, then the merge is scored once on
test. An unlabeled objective picks these coefficients without labels, so it does no better than labels do (up to
the optimisation and the validation-test shift): the row bounds what layer-wise AdaMerging can reach on the pool.
It is a diagnostic, named apart from the headline rows, which use no labels.

Usage: .venv/bin/python benchmarks/ta8_ceiling.py SEED [--pool ta8-text] [--steps 300] [--json PATH]
       (default PATH: benchmarks/results/bench-ta8-seed<SEED>.json; the row is added or replaced)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import nbmerge
from nbmerge.workbench.bench import BenchResult, BenchRow
from nbmerge.workbench.evaluation import EvalReport

RESULTS = Path(__file__).resolve().parent / "results"
ROW = "adamerging_layer (labelled ceiling)"


def labelled_batches(task, split: str, batch_size: int, seed: int):
    """Endless (inputs, labels) batches of ``split``: AdaMerging's own batching (``shuffled_batches``: a fresh
    seeded permutation each epoch) drawn over the examples' indices, so each batch keeps its labels."""
    from nbmerge_plugins.test_time._test_time import shuffled_batches

    inputs, labels = task.inputs(split), task.labels(split)
    for chosen in shuffled_batches(range(len(inputs)), batch_size, seed):
        yield [inputs[i] for i in chosen], labels[chosen]


def labelled_ceiling(pool, steps: int, lr: float = 1e-3, batch_size: int = 16, init_lambda: float = 0.3,
                     progress: bool = True) -> tuple[EvalReport, list[float]]:
    """(the test report of the merge trained on validation labels, the summed loss per step)."""
    from tqdm.auto import tqdm

    from nbmerge_plugins.test_time.adamerging import AdaMergedModule

    models = {name: pool.load_encoder(model) for name, model in pool.individual_models().items()}
    merging = AdaMergedModule(pool.load_encoder(pool.base), models, "tensor", init_lambda)
    optimizer = torch.optim.Adam([merging.coefficients], lr=lr)
    streams = {task.name: labelled_batches(task, "validation", batch_size, index)
               for index, task in enumerate(pool.tasks)}
    losses = []
    for _ in tqdm(range(steps), desc="labelled ceiling", unit="step", disable=not progress):
        optimizer.zero_grad()
        total = 0.0
        for task in pool.tasks:  # one backward per task: the summed gradient, one task's activations at a time
            inputs, labels = next(streams[task.name])
            loss = F.cross_entropy(task.logits(merging, inputs), labels)
            loss.backward()
            total += loss.item()
        optimizer.step()
        losses.append(total)
    return nbmerge.evaluate(merging.merged_module(), pool, name=ROW, progress=False), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("--pool", default="ta8-text")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    path = Path(args.json or RESULTS / f"bench-ta8-seed{args.seed}.json")
    BenchResult.from_json(path).check_addable(args.pool, [args.seed])
    torch.set_num_threads(1)
    started = time.perf_counter()
    report, losses = labelled_ceiling(nbmerge.task_pool(args.pool, seed=args.seed, progress=False), args.steps,
                                      progress=not args.quiet)
    row = BenchRow(ROW, "adamerging", [{"granularity": "tensor", "init_lambda": 0.3, "lr": 1e-3,
                                        "steps": args.steps, "objective": "cross-entropy, validation labels"}],
                   [report])
    table = BenchResult.from_json(path)  # read again: another stage may have added rows meanwhile
    table.rows = [r for r in table.rows if r.label != ROW] + [row]
    table.to_json(path)
    print(table)
    print(f"summed loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f} (last 20 steps); "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
