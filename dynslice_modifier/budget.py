"""Parameter budgets: what a set of widths costs, and which SP meets a real-size target.

"Mean slice" hides the shortcut matrices, the input projection and the embedding; users
think in parameters. The count here is exact for the model this package builds (tested
against ``sum(p.numel())`` of reloaded checkpoints), so a target such as "remove 20% of the
parameters" can be met before any calibration is spent on slicing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from dynslice_modifier.adapters import ModelAdapter
from dynslice_modifier.errors import AllocationError

# One PCA basis per sub-layer (SliceGPT: attention and MLP each read their own) or per layer.
Basis = Literal["sublayer", "layer"]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bias(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else linear.bias.numel()


@dataclass(frozen=True)
class _LayerCost:
    per_width: int  # weights per kept input dim (readers' rows + o_proj's columns)
    down_rows: int  # down_proj weights per output dim
    biases: int  # readers' biases (unchanged by slicing)
    o_bias: bool
    down_bias: bool
    fixed: int  # whatever slicing does not touch (e.g. Qwen3's q/k norms)


def head_sliced(slice_head: bool, last_whole: bool) -> bool:
    """Whether the head reads a sliced basis (``slice_head``): a whole last layer has none
    to hand it. The slicer and the parameter count both ask here."""
    return slice_head and not last_whole


def shares_basis(
    idx: int, layers_per_basis: int, widths: tuple[int, int], whole: tuple[bool, bool]
) -> bool:
    """Whether decoder layer ``idx + 1`` reads the residual in layer ``idx``'s basis, so no
    shortcut stands between them: both sliced (neither whole), to one width, and in one
    block of ``layers_per_basis`` layers counted from layer 0. The caller checks that
    layer ``idx + 1`` exists. The slicer and the parameter count both ask here."""
    return (idx + 1) % layers_per_basis != 0 and widths[0] == widths[1] and not any(whole)


class ParameterCounter:
    """Exact parameter count of the sliced model for any widths, from the *dense* model.

    Built once (it walks the modules); calling it is arithmetic, so allocation searches can
    ask thousands of times.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        basis: Basis,
        tied: bool,
        aligned: bool,
        slice_head: bool = False,
        layers_per_basis: int = 1,
    ) -> None:
        self.hidden = model.config.hidden_size
        self.basis = basis
        self.layers_per_basis = layers_per_basis
        self.tied = tied
        self.slice_head = slice_head
        # Aligned bases of full width follow each other exactly: no shortcut between them.
        self.aligned = aligned
        self.layers: list[_LayerCost] = []
        for layer in adapter.layers(model):
            readers = adapter.attn_inputs(layer) + adapter.mlp_inputs(layer)
            o_proj, down = adapter.attn_output(layer), adapter.mlp_output(layer)
            counted = sum(_params(m) for m in (*readers, o_proj, down))
            norms = _params(adapter.input_norm(layer)) + _params(adapter.post_attention_norm(layer))
            self.layers.append(
                _LayerCost(
                    per_width=sum(r.out_features for r in readers) + o_proj.in_features,
                    down_rows=down.in_features,
                    biases=sum(_bias(r) for r in readers),
                    o_bias=o_proj.bias is not None,
                    down_bias=down.bias is not None,
                    fixed=_params(layer) - counted - norms,
                )
            )
        self.vocab = adapter.embedding(model).num_embeddings
        head = model.get_output_embeddings()
        self.head = 0 if tied else _params(head)
        self.head_bias = 0 if getattr(head, "bias", None) is None else head.bias.numel()
        self.final_norm = _params(adapter.final_norm(model))

    def __call__(self, dims: Sequence[int], whole: Sequence[bool] | None = None) -> int:
        """``dims[l]``: layer ``l``'s kept width; ``whole[l]``: left at full width in the
        original basis, so no shortcut inside it nor between it and a whole neighbour."""
        count = len(self.layers)
        whole = list(whole) if whole is not None else [False] * count
        total = self._table(dims[0], whole[0]) + self._head(dims[-1], whole[-1])
        for idx in range(count - 1):
            total += self._layer(idx, dims[idx], dims[idx + 1], whole[idx], whole[idx + 1])
        return total + self._last_layer(dims[-1], whole[-1])

    def whole_layers(self, dims: Sequence[int]) -> list[bool]:
        """The layers to leave whole (full width, original basis) for the smallest model.

        A whole layer needs no shortcut inside it nor between it and a whole neighbour and,
        as layer 0 of a tied model, no input projection; a slice that cannot pay for its
        shortcuts is better not made. A run of full-width rotated layers, which share one
        basis, may pay only as a whole, and one layer's verdict can change with the next's,
        so the choice is made exactly, over all of them at once: each layer's count depends
        only on its own choice and the next layer's, so dynamic programming along the layers
        finds the minimum. Of equal counts, the one with more whole layers wins: the same
        size, and more of the original function.
        """
        hidden, count = self.hidden, len(self.layers)

        def width(idx: int, whole: bool) -> int:
            return hidden if whole else dims[idx]

        # For each choice at layer idx: ((parameters of layers idx.., -whole layers), choices).
        Best = tuple[tuple[int, int], list[bool]]
        after: dict[bool, Best] = {}
        for idx in reversed(range(count)):
            current: dict[bool, Best] = {}
            for here in (False, True):
                own = width(idx, here)
                if idx + 1 == count:
                    cost = self._last_layer(own, here) + self._head(own, here)
                    current[here] = ((cost, -here), [here])
                    continue
                current[here] = min(
                    (
                        (rest + self._layer(idx, own, width(idx + 1, nxt), here, nxt), n - here),
                        [here, *choices],
                    )
                    for nxt, ((rest, n), choices) in after.items()
                )
            after = current
        _, choices = min(
            ((rest + self._table(width(0, here), here), n), choices)
            for here, ((rest, n), choices) in after.items()
        )
        return choices

    def _layer(self, idx: int, width: int, out: int, whole: bool, next_original: bool) -> int:
        """Decoder layer ``idx`` reading ``width`` dims and writing ``out``; ``whole``: it
        stays in the original basis, ``next_original``: so does what reads its output."""
        cost, hidden = self.layers[idx], self.hidden
        total = cost.per_width * width + cost.biases + cost.fixed
        total += (width if cost.o_bias else 0) + cost.down_rows * out
        total += out if cost.down_bias else 0
        total += 2 * width  # the two residual norms keep one scale per kept dim
        if self.basis == "sublayer" and not whole:
            total += 0 if self.aligned and width == hidden else width * width
        if whole and next_original:
            return total
        last = idx + 1 == len(self.layers)
        if not last and shares_basis(
            idx, self.layers_per_basis, (width, out), (whole, next_original)
        ):
            return total
        # Aligned bases of full width follow each other exactly; alignment restarts after
        # the original basis (see slicer._orient).
        if self.aligned and not (whole or next_original) and width == out == hidden:
            return total
        return total + width * out  # the residual's change of basis

    def _last_layer(self, width: int, whole: bool) -> int:
        """The last layer writes in the original basis, or in a sliced head's at its width."""
        sliced_head = self.head_sliced(whole)
        out = width if sliced_head else self.hidden
        return self._layer(len(self.layers) - 1, width, out, whole, not sliced_head)

    def head_sliced(self, last_whole: bool) -> bool:
        return head_sliced(self.slice_head, last_whole)

    def _table(self, width: int, whole: bool) -> int:
        """The embedding table, and a tied one's input projection into layer 0's basis."""
        if self.tied:
            return self.vocab * self.hidden + (0 if whole else self.hidden * width)
        return self.vocab * width

    def _head(self, width: int, last_whole: bool) -> int:
        """The head and the final norm."""
        if self.head_sliced(last_whole):
            # The head, untied from any shared table, and the sliced final norm.
            return self.vocab * width + self.head_bias + width
        return (0 if self.tied else self.head) + self.final_norm


