import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from dynslice_modifier.allocation import (
    allocate_dims,
    check_explicit_dims,
    normalize_scores,
    round_dims,
    slice_fractions,
)
from dynslice_modifier.errors import AllocationError

# The Layer Redundancy profile REFERENCE.md reports for SmolLM2-135M (shape, not values).
SMOL_LIKE = [0.021, 0.843] + [0.92 + 0.05 * ((i * 7) % 10) / 10 for i in range(27)] + [0.776]


def test_mean_slice_equals_sparsity():
    fractions = slice_fractions(SMOL_LIKE, 0.25, 0.05, max_slice=0.95)
    assert fractions.mean() == pytest.approx(0.25, abs=1e-12)
    assert fractions.min() >= 0.05 - 1e-12


def test_slicing_base_equal_sparsity_is_constant():
    dims = allocate_dims(SMOL_LIKE, 576, 0.25, 0.25, round_to=16)
    assert dims == [432] * len(SMOL_LIKE)


def test_more_redundant_layers_are_sliced_more():
    fractions = slice_fractions(SMOL_LIKE, 0.25, 0.05, max_slice=0.95)
    order = np.argsort(SMOL_LIKE)
    assert np.all(np.diff(fractions[order]) >= -1e-12)
    assert fractions[0] == pytest.approx(0.05)  # least redundant layer gets only the base


def test_rounding_to_multiple_within_one_step():
    dims = allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, round_to=64, rounding="nearest")
    assert all(d % 64 == 0 and 64 <= d <= 576 for d in dims)
    assert abs(np.mean(dims) - 576 * 0.75) <= 64


@pytest.mark.parametrize("rounding", ["mean", "nearest"])
def test_a_group_that_does_not_divide_hidden_size_caps_the_width(rounding):
    # SB 0 leaves the least redundant layer unsliced; 576 is not a multiple of 128, so a
    # GPTQ group of 128 needs it at 512.
    dims = allocate_dims(SMOL_LIKE, 576, 0.25, 0.0, round_to=128, rounding=rounding)
    assert max(dims) == 512 and all(d % 128 == 0 for d in dims)


def test_mean_rounding_keeps_the_budget_that_nearest_misses():
    # Steps of 64 (a quantizer's group size) are where nearest rounding misses SP most.
    targets = 576 * (1 - slice_fractions(SMOL_LIKE, 0.25, 0.05, max_slice=1 - 64 / 576))
    nearest = allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, round_to=64, rounding="nearest")
    kept = allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, round_to=64)
    assert 1 - np.mean(nearest) / 576 < 0.22  # realised slice far below SP
    assert abs(sum(kept) - targets.sum()) <= 64 / 2
    assert all(d % 64 == 0 and abs(d - t) < 64 for d, t in zip(kept, targets, strict=True))
    # Layers round down or up, not all the same way.
    assert {d > t for d, t in zip(kept, targets, strict=True)} == {True, False}


def test_mean_rounding_moves_equal_widths_together():
    assert allocate_dims(SMOL_LIKE, 576, 0.1, 0.1, round_to=16) == [512] * len(SMOL_LIKE)
    dims = allocate_dims([0.1, 0.5, 0.5, 0.5, 0.9], 100, 0.3, 0.0, round_to=10)
    assert dims[1] == dims[2] == dims[3]


@pytest.mark.parametrize(
    "scores, sparsity, slicing_base, expected",
    [
        # Constant slicing to 48 of 64 with steps of 32: every layer is half a step over.
        ([1.0] * 3, 0.25, 0.25, [64, 64, 64]),
        # Targets 60.8, 49.3, 33.9: once the first goes up, the second's step is a tie.
        ([0.2, 0.5, 0.9], 0.25, 0.05, [64, 64, 32]),
    ],
)
def test_mean_rounding_settles_a_tie_upwards(scores, sparsity, slicing_base, expected):
    assert allocate_dims(scores, 64, sparsity, slicing_base, round_to=32) == expected


@pytest.mark.parametrize("rounding", ["mean", "nearest", "spectrum"])
def test_a_width_of_whole_steps_up_to_float_error_is_not_floored_a_step_short(rounding):
    # 1 - (1 - 8/96) is not exactly 8/96 in floating point: floored as it comes, the first
    # target would lose a step and, under spectrum rounding, hand it to the other layer.
    spectra = [[1.0] * 96, [2.0**-i for i in range(96)]]
    fractions = np.array([1 - 8 / 96, 1 - 16 / 96])
    assert round_dims(96, fractions, 8, rounding, spectra) == [8, 16]


