"""Statistics of task vectors τ_i = θ_i − θ_0, streamed tensor by tensor (one tensor of each model in memory).

- ``cosine_matrix``: C_ij = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖) over the whole model (all floating tensors flattened).
- ``layer_statistics``: per transformer layer ℓ, the sign-conflict fraction — among the entries of ℓ where at least
  two task vectors are non-zero, the fraction where both a positive and a negative entry occur — and each
  model's delta norm ‖τ_i restricted to ℓ‖₂. Tensors outside the layer stack are grouped as layer ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from nbmerge.errors import ModelInputError
from nbmerge.io.sources import ModelSource, open_model
from nbmerge.method.tensor_names import layer_index
from nbmerge.results import labelled_models


@dataclass(frozen=True)
class LayerStatistics:
    """Per layer (index, or None for tensors outside the layer stack): conflict fraction and each model's ‖τ‖."""

    layers: list[int | None]
    conflict_fraction: list[float]
    delta_norms: dict[str, list[float]]


def _stream_task_vectors(models, base):
    """Yield (tensor name, [τ_i in float64]) for every floating tensor the models share with the base."""
    labelled = labelled_models(models)
    sources: list[ModelSource] = []
    try:
        sources = [open_model(model, label) for label, model in labelled]
        base_source = open_model(base, "base")
        sources.append(base_source)
        for name, info in base_source.infos.items():
            if not info.dtype.is_floating_point:
                continue
            for source in sources[:-1]:
                if name not in source.infos or source.infos[name].shape != info.shape:
                    raise ModelInputError(f"tensor {name!r} is missing or has another shape in {source.label!r}")
            base_tensor = base_source.read(name).to(torch.float64)
            yield name, [source.read(name).to(torch.float64) - base_tensor for source in sources[:-1]]
    finally:
        for source in sources:
            source.close()


def cosine_matrix(models: Sequence[Any] | Mapping[str, Any], base: Any) -> tuple[list[str], torch.Tensor]:
    """(model labels, n×n cosine similarities of their task vectors over the whole model)."""
    labels = [label for label, _ in labelled_models(models)]
    gram = torch.zeros(len(labels), len(labels), dtype=torch.float64)
    for _, task_vectors in _stream_task_vectors(models, base):
        flat = torch.stack([t.reshape(-1) for t in task_vectors])
        gram += flat @ flat.T
    norms = gram.diagonal().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return labels, gram / norms[:, None] / norms[None, :]


def layer_statistics(models: Sequence[Any] | Mapping[str, Any], base: Any) -> LayerStatistics:
    labels = [label for label, _ in labelled_models(models)]
    conflicts: dict[int | None, list[int]] = {}
    squares: dict[int | None, torch.Tensor] = {}
    for name, task_vectors in _stream_task_vectors(models, base):
        layer = layer_index(name)
        stacked = torch.stack([t.reshape(-1) for t in task_vectors])
        shared = (stacked != 0).sum(0) >= 2
        mixed = (stacked > 0).any(0) & (stacked < 0).any(0)
        counts = conflicts.setdefault(layer, [0, 0])
        counts[0] += int((mixed & shared).sum())
        counts[1] += int(shared.sum())
        squares[layer] = squares.get(layer, torch.zeros(len(labels), dtype=torch.float64)) + stacked.square().sum(1)
    layers = sorted(conflicts, key=lambda x: (x is None, x if x is not None else 0))
    return LayerStatistics(
        layers=layers,
        conflict_fraction=[conflicts[layer][0] / conflicts[layer][1] if conflicts[layer][1] else 0.0 for layer in layers],
        delta_norms={label: [float(squares[layer][i].sqrt()) for layer in layers] for i, label in enumerate(labels)},
    )
