"""Qwen2 / Qwen2.5: q/k/v carry biases, which a rotation of their *inputs* leaves unchanged."""

from dynslice_modifier.adapters.base import ModelAdapter

ADAPTER = ModelAdapter(model_type="qwen2", architectures=("Qwen2ForCausalLM",))
