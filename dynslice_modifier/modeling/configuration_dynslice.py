"""Configuration of a sliced model.

A sliced checkpoint keeps every attribute of the model it came from (so engines that read
``hidden_size``, ``num_attention_heads``, rope settings, ... keep working) and adds one
``slicing`` section that says how wide the residual stream is where each sub-layer reads it.

This file imports nothing but transformers: it is copied next to every saved checkpoint so
that ``trust_remote_code=True`` loads it without this package, and the vLLM plugin reads it
without llm-compressor.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from transformers import PretrainedConfig

# 2 added ``quantizable_shortcuts``, 3 ``delta_shortcuts``, 4 ``final_dim``, 5
# ``delta_shortcuts`` as a list (some shortcuts stored whole), 6 Phi-3 and Granite. A
# checkpoint records the lowest version that reads it (see ``format_version``), so older
# readers refuse only what they would build wrongly or could not serve.
SLICING_FORMAT_VERSION = 6

# Every base architecture an adapter slices, with the first format whose readers serve it.
# An older vLLM plugin refuses a newer architecture's checkpoints as "not implemented", which
# does not say that a newer plugin serves them; written with this format, they make it ask
# for the upgrade. A new adapter adds its entry at the format it ships in (tests check that
# every adapter has one).
ARCHITECTURE_FORMATS: dict[str, int] = {
    "llama": 1,
    "mistral": 1,
    "qwen2": 1,
    "qwen3": 1,
    "phi3": 6,
    "granite": 6,
}

# Module names inside a pre-norm decoder layer as Llama and the models that copy it write
# them. Checkpoints record their layout; this is the one the adapters and vLLM build.
PRE_NORM_LAYOUT: dict[str, Any] = {
    "attn": "self_attn",
    "mlp": "mlp",
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "attn_inputs": ["q_proj", "k_proj", "v_proj"],
    "attn_output": "o_proj",
    "mlp_inputs": ["gate_proj", "up_proj"],
    "mlp_output": "down_proj",
}
# Phi-3's: q/k/v in one linear and gate/up in another, as its checkpoints store them.
FUSED_LAYOUT: dict[str, Any] = PRE_NORM_LAYOUT | {
    "attn_inputs": ["qkv_proj"],
    "mlp_inputs": ["gate_up_proj"],
}
# Part of the format: readers (this model, vLLM's) build these module names and no others, so
# a checkpoint with any other layout would load its tensors into the wrong modules, or fail
# on a missing one. A new adapter with a layout of its own adds it here.
LAYOUTS = (PRE_NORM_LAYOUT, FUSED_LAYOUT)
# Base-config scalars folded into the weights by slicing (Granite's): every adapter's
# ``output_multiplier`` and ``logits_divisor`` (tests check), named again here because
# checkpoints carry this file without the adapters.
FOLDED_SCALARS = ("residual_multiplier", "logits_scaling")

# Module names, inside a sliced decoder layer, of the residual stream's changes of basis:
# around attention and around the MLP, and layer 0's projection of the tied table.
SHORTCUTS = ("attn_shortcut", "mlp_shortcut")
INPUT_PROJECTION = "input_projection"


class SlicingConfigError(ValueError):
    """A sliced-model config is missing a key or holds an impossible value."""


def invalid_slicing(problem: str) -> SlicingConfigError:
    # Only the modifier writes a slicing section, so any impossible value in one means the
    # file was edited or comes from elsewhere; re-saving is the one fix that always works.
    return SlicingConfigError(
        f"{problem}: config.json was edited or not written by dynslice-modifier; re-save "
        "the sliced model"
    )


def _layer_list(spec: dict[str, Any], key: str, length: int) -> list[Any]:
    """``slicing[key]``, one unchecked entry per decoder layer; the caller checks each."""
    values = spec.get(key)
    if not isinstance(values, list) or len(values) != length:
        raise invalid_slicing(
            f"slicing.{key} must be a list of {length} entries (one per decoder layer), "
            f"got {values!r}"
        )
    return values


def validate_slicing(spec: Any, hidden_size: int, num_layers: int) -> None:
    """Reject a ``slicing`` section that would build a wrong or unloadable model."""
    if not isinstance(spec, dict):
        raise invalid_slicing(f"config.slicing must be a mapping, got {type(spec).__name__}")
    version = _check_format_version(spec.get("format_version"))
    _check_layer_count(spec, num_layers)
    check_layer_entries(spec, hidden_size, num_layers)
    _check_shortcuts_join_widths(spec, hidden_size, num_layers)
    if spec.get("layout") not in LAYOUTS:
        raise invalid_slicing(
            f"slicing.layout is {spec.get('layout')!r}, not one of the layouts sliced models "
            f"are built with ({' or '.join(map(str, LAYOUTS))})"
        )
    whole = spec.get("whole_layers", [])
    if not isinstance(whole, list) or any(
        type(i) is not int or not 0 <= i < num_layers for i in whole
    ):
        raise invalid_slicing(
            f"slicing.whole_layers must list decoder-layer indices (0 to {num_layers - 1}), "
            f"got {whole!r}"
        )
    if spec.get("embedding_sliced") not in (True, False):
        raise invalid_slicing("slicing.embedding_sliced must be true or false")
    for key in ("input_projection", "quantizable_shortcuts", "unit_norms"):
        if spec.get(key, False) not in (True, False):
            raise invalid_slicing(f"slicing.{key} must be true or false")
    _check_delta_shortcuts(spec, version)
    unprojected = not spec["embedding_sliced"] and not has_input_projection(spec)
    if unprojected and spec["attn_dims"][0] != hidden_size:
        raise invalid_slicing(
            "slicing.input_projection is false, so layer 0 must read the embedding table at "
            f"full width: attn_dims[0] = {spec['attn_dims'][0]} != {hidden_size}"
        )


def _check_format_version(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise invalid_slicing(
            f"slicing.format_version is {version!r}, not a version number (1 and up)"
        )
    if version > SLICING_FORMAT_VERSION:
        raise SlicingConfigError(
            f"slicing.format_version {version!r} is not supported by this code "
            f"(it reads up to {SLICING_FORMAT_VERSION}); upgrade dynslice-modifier: "
            "pip install -U dynslice-modifier (from a clone: git pull, then pip install -e .)"
        )
    return version


def _check_layer_count(spec: dict[str, Any], num_layers: int) -> None:
    """A layer count that disagrees with every per-layer list, as a ``num_hidden_layers``
    argument to ``from_pretrained`` (which truncates a dense model) gives."""
    lengths = {
        len(values)
        for key in ("attn_dims", "mlp_dims", "attn_shortcuts", "mlp_shortcuts")
        if isinstance(values := spec.get(key), list)
    }
    if len(lengths) == 1 and (described := lengths.pop()) != num_layers:
        raise SlicingConfigError(
            f"num_hidden_layers is {num_layers}, but slicing describes {described} decoder "
            "layers: a sliced model loads only whole, since each layer's width and basis "
            "lead into the next; drop the num_hidden_layers argument to from_pretrained "
            f"(or set num_hidden_layers back to {described} in config.json)"
        )


def check_layer_entries(spec: dict[str, Any], hidden_size: int, num_layers: int) -> None:
    """Every per-layer width and shortcut flag, and the head's width, well-typed and in range."""
    for key in ("attn_dims", "mlp_dims"):
        for i, dim in enumerate(_layer_list(spec, key, num_layers)):
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= hidden_size:
                raise invalid_slicing(
                    f"slicing.{key}[{i}] = {dim!r}: each dim must be an integer in "
                    f"[1, hidden_size={hidden_size}]"
                )
    for key in ("attn_shortcuts", "mlp_shortcuts"):
        for i, flag in enumerate(_layer_list(spec, key, num_layers)):
            if not isinstance(flag, bool):
                raise invalid_slicing(f"slicing.{key}[{i}] must be true or false, got {flag!r}")
    final = spec.get("final_dim")
    if final is not None and (
        isinstance(final, bool) or not isinstance(final, int) or not 0 < final <= hidden_size
    ):
        raise invalid_slicing(
            f"slicing.final_dim = {final!r}: the head's width must be an integer in "
            f"[1, hidden_size={hidden_size}] (or absent: full width, original basis)"
        )


