"""Granite (3.x dense): Llama's layer with four scalars from its config. The residual and
logits multipliers are folded into the weights before slicing; the embedding and attention
multipliers stay in the config, where transformers' Granite modules and the vLLM model file
read them."""

from dynslice_modifier.adapters.base import ModelAdapter

ADAPTER = ModelAdapter(
    model_type="granite",
    architectures=("GraniteForCausalLM",),
    output_multiplier="residual_multiplier",
    logits_divisor="logits_scaling",
    embedding_multiplier="embedding_multiplier",
    attention_multiplier="attention_multiplier",
)
