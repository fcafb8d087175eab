"""vLLM implementation of sliced checkpoints (``architectures: ["DynSliceForCausalLM"]``).

The reference is ``dynslice_modifier.modeling.modeling_dynslice`` (transformers). A sliced
model is its base decoder (Llama, Mistral, Phi-3, Qwen2, Qwen3, Granite: any architecture
with an adapter in ``dynslice_modifier.adapters``) where, per layer ``l``:

- the residual stream read by the attention is ``attn_dims[l]`` wide, the one read by the
  MLP ``mlp_dims[l]`` wide, and the layer writes ``attn_dims[l + 1]`` (after the last layer
  ``hidden_size``, or ``final_dim`` when the head is sliced), so ``q/k/v``, ``o_proj``,
  ``gate/up`` and ``down_proj`` have per-layer input or output widths while the attention
  internals (heads, GQA, rotary, q/k norms, biases) are untouched;
- the two in-layer norms normalise by the *original* ``hidden_size`` and scale per kept dim;
- a residual connection between two bases carries a shortcut matrix (``attn_shortcut``,
  ``mlp_shortcut``) when the config says so, otherwise it is the identity; one that
  ``delta_shortcuts`` names (every one, when it is true) is stored minus the identity,
  which is added back here;
- an embedding table left in the original basis (``embedding_sliced: false``: tied models,
  and any model whose layer 0 was left whole)
  is projected to layer 0's basis by ``model.layers.0.input_projection``, unless layer 0
  was left whole (``input_projection: false``).

A shortcut reads the same residual as the next projection (q/k/v, gate/up), which reads it
through a norm. When the norms are ones (``slicing.unit_norms``), the projection has no
bias, both are quantized alike (activations, if quantized, dynamically per token; not NVFP4
or FP8 with one weight scale per tensor: see ``_fusable``) and there is one tensor-parallel
rank, the shortcut becomes one more output shard of that projection
(``LinearWithShortcut``): one GEMM instead of two, which on a small model is most of what a
shortcut costs, since each GEMM call has a fixed overhead.

vLLM's Llama/Qwen attention and MLP classes take a single ``hidden_size`` for both their
input and output (and Qwen2 derives ``head_dim`` from it), so they cannot express a layer
that reads one width and writes another; the attention and MLP below are therefore written
out, using vLLM's parallel linears (quantization, tensor parallelism), ``Attention`` (KV
cache, backends), ``get_rope`` and ``RMSNorm`` exactly as the base architectures do; what
an architecture's attention does differently (biases, per-head q/k norms) its adapter says
(``dynslice_modifier.adapters``). Checkpoint names are the base model's, plus
``model.layers.N.{attn,mlp}_shortcut.weight`` and ``model.layers.0.input_projection.weight``;
q/k/v and gate/up are stored apart or, with ``slicing.layout`` fused (Phi-3), as the one
``qkv_proj`` and ``gate_up_proj`` the model builds anyway.
"""

from __future__ import annotations

import copy
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
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from dynslice_modifier.adapters import ADAPTERS
from dynslice_modifier.modeling.configuration_dynslice import (
    FUSED_LAYOUT,
    INPUT_PROJECTION,
    SHORTCUTS,
    DynSliceConfig,
    final_width,
    layer_deltas,
)
from dynslice_modifier.modeling.modeling_dynslice import (
    SlicedRMSNorm,
    carry,
    first_names,
    layer_shortcuts,
    layer_widths,
)
from dynslice_modifier.serving.cpu_kernels import check_cpu_dtype, check_cpu_kernels
from dynslice_modifier.serving.support import (
    check_prompt_embeds,
    check_servable,
    check_served_dtype,
)


def _dynslice_config(vllm_config: VllmConfig) -> DynSliceConfig:
    config = vllm_config.model_config.hf_config
    if getattr(config, "slicing", None) is None or not hasattr(config, "check_slicing"):
        raise ValueError(
            "DynSliceForCausalLM needs a config with model_type 'dynslice' and a 'slicing' "
            f"section; got {type(config).__name__}"
        )
    return cast(DynSliceConfig, config)


