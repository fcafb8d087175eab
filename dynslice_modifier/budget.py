"""Parameter budgets: what a set of widths costs, and which SP meets a real-size target.

"Mean slice" hides the shortcut matrices, the input projection and the embedding; users
think in parameters. The count here is exact for the model this package builds (tested
against ``sum(p.numel())`` of reloaded checkpoints), so a target such as "remove 20% of the
parameters" can be met before any calibration is spent on slicing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from dynslice_modifier.adapters import ModelAdapter
from dynslice_modifier.errors import AllocationError


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bias(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else linear.bias.numel()


def sliced_parameter_count(
    model: nn.Module,
    adapter: ModelAdapter,
    dims: Sequence[int],
    basis: str,
    tied: bool,
) -> int:
    """Parameters of the sliced model, counted on the *dense* model before slicing.

    ``dims[l]`` is layer ``l``'s kept width (its attention and MLP inputs); ``tied`` means
    the embedding table stays shared with the head (input projection instead of slicing).
    """
    hidden = model.config.hidden_size
    layers = adapter.layers(model)
    total = 0
    for idx, layer in enumerate(layers):
        width = dims[idx]
        out = dims[idx + 1] if idx + 1 < len(layers) else hidden
        readers = adapter.attn_inputs(layer) + adapter.mlp_inputs(layer)
        writers = [adapter.attn_output(layer), adapter.mlp_output(layer)]
        total += sum(r.out_features * width + _bias(r) for r in readers)
        o_proj, down = writers
        total += o_proj.in_features * width + (width if o_proj.bias is not None else 0)
        total += down.in_features * out + (out if down.bias is not None else 0)
        # Whatever else the layer holds (e.g. Qwen3's q/k norms) is untouched; the two
        # residual norms keep one scale per kept dim.
        counted = sum(_params(m) for m in (*readers, *writers))
        norms = _params(adapter.input_norm(layer)) + _params(adapter.post_attention_norm(layer))
        total += _params(layer) - counted - norms + 2 * width
        total += (width * width if basis == "sublayer" else 0) + width * out
    embedding = adapter.embedding(model)
    vocab = embedding.num_embeddings
    if tied:
        total += vocab * hidden + hidden * dims[0]
    else:
        head = model.get_output_embeddings()
        total += vocab * dims[0] + _params(head)
    total += _params(model.model.norm)
    return total


def solve_sparsity(
    target_fraction: float,
    dense_params: int,
    count: Callable[[float], int],
    max_sparsity: float,
) -> float:
    """Smallest SP whose model has at most ``(1 - target_fraction) * dense`` parameters.

    ``count(sp)`` must return the parameter count after allocating and rounding for ``sp``;
    it is monotone up to rounding, so bisection is followed by a local check.
    """
    if not 0.0 < target_fraction < 1.0:
        raise AllocationError(f"target_params must be in (0, 1), got {target_fraction}")
    budget = (1.0 - target_fraction) * dense_params
    if count(max_sparsity) > budget:
        raise AllocationError(
            f"removing {target_fraction:.0%} of the parameters needs more than the maximum "
            f"sparsity {max_sparsity:.3f}; lower target_params (the embedding, head and "
            "shortcuts are not sliced away)"
        )
    lo, hi = 0.0, max_sparsity
    for _ in range(40):
        mid = (lo + hi) / 2
        if count(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi
