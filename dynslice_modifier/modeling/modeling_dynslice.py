"""transformers implementation of sliced models.

A sliced model is its base architecture (Llama, Mistral, Phi-3, Qwen2, Qwen3, ...) with three
changes, all described by ``config.slicing``:

- every linear that reads the residual stream has fewer input columns, every linear that
  writes it has fewer output rows (attention internals are untouched);
- the norms inside decoder layers (and the final norm, when ``slicing.final_dim`` says the
  head is sliced) normalise by the original width; their scales were folded into the next
  linears (the norms keep a per-dim scale, initially ones);
- a residual connection between two differently rotated bases carries a shortcut matrix;
  one that ``slicing.delta_shortcuts`` names (every one, when it is true) is stored as its
  difference from the rectangular identity, which the layer adds back (``carry``).

The attention and MLP modules are the base architecture's own, so rotary embeddings, GQA,
q/k norms, biases, sliding windows and every attention backend keep working. Like the
configuration file, this file imports only torch and transformers (and safetensors, which
transformers needs) so it can be shipped with each checkpoint for ``trust_remote_code=True``.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import can_return_tuple, logging

from .configuration_dynslice import (
    INPUT_PROJECTION,
    SHORTCUTS,
    DynSliceConfig,
    declared_shortcuts,
    final_width,
    layer_deltas,
)

logger = logging.get_logger(__name__)


def base_causal_lm_class(base_model_type: str) -> type[PreTrainedModel]:
    """The transformers class that implements the unsliced architecture."""
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(base_model_type)
    if name is None:
        raise ValueError(f"transformers has no causal-LM class for model_type {base_model_type!r}")
    return getattr(importlib.import_module("transformers"), name)


def inverse_rms(hidden_states: torch.Tensor, hidden_size: int, eps: float) -> torch.Tensor:
    """The per-token factor (float32, trailing dim 1) of RMS normalisation by the *original*
    hidden size, whatever the current width.

    Dividing by the original width rather than the sliced one keeps activations at the
    scale the next linears were trained for; with no slicing it is exactly RMSNorm's.
    """
    variance = hidden_states.to(torch.float32).pow(2).sum(-1, keepdim=True) / hidden_size
    return torch.rsqrt(variance + eps)


def rms_normalize(hidden_states: torch.Tensor, hidden_size: int, eps: float) -> torch.Tensor:
    """RMS normalisation by the original hidden size (see ``inverse_rms``), in float32."""
    # Cast once: inverse_rms's own cast of a float32 tensor is free.
    x = hidden_states.to(torch.float32)
    return (x * inverse_rms(x, hidden_size, eps)).to(hidden_states.dtype)


class SlicedRMSNorm(nn.Module):
    """RMSNorm over a sliced residual: normalise by the original width, scale per kept dim.

    Slicing folds the original scale into the next linears, so ``weight`` starts as ones;
    it is kept so that smoothing methods (SmoothQuant, AWQ) have a scale to fold into. The
    vLLM model file uses this class too, and its two steps: a shortcut fused into the next
    projection needs the per-token factor on its own.
    """

    def __init__(
        self,
        width: int,
        hidden_size: int,
        eps: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))
        self.hidden_size = hidden_size
        self.variance_epsilon = eps

    def inverse_rms(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return inverse_rms(hidden_states, self.hidden_size, self.variance_epsilon)

    def scale(self, hidden_states: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """The norm of ``hidden_states`` given its ``inverse_rms``."""
        return self.weight * (hidden_states.to(torch.float32) * factor).to(hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The same as scale(x, inverse_rms(x)), with x cast to float32 once.
        return self.weight * rms_normalize(hidden_states, self.hidden_size, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, hidden_size={self.hidden_size}, eps={self.variance_epsilon}"


class ResidualShortcut(nn.Module):
    """Change of basis on the residual stream: ``y = x W^T`` with ``W`` of shape (out, in).

    Not an ``nn.Linear``, so that ``targets: Linear`` leaves it in model dtype: it carries
    the residual stream itself, whose quantization error every later layer inherits.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, device=device, dtype=dtype)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_states, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class ResidualShortcutLinear(nn.Linear):
    """A shortcut that quantizers may take (``quantize_shortcuts``; saved in the config as
    ``slicing.quantizable_shortcuts``).

    A ``Linear`` (no bias) so that compressed-tensors quantizes it like any linear its
    targets match, and so that the saved ignore list names the shortcuts a recipe kept in
    model dtype; vLLM builds the same class name, which its target matching relies on.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)


def carry(hidden_states: torch.Tensor, width: int) -> torch.Tensor:
    """``x E``: the identity part of a delta shortcut, cutting or zero-padding to ``width``.

    Added outside the shortcut module, so a quantizer that takes the shortcut quantizes only
    the small difference and never the residual stream it carries.
    """
    extra = width - hidden_states.shape[-1]
    if extra <= 0:
        return hidden_states[..., :width]
    return nn.functional.pad(hidden_states, (0, extra))


def shortcut_class(spec: dict[str, Any]) -> type[ResidualShortcut | ResidualShortcutLinear]:
    return ResidualShortcutLinear if spec.get("quantizable_shortcuts") else ResidualShortcut


def layer_widths(config: DynSliceConfig, idx: int) -> tuple[int, int, int]:
    """(attention input, MLP input, layer output) residual widths of decoder layer ``idx``."""
    spec = config.slicing
    last = idx + 1 == config.num_hidden_layers
    out = final_width(spec, config.hidden_size) if last else spec["attn_dims"][idx + 1]
    return spec["attn_dims"][idx], spec["mlp_dims"][idx], out


def layer_shortcuts(config: DynSliceConfig, idx: int) -> dict[str, tuple[int, int]]:
    """(input width, output width) of each shortcut decoder layer ``idx`` declares, by module
    name: the one description of them that this layer and vLLM's both build from."""
    attn_dim, mlp_dim, out_dim = layer_widths(config, idx)
    shapes = {
        # A tied embedding table stays in the original basis; layer 0 projects it.
        INPUT_PROJECTION: (config.hidden_size, attn_dim),
        "attn_shortcut": (attn_dim, mlp_dim),
        "mlp_shortcut": (mlp_dim, out_dim),
    }
    declared = set(declared_shortcuts(config.slicing))
    return {name: shape for name, shape in shapes.items() if f"{idx}.{name}" in declared}


