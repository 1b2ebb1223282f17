"""``search`` (CMA-ES over a method's parameters, per model and per block), ``search_data_flow`` (CMA-ES over which
layers of which models, in what order, with what scale) and ``greedy_soup`` on a task pool.

search / search_data_flow: fitness = the mean validation accuracy over the pool's tasks of the in-memory merge a
genome gives; the best candidate of all generations is then scored once on test. Parameter space then data-flow
space (Akiba et al.'s PS+DFS): save the first search's merge (``SearchResult.save_merge``) and give it to
``search_data_flow`` as an extra model to start from. greedy_soup (Wortsman et al. 2022): rank the
pool's models by validation accuracy, start from the best, add each next one to the uniform average only where the
soup's validation accuracy does not drop; also the uniform soup of all. Both run their candidates on ``workers``
Ray actors (0: in this process), on a local cluster or the one at ``address``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Callable, Mapping

from nbmerge.errors import MergeCancelled, ParameterError
from nbmerge.merge_search.checkpoint import Generation
from nbmerge.merge_search.data_flow import DataFlowSpace, branch_scale, flow_slices
from nbmerge.merge_search.evaluator import EvaluatorSpec
from nbmerge.merge_search.evolve import evolve
from nbmerge.merge_search.space import SearchSpace, space_from
from nbmerge.merge_search.workers import Workers


@dataclass(repr=False)
class SearchResult:
    """A finished (or stopped) search: every generation, the best candidate's parameters and scores."""

    pool: str
    space: SearchSpace | DataFlowSpace
    generations: list[Generation]
    best_params: dict  # a method's parameters, or {"data_flow": [[model, layer, scale], ...]}
    best_fitness: float  # validation average, %
    test: dict[str, float]  # the best candidate's test accuracy per task, %
    models: dict[str, str]
    base: str
    seconds: float

    @property
    def test_average(self) -> float:
        return sum(self.test.values()) / len(self.test) if self.test else float("nan")

    @property
    def candidates(self) -> int:
        return sum(len(g.fitness) for g in self.generations)

    @property
    def candidates_per_minute(self) -> float:
        wall = sum(g.wall_seconds for g in self.generations)
        return 60.0 * self.candidates / wall if wall else float("nan")

    @property
    def merge_seconds(self) -> float:
        """Mean in-memory merge time per candidate."""
        return _mean([s for g in self.generations for s in g.merge_seconds])

    @property
    def eval_seconds(self) -> float:
        """Mean evaluation time per candidate."""
        return _mean([s for g in self.generations for s in g.eval_seconds])

    def recipe(self) -> str:
        """The best candidate as an nbmerge recipe (YAML) that ``%%merge`` and ``nbmerge merge --recipe`` run: the
        method's merge, or (data-flow space) the layer stack's slices."""
        import yaml

        if isinstance(self.space, DataFlowSpace):
            slices = [{"models": {piece["model"]: self.models[piece["model"]]}, "layers": piece["layers"],
                       **({"params": branch_scale(piece["scale"], self.space.branch_outputs)}
                          if piece["scale"] != 1.0 else {})}
                      for piece in flow_slices(self.best_params["data_flow"])]
            return yaml.safe_dump({"slices": slices}, sort_keys=False)
        return yaml.safe_dump({"method": self.space.method, "models": self.models, "base": self.base,
                               "params": json.loads(json.dumps(self.best_params))}, sort_keys=False)

    def save_merge(self, out: str | Path, overwrite: bool = False):
        """Write the best candidate's merge to ``out`` (a model folder), e.g. to search its data flow next."""
        from nbmerge.recipes import parse_recipe, run_recipe

        return run_recipe(parse_recipe(self.recipe()), out=out, overwrite=overwrite, progress=False)

    def figure(self):
        from nbmerge.workbench.plots import search_curve

        return search_curve(self.generations)

    def __repr__(self) -> str:
        what = "data flow" if isinstance(self.space, DataFlowSpace) else self.space.method
        return (f"SearchResult({what} on {self.pool}: {len(self.generations)} generations, "
                f"{self.candidates} candidates; best validation {self.best_fitness:.2f}, test "
                f"{self.test_average:.2f})")

    def _repr_html_(self) -> str:
        return (f"<p>{escape(repr(self))}</p><pre>{escape(self.recipe())}</pre>")


@dataclass(repr=False)
class SoupResult:
    """Greedy soup's ingredients in the order tried, the validation accuracy after each, and both soups' test."""

    pool: str
    order: list[str]
    validation: dict[str, float]  # model -> its own validation accuracy
    ingredients: list[str]
    greedy_validation: float
    greedy_test: float
    uniform_validation: float
    uniform_test: float
    steps: list[tuple[str, float, bool]] = field(default_factory=list)  # (model tried, soup accuracy, kept)

    def __repr__(self) -> str:
        return (f"SoupResult(greedy soup of {len(self.ingredients)}/{len(self.order)} models: validation "
                f"{self.greedy_validation:.2f}, test {self.greedy_test:.2f}; uniform soup test {self.uniform_test:.2f})")


def search(pool: str, method: str, ranges: Mapping[str, Any], *, blocks: int = 1,
           fixed: Mapping[str, Any] | None = None, generations: int = 10, population: int | None = None,
           sigma: float = 0.25, seed: int = 0, workers: int = 0, address: str | None = None,
           checkpoint: str | Path | None = None, pool_options: Mapping[str, Any] | None = None,
           on_generation: Callable[[SearchResult], None] | None = None,
           cancel: threading.Event | None = None) -> SearchResult:
    """Evolve ``method``'s parameters on ``pool`` with CMA-ES.

    ranges: searched parameter -> (low, high) (or "low:high"); per-model parameters get one value per model, and
    with ``blocks`` > 1 that many anchors over depth. fixed: parameters passed as they are. checkpoint: a JSON
    file rewritten after every generation; a search started again with the same settings resumes from it.
    on_generation(so_far): after each generation, the SearchResult so far (its ``test`` still empty). A set
    ``cancel`` event stops the search after the generation in progress; the result holds what finished.
    """
    spec = EvaluatorSpec(pool, method, dict(pool_options or {}))
    return _run(spec, lambda workers: space_from(method, ranges, len(workers.call("model_names")), blocks, fixed),
                generations, population, sigma, seed, workers, address, checkpoint, on_generation, cancel)


