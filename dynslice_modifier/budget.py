"""Parameter budgets: what a set of widths costs, and which SP meets a real-size target.

"Mean slice" hides the shortcut matrices, the input projection and the embedding; users
think in parameters. The count here is exact for the model this package builds (tested
against ``sum(p.numel())`` of reloaded checkpoints), so a target such as "remove 20% of the
parameters" can be met before any calibration is spent on slicing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from dynslice_modifier.adapters import ModelAdapter
from dynslice_modifier.errors import AllocationError


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


class ParameterCounter:
    """Exact parameter count of the sliced model for any widths, from the *dense* model.

    Built once (it walks the modules); calling it is arithmetic, so allocation searches can
    ask thousands of times.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        basis: str,
        tied: bool,
        aligned: bool,
        slice_head: bool = False,
    ) -> None:
        self.hidden = model.config.hidden_size
        self.basis = basis
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
        hidden, count = self.hidden, len(self.layers)
        whole = list(whole) if whole is not None else [False] * count
        # The last layer writes back in the original basis, or in the head's at its own width.
        head_sliced = self.slice_head and not whole[-1]
        final = dims[-1] if head_sliced else hidden
        unrotated = [*whole, not head_sliced]

        def same_rotated_basis(idx: int, width: int, out: int) -> bool:
            # Alignment restarts after the original basis (see slicer._orient).
            rotated = not (unrotated[idx] or unrotated[idx + 1])
            return self.aligned and rotated and width == out == hidden

        total = 0
        for idx, cost in enumerate(self.layers):
            width = dims[idx]
            out = dims[idx + 1] if idx + 1 < count else final
            total += cost.per_width * width + cost.biases + cost.fixed
            total += (width if cost.o_bias else 0) + cost.down_rows * out
            total += out if cost.down_bias else 0
            total += 2 * width  # the two residual norms keep one scale per kept dim
            if self.basis == "sublayer" and not whole[idx]:
                total += 0 if self.aligned and width == hidden else width * width
            both_original = unrotated[idx] and unrotated[idx + 1]
            if not (both_original or same_rotated_basis(idx, width, out)):
                total += width * out
        if self.tied:
            total += self.vocab * hidden + (0 if whole[0] else hidden * dims[0])
        else:
            total += self.vocab * dims[0]
        if head_sliced:
            # The head, untied from any shared table, and the sliced final norm.
            return total + self.vocab * final + self.head_bias + final
        return total + (0 if self.tied else self.head) + self.final_norm


def unprofitable_layers(
    dims: Sequence[int], hidden: int, count: Callable[[list[int], list[bool]], int]
) -> list[bool]:
    """Layers to leave whole: those whose slicing adds more shortcut weights than it removes.

    Greedy on the exact count ``count(dims, whole)``: keep taking the move that lowers the
    total the most, until none does. A move returns one sliced layer to full width
    (unrotated), or leaves whole a full-width layer that is only rotated, or a run of them:
    rotated neighbours of one basis need no shortcut between them, so such a run may pay
    only as a whole, and a full-width layer computes the same rotated or not, so these are
    taken when they merely break even. Shortcuts couple neighbours, so one layer's verdict
    can change once the next is whole.
    """
    dims = list(dims)
    whole = [False] * len(dims)
    current = count(dims, whole)
    while True:
        best, best_count = None, current
        for move in _moves(dims, whole, hidden):
            trial_dims = [hidden if i in move else d for i, d in enumerate(dims)]
            trial_whole = [w or i in move for i, w in enumerate(whole)]
            trial = count(trial_dims, trial_whole)
            full_width = all(dims[i] >= hidden for i in move)
            if trial < best_count or (best is None and full_width and trial == current):
                best, best_count = move, trial
        if best is None:
            return whole
        for idx in best:
            dims[idx], whole[idx] = hidden, True
        current = best_count


def _moves(dims: list[int], whole: list[bool], hidden: int) -> list[tuple[int, ...]]:
    """Each layer not yet whole, and each maximal run of full-width ones."""
    moves = [(idx,) for idx in range(len(dims)) if not whole[idx]]
    run: list[int] = []
    for idx in [*range(len(dims)), None]:
        if idx is not None and not whole[idx] and dims[idx] >= hidden:
            run.append(idx)
            continue
        if len(run) > 1:
            moves.append(tuple(run))
        run = []
    return moves


def check_target_reachable(
    target_fraction: float, dense_params: int, least: int, max_sparsity: float
) -> float:
    """The parameter budget of ``target_params``, if the smallest model (``least``
    parameters, at ``max_sparsity``: every layer one rounding step wide) fits it."""
    if not 0.0 < target_fraction < 1.0:
        raise AllocationError(f"target_params must be in (0, 1), got {target_fraction}")
    budget = (1.0 - target_fraction) * dense_params
    if least > budget:
        raise AllocationError(
            f"removing {target_fraction:.0%} of the parameters needs more than the maximum "
            f"sparsity {max_sparsity:.3f}; lower target_params (the embedding, head and "
            "shortcuts are not sliced away)"
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
