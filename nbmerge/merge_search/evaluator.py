"""Scoring candidate merges: merge in memory from models loaded once, then the pool's validation accuracy.

A ``CandidateEvaluator`` opens a task pool, reads the pool's base and individual models (and any ``extra_models``,
e.g. an earlier search's merge) into memory once, and for each candidate merges them in memory — no disk writes,
no re-reading inputs — and returns (fitness = mean validation accuracy over the pool's tasks in %, merge seconds,
evaluation seconds). A candidate is a method's parameters (parameter space) or ``{"data_flow": [[model, layer,
scale], ...]}``, a layer stack built with ``nbmerge.stack`` (data-flow space). The same class runs in the driver
(``workers=0``) or as a Ray actor, one per worker, each holding its own copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class EvaluatorSpec:
    """Everything an evaluator needs to rebuild its state in another process: the pool, its options, the method."""

    pool: str
    method: str
    pool_options: dict = field(default_factory=dict)
    split: str = "validation"
    threads: int = 0  # torch threads for merging and evaluating; 0: torch's default (every core)
    extra_models: dict = field(default_factory=dict)  # name -> path, beside the pool's individual models


def read_state(model: Any) -> dict[str, torch.Tensor]:
    """A model (path, state dict) read fully into memory."""
    from nbmerge.io.sources import open_model

    source = open_model(model, str(model))
    try:
        return {name: source.read(name).clone() for name in source.infos}
    finally:
        source.close()


class CandidateEvaluator:
    def __init__(self, spec: EvaluatorSpec):
        from nbmerge.plugins import task_pool

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.pool = task_pool(spec.pool, progress=False, **spec.pool_options)
        models = {name: read_state(path) for name, path in self.pool.individual_models().items()}
        base = read_state(self.pool.base)
        # tensors no fine-tune changed (frozen embeddings, say): a method with a base merges them to the base's
        # value (θ_0 + f(τ = 0) = θ_0), so they are set aside once instead of merged per candidate
        self.unchanged = {name: tensor for name, tensor in base.items()
                          if all(name in m and torch.equal(m[name], tensor) for m in models.values())}
        self.models = {task: {k: v for k, v in m.items() if k not in self.unchanged} for task, m in models.items()}
        self.base = {k: v for k, v in base.items() if k not in self.unchanged}
        self._full = {task: {**self.unchanged, **m} for task, m in self.models.items()}
        self._flow_sources = {**self._full, **{name: read_state(path) for name, path in spec.extra_models.items()}}
        self._full_base = {**self.unchanged, **self.base}
        self._checked: dict[str, bool] = {}

    def merged(self, params: dict, method: str | None = None, models: list[str] | None = None) -> dict:
        """The in-memory merge of ``models`` (default: all) with ``method`` (default: the search's)."""
        from nbmerge.api import merge
        from nbmerge.method import BASE_REQUIRED, BASE_UNUSED
        from nbmerge.plugins import get_method

        merge_method = method or self.spec.method
        names = models or list(self.models)
        if get_method(merge_method).base == BASE_REQUIRED and self._keeps_unchanged(merge_method, params):
            chosen = {name: self.models[name] for name in names}
            merged = merge(merge_method, chosen, base=self.base, progress=False, **params).state_dict
            return {**self.unchanged, **merged}
        chosen = {name: self._full[name] for name in names}
        base = None if get_method(merge_method).base == BASE_UNUSED else self._full_base
        return merge(merge_method, chosen, base=base, progress=False, **params).state_dict

    def flow_state(self, flow: list) -> dict:
        """The layer stack of a data flow ([[model, layer, scale], ...]) over the models in memory."""
        from nbmerge.errors import ParameterError
        from nbmerge.layer_stack import LayerSlice, stack
        from nbmerge.merge_search.data_flow import branch_scale, flow_slices

        if not flow:
            raise ParameterError("search_data_flow: the candidate includes no layer")
        unknown = sorted({model for model, _, _ in flow} - set(self._flow_sources))
        if unknown:
            raise ParameterError(f"search_data_flow: no model {', '.join(unknown)} (the models: "
                                 f"{', '.join(self._flow_sources)})")
        slices = [LayerSlice({piece["model"]: self._flow_sources[piece["model"]]}, tuple(piece["layers"]),
                             params=branch_scale(piece["scale"], self.branch_outputs()))
                  for piece in flow_slices(flow)]
        return stack(slices, progress=False).state_dict

    def state_of(self, candidate: dict, method: str | None = None, models: list[str] | None = None) -> dict:
        """A candidate's merged state: a data flow's layer stack, or the merge of the method's parameters."""
        if "data_flow" in candidate:
            return self.flow_state(candidate["data_flow"])
        return self.merged(candidate, method, models)

    def _keeps_unchanged(self, method: str, params: dict) -> bool:
        """Whether ``method`` merges tensors no model changed to the base's value: checked once per method on the
        smallest such tensor (a plugin for which θ_0 + f(0) ≠ θ_0 then merges every tensor every time)."""
        from nbmerge.api import merge

        if method not in self._checked:
            if not self.unchanged:
                self._checked[method] = True
            else:
                name = min(self.unchanged, key=lambda k: self.unchanged[k].numel())
                probe = {task: {name: self.unchanged[name]} for task in self.models}
                merged = merge(method, probe, base={name: self.unchanged[name]}, progress=False, **params)
                self._checked[method] = torch.equal(merged.state_dict[name], self.unchanged[name])
        return self._checked[method]

    def accuracy(self, state: dict, split: str | None = None) -> float:
        from nbmerge.workbench.evaluation import task_accuracy

        encoder = self.pool.load_encoder(state)
        scores = [task_accuracy(encoder, task, split or self.spec.split)[0] for task in self.pool.tasks]
        return sum(scores) / len(scores)

    def score(self, params: dict, method: str | None = None, models: list[str] | None = None) -> tuple:
        """(fitness %, merge seconds, evaluation seconds) of one candidate; a candidate the method refuses scores
        0 (with its error) so that the search moves away from it."""
        from nbmerge.errors import NBMergeError

        started = time.perf_counter()
        try:
            state = self.state_of(params, method, models)
        except NBMergeError as exc:
            return 0.0, time.perf_counter() - started, 0.0, str(exc)
        merged_at = time.perf_counter()
        fitness = self.accuracy(state)
        return fitness, merged_at - started, time.perf_counter() - merged_at, None

    def model_names(self) -> list[str]:
        return list(self.models)

    def flow_model_names(self) -> list[str]:
        """The models a data flow may take layers from (the pool's, then the extra ones)."""
        from nbmerge.errors import ParameterError

        if not self.pool.any_depth:
            raise ParameterError(f"search_data_flow: task pool {self.spec.pool!r} loads encoders of one fixed "
                                 f"layer structure only (its load_encoder takes no layer stack); use a text pool "
                                 f"such as minilm-tiny")
        return list(self._flow_sources)

    def branch_outputs(self) -> list[str]:
        """Which of the known output-projection names (data_flow.BRANCH_OUTPUTS) this pool's tensors have."""
        from nbmerge.merge_search.data_flow import BRANCH_OUTPUTS

        return [part for part in BRANCH_OUTPUTS if any(part in name for name in self._full_base)]

    def layer_count(self) -> int:
        from nbmerge.method.tensor_names import count_layers

        return count_layers(self._full_base)

    def task_accuracies(self, params: dict, split: str, method: str | None = None,
                        models: list[str] | None = None) -> dict[str, float]:
        """Accuracy (%) per task of one candidate's merge on ``split``."""
        from nbmerge.workbench.evaluation import task_accuracy

        encoder = self.pool.load_encoder(self.state_of(params, method, models))
        return {task.name: task_accuracy(encoder, task, split)[0] for task in self.pool.tasks}

    def soup_accuracy(self, models: list[str], split: str | None = None) -> float:
        """Mean accuracy of the uniform average of ``models`` (one model: that model) on ``split``."""
        state = self._full[models[0]] if len(models) == 1 else self.merged({}, "simple_average", models)
        return self.accuracy(state, split)

    def paths(self) -> tuple[dict[str, str], str]:
        """The pool's individual models (and the extra ones) and base as paths (for a recipe that reruns the
        merge)."""
        return ({**{name: str(path) for name, path in self.pool.individual_models().items()},
                 **{name: str(path) for name, path in self.spec.extra_models.items()}}, str(self.pool.base))
