"""Architecture adapters. Slicing and serving a new pre-norm architecture is adding one module
here: its layout for the slicer (``PRE_NORM_LAYOUT``, or ``FUSED_LAYOUT`` where q/k/v and
gate/up are one linear each), and for the vLLM model file how its attention differs from
Llama's (``ModelAdapter.fixed_attention_biases``, ``head_norms``, the multipliers). The
checkpoint format then needs its ``model_type`` in ``ARCHITECTURE_FORMATS`` and any new
multiplier name in ``FOLDED_SCALARS`` (``modeling/configuration_dynslice.py``, which sliced
checkpoints carry); tests fail until it has them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from dynslice_modifier.adapters import granite, llama, mistral, phi3, qwen2, qwen3
from dynslice_modifier.adapters.base import PRE_NORM_LAYOUT, ModelAdapter
from dynslice_modifier.errors import UnsupportedModelError
from dynslice_modifier.modeling.configuration_dynslice import DynSliceConfig

ADAPTERS: dict[str, ModelAdapter] = {
    a.model_type: a
    for a in (
        granite.ADAPTER,
        llama.ADAPTER,
        mistral.ADAPTER,
        phi3.ADAPTER,
        qwen2.ADAPTER,
        qwen3.ADAPTER,
    )
}

# Architectures users ask about, and why they are refused: either SliceGPT's rotation cannot
# absorb their structure, or it could and the adapter is not written.
NOT_SUPPORTED: dict[str, str] = {
    "gemma": "Gemma's norms scale by (1 + weight) and its embeddings by sqrt(hidden_size); "
    "both could be folded, but no adapter does it yet",
    **dict.fromkeys(
        ("gemma2", "gemma3", "gemma3_text", "olmo2"),
        "it normalises the attention and MLP outputs before adding them to the residual "
        "stream, with per-channel weights no rotation of that stream can absorb",
    ),
    **dict.fromkeys(
        ("phi", "gpt2"),
        "it uses LayerNorm, whose mean subtraction would have to be folded into every "
        "linear writing the residual stream (SliceGPT does so for OPT and Phi-2); not "
        "implemented here",
    ),
    **dict.fromkeys(
        ("mixtral", "qwen2_moe", "qwen3_moe"),
        "in a mixture of experts the router and every expert read the residual stream; not "
        "implemented",
    ),
}


# Set on a model object a failed slicing run changed in place (see ``changing_in_place``).
_PARTLY_SLICED = "_dynslice_partly_sliced"


@contextmanager
def changing_in_place(model: nn.Module, what: str) -> Iterator[None]:
    """A step that changes ``model`` layer by layer: if it fails midway, the object keeps
    its dense class and config over changed weights, so it is marked for ``get_adapter`` to
    refuse, and the error says to reload it (``what``: what the step did to the weights)."""
    try:
        yield
    except BaseException as err:
        setattr(model, _PARTLY_SLICED, True)
        err.add_note(
            f"DynamicSliceModifier had already {what} part of this model object in place; "
            "load the model again from disk before retrying"
        )
        raise


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or an error naming the architecture and the supported ones."""
    if getattr(model, _PARTLY_SLICED, False):
        raise UnsupportedModelError(
            f"this {type(model).__name__} object was partly changed in place by a "
            "slicing run that failed; load the model again from disk and run on that"
        )
    adapter = adapter_for(getattr(model, "config", None), type(model).__name__)
    adapter.check(model)
    return adapter


# Rotating and slicing a quantized weight would leave its scales (and zero points, groups,
# packed formats) describing other weights.
_QUANTIZED_FIX = (
    "slicing rotates every weight, which its scales would no longer fit. Slice the "
    "full-precision model, and put the quantizer after DynamicSliceModifier in the same "
    "recipe (`dynslice compress --quantize` does so)"
)


def _refuse_quantized(config: Any) -> None:
    """Refuse a checkpoint whose config declares a quantization, before it is loaded."""
    quantization = getattr(config, "quantization_config", None)
    if not quantization:
        return
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    method = getattr(method, "value", method)
    raise UnsupportedModelError(
        f"this checkpoint is already quantized or compressed (quantization_config, "
        f"quant_method {method!r}); {_QUANTIZED_FIX}"
    )


def check_unquantized(model: nn.Module) -> None:
    """Refuse a loaded model that carries a quantization: llm-compressor loads a quantized
    checkpoint decompressed but keeps every linear's scheme and scales (its config then
    declares none), as does a quantizer applied in an earlier ``oneshot``."""
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is not None:
            raise UnsupportedModelError(
                f"this model is already quantized ({name} carries a quantization scheme "
                f"and scales); {_QUANTIZED_FIX}"
            )


def adapter_for(config: Any, architecture: str | None = None) -> ModelAdapter:
    """The adapter for a model of ``config`` loaded as class ``architecture``, or an error
    naming the architecture and the supported ones.

    Without ``architecture`` (the class transformers' causal-LM auto class would pick), from
    the config alone: a command line refuses a checkpoint before loading it.
    """
    model_type = getattr(config, "model_type", None)
    saved = list(getattr(config, "architectures", None) or [])
    supported = ", ".join(
        f"{a.model_type} ({'/'.join(a.architectures)})" for a in ADAPTERS.values()
    )
    if model_type == DynSliceConfig.model_type:
        raise UnsupportedModelError(
            f"this model is already sliced ({architecture or 'DynSliceForCausalLM'}); slicing "
            "it again would need its dense original. To quantize it, run llm-compressor's "
            "oneshot on it with the quantization modifiers alone (no DynamicSliceModifier in "
            "the recipe; `dynslice compress` always slices)"
        )
    _refuse_quantized(config)
    adapter = ADAPTERS.get(model_type)
    if adapter is None or (architecture is not None and architecture not in adapter.architectures):
        name = architecture or (saved[0] if saved else "this model")
        why = f": {NOT_SUPPORTED[model_type]}" if model_type in NOT_SUPPORTED else ""
        raise UnsupportedModelError(
            f"DynamicSliceModifier does not support {name} (model_type "
            f"{model_type!r}){why}. Supported architectures: {supported}. A pre-norm "
            "architecture with RMSNorm is added as one adapter module in "
            "dynslice_modifier/adapters/ (see mistral.py, or phi3.py for fused linears) and "
            "its entry in ARCHITECTURE_FORMATS"
        )
    # transformers loads any Llama checkpoint as LlamaForCausalLM, dropping a classifier's
    # head and initialising a random one: the checkpoint's own class says what it was.
    if saved and not set(saved) & set(adapter.architectures):
        raise UnsupportedModelError(
            f"the checkpoint is a {saved[0]}, not a causal language model: loaded as "
            f"{architecture or adapter.architectures[0]}, its head would be randomly "
            f"initialised. Slice a causal-LM checkpoint ({'/'.join(adapter.architectures)})"
        )
    return adapter


__all__ = [
    "ADAPTERS",
    "PRE_NORM_LAYOUT",
    "ModelAdapter",
    "adapter_for",
    "changing_in_place",
    "check_unquantized",
    "get_adapter",
]
