"""Steps the singular-vector methods share (TSV-M, Iso-C, Iso-CTS), on one tensor's task vectors τ_i = θ_i − θ_0.

- ``mean_task_vector``: (1/T) Σ_i w_i τ_i, what these methods give every tensor that is not a matrix;
- ``thin_svd``: U, S, Vᵀ of a matrix, the thin (economy) decomposition, in the job's dtype on its device;
- ``orthogonal_factor``: the nearest matrix with orthonormal columns (or rows), U Vᵀ of A = U S Vᵀ.

``SCALING`` is their λ, FusionBench's ``alpha`` (TSV-M) and ``scaling_factor`` (Iso-C, Iso-CTS), 1 in each.
"""

import torch

from nbmerge.errors import ModelInputError
from nbmerge.method import Param, TensorJob

SCALING = Param("scaling", "float", 1.0, "λ, the factor applied to the merged task vector (FusionBench's alpha or "
                "scaling_factor)", grid=(0.5, 1.0, 1.5))


def mean_task_vector(job: TensorJob, weights: list[float]) -> torch.Tensor:
    """(1/T) Σ_i w_i τ_i, summed in place into one new tensor."""
    total = job.empty(job.base.shape, job.base.dtype).zero_()
    for model, weight in zip(job.models, weights):
        total.add_(model, alpha=weight).sub_(job.base, alpha=weight)
    return total.div_(len(job.models))


def thin_svd(matrix: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = U diag(S) Vᵀ with U [m, k], S [k] descending, Vᵀ [k, n], k = min(m, n) (no full square factors).

    LAPACK's float32 divide-and-conquer SVD can fail to converge on matrices with many (nearly) equal singular
    values; such a matrix is decomposed again in float64 (then rounded back), and one that fails there too is an
    error naming the tensor.
    """
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise ModelInputError(f"tensor {name!r}: the SVD of its task vectors did not converge (a matrix of "
                                  f"shape {tuple(matrix.shape)} with non-finite or degenerate values)") from None
    return tuple(part.to(matrix.dtype) for part in thin_svd(matrix.double(), name))


def truncated_svd(matrix: torch.Tensor, rank: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of ``matrix``: U[:, :r], s[:r], Vᵀ[:r], copies (the full factors are
    freed on return)."""
    u, s, vh = thin_svd(matrix, name)
    return u[:, :rank].clone(), s[:rank].clone(), vh[:rank].clone()


def orthogonal_factor(matrix: torch.Tensor, name: str) -> torch.Tensor:
    """U Vᵀ for A = U S Vᵀ: the orthonormal factor of A's polar decomposition (FusionBench's decorrelation)."""
    u, _, vh = thin_svd(matrix, name)
    return u @ vh