def test_unknown_rounding_is_rejected():
    with pytest.raises(AllocationError, match="rounding must be 'mean', 'nearest' or 'spec"):
        allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, 16, rounding="up")  # type: ignore[arg-type]


def test_clamping_redistributes_and_keeps_mean():
    scores = [0.0] * 9 + [1.0]
    fractions = slice_fractions(scores, 0.5, 0.0, max_slice=0.9)
    assert fractions[-1] == pytest.approx(0.9)
    assert fractions.mean() == pytest.approx(0.5)
    assert np.all(fractions[:-1] == pytest.approx(fractions[0]))


def test_rank_normalization_spreads_outlier_profile():
    minmax = normalize_scores(SMOL_LIKE, "minmax")
    rank = normalize_scores(SMOL_LIKE, "rank")
    assert np.ptp(minmax[2:-1]) < 0.1  # the squeeze REFERENCE.md warns about
    assert np.ptp(rank[2:-1]) > 0.8
    assert normalize_scores([0.3, 0.3, 0.9], "rank").tolist() == [0.25, 0.25, 1.0]


@pytest.mark.parametrize("method", ["minmax", "rank"])
def test_scores_equal_but_for_float_noise_slice_alike(method):
    # Min-max would stretch a 2e-12 difference over the whole spread: fractions of
    # 0.1 / 0.37 / 0.1 / 0.63 at SP 0.3, SB 0.1, for layers that change their input alike.
    noisy = [0.95, 0.95 + 1e-12, 0.95, 0.95 + 2e-12]
    assert normalize_scores(noisy, method).tolist() == [1.0] * 4
    assert normalize_scores([0.95, 0.95 + 1e-6], method).tolist() == [0.0, 1.0]
    # Twins among other scores too, and on any scale.
    assert normalize_scores([0.3, 0.3 + 1e-12, 0.9], "rank").tolist() == [0.25, 0.25, 1.0]
    assert normalize_scores([1e-12, 2e-12], method).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("sp", "sb", "match"),
    [
        (1.0, 0.0, "sparsity"),
        (-0.1, 0.0, "sparsity"),
        (0.2, 0.3, "slicing_base"),
        (0.2, -0.1, "slicing_base"),
    ],
)
def test_bad_fractions(sp, sb, match):
    with pytest.raises(AllocationError, match=match):
        allocate_dims(SMOL_LIKE, 576, sp, sb, 16)


def test_width_that_rounds_to_zero_is_rejected():
    with pytest.raises(
        AllocationError, match=r"at most 0\.7500 can be sliced\); lower sparsity or round_to"
    ):
        allocate_dims([0.5, 0.6], 64, 0.99, 0.0, round_to=16)
    # round_to == hidden_size: no sparsity above 0 can work, so none is suggested.
    with pytest.raises(AllocationError, match="nothing can be sliced: round_to is hidden_size"):
        allocate_dims([0.5, 0.6], 64, 0.25, 0.0, round_to=64)


def test_a_step_the_quantizer_sets_is_not_offered_as_the_fix():
    from dynslice_modifier.allocation import check_sparsity_fits

    who = "GPTQModifier (group_size 128)"
    with pytest.raises(AllocationError, match=r"lower sparsity \(round_to is what GPTQ") as error:
        check_sparsity_fits(0.25, 1 - 128 / 144, who)
    assert "or round_to" not in str(error.value)
    with pytest.raises(AllocationError, match=r"choose a scheme with a smaller group than GPTQ"):
        check_sparsity_fits(0.25, 0.0, who)


def _spectra(layers: int, hidden: int, seed: int) -> list[list[float]]:
    """Random descending eigenvalue spectra, one per layer."""
    rng = np.random.default_rng(seed)
    return [
        sorted(rng.exponential(size=hidden) * rng.random(), reverse=True) for _ in range(layers)
    ]


def test_spectrum_rounding_rounds_up_the_layers_whose_step_keeps_most_signal():
    targets = 576 * (1 - slice_fractions(SMOL_LIKE, 0.25, 0.05, max_slice=1 - 64 / 576))
    floors = (targets // 64 * 64).astype(int)
    # Steep spectra keep almost nothing past their floor; a flat one keeps a share per dim.
    steep = [2.0**-i for i in range(576)]
    flat = [1.0] * 576
    rounded_up = {3, 8, 20}
    spectra = [flat if layer in rounded_up else steep for layer in range(len(SMOL_LIKE))]
    mean = allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, round_to=64)
    ups = sum(d > f for d, f in zip(mean, floors, strict=True))
    assert ups > len(rounded_up)  # the other ups go to steep layers, in layer order
    dims = allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, 64, rounding="spectrum", spectra=spectra)
    raised = {layer for layer, (d, f) in enumerate(zip(dims, floors, strict=True)) if d > f}
    assert rounded_up <= raised and len(raised) == ups
    assert sum(dims) == sum(mean)
    assert abs(sum(dims) - targets.sum()) <= 32


