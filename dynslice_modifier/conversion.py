"""The rotated model becomes a ``DynSliceForCausalLM``: the last step of slicing.

``RotateAndSlice`` (``slicer.py``) leaves the base model rotated and cut in place, with the
changes of basis it found in a ``SlicingResult``. Here the decoder layers are wrapped in
``SlicedDecoderLayer`` (their norms and shortcuts added, offloaded like the layer where it
is), the config replaced by a ``DynSliceConfig`` whose ``slicing`` section describes the
result, and the save made to write that config. No weight is copied.
"""

from __future__ import annotations

import os
from typing import Any

from compressed_tensors.offload import offload_module
from torch import nn

from dynslice_modifier.adapters import ModelAdapter
from dynslice_modifier.calibration import (
    offload_new_parts,
    offload_settings,
    storage_device,
    stored_parameters,
)
from dynslice_modifier.modeling.configuration_dynslice import (
    DynSliceConfig,
    format_version,
)
from dynslice_modifier.modeling.modeling_dynslice import (
    DynSliceForCausalLM,
    SlicedDecoderLayer,
    keeping_sliced_config,
)
from dynslice_modifier.slicer import SlicingResult, embeddings_tied


def convert_to_sliced(
    model: nn.Module,
    adapter: ModelAdapter,
    result: SlicingResult,
    provenance: dict[str, Any],
    quantizable_shortcuts: bool = False,
) -> DynSliceForCausalLM:
    """Turn the rotated model into a ``DynSliceForCausalLM`` in place.

    ``quantizable_shortcuts`` builds the shortcuts as linears, for a recipe whose quantizers
    take them (see ``quantization.quantized_shortcuts``).

    ``oneshot`` saves the very object it handed to the modifiers, so the model is converted
    rather than rebuilt: decoder layers are wrapped, the config replaced and the class
    switched; no weight is copied.
    """
    config = _sliced_config(model, adapter, result, provenance, quantizable_shortcuts)
    _wrap_layers(model, adapter, result, config)
    # Every module that shares the model's config gets the new one, as a loaded sliced model
    # has it: transformers' set_attn_implementation changes the model's config, and an
    # attention still holding the old one would keep its old kernel under the new masks.
    old_config = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old_config:
            module.config = config
    model.__class__ = DynSliceForCausalLM
    # post_init left the base class's layer name on the instance, where it hides the new
    # class's; llm-compressor's sequential pipeline reads it to split the model into layers,
    # and with a name that matches nothing it would calibrate the quantizers after the
    # slicer on the whole model as one piece.
    model._no_split_modules = set(DynSliceForCausalLM._no_split_modules)
    # The slicing run's oneshot wrapped the save before the class changed; outside oneshot
    # there is no wrapper, and the model keeps its class's own save.
    save = model.save_pretrained
    if (wrapped := keeping_sliced_config(model, save)) is not save:
        model.save_pretrained = wrapped
    return model


def _sliced_config(
    model: nn.Module,
    adapter: ModelAdapter,
    result: SlicingResult,
    provenance: dict[str, Any],
    quantizable_shortcuts: bool,
) -> DynSliceConfig:
    """The model's config with the ``slicing`` section that describes ``result``."""
    old_config = model.config
    base = {
        k: v
        for k, v in old_config.to_dict().items()
        if k not in ("model_type", "architectures", "auto_map", "quantization_config")
    }
    # A sliced head was untied by the slicer, so embeddings_tied is false then.
    base["tie_word_embeddings"] = not result.embedding_sliced and embeddings_tied(model)
    deltas = result.stored_as_delta()
    spec = {
        "format_version": format_version(
            quantizable_shortcuts,
            deltas,
            result.final_dim is not None,
            old_config.model_type,
            projection_dropped=not result.embedding_sliced and result.input_projection is None,
        ),
        "attn_dims": result.attn_dims,
        "mlp_dims": result.mlp_dims,
        "attn_shortcuts": [s is not None for s in result.attn_shortcuts],
        "mlp_shortcuts": [s is not None for s in result.mlp_shortcuts],
        "embedding_sliced": result.embedding_sliced,
        "input_projection": result.input_projection is not None,
        "quantizable_shortcuts": quantizable_shortcuts,
        "delta_shortcuts": deltas,
        # Norm scales were folded into the linears; a smoothing modifier later in the
        # recipe may fold new ones in (on_finalize and every save read the norms again).
        "unit_norms": True,
        "layout": adapter.layout,
        **({"final_dim": result.final_dim} if result.final_dim is not None else {}),
        **provenance,
    }
    config = DynSliceConfig(base_model_type=old_config.model_type, slicing=spec, **base)
    config.check_slicing()
    config._attn_implementation = old_config._attn_implementation
    config._name_or_path = source = old_config._name_or_path
    # Absolute, so that the record still finds it from another working directory.
    spec["source_model"] = os.path.abspath(source) if os.path.isdir(source) else source
    return config


def _wrap_layers(
    model: nn.Module, adapter: ModelAdapter, result: SlicingResult, config: DynSliceConfig
) -> None:
    """Replace each decoder layer by a ``SlicedDecoderLayer`` around its own attention and
    MLP, holding the layer's shortcuts and stored (offloaded) as the layer was."""
    layers = adapter.layers(model)
    for idx in range(len(layers)):
        old = layers[idx]
        attn = adapter.attn(old)
        offload = offload_settings(adapter.attn_inputs(old)[0])
        device = None if offload is None else storage_device(offload)
        new = SlicedDecoderLayer(config, idx, attn, adapter.mlp(old), device=device)
        # New modules start in training mode; a model sliced in eval mode must stay there
        # (the layer's residual dropout would otherwise be on).
        new.train(old.training)
        # What the layer adds trains as its own weights do (recovery fine-tuning, or none).
        trains = any(p.requires_grad for p in stored_parameters(attn))
        for norm in ("input_norm", "post_attention_norm"):
            getattr(new, adapter.layout[norm]).weight.requires_grad_(trains)
        for name, kept in result.changes_of_basis(idx):
            shortcut = getattr(new, name)
            shortcut.weight = nn.Parameter(
                kept.matrix.T.contiguous().to(shortcut.weight), requires_grad=trains
            )
        if offload is not None:
            offload_new_parts(new, offload)  # as the rest of the layer
        if (wrapper := offload_settings(old)) is not None:
            offload_module(new, **wrapper)
        layers[idx] = new
