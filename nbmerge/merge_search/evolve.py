"""CMA-ES over a search space (Hansen's evolution strategy, the ``cmaes`` package), one generation at a time.

A space with a starting point worth scoring (a data flow's start model) scores it first, recorded as a
generation of its own that the optimizer is not told. Each generation the optimizer proposes λ genomes in [0, 1]^d (``population``, default 4 + ⌊3 ln d⌋); the workers
score their merges; the optimizer is told −fitness (it minimises). Start: the space's initial mean (its centre,
0.5 each, or a data flow's start model) with step size ``sigma``. After every generation the checkpoint is rewritten and ``on_generation(generations)`` is called;
a set ``cancel`` event stops the search between generations (what finished is kept).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from nbmerge.merge_search import checkpoint
from nbmerge.merge_search.checkpoint import Generation
from nbmerge.merge_search.data_flow import DataFlowSpace
from nbmerge.merge_search.space import SearchSpace
from nbmerge.merge_search.workers import Workers


def optimizer(mean: np.ndarray, population: int | None, sigma: float, seed: int):
    from cmaes import CMA

    bounds = np.array([[0.0, 1.0]] * len(mean))
    return CMA(mean=mean, sigma=sigma, bounds=bounds, seed=seed, population_size=population)


def evolve(space: SearchSpace | DataFlowSpace, workers: Workers, generations: int, population: int | None, sigma: float, seed: int,
           config: dict, checkpoint_path: Path | None = None,
           on_generation: Callable[[list[Generation]], None] | None = None,
           cancel: threading.Event | None = None) -> list[Generation]:
    cma = optimizer(space.initial_mean(), population, sigma, seed)
    done = checkpoint.load(checkpoint_path, config)
    start = space.start_genome()
    if start is not None and not done:
        started = time.perf_counter()
        fitness, merge_s, eval_s, error = workers.score_all([space.candidate(start)])[0]
        done.append(Generation([list(map(float, start))], [fitness], [merge_s], [eval_s], [error],
                               time.perf_counter() - started, start=True))
        checkpoint.save(checkpoint_path, config, done)
    for recorded in (g for g in done if not g.start):  # replay: the same asks, the same tells, the same state
        asked = [cma.ask() for _ in range(cma.population_size)]
        if not np.allclose(asked, recorded.genomes, atol=1e-9):
            raise RuntimeError(f"search: replaying checkpoint {checkpoint_path} proposed other candidates than it "
                               f"records (a different cmaes version?); start afresh")
        cma.tell([(np.array(g), -f) for g, f in zip(recorded.genomes, recorded.fitness)])
    while sum(not g.start for g in done) < generations and not (cancel is not None and cancel.is_set()):
        genomes = [cma.ask() for _ in range(cma.population_size)]
        started = time.perf_counter()
        scores = workers.score_all([space.candidate(g) for g in genomes])
        generation = Generation([list(map(float, g)) for g in genomes], [s[0] for s in scores],
                                [s[1] for s in scores], [s[2] for s in scores], [s[3] for s in scores],
                                time.perf_counter() - started)
        cma.tell([(g, -f) for g, f in zip(genomes, generation.fitness)])
        done.append(generation)
        checkpoint.save(checkpoint_path, config, done)
        if on_generation is not None:
            on_generation(done)
    return done
