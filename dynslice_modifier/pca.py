"""PCA of the residual stream at one slicing point.

SliceGPT's basis is the eigenvector matrix of the *uncentred* second-moment matrix
``sum_t x_t x_t^T`` over calibration tokens: the rotation must map the signal itself, not its
deviation from a mean, onto the leading coordinates.
"""

from __future__ import annotations

import torch

from dynslice_modifier.distributed import all_reduce_sum, sum_over_ranks
from dynslice_modifier.errors import CalibrationError


class CovarianceAccumulator:
    """Running float64 sum of ``x x^T`` over the non-padding tokens of many batches."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add a ``(batch, seq, dim)`` activation; ``mask`` marks the real tokens."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device)]
        x = flat.to(device=self.matrix.device, dtype=torch.float64)
        self.matrix.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over data-parallel ranks so every rank derives the same rotation."""
        all_reduce_sum(self.matrix)
        (tokens,) = sum_over_ranks(self.tokens)
        self.tokens = int(tokens)


def principal_basis(cov: CovarianceAccumulator, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and orthonormal eigenvectors (as columns) of ``cov``.

    ``where`` names the slicing point in error messages.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(_checked_matrix(cov, where))
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvalues[order], eigenvectors[:, order]


def signal_spectrum(cov: CovarianceAccumulator, where: str) -> list[float]:
    """Eigenvalues of ``cov``, descending: how the signal's energy spreads over its
    principal directions (``rounding: spectrum`` weighs widths by them). No eigenvectors
    are computed: nothing is rotated by them."""
    eigenvalues = torch.linalg.eigvalsh(_checked_matrix(cov, where))
    return eigenvalues.flip(0).tolist()


def _checked_matrix(cov: CovarianceAccumulator, where: str) -> torch.Tensor:
    """A damped copy of ``cov``'s matrix, refused if too few tokens or non-finite."""
    dim = cov.matrix.shape[0]
    if cov.tokens < dim:
        raise CalibrationError(
            f"{where}: {cov.tokens} calibration tokens for a {dim}-dimensional PCA; the "
            f"covariance would be rank-deficient. Use at least {dim} non-padding tokens "
            "(more samples or a longer max_seq_length)."
        )
    if not torch.isfinite(cov.matrix).all():
        raise CalibrationError(
            f"{where}: the activations contain inf/NaN. Run calibration in float32 or "
            "bfloat16 instead of float16, or check the input model's weights."
        )
    # Damping by a tiny multiple of the mean eigenvalue keeps eigh stable on near-singular
    # signals without visibly changing the leading directions.
    matrix = cov.matrix.clone()
    damp = 1e-12 * matrix.diagonal().mean().clamp_min(1e-30)
    matrix.diagonal().add_(damp)
    return matrix
