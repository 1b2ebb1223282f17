"""Reinforced Agent Merging (RAM) and its tensor-local RAM+: average each entry over the models that changed it, and
(RAM+) boost the entries only one model changed, by how much of its change the others share.

With τ_i = θ_i − θ_0, m_i = [|τ_i| > ε] and c = Σ_i m_i per entry:
  ram:         θ = θ_0 + Σ_i m_i τ_i / max(c, 1)            (the mean over the models that changed the entry)
  ramplus_tl:  θ = θ_0 + Σ_i m_i τ_i ([c = 1] λ_i + [c > 1] / c),
               λ_i = 1 + r · clamp(ρ_i, 0, α), ρ_i = #(m_i ∧ c > 1) / max(#(m_i ∧ c = 1), ε) over the tensor.
As mergekit 0.1.5's ``ram`` and ``ramplus_tl``.
"""

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, TensorJob

EPSILON = Param("epsilon", "float", 1e-5, "ε: a task-vector entry counts as changed where its magnitude exceeds ε",
                low=0.0)
R = Param("r", "float", 0.1, "r: how strongly a model's shared fraction boosts its unique entries", low=0.0)
ALPHA = Param("alpha", "float", 0.2, "α: the cap on the shared-to-unique ratio ρ", low=0.0)


def _changed(job: TensorJob) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ as models × entries, m, c) in float32."""
    job = job.upcast()
    base = job.base.reshape(-1)
    offsets = torch.stack([model.reshape(-1) - base for model in job.models])
    changed = offsets.abs() > job.params["epsilon"]
    return offsets, changed, changed.sum(0)


def _ram(job: TensorJob) -> torch.Tensor:
    offsets, changed, count = _changed(job)
    merged = (offsets * changed).sum(0) / count.clamp(min=1)
    return (job.upcast().base.reshape(-1) + merged).reshape(job.base.shape)


def _ramplus_tl(job: TensorJob) -> torch.Tensor:
    offsets, changed, count = _changed(job)
    params = job.params
    unique, shared = count == 1, count > 1
    ratio = (changed & shared).sum(1) / (changed & unique).sum(1).clamp(min=params["epsilon"])
    boost = 1 + params["r"] * ratio.clamp(min=0, max=params["alpha"])
    kept = offsets * changed
    merged = (kept * unique * boost.unsqueeze(-1) + kept * shared / count.clamp(min=1)).sum(0)
    return (job.upcast().base.reshape(-1) + merged).reshape(job.base.shape)


RAM = MergeMethod(
    name="ram",
    summary="RAM: each entry's task vectors averaged over the models that changed it",
    formula="θ = θ_0 + Σ_i m_i τ_i / max(Σ_i m_i, 1), m_i = [|τ_i| > ε]",
    params=(EPSILON,),
    merge_tensor=_ram,
    min_models=1,
    base=BASE_REQUIRED,
    elementwise=True,
)

RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    summary="RAM+ (tensor-local): RAM with each model's unique entries boosted by its shared fraction",
    formula="θ = θ_0 + Σ_i m_i τ_i ([c = 1] λ_i + [c > 1] / c), λ_i = 1 + r clamp(ρ_i, 0, α)",
    params=(R, ALPHA, EPSILON),
    merge_tensor=_ramplus_tl,
    min_models=1,
    base=BASE_REQUIRED,
)


@hookimpl
def register_merge_methods(register):
    register(RAM)
    register(RAMPLUS_TL)
