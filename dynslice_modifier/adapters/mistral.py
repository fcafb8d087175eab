"""Mistral: Llama's layout; sliding-window attention is internal to attention."""

from dynslice_modifier.adapters.base import ModelAdapter

ADAPTER = ModelAdapter(model_type="mistral", architectures=("MistralForCausalLM",))
