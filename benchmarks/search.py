#!/usr/bin/env python
"""Merge-search benchmark: evolved recipes (parameter space, data-flow space, both) against the best hand-tuned static
merge, a hand-made layer stack and model soups.

Done-when target (issue 23): on the full profile, the PS-evolved recipe beats the best hand-tuned static merge on
test by more than the seed spread, and per candidate the in-memory merge costs at most 20% of its evaluation.

Per seed (the zoo of ``--pool`` built with that seed; seeds 0 1 2 by default):
  best_static   the best of a hand-tuned grid chosen on validation, scored once on test: task_arithmetic over
                scaling ∈ {0.1 .. 1.0}; ties (tensor scope) over density ∈ {0.1, 0.2, 0.4} × scaling ∈ {0.5, 0.7, 1.0};
  uniform_soup  the average of every model; greedy_soup  Wortsman et al.'s greedy soup (validation-chosen);
  layer_stacked the best of hand-made depth up-scalings of the best static merge (its layers [0, k) then
                [j, L): SOLAR-style frankenmerges built with ``nbmerge.stack``), chosen on validation;
  evolved_ps    ``nbmerge.search``: CMA-ES over TIES's density and weight per model and per block (``--blocks``)
                and one scaling, ``--generations`` × ``--population`` candidates, the best by validation on test;
  evolved_dfs   ``nbmerge.search_data_flow``: CMA-ES over which layers of the individual models (2 repetitions,
                at most 2L layers) with a residual-branch scale each, starting from the best individual model;
  evolved_ps_dfs  the same over evolved_ps's merge and the individual models, starting from evolved_ps's merge;
  individual    no merge: each task under its own fine-tuned model (the ceiling the merges are measured against);
  evolved_ps_oracle  an oracle, not a method (it selects on test): the best test average among evolved_ps's
                ``--oracle-top`` candidates of highest validation fitness, the most any rule choosing among them
                could reach.
best_static also records its fitness's binomial standard error, 100 · sqrt(Σ_t p_t (1 − p_t) / n_t) / T over the
T tasks' validation accuracies p_t and sizes n_t: the noise a search that selects on validation can fit.
The PS search keeps its checkpoint in ``--checkpoints`` (seeded and deterministic: a rerun with the same settings
replays it instead of evaluating again). Rows: test average mean and std over seeds, candidates evaluated per
minute, merge and evaluation seconds per candidate. Writes ``--json`` (default benchmarks/results/search.json) and
prints the table.

Usage:
  nice -n 10 .venv/bin/python benchmarks/search.py --pool minilm-tiny --seeds 0 --generations 4    # minutes
  nice -n 10 .venv/bin/python benchmarks/search.py --pool minilm-full --resume   # hours; --resume keeps done seeds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

STACKS = ((4, 2), (5, 1), (6, 3), (6, 5))  # (k, j): layers [0, k) then [j, L) of the best static merge


def static_grid() -> list[tuple[str, dict]]:
    grid = [("task_arithmetic", {"scaling": s / 10}) for s in range(1, 11)]
    grid += [("ties", {"trim_scope": "tensor", "density": d, "scaling": s})
             for d in (0.1, 0.2, 0.4) for s in (0.5, 0.7, 1.0)]
    return grid


def best_static(evaluator) -> dict:
    timings, scored = [], []
    for method, params in static_grid():
        started = time.perf_counter()
        state = evaluator.merged(params, method)
        merged_at = time.perf_counter()
        scored.append((evaluator.accuracy(state), method, params))
        timings.append((merged_at - started, time.perf_counter() - merged_at))
    validation, method, params = max(scored, key=lambda row: row[0])
    test = evaluator.task_accuracies(params, "test", method)
    return {"choice": {"method": method, **params}, "validation": validation, "test": _mean(test.values()),
            "merge_seconds": _mean(t[0] for t in timings), "eval_seconds": _mean(t[1] for t in timings),
            "candidates": len(scored)}


def individual(evaluator) -> dict:
    """Each task under its own fine-tuned model, on validation and test (no merge)."""
    from nbmerge.workbench.evaluation import individual_accuracy

    names = [task.name for task in evaluator.pool.tasks]
    scores = {split: individual_accuracy(evaluator.pool, split, names) for split in ("validation", "test")}
    return {"validation": _mean(scores["validation"].values()), "test": _mean(scores["test"].values()),
            "test_per_task": scores["test"]}


def validation_standard_error(evaluator, choice: dict) -> float:
    """The binomial standard error (points) of the chosen static merge's validation fitness (see the docstring)."""
    params = {key: value for key, value in choice.items() if key != "method"}
    accuracies = evaluator.task_accuracies(params, "validation", choice["method"])
    variance = sum((p / 100) * (1 - p / 100) / len(task.labels("validation"))
                   for task in evaluator.pool.tasks for p in [accuracies[task.name]])
    return 100 * variance ** 0.5 / len(evaluator.pool.tasks)


