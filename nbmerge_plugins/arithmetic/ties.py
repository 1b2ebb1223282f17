"""TIES merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

With task vectors τ_i = θ_i − θ_0 and per-model weights w_i (default 1):
1. trim: keep the top ``density`` fraction of |τ_i| and zero the rest: k = int(density · N) entries, N counting
   every position (``density_over="all"``, as FusionBench and mergekit do) or only the positions some model
   changed (``"changed"``: τ ≠ 0 for some i, so frozen parameters do not dilute the fraction; FusionBench keeps
   one entry more, int(d·N) + 1, in model scope). ``trim_scope="tensor"`` ranks
   each tensor on its own (mergekit); ``"model"`` ranks the whole model at once with one exact global threshold
   per task vector (the paper and FusionBench). Either way a sample brackets each threshold and a counting pass
   collects the entries inside the bracket, whose order statistic is the exact threshold; in tensor scope the
   native kernels merge during that same pass every position the bracket already settles and the few others
   after it. Entries equal to the threshold are all kept.
2. elect: γ = sign(Σ_i w_i τ̂_i) (``sign="sum"``, by mass) or sign(Σ_i sign(w_i τ̂_i)) (``"count"``). Exact ties
   (γ = 0) elect + in tensor scope (mergekit) and the model-wide majority sign in model scope (FusionBench).
3. disjoint merge over the entries whose sign agrees with γ: ``"mean"`` Σ w_i τ̂_i / Σ w_i (over agreeing
   non-zero entries; the paper's mean when w = 1), ``"sum"`` Σ w_i τ̂_i, or ``"max"`` γ · max |w_i τ̂_i|.
4. θ = θ_0 + λ · merged, λ = ``scaling``.
Weights multiply the task vectors before the election, as in mergekit. ``rescale`` (mergekit's ties ``rescale:
true``) scales each trimmed task vector back to its tensor's L1 norm before the election: τ̂_i ← τ̂_i · ‖τ_i‖₁ / ‖τ̂_i‖₁
(left alone where either norm is below 10⁻⁷).
"""

from __future__ import annotations

import torch

from nbmerge import hookimpl
from nbmerge.method import BASE_REQUIRED, MergeMethod, Param, Stage, TensorJob
from nbmerge_plugins import native
from nbmerge_plugins import _mergekit_arithmetic as mergekit
from nbmerge_plugins._selection import (
    inside_fractions,
    model_thresholds,
    order_statistic,
    per_model,
    tensor_brackets,
    tensor_thresholds,
)
from nbmerge_plugins._task_vectors import WEIGHTS, blocks_of_task_vectors, disjoint_merge, elect_sign, trim

GLOBAL_THRESHOLD = "global trim threshold"

DENSITY = Param("density", "float", 0.2, "fraction of each task vector's entries kept by magnitude (one, or one "
                "per model)", low=0.0, high=1.0, low_inclusive=False, grid=(0.1, 0.2, 0.4), per_model=True)

DENSITY_OVER = Param("density_over", "choice", "all",
                     "what the density counts: all positions (FusionBench, mergekit) or those some model changed",
                     choices=("all", "changed"))

SIGN = Param("sign", "choice", "sum", "sign election: by summed mass or by count of signs", choices=("sum", "count"))

MERGE_FUNC = Param("merge_func", "choice", "mean", "how agreeing entries combine",
                   choices=("mean", "sum", "max"))

SCALING = Param("scaling", "float", 1.0, "λ, the factor applied to the merged task vector", grid=(0.5, 0.7, 1.0))

TRIM_SCOPE = Param("trim_scope", "choice", "model", "rank magnitudes per tensor or over the whole model",
                   choices=("tensor", "model"))


RESCALE = Param("rescale", "bool", False, "scale each trimmed task vector back to its L1 norm (per tensor) before "
                "the election")

ONE_PASS_MAX_DEFERRED = 0.25  # above this sampled fraction of undecided positions, two passes cost less


def _ties_in_one_pass(job: TensorJob) -> torch.Tensor | None:
    """Tensor-scope TIES in one native pass over the inputs instead of a counting pass then a merge pass.

    The sampled brackets settle the keep/drop decision of every entry outside them, so the pass merges every
    position where no |w_i τ_i| falls inside its bracket while it counts and collects the bands (as the counting
    pass does); the other positions (a few percent) keep their inputs' values aside and are merged once the bands
    give the exact thresholds. The result is the two-pass result bit for bit. None when a bracket missed, a
    buffer overflowed or nothing is kept (the two-pass path then runs).
    """
    params = job.params
    over_changed = params["density_over"] == "changed"
    samples, brackets = tensor_brackets(job, params["density"], over_changed)
    band_fractions, deferred_fraction = inside_fractions(samples, brackets)
    if deferred_fraction > ONE_PASS_MAX_DEFERRED:
        return None
    numel = job.base.numel()
    done = native.ties_bracketed(job, brackets, int(2 * max(band_fractions, default=1.0) * numel) + 4096,
                                 int(2 * deferred_fraction * numel) + 4096, params["sign"], 1.0,
                                 params["merge_func"], params["scaling"])
    counted = done.changed if over_changed else numel
    keeps = [int(d * counted) for d in per_model(params["density"], len(job.models))]
    if done.bands is None or done.deferred is None or 0 in keeps:
        return None
    thresholds = native.map_in_threads(lambda args: order_statistic(*args), zip(done.bands, done.above, keeps))
    if any(threshold is None for threshold in thresholds):
        return None
    return native.ties_fixup(job, done, thresholds, params["sign"], 1.0, params["merge_func"], params["scaling"])