def _record_hidden_states(layer: nn.Module) -> int | None:
    """Report the layer's output for ``output_hidden_states``; returns the hook's id.

    transformers 5 collects hidden states with hooks it puts on the base architecture's
    decoder-layer class, which this layer replaces, so it gets the same hook here (each
    state is the residual in its layer's basis and width). transformers 4 collects them in
    the model's own loop over the layers and has no such hook.
    """
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:
        return None
    before = set(layer._forward_hooks)
    install_output_capuring_hook(layer, "hidden_states", 0)
    # None if a transformers version adds no hook here: nothing to leave out of a pickle.
    return next(iter(set(layer._forward_hooks) - before), None)


class SlicedDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm decoder layer whose residual stream changes basis and width.

    It owns the base layer's attention and MLP modules under their original attribute
    names, so checkpoint keys are the base model's keys plus ``attn_shortcut`` and
    ``mlp_shortcut``.
    """

    def __init__(
        self,
        config: DynSliceConfig,
        layer_idx: int,
        attn: nn.Module,
        mlp: nn.Module,
        device: torch.device | None = None,
    ):
        super().__init__()
        layout = config.slicing["layout"]
        self.layout = layout
        self.layer_idx = layer_idx
        # Releases of transformers that pick each layer's mask (sliding window or full) by
        # its decoder layer's ``attention_type`` rather than by ``config.layer_types``.
        if getattr(config, "layer_types", None):
            self.attention_type = config.layer_types[layer_idx]
        attn_dim, mlp_dim, _ = layer_widths(config, layer_idx)
        eps, hidden = config.rms_norm_eps, config.hidden_size
        dtype = next(attn.parameters()).dtype
        # The norms and shortcuts go where the attention's weights are (``device``: where
        # an offloaded attention stores them, rather than where it fetches them to).
        device = device or next(attn.parameters()).device
        self.add_module(layout["attn"], attn)
        self.add_module(layout["mlp"], mlp)
        self.add_module(layout["input_norm"], SlicedRMSNorm(attn_dim, hidden, eps, device, dtype))
        self.add_module(
            layout["post_attention_norm"], SlicedRMSNorm(mlp_dim, hidden, eps, device, dtype)
        )
        # Phi-3's dropout on each sublayer's output before the residual add (resid_pdrop);
        # the other base architectures have none. Only training sees it.
        self.resid_dropout = nn.Dropout(getattr(config, "resid_pdrop", 0.0))
        self.deltas = layer_deltas(config.slicing, layer_idx)
        shortcut = shortcut_class(config.slicing)
        shapes = layer_shortcuts(config, layer_idx)
        for name in (INPUT_PROJECTION, *SHORTCUTS):
            shape = shapes.get(name)
            setattr(self, name, shortcut(*shape, device, dtype) if shape else None)
        self.start_as_identity()
        self._capturing_hook = _record_hidden_states(self)

    def unfilled_shortcuts(self) -> list[str]:
        """The float shortcuts that neither loading nor ``start_as_identity`` has filled (a
        compressed one holds its weight under other names, which loading fills)."""
        return [
            name
            for name in (INPUT_PROJECTION, *SHORTCUTS)
            if (shortcut := getattr(self, name)) is not None
            and isinstance(weight := getattr(shortcut, "weight", None), torch.Tensor)
            and weight.is_floating_point()
            and not weight.is_meta
            and not getattr(shortcut, "_is_hf_initialized", False)
            and not getattr(weight, "_is_hf_initialized", False)
        ]

    @torch.no_grad()
    def start_as_identity(self, names: Iterable[str] | None = None) -> None:
        """A layer built fresh (not loaded) passes its residual through each shortcut
        unchanged, rather than through uninitialised memory; transformers then leaves the
        shortcuts alone. A model built on ``meta`` to be loaded has nothing to fill."""
        for name in self.unfilled_shortcuts() if names is None else names:
            shortcut = getattr(self, name)
            shortcut.weight.zero_()
            if name not in self.deltas:
                shortcut.weight.diagonal().fill_(1)
            shortcut._is_hf_initialized = True

    def __getstate__(self) -> dict[str, Any]:
        # transformers' capturing hook is a local function, which pickle cannot take (a
        # model pickled whole, torch.save(model)); the copy gets a hook of its own.
        state = self.__dict__.copy()
        state["_forward_hooks"] = self._forward_hooks.copy()
        state["_forward_hooks"].pop(self._capturing_hook, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._capturing_hook = _record_hidden_states(self)

    def _shortcut(self, name: str, hidden_states: torch.Tensor) -> torch.Tensor:
        out = getattr(self, name)(hidden_states)
        return out + carry(hidden_states, out.shape[-1]) if name in self.deltas else out

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        layout = self.layout
        if self.input_projection is not None:
            hidden_states = self._shortcut(INPUT_PROJECTION, hidden_states)
        residual = hidden_states
        hidden_states = getattr(self, layout["input_norm"])(hidden_states)
        hidden_states, _ = getattr(self, layout["attn"])(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.attn_shortcut is not None:
            residual = self._shortcut("attn_shortcut", residual)
        hidden_states = residual + self.resid_dropout(hidden_states)

        residual = hidden_states
        hidden_states = getattr(self, layout["post_attention_norm"])(hidden_states)
        hidden_states = getattr(self, layout["mlp"])(hidden_states)
        if self.mlp_shortcut is not None:
            residual = self._shortcut("mlp_shortcut", residual)
        return residual + self.resid_dropout(hidden_states)


def _resized_linear(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An empty linear of the new shape on the old one's device and dtype."""
    return nn.Linear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def reshape_to_slicing(model: PreTrainedModel, config: DynSliceConfig) -> None:
    """Give a freshly built base model the shapes that ``config.slicing`` describes.

    Weights of resized modules are left uninitialised; ``from_pretrained`` fills them.
    """
    spec = config.slicing
    layout = spec["layout"]
    layers = model.model.layers
    for idx in range(config.num_hidden_layers):
        base_layer = layers[idx]
        attn = getattr(base_layer, layout["attn"])
        mlp = getattr(base_layer, layout["mlp"])
        attn_dim, mlp_dim, out_dim = layer_widths(config, idx)
        for name in layout["attn_inputs"]:
            old = getattr(attn, name)
            setattr(attn, name, _resized_linear(old, attn_dim, old.out_features))
        old = getattr(attn, layout["attn_output"])
        setattr(attn, layout["attn_output"], _resized_linear(old, old.in_features, mlp_dim))
        for name in layout["mlp_inputs"]:
            old = getattr(mlp, name)
            setattr(mlp, name, _resized_linear(old, mlp_dim, old.out_features))
        old = getattr(mlp, layout["mlp_output"])
        setattr(mlp, layout["mlp_output"], _resized_linear(old, old.in_features, out_dim))
        layers[idx] = SlicedDecoderLayer(config, idx, attn, mlp)
    if spec["embedding_sliced"]:
        old = model.model.embed_tokens
        model.model.embed_tokens = nn.Embedding(
            old.num_embeddings,
            spec["attn_dims"][0],
            old.padding_idx,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
    if spec.get("final_dim"):
        final = spec["final_dim"]
        norm = model.model.norm
        model.model.norm = SlicedRMSNorm(
            final, config.hidden_size, config.rms_norm_eps, norm.weight.device, norm.weight.dtype
        )
        model.lm_head = _resized_linear(model.lm_head, final, model.lm_head.out_features)


# Parameter names of the residual-stream changes of basis (``SlicedDecoderLayer``).
_SHORTCUT_KEYS = tuple(f".{name}." for name in (*SHORTCUTS, INPUT_PROJECTION))


def _with_variant(filename: str, variant: str | None) -> str:
    """``from_pretrained(variant=...)``'s file names: the variant before the extension."""
    if not variant:
        return filename
    stem, _, extension = filename.rpartition(".")
    return f"{stem}.{variant}.{extension}"


def _safetensors_files(directory: str | os.PathLike, variant: str | None) -> list[str] | None:
    """The weight files of a local safetensors checkpoint, in the order ``from_pretrained``
    looks for them (a single file before a sharded index, which a later unsharded save
    leaves behind); None for anything else."""
    if not os.path.isdir(directory):
        return None
    single = os.path.join(directory, _with_variant("model.safetensors", variant))
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, _with_variant("model.safetensors.index.json", variant))
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as f:
            shards = json.load(f)["weight_map"].values()
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(
            f"{index} is not a shard index ({err!r}): save or fetch the checkpoint again"
        ) from None
    return sorted({os.path.join(directory, name) for name in shards})