def layer_stacked(evaluator, choice: dict) -> dict:
    """Depth up-scalings of the static merge: its layers [0, k) then [j, L), chosen on validation."""
    from nbmerge.layer_stack import LayerSlice, stack

    params = {key: value for key, value in choice.items() if key != "method"}
    merged = evaluator.merged(params, choice["method"])
    depth = evaluator.layer_count()
    scored = []
    for k, j in STACKS:
        if k > depth or j >= depth:
            continue
        state = stack([LayerSlice({"static": merged}, (0, k)), LayerSlice({"static": merged}, (j, depth))],
                      progress=False).state_dict
        scored.append((evaluator.accuracy(state), k, j, state))
    validation, k, j, state = max(scored, key=lambda row: row[0])
    test = evaluator.accuracy(state, "test")
    return {"choice": {"static": choice, "layers": [[0, k], [j, depth]]}, "validation": validation, "test": test,
            "candidates": len(scored)}


def ps_search(args, seed: int):
    """The evolved_ps search of ``seed`` (replayed from its checkpoint where one was written)."""
    import nbmerge

    checkpoint = Path(args.checkpoints) / f"ps-{args.pool}-seed{seed}-g{args.generations}-p{args.population}.json"
    return nbmerge.search(args.pool, "ties", {"density": (0.05, 1.0), "weights": (0.0, 1.5), "scaling": (0.2, 1.5)},
                          blocks=args.blocks, fixed={"trim_scope": "tensor"}, seed=seed,
                          pool_options={"seed": seed}, generations=args.generations, population=args.population,
                          workers=args.workers, checkpoint=checkpoint)


def oracle_row(evaluator, found, top: int) -> dict:
    """The best test average among the ``top`` distinct candidates of ``found`` with the highest validation."""
    ranked = sorted(((fitness, genome) for generation in found.generations
                     for fitness, genome in zip(generation.fitness, generation.genomes)), key=lambda row: -row[0])
    chosen: list[tuple[float, dict]] = []
    for fitness, genome in ranked:
        params = found.space.candidate(genome)
        if params not in [known for _, known in chosen]:
            chosen.append((fitness, params))
        if len(chosen) == top:
            break
    scored = [(_mean(evaluator.task_accuracies(params, "test").values()), fitness, params)
              for fitness, params in chosen]
    best = max(range(len(scored)), key=lambda index: scored[index][0])
    test, validation, params = scored[best]
    return {"validation": validation, "test": test, "rank_by_validation": best + 1,
            "top": top, "tests_of_top": [row[0] for row in scored], "recipe": params}


def searched(found) -> dict:
    return {"validation": found.best_fitness, "test": found.test_average,
            "candidates_per_minute": found.candidates_per_minute, "merge_seconds": found.merge_seconds,
            "eval_seconds": found.eval_seconds, "candidates": found.candidates, "recipe": found.best_params}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--pool", default="minilm-full")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generations", type=int, default=12)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--oracle-top", type=int, default=8)
    parser.add_argument("--checkpoints", default=str(Path(__file__).parent / "results" / "search-checkpoints"))
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "search.json"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the seeds an earlier run with the same settings wrote to --json")
    args = parser.parse_args()

    import nbmerge
    from nbmerge.merge_search.evaluator import CandidateEvaluator, EvaluatorSpec

    per_seed: dict[str, list[dict]] = {name: [] for name in ("best_static", "uniform_soup", "greedy_soup",
                                                              "layer_stacked", "evolved_ps", "evolved_dfs",
                                                              "evolved_ps_dfs", "individual", "evolved_ps_oracle")}
    budget = dict(generations=args.generations, population=args.population, workers=args.workers)
    settings = {"pool": args.pool, "generations": args.generations, "population": args.population,
                "blocks": args.blocks}
    done = _finished_seeds(Path(args.json), settings) if args.resume else {}
    for seed in args.seeds:
        options = {"seed": seed}
        if seed in done:  # --resume: this seed's rows were written by an earlier run with the same settings
            _complete(done[seed], lambda: CandidateEvaluator(EvaluatorSpec(args.pool, "ties", options)),
                      lambda: ps_search(args, seed), args.oracle_top)
            for name, run in done[seed].items():
                per_seed[name].append(run)
            print(f"seed {seed}: taken from {args.json}", flush=True)
            continue
        evaluator = CandidateEvaluator(EvaluatorSpec(args.pool, "ties", options))
        static = best_static(evaluator)
        static["validation_standard_error"] = validation_standard_error(evaluator, static["choice"])
        per_seed["individual"].append(individual(evaluator))
        per_seed["best_static"].append(static)
        per_seed["layer_stacked"].append(layer_stacked(evaluator, static["choice"]))
        soup = nbmerge.greedy_soup(args.pool, workers=args.workers, pool_options=options)
        per_seed["uniform_soup"].append({"validation": soup.uniform_validation, "test": soup.uniform_test})
        per_seed["greedy_soup"].append({"validation": soup.greedy_validation, "test": soup.greedy_test,
                                        "ingredients": soup.ingredients})
        found = ps_search(args, seed)
        per_seed["evolved_ps"].append(searched(found))
        per_seed["evolved_ps_oracle"].append(oracle_row(evaluator, found, args.oracle_top))
        flow = nbmerge.search_data_flow(args.pool, start=soup.order[0], seed=seed, pool_options=options, **budget)
        per_seed["evolved_dfs"].append(searched(flow))
        with tempfile.TemporaryDirectory(prefix="nbmerge-ps-") as scratch:
            ps_merge = found.save_merge(Path(scratch) / "ps").path
            both = nbmerge.search_data_flow(args.pool, extra_models={"ps": ps_merge}, start="ps", seed=seed,
                                            pool_options=options, **budget)
        per_seed["evolved_ps_dfs"].append(searched(both))
        print(f"seed {seed}: " + ", ".join(f"{name} {runs[-1]['test']:.2f}" for name, runs in per_seed.items()),
              flush=True)
        _write(args, settings, per_seed, seeds_done=args.seeds[:len(per_seed["best_static"])])
    if len(done) == len(args.seeds):
        _write(args, settings, per_seed, seeds_done=args.seeds)
    return 0


def _complete(rows: dict[str, dict], make_evaluator, rerun_ps, oracle_top: int) -> None:
    """Add the rows a seed written by an older version of this script lacks. The oracle reruns the PS search: it
    must find the recorded best fitness again (the search is seeded), else the rows would mix two searches."""
    missing_error = "validation_standard_error" not in rows["best_static"]
    if "individual" in rows and "evolved_ps_oracle" in rows and not missing_error:
        return
    evaluator = make_evaluator()
    if "evolved_ps_oracle" not in rows:
        found = rerun_ps()
        if found.best_fitness != rows["evolved_ps"]["validation"]:
            raise SystemExit(f"the PS search rerun found validation {found.best_fitness}, the recorded run "
                             f"{rows['evolved_ps']['validation']}: not the same search")
        rows["evolved_ps_oracle"] = oracle_row(evaluator, found, oracle_top)
    if "individual" not in rows:
        rows["individual"] = individual(evaluator)
    if missing_error:
        rows["best_static"]["validation_standard_error"] = validation_standard_error(
            evaluator, rows["best_static"]["choice"])


def _write(args, settings: dict, per_seed: dict[str, list[dict]], seeds_done: list[int]) -> None:
    """Write the rows over the seeds finished so far (after every seed, so a stopped run keeps them) and print the
    table with the issue's two checks."""
    rows = {}
    for name, runs in per_seed.items():
        tests = [run["test"] for run in runs]
        row = {"test_mean": _mean(tests), "test_std": statistics.pstdev(tests) if len(tests) > 1 else 0.0,
               "per_seed": runs}
        for key in ("merge_seconds", "eval_seconds", "candidates_per_minute"):
            if all(key in run for run in runs):
                row[key] = _mean(run[key] for run in runs)
        rows[name] = row
    static, evolved = rows["best_static"], rows["evolved_ps"]
    spread = max(static["test_std"], evolved["test_std"])
    checks = {"evolved_beats_static_by_more_than_spread": evolved["test_mean"] - static["test_mean"] > spread,
              "merge_at_most_20pct_of_eval": evolved["merge_seconds"] <= 0.2 * evolved["eval_seconds"]}
    errors = [run["validation_standard_error"] for run in per_seed["best_static"]]
    result = {**settings, "seeds": seeds_done, "workers": args.workers, "machine": platform.platform(),
              "rows": rows, "checks": checks,
              "validation_standard_error": _mean(errors)}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'row':17s} {'test mean':>9s} {'std':>6s} {'merge s':>8s} {'eval s':>7s} {'cand/min':>8s}")
    for name, row in rows.items():
        print(f"{name:17s} {row['test_mean']:9.2f} {row['test_std']:6.2f} "
              f"{row.get('merge_seconds', float('nan')):8.2f} "
              f"{row.get('eval_seconds', float('nan')):7.2f} {row.get('candidates_per_minute', float('nan')):8.1f}")
    print(f"validation fitness standard error (binomial, best_static): {_mean(errors):.2f} points")
    print("checks:", json.dumps(checks), flush=True)


def _finished_seeds(path: Path, settings: dict) -> dict[int, dict[str, dict]]:
    """Per seed, the rows an earlier run with the same pool and budget wrote to ``path`` (none if it differs)."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    if any(earlier.get(key) != value for key, value in settings.items()):
        return {}
    return {seed: {name: row["per_seed"][index] for name, row in earlier["rows"].items()}
            for index, seed in enumerate(earlier["seeds"])}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
