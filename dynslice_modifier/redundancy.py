"""Layer Redundancy (Dumitru et al., 2024).

LR of a decoder layer = mean over calibration tokens of cos(input, output), both taken as the
layer's own residual-stream input and output (not transformers' ``hidden_states[-1]``, which
is after the final norm). A layer that barely changes its input is redundant and can be
sliced harder.
"""

from __future__ import annotations

import torch

from dynslice_modifier.distributed import sum_over_ranks


class RedundancyAccumulator:
    """Sums per-token cosine similarities of one layer over calibration batches."""

    def __init__(self) -> None:
        self.total = 0.0
        self.tokens = 0

    def add(
        self, layer_in: torch.Tensor, layer_out: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
        cos = torch.nn.functional.cosine_similarity(
            layer_in.to(torch.float64), layer_out.to(torch.float64), dim=-1
        )
        if mask is not None:
            cos = cos[mask.to(cos.device)]
        self.total += float(cos.sum())
        self.tokens += cos.numel()

    def all_reduce(self) -> None:
        total, tokens = sum_over_ranks(self.total, self.tokens)
        self.total, self.tokens = total, int(tokens)

    @property
    def score(self) -> float:
        return self.total / max(self.tokens, 1)
