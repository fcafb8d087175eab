"""Llama (and the many checkpoints that reuse its code, e.g. SmolLM)."""

from dynslice_modifier.adapters.base import ModelAdapter

ADAPTER = ModelAdapter(model_type="llama", architectures=("LlamaForCausalLM",))
