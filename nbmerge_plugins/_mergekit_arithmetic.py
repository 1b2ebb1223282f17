"""mergekit 0.1.5's arithmetic, op for op, for merges given a compute dtype (``nbmerge.merge(compute_dtype=...)``,
and every mergekit recipe): the same torch operations in the same order, in the same dtypes, so that a published
recipe gives mergekit's tensors bit for bit. nbmerge's own kernels compute in float32 (more accurately, and
faster); these are the plain torch path a recipe's ``dtype`` selects.

The job's inputs arrive in the compute dtype c (mergekit's ``dtype``: the recipe's, else the inputs' promoted
dtype), and each kernel returns its result in c (linear: in c after float32 accumulation):

- ``task_vector_merge`` (task arithmetic, TIES, Breadcrumbs; mergekit's GeneralizedTaskArithmeticMerge):
  δ_i = S_i(θ_i − θ_0) in c, sparsified per model; δ_i ← δ_i · c(w_i); with a consensus, the mask
  m_i = [sign(δ_i) = γ], γ = +1 where Σ_i δ_i ≥ 0 else −1 (or by the count of signs), mixed = Σ_i δ_i m_i and
  divisor = Σ_i w_i m_i (0 → 1); without, mixed = Σ_i δ_i and divisor = Σ_i w_i (|·| < 10⁻⁸ → 1);
  mixed /= divisor when normalizing; mixed *= λ when λ ≠ 1; θ = θ_0 + mixed.
- ``magnitude``: the k = max(1, int(d · N)) entries first in ``argsort(|τ| as float32, descending=True)`` (torch's
  order decides which of equal magnitudes are kept), and ``magnitude_outliers``: ascending ``sort`` positions
  [N − k − int(γ N), N − int(γ N)); each optionally rescaled to the L1 norm in c (left alone below 10⁻⁷).
- ``linear``: float32 (float64 for float64 inputs) r = Σ_i x_i · w_i by ``addcmul_`` in the inputs' order, then
  r / Σ w when normalizing, cast back to c.
- ``slerp``: norms as the norm of per-chunk norms (chunks of 2²⁰ entries), the dot of the normalised chunks,
  Θ = arccos(clamp(dot)), coefficients in float32 tensors, lerp where |dot| > 0.9995; the result stored in c.
"""

from __future__ import annotations

import torch

from nbmerge.method import TensorJob

RESCALE_EPS = 1e-7
SLERP_CHUNK = 1024 * 1024
DOT_THRESHOLD = 0.9995


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """mergekit's float work dtype for coefficients and linear/slerp accumulation: float64 for float64 inputs,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rescaled(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def _magnitude_order(tensor: torch.Tensor, descending: bool) -> torch.Tensor:
    magnitudes = tensor.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    if descending:
        return torch.argsort(magnitudes, descending=True)
    return torch.sort(magnitudes, descending=False).indices


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """The top max(1, int(d · N)) entries by magnitude, in mergekit's argsort order; d ≥ 1 keeps all, d ≤ 0 none."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    keep = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[_magnitude_order(tensor, descending=True)[:keep]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """The entries of ascending magnitude rank [N − k − int(γ N), N − int(γ N)) (k = int(d · N); fewer outliers
    dropped when d + γ > 1), in mergekit's sort order; d ≥ 1 keeps all."""
    if density >= 1:
        return tensor
    count = tensor.numel()
    keep, outliers = int(density * count), int(gamma * count)
    below = max(0, count - keep - outliers)
    mask = torch.zeros(count, dtype=tensor.dtype, device=tensor.device)
    mask[_magnitude_order(tensor, descending=False)[below:below + keep]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def task_vector_merge(job: TensorJob, sparsify, weights: list, consensus: str | None, normalize: bool,
                      scaling: float) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge on one tensor (see the module docstring); ``sparsify(i, τ_i)``
    returns model i's sparse task vector (or τ_i itself), ``consensus`` is "sum", "count" or None."""
    base = job.base
    deltas = base.new_empty((len(job.models), *base.shape))
    for index, model in enumerate(job.models):
        delta = model - base
        deltas[index] = delta if sparsify is None else sparsify(index, delta)
    column = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > column.dim():
        column.unsqueeze_(-1)
    deltas.mul_(column)
    if consensus is not None:
        agrees = _consensus_mask(deltas, consensus, base.dtype)
        mixed = (deltas * agrees).sum(dim=0)
        divisor = (column * agrees).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = column.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if scaling != 1:
        mixed *= scaling
    return (base + mixed).to(base.dtype)


def _consensus_mask(deltas: torch.Tensor, method: str, dtype: torch.dtype) -> torch.Tensor:
    """[sign(δ_i) = γ] with γ = +1 where the summed mass (or the summed signs) is ≥ 0, else −1."""
    signs = deltas.sign().to(dtype)
    votes = deltas.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    majority = (votes >= 0).to(dtype) * 2 - 1
    return signs == majority


def linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ_i w_i x_i accumulated in float32 (float64 inputs: float64) with addcmul_, ÷ Σ w when normalizing, in
    the inputs' dtype."""
    first = tensors[0]
    work = accumulation_dtype(first.dtype)
    column = torch.tensor([weights], dtype=work, device=first.device)  # [1, n]: one output of n inputs
    shape = (1,) + (1,) * first.dim()
    result = torch.zeros((1, *first.shape), dtype=work, device=first.device)
    for tensor, coefficient in zip(tensors, column.unbind(1)):
        result.addcmul_(tensor.unsqueeze(0), coefficient.reshape(shape))
    if normalize:
        result.div_(column.sum(dim=1).reshape(shape))
    return result.to(first.dtype)[0]


def passthrough(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """The tensor (in the compute dtype), times the scale unless it is 1 (mergekit: unless none is given)."""
    return tensor if scale == 1.0 else tensor * scale


def slerp(first: torch.Tensor, second: torch.Tensor, t: float, eps: float) -> torch.Tensor:
    """mergekit's SLERP of one tensor pair (first: the t = 0 endpoint), computed in float32 (float64 inputs:
    float64) chunk by chunk and stored in the inputs' dtype."""
    work = accumulation_dtype(first.dtype)
    a, b = first.reshape(1, -1), second.reshape(1, -1)
    t_column = torch.tensor([t], dtype=work, device=first.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t_column) * a + t_column * b).reshape(first.shape).to(first.dtype)
    chunk = SLERP_CHUNK
    starts = range(0, a.shape[1], chunk)
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s:s + chunk].to(work), dim=1,
                                                                           keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s:s + chunk].to(work), dim=1,
                                                                           keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    parts = [((a[:, s:s + chunk].to(work) / norm_a) * (b[:, s:s + chunk].to(work) / norm_b)).sum(dim=1, keepdim=True)
             for s in starts]
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)
    straight = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(straight, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(straight, 1 - t_column, torch.sin((1 - t_column) * theta) / sin_theta)
    coef_b = torch.where(straight, t_column, torch.sin(t_column * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in starts:
        result[:, s:s + chunk] = coef_a * a[:, s:s + chunk].to(work) + coef_b * b[:, s:s + chunk].to(work)
    return result.reshape(first.shape)
