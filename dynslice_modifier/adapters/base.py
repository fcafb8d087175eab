"""What the slicer, and the vLLM model file, need to know about an architecture."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dynslice_modifier.errors import UnsupportedModelError
from dynslice_modifier.modeling.configuration_dynslice import PRE_NORM_LAYOUT


@dataclass(frozen=True)
class ModelAdapter:
    """Names the modules of one architecture that read or write the residual stream.

    ``layout`` gives attribute names inside a decoder layer (see ``PRE_NORM_LAYOUT``);
    decoder layers are ``model.model.layers``, the embedding ``model.model.embed_tokens``,
    the final norm ``model.model.norm`` and the head ``model.lm_head``.
    """

    model_type: str
    architectures: tuple[str, ...]
    layout: dict[str, Any] = field(default_factory=lambda: dict(PRE_NORM_LAYOUT))
    # How the attention differs from Llama's, for the vLLM model file. The slicer needs
    # neither: biases on q/k/v and per-head norms sit where no rotation of the residual
    # stream reaches (q/k/v biases add to outputs; o_proj's bias is rotated with it).
    # ``fixed_attention_biases``: (q/k/v, o_proj) whatever the config says; unset, the
    # config's ``attention_bias`` puts a bias on all four or none.
    fixed_attention_biases: tuple[bool, bool] | None = None
    # An RMSNorm over each head of q and of k, before the rotary embedding.
    head_norms: bool = False
    # Names of config fields that scale, as Granite's do: every sublayer's output before it
    # joins the residual stream, and the logits (a divisor); the slicer folds both into the
    # weights first and records 1.0, so the sliced model applies neither. The looked-up
    # embeddings, and attention scores instead of 1 / sqrt(head_dim): the vLLM model file
    # applies these (transformers' base modules read them from the config).
    output_multiplier: str | None = None
    logits_divisor: str | None = None
    embedding_multiplier: str | None = None
    attention_multiplier: str | None = None

    def attention_biases(self, config: Any) -> tuple[bool, bool]:
        """Whether (q/k/v, o_proj) have biases in a model of ``config``."""
        if self.fixed_attention_biases is not None:
            return self.fixed_attention_biases
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def attention_scale(self, config: Any, head_dim: int) -> float:
        """What attention scores are multiplied by in a model of ``config``."""
        if self.attention_multiplier is not None:
            return float(getattr(config, self.attention_multiplier))
        return head_dim**-0.5

    def embedding_scale(self, config: Any) -> float:
        """What looked-up embeddings are multiplied by in a model of ``config``."""
        if self.embedding_multiplier is not None:
            return float(getattr(config, self.embedding_multiplier))
        return 1.0

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return model.model.embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def set_final_norm(self, model: nn.Module, norm: nn.Module) -> None:
        model.model.norm = norm

    def attn(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.layout["attn"])

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.layout["mlp"])

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.layout["input_norm"])

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.layout["post_attention_norm"])

    def attn_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [getattr(self.attn(layer), n) for n in self.layout["attn_inputs"]]

    def attn_output(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.attn(layer), self.layout["attn_output"])

    def mlp_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [getattr(self.mlp(layer), n) for n in self.layout["mlp_inputs"]]

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.mlp(layer), self.layout["mlp_output"])

    def check(self, model: nn.Module) -> None:
        """Raise if this model has a feature that breaks rotational invariance."""
        layer = self.layers(model)[0]
        for norm in (self.input_norm(layer), self.post_attention_norm(layer)):
            if not type(norm).__name__.endswith("RMSNorm") or norm.weight.dim() != 1:
                raise UnsupportedModelError(
                    f"{self.model_type}: expected RMSNorm before attention and MLP, found "
                    f"{type(norm).__name__}; its scale cannot be folded into a rotation"
                )