def search_data_flow(pool: str, *, models: list[str] | None = None, extra_models: Mapping[str, Any] | None = None,
                     start: str | None = None, repeats: int = 2, scales: tuple[float, float] | None = (0.5, 1.5),
                     max_layers: int | None = None, generations: int = 10, population: int | None = None,
                     sigma: float = 0.15, seed: int = 0, workers: int = 0, address: str | None = None,
                     checkpoint: str | Path | None = None, pool_options: Mapping[str, Any] | None = None,
                     on_generation: Callable[[SearchResult], None] | None = None,
                     cancel: threading.Event | None = None) -> SearchResult:
    """Evolve a layer stack on ``pool`` with CMA-ES: which layers of ``models`` (default: the pool's individual
    models, then ``extra_models``) an input passes through, in slot order repeated ``repeats`` times, each with a
    residual-branch scale in ``scales`` (None: no scales), at most ``max_layers`` (default twice the base's).

    extra_models: {name: model folder} besides the pool's (e.g. ``SearchResult.save_merge``'s output); start: the
    model whose layers, in order, the search starts from (default: none, the centre). The other options as in
    ``search``. The result's ``recipe()`` is the stack's slices.
    """
    extras = {name: str(Path(path).expanduser()) for name, path in (extra_models or {}).items()}
    spec = EvaluatorSpec(pool, "passthrough", dict(pool_options or {}), extra_models=extras)

    def space(pool_workers: Workers) -> DataFlowSpace:
        available = pool_workers.call("flow_model_names")
        chosen = list(models) if models is not None else available
        missing = [name for name in chosen if name not in available]
        if missing:
            raise ParameterError(f"search_data_flow: no model {', '.join(missing)} in {pool} (its models and the "
                                 f"extra ones: {', '.join(available)})")
        return DataFlowSpace(tuple(chosen), pool_workers.call("layer_count"), repeats,
                             None if scales is None else (float(scales[0]), float(scales[1])), max_layers, start,
                             branch_outputs=tuple(pool_workers.call("branch_outputs")))

    return _run(spec, space, generations, population, sigma, seed, workers, address, checkpoint, on_generation,
                cancel)


def _run(spec: EvaluatorSpec, make_space, generations, population, sigma, seed, workers, address, checkpoint,
         on_generation, cancel) -> SearchResult:
    """Start the workers, evolve, score the best candidate on test."""
    started = time.perf_counter()
    pool_workers = Workers(spec, workers, address)
    try:
        space = make_space(pool_workers)
        config = {"pool": spec.pool, "pool_options": spec.pool_options, "space": space.describe(),
                  "extra_models": spec.extra_models, "population": population, "sigma": sigma, "seed": seed}
        path = None if checkpoint is None else Path(checkpoint).expanduser()
        models, base = pool_workers.call("paths")

        def so_far(done: list[Generation], test: dict | None = None) -> SearchResult:
            generation, index = max(((g, i) for g in done for i in range(len(g.fitness))),
                                    key=lambda pair: pair[0].fitness[pair[1]])
            return SearchResult(spec.pool, space, list(done), space.candidate(generation.genomes[index]),
                                generation.fitness[index], test or {}, models, base, time.perf_counter() - started)

        done = evolve(space, pool_workers, generations, population, sigma, seed, config, path,
                      None if on_generation is None else lambda done: on_generation(so_far(done)), cancel)
        if not done:
            raise MergeCancelled("search: stopped before the first generation finished")
        result = so_far(done)
        result.test = pool_workers.call("task_accuracies", result.best_params, "test")
    finally:
        pool_workers.close()
    result.seconds = time.perf_counter() - started
    return result


def greedy_soup(pool: str, *, workers: int = 0, address: str | None = None,
                pool_options: Mapping[str, Any] | None = None) -> SoupResult:
    """Greedy and uniform soups of the pool's individual models, chosen on validation, scored on test."""
    pool_workers = Workers(EvaluatorSpec(pool, "simple_average", dict(pool_options or {})), workers, address)
    try:
        names = pool_workers.call("model_names")
        alone = dict(zip(names, _soup_scores(pool_workers, [[name] for name in names], "validation")))
        order = sorted(names, key=lambda name: -alone[name])
        ingredients, best = [order[0]], alone[order[0]]
        steps = [(order[0], best, True)]
        for name in order[1:]:
            score = pool_workers.call("soup_accuracy", ingredients + [name], "validation")
            kept = score >= best
            steps.append((name, score, kept))
            if kept:
                ingredients, best = ingredients + [name], score
        greedy_test, uniform_validation, uniform_test = _soup_scores(
            pool_workers, [ingredients, names, names], "test", splits=["test", "validation", "test"])
    finally:
        pool_workers.close()
    return SoupResult(pool, order, alone, ingredients, best, greedy_test, uniform_validation, uniform_test, steps)


def _soup_scores(pool_workers: Workers, soups: list[list[str]], split: str, splits: list[str] | None = None):
    return [pool_workers.call("soup_accuracy", soup, chosen) for soup, chosen in zip(soups, splits or [split] * len(soups))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
