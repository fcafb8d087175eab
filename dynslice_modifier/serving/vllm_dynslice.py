"""vLLM implementation of sliced checkpoints (``architectures: ["DynSliceForCausalLM"]``).

The reference is ``dynslice_modifier.modeling.modeling_dynslice`` (transformers). A sliced
model is its base decoder (Llama, Mistral, Qwen2, Qwen3) where, per layer ``l``:

- the residual stream read by the attention is ``attn_dims[l]`` wide, the one read by the
  MLP ``mlp_dims[l]`` wide, and the layer writes ``attn_dims[l + 1]`` (``hidden_size`` after
  the last layer), so ``q/k/v``, ``o_proj``, ``gate/up`` and ``down_proj`` have per-layer
  input or output widths while the attention internals (heads, GQA, rotary, q/k norms,
  biases) are untouched;
- the two in-layer norms normalise by the *original* ``hidden_size`` and scale per kept dim;
- a residual connection between two bases carries a shortcut matrix (``attn_shortcut``,
  ``mlp_shortcut``) when the config says so, otherwise it is the identity; with
  ``delta_shortcuts`` the matrix is stored minus the identity, which is added back here;
- an embedding table left in the original basis (tied models, ``embedding_sliced: false``)
  is projected to layer 0's basis by ``model.layers.0.input_projection``.

vLLM's Llama/Qwen attention and MLP classes take a single ``hidden_size`` for both their
input and output (and Qwen2 derives ``head_dim`` from it), so they cannot express a layer
that reads one width and writes another; the attention and MLP below are therefore written
out, using vLLM's parallel linears (quantization, tensor parallelism), ``Attention`` (KV
cache, backends), ``get_rope`` and ``RMSNorm`` exactly as the base architectures do.
Checkpoint names are the base model's, plus ``model.layers.N.{attn,mlp}_shortcut.weight`` and
``model.layers.0.input_projection.weight``.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any, cast

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.interfaces import SupportsPP, SupportsQuant
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    WeightsMapper,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from dynslice_modifier.modeling.configuration_dynslice import (
    PRE_NORM_LAYOUT,
    DynSliceConfig,
    has_input_projection,
)
from dynslice_modifier.modeling.modeling_dynslice import carry, layer_widths

SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Module names this file builds; checkpoint keys follow slicing.layout, so a checkpoint
# with any other layout would load into the wrong modules.
_EXPECTED_LAYOUT = PRE_NORM_LAYOUT


def _dynslice_config(vllm_config: VllmConfig) -> DynSliceConfig:
    config = vllm_config.model_config.hf_config
    if getattr(config, "slicing", None) is None or not hasattr(config, "check_slicing"):
        raise ValueError(
            "DynSliceForCausalLM needs a config with model_type 'dynslice' and a 'slicing' "
            f"section; got {type(config).__name__}"
        )
    return cast(DynSliceConfig, config)


def _check_supported(config: DynSliceConfig) -> None:
    # Validates widths, shortcuts and format_version ("upgrade dynslice-modifier").
    config.check_slicing()
    if config.base_model_type not in SUPPORTED_BASE_MODEL_TYPES:
        raise ValueError(
            f"vLLM serving of sliced {config.base_model_type!r} models is not implemented "
            f"(supported: {', '.join(SUPPORTED_BASE_MODEL_TYPES)})"
        )
    layout = config.slicing["layout"]
    if any(layout.get(k) != v for k, v in _EXPECTED_LAYOUT.items()):
        raise ValueError(f"unsupported slicing.layout {layout!r}; expected {_EXPECTED_LAYOUT}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r}: only silu is")


def _embedding_width(config: DynSliceConfig) -> int:
    # A sliced table is rotated and cut to layer 0's width; an unsliced one (tied models)
    # is the original and layer 0's input_projection maps it.
    if config.slicing["embedding_sliced"]:
        if config.tie_word_embeddings:
            raise ValueError("a sliced embedding table cannot be tied to the full-width lm_head")
        return config.slicing["attn_dims"][0]
    return config.hidden_size


class SlicedRMSNorm(nn.Module):
    """``weight * x * rsqrt(sum(x^2) / hidden_size + eps)`` over a residual narrower than
    hidden_size.

    vLLM's RMSNorm divides by the width of its input; the checkpoint's scales were folded
    into the next linears assuming the original width, so the divisor here is fixed. The
    per-dim ``weight`` (ones after slicing; changed by smoothing methods such as SmoothQuant)
    is loaded like any norm weight. Computed in float32 like the reference; under
    torch.compile inductor fuses it.
    """

    def __init__(self, width: int, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.hidden_size = hidden_size
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        variance = x32.pow(2).sum(dim=-1, keepdim=True) / self.hidden_size
        normed = (x32 * torch.rsqrt(variance + self.variance_epsilon)).to(x.dtype)
        return self.weight * normed

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, hidden_size={self.hidden_size}, eps={self.variance_epsilon}"


class SlicedAttention(nn.Module):
    """The base architecture's attention, reading ``in_dim`` and writing ``out_dim``."""

    def __init__(
        self,
        config: DynSliceConfig,
        in_dim: int,
        out_dim: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        base = config.base_model_type
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", self.total_num_heads)
        if self.total_num_heads % tp_size != 0:
            raise ValueError(
                f"num_attention_heads={self.total_num_heads} is not divisible by "
                f"tensor_parallel_size={tp_size}"
            )
        if self.total_num_kv_heads % tp_size != 0 and tp_size % self.total_num_kv_heads != 0:
            raise ValueError(
                f"num_key_value_heads={self.total_num_kv_heads} and tensor_parallel_size="
                f"{tp_size}: one must divide the other"
            )
        self.num_heads = self.total_num_heads // tp_size
        # With fewer KV heads than ranks, QKVParallelLinear replicates them.
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        # The original hidden size, never the sliced in_dim, fixes the head size.
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // self.total_num_heads
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

        attention_bias = bool(getattr(config, "attention_bias", False))
        # Qwen2 always has q/k/v biases; Llama/Mistral put attention_bias on o_proj as well.
        qkv_bias = True if base == "qwen2" else attention_bias
        o_bias = attention_bias if base in ("llama", "mistral") else False

        self.qkv_proj = QKVParallelLinear(
            hidden_size=in_dim,
            head_size=self.head_dim,
            total_num_heads=self.total_num_heads,
            total_num_kv_heads=self.total_num_kv_heads,
            bias=qkv_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            input_size=self.total_num_heads * self.head_dim,
            output_size=out_dim,
            bias=o_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if base == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        # As in vLLM's Llama: layers marked sliding in layer_types get the window here;
        # otherwise Attention falls back to the model-wide window (Mistral) or none.
        sliding_window = None
        layer_types = getattr(config, "layer_types", None)
        if layer_types and layer_types[extract_layer_index(prefix)] == "sliding_attention":
            sliding_window = config.sliding_window
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=sliding_window,
            prefix=f"{prefix}.attn",
        )

    def _head_norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        by_head = x.view(*x.shape[:-1], x.shape[-1] // self.head_dim, self.head_dim)
        return norm(by_head).view(x.shape)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            # Qwen3 normalises each head before the rotary embedding.
            q = self._head_norm(self.q_norm, q)
            k = self._head_norm(self.k_norm, k)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class SlicedMLP(nn.Module):
    """SwiGLU MLP reading ``in_dim`` and writing ``out_dim``."""

    def __init__(
        self,
        in_dim: int,
        intermediate_size: int,
        out_dim: int,
        bias: bool,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=in_dim,
            output_sizes=[intermediate_size] * 2,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            input_size=intermediate_size,
            output_size=out_dim,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


class ResidualShortcut(ReplicatedLinear):
    """Change of basis on the residual stream (``y = x W^T``), kept in model dtype.

    Replicated, not split: every tensor-parallel rank holds the full residual stream. The
    class names match the reference's (``modeling_dynslice``): vLLM's compressed-tensors
    matches ``targets`` against the class name by substring, so this one is never taken
    for ``Linear`` (it is built without a quant config anyway: the reference cannot
    quantize it), while ``ResidualShortcutLinear`` is, exactly as compressed-tensors took
    the reference's ``nn.Linear`` subclass when it wrote the checkpoint. A config can
    still claim more than the checkpoint holds, so ``load_weights`` checks the tensors.
    """

    @property
    def is_quantized(self) -> bool:
        return not isinstance(self.quant_method, UnquantizedLinearMethod)


class ResidualShortcutLinear(ResidualShortcut):
    """A shortcut of a checkpoint with ``slicing.quantizable_shortcuts``."""


def _shortcut(
    config: DynSliceConfig,
    present: bool,
    in_dim: int,
    out_dim: int,
    quant_config: QuantizationConfig | None,
    prefix: str,
) -> ResidualShortcut | None:
    if not present:
        return None
    if not config.slicing.get("quantizable_shortcuts", False):
        return ResidualShortcut(in_dim, out_dim, bias=False, quant_config=None, prefix=prefix)
    # Only compressed-tensors checkpoints (what llm-compressor writes) can hold quantized
    # shortcuts, and its config says which. Other methods quantize online, and the
    # reference keeps shortcuts of such checkpoints in model dtype.
    if quant_config is not None and quant_config.get_name() != "compressed-tensors":
        quant_config = None
    return ResidualShortcutLinear(
        in_dim, out_dim, bias=False, quant_config=quant_config, prefix=prefix
    )


class SlicedDecoderLayer(nn.Module):
    """Pre-norm decoder layer whose residual changes basis and width (see module doc)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = _dynslice_config(vllm_config)
        quant_config = vllm_config.quant_config
        idx = extract_layer_index(prefix)
        spec = config.slicing
        attn_dim, mlp_dim, out_dim = layer_widths(config, idx)
        eps = config.rms_norm_eps
        self.delta_shortcuts = bool(spec.get("delta_shortcuts", False))

        # A tied embedding table stays in the original basis at full width; layer 0 projects
        # it into its own basis first.
        self.input_projection = _shortcut(
            config,
            idx == 0 and has_input_projection(spec),
            config.hidden_size,
            attn_dim,
            quant_config,
            f"{prefix}.input_projection",
        )
        self.input_layernorm = SlicedRMSNorm(attn_dim, config.hidden_size, eps)
        self.self_attn = SlicedAttention(
            config,
            in_dim=attn_dim,
            out_dim=mlp_dim,
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        self.post_attention_layernorm = SlicedRMSNorm(mlp_dim, config.hidden_size, eps)
        self.mlp = SlicedMLP(
            in_dim=mlp_dim,
            intermediate_size=config.intermediate_size,
            out_dim=out_dim,
            bias=bool(getattr(config, "mlp_bias", False)),
            quant_config=quant_config,
            prefix=f"{prefix}.mlp",
        )
        self.attn_shortcut = _shortcut(
            config,
            spec["attn_shortcuts"][idx],
            attn_dim,
            mlp_dim,
            quant_config,
            f"{prefix}.attn_shortcut",
        )
        self.mlp_shortcut = _shortcut(
            config,
            spec["mlp_shortcuts"][idx],
            mlp_dim,
            out_dim,
            quant_config,
            f"{prefix}.mlp_shortcut",
        )

    def _shortcut(self, shortcut: ResidualShortcut, hidden_states: torch.Tensor) -> torch.Tensor:
        out, _ = shortcut(hidden_states)
        return out + carry(hidden_states, out.shape[-1]) if self.delta_shortcuts else out

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # The residual is carried as one tensor rather than vLLM's (hidden, residual) pair:
        # the shortcut acts on the full residual, so the add cannot be deferred into the
        # next norm the way vLLM's fused add-norm does.
        if self.input_projection is not None:
            hidden_states = self._shortcut(self.input_projection, hidden_states)
        residual = hidden_states
        h = self.self_attn(positions, self.input_layernorm(hidden_states))
        if self.attn_shortcut is not None:
            residual = self._shortcut(self.attn_shortcut, residual)
        hidden_states = residual + h

        residual = hidden_states
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.mlp_shortcut is not None:
            residual = self._shortcut(self.mlp_shortcut, residual)
        return residual + h


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class DynSliceModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = _dynslice_config(vllm_config)
        _check_supported(config)
        quant_config = vllm_config.quant_config
        self.config = config
        self.quant_config = quant_config
        embed_dim = _embedding_width(config)
        if vllm_config.model_config.enable_prompt_embeds and config.slicing["embedding_sliced"]:
            # User embeddings come in the original basis at hidden_size; the first layer
            # reads the rotated, narrower one.
            raise ValueError("prompt embeddings are not supported for a sliced embedding table")

        pp_group = get_pp_group()
        if pp_group.is_first_rank or (config.tie_word_embeddings and pp_group.is_last_rank):
            self.embed_tokens: nn.Module = VocabParallelEmbedding(
                config.vocab_size,
                embed_dim,
                quant_config=quant_config,
                prefix=f"{prefix}.embed_tokens",
            )
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: SlicedDecoderLayer(vllm_config, prefix),
            prefix=f"{prefix}.layers",
        )
        if pp_group.is_last_rank:
            # The last layer writes back at full width in the original basis, so the final
            # norm keeps its weight.
            self.norm: nn.Module = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.norm = PPMissingLayer()
        # A pipeline stage receives the residual at the width its first layer reads.
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.slicing["attn_dims"][self.start_layer]
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            if inputs_embeds is not None:
                hidden_states = inputs_embeds
            else:
                assert input_ids is not None
                hidden_states = self.embed_input_ids(input_ids)
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states = layer(positions, hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.norm(hidden_states)


class DynSliceForCausalLM(nn.Module, SupportsPP, SupportsQuant):
    # Checkpoints keep q/k/v and gate/up as separate tensors; vLLM stacks them.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj": (".qkv_proj", "q"),
            ".k_proj": (".qkv_proj", "k"),
            ".v_proj": (".qkv_proj", "v"),
            ".gate_proj": (".gate_up_proj", 0),
            ".up_proj": (".gate_up_proj", 1),
        }
    )
    # Lets quantization configs match their per-module entries (ignore lists, schemes)
    # against the stacked layers.
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = _dynslice_config(vllm_config)
        quant_config = vllm_config.quant_config
        self.config = config
        self.quant_config = quant_config
        self.model = DynSliceModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                lm_head = lm_head.tie_weights(self.model.embed_tokens)
            self.lm_head: nn.Module = lm_head
            self.logits_processor = LogitsProcessor(
                config.vocab_size, scale=getattr(config, "logit_scale", 1.0)
            )
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        shortcuts = {
            name: module
            for name, module in self.named_modules()
            if isinstance(module, ResidualShortcut)
        }
        return AutoWeightsLoader(self).load_weights(
            _check_shortcut_tensors(weights, shortcuts), mapper=self.hf_to_vllm_mapper
        )


_PLAIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_shortcut_tensors(
    weights: Iterable[tuple[str, torch.Tensor]], shortcuts: dict[str, ResidualShortcut]
) -> Iterable[tuple[str, torch.Tensor]]:
    """Pass weights through, refusing shortcut tensors that disagree with the built layer.

    Without this, a plain float shortcut loaded into a layer built as quantized is cast
    into its integer weight and served as garbage with no error (and a quantized one sent
    to a plain layer fails with an opaque "no parameter named weight_scale").
    """
    for name, tensor in weights:
        owner, _, attr = name.rpartition(".")
        layer = shortcuts.get(owner)
        if layer is not None:
            plain = attr == "weight" and tensor.dtype in _PLAIN_DTYPES
            if layer.is_quantized == plain:
                held, wants = ("unquantized", "quantized") if plain else ("quantized", "plain")
                raise ValueError(
                    f"{owner}: the checkpoint holds {held} tensors ({attr}, {tensor.dtype}) "
                    f"but its quantization_config makes this residual shortcut {wants}; "
                    f"make the config's targets / ignore list match (vLLM matches it as a "
                    f"{type(layer).__name__!r} module named {owner!r})"
                )
        yield name, tensor
