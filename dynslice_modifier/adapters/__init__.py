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


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or an error naming the architecture and the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    architecture = type(model).__name__
    supported = ", ".join(
        f"{a.model_type} ({'/'.join(a.architectures)})" for a in ADAPTERS.values()
    )
    if model_type == "dynslice":
        raise UnsupportedModelError(
            f"this model is already sliced ({architecture}); slicing it again would need its "
            "dense original. To quantize it, run oneshot with the quantization modifiers "
            "alone (no DynamicSliceModifier in the recipe)"
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
    adapter.check(model)
    return adapter


__all__ = ["ADAPTERS", "PRE_NORM_LAYOUT", "ModelAdapter", "get_adapter"]