def _check_shortcuts_join_widths(spec: dict[str, Any], hidden_size: int, num_layers: int) -> None:
    """Wherever the residual changes width, a shortcut matrix must carry it across."""
    for i in range(num_layers):
        if not spec["attn_shortcuts"][i] and spec["attn_dims"][i] != spec["mlp_dims"][i]:
            raise invalid_slicing(
                f"layer {i}: attn_dims != mlp_dims needs an attention shortcut matrix"
            )
        out_dim = spec["attn_dims"][i + 1] if i + 1 < num_layers else final_width(spec, hidden_size)
        if not spec["mlp_shortcuts"][i] and spec["mlp_dims"][i] != out_dim:
            raise invalid_slicing(
                f"layer {i}: mlp_dims[{i}] != the next width {out_dim} needs an MLP shortcut"
            )


def _check_delta_shortcuts(spec: dict[str, Any], version: int) -> None:
    deltas = spec.get("delta_shortcuts", False)
    if isinstance(deltas, list):
        declared = set(declared_shortcuts(spec))
        unknown = [name for name in deltas if name not in declared]
        if unknown:
            raise invalid_slicing(
                f"slicing.delta_shortcuts names shortcuts the config does not declare: {unknown}"
            )
        if version < 5:
            # Readers of formats 3 and 4 take any list for true: every shortcut a delta.
            raise SlicingConfigError(
                f"slicing.delta_shortcuts is a list, which format {version} cannot say; "
                "config.json was edited: set format_version to 5, or re-save the sliced model"
            )
    elif deltas not in (True, False):
        raise invalid_slicing(
            "slicing.delta_shortcuts must be true, false or a list of shortcut names"
        )