def threshold_passes(params: dict, wide: bool) -> int:
    """A sampling pass, a counting pass and the sign pass (the radix fallback, almost never needed, adds more)."""
    return 3


def global_thresholds(stream, params: dict, wide: bool) -> dict:
    """One threshold per task vector over the whole model, and the model-wide majority sign for exact ties.

    1-2. the k-th largest |w_i τ_i| over the model, k = int(density · N) for N = the model's positions (or those
       changed by any model, ``density_over="changed"``), exactly: ``model_thresholds`` (a sampling pass brackets
       it, a counting pass collects the entries inside the bracket);
    3. the last pass counts elected signs after trimming, for the majority sign given to exact ties (γ = 0).
    (A model with float64 tensors is ranked in float64.)
    """
    thresholds = model_thresholds(stream, params["density"], params["density_over"] == "changed", wide)
    balance = [0]

    def count_signs(job: TensorJob) -> None:
        if native.accepts(job):
            balance[0] += native.ties_sign_balance(job, thresholds, params["sign"])
            return
        for _, _, vectors in blocks_of_task_vectors(job.upcast()):
            balance[0] += int(elect_sign(trim(vectors, thresholds), params["sign"], 0.0).sum())

    stream(count_signs)
    return {"thresholds": thresholds, "majority_sign": 1.0 if balance[0] >= 0 else -1.0}


def _ties(job: TensorJob) -> torch.Tensor:
    job = job if native.accepts(job) else job.upcast()
    params = job.params
    if params["trim_scope"] == "model":
        stage = job.stage_results[GLOBAL_THRESHOLD]
        thresholds, tie_sign = stage["thresholds"], stage["majority_sign"]
    else:
        merged = _ties_in_one_pass(job) if native.accepts(job) and not params["rescale"] else None
        if merged is not None:
            return merged
        thresholds = tensor_thresholds(job, params["density"], params["density_over"] == "changed")
        tie_sign = 1.0
    if params["rescale"]:
        job = job.upcast()
    elif native.accepts(job):
        return native.ties_merge(job, thresholds, params["sign"], tie_sign, params["merge_func"],
                                 params["scaling"])
    merged = job.empty(job.base.shape, job.base.dtype)
    weights = params["weights"] or [1.0] * len(job.models)
    merged_flat, base_flat = merged.view(-1), job.base.reshape(-1)
    factors = _l1_factors(job, thresholds) if params["rescale"] else None
    for start, stop, vectors in blocks_of_task_vectors(job):
        trimmed = trim(vectors, thresholds)
        if factors is not None:
            trimmed.mul_(factors)
        elected = elect_sign(trimmed, params["sign"], tie_sign)
        combined = disjoint_merge(trimmed, elected, params["merge_func"], weights)
        torch.add(base_flat[start:stop], combined, alpha=params["scaling"], out=merged_flat[start:stop])
    return merged


def _l1_factors(job: TensorJob, thresholds: list[float], eps: float = 1e-7) -> torch.Tensor:
    """[n, 1] factors ‖w_i τ_i‖₁ / ‖trim(w_i τ_i)‖₁ over the tensor (1 where either norm is below eps)."""
    before = torch.zeros(len(job.models), dtype=torch.float64)
    after = torch.zeros(len(job.models), dtype=torch.float64)
    for _, _, vectors in blocks_of_task_vectors(job):
        before += vectors.abs().sum(1, dtype=torch.float64)
        after += trim(vectors, thresholds).abs().sum(1, dtype=torch.float64)
    factors = torch.where((before < eps) | (after < eps), torch.ones_like(before), before / after.clamp_min(eps))
    return factors.to(job.base.dtype).view(-1, 1)


def _mergekit_ties(job: TensorJob) -> torch.Tensor:
    """mergekit's ties: each τ_i trimmed to its top max(1, int(d_i · N)) by argsort (L1-rescaled with rescale),
    then weighted, the sign elected, and the agreeing entries summed (÷ their weights with merge_func mean)."""
    params, n = job.params, len(job.models)
    densities = per_model(params["density"], n)
    return mergekit.task_vector_merge(
        job, lambda i, task_vector: mergekit.magnitude(task_vector, densities[i], params["rescale"]),
        params["weights"] or [1.0] * n, params["sign"], params["merge_func"] == "mean", params["scaling"])


def _mergekit_refuses(params: dict) -> str | None:
    unlike = [f"{name}={params[name]!r}" for name, theirs in (("trim_scope", "tensor"), ("density_over", "all"))
              if params[name] != theirs]
    if params["merge_func"] == "max":
        unlike.append("merge_func='max'")
    return ", ".join(unlike) or None


TIES = MergeMethod(
    name="ties",
    summary="TIES: trim task vectors by magnitude, elect a sign per entry, merge the agreeing entries",
    formula="θ = θ_0 + λ · disjoint_merge(trim_density(w_i τ_i), γ), γ = sign(Σ_i w_i τ̂_i)",
    params=(DENSITY, SIGN, MERGE_FUNC, SCALING, TRIM_SCOPE, DENSITY_OVER, WEIGHTS, RESCALE),
    merge_tensor=_ties,
    stored_inputs=True,
    min_models=1,
    base=BASE_REQUIRED,
    stages=(Stage(GLOBAL_THRESHOLD, global_thresholds, passes=threshold_passes,
                  applies=lambda params: params["trim_scope"] == "model"),),
    mergekit_tensor=_mergekit_ties,
    mergekit_refuses=_mergekit_refuses,
)


@hookimpl
def register_merge_methods(register):
    register(TIES)
