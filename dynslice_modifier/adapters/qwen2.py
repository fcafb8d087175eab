"""Qwen2 / Qwen2.5: q/k/v carry biases, which a rotation of their *inputs* leaves unchanged;
o_proj has none, whatever the config says."""

from dynslice_modifier.adapters.base import ModelAdapter

ADAPTER = ModelAdapter(
    model_type="qwen2",
    architectures=("Qwen2ForCausalLM",),
    fixed_attention_biases=(True, False),
)