@pytest.mark.parametrize("rounding", ["mean", "spectrum"])
def test_a_layer_pinned_whole_counts_at_its_floor_and_takes_no_step(rounding):
    # Layer 0's target, 547.2 at steps of 16, rounds to 544 or 560, both below full width;
    # its flat spectrum makes spectrum rounding raise it first.
    layers = len(SMOL_LIKE)
    spectra = [[1.0] * 576] + [[2.0**-i for i in range(576)]] * (layers - 1)
    targets = 576 * (1 - slice_fractions(SMOL_LIKE, 0.25, 0.05, max_slice=1 - 16 / 576))
    args = (SMOL_LIKE, 576, 0.25, 0.05, 16, "minmax", rounding, spectra)
    alone = allocate_dims(*args)
    dims = allocate_dims(*args, whole=[True] + [False] * (layers - 1))
    assert dims[0] == 576 and all(d % 16 == 0 for d in dims)
    assert abs(544 + sum(dims[1:]) - targets.sum()) <= 8
    if rounding == "spectrum":
        # The step full width would waste goes to another layer.
        assert alone[0] == 560
        assert sum(dims[1:]) == sum(alone[1:]) + 16
    else:
        # Left at its floor, layer 0 took no step: nothing moves.
        assert alone[0] == 544 and dims[1:] == alone[1:]


def test_layers_are_left_whole_only_at_a_multiple_of_round_to():
    with pytest.raises(AllocationError, match="round_to=128"):
        allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, 128, whole=[True] * len(SMOL_LIKE))


def test_spectrum_rounding_needs_a_spectrum_per_layer():
    with pytest.raises(AllocationError, match="one eigenvalue spectrum per layer"):
        allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, 64, rounding="spectrum")
    with pytest.raises(AllocationError, match="one eigenvalue spectrum per layer"):
        allocate_dims(SMOL_LIKE, 576, 0.25, 0.05, 64, rounding="spectrum", spectra=[[1.0]])


def test_explicit_dims_are_checked():
    assert check_explicit_dims([8, 16], 64, 2) == [8, 16]
    with pytest.raises(AllocationError, match="2 decoder layers"):
        check_explicit_dims([8], 64, 2)
    with pytest.raises(AllocationError, match=r"layer_dims\[1\]"):
        check_explicit_dims([8, 0], 64, 2)
    with pytest.raises(AllocationError, match=r"layer_dims\[0\]"):
        check_explicit_dims([65, 8], 64, 2)


@settings(max_examples=200, deadline=None)
@given(
    # Scores drawn from a small pool as well, so that ties (where rounding must keep equal
    # layers together and the more redundant one no wider) come up.
    scores=st.lists(
        st.one_of(st.floats(-1, 1, allow_nan=False), st.sampled_from([0.05, 0.33, 0.86, 0.93])),
        min_size=1,
        max_size=40,
    ),
    sp=st.floats(0, 0.9),
    base_share=st.floats(0, 1),
    # 600 is not a multiple of 16 or 64: the widest width is then below hidden_size.
    hidden=st.sampled_from([64, 576, 600, 896, 4096]),
    round_to=st.sampled_from([1, 8, 16, 64]),
    rounding=st.sampled_from(["mean", "nearest", "spectrum"]),
    seed=st.integers(0, 2**16),
)
@example([0.71, 0.05, 0.05, 0.07], 0.2, 0.7, 64, 16, "mean", 0)
@example([0.86, 0.76, 0.33, 0.93, 0.86, 0.39], 0.34, 0.33 / 0.34, 64, 16, "mean", 0)
def test_allocation_properties(scores, sp, base_share, hidden, round_to, rounding, seed):
    sb = sp * base_share
    max_slice = 1 - round_to / hidden
    if sp > max_slice:
        with pytest.raises(AllocationError):
            allocate_dims(scores, hidden, sp, sb, round_to)
        return
    fractions = slice_fractions(scores, sp, sb, max_slice)
    assert fractions.mean() == pytest.approx(sp, abs=1e-9)
    assert np.all(fractions >= sb - 1e-9) and np.all(fractions <= max_slice + 1e-9)
    order = np.argsort(scores, kind="stable")
    assert np.all(np.diff(fractions[order]) >= -1e-9)
    spectra = _spectra(len(scores), hidden, seed)
    dims = np.array(
        allocate_dims(scores, hidden, sp, sb, round_to, rounding=rounding, spectra=spectra)
    )
    targets = hidden * (1 - fractions)
    assert all(d % round_to == 0 and round_to <= d <= hidden for d in dims)
    assert np.all(np.abs(dims - targets) < round_to + 1e-6)
    # Widths cannot reach past the widest multiple, hidden % round_to below hidden_size.
    slack = max(round_to / 2, hidden % round_to)
    assert abs(dims.mean() - hidden * (1 - sp)) <= slack + 1e-6
    # A more redundant layer is never kept wider, unless its signal says otherwise.
    if rounding != "spectrum":
        assert np.all(np.diff(dims[order]) <= 0)
    distinct = np.unique(targets.round(6)).size == targets.size
    if rounding == "spectrum" or (rounding == "mean" and distinct):
        widest = hidden - hidden % round_to
        capped = np.floor(targets / round_to + 1e-9) * round_to + round_to > widest
        if not capped.any():
            assert abs(dims.sum() - targets.sum()) <= round_to / 2 + 1e-6


