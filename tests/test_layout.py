"""The layout planner: rounding chosen, whole layers, re-rounding and target_params."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tiny import tiny_model

from dynslice_modifier.adapters import get_adapter
from dynslice_modifier.allocation import allocate_dims, mean_slice
from dynslice_modifier.budget import ParameterCounter
from dynslice_modifier.layout import Layout, LayoutPlanner
from dynslice_modifier.slicer import count_parameters


def planner_for(layers: int, round_to: int, **options: Any) -> LayoutPlanner:
    model = tiny_model("llama", True, layers=layers)
    counter = ParameterCounter(model, get_adapter(model), "sublayer", True, True)
    return LayoutPlanner(counter, round_to, **options)


def spectra(layers: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.sort(rng.random(64))[::-1] for _ in range(layers)]


@pytest.mark.parametrize(
    ("rounding", "slicing_base", "measured", "expected"),
    [
        (None, 0.05, True, "spectrum"),
        (None, 0.05, False, "mean"),  # given layer_scores: no pass for the spectra alone
        (None, 0.25, True, "mean"),  # constant slicing keeps one width
        ("nearest", 0.05, True, "nearest"),
        ("spectrum", 0.25, True, "spectrum"),
    ],
)
def test_the_rounding_is_as_set_or_by_what_the_widths_are(
    rounding, slicing_base, measured, expected
):
    planner = planner_for(3, 16, rounding=rounding, profitable_only=False)
    planner.spectra = spectra(3) if measured else None
    planner.scores = [0.2, 0.5, 0.9]
    layout = planner.at(0.25, slicing_base)
    assert layout.rounding == expected
    assert layout.dims == allocate_dims(
        planner.scores, 64, 0.25, slicing_base, 16, rounding=expected, spectra=planner.spectra
    )


def test_a_layer_left_whole_below_full_width_hands_its_rounding_step_to_another():
    planner = planner_for(6, 8, spectra=spectra(6))
    planner.scores = [0.5, 0.8, 0.3, 0.8, 0.5, 0.1]
    once = allocate_dims(planner.scores, 64, 0.25, 0.05, 8, "minmax", "spectrum", planner.spectra)
    assert once == [48, 40, 48, 40, 56, 56]
    layout = planner.at(0.25, 0.05)
    # Layers 4 and 5 do not pay for their shortcuts at 56 and are left whole; the step
    # that rounding had given one of them goes to layer 2, which stays sliced.
    assert layout.whole == [False] * 4 + [True] * 2
    assert layout.dims == [48, 40, 56, 40, 64, 64]


def test_without_profitable_only_no_layer_is_left_whole():
    planner = planner_for(6, 8, spectra=spectra(6), profitable_only=False)
    planner.scores = [0.5, 0.8, 0.3, 0.8, 0.5, 0.1]
    layout = planner.at(0.25, 0.05)
    assert layout.whole == [False] * 6
    assert layout.dims == [48, 40, 48, 40, 56, 56]


def test_a_layer_rounded_to_full_width_keeps_its_step():
    # Targets of 48 at steps of 32 round to two full-width layers and one of 32; the two
    # are then whole, but pinning them would hand their steps on until the model is dense.
    planner = planner_for(3, 32, rounding="spectrum", spectra=spectra(3))
    layout = planner.at(0.25, 0.25)
    assert sorted(layout.dims) == [32, 64, 64]
    assert sum(layout.whole) == 2


@pytest.mark.parametrize("target", [0.2, 0.02])
def test_target_params_is_met_by_the_layout_of_the_solved_sparsity(target):
    planner = planner_for(6, 16, spectra=spectra(6))
    planner.scores = [0.7, 0.4, 0.5, 0.2, 0.9, 0.2]
    dense = count_parameters(tiny_model("llama", True, layers=6))
    layout = planner.for_target(target, dense, lambda sparsity: 0.2 * sparsity)
    assert planner.counter(layout.dims, layout.whole) <= (1 - target) * dense
    assert 0.0 < layout.sparsity <= planner.max_sparsity
    assert layout == planner.at(layout.sparsity, 0.2 * layout.sparsity)


def test_target_params_counts_the_layers_left_whole():
    # A small target is met with four layers whole, at a lower SP than with every layer
    # sliced: the solver counts a whole layer as one, with no shortcuts.
    options = {"spectra": spectra(6)}
    dense = count_parameters(tiny_model("llama", True, layers=6))
    plans = {}
    for profitable in (True, False):
        planner = planner_for(6, 16, profitable_only=profitable, **options)
        planner.scores = [0.7, 0.4, 0.5, 0.2, 0.9, 0.2]
        plans[profitable] = planner.for_target(0.02, dense, lambda sparsity: 0.2 * sparsity)
    assert sum(plans[True].whole) == 4
    assert plans[True].sparsity < plans[False].sparsity


def test_at_the_maximum_sparsity_every_layer_is_one_step_wide_whatever_the_scores():
    planner = planner_for(6, 16)
    for scores in ([0.7, 0.4, 0.5, 0.2, 0.9, 0.2], [0.1] * 6):
        planner.scores = scores
        layout = planner.at(planner.max_sparsity, 0.0)
        assert layout.dims == [16] * 6
        assert planner.counter(layout.dims, layout.whole) == planner.smallest()


def test_given_widths_are_a_layout_of_their_own_mean_slice():
    # layer_dims: neither allocated nor rounded, so SB and rounding are recorded as unset.
    layout = Layout.given([576, 432, 288], 576)
    assert layout.sparsity == pytest.approx(0.25, abs=1e-12)
    assert layout.sparsity == mean_slice(layout.dims, 576)
    assert (layout.slicing_base, layout.rounding) == (None, None)
    assert layout.whole == [False, False, False]
