"""From Layer Redundancy scores to per-layer residual widths.

Each layer's slice fraction is ``SB + share_l`` where the shares are proportional to the
normalised scores (more redundant -> sliced more) and scaled so the mean slice over layers
is SP. Fractions are then clamped to what the hidden size allows (the excess is handed to
the other layers so the mean is kept) and each width is rounded to a multiple of
``round_to``, by default so that the widths still add up to the budget (``rounding:
mean``; ``spectrum``, the modifier's default for dynamic widths, also keeps the sum but
picks the layers to round up by their signal).
SB == SP gives every layer the same width: plain SliceGPT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal, get_args

import numpy as np

from dynslice_modifier.errors import AllocationError

Normalization = Literal["minmax", "rank"]
Rounding = Literal["mean", "nearest", "spectrum"]

# Widths in multiples of 16 keep vectorised GEMM kernels on their fast paths.
DEFAULT_ROUND_TO = 16


def mean_slice(dims: Sequence[int], hidden_size: int) -> float:
    """The fraction of residual-stream dimensions ``dims`` removes, over all layers."""
    return 1.0 - sum(dims) / (hidden_size * len(dims))


def check_fractions(sparsity: float, slicing_base: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise AllocationError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= slicing_base <= sparsity:
        raise AllocationError(
            f"slicing_base must be in [0, sparsity={sparsity}], got {slicing_base} "
            "(slicing_base == sparsity is constant slicing)"
        )


_EQUAL_SCORES = 1e-9


def normalize_scores(scores: Sequence[float], method: Normalization = "minmax") -> np.ndarray:
    """Map scores to [0, 1], most redundant layer -> 1.

    ``minmax`` is the paper's choice. ``rank`` spreads layers by order only, so one outlier
    (e.g. a first layer that rewrites the embedding) cannot squeeze all others together.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise AllocationError(f"layer scores must be finite, got {list(scores)}")
    # Scores equal but for float noise are equal: min-max would blow a 1e-12 difference up
    # to the whole spread, slicing one layer by SB and its twin by far more, and rank
    # would set twins a rank apart.
    tolerance = _EQUAL_SCORES * float(np.abs(s).max())
    if s.size < 2 or np.ptp(s) <= tolerance:
        return np.ones_like(s)
    if method == "minmax":
        return (s - s.min()) / np.ptp(s)
    if method == "rank":
        # Average ranks for ties keep equal scores at equal widths.
        order = np.argsort(s, kind="stable")
        ranks = np.empty_like(s)
        ranks[order] = np.arange(s.size, dtype=np.float64)
        tie_group = np.empty(s.size, dtype=np.int64)
        tie_group[order] = np.cumsum(np.concatenate([[0], np.diff(s[order]) > tolerance]))
        for group in np.unique(tie_group):
            tied = tie_group == group
            ranks[tied] = ranks[tied].mean()
        return ranks / (s.size - 1)
    raise AllocationError(f"normalization must be 'minmax' or 'rank', got {method!r}")


def check_sparsity_fits(sparsity: float, max_slice: float, set_by: str | None = None) -> None:
    """Every layer keeps at least one rounding step: ``max_slice = 1 - round_to / hidden``.

    ``set_by``: the quantizers that fixed round_to at its least, which lowering it cannot
    help then.
    """
    if sparsity <= max_slice:
        return
    if max_slice <= 0.0:
        fix = (
            f"choose a scheme with a smaller group than {set_by} has"
            if set_by
            else "set round_to below hidden_size"
        )
        raise AllocationError(
            f"nothing can be sliced: round_to is hidden_size, the only width that is a "
            f"multiple of it; {fix}, or slice with sparsity 0 (rotation only)"
        )
    fix = "lower sparsity" if set_by else "lower sparsity or round_to"
    raise AllocationError(
        f"sparsity {sparsity} leaves less than one rounding step per layer "
        f"(at most {max_slice:.4f} can be sliced); {fix}"
        + (f" (round_to is what {set_by} needs)" if set_by else "")
    )


