#!/usr/bin/env python
"""Add the multi-task oracle-routing ceiling to a ta8-text bench table: each task evaluated with every WE-MoE
router emitting that task's one-hot vector, so each MLP is that task's own fine-tuned MLP (W_0 + τ_task) and every
other tensor is task arithmetic with λ₀ = 0.3, exactly as in we_moe. No router of this architecture does better
on average than this, so it is WE-MoE's ceiling on the pool.

Usage: .venv/bin/python benchmarks/ta8_oracle.py SEED [--pool ta8-text] [--json PATH]
       (default PATH: benchmarks/results/bench-ta8-seed<SEED>.json; the row ``oracle_routing`` is added or replaced)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import nbmerge
from nbmerge.workbench.bench import BenchResult, BenchRow
from nbmerge.workbench.evaluation import EvalReport, individual_accuracy

RESULTS = Path(__file__).resolve().parent / "results"


def oracle_routing(pool, init_lambda: float = 0.3) -> EvalReport:
    from nbmerge_plugins.test_time.we_moe.layers import routed_blocks

    models = pool.individual_models()
    result = nbmerge.merge("we_moe", models, base=pool.base, pool=pool, steps=0, init_lambda=init_lambda,
                           router_hidden_layers=0, progress=False)
    accuracy, examples, predicted = {}, {}, {}
    for task in pool.tasks:
        index = list(models).index(task.name)
        with torch.no_grad():
            for block in routed_blocks(result.module).values():
                block.router.constant.copy_(torch.nn.functional.one_hot(torch.tensor(index), len(models)))
        labels, predictions = task.labels("test"), task.predict(result.module, "test")
        accuracy[task.name] = 100.0 * (predictions == labels).double().mean().item()
        examples[task.name] = len(labels)
        predicted[task.name] = torch.bincount(predictions, minlength=len(task.classes)).tolist()
    return EvalReport("oracle_routing", pool.name, "test", accuracy, examples,
                      individual_accuracy(pool, "test", list(accuracy)), predicted=predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("--pool", default="ta8-text")
    parser.add_argument("--json")
    args = parser.parse_args()
    path = Path(args.json or RESULTS / f"bench-ta8-seed{args.seed}.json")
    table = BenchResult.from_json(path)
    table.check_addable(args.pool, [args.seed])
    torch.set_num_threads(1)
    report = oracle_routing(nbmerge.task_pool(args.pool, seed=args.seed, progress=False))
    row = BenchRow("oracle_routing", "we_moe", [{"routing": "each task's one-hot", "init_lambda": 0.3}], [report])
    table.rows = [r for r in table.rows if r.label != "oracle_routing"] + [row]
    table.to_json(path)
    print(table)


if __name__ == "__main__":
    main()
