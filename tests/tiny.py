"""Tiny random models and calibration batches for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# Granite's four scalars, none of them 1 or its default elsewhere (1 / sqrt(head_dim)).
GRANITE_SCALARS = {
    "embedding_multiplier": 2.0,
    "residual_multiplier": 0.5,
    "attention_multiplier": 0.2,
    "logits_scaling": 4.0,
}
ARCHS = {
    "granite": (GraniteConfig, GraniteForCausalLM, GRANITE_SCALARS),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 16}),
    # Phi3Config's default special tokens (32000) lie outside the tiny vocabulary.
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0, "eos_token_id": 2}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
}

VOCAB = 128


def tiny_model(
    arch: str = "llama",
    tied: bool = True,
    seed: int = 0,
    layers: int = 3,
    hidden: int = 64,
    head_dim: int | None = None,
    initializer_range: float = 0.02,
    **overrides,
):
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim or hidden // 4,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-6,
        initializer_range=initializer_range,
        **({"max_position_embeddings": 256} | extra | overrides),
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                # Non-trivial scales make folding them into the next linears a real test.
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                # transformers zero-initialises biases, which would not test rotating them.
                p.normal_(0.0, 0.1)
    return model


def calib_batches(n: int = 4, seq: int = 32, seed: int = 1, pad: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad and i % 2 == 0:
            mask[1, seq // 2 :] = 0  # right padding in one row
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
