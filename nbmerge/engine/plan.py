"""The merge plan: every check that can run on headers alone, done before any tensor data is read.

For each output tensor the plan says how it is produced:
  - ``merge``: the method's kernel over the models' tensors (floating point, same shape everywhere);
  - ``base``: taken unmerged from the base, because the method says so (e.g. backbone-only);
  - ``exact``: a non-floating tensor (integer buffer), copied from the base or the first model once every model
    is checked to hold the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nbmerge.errors import ModelInputError, shown
from nbmerge.io.sources import ModelSource, TensorInfo
from nbmerge.method.declaration import MergeMethod
from nbmerge.method.tensor_names import count_layers, layer_index

MERGE, BASE, EXACT = "merge", "base", "exact"
_SHOWN = 5


@dataclass(frozen=True)
class TensorPlan:
    name: str
    route: str
    info: TensorInfo  # of the reference model (base, else first model)
    out_dtype: torch.dtype
    compute_dtype: torch.dtype  # float32, or float64 when an input is float64; or the merge's given compute dtype
    layer: int | None
    read_bytes: int  # bytes read from all inputs to produce this tensor


@dataclass(frozen=True)
class MergePlan:
    tensors: list[TensorPlan]
    num_layers: int
    mergekit_arithmetic: bool = False  # a compute dtype was given: the method's mergekit_tensor runs

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.route == MERGE]

    @property
    def wide(self) -> bool:
        """Some merged tensor is computed in float64."""
        return any(t.compute_dtype == torch.float64 for t in self.merged)

    def bytes_for(self, route: str | None = None) -> int:
        return sum(t.read_bytes for t in self.tensors if route is None or t.route == route)

    @property
    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, output dtype, shape) of every output tensor, in the order they are produced."""
        return [(t.name, t.out_dtype, t.info.shape) for t in self.tensors]

    @property
    def out_bytes(self) -> int:
        return sum(t.out_dtype.itemsize * t.info.numel for t in self.tensors)


def make_plan(method: MergeMethod, params: dict, models: list[ModelSource], base: ModelSource | None,
              out_dtype: torch.dtype | None, compute_dtype: torch.dtype | str | None = None) -> MergePlan:
    """The plan; ``compute_dtype`` (a dtype, or "inputs": each tensor's inputs' promoted dtype, as mergekit computes
    a recipe without ``dtype``) selects mergekit's arithmetic, and is then also the output dtype unless
    ``out_dtype`` is given."""
    reference = base if base is not None else models[0]
    _check_same_keys(method, params, models, base, reference)
    names = list(reference.infos)
    tensors = []
    for name in names:
        info = reference.infos[name]
        if method.copies_from_base is not None and method.copies_from_base(name, params):
            route, inputs = BASE, [reference]
        else:
            route = MERGE if info.dtype.is_floating_point else EXACT
            _check_compatible(name, info, route, models, reference)
            inputs = models + ([base] if base is not None else [])
        read_bytes = sum(src.infos[name].nbytes for src in inputs)
        wide = any(src.infos[name].dtype == torch.float64 for src in inputs)
        compute = torch.float64 if wide else torch.float32
        if compute_dtype is not None and route == MERGE:
            compute = _promoted([src.infos[name].dtype for src in inputs]) if compute_dtype == "inputs" \
                else compute_dtype
        stored = out_dtype or (compute if compute_dtype is not None and route == MERGE else None)
        dtype = stored if (stored is not None and info.dtype.is_floating_point) else info.dtype
        tensors.append(TensorPlan(name, route, info, dtype, compute, layer_index(name), read_bytes))
    return MergePlan(tensors, count_layers(names), compute_dtype is not None)


def _promoted(dtypes: list[torch.dtype]) -> torch.dtype:
    promoted = dtypes[0]
    for dtype in dtypes[1:]:
        promoted = torch.promote_types(promoted, dtype)
    return promoted


def _check_same_keys(method, params, models, base, reference) -> None:
    wanted = set(reference.infos)
    for source in models + ([base] if base is not None else []):
        if source is reference:
            continue
        have = set(source.infos)
        extra = sorted(have - wanted)
        missing = sorted(n for n in wanted - have
                         if not (method.copies_from_base is not None and method.copies_from_base(n, params)))
        if missing:
            raise ModelInputError(f"{source.label} lacks {len(missing)} tensor(s) that {reference.label} has: "
                                  f"{_names(missing)}")
        if extra:
            raise ModelInputError(f"{source.label} has {len(extra)} tensor(s) that {reference.label} lacks: "
                                  f"{_names(extra)}")


def _check_compatible(name: str, info: TensorInfo, route: str, models: list[ModelSource],
                      reference: ModelSource) -> None:
    for source in models:
        other = source.infos[name]
        if other.shape != info.shape:
            raise ModelInputError(f"tensor {shown(name)}: shape {list(other.shape)} in {source.label} but "
                                  f"{list(info.shape)} in {reference.label}")
        if route == MERGE and not other.dtype.is_floating_point:
            raise ModelInputError(f"tensor {shown(name)}: {other.dtype} in {source.label} but {info.dtype} in "
                                  f"{reference.label}; a floating tensor cannot be merged with an integer one")
        if route == EXACT and other.dtype != info.dtype:
            raise ModelInputError(f"tensor {shown(name)}: {other.dtype} in {source.label} but {info.dtype} in "
                                  f"{reference.label}; non-floating tensors are copied and must match exactly")


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
