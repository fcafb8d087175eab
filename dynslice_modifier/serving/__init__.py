"""vLLM serving of sliced checkpoints.

vLLM discovers :func:`register` through the ``vllm.general_plugins`` entry point and calls it
in every process it starts (front end, engine core, workers). Nothing here imports vLLM at
module level: this package is also imported in the compression environment, which has no
vLLM, and vLLM itself resolves the model class lazily from the string given below.
"""

from __future__ import annotations

from typing import Any

MODEL_ARCHITECTURE = "DynSliceForCausalLM"
_MODEL_CLASS_PATH = "dynslice_modifier.serving.vllm_dynslice:DynSliceForCausalLM"


def register() -> None:
    """Make vLLM able to load ``model_type: dynslice`` checkpoints.

    Safe to call more than once (vLLM may load plugins several times per process tree).
    """
    from vllm import ModelRegistry

    # Registers DynSliceConfig with transformers' AutoConfig, so vLLM parses config.json
    # without trust_remote_code.
    import dynslice_modifier.modeling  # noqa: F401

    if MODEL_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(MODEL_ARCHITECTURE, _MODEL_CLASS_PATH)
    _register_config_check()


def _register_config_check() -> None:
    """Check the config (``support.check_servable``) while vLLM builds it, in the calling
    process.

    The model class checks it too, but that runs in the engine core's worker, where a bad
    checkpoint surfaces as "Engine core initialization failed" with the cause buried in the
    worker's log. Checking here makes ``LLM(...)`` / ``vllm serve`` fail at once with our
    message (e.g. "upgrade dynslice-modifier", an unsupported base architecture, a
    quantized checkpoint in float32 on a GPU, or a W4A16 one in float32 on a CPU).
    ``MODELS_CONFIG_MAP`` is vLLM's own hook for per-architecture config checks; it is
    internal, so if it moves we keep only the model-side check rather than break serving.
    """
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig
    except ImportError:
        return

    class DynSliceConfigCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            from vllm.platforms import current_platform

            from dynslice_modifier.serving.support import check_served_dtype

            model_config = vllm_config.model_config
            check_served_dtype(
                current_platform.is_cpu(),
                model_config.quantization,
                getattr(getattr(model_config, "hf_config", None), "quantization_config", None),
                model_config.dtype,
            )

        @staticmethod
        def verify_and_update_model_config(model_config: object) -> None:
            from dynslice_modifier.serving.support import check_prompt_embeds, check_servable

            hf_config = getattr(model_config, "hf_config", None)
            # Duck-typed: a config class loaded from the checkpoint's own file (remote
            # code) is not ours, though it has the same method.
            if callable(getattr(hf_config, "check_slicing", None)):
                check_servable(hf_config)
                check_prompt_embeds(
                    hf_config, bool(getattr(model_config, "enable_prompt_embeds", False))
                )

    MODELS_CONFIG_MAP.setdefault(MODEL_ARCHITECTURE, DynSliceConfigCheck)


__all__ = ["MODEL_ARCHITECTURE", "register"]