def stored_tensor_names(
    directory: str | os.PathLike, variant: str | None = None
) -> set[str] | None:
    """The tensor names of a local safetensors checkpoint (see ``stored_tensor_shapes``)."""
    shapes = stored_tensor_shapes(directory, variant)
    return None if shapes is None else set(shapes)


def stored_tensor_shapes(
    directory: str | os.PathLike, variant: str | None = None
) -> dict[str, tuple[int, ...]] | None:
    """The tensors of a local safetensors checkpoint and their shapes, read from the files'
    headers as ``from_pretrained`` finds them; None for anything else. A file that cannot
    be read is named: transformers would fail on it deep in the load."""
    files = _safetensors_files(directory, variant)
    if files is None:
        return None
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(file, "pt") as tensors:
                for name in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                    shapes[name] = tuple(tensors.get_slice(name).get_shape())
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{file} is not a readable safetensors file ({err}): the checkpoint is "
                "damaged or incomplete (an interrupted copy or download?); save or fetch it "
                "again"
            ) from None
    return shapes


def _is_weight(name: str) -> bool:
    # compressed-tensors stores a packed 4-bit weight as weight_packed.
    return name.endswith((".weight", ".weight_packed"))


def _owners(keys: Iterable[str]) -> set[str]:
    """The modules that parameter or buffer ``keys`` belong to."""
    return {key.rpartition(".")[0] for key in keys}


