"""What a parameter-space search varies: a genome x ∈ [0, 1]^d mapped onto a method's parameters.

Each searched parameter p gets a range [low, high]; a parameter the method declares per model gets one value per
model, and with ``blocks`` = B > 1 each such value is B anchors over depth (block b of B at depth b / (B − 1),
interpolated linearly between: the engine's gradients), so TIES can keep more of one model's task vector in the
early layers and less in the late ones. Gene g of the genome gives low + g · (high − low), in the order
(parameter, model, block). ``fixed`` parameters are passed as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from nbmerge.errors import ParameterError
from nbmerge.plugins import get_method


@dataclass(frozen=True)
class SearchSpace:
    method: str
    ranges: dict[str, tuple[float, float]]  # searched parameter -> (low, high)
    n_models: int
    blocks: int = 1
    fixed: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        method = get_method(self.method)
        declared = {p.name: p for p in method.params}
        if not self.ranges:
            raise ParameterError("search: give at least one parameter to search, e.g. {'density': (0.1, 1.0)}")
        for name, bounds in self.ranges.items():
            if name not in declared:
                raise ParameterError(f"search: {self.method} has no parameter {name!r} (its parameters: "
                                     f"{', '.join(declared)})")
            if declared[name].kind not in ("float", "floats", "schedule"):
                raise ParameterError(f"search: {self.method}'s {name!r} is a {declared[name].kind}, not a number")
            low, high = bounds
            if not low < high:
                raise ParameterError(f"search: the range of {name!r} must be (low, high) with low < high, got "
                                     f"{bounds!r}")
        if self.blocks < 1:
            raise ParameterError(f"search: blocks must be at least 1, got {self.blocks}")
        overlap = set(self.ranges) & set(self.fixed)
        if overlap:
            raise ParameterError(f"search: {', '.join(sorted(overlap))} is both searched and fixed")

    def _shape(self, name: str) -> tuple[int, int]:
        """(values, anchors per value) of a searched parameter."""
        per_model = next(p for p in get_method(self.method).params if p.name == name).per_model
        return (self.n_models if per_model else 1), self.blocks

    @property
    def dimension(self) -> int:
        return sum(values * anchors for values, anchors in map(self._shape, self.ranges))

    def initial_mean(self) -> np.ndarray:
        """The centre of the space: 0.5 for every gene."""
        return np.full(self.dimension, 0.5)

    def start_genome(self) -> None:
        """No starting point worth scoring on its own (the centre is a mix of every range)."""
        return None

    def candidate(self, genome: np.ndarray) -> dict[str, Any]:
        """The merge parameters of a genome (each gene clipped to [0, 1])."""
        genome = np.clip(np.asarray(genome, dtype=float), 0.0, 1.0)
        if genome.shape != (self.dimension,):
            raise ParameterError(f"search: a genome of {self.method} needs {self.dimension} genes, got "
                                 f"{genome.shape}")
        params, at = dict(self.fixed), 0
        for name, (low, high) in self.ranges.items():
            values, anchors = self._shape(name)
            genes = genome[at:at + values * anchors].reshape(values, anchors)
            at += values * anchors
            scaled = [[round(float(low + g * (high - low)), 6) for g in row] for row in genes]
            per_value = [row[0] if anchors == 1 else row for row in scaled]
            params[name] = per_value if values > 1 else per_value[0]
        return params

    def describe(self) -> dict:
        return {"space": "parameters", "method": self.method, "ranges": {k: list(v) for k, v in self.ranges.items()},
                "n_models": self.n_models, "blocks": self.blocks, "fixed": dict(self.fixed)}


def space_from(method: str, ranges: Mapping[str, Any], n_models: int, blocks: int = 1,
               fixed: Mapping[str, Any] | None = None) -> SearchSpace:
    """A SearchSpace from plain values (ranges as (low, high) pairs or "low:high" text)."""
    parsed = {}
    for name, bounds in ranges.items():
        if isinstance(bounds, str):
            try:
                low, high = (float(part) for part in bounds.split(":"))
            except ValueError:
                raise ParameterError(f"search: the range of {name!r} must read low:high, got {bounds!r}") from None
        else:
            low, high = (float(v) for v in bounds)
        parsed[name] = (low, high)
    return SearchSpace(method, parsed, n_models, int(blocks), dict(fixed or {}))
