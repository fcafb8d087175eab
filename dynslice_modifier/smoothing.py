"""llm-compressor's smoothing modifiers (SmoothQuant, AWQ) on a sliced model.

Both look their layer mappings up by the model's class name, and a sliced model is a
``DynSliceForCausalLM`` whatever it was sliced from. Its decoder layers keep the base
architecture's module names (``slicing.layout``), and slicing leaves every pair those
mappings join alike: a norm and the linears that read it, v_proj and o_proj (heads are
never sliced), up_proj and down_proj (nor is the MLP's inner width). So a sliced model takes
its base architecture's mappings; the default ones name q/k/v and gate/up apart, which in
Phi-3's fused layout would match nothing.
"""

from __future__ import annotations

from typing import Any

from llmcompressor.modifiers.transform.awq.dynamic_mappings import AWQ_DYNAMIC_MAPPING_REGISTRY
from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, default_mappings
from llmcompressor.modifiers.transform.smoothquant.dynamic_mappings import (
    SMOOTHQUANT_DYNAMIC_MAPPING_REGISTRY,
)
from llmcompressor.modifiers.transform.smoothquant.utils import (
    DEFAULT_SMOOTHQUANT_MAPPINGS,
    MAPPINGS_REGISTRY,
)
from torch import nn

from dynslice_modifier.modeling.modeling_dynslice import DynSliceForCausalLM, base_causal_lm_class


def _base_architecture(model: nn.Module) -> str:
    return base_causal_lm_class(model.config.base_model_type).__name__


def smoothquant_mappings(model: nn.Module) -> list[Any]:
    return MAPPINGS_REGISTRY.get(_base_architecture(model), DEFAULT_SMOOTHQUANT_MAPPINGS)


def awq_mappings(model: nn.Module) -> list[Any]:
    return AWQ_MAPPING_REGISTRY.get(_base_architecture(model), default_mappings)


def register_mappings() -> None:
    """Make SmoothQuant and AWQ find a sliced model's mappings (see the module doc)."""
    SMOOTHQUANT_DYNAMIC_MAPPING_REGISTRY[DynSliceForCausalLM.__name__] = smoothquant_mappings
    AWQ_DYNAMIC_MAPPING_REGISTRY[DynSliceForCausalLM.__name__] = awq_mappings
