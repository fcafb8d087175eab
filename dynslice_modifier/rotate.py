"""Weight transforms of SliceGPT: fold norm scales, rotate into a basis, cut to a width.

Convention: hidden states are row vectors; ``basis`` is a ``(hidden, kept)`` matrix whose
orthonormal columns are the kept principal directions. A linear reading the residual maps
``x`` to ``x W^T``; reading coordinates ``x_s = x basis`` instead needs ``W basis``. A linear
writing the residual must write ``y basis``, i.e. ``basis^T W``. All products are taken in
float64 and cast back to the layer's dtype once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dynslice_modifier.adapters import ModelAdapter
from dynslice_modifier.calibration import onloaded, trainable

# Rows (or columns) per float64 product: a vocabulary-sized table or a wide projection is
# never copied whole in float64 on the compute device.
_BLOCK = 4096


def _in_float64(
    weight: torch.Tensor,
    product: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    dim: int = 0,
) -> torch.Tensor:
    """``product`` of ``weight`` in float64 on ``device``, one block along ``dim`` at a time,
    each block rounded back to the weight's dtype once and returned to its device.

    ``device`` is the basis's, the compute device: a weight that stays in host memory (the
    embedding table, or the previous layer's output projection, rotated once the next
    layer's basis is known) is still multiplied there, a block at a time.
    """
    blocks = weight.split(_BLOCK, dim=dim)
    return torch.cat(
        [product(b.to(device, torch.float64)).to(weight.device, weight.dtype) for b in blocks],
        dim=dim,
    )


def _set_weight(module: nn.Linear | nn.Embedding, weight: torch.Tensor) -> None:
    old = module.weight
    # Trainable as before: a model sliced in memory may go on to recovery fine-tuning.
    module.weight = nn.Parameter(
        weight.detach().to(dtype=old.dtype, device=old.device), requires_grad=trainable(module)
    )
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    else:
        module.embedding_dim = weight.shape[1]


def rotate_inputs(linears: list[nn.Linear], basis: torch.Tensor, scale: torch.Tensor) -> None:
    """Make ``linears`` read coordinates in ``basis``, folding in the scale of the norm that
    feeds them: ``norm(x) * scale`` feeding ``W`` equals ``norm(x)`` feeding
    ``W diag(scale)``. One product, so the weights are rounded to their dtype once."""
    q = basis.to(torch.float64)
    s = scale.to(q.device, torch.float64)
    for linear in linears:
        _set_weight(linear, _in_float64(linear.weight, lambda w: (w * s) @ q, q.device))


def rotate_output(linear: nn.Linear, basis: torch.Tensor) -> None:
    q = basis.to(torch.float64)
    _set_weight(linear, _in_float64(linear.weight, lambda w: q.T @ w, q.device, dim=1))
    if linear.bias is not None:
        bias = linear.bias.to(q.device, torch.float64) @ q
        linear.bias = nn.Parameter(
            bias.detach().to(linear.bias.device, linear.bias.dtype),
            requires_grad=trainable(linear, "bias"),
        )


def scale_parameters(module: nn.Module, factor: float, names: tuple[str, ...]) -> None:
    """Multiply those of ``module``'s parameters ``names`` it has by ``factor``, in float64,
    rounded to their dtype once."""
    for name in names:
        old = getattr(module, name, None)
        if old is None:
            continue
        new = (old.detach().to(torch.float64) * factor).to(old.dtype)
        setattr(module, name, nn.Parameter(new, requires_grad=trainable(module, name)))


def fold_multipliers(model: nn.Module, adapter: ModelAdapter, device: torch.device) -> list[str]:
    """Fold the config's scalar on every sublayer's output and on the logits (Granite's
    ``residual_multiplier``, ``logits_scaling``) into the weights that produce them, and set
    both to 1.0; the names of those that were not 1.0. The function is unchanged, but the
    slicer sums each residual connection itself and the sliced model applies neither."""
    folded = []
    config = model.config
    key = adapter.output_multiplier
    if key is not None and getattr(config, key) != 1.0:
        factor = float(getattr(config, key))
        for layer in adapter.layers(model):
            with onloaded(layer, device), torch.no_grad():
                for linear in (adapter.attn_output(layer), adapter.mlp_output(layer)):
                    scale_parameters(linear, factor, ("weight", "bias"))
            if hasattr(layer, key):  # the base layer's own copy, which its forward reads
                setattr(layer, key, 1.0)
        setattr(config, key, 1.0)
        folded.append(key)
    key = adapter.logits_divisor
    if key is not None and getattr(config, key) != 1.0:
        norm = adapter.final_norm(model)
        # The final norm's scale reaches the logits through the head alone.
        with onloaded(norm, device), torch.no_grad():
            scale_parameters(norm, 1.0 / float(getattr(config, key)), ("weight",))
        setattr(config, key, 1.0)
        folded.append(key)
    return folded


def rotate_embedding(embedding: nn.Embedding, basis: torch.Tensor) -> None:
    q = basis.to(torch.float64)
    _set_weight(embedding, _in_float64(embedding.weight, lambda w: w @ q, q.device))


def change_of_basis(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Shortcut matrix taking coordinates in ``source`` to coordinates in ``target``."""
    return source.to(torch.float64).T @ target.to(torch.float64)


def align_basis(basis: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``basis`` rotated within its span so that its coordinates follow ``previous``'s.

    Orthogonal Procrustes: the ``R`` minimising ``|basis R - previous E|`` where ``E`` is the
    rectangular identity, so kept coordinate ``i`` of one basis is matched with coordinate
    ``i`` of the other. Consecutive residual bases span nearly the same subspace, so their
    change of basis ``previous^T basis R`` becomes nearly ``E``: a shortcut stored as its
    difference from ``E`` then holds small numbers that quantize well.

    A wider ``basis`` has coordinates with nothing to follow. Any orthonormal completion
    would do for the function, but SVD picks one at the whim of rounding, which would make
    the result differ between runs; they are taken as the completion closest to the basis's
    own trailing (PCA-ordered) coordinates, which is unique unless a trailing coordinate
    lies in the followed part (then still a rotation, chosen by rounding).

    The completion is sought inside the complement of the followed part, not by projecting
    the trailing coordinates onto it: where the two spans share a direction the projection
    loses rank, and SVD would fill the gap with vectors that need not be orthogonal to the
    followed part, so the result would not be a rotation.
    """
    b, p = basis.to(torch.float64), previous.to(basis.device, torch.float64)
    width = b.shape[1]
    shared = min(width, p.shape[1])
    rotation = _polar(b.T @ p[:, :shared])  # width x shared, orthonormal columns
    if shared < width:
        eye = torch.eye(width, dtype=b.dtype, device=b.device)
        # Eigenvalues of this projector are 0 (shared times) then 1, in ascending order.
        complement = torch.linalg.eigh(eye - rotation @ rotation.T).eigenvectors[:, shared:]
        closest = complement @ _polar(complement[shared:].T)  # nearest to eye[:, shared:]
        rotation = torch.cat([rotation, closest], dim=1)
    return b @ rotation


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest to ``matrix`` (orthogonal Procrustes)."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh
