"""The sliced architecture for transformers, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from dynslice_modifier.modeling.configuration_dynslice import (
    SLICING_FORMAT_VERSION,
    DynSliceConfig,
    SlicingConfigError,
)
from dynslice_modifier.modeling.modeling_dynslice import (
    DynSliceForCausalLM,
    DynSliceModel,
    SlicedDecoderLayer,
    SlicedRMSNorm,
)

AutoConfig.register(DynSliceConfig.model_type, DynSliceConfig, exist_ok=True)
AutoModelForCausalLM.register(DynSliceConfig, DynSliceForCausalLM, exist_ok=True)
AutoModel.register(DynSliceConfig, DynSliceModel, exist_ok=True)
# Saved checkpoints carry these two files and an auto_map, so they load with
# trust_remote_code=True where this package is not installed.
DynSliceConfig.register_for_auto_class()
DynSliceForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "SLICING_FORMAT_VERSION",
    "DynSliceConfig",
    "DynSliceForCausalLM",
    "DynSliceModel",
    "SlicedDecoderLayer",
    "SlicedRMSNorm",
    "SlicingConfigError",
]
