"""Phi-3 (and Phi-3.5 / Phi-4-mini): Llama's layer with q/k/v fused into one linear and
gate/up into another. A fused linear reads the residual stream through its input columns as
the separate ones do, so the slicer rotates and cuts it alike; partial rotary embeddings
act inside attention, after qkv_proj, where no rotation of the residual stream reaches."""

from dynslice_modifier.adapters.base import ModelAdapter
from dynslice_modifier.modeling.configuration_dynslice import FUSED_LAYOUT

ADAPTER = ModelAdapter(
    model_type="phi3", architectures=("Phi3ForCausalLM",), layout=dict(FUSED_LAYOUT)
)
