"""Qwen3: per-head q/k RMSNorms act inside attention, after q/k_proj, so they are untouched."""

from dynslice_modifier.adapters.base import ModelAdapter

ADAPTER = ModelAdapter(model_type="qwen3", architectures=("Qwen3ForCausalLM",), head_norms=True)
