"""Passthrough: one model's tensors as they are, optionally scaled: θ = s · θ_1 (s = ``scale``, default 1).

The building block of layer stacking (``nbmerge.stack``, mergekit's ``passthrough`` slices): each slice passes
one model's layers through. ``scale`` may vary over depth or by tensor filter, e.g. 0 for ``o_proj`` and
``down_proj`` to make a duplicated layer an identity (its residual branch then adds nothing).
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_UNUSED, MergeMethod, Param, TensorJob
from nbmerge_plugins._mergekit_arithmetic import passthrough as mergekit_passthrough

SCALE = Param("scale", "float", 1.0, "s, the factor applied to every tensor (a number, anchors over depth or "
              "per-filter entries)")


def _passthrough(job: TensorJob) -> torch.Tensor:
    scale = job.params["scale"]
    return job.models[0] if scale == 1.0 else job.upcast().models[0] * scale


PASSTHROUGH = MergeMethod(
    name="passthrough",
    summary="Passthrough: one model's tensors unchanged (or scaled); the slices of a layer stack",
    formula="θ = s · θ_1",
    params=(SCALE,),
    merge_tensor=_passthrough,
    min_models=1,
    max_models=1,
    base=BASE_UNUSED,
    elementwise=True,
    stored_inputs=True,
    mergekit_tensor=lambda job: mergekit_passthrough(job.models[0], job.params["scale"]),
)


@hookimpl
def register_merge_methods(register):
    register(PASSTHROUGH)
