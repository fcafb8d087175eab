"""The rotate-and-slice pass (after the Layer Redundancy pass of ``redundancy.py``; the
result becomes a ``DynSliceForCausalLM`` in ``conversion.py``).

Activations are kept in the model's *original* coordinates (full hidden size) as the
already-sliced upstream model computes them. For decoder layer ``l``:

1. the PCA of its input gives the attention basis ``A`` (kept width ``a``); the previous
   writer is now rotated into it: layer ``l-1``'s MLP output and shortcut, or for layer 0
   the embedding table (untied) or an ``input_projection`` from the shared table (tied);
2. the attention runs on the sliced input; the PCA of the residual after attention gives the
   MLP basis ``M`` (width ``m``), into which ``o_proj`` and the attention shortcut write;
3. the MLP runs on the sliced input; its output (still unrotated) is the next layer's input.

The last layer writes back to the original basis at full width, so the final norm keeps its
weight and the head (tied to the embedding or not) is unchanged; with ``slice_head`` it writes
into one more PCA basis, of the last layer's width, which the head (untied, the final norm's
scale folded in) reads, as SliceGPT does. With ``basis="layer"`` the
attention and MLP of a layer share one basis (from the PCA of both signals), which removes
the attention shortcut; with ``layers_per_basis`` above 1, consecutive layers of one width
in a block share one too (from the PCA of all their signals), which removes the MLP
shortcuts between them.

Only the span of a kept basis is fixed by the PCA; its rotation within that span is free
and is chosen for quantization (``_orient``): aligned with the previous basis, so that
shortcuts are nearly the identity and are stored as their difference from it, and/or
followed by a block Hadamard rotation that spreads outlier channels.

A layer marked *whole* keeps full width in the original basis (``a = m = hidden``, no
rotation): no shortcut inside it or towards a whole neighbour. The modifier leaves layers
whole when slicing them would add more shortcut weights than it removes.

Each layer is run once per pass. A run captures the first layer's inputs, takes the
redundancy pass over the unsliced model (unless the widths need neither its scores nor its
spectra), captures them again and takes this slicing pass (plus a pass over each shared
basis's unsliced layers with ``basis="layer"``, without the last one's MLP): about 2.6
forward passes of the calibration set on SmolLM2 (README, "How it works").
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from compressed_tensors.offload import disable_onloading
from loguru import logger
from torch import nn
from tqdm.auto import tqdm

from dynslice_modifier.adapters import ModelAdapter
from dynslice_modifier.budget import Basis, head_sliced, shares_basis
from dynslice_modifier.calibration import (
    LayerInputs,
    check_finite,
    is_offloaded,
    offload_new_parts,
    offload_settings,
    offloaded_modules,
    onloaded,
    storage_device,
    stored_parameters,
    trainable,
)
from dynslice_modifier.hadamard import block_hadamard
from dynslice_modifier.modeling.configuration_dynslice import INPUT_PROJECTION, SHORTCUTS
from dynslice_modifier.modeling.modeling_dynslice import SlicedRMSNorm, rms_normalize
from dynslice_modifier.pca import CovarianceAccumulator, principal_basis
from dynslice_modifier.rotate import (
    align_basis,
    change_of_basis,
    rotate_embedding,
    rotate_inputs,
    rotate_output,
)

# Parameters are compared as stored: under compressed-tensors offloading (a model loaded
# with a device_map, or any model once llm-compressor's pipelines set an onload device)
# every read of an offloaded weight returns a fresh onloaded copy, so a tied head and
# embedding are one tensor only with onloading disabled.


def count_parameters(model: nn.Module) -> int:
    """Every parameter once (a tied head and embedding are one table)."""
    with disable_onloading():
        unique = {id(p): p.numel() for p in model.parameters()}
    return sum(unique.values())


def embeddings_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    if head is None:
        return False
    with disable_onloading():
        return head.weight is model.get_input_embeddings().weight


def untie_head(model: nn.Module) -> None:
    """Give a head that shares the embedding table a copy of its own, to rotate apart."""
    if not embeddings_tied(model):
        return
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    copies = [nn.Parameter(m.weight.detach().clone(), requires_grad=trainable(m)) for m in modules]
    # Each entry is deleted before its copy is registered: an offload cache writes a value of
    # the same shape into the storage the two share, and the table would stay tied. Deleted
    # with onloading off, which leaves that storage (a file, for disk offload) alone: with
    # it on, the first deletion removes it and the second finds nothing.
    for module, own in zip(modules, copies, strict=True):
        with disable_onloading():
            delattr(module, "weight")
        module.register_parameter("weight", own)


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in plain memory, for a trial to rotate and throw away.

    ``copy.deepcopy`` of a module offloaded by compressed-tensors copies the stand-ins of
    its weights, which the disk cache's index (keyed by the originals) does not know; so
    the offloaded modules lend the copy their onloaded weights and plain ``forward``.
    """
    offloaded = offloaded_modules(module)
    saved = [(m, m._parameters, m._buffers, dict(m.__dict__)) for m in offloaded]
    try:
        for m in offloaded:
            m._parameters = {
                name: None if p is None else nn.Parameter(p, requires_grad=False)
                for name, p in m._parameters.items()
            }
            m._buffers = dict(m._buffers.items())
            # The offload wrapper's forward is an instance attribute over the class's own.
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_original_forward_func", None)
        return copy.deepcopy(module)
    finally:
        for m, parameters, buffers, attributes in saved:
            m.__dict__.update(attributes)
            m._parameters, m._buffers = parameters, buffers