def _is_shortcut(name: str) -> bool:
    return any(part in f"{name}." for part in _SHORTCUT_KEYS)


def first_names(names: list[str]) -> str:
    """The first few names, sorted, and how many there are."""
    shown = sorted(names)
    return f"{', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''} ({len(shown)} in all)"


def _check_shortcut_keys(missing: Iterable[str], unexpected: Iterable[str]) -> None:
    """Refuse shortcut tensors the checkpoint lacks or holds against its config: a missing
    one would serve uninitialised memory, an undeclared one be dropped with a warning, and
    either way the model would compute something else."""
    absent = [name for name in missing if _is_shortcut(name)]
    if absent:
        raise ValueError(
            f"the checkpoint has no tensors for {first_names(absent)}, which its config declares "
            "(slicing.attn_shortcuts / mlp_shortcuts / input_projection); re-save the sliced "
            "model, or restore the missing tensors"
        )
    extra = [name for name in unexpected if _is_shortcut(name)]
    if extra:
        raise ValueError(
            f"the checkpoint holds {first_names(extra)}, residual shortcuts that its config "
            "does not declare (slicing.attn_shortcuts / mlp_shortcuts / input_projection); "
            "re-save the sliced model, or make config.json's slicing match the saved weights"
        )


def _holds_dense_model(directory: str | os.PathLike) -> bool:
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type") != DynSliceConfig.model_type
    except (OSError, ValueError):
        return False