def declared_shortcuts(spec: dict[str, Any]) -> list[str]:
    """The changes of basis the config declares, named under the decoder layers (e.g.
    ``"3.mlp_shortcut"``): the modules a checkpoint must hold tensors for."""
    names = [f"0.{INPUT_PROJECTION}"] if has_input_projection(spec) else []
    flags = zip(spec["attn_shortcuts"], spec["mlp_shortcuts"], strict=True)
    for idx, declared in enumerate(flags):
        names += [f"{idx}.{name}" for name, on in zip(SHORTCUTS, declared, strict=True) if on]
    return names


def delta_shortcuts(spec: dict[str, Any]) -> set[str]:
    """The declared shortcuts (``declared_shortcuts`` names) stored minus the identity."""
    deltas = spec.get("delta_shortcuts", False)
    if isinstance(deltas, list):
        return set(deltas)
    return set(declared_shortcuts(spec)) if deltas else set()


def layer_deltas(spec: dict[str, Any], layer_idx: int) -> set[str]:
    """The shortcuts of decoder layer ``layer_idx`` stored as deltas, by module name."""
    prefix = f"{layer_idx}."
    return {name.removeprefix(prefix) for name in delta_shortcuts(spec) if name.startswith(prefix)}


def has_input_projection(spec: dict[str, Any]) -> bool:
    """Layer 0 maps the unsliced table into its basis, unless it is itself unrotated.

    Checkpoints written before the key existed always had the projection when tied.
    """
    if spec["embedding_sliced"]:
        return False
    return bool(spec.get("input_projection", True))


def final_width(spec: dict[str, Any], hidden_size: int) -> int:
    """Width of the residual the last layer writes, which the final norm and the head read."""
    return spec.get("final_dim") or hidden_size


