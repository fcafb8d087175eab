"""Layer Redundancy (Dumitru et al., 2024).

LR of a decoder layer = mean over calibration tokens of cos(input, output), both taken as the
layer's own residual-stream input and output (not transformers' ``hidden_states[-1]``, which
is after the final norm). A layer that barely changes its input is redundant and can be
sliced harder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from dynslice_modifier.calibration import LayerInputs, check_finite, onloaded
from dynslice_modifier.distributed import sum_over_ranks
from dynslice_modifier.pca import CovarianceAccumulator, signal_spectrum


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


def redundancy_scores(
    layers: nn.ModuleList,
    inputs: LayerInputs,
    device: torch.device,
    skip: frozenset[int] = frozenset(),
) -> list[float]:
    """Layer Redundancy of every decoder layer of the unmodified model (see ``dense_pass``)."""
    return dense_pass(layers, inputs, device, skip).scores


@dataclass
class DensePass:
    """What one pass over the unmodified model measured, per decoder layer."""

    scores: list[float]
    # Eigenvalues of each layer input's second moment, descending; None when not asked for.
    spectra: list[list[float]] | None


def dense_pass(
    layers: nn.ModuleList,
    inputs: LayerInputs,
    device: torch.device,
    skip: frozenset[int] = frozenset(),
    spectra: bool = False,
) -> DensePass:
    """Layer Redundancy of every decoder layer of the unmodified model, and with ``spectra``
    the spectrum of each layer's input, from the batches not in ``skip`` (``slicing_base:
    auto`` scores the widths on held-out batches, which must not have shaped them).

    Consumes ``inputs``: on return its batches not in ``skip`` hold the last layer's
    outputs, and those in ``skip`` still hold the first layer's inputs.
    """
    scores = []
    spectrum_list: list[list[float]] = []
    desc = "Layer redundancy and input spectra" if spectra else "Layer redundancy"
    for idx, layer in enumerate(tqdm(layers, desc=desc, leave=False)):
        acc = RedundancyAccumulator()
        cov = CovarianceAccumulator(inputs.hidden[0].shape[-1], device) if spectra else None
        with onloaded(layer, device), torch.no_grad():
            for b in range(len(inputs)):
                if b in skip:
                    continue
                x = inputs.hidden[b].to(device)
                mask = inputs.mask(b, device)
                if cov is not None:
                    cov.add(x, mask)
                y = layer(x, **inputs.layer_kwargs(b, idx, device))
                y = y[0] if isinstance(y, tuple) else y
                check_finite(y, f"decoder layer {idx} output")
                acc.add(x, y, mask)
                inputs.hidden[b] = y.to(inputs.hidden[b].device)
        acc.all_reduce()
        scores.append(acc.score)
        if cov is not None:
            cov.all_reduce()
            spectrum_list.append(signal_spectrum(cov, f"decoder layer {idx} input"))
    return DensePass(scores, spectrum_list if spectra else None)