def check_sparsity_slices(
    sparsity: float,
    hidden_size: int,
    num_layers: int,
    round_to: int,
    per_layer: bool,
    set_by: str | None = None,
) -> None:
    """Refuse a sparsity too small to remove one rounding step, at which every width would
    round back to ``hidden_size`` and the run would only add shortcuts. ``mean`` and
    ``spectrum`` rounding keep the sum of the widths within half a step of its target, so
    the bound is half a step in all; ``per_layer``: the widths are equal and rounded alike
    (constant slicing under mean rounding, which rounds equal targets together, or nearest),
    so it is half a step in each layer. (Where ``round_to`` does not divide ``hidden_size``,
    every layer loses the remainder anyway.)"""
    layers = 1 if per_layer else num_layers
    removed = sparsity * hidden_size * layers
    if sparsity == 0.0 or hidden_size % round_to or removed > round_to / 2:
        return
    where = (
        f"each layer would lose {removed:.1f} of its {hidden_size} dims"
        if per_layer
        else f"it removes {removed:.1f} of the {num_layers} x {hidden_size} residual dims"
    )
    raise AllocationError(
        f"sparsity {sparsity:g} would slice nothing: {where}, under half a rounding step of "
        f"{round_to}, so every width rounds back to {hidden_size}; use a sparsity of at least "
        f"{round_to / (hidden_size * layers):.4g} (one step)"
        + (f" (round_to is what {set_by} needs)" if set_by else " or a smaller round_to")
    )


def slice_fractions(
    scores: Sequence[float],
    sparsity: float,
    slicing_base: float,
    max_slice: float,
    normalization: Normalization = "minmax",
) -> np.ndarray:
    """Per-layer slice fractions with mean ``sparsity``, each in [slicing_base, max_slice]."""
    check_fractions(sparsity, slicing_base)
    check_sparsity_fits(sparsity, max_slice)
    # The most redundant layer's weight is 1 (all ones when the scores are equal).
    weights = normalize_scores(scores, normalization)
    n = weights.size
    budget = (sparsity - slicing_base) * n
    fractions = np.full(n, slicing_base)
    free = np.ones(n, dtype=bool)
    # Water-filling: layers that hit max_slice stop growing and the rest share their excess.
    while budget > 1e-12 and free.any():
        w = weights * free
        if w.sum() == 0.0:
            w = free.astype(np.float64)
        proposal = fractions + budget * w / w.sum()
        over = proposal > max_slice
        if not over.any():
            fractions = proposal
            break
        budget -= float((max_slice - fractions[over & free]).sum())
        fractions[over & free] = max_slice
        free &= ~over
    return fractions