def format_version(
    quantizable_shortcuts: bool,
    deltas: bool | list[str],
    head_sliced: bool,
    base_model_type: str,
    projection_dropped: bool = False,
) -> int:
    """The version a checkpoint is written with: the first one that can read it.

    ``projection_dropped``: a tied table read without an input projection (layer 0 left
    whole), which ``input_projection: false`` says; readers older than format 2 would
    build the projection anyway and serve it uninitialised.
    ``base_model_type``: at least its entry in ``ARCHITECTURE_FORMATS``.
    """
    if isinstance(deltas, list):
        version = 5
    elif head_sliced:
        version = 4
    elif deltas:
        version = 3
    else:
        version = 2 if quantizable_shortcuts or projection_dropped else 1
    return max(version, ARCHITECTURE_FORMATS.get(base_model_type, 1))


def _require_vllm_plugin() -> None:
    """Inside vLLM, a sliced checkpoint needs the plugin; say so instead of failing later.

    vLLM without the plugin either asks for ``trust_remote_code`` or, with it, falls back to
    a generic backend that dies on an unknown config class. With ``trust_remote_code`` it
    runs this file, so this is the one place that can name the fix.
    """
    if "vllm" not in sys.modules:
        return
    from importlib.metadata import entry_points

    if not any(ep.name == "dynslice" for ep in entry_points(group="vllm.general_plugins")):
        raise ImportError(
            "this checkpoint was sliced by dynslice-modifier and vLLM serves it through the "
            "dynslice plugin, which is not installed in this environment: "
            "pip install 'dynslice-modifier[serve]' into it (the plugin alone: it keeps this "
            "vLLM and needs no llm-compressor; from a clone: pip install -e '.[serve]')"
        )
    # vLLM loads only the plugins this lists, when it is set (vllm.envs.VLLM_PLUGINS).
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "dynslice" not in allowed.split(","):
        raise ImportError(
            "this checkpoint was sliced by dynslice-modifier and vLLM serves it through the "
            f"dynslice plugin, which is installed but left out by VLLM_PLUGINS={allowed!r}: "
            "add dynslice to that comma-separated list, or unset it"
        )