def check_target_reachable(
    target_fraction: float, dense_params: int, least: int, max_sparsity: float
) -> float:
    """The parameters a model may keep when ``target_params`` asks to remove
    ``target_fraction`` of them, if the smallest model (``least`` parameters, at
    ``max_sparsity``: every layer one rounding step wide) fits."""
    if not 0.0 < target_fraction < 1.0:
        raise AllocationError(f"target_params must be in (0, 1), got {target_fraction}")
    budget = (1.0 - target_fraction) * dense_params
    if least > budget:
        raise AllocationError(
            f"removing {target_fraction:.0%} of the parameters needs more than the largest "
            f"possible SP, {max_sparsity:.3f} (every layer one rounding step wide); lower "
            "target_params (the embedding, head and shortcuts are not sliced away)"
        )
    return budget


def solve_sparsity(
    target_fraction: float,
    dense_params: int,
    count: Callable[[float], int],
    max_sparsity: float,
) -> float:
    """Smallest SP whose model has at most ``(1 - target_fraction) * dense`` parameters.

    ``count(sp)`` must return the parameter count after allocating and rounding for ``sp``.
    Rounding makes it a step function of ``sp``, monotone only nearly, so bisection returns
    an SP whose count meets the budget (the upper end always does), not always the smallest.
    """
    budget = check_target_reachable(
        target_fraction, dense_params, count(max_sparsity), max_sparsity
    )
    lo, hi = 0.0, max_sparsity
    for _ in range(40):
        mid = (lo + hi) / 2
        if count(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi
