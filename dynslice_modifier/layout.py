"""The widths a run keeps: allocated by Layer Redundancy, rounded, and full width where a
slice would cost more parameters than it saves.

``allocation`` turns scores into rounded widths and ``budget`` counts what a set of widths
costs; the planner here joins the two: it leaves unprofitable layers whole
(``profitable_only``), rounds the widths again around them, and solves for the SP that a
``target_params`` goal asks for. The modifier and ``slicing_base: auto``'s candidates both
plan through it, so a candidate is exactly the model the real pass would build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dynslice_modifier.allocation import (
    Normalization,
    Rounding,
    allocate_dims,
    choose_rounding,
    mean_slice,
)
from dynslice_modifier.budget import ParameterCounter, solve_sparsity


@dataclass
class Layout:
    """The widths planned for one SP and SB, and how they were rounded."""

    sparsity: float  # the SP allocated for (solved for, with target_params)
    slicing_base: float | None  # None: widths given, not allocated
    rounding: Rounding | None  # None: widths given, not rounded
    dims: list[int]  # kept widths; hidden_size for a whole layer
    whole: list[bool]  # left at full width in the original basis

    @classmethod
    def given(cls, dims: list[int], hidden_size: int) -> Layout:
        """Widths given as they are (``layer_dims``): every layer rotated, none whole."""
        return cls(mean_slice(dims, hidden_size), None, None, dims, [False] * len(dims))


@dataclass
class LayoutPlanner:
    """Plans layouts for one model; ``scores`` and ``spectra`` are set once measured.

    ``counter`` counts the model as slicing will build it (tied or not), since it decides
    which layers pay for their shortcuts.
    """

    counter: ParameterCounter
    round_to: int
    normalization: Normalization = "minmax"
    rounding: Rounding | None = None  # unset: see ``allocation.choose_rounding``
    profitable_only: bool = True
    scores: Sequence[float] | None = None
    spectra: Sequence[Sequence[float]] | None = None

    @property
    def hidden_size(self) -> int:
        return self.counter.hidden

    @property
    def num_layers(self) -> int:
        return len(self.counter.layers)

    @property
    def max_sparsity(self) -> float:
        """Every layer one rounding step wide."""
        return 1.0 - self.round_to / self.hidden_size

    def leave_whole(self, dims: list[int], sparsity: float) -> tuple[list[int], list[bool]]:
        """``dims`` with the layers ``profitable_only`` leaves whole set to full width."""
        # A whole layer is hidden_size wide, which must also be a multiple of round_to (a
        # group-wise quantizer later in the recipe could not take it otherwise). Sparsity 0
        # asks for the rotation alone (with hadamard, to spread outliers): no layer is left
        # out of it.
        if not self.profitable_only or self.hidden_size % self.round_to or sparsity == 0.0:
            return dims, [False] * self.num_layers
        whole = self.counter.whole_layers(dims)
        return [self.hidden_size if w else d for d, w in zip(dims, whole, strict=True)], whole

    def smallest(self) -> int:
        """Parameters of the smallest model any scores allow (at ``max_sparsity``), for
        refusing an unreachable target before a calibration pass is spent."""
        least = [self.round_to] * self.num_layers
        return self.counter(*self.leave_whole(least, self.max_sparsity))

    def at(self, sparsity: float, slicing_base: float) -> Layout:
        """The layout for SP ``sparsity`` and SB ``slicing_base``."""
        rounding = choose_rounding(
            self.rounding, dynamic=slicing_base < sparsity, spectra=self.spectra is not None
        )
        # A layer left whole below full width is pinned and the widths are rounded again,
        # so that no step is spent on a layer that then stays full width anyway. One that
        # rounding itself took to full width is not pinned: its step was not wasted, and
        # handing it back could cascade a small model to dense. Pinned layers only ever
        # join, so this ends within num_layers rounds.
        pinned = [False] * self.num_layers
        while True:
            dims = self._allocate(sparsity, slicing_base, rounding, pinned)
            widths, whole = self.leave_whole(dims, sparsity)
            narrower = [w and d < self.hidden_size for d, w in zip(dims, whole, strict=True)]
            if not any(narrower):
                return Layout(sparsity, slicing_base, rounding, widths, whole)
            pinned = [p or n for p, n in zip(pinned, narrower, strict=True)]

    def rounds_to_full(self, sparsity: float, slicing_base: float, rounding: Rounding) -> bool:
        """Whether rounding alone, before any layer is left whole, keeps every layer at full
        width: ``sparsity`` slices nothing at this ``round_to``."""
        dims = self._allocate(sparsity, slicing_base, rounding, [False] * self.num_layers)
        return all(d == self.hidden_size for d in dims)

    def _allocate(
        self, sparsity: float, slicing_base: float, rounding: Rounding, pinned: list[bool]
    ) -> list[int]:
        return allocate_dims(
            self.scores if self.scores is not None else [1.0] * self.num_layers,
            self.hidden_size,
            sparsity,
            slicing_base,
            self.round_to,
            self.normalization,
            rounding,
            self.spectra,
            pinned,
        )

    def for_target(
        self,
        target_params: float,
        dense_params: int,
        base_at: Callable[[float], float],
    ) -> Layout:
        """The layout that removes ``target_params`` of ``dense_params``, with SB
        ``base_at(sp)`` at each SP tried."""

        def count(sparsity: float) -> int:
            layout = self.at(sparsity, base_at(sparsity))
            return self.counter(layout.dims, layout.whole)

        sparsity = solve_sparsity(
            target_params, dense_params, count, max_sparsity=self.max_sparsity
        )
        return self.at(sparsity, base_at(sparsity))