class DynSliceConfig(PretrainedConfig):
    """The base model's config, flat, plus ``base_model_type`` and ``slicing``.

    ``slicing`` holds, per decoder layer ``l``:

    - ``attn_dims[l]``: residual width read by the attention (its input norm and q/k/v);
    - ``mlp_dims[l]``: residual width read by the MLP (written by ``o_proj``);
    - ``attn_shortcuts[l]`` / ``mlp_shortcuts[l]``: whether the residual connection around
      the attention / MLP carries a change-of-basis matrix (otherwise it is the identity);
    - ``layout``: attribute names of the sub-modules inside a decoder layer;
    - ``embedding_sliced``: whether the embedding table was rotated and cut to
      ``attn_dims[0]`` (untied models) or kept in the original basis (tied models, and
      any model whose layer 0 was left whole), in which case layer 0 starts with
      ``input_projection`` (hidden_size -> attn_dims[0]), unless ``input_projection`` is
      false (layer 0 left whole, in the original basis);
    - ``quantizable_shortcuts``: whether shortcuts (and the input projection) are linears a
      quantizer took (``ResidualShortcutLinear``) rather than matrices kept in model dtype;
    - ``delta_shortcuts``: whether shortcut and input-projection weights hold the matrix
      minus the rectangular identity (the layer adds ``x E`` back), which keeps them small
      when consecutive bases are aligned; a list names the ones that do (as
      ``"3.mlp_shortcut"``), where the others join a basis no alignment reaches (the
      original one, at the embedding, a whole layer or a full-width head);
    - ``final_dim``: present when the head is sliced (``slice_head``): the last layer writes
      the residual in a PCA basis of this width, the final norm is a sliced norm (its scale
      folded into the head) and the head, never tied, reads ``final_dim`` columns;
    - ``unit_norms``: whether every in-layer norm weight is one (nothing folded a smoothing
      scale into them), which lets vLLM run each shortcut in one GEMM with the projection
      that reads the same residual; absent means false. Every save reads it from the norms
      (``oneshot``'s and this class's ``save_pretrained``), except where they are offloaded
      to ``meta``, where the recorded flag stands;
    - provenance: ``lr_scores``, ``sparsity``, ``slicing_base``, ``round_to``, ``rounding``,
      ``parameters``, the other modifier settings, ``calibration`` (batches and tokens the
      PCA saw, padding excluded) and ``source_model`` (the dense model's path, absolute
      where it is a directory; a sliced model is never saved into it).

    Without ``final_dim`` the last layer writes the residual back in the original basis at
    full width, so the final norm and the head (tied or not) are the base model's own.
    """

    model_type = "dynslice"

    def __init__(
        self,
        base_model_type: str | None = None,
        slicing: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        _require_vllm_plugin()
        self.base_model_type = base_model_type
        self.slicing = slicing
        # transformers reads a missing key as untied; vLLM's layers read the attribute.
        kwargs.setdefault("tie_word_embeddings", False)
        # PretrainedConfig drops generation keys its subclass does not declare, and the base
        # architectures' configs declare this one (the model's forward reads it).
        use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)
        self.use_cache = use_cache

    def check_slicing(self) -> None:
        missing = [k for k in ("hidden_size", "num_hidden_layers") if not hasattr(self, k)]
        if missing:
            raise SlicingConfigError(
                f"this DynSliceConfig has no {' or '.join(missing)}: a sliced config carries "
                "its base model's settings and a slicing section, as a sliced checkpoint's "
                "config.json does; load one with from_pretrained"
            )
        validate_slicing(self.slicing, self.hidden_size, self.num_hidden_layers)
        self._check_base_model_type()
        needed = ARCHITECTURE_FORMATS[self.base_model_type]
        if self.slicing["format_version"] < needed:
            raise SlicingConfigError(
                f"slicing.format_version {self.slicing['format_version']} predates sliced "
                f"{self.base_model_type!r} models (format {needed}); config.json was edited: "
                f"set format_version to {needed}, or re-save the sliced model"
            )
        sliced = [key for key in ("embedding_sliced", "final_dim") if self.slicing.get(key)]
        if (
            self.tie_word_embeddings
            and sliced == ["embedding_sliced"]
            and 0 in self.slicing.get("whole_layers", [])
        ):
            # Earlier builds wrote this when layer 0 was whole: the table was never rotated,
            # so the head equalled it and llm-compressor's save tied the two again, leaving no
            # lm_head.weight in the files.
            raise SlicingConfigError(
                "tie_word_embeddings is true and slicing.embedding_sliced is true, but layer 0 "
                "was left whole (slicing.whole_layers), so the table was never rotated and the "
                "head is the table: set slicing.embedding_sliced to false in config.json"
            )
        if self.tie_word_embeddings and sliced:
            raise SlicingConfigError(
                f"tie_word_embeddings is true, but slicing.{' and slicing.'.join(sliced)} say "
                "the table and the head were sliced apart, so they are different matrices; "
                "set tie_word_embeddings to false in config.json"
            )
        # Granite's scalars on sublayer outputs and logits: the slicer folds them into the
        # weights, and no reader of a sliced model applies them.
        unfolded = [k for k in FOLDED_SCALARS if getattr(self, k, 1.0) != 1.0]
        if unfolded:
            raise SlicingConfigError(
                f"{' and '.join(unfolded)} in config.json must be 1.0 in a sliced model: the "
                "slicer folds them into the weights, and a sliced model does not apply them; "
                "config.json was edited, set them back to 1.0"
            )

    def _check_base_model_type(self) -> None:
        """The architecture the layers are built as must be one an adapter slices: any other
        (or none, which used to read as Llama) builds a model that computes something else
        (Granite's multipliers, Qwen3's q/k norms) or fails on attributes it lacks."""
        if self.base_model_type in ARCHITECTURE_FORMATS:
            return
        known = ", ".join(ARCHITECTURE_FORMATS)
        if self.base_model_type is None:
            raise SlicingConfigError(
                "config.json has no base_model_type, the model_type of the dense model this "
                f"one was sliced from (one of {known}): add it, or re-save the sliced model"
            )
        raise invalid_slicing(
            f"base_model_type is {self.base_model_type!r}, not an architecture sliced models "
            f"are built from ({known})"
        )
