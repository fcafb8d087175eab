"""Architecture adapters. Supporting a new architecture is adding one module here."""

from __future__ import annotations

from torch import nn

from dynslice_modifier.adapters import llama, mistral, qwen2, qwen3
from dynslice_modifier.adapters.base import PRE_NORM_LAYOUT, ModelAdapter
from dynslice_modifier.errors import UnsupportedModelError

ADAPTERS: dict[str, ModelAdapter] = {
    a.model_type: a for a in (llama.ADAPTER, mistral.ADAPTER, qwen2.ADAPTER, qwen3.ADAPTER)
}

# Architectures users ask about whose structure makes SliceGPT's rotation unsound.
UNSOUND: dict[str, str] = {
    "gemma": "Gemma scales by (1 + weight)",
    "gemma2": "Gemma 2 has norms after attention and MLP (sandwich norms)",
    "gemma3": "Gemma 3 has norms after attention and MLP (sandwich norms)",
    "gemma3_text": "Gemma 3 has norms after attention and MLP (sandwich norms)",
    "olmo2": "OLMo 2 normalises after attention and MLP instead of before",
    "phi": "Phi uses LayerNorm with parallel attention/MLP",
    "gpt2": "GPT-2 uses LayerNorm with biases",
}


# Set on a model object a failed slicing run changed in place (see ``mark_partly_sliced``).
_PARTLY_SLICED = "_dynslice_partly_sliced"


def mark_partly_sliced(model: nn.Module) -> None:
    """Record that a failed run left ``model`` partly rotated and sliced in place."""
    setattr(model, _PARTLY_SLICED, True)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or an error naming the architecture and the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    architecture = type(model).__name__
    if getattr(model, _PARTLY_SLICED, False):
        raise UnsupportedModelError(
            f"this {architecture} object was partly rotated and sliced in place by a slicing "
            "run that failed; load the model again from disk and run on that"
        )
    supported = ", ".join(
        f"{a.model_type} ({'/'.join(a.architectures)})" for a in ADAPTERS.values()
    )
    if model_type == "dynslice":
        raise UnsupportedModelError(
            f"this model is already sliced ({architecture}); slicing it again would need its "
            "dense original. To quantize it, run llm-compressor's oneshot on it with the "
            "quantization modifiers alone (no DynamicSliceModifier in the recipe; `dynslice "
            "compress` always slices)"
        )
    adapter = ADAPTERS.get(model_type)
    if adapter is None or architecture not in adapter.architectures:
        why = (
            f": {UNSOUND[model_type]}, which rotation cannot absorb"
            if model_type in UNSOUND
            else ""
        )
        raise UnsupportedModelError(
            f"DynamicSliceModifier does not support {architecture} (model_type "
            f"{model_type!r}){why}. Supported architectures: {supported}."
        )
    # transformers loads any Llama checkpoint as LlamaForCausalLM, dropping a classifier's
    # head and initialising a random one: the checkpoint's own class says what it was.
    saved = list(getattr(model.config, "architectures", None) or [])
    if saved and not set(saved) & set(adapter.architectures):
        raise UnsupportedModelError(
            f"the checkpoint is a {saved[0]}, not a causal language model: loaded as "
            f"{architecture}, its head would be randomly initialised. Slice a causal-LM "
            f"checkpoint ({'/'.join(adapter.architectures)})"
        )
    adapter.check(model)
    return adapter


__all__ = ["ADAPTERS", "PRE_NORM_LAYOUT", "ModelAdapter", "get_adapter", "mark_partly_sliced"]