def refuse_saving_over_source(save_directory: str | os.PathLike, config: DynSliceConfig) -> None:
    """Refuse to save a sliced model into the directory of the dense model it was sliced
    from: it would replace the one input that can be sliced again. (A directory that holds
    no dense model is not refused: the recorded path may be another machine's.)"""
    source = config.slicing.get("source_model")
    if (
        source
        and os.path.isdir(source)
        and os.path.isdir(save_directory)
        and os.path.samefile(source, save_directory)
        and _holds_dense_model(save_directory)
    ):
        raise ValueError(
            f"refusing to save the sliced model into {os.fspath(save_directory)!r}: that is "
            "the directory of the dense model it was sliced from, which saving would "
            "overwrite. Choose another output_dir."
        )


# The report ``dynslice compress`` (or ``dynslice report``) writes beside a checkpoint.
REPORT_FILES = ("slicing_report.md", "slicing_report.png")


def drop_stale_report(save_directory: str | os.PathLike) -> None:
    """Remove the report of the model saved before into the directory a model is saved
    into: left, it could describe widths, scores, a quantization and a size the new
    checkpoint does not have (a later ``oneshot`` that quantizes in place keeps the
    widths), and nothing in it tells which model it was written for."""
    stale = [name for name in REPORT_FILES if os.path.isfile(os.path.join(save_directory, name))]
    for name in stale:
        os.remove(os.path.join(save_directory, name))
    if stale:
        logger.warning(
            f"removed {', '.join(stale)} from {os.fspath(save_directory)}: written for the "
            "model saved there before; `dynslice report` writes one for this model"
        )