def round_dims(
    hidden_size: int,
    fractions: np.ndarray,
    round_to: int,
    rounding: Rounding = "mean",
    spectra: Sequence[Sequence[float]] | None = None,
    whole: Sequence[bool] | None = None,
) -> list[int]:
    """Kept widths, each a multiple of ``round_to`` in [round_to, hidden_size], for
    ``fractions`` of at most ``1 - round_to / hidden_size`` (as ``slice_fractions`` caps them).

    A quantizer's group size may not divide hidden_size (SmolLM2: 576 with groups of 128),
    so the widest allowed width is the largest multiple below it, not hidden_size itself.

    ``nearest`` rounds every width on its own, so the realised mean slice can miss SP by
    up to half a step (SmolLM2 at SP 0.25, SB 0.05: 0.241 with steps of 16, 0.215 with 64),
    and dynamic and constant slicing are then compared at different sizes. ``mean`` rounds
    each width down or up (never further than one step, but see ``whole``), largest
    remainders up first (Hamilton's method), so that their sum stays within half a step of
    the unrounded sum.
    Layers with equal targets are rounded together, so constant slicing stays constant
    (the sum can then miss by more), and a more redundant layer never ends up wider than a
    less redundant one.

    ``spectrum`` keeps the sum as ``mean`` does, but rounds up first the layers whose next
    step holds the largest share of their input's signal: ``spectra[l]`` are the
    eigenvalues of layer ``l``'s input second moment in the unsliced model, and the share of
    their sum that a width drops is the relative error the next norm passes on. Remainders,
    redundancy order and equal widths are not kept: a layer may end up to one step above
    its target, or below a more redundant one.

    Layers marked in ``whole`` (which ``profitable_only`` leaves at full width although
    rounding kept them narrower) are ``hidden_size`` wide and count in the sum at their
    floor: a step that rounded one of them up would be lost, so it goes to another layer.
    With several of them that can be more steps than the other layers have, and a layer
    then rises two steps or more (``_repeat_passes``).
    """
    _check_round_to(round_to, hidden_size)
    if rounding not in get_args(Rounding):
        raise AllocationError(f"rounding must be 'mean', 'nearest' or 'spectrum', got {rounding!r}")
    targets = hidden_size * (1.0 - np.asarray(fractions, dtype=np.float64))
    steps = targets / round_to
    widest = hidden_size - hidden_size % round_to
    # The tolerance keeps a width that is a whole number of steps up to float error from
    # being floored one step short.
    floors = np.floor(steps + 1e-9) * round_to
    pinned = np.zeros(len(targets), dtype=bool) if whole is None else np.asarray(whole, bool)
    if pinned.any() and hidden_size % round_to:
        raise AllocationError(
            f"layers left whole are hidden_size={hidden_size} wide, not a multiple of "
            f"round_to={round_to}; leave none whole or use a round_to that divides it"
        )
    free = ~pinned
    goal = float(targets.sum() - floors[pinned].sum())
    dims = np.full(len(targets), float(hidden_size))
    if rounding == "nearest":
        dims[free] = np.minimum(np.floor(steps[free] + 0.5) * round_to, widest)
        return [int(d) for d in dims]
    bounds = {"goal": goal, "step": round_to, "cap": widest}
    if rounding == "spectrum":
        every = _checked_spectra(spectra, len(targets))
        kept = [every[layer] for layer in np.flatnonzero(free)]
        one_pass = partial(_keep_sum_by_signal, spectra=kept, **bounds)
    else:
        one_pass = partial(_keep_sum, targets[free], **bounds)
    if pinned.any():
        dims[free] = _repeat_passes(one_pass, floors[free], **bounds)
    else:
        # Widths capped below their target (round_to not dividing hidden_size) can also
        # leave the sum short, but they are the cap's doing: the others stay within a step.
        dims[free] = one_pass(floors[free])
    return [int(d) for d in dims]


def _repeat_passes(
    one_pass: Callable[[np.ndarray], np.ndarray],
    floors: np.ndarray,
    goal: float,
    step: int,
    cap: int,
) -> np.ndarray:
    """Run passes of one-step raises until the sum is within half a step of ``goal``.

    For layers left whole: the free layers' own remainders add up to fewer steps than there
    are free layers, but each layer left whole hands them up to a step more, so with
    several of them every free layer may have to rise twice or more. Another pass runs only
    when the last one raised every layer it could (so the order a pass keeps holds across
    passes) and the sum is still short.
    """
    dims = one_pass(floors)
    while goal - dims.sum() > step / 2:
        rose = dims > floors
        if not rose.any() or not np.all(rose | (floors + step > cap)):
            return dims
        floors, dims = dims, one_pass(dims)
    return dims


def _keep_sum(
    targets: np.ndarray, floors: np.ndarray, goal: float, step: int, cap: int
) -> np.ndarray:
    """Raise floored widths by a step, largest remainder first, while the total gets closer
    to ``goal`` (ties go up, as nearest rounding does).

    Equal targets move together. A group left down also holds down every later group on the
    same floor: those have smaller targets, so raising them would keep a more redundant
    layer wider than a less redundant one.
    """
    dims = floors.copy()
    remainders = np.round((targets - floors) / step, 9)
    groups: dict[tuple[float, float], list[int]] = {}
    for layer in np.argsort(-remainders, kind="stable"):
        groups.setdefault((remainders[layer], round(float(targets[layer]), 6)), []).append(layer)
    held: set[float] = set()
    for layers in groups.values():
        floor = float(floors[layers[0]])
        raise_by = np.where(dims[layers] + step <= cap, step, 0)
        total = float(dims.sum())
        if floor not in held and abs(total + raise_by.sum() - goal) <= abs(total - goal):
            dims[layers] += raise_by
        else:
            held.add(floor)
    return dims