def test_block_hadamard_is_orthogonal_for_any_width():
    import torch

    from dynslice_modifier.hadamard import block_hadamard

    for width in (16, 48, 432, 384, 7):
        h = block_hadamard(width)
        torch.testing.assert_close(h @ h.T, torch.eye(width, dtype=h.dtype))
    assert block_hadamard(384)[:128, :128].abs().unique().numel() == 1  # one 128-block


@pytest.mark.parametrize("rounding", ["mean", "spectrum"])
def test_widths_capped_below_their_target_do_not_push_the_others_further(rounding):
    # 576 is not a multiple of 128: three layers aimed at 576 keep 512 and lose 64 each,
    # which no pass may hand on to the fourth (aimed at 288) beyond its one step up.
    dims = allocate_dims(
        [0.0, 0.0, 0.0, 1.0], 576, 0.125, 0.0, 128, rounding=rounding, spectra=_spectra(4, 576, 0)
    )
    assert dims == [512, 512, 512, 384]


@pytest.mark.parametrize("n", [0, -4, 12])
def test_sylvester_refuses_what_is_no_power_of_two(n):
    from dynslice_modifier.hadamard import sylvester

    with pytest.raises(ValueError, match=f"power of two, got {n}"):
        sylvester(n)


@pytest.mark.parametrize("scores", [[0.5, float("nan")], [0.5, float("inf")]])
def test_scores_that_are_not_finite_are_refused(scores):
    with pytest.raises(AllocationError, match="layer scores must be finite"):
        normalize_scores(scores)


def test_an_unknown_normalization_is_named():
    with pytest.raises(AllocationError, match="'minmax' or 'rank', got 'zscore'"):
        normalize_scores([0.1, 0.9], "zscore")


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=40),
    sp=st.floats(0.05, 0.8),
    base_share=st.floats(0, 1),
    hidden=st.sampled_from([64, 576, 4096]),
    round_to=st.sampled_from([8, 16, 64]),
    rounding=st.sampled_from(["mean", "spectrum"]),
    data=st.data(),
)
def test_pinned_layers_keep_the_sum_at_their_floors(
    scores, sp, base_share, hidden, round_to, rounding, data
):
    assume(sp <= 1 - round_to / hidden)
    whole = data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    spectra = _spectra(len(scores), hidden, data.draw(st.integers(0, 2**16)))
    args = (scores, hidden, sp, sp * base_share, round_to, "minmax", rounding, spectra)
    dims = np.array(allocate_dims(*args, whole=whole))
    pinned = np.array(whole)
    fractions = slice_fractions(scores, sp, sp * base_share, 1 - round_to / hidden)
    targets = hidden * (1 - fractions)
    floors = np.floor(targets / round_to + 1e-9) * round_to
    assert np.all(dims[pinned] == hidden)
    free = ~pinned
    # The pinned layers' remainders add up to fewer steps than there are pinned layers, and
    # every pass but the last raises each free layer once.
    passes = 1 + -(-pinned.sum() // max(free.sum(), 1))
    assert np.all(dims[free] >= floors[free])
    assert np.all(dims[free] - floors[free] <= passes * round_to)
    # Mean rounding moves equal targets together, and may then miss the sum by more.
    distinct = np.unique(targets[free].round(6)).size == free.sum()
    capped = dims[free] + round_to > hidden - hidden % round_to
    if free.any() and (rounding == "spectrum" or distinct) and not capped.any():
        kept = dims[free].sum() + floors[pinned].sum()
        assert abs(kept - targets.sum()) <= round_to / 2 + 1e-6