@dataclass
class _Writer:
    """A linear that writes the residual and still awaits the next basis."""

    output: nn.Linear
    source_basis: torch.Tensor  # basis its residual shortcut reads from


@dataclass(frozen=True)
class Shortcut:
    """A change of basis ``S`` (input width x output width) as its layer will store it."""

    matrix: torch.Tensor  # S, or S - E (E the rectangular identity) where ``delta``
    delta: bool


@dataclass
class SlicingResult:
    attn_dims: list[int]
    mlp_dims: list[int]
    attn_shortcuts: list[Shortcut | None]
    mlp_shortcuts: list[Shortcut | None]
    input_projection: Shortcut | None
    embedding_sliced: bool
    # Consecutive bases aligned: shortcuts are saved as their difference from the identity.
    aligned: bool = False
    # The head's width when it is sliced (``slice_head``); None: full width, original basis.
    final_dim: int | None = None

    def stored_as_delta(self) -> bool | list[str]:
        """Which shortcuts are stored as their difference from the identity (the
        ``slicing.delta_shortcuts`` value): true for all, false for none, else their names."""
        if not self.aligned:
            return False
        delta = {
            f"{idx}.{name}": shortcut.delta
            for idx in range(len(self.attn_dims))
            for name, shortcut in self.changes_of_basis(idx)
        }
        # No shortcut at all (every layer left whole) is no delta either: "true" would
        # need a newer plugin to read what is the dense model's layout.
        if delta and all(delta.values()):
            return True
        return [name for name, stored in delta.items() if stored] or False

    def changes_of_basis(self, idx: int) -> list[tuple[str, Shortcut]]:
        """(module name, matrix) of every shortcut decoder layer ``idx`` carries."""
        named = [
            (INPUT_PROJECTION, self.input_projection if idx == 0 else None),
            *zip(SHORTCUTS, (self.attn_shortcuts[idx], self.mlp_shortcuts[idx]), strict=True),
        ]
        return [(name, shortcut) for name, shortcut in named if shortcut is not None]