def _embedding_width(config: DynSliceConfig) -> int:
    # A sliced table is rotated and cut to layer 0's width; an unsliced one (tied models)
    # is the original, which layer 0's input_projection maps, or reads whole.
    if config.slicing["embedding_sliced"]:
        return config.slicing["attn_dims"][0]
    return config.hidden_size


def heads_per_rank(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """The query and KV heads each tensor-parallel rank holds."""
    if num_heads % tp_size != 0:
        raise ValueError(
            f"num_attention_heads={num_heads} is not divisible by tensor_parallel_size="
            f"{tp_size}: choose a tensor_parallel_size that divides it"
        )
    if num_kv_heads % tp_size != 0 and tp_size % num_kv_heads != 0:
        raise ValueError(
            f"num_key_value_heads={num_kv_heads} and tensor_parallel_size={tp_size}: one "
            "must divide the other; choose another tensor_parallel_size"
        )
    # With fewer KV heads than ranks, QKVParallelLinear replicates them.
    return num_heads // tp_size, max(1, num_kv_heads // tp_size)


def _sliding_window(config: DynSliceConfig, layer_idx: int) -> int | None:
    """The window of a layer marked sliding in ``layer_types``, as vLLM's Llama sets it;
    None leaves Attention the model-wide window (Mistral's) or none."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[layer_idx] == "sliding_attention":
        return config.sliding_window
    return None


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
        adapter = ADAPTERS[config.base_model_type]
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", self.total_num_heads)
        self.num_heads, self.num_kv_heads = heads_per_rank(
            self.total_num_heads, self.total_num_kv_heads, get_tensor_model_parallel_world_size()
        )
        # The original hidden size, never the sliced in_dim, fixes the head size.
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // self.total_num_heads
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

        qkv_bias, o_bias = adapter.attention_biases(config)

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
        if adapter.head_norms:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            adapter.attention_scale(config, self.head_dim),
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=_sliding_window(config, extract_layer_index(prefix)),
            prefix=f"{prefix}.attn",
        )

    def _head_norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        by_head = x.view(*x.shape[:-1], x.shape[-1] // self.head_dim, self.head_dim)
        return norm(by_head).view(x.shape)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """Attention from ``qkv``, the output of ``qkv_proj``: the decoder layer applies the
        projection, possibly fused with its shortcut (``LinearWithShortcut``)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
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

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP from the output of ``gate_up_proj``, which the decoder layer applies."""
        # With a fused shortcut, gate_up is a view whose rows are wider than it; vLLM's
        # CUDA silu_and_mul kernel reads rows as if they were packed (its native path, on
        # CPUs and in compiled graphs, follows strides). A no-op when already packed.
        out, _ = self.down_proj(self.act_fn(gate_up.contiguous()))
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


class LinearWithShortcut(MergedColumnParallelLinear):
    """A sublayer's input projection (``qkv_proj`` or ``gate_up_proj``) with the residual
    shortcut appended as its last output shard: one GEMM instead of two.

    The projection reads ``norm(x) = x * inverse_rms(x)`` (norm weights all ones) and the
    shortcut reads ``x``. A per-token factor commutes with the GEMM and with dynamic per-token
    activation quantization, so the layer runs the GEMM on ``norm(x)`` and multiplies the
    shortcut's columns by ``rms(x)`` afterwards: those are as many as the residual is wide,
    fewer than the projection's (q/k/v, or twice the MLP's intermediate size), and the
    projection then reads exactly what the unfused path gives it. The checkpoint keeps the
    shortcut apart: the projection's tensors load under their usual shard ids (all of them at
    once where the checkpoint stores the projection fused, as Phi-3's do), the shortcut's
    (through ``FusedShortcut``) as ``"shortcut"``.
    The class name keeps "Linear": compressed-tensors matches ``targets: Linear`` by it.
    """

    def __init__(
        self,
        input_size: int,
        shard_ids: list[str | int],
        output_sizes: list[int],
        shortcut_size: int,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__(
            input_size=input_size,
            output_sizes=[*output_sizes, shortcut_size],
            bias=False,
            quant_config=quant_config,
            prefix=prefix,
        )
        self.shard_ids = [*shard_ids, "shortcut"]
        self.shortcut_size = shortcut_size

    def validate_shard_id(self, shard_id: Any) -> Any:
        return super().validate_shard_id(self._index(shard_id))

    def _index(self, shard_id: Any) -> Any:
        if shard_id is None:
            # A tensor fused on disk (Phi-3's qkv_proj, gate_up_proj) holds the projection's
            # shards, never the shortcut, which the checkpoint stores apart.
            return tuple(range(len(self.shard_ids) - 1))
        return self.shard_ids.index(shard_id) if isinstance(shard_id, str) else shard_id

    def weight_loader(
        self, param: Any, loaded_weight: torch.Tensor, loaded_shard_id: Any = None
    ) -> None:
        super().weight_loader(param, loaded_weight, self._index(loaded_shard_id))

    def weight_loader_v2(
        self, param: Any, loaded_weight: torch.Tensor, loaded_shard_id: Any = None
    ) -> None:
        super().weight_loader_v2(param, loaded_weight, self._index(loaded_shard_id))


class FusedShortcut(nn.Module):
    """Stands where a shortcut fused into ``LinearWithShortcut`` was: it loads the
    checkpoint's shortcut tensors into that layer's last shard and owns no parameters."""

    def __init__(self, fused: LinearWithShortcut, is_quantized: bool) -> None:
        super().__init__()
        # A plain list, so the fused layer is not registered (and loaded) twice.
        self._fused = [fused]
        self.is_quantized = is_quantized

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self._fused[0].named_parameters())
        loaded = set()
        for name, tensor in weights:
            param = params[name]
            param.weight_loader(param, tensor, "shortcut")
            loaded.add(name)
        return loaded


def _shortcut(
    config: DynSliceConfig,
    shape: tuple[int, int] | None,
    quant_config: QuantizationConfig | None,
    prefix: str,
) -> ResidualShortcut | None:
    if shape is None:
        return None
    in_dim, out_dim = shape
    if not config.slicing.get("quantizable_shortcuts", False):
        return ResidualShortcut(in_dim, out_dim, bias=False, quant_config=None, prefix=prefix)
    # Only compressed-tensors checkpoints (what llm-compressor writes) hold quantized
    # shortcuts, and their config says which. Under any other method (an online one, or a
    # GPTQ/AWQ checkpoint another tool wrote) the reference keeps shortcuts in model dtype;
    # quantized shortcut tensors there are refused at load (_check_shortcut_tensors).
    if quant_config is not None and quant_config.get_name() != "compressed-tensors":
        quant_config = None
    return ResidualShortcutLinear(
        in_dim, out_dim, bias=False, quant_config=quant_config, prefix=prefix
    )


def count_fused_shortcuts(model: nn.Module) -> int:
    """Shortcuts that run inside the next projection's GEMM; for ``LLM.apply_model``, which
    pickles the function by reference, so it lives in an importable module."""
    return sum(isinstance(module, FusedShortcut) for module in model.modules())


def _quantization(layer: ReplicatedLinear | MergedColumnParallelLinear) -> Any:
    """How ``layer`` is quantized, comparable between layers: None when it is not, else
    compressed-tensors' scheme dict (QuantizationArgs of weights and input activations).
    Only compressed-tensors quantizes shortcuts (see ``_shortcut``); a layer quantized by
    another method stands for itself, so it is alike no other."""
    if isinstance(layer.quant_method, UnquantizedLinearMethod):
        return None
    config = layer.quant_config
    if config is not None and config.get_name() == "compressed-tensors":
        return config.get_scheme_dict(layer, layer.prefix)
    return layer


def _fusable(projection: MergedColumnParallelLinear, shortcut: ResidualShortcut) -> bool:
    """Whether the shortcut can share the projection's GEMM (``LinearWithShortcut``).

    Both must be quantized alike (or both not), and activation quantization, if any, must be
    dynamic per token: that alone is blind to the per-token factor the fusion moves. The
    caller checks the rest (one tensor-parallel rank, unit norms, no projection bias).
    """
    scheme = _quantization(projection)
    if scheme != _quantization(shortcut):
        return False
    weights = None if scheme is None else scheme.get("weights")
    if weights is not None and weights.strategy == "tensor_group":
        # NVFP4's global scale is shared within q/k/v and within gate/up, not with the
        # shortcut, and vLLM keeps one per fused layer (the largest): no shard may differ.
        return False
    if weights is not None and weights.type == "float" and weights.strategy == "tensor":
        # FP8 per-tensor weights: vLLM requantizes every shard of a fused layer to the
        # largest shard's scale, which costs a small (delta) shortcut most of its precision;
        # int8 per-tensor is unaffected (vLLM turns it into per-channel scales exactly).
        return False
    activations = None if scheme is None else scheme.get("input_activations")
    return activations is None or (activations.dynamic is True and activations.strategy == "token")


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
        self.deltas = layer_deltas(spec, idx)

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
        shapes = layer_shortcuts(config, idx)
        for name in (INPUT_PROJECTION, *SHORTCUTS):
            shortcut = _shortcut(config, shapes.get(name), quant_config, f"{prefix}.{name}")
            setattr(self, name, shortcut)
        # Fusing moves the norm's per-token factor past the GEMM, which is exact only while
        # the norm has no per-dim weight to apply first (the config says; load_weights
        # checks); the shortcut is replicated, so it cannot join a split projection.
        if spec.get("unit_norms", False) and get_tensor_model_parallel_world_size() == 1:
            attn = self.self_attn
            q_size, kv_size = attn.q_size, attn.kv_size
            self.attn_shortcut = self._fuse(
                attn, "qkv_proj", ["q", "k", "v"], [q_size, kv_size, kv_size], self.attn_shortcut
            )
            inter = config.intermediate_size
            self.mlp_shortcut = self._fuse(
                self.mlp, "gate_up_proj", [0, 1], [inter, inter], self.mlp_shortcut
            )

    @staticmethod
    def _fuse(
        owner: nn.Module,
        name: str,
        shard_ids: list[str | int],
        sizes: list[int],
        shortcut: ResidualShortcut | None,
    ) -> ResidualShortcut | FusedShortcut | None:
        """Replace ``owner.<name>`` by the projection with ``shortcut`` appended, if it can."""
        projection = getattr(owner, name)
        if shortcut is None or projection.bias is not None or not _fusable(projection, shortcut):
            return shortcut
        fused = LinearWithShortcut(
            projection.input_size,
            shard_ids,
            sizes,
            shortcut.output_size,
            projection.quant_config,
            projection.prefix,
        )
        # The fused layer resolves its own quantization (by prefix and class name); it must
        # come out as the projection's, or the shortcut stays a GEMM of its own.
        if _quantization(fused) != _quantization(projection):
            return shortcut
        setattr(owner, name, fused)
        return FusedShortcut(fused, shortcut.is_quantized)

    def _read(
        self,
        norm: SlicedRMSNorm,
        projection: MergedColumnParallelLinear,
        name: str,
        hidden_states: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the sublayer's input projection of norm(x), the residual x in the next basis
        through the shortcut called ``name``)."""
        shortcut = getattr(self, name)
        if isinstance(shortcut, FusedShortcut):
            inverse_rms = norm.inverse_rms(hidden_states)
            both, _ = projection(norm.scale(hidden_states, inverse_rms))
            size = cast(LinearWithShortcut, projection).shortcut_size
            projected, moved = both.split([both.shape[-1] - size, size], dim=-1)
            moved = (moved.to(torch.float32) / inverse_rms).to(hidden_states.dtype)
        else:
            projected, _ = projection(norm(hidden_states))
            if shortcut is None:
                return projected, hidden_states
            moved, _ = shortcut(hidden_states)
        return projected, self._add_identity(name, moved, hidden_states)

    def _add_identity(
        self, name: str, moved: torch.Tensor, hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """A delta shortcut's output plus the ``x E`` its stored matrix leaves out."""
        if name not in self.deltas:
            return moved
        return moved + carry(hidden_states, moved.shape[-1])

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # The residual is carried as one tensor rather than vLLM's (hidden, residual) pair:
        # the shortcut acts on the full residual, so the add cannot be deferred into the
        # next norm the way vLLM's fused add-norm does.
        if self.input_projection is not None:
            moved, _ = self.input_projection(hidden_states)
            hidden_states = self._add_identity(INPUT_PROJECTION, moved, hidden_states)
        qkv, residual = self._read(
            self.input_layernorm, self.self_attn.qkv_proj, "attn_shortcut", hidden_states
        )
        hidden_states = residual + self.self_attn(positions, qkv)
        gate_up, residual = self._read(
            self.post_attention_layernorm, self.mlp.gate_up_proj, "mlp_shortcut", hidden_states
        )
        return residual + self.mlp(gate_up)

    def fused_norms(self) -> list[tuple[str, SlicedRMSNorm]]:
        """The norms whose weight the fused GEMMs assume to be ones."""
        pairs = (
            ("input_layernorm", self.input_layernorm, self.attn_shortcut),
            ("post_attention_layernorm", self.post_attention_layernorm, self.mlp_shortcut),
        )
        return [(name, norm) for name, norm, sc in pairs if isinstance(sc, FusedShortcut)]


class LMHeadLinear(ParallelLMHead):
    """vLLM's ParallelLMHead under a class name that holds "Linear".

    In the checkpoint's model the head is an ``nn.Linear``, so a recipe with ``targets:
    Linear`` and no ``ignore: [lm_head]`` quantizes it (llm-compressor unties a tied table
    to do so). vLLM's compressed-tensors matches ``targets`` against a head's name or, by
    substring, its class name; under ParallelLMHead's own name such a head would be built
    unquantized and its ``weight_scale`` refused at load. A head the config ignores is built
    unquantized as before.
    """


@support_torch_compile(
    # One named symbol for the token dimension of every argument, as vLLM's Llama has it.
    dynamic_arg_dims={
        "input_ids": {0: "b"},
        "positions": {0: "b"},
        "intermediate_tensors": {0: "b"},
        "inputs_embeds": {0: "b"},
    }
)
class DynSliceModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = _dynslice_config(vllm_config)
        check_servable(config)
        quant_config = vllm_config.quant_config
        self.config = config
        self.quant_config = quant_config
        # Granite's embedding_multiplier, on looked-up and given embeddings alike.
        self.embedding_scale = ADAPTERS[config.base_model_type].embedding_scale(config)
        embed_dim = _embedding_width(config)
        check_prompt_embeds(config, vllm_config.model_config.enable_prompt_embeds)

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
            # Unless the head is sliced, the last layer writes back at full width in the
            # original basis, so the final norm keeps its weight; a sliced head reads a
            # narrower basis through a sliced norm (its scale folded into the head).
            final = config.slicing.get("final_dim")
            self.norm: nn.Module = (
                SlicedRMSNorm(final, config.hidden_size, config.rms_norm_eps)
                if final
                else RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            )
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
            if self.embedding_scale != 1.0:
                hidden_states = hidden_states * self.embedding_scale
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states = layer(positions, hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.norm(hidden_states)


class DynSliceForCausalLM(nn.Module, SupportsPP, SupportsQuant):
    # Checkpoints of the pre-norm layout keep q/k/v and gate/up as separate tensors, which
    # vLLM stacks; fused-layout ones already store them stacked, under the stacked names.
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
        if config.slicing["layout"] == FUSED_LAYOUT:
            # The checkpoint names the fused linears themselves (as vLLM's Phi-3 has it), in
            # its tensors and in the quantization config's targets and ignore list.
            self.packed_modules_mapping = {name: [name] for name in self.packed_modules_mapping}
            if quant_config is not None:
                quant_config.packed_modules_mapping.update(self.packed_modules_mapping)
        self.config = config
        self.quant_config = quant_config
        self.model = DynSliceModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            lm_head = LMHeadLinear(
                config.vocab_size,
                final_width(config.slicing, config.hidden_size),
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
        # A dummy-loaded engine (RL: the trainer sends every weight later) never calls
        # load_weights before its updates, which must not be taken for a first, whole load.
        self._loaded = vllm_config.load_config.load_format == "dummy"
        # The checkpoint's tensor shapes, built once: weight updates call load_weights per tensor.
        self._shapes: dict[str, tuple[int, ...]] | None = None
        dtype = vllm_config.model_config.dtype
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            check_cpu_kernels(self)
            check_cpu_dtype(dtype)
        name = None if quant_config is None else quant_config.get_name()
        check_served_dtype(on_cpu, name, getattr(config, "quantization_config", None), dtype)

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
            if isinstance(module, (ResidualShortcut, FusedShortcut))
        }
        # The decoder layers this rank builds (pipeline parallelism leaves the others out).
        layers = {
            name: module
            for name, module in self.named_modules()
            if isinstance(module, SlicedDecoderLayer)
        }
        fused_norms = {
            f"{name}.{norm_name}.weight"
            for name, module in layers.items()
            for norm_name, _ in module.fused_norms()
        }
        names: set[str] = set()
        current: list[tuple[str, tuple[int, ...]]] = []
        if self._shapes is None:
            self._shapes = _checkpoint_shapes(self.config, self.quant_config)
        shapes = self._shapes
        checked = _check_shapes(
            _check_fused_norms(
                _check_shortcut_tensors(weights, shortcuts, set(layers)), fused_norms
            ),
            shapes,
            names,
        )
        try:
            loaded = AutoWeightsLoader(self).load_weights(
                _recording(checked, current), mapper=self.hf_to_vllm_mapper
            )
        except AssertionError as err:
            # vLLM's weight loaders assert on a tensor of another shape than the parameter's,
            # which says nothing of where the shape came from.
            name, shape = current[-1] if current else ("a tensor", ())
            cause = str(err) or "its shape differs from the layer built"
            raise ValueError(
                f"loading {name} {list(shape)} failed ({cause}): config.json's slicing "
                "(attn_dims, mlp_dims, final_dim) and the saved weights disagree; re-save the "
                "sliced model, or restore its config.json"
            ) from err
        # Only the first load must be whole: later calls are weight updates (vLLM's weight
        # transfer for RL sends one tensor per call), which keep what they do not send.
        if not self._loaded:
            _check_quantized_weights_loaded(self, loaded)
            # vLLM counts a fused projection loaded once its own shards are, and skips the
            # check for quantized models, so a shortcut missing from the file would serve
            # whatever memory its rows held.
            missing = list(set(shortcuts) - {name.rpartition(".")[0] for name in names})
            if missing:
                raise ValueError(
                    f"the checkpoint has no tensors for the residual shortcuts "
                    f"{first_names(missing)} that its config declares; config.json's slicing "
                    "(attn_shortcuts / mlp_shortcuts; input_projection and embedding_sliced "
                    "for layer 0's input projection) must match the saved weights: re-save "
                    "the sliced model, or restore the missing tensors"
                )
            _check_layers_complete(shapes, names, layers)
        self._loaded = True
        return loaded


# Quantization methods whose checkpoints keep each float weight's name and rows (8-bit
# weights its shape, compressed-tensors' packed ones their rows and ``weight_shape``). Others
# store packed weights under other names or shapes (GPTQ's ``qweight``, ModelOpt's uint8
# ``weight``), which vLLM builds its parameters for: not checked here.
_SHAPED_FORMATS = (None, "compressed-tensors", "fp8")


def _checkpoint_shapes(
    config: DynSliceConfig, quant_config: QuantizationConfig | None
) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the unquantized checkpoint that ``config`` describes:
    the transformers model's own, built on ``meta``; none for a quantization format whose
    tensors have other names or shapes (``_SHAPED_FORMATS``)."""
    from dynslice_modifier.modeling.modeling_dynslice import DynSliceForCausalLM as Reference

    if (quant_config and quant_config.get_name()) not in _SHAPED_FORMATS:
        return {}

    with torch.device("meta"):
        reference = Reference(copy.deepcopy(config))
    return {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}


def _disagree(name: str, held: str, wanted: str) -> ValueError:
    return ValueError(
        f"{name} is {held} in the checkpoint, but its config.json makes it {wanted}: "
        "config.json (its slicing's attn_dims, mlp_dims, final_dim, or its sizes: "
        "intermediate_size, head counts) and the saved weights disagree; restore config.json, "
        "or re-save the sliced model"
    )


def _check_shapes(
    weights: Iterable[tuple[str, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
    names: set[str],
) -> Iterable[tuple[str, torch.Tensor]]:
    """Pass weights through, refusing a tensor whose shape is not the one the config
    gives it; ``names`` collects every name that passed.

    vLLM's linear loaders cut a tensor down to the built parameter (``narrow``, meant for
    tensor parallelism), so a config.json whose ``intermediate_size`` or head count was
    edited down would load the front of each tensor and serve another function. Quantized
    tensors are checked where their layout is known: an 8-bit ``weight`` is as wide as the
    float one, a packed 4-bit one keeps its rows and records the float shape in
    ``weight_shape``.
    """
    for name, tensor in weights:
        names.add(name)
        base, _, attr = name.rpartition(".")
        wanted = shapes.get(f"{base}.weight")
        if attr == "weight_packed" and wanted is not None and tensor.shape[0] != wanted[0]:
            raise _disagree(name, f"{tensor.shape[0]} rows", f"{wanted[0]} rows")
        if attr == "weight_shape" and wanted is not None and tensor.tolist() != list(wanted):
            raise _disagree(name, f"{tensor.tolist()}", f"{list(wanted)}")
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise _disagree(name, f"{list(tensor.shape)}", f"{list(shapes[name])}")
        yield name, tensor


def _check_layers_complete(
    shapes: dict[str, tuple[int, ...]], names: set[str], layers: Iterable[str]
) -> None:
    """Refuse a first load that gave a built decoder layer only part of its tensors.

    vLLM counts a stacked projection (``qkv_proj``, ``gate_up_proj``) loaded once any of
    its shards is, so a checkpoint without, say, ``q_proj`` would serve that shard's
    uninitialised memory. A weight counts as present also in compressed-tensors' packed
    form (``weight_packed``) or split into parts (``weight.<part>``), not by its scales alone.
    """

    def present(name: str) -> bool:
        return (
            name in names
            or f"{name}_packed" in names
            or any(other.startswith(f"{name}.") for other in names)
        )

    prefixes = tuple(f"{layer}." for layer in layers)
    missing = [name for name in shapes if name.startswith(prefixes) and not present(name)]
    if missing:
        raise ValueError(
            f"the checkpoint has no tensors for {first_names(missing)}, which its config.json "
            "declares: the checkpoint is incomplete, or config.json belongs to another model; "
            "save or fetch the sliced model again"
        )


def _recording(
    weights: Iterable[tuple[str, torch.Tensor]], current: list[tuple[str, tuple[int, ...]]]
) -> Iterable[tuple[str, torch.Tensor]]:
    """Pass weights through, keeping the name and shape of the latest in ``current``."""
    for name, tensor in weights:
        current[:] = [(name, tuple(tensor.shape))]
        yield name, tensor


def _check_quantized_weights_loaded(model: nn.Module, loaded: set[str]) -> None:
    """Refuse a first load that left a quantized linear without its weight scales.

    vLLM checks nothing for quantized models, so a checkpoint whose config.json carries a
    quantization_config its tensors do not follow (float weights, no scales) would cast
    the float weights into integer parameters and serve garbage without an error.
    """
    missing = [
        name
        for name, _ in model.named_parameters()
        if name.endswith(".weight_scale") and name not in loaded
    ]
    if missing:
        raise ValueError(
            "config.json's quantization_config quantizes layers that the checkpoint holds no "
            f"weight scales for: {first_names(missing)}; if the weights are not quantized, "
            "remove quantization_config from config.json; otherwise re-save the quantized model"
        )


def _check_fused_norms(
    weights: Iterable[tuple[str, torch.Tensor]], fused_norms: set[str]
) -> Iterable[tuple[str, torch.Tensor]]:
    """Pass weights through, refusing a norm weight other than ones where a fused GEMM
    assumes ones, before it is written: a caller that catches the error (a weight update)
    keeps serving the model it had."""
    for name, tensor in weights:
        if name in fused_norms and not bool(torch.all(tensor == 1)):
            raise ValueError(
                f"{name.removesuffix('.weight')} has a weight other than ones (a smoothing "
                "method such as SmoothQuant, or fine-tuning, changed it after slicing), but "
                "the config's slicing.unit_norms is true; set it to false in config.json (a "
                "save by dynslice-modifier's DynSliceForCausalLM reads it from the norms it "
                "writes, unless they are out of its reach, as in a save of another tool)"
            )
        yield name, tensor


_PLAIN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_shortcut_tensors(
    weights: Iterable[tuple[str, torch.Tensor]],
    shortcuts: dict[str, ResidualShortcut | FusedShortcut],
    layers: set[str],
) -> Iterable[tuple[str, torch.Tensor]]:
    """Pass weights through, refusing shortcut tensors that disagree with the built layer or
    that a built layer (of ``layers``) has no shortcut for.

    Without this, a plain float shortcut loaded into a layer built as quantized is cast
    into its integer weight and served as garbage with no error (and a quantized one sent
    to a plain layer fails with an opaque "no parameter named weight_scale").
    """
    for name, tensor in weights:
        owner, _, attr = name.rpartition(".")
        layer = shortcuts.get(owner)
        parent, _, kind = owner.rpartition(".")
        if layer is None and kind in (INPUT_PROJECTION, *SHORTCUTS) and parent in layers:
            # vLLM would say only that no such parameter exists.
            raise ValueError(
                f"the checkpoint holds {name}, a residual shortcut that its config.json does "
                "not declare (slicing.attn_shortcuts / mlp_shortcuts; input_projection for "
                "layer 0): re-save the sliced model, or make config.json's slicing match the "
                "saved weights"
            )
        if layer is not None:
            plain = attr == "weight" and tensor.dtype in _PLAIN_DTYPES
            if layer.is_quantized == plain:
                held, wants = ("unquantized", "quantized") if plain else ("quantized", "plain")
                raise ValueError(
                    f"{owner}: the checkpoint holds {held} tensors ({attr}, {tensor.dtype}) "
                    f"but its quantization_config makes this residual shortcut {wants}; "
                    f"make the config's targets / ignore list match (vLLM matches it as a "
                    f"{type(layer).__name__!r} module named {owner!r}; only compressed-tensors "
                    "checkpoints, as llm-compressor writes them, may quantize shortcuts)"
                )
        yield name, tensor