def keeping_sliced_config(model: nn.Module, save: Callable[..., Any]) -> Callable[..., Any]:
    """``save``, if it is llm-compressor's save wrapper, made to write the sliced config as
    the model holds it; else ``save`` itself. It lives in this file, which checkpoints carry,
    so that a model loaded as a checkpoint's remote code (``trust_remote_code=True``, the
    package not imported) keeps its config through a later ``oneshot`` too.

    That save (the wrapper ``oneshot`` puts on the instance) re-writes config.json from the
    file at ``config._name_or_path``: the unsliced model's in the slicing run, or, in a later
    ``oneshot``, the loaded checkpoint's, whose ``slicing.unit_norms`` a smoothing modifier
    may have made wrong. The path is blanked for the save alone, since a later ``oneshot`` on
    the returned model reads its processor from it. Without that wrapper (the model saved
    outside ``oneshot``) transformers' own save writes the sliced config, and the model keeps
    no closure that would stop it from being pickled.
    """
    if not getattr(save, "_overridden", False) or getattr(save, "_keeps_sliced_config", False):
        return save

    @functools.wraps(save)  # keeps llm-compressor's mark, so it does not wrap this again
    def save_sliced(save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        # Before llm-compressor's save compresses or writes anything; the class's own
        # save_pretrained, which would do it, is not the one llm-compressor calls. A model
        # whose class came with an older checkpoint's code has no prepare_save.
        if (prepare := getattr(model, "prepare_save", None)) is not None:
            state = kwargs.get("state_dict")
            prepare(save_directory, **({} if state is None else {"state_dict": state}))
        source = model.config._name_or_path
        model.config._name_or_path = ""
        logger.warning_once(
            "Saving the sliced config: llm-compressor's 'Failed to find config._name_or_path' "
            "warning that follows is expected (it would re-write the source model's config)"
        )
        try:
            return save(save_directory, *args, **kwargs)
        finally:
            model.config._name_or_path = source

    save_sliced._keeps_sliced_config = True
    return save_sliced


class DynSliceForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM whose residual stream is sliced per layer (see ``DynSliceConfig``)."""

    config_class = DynSliceConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlicedDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DynSliceConfig) -> None:
        super().__init__(config)
        config.check_slicing()
        # The base classes read only plain attributes, which the flat config carries.
        base = base_causal_lm_class(config.base_model_type)(config)
        self.model = base.model
        self.lm_head = base.lm_head
        reshape_to_slicing(self, config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, refusing a checkpoint whose shortcut tensors
        differ from those its config declares: transformers would only warn, and leave a
        missing one as uninitialised memory (no initialisation can stand in for a change of
        basis) or drop an undeclared one.

        A local checkpoint's weights are checked before loading: a quantized shortcut
        without its weight would otherwise fail inside transformers' initialisation, which
        cannot fill integers with random numbers.
        """
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        subfolder = kwargs.get("subfolder") or ""
        config = kwargs.get("config")
        stored = None
        if path is not None:
            stored = stored_tensor_names(os.path.join(path, subfolder), kwargs.get("variant"))
        if stored is not None:
            if not isinstance(config, DynSliceConfig):
                config = DynSliceConfig.from_pretrained(path, subfolder=subfolder)
            config.check_slicing()
            # The decoder stack alone (``AutoModel``'s, saved) stores its names without the
            # base model's prefix, which transformers adds on loading.
            prefix = "" if any(n.startswith("model.") for n in stored) else "model."
            weights = {prefix + name.rpartition(".")[0] for name in stored if _is_weight(name)}
            declared = {f"model.layers.{name}" for name in declared_shortcuts(config.slicing)}
            _check_shortcut_keys(declared - weights, weights - declared)
        wants_info = kwargs.get("output_loading_info", False)
        kwargs["output_loading_info"] = True
        model, info = super().from_pretrained(*args, **kwargs)
        _check_shortcut_keys(_owners(info["missing_keys"]), _owners(info["unexpected_keys"]))
        return (model, info) if wants_info else model

    def __setattr__(self, name: str, value: Any) -> None:
        # llm-compressor's oneshot replaces save_pretrained on the instance with a wrapper
        # that re-writes config.json from the file at _name_or_path, which for a sliced model
        # is the dense source's or the loaded checkpoint's (stale once smoothing scaled the
        # norms); wrapped again here, it writes this model's config.
        if name == "save_pretrained":
            value = keeping_sliced_config(self, value)
        super().__setattr__(name, value)

    def __deepcopy__(self, memo: dict[int, Any]) -> DynSliceForCausalLM:
        """A copy whose ``save_pretrained`` saves the copy.

        The save wrapper that ``oneshot`` puts on the instance holds the model it was made
        for, so a copy sharing it would write the original's weights: the copy gets
        llm-compressor's wrapper made for itself.
        """
        # As the default copy does: the state nn.Module pickles, without the wrapper.
        state = self.__getstate__()
        wrapped = getattr(state.get("save_pretrained"), "_overridden", False)
        if wrapped:
            del state["save_pretrained"]
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__setstate__(copy.deepcopy(state, memo))
        if wrapped:
            from llmcompressor.transformers.compression.compressed_tensors_utils import (
                modify_save_pretrained,
            )

            modify_save_pretrained(clone)
        return clone

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialisation, then the identity in each shortcut it had to fill.

        transformers hands the layers to the base model's ``_init_weights``, which knows no
        shortcut: a model built on ``meta`` and given memory (``to_empty``, then
        ``init_weights``) would otherwise keep that memory as its changes of basis, or draw
        them at random where they are ``Linear``. Loaded shortcuts are marked as
        initialised, so they are left as they are.
        """
        unfilled = [(layer, layer.unfilled_shortcuts()) for layer in self.model.layers]
        super().initialize_weights()
        for layer, names in unfilled:
            layer.start_as_identity(names)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.save_pretrained``, after ``prepare_save``."""
        self.prepare_save(save_directory, kwargs.get("state_dict"))
        return super().save_pretrained(save_directory, *args, **kwargs)

    def prepare_save(
        self,
        save_directory: str | os.PathLike,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Refuse to save over the dense source model, read ``slicing.unit_norms`` again
        from the norms (those of ``state_dict``, the tensors the save writes, where given),
        which a smoothing modifier in a later ``oneshot`` (SmoothQuant, AWQ) or fine-tuning
        changes, drop an earlier model's report, and name ``AutoModel``'s class in the
        ``auto_map`` (transformers writes the causal LM's and the config's)."""
        refuse_saving_over_source(save_directory, self.config)
        self.record_unit_norms(state_dict)
        drop_stale_report(save_directory)
        module = type(self).__module__.rpartition(".")[2]
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModel": f"{module}.{DynSliceModel.__name__}",
        }

    def record_unit_norms(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> bool:
        """Set ``slicing.unit_norms`` from the norms where they can be read; the flag."""
        unit = self.has_unit_norms(state_dict)
        if unit is not None:
            self.config.slicing["unit_norms"] = unit
        return self.config.slicing["unit_norms"]

    def has_unit_norms(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> bool | None:
        """Whether every in-layer norm weight is one (``slicing.unit_norms``), read from
        ``state_dict`` where it holds them (a save's own tensors: Trainer passes DeepSpeed
        ZeRO-3's gathered ones, the parameters being empty outside a gather), else from the
        model; None where a weight is out of reach (on ``meta`` under accelerate's hooks, as
        llm-compressor's save also leaves them, or empty), so the recorded flag stands."""
        layout = self.config.slicing["layout"]
        names = [
            f"model.layers.{i}.{layout[key]}.weight"
            for i in range(len(self.model.layers))
            for key in ("input_norm", "post_attention_norm")
        ]
        if state_dict is not None and all(name in state_dict for name in names):
            weights = [state_dict[name] for name in names]
        else:
            # A state_dict under other names (a compiled model's ``_orig_mod.``) is not read.
            weights = [
                getattr(self.get_submodule(name.removesuffix(".weight")), "weight", None)
                for name in names
            ]
        if any(w is None or w.is_meta or not w.numel() for w in weights):
            return None
        return all(bool(torch.all(w == 1)) for w in weights)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate``, refusing an early-exit assistant up front:
        transformers would apply the head to an intermediate layer's output, of another
        width and basis here, and leave ``num_hidden_layers`` changed on the failure."""
        # generate(inputs, generation_config, ...)
        given = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)
        config = given or self.generation_config
        if (
            kwargs.get("assistant_early_exit") is not None
            or getattr(config, "assistant_early_exit", None) is not None
        ):
            raise ValueError(
                "assistant_early_exit (self-speculative decoding) reads the head from an "
                "intermediate layer's output, but each layer of a sliced model has its own "
                "width and basis, which the head cannot read; draft with an assistant_model "
                "(a smaller or more deeply sliced model) or prompt_lookup_num_tokens instead"
            )
        return super().generate(*args, **kwargs)

    # return_dict=False: the base model's output becomes a tuple, as in transformers' own
    # causal LMs.
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class DynSliceModel:
    """``AutoModel``'s class for sliced checkpoints: the causal LM's decoder stack
    (``DynSliceForCausalLM.model``, the base architecture's model with sliced layers), as
    ``AutoModel`` gives a dense checkpoint's. Its last hidden state is the input of the
    head: in the original basis, or, with ``slicing.final_dim`` (``slice_head``), in the
    last layer's narrower PCA basis.
    """

    config_class = DynSliceConfig

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModel") -> None:
        """What transformers calls on a class it loads as remote code, so that saving the
        model writes its ``auto_map`` entry; this class's instances are the base
        architecture's models, whose saves do not, so there is nothing to record."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        loaded = DynSliceForCausalLM.from_pretrained(*args, **kwargs)
        if isinstance(loaded, tuple):
            return loaded[0].model, loaded[1]
        return loaded.model

    @classmethod
    def _from_config(cls, config: DynSliceConfig, **kwargs: Any) -> nn.Module:
        return DynSliceForCausalLM._from_config(config, **kwargs).model
