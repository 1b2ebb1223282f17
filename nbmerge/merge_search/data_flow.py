"""The data-flow space (Akiba et al. 2024): which layers of which models an input passes through, in what order.

The M models' L layers are laid out in slot order — model 0's layers 0..L−1, then model 1's, and so on — and that
sequence is repeated r times (``repeats``): T = r·M·L slots. Gene t < T includes slot t's layer when g_t ≥ 0.5; the
included slots, in slot order, are the candidate's layers (the first ``max_layers`` of them, default 2L). With
``scales`` = (low, high), gene T + t gives included slot t a residual-branch scale s_t = low + g_{T+t} (high − low):
the layer's output projections (tensors whose names contain one of ``branch_outputs``, weight and bias) are
multiplied by s_t, so the layer adds s_t · f(x) to the residual stream instead of f(x). (The paper scales each
layer's input by a learned factor per pair of models; a branch scale is a plain weight edit, so every candidate is
an ordinary checkpoint that any framework loads.)

A candidate is a layer stack (``nbmerge.stack``): one passthrough slice per run of consecutive layers of one model
with one scale; the embeddings come from the first slice's model and the tensors after the layer stack from the
last slice's. ``SearchResult.recipe()`` writes those slices, so ``%%merge`` rebuilds the candidate exactly.
The search starts at ``start``'s layers in order (slots of its first repetition at 0.5 + ``margin``, every other
slot at 0.5 − ``margin``; scales at 1 where 1 lies in the range), which is scored first, so the best candidate is
never worse on validation than the start model; or at 0.5 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nbmerge.errors import ParameterError

BRANCH_OUTPUTS = ("output.dense", "o_proj", "down_proj")  # BERT's two output projections; LLaMA's


@dataclass(frozen=True)
class DataFlowSpace:
    models: tuple[str, ...]  # the layer sources, in slot order
    layers: int  # L, layers per model
    repeats: int = 2
    scales: tuple[float, float] | None = (0.5, 1.5)
    max_layers: int | None = None
    start: str | None = None
    margin: float = 0.3
    branch_outputs: tuple[str, ...] = BRANCH_OUTPUTS

    def __post_init__(self):
        if not self.models:
            raise ParameterError("search_data_flow: give at least one model whose layers the search may use")
        if len(set(self.models)) != len(self.models):
            raise ParameterError(f"search_data_flow: models must differ, got {list(self.models)}")
        if self.layers < 1 or self.repeats < 1:
            raise ParameterError(f"search_data_flow: layers and repeats must be at least 1, got {self.layers} and "
                                 f"{self.repeats}")
        if self.scales is not None and not self.scales[0] < self.scales[1]:
            raise ParameterError(f"search_data_flow: scales must be (low, high) with low < high, got {self.scales!r}")
        if self.max_layers is not None and self.max_layers < 1:
            raise ParameterError(f"search_data_flow: max_layers must be at least 1, got {self.max_layers}")
        if self.start is not None and self.start not in self.models:
            raise ParameterError(f"search_data_flow: start {self.start!r} is not one of the models "
                                 f"({', '.join(self.models)})")
        if not 0 < self.margin <= 0.5:
            raise ParameterError(f"search_data_flow: margin must lie in (0, 0.5], got {self.margin}")

    @property
    def slots(self) -> int:
        """T = r · M · L."""
        return self.repeats * len(self.models) * self.layers

    @property
    def dimension(self) -> int:
        return self.slots * (2 if self.scales is not None else 1)

    @property
    def layer_cap(self) -> int:
        return self.max_layers or 2 * self.layers

    def slot(self, t: int) -> tuple[str, int]:
        """(model, layer) of slot t."""
        within = t % (len(self.models) * self.layers)
        return self.models[within // self.layers], within % self.layers

    def initial_mean(self) -> np.ndarray:
        mean = np.full(self.dimension, 0.5)
        if self.start is not None:
            first = self.models.index(self.start) * self.layers
            mean[:self.slots] = 0.5 - self.margin
            mean[first:first + self.layers] = 0.5 + self.margin
        if self.scales is not None:
            low, high = self.scales
            mean[self.slots:] = (1.0 - low) / (high - low) if low <= 1.0 <= high else 0.5
        return mean

    def start_genome(self) -> np.ndarray | None:
        """The start model's layers in order (scored before the first generation), or None without a start."""
        return None if self.start is None else self.initial_mean()

    def candidate(self, genome: np.ndarray) -> dict:
        """{"data_flow": [[model, layer, scale], ...]}: the included layers in order (genes clipped to [0, 1])."""
        genome = np.clip(np.asarray(genome, dtype=float), 0.0, 1.0)
        if genome.shape != (self.dimension,):
            raise ParameterError(f"search_data_flow: a genome needs {self.dimension} genes, got {genome.shape}")
        flow = []
        for t in range(self.slots):
            if genome[t] >= 0.5 and len(flow) < self.layer_cap:
                model, layer = self.slot(t)
                scale = 1.0 if self.scales is None else round(
                    float(self.scales[0] + genome[self.slots + t] * (self.scales[1] - self.scales[0])), 6)
                flow.append([model, layer, scale])
        return {"data_flow": flow}

    def describe(self) -> dict:
        return {"space": "data_flow", "models": list(self.models), "layers": self.layers, "repeats": self.repeats,
                "scales": None if self.scales is None else list(self.scales), "max_layers": self.layer_cap,
                "start": self.start, "margin": self.margin, "branch_outputs": list(self.branch_outputs)}


def flow_slices(flow: list) -> list[dict]:
    """The stack slices of a data flow: one {model, layers: [start, end], scale} per run of consecutive layers of
    one model at one scale."""
    slices: list[dict] = []
    for model, layer, scale in flow:
        last = slices[-1] if slices else None
        if last and last["model"] == model and last["layers"][1] == layer and last["scale"] == scale:
            last["layers"][1] = layer + 1
        else:
            slices.append({"model": model, "layers": [layer, layer + 1], "scale": scale})
    return slices


def branch_scale(scale: float, branch_outputs=BRANCH_OUTPUTS) -> dict:
    """Passthrough's parameters for a residual-branch scale: ``scale`` on the output projections, 1 elsewhere."""
    if scale == 1.0:
        return {}
    return {"scale": [{"filter": name, "value": scale} for name in branch_outputs] + [{"value": 1.0}]}