def _keep_sum_by_signal(
    floors: np.ndarray, goal: float, step: int, cap: int, spectra: Sequence[Sequence[float]]
) -> np.ndarray:
    """Raise floored widths by a step, the layer whose step keeps the largest share of its
    input's signal first, while the total gets closer to ``goal``."""
    shares = []
    for spectrum, floor in zip(spectra, floors.astype(int), strict=True):
        eigenvalues = np.clip(np.asarray(spectrum, dtype=np.float64), 0.0, None)
        total = eigenvalues.sum()
        shares.append(eigenvalues[floor : floor + step].sum() / total if total > 0 else 0.0)
    dims = floors.copy()
    for layer in np.argsort(-np.asarray(shares), kind="stable"):
        if dims[layer] + step > cap:
            continue
        total = float(dims.sum())
        if abs(total + step - goal) > abs(total - goal):
            break
        dims[layer] += step
    return dims


def _checked_spectra(
    spectra: Sequence[Sequence[float]] | None, num_layers: int
) -> Sequence[Sequence[float]]:
    if spectra is None or len(spectra) != num_layers:
        raise AllocationError(
            "rounding 'spectrum' needs one eigenvalue spectrum per layer (the modifier "
            "gathers them in its pass over the unsliced model); use 'mean' without them"
        )
    return spectra


def _check_round_to(round_to: int, hidden_size: int) -> None:
    if not 1 <= round_to <= hidden_size:
        raise AllocationError(f"round_to must be in [1, hidden_size={hidden_size}], got {round_to}")


def allocate_dims(
    scores: Sequence[float],
    hidden_size: int,
    sparsity: float,
    slicing_base: float,
    round_to: int,
    normalization: Normalization = "minmax",
    rounding: Rounding = "mean",
    spectra: Sequence[Sequence[float]] | None = None,
    whole: Sequence[bool] | None = None,
) -> list[int]:
    """Residual width of every layer. The realised mean slice is within half a step of SP;
    with ``mean`` rounding the *sum* of widths is, unless equal widths move together, and
    with ``spectrum`` (which reads ``spectra``, see ``round_dims``) it is. Layers marked in
    ``whole`` are ``hidden_size`` wide and count in that sum at their floor (``round_dims``)."""
    _check_round_to(round_to, hidden_size)
    max_slice = 1.0 - round_to / hidden_size
    fractions = slice_fractions(scores, sparsity, slicing_base, max_slice, normalization)
    return round_dims(hidden_size, fractions, round_to, rounding, spectra, whole)


def choose_rounding(rounding: Rounding | None, dynamic: bool, spectra: bool) -> Rounding:
    """``rounding`` as set; unset, ``spectrum`` for dynamic widths where the spectra were
    taken, else ``mean``, which keeps constant slicing's single width (SliceGPT's)."""
    if rounding is not None:
        return rounding
    return "spectrum" if dynamic and spectra else "mean"


def check_explicit_dims(dims: Sequence[int], hidden_size: int, num_layers: int) -> list[int]:
    if len(dims) != num_layers:
        raise AllocationError(
            f"layer_dims has {len(dims)} entries but the model has {num_layers} decoder "
            "layers: give one width per decoder layer"
        )
    for layer, dim in enumerate(dims):
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= hidden_size:
            raise AllocationError(
                f"layer_dims[{layer}] = {dim!r}: each width must be an integer in "
                f"[1, hidden_size={hidden_size}]"
            )
    return list(dims)
