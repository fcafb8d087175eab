"""``slicing_base: auto``: choose SB on held-out calibration text, never on evaluation data.

The paper picked SB by sweeping it against evaluation perplexity. Here the last part of the
calibration set (in the content order of ``calibration.capture_layer_inputs``, so the split is
deterministic) is held out; for every candidate SB the model is sliced *on copies of its
layers* with the PCA fitted on the rest, the held-out batches are carried through the sliced
layers, and their next-token loss is read off the final norm and head. The candidate with the
lowest loss wins; the real slicing pass then uses the whole calibration set. One Layer
Redundancy pass, on the batches not held out, serves every candidate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from dynslice_modifier.adapters import ModelAdapter
from dynslice_modifier.calibration import LayerInputs, onloaded
from dynslice_modifier.distributed import gathered, rank, sum_over_ranks
from dynslice_modifier.errors import AllocationError, CalibrationError
from dynslice_modifier.layout import Layout

# Candidate SBs as fractions of SP: 0 is "all by redundancy", 1 would be constant slicing,
# which the paper and our benchmark find worst, so it is not tried by default.
DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Trial:
    fraction: float  # SB / SP
    slicing_base: float
    sparsity: float
    heldout_nll: float


def heldout_batches(keys: list[bytes], fraction: float) -> frozenset[int]:
    """Which of this rank's batches (given by their content keys) are held out: those among
    the last ``fraction`` of every rank's batches in content order (at least one; at least
    one left to fit). Over shards of the data, the same batches one process holds out."""
    ranked = sorted(
        (key, r, index)
        for r, ranks_keys in enumerate(gathered(keys))
        for index, key in enumerate(ranks_keys)
    )
    count = len(ranked)
    size = max(1, round(count * fraction))
    if count - size < 1:
        needed = next(n for n in itertools.count(2) if n - max(1, round(n * fraction)) >= 1)
        raise CalibrationError(
            f"slicing_base: auto holds out {fraction:.0%} of the calibration batches, which "
            f"leaves none of the {count} to fit the widths on; use at least {needed} batches "
            "(batch size 1 in oneshot gives one batch per sample), lower auto_holdout, or "
            "give slicing_base a number"
        )
    me = rank()
    return frozenset(index for _, r, index in ranked[count - size :] if r == me)


@torch.no_grad()
def heldout_nll(
    model: nn.Module,
    adapter: ModelAdapter,
    inputs: LayerInputs,
    heldout: Iterable[int],
    device: torch.device,
) -> float:
    """Mean next-token loss of the held-out batches from their final residual stream."""
    norm, head = adapter.final_norm(model), model.get_output_embeddings()
    total, tokens = 0.0, 0
    with onloaded(norm, device), onloaded(head, device):
        for b in sorted(heldout):
            logits = head(norm(inputs.hidden[b].to(device))).float()
            ids = inputs.ids[b].to(device)
            keep = inputs.mask(b, device)
            labels = ids[:, 1:].clone()
            if keep is not None:
                labels[~(keep[:, 1:] & keep[:, :-1])] = -100
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            tokens += int((labels != -100).sum())
    # Every rank must pick the same SB, so the loss is over all ranks' held-out batches.
    total, tokens = sum_over_ranks(total, tokens)
    if tokens == 0:
        raise CalibrationError(
            "the held-out calibration batches contain no predicted tokens (each needs at "
            "least two unmasked ones); raise auto_holdout or the calibration samples' "
            "length, or give slicing_base explicitly"
        )
    if not math.isfinite(total):
        # min() would take a NaN loss for the best one, whatever the others are.
        raise CalibrationError(
            "the held-out loss of a slicing_base candidate is not finite (the head "
            "overflows); calibrate in float32 or bfloat16 rather than float16, or give "
            "slicing_base explicitly"
        )
    return total / tokens


def search_slicing_base(
    fractions: Iterable[float],
    plan: Callable[[float], Layout],
    trial: Callable[[Layout], float],
    hidden_size: int,
) -> tuple[Trial, list[Trial]]:
    """Try each SB fraction; return the best trial and all of them.

    ``plan(fraction)`` gives a candidate's layout (its SP can depend on SB when a
    parameter target is solved for); ``trial(layout)`` slices copies of the layers and
    returns the held-out loss. Candidates that come out as the same widths are run once;
    one that keeps every layer at full width (left whole by ``profitable_only``, or rounded
    back to ``hidden_size``) is the dense model, rotated at most, which would win on loss
    while slicing nothing, so it is not a candidate.
    """
    trials: list[Trial] = []
    seen: dict[tuple, float] = {}
    for fraction in tqdm(list(fractions), desc="Searching slicing_base", leave=False):
        layout = plan(fraction)
        sparsity, base = layout.sparsity, layout.slicing_base
        if sparsity > 0 and all(d == hidden_size for d in layout.dims):
            why = (
                "leaves every layer whole (profitable_only)"
                if all(layout.whole)
                else "rounds every width back to full"
            )
            logger.info(
                f"slicing_base search: SB {base:.4f} ({fraction:.2f} x SP {sparsity:.4f}) "
                f"{why}: skipped"
            )
            continue
        key = (tuple(layout.dims), tuple(layout.whole))
        if key not in seen:
            seen[key] = trial(layout)
        nll = seen[key]
        trials.append(Trial(fraction, base, sparsity, nll))
        logger.info(
            f"slicing_base search: SB {base:.4f} ({fraction:.2f} x SP {sparsity:.4f}) -> "
            f"held-out loss {nll:.4f} (ppl {math.exp(nll):.2f})"
        )
    if not trials:
        raise AllocationError(
            "slicing_base: auto found no candidate that slices a layer: at every SB tried, "
            "each width rounds back to full, or slicing it would add more shortcut weights "
            "than it removes (profitable_only); use a larger sparsity, target_params or "
            "basis: layer, or profitable_only: false"
        )
    # Ties (equal dims) go to the larger SB, the closer to plain SliceGPT.
    best = min(trials, key=lambda t: (t.heldout_nll, -t.fraction))
    tied = sum(t.heldout_nll == best.heldout_nll for t in trials)
    logger.info(
        f"slicing_base: auto picked SB {best.slicing_base:.4f} ({best.fraction:.2f} x SP)"
        + (f", the largest of {tied} with the same widths" if tied > 1 else "")
    )
    return best, trials
