"""Block Hadamard rotations of kept bases (QuaRot/SpinQuant-style outlier spreading).

A kept basis ``Q`` (hidden x d) can be replaced by ``Q H`` for any orthogonal d x d ``H``
without changing the model's function: every weight that reads or writes the residual is
rotated consistently. PCA concentrates energy in the first coordinates, which is what
per-channel and group-wise quantizers handle worst; a Hadamard ``H`` spreads it evenly.
Widths are rarely powers of two, so ``H`` is block-diagonal with the largest power-of-two
block that divides ``d`` (for 432: 27 blocks of 16; for 384: 3 blocks of 128).
"""

from __future__ import annotations

import torch


def sylvester(n: int) -> torch.Tensor:
    """Orthonormal Hadamard matrix of size ``n`` (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def block_hadamard(width: int, max_block: int = 256) -> torch.Tensor:
    """Block-diagonal orthonormal Hadamard of size ``width``, in float64."""
    block = 1
    while block * 2 <= max_block and width % (block * 2) == 0:
        block *= 2
    return torch.block_diag(*[sylvester(block)] * (width // block))