class RotateAndSlice:
    """Second pass: rotates and slices the model in place, one decoder layer at a time
    (``in_place=False``, for ``slicing_base: auto``'s trials: slices throwaway copies of the
    layers and leaves the model as it was)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        dims: list[int],
        device: torch.device,
        basis: Basis = "sublayer",
        keep_tied: bool = True,
        hadamard: bool = False,
        align: bool = False,
        in_place: bool = True,
        whole: list[bool] | None = None,
        slice_head: bool = False,
        layers_per_basis: int = 1,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.dims = dims
        # Whole layers keep full width in the original basis (see ParameterCounter.whole_layers).
        self.whole = whole or [False] * len(dims)
        self.slice_head = head_sliced(slice_head, self.whole[-1])
        self.device = device
        self.basis = basis
        self.layers_per_basis = layers_per_basis
        # The basis of the block being sliced, which the next layer may share.
        self._shared: torch.Tensor | None = None
        self.hidden_size = model.config.hidden_size
        self.eps = model.config.rms_norm_eps
        self.tied = keep_tied and embeddings_tied(model)
        self.hadamard = hadamard
        self.align = align
        # What the shortcuts are kept in until the conversion casts them to it anyway: the
        # layers' dtype (float32 should they differ).
        dtypes = {p.dtype for layer in adapter.layers(model) for p in stored_parameters(layer)}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        # Aligned bases keep ``E`` as their change of basis only if every Hadamard has the
        # same blocks: the largest power of two dividing every sliced width.
        sliced = [d for d, w in zip(dims, self.whole, strict=True) if not w]
        common = math.gcd(*sliced) if sliced else 1
        self.hadamard_block = min(common & -common, 256) if align and sliced else 256
        # The smallest block any kept basis gets: unaligned, each takes the largest power
        # of two dividing its own width.
        self.smallest_hadamard_block = (
            self.hadamard_block if align else min((min(d & -d, 256) for d in sliced), default=256)
        )
        # The previous basis of the chain being aligned, before its Hadamard rotation.
        self._chain: torch.Tensor | None = None
        # A trial (``in_place=False``) slices a copy of each layer and leaves the model as it
        # was: only the activations it carries, i.e. the sliced model's function, are kept.
        self.in_place = in_place
        self._heldout: frozenset[int] = frozenset()
        # The covariance of a layer's output is gathered while computing it, so the next
        # layer's attention basis costs no extra pass.
        self._next_input_cov: CovarianceAccumulator | None = None

    def _norm(self, width: int, like: torch.Tensor) -> SlicedRMSNorm:
        return SlicedRMSNorm(width, self.hidden_size, self.eps, like.device, like.dtype)

    def _pca(self, acc: CovarianceAccumulator, width: int, where: str) -> torch.Tensor:
        acc.all_reduce()
        eigenvalues, vectors = principal_basis(acc, where)
        rank = int((eigenvalues > 1e-9 * eigenvalues[0]).sum())
        # At full width nothing is chosen, so directions without signal are harmless.
        if rank < width < self.hidden_size:
            logger.warning(
                f"{where}: the calibration signal spans only {rank} dimensions but {width} "
                f"are kept, so {width - rank} kept directions are arbitrary. Use more, and "
                "more varied, calibration samples (or a larger sparsity)."
            )
        kept = eigenvalues[:width].clamp_min(0).sum() / eigenvalues.clamp_min(0).sum()
        logger.debug(f"{where}: keeping {width}/{len(eigenvalues)} dims, {kept:.4%} of energy")
        return self._orient(vectors[:, :width])

    def _orient(self, basis: torch.Tensor) -> torch.Tensor:
        """Rotate a kept basis within its span: free for the function, chosen for quantization."""
        if self.align and self._chain is not None:
            basis = align_basis(basis, self._chain)
        self._chain = basis
        if self.hadamard:
            block = block_hadamard(basis.shape[1], self.hadamard_block)
            basis = basis @ block.to(basis.device, basis.dtype)
        return basis

    def _finish_writer(self, writer: _Writer, target: torch.Tensor) -> Shortcut | None:
        """Rotate a pending writer into ``target``; return its shortcut."""
        rotate_output(writer.output, target)
        return self._keep(change_of_basis(writer.source_basis, target))

    def _keep(self, matrix: torch.Tensor) -> Shortcut | None:
        """The change of basis ``matrix`` (float64) as its layer will store it, held in host
        memory until the conversion: every layer's wait there, in the layers' dtype rather
        than float64 (a quarter of the memory for a 16-bit model), and formed in float64
        first, so the stored values are those rounded once.

        A square identity costs parameters and does nothing: none is kept. With aligned
        bases a shortcut within the aligned chain is nearly the identity and is stored as
        its small difference from it; one that joins a basis no alignment reaches (the
        original basis at the embedding, a whole layer or a full-width head) is a general
        rotation, whose difference from the identity is larger than itself (about sqrt(2)
        times), and is stored whole.
        """
        eye = _identity_like(matrix)
        square = matrix.shape[0] == matrix.shape[1]
        if square and torch.allclose(matrix, eye, rtol=0.0, atol=1e-10):
            return None
        # |S - E|^2 = |S|^2 - 2 tr(S E^T) + rank(E) < |S|^2.
        delta = self.align and 2 * float(matrix.diagonal().sum()) > min(matrix.shape)
        stored = matrix - eye if delta else matrix
        return Shortcut(stored.to(self.dtype).cpu(), delta)

    def _accumulate(
        self, acc: CovarianceAccumulator, hidden: torch.Tensor, inputs: LayerInputs, b: int
    ) -> None:
        if b not in self._heldout:
            acc.add(hidden, inputs.mask(b, self.device))

    def run(self, inputs: LayerInputs, heldout: frozenset[int] = frozenset()) -> SlicingResult:
        """Slice every layer; batches in ``heldout`` are carried but not used by the PCA.

        On return ``inputs.hidden`` holds the sliced model's final residual stream (before
        the final norm) in the original basis.
        """
        adapter = self.adapter
        self._heldout = heldout
        self._chain = None
        self._shared = None
        layers = adapter.layers(self.model)
        eye = torch.eye(self.hidden_size, dtype=torch.float64, device=self.device)
        attn_dims, mlp_dims, attn_sc, mlp_sc = [], [], [], []
        pending: _Writer | None = None
        input_projection: Shortcut | None = None
        for idx, layer in enumerate(tqdm(layers, desc="Rotate and slice", leave=False)):
            with self._onload(layer) as layer, torch.no_grad():
                scales = self._unit_norms(layer, self.dims[idx])
                a_basis = self._attention_basis(layer, inputs, idx, scales, eye)
                if pending is not None:
                    mlp_sc.append(self._finish_writer(pending, a_basis))
                elif self.tied:
                    # The shared table stays in the original basis; layer 0 projects it.
                    input_projection = self._keep(change_of_basis(eye, a_basis))
                elif self.in_place and not self.whole[idx]:
                    self._rotate_embedding(a_basis)
                attn_scale, mlp_scale = scales
                rotate_inputs(adapter.attn_inputs(layer), a_basis, attn_scale)
                m_basis, shortcut = self._through_attention(layer, inputs, idx, a_basis)
                attn_sc.append(shortcut)
                rotate_output(adapter.attn_output(layer), m_basis)
                rotate_inputs(adapter.mlp_inputs(layer), m_basis, mlp_scale)
                last = idx == len(layers) - 1
                self._through_mlp(layer, inputs, idx, m_basis, last)
                pending = _Writer(adapter.mlp_output(layer), m_basis)
                attn_dims.append(a_basis.shape[1])
                mlp_dims.append(m_basis.shape[1])
                if last:
                    final = self._final_basis(inputs) if self.slice_head else eye
                    mlp_sc.append(self._finish_writer(pending, final))
        return SlicingResult(
            attn_dims=attn_dims,
            mlp_dims=mlp_dims,
            attn_shortcuts=attn_sc,
            mlp_shortcuts=mlp_sc,
            input_projection=input_projection,
            # A whole layer 0 reads the table as it came: unrotated, at full width.
            embedding_sliced=not self.tied and not self.whole[0],
            aligned=self.align,
            final_dim=self.dims[-1] if self.slice_head else None,
        )

    def _onload(self, layer: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """The layer to rotate and slice, on the compute device for the duration."""
        if self.in_place:
            return onloaded(layer, self.device)
        # Copied where it lives (an offloaded layer lends its onloaded weights), so the
        # compute device holds the copy alone, not the original beside it; the copy is
        # thrown away, never moved back.
        return contextlib.nullcontext(plain_copy(layer).to(self.device))

    def _attention_basis(
        self,
        layer: nn.Module,
        inputs: LayerInputs,
        idx: int,
        scales: tuple[torch.Tensor, torch.Tensor],
        eye: torch.Tensor,
    ) -> torch.Tensor:
        """The basis layer ``idx``'s attention reads the residual in."""
        if self.whole[idx]:
            self._next_input_cov = None
            # The original basis is no PCA basis to follow: the chain restarts.
            self._chain = None
            return eye
        shared = self._shared if idx > 0 and self._shares(idx - 1) else None
        if shared is not None:
            return shared
        if self.basis == "layer":
            self._shared = self._joint_basis(layer, inputs, idx, scales)
            return self._shared
        return self._input_basis(inputs, idx)

    def _shares(self, idx: int) -> bool:
        """Whether layer ``idx + 1`` reads in layer ``idx``'s basis (``layers_per_basis``)."""
        nxt = idx + 1
        return nxt < len(self.dims) and shares_basis(
            idx,
            self.layers_per_basis,
            (self.dims[idx], self.dims[nxt]),
            (self.whole[idx], self.whole[nxt]),
        )

    def _rotate_embedding(self, basis: torch.Tensor) -> None:
        embedding = self.adapter.embedding(self.model)
        # Fetched once if offloaded; a table in host memory stays there, and goes to the
        # accelerator a block at a time for its product.
        fetched_once = is_offloaded(embedding)
        with onloaded(embedding, self.device) if fetched_once else contextlib.nullcontext():
            rotate_embedding(embedding, basis)

    def _through_attention(
        self, layer: nn.Module, inputs: LayerInputs, idx: int, a_basis: torch.Tensor
    ) -> tuple[torch.Tensor, Shortcut | None]:
        """Carry the residual through the (rotated) attention; return the MLP's basis and
        the shortcut into it."""
        adapter = self.adapter

        def attention(hidden: torch.Tensor, b: int) -> torch.Tensor:
            kwargs = inputs.layer_kwargs(b, idx, self.device)
            return adapter.attn(layer)(hidden_states=adapter.input_norm(layer)(hidden), **kwargs)[0]

        # The MLP basis needs the post-attention signal only with sublayer bases.
        shared = self.whole[idx] or self.basis == "layer"
        acc = None if shared else CovarianceAccumulator(self.hidden_size, self.device)
        self._add_sublayer(inputs, a_basis, attention, acc, f"decoder layer {idx}, after attention")
        if acc is None:
            return a_basis, None
        m_basis = self._pca(acc, self.dims[idx], f"layer {idx} MLP input")
        return m_basis, self._keep(change_of_basis(a_basis, m_basis))

    def _through_mlp(
        self, layer: nn.Module, inputs: LayerInputs, idx: int, m_basis: torch.Tensor, last: bool
    ) -> None:
        """Carry the residual through the (rotated) MLP, gathering the covariance of its
        output where the next PCA reads it: the next layer's input (unless that layer has
        its own joint basis or stays whole) or the head's."""
        adapter = self.adapter

        def mlp(hidden: torch.Tensor, _b: int) -> torch.Tensor:
            return adapter.mlp(layer)(adapter.post_attention_norm(layer)(hidden))

        feeds_pca = self.slice_head if last else self.basis != "layer" and not self.whole[idx + 1]
        acc = CovarianceAccumulator(self.hidden_size, self.device) if feeds_pca else None
        self._add_sublayer(inputs, m_basis, mlp, acc, f"decoder layer {idx} output")
        self._next_input_cov = acc

    def _add_sublayer(
        self,
        inputs: LayerInputs,
        basis: torch.Tensor,
        sublayer: Callable[[torch.Tensor, int], torch.Tensor],
        acc: CovarianceAccumulator | None,
        where: str,
    ) -> None:
        """Add ``sublayer(residual in basis, batch)`` to the residual ``inputs`` carries (in
        the original basis), batch by batch; ``acc`` gathers the sum's covariance."""
        # Activations are projected in float32; covariances and weights use float64.
        b32 = basis.float()
        for b in range(len(inputs)):
            x = inputs.hidden[b].to(self.device)
            xs = x.float() @ b32
            out = (xs @ b32.T + sublayer(xs.to(x.dtype), b).float()).to(x.dtype)
            check_finite(out, where)
            if acc is not None:
                self._accumulate(acc, out, inputs, b)
            inputs.hidden[b] = out.to(inputs.hidden[b].device)

    def _final_basis(self, inputs: LayerInputs) -> torch.Tensor:
        """The head's basis: PCA of the last layer's output at the last layer's width.

        In place, the final norm's scale is folded into the head (untied from a shared table,
        which stays in the original basis) and the head rotated and cut. A trial leaves both
        and projects the carried residual onto the basis instead: the unsliced norm and
        head applied to ``x F F^T`` compute what the sliced ones do with ``x F``.
        """
        basis = self._input_basis(inputs, len(self.dims) - 1, "final norm input (head)")
        if self.in_place:
            self._slice_head(basis)
        else:
            f32 = basis.float().to(self.device)
            for b in range(len(inputs)):
                x = inputs.hidden[b].to(self.device)
                projected = ((x.float() @ f32) @ f32.T).to(x.dtype)
                inputs.hidden[b] = projected.to(inputs.hidden[b].device)
        return basis

    def _slice_head(self, basis: torch.Tensor) -> None:
        model = self.model
        head, norm = model.get_output_embeddings(), self.adapter.final_norm(model)
        # The new norm goes where the old one is stored, offloaded as it is: built where the
        # computation onloads it (the accelerator), it would stay there, away from the model.
        offload = offload_settings(norm)
        home = stored_parameters(norm)[0].device if offload is None else storage_device(offload)
        with onloaded(head, self.device), onloaded(norm, self.device), torch.no_grad():
            untie_head(model)
            rotate_inputs([head], basis, norm.weight)
            width, dtype = basis.shape[1], norm.weight.dtype
        sliced = SlicedRMSNorm(width, self.hidden_size, self.eps, home, dtype)
        if offload is not None:
            offload_new_parts(sliced, offload)
        self.adapter.set_final_norm(model, sliced)

    def _unit_norms(self, layer: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the layer's two residual norms by scale-free ones of ``width``; their
        scales are returned, to be folded into the linears that read them as those are
        rotated."""
        adapter = self.adapter
        attn_scale = adapter.input_norm(layer).weight
        mlp_scale = adapter.post_attention_norm(layer).weight
        setattr(layer, adapter.layout["input_norm"], self._norm(width, attn_scale))
        setattr(layer, adapter.layout["post_attention_norm"], self._norm(width, mlp_scale))
        return attn_scale, mlp_scale

    def _input_basis(self, inputs: LayerInputs, idx: int, where: str | None = None) -> torch.Tensor:
        """PCA of the layer input; the previous layer already accumulated it."""
        acc = self._next_input_cov
        if acc is None:
            acc = CovarianceAccumulator(self.hidden_size, self.device)
            for b in range(len(inputs)):
                self._accumulate(acc, inputs.hidden[b].to(self.device), inputs, b)
        self._next_input_cov = None
        return self._pca(acc, self.dims[idx], where or f"layer {idx} attention input")

    def _joint_basis(
        self,
        layer: nn.Module,
        inputs: LayerInputs,
        idx: int,
        scales: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """One basis for both sub-layers of layer ``idx`` and of the layers that share its
        basis (``layers_per_basis``): PCA of every input and post-attention signal.

        The signals after the input are estimated with the unsliced layers: none is
        rotated yet, and layer ``idx``'s norms, already replaced, had ``scales``.
        """
        adapter = self.adapter
        block = [idx]
        while self._shares(block[-1]):
            block.append(block[-1] + 1)

        def scaled(scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            # Full width here, so the plain normalisation, scaled as the original norm did.
            return lambda x: rms_normalize(x, self.hidden_size, self.eps) * scale.to(x.dtype)

        acc = CovarianceAccumulator(self.hidden_size, self.device)
        layers = adapter.layers(self.model)
        with contextlib.ExitStack() as stack:
            members = [(layer, *map(scaled, scales))]
            for later in block[1:]:
                other = stack.enter_context(self._onload(layers[later]))
                members.append(
                    (other, adapter.input_norm(other), adapter.post_attention_norm(other))
                )
            for b in range(len(inputs)):
                if b in self._heldout:
                    continue
                x = inputs.hidden[b].to(self.device)
                for position, (member, attn_norm, mlp_norm) in enumerate(members):
                    kwargs = inputs.layer_kwargs(b, block[position], self.device)
                    self._accumulate(acc, x, inputs, b)
                    x = x + adapter.attn(member)(hidden_states=attn_norm(x), **kwargs)[0]
                    self._accumulate(acc, x, inputs, b)
                    if position + 1 < len(members):
                        x = x + adapter.mlp(member)(mlp_norm(x))
        self._next_input_cov = None
        where = f"layer {idx}" if len(block) == 1 else f"layers {block[0]}-{block[-1]}"
        return self._pca(acc, self.dims[idx], f"{where} (attention and MLP inputs)")


def _identity_like(matrix: torch.Tensor) -> torch.Tensor:
    """The (rectangular) identity of ``matrix``'s shape, dtype and device."""
    return torch.eye(*matrix.shape, dtype=matrix.dtype, device=matrix.device)
