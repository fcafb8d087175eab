"""Checks on the model directory a command reads, made before any weights load.

A directory that would load only in part (weights missing or of other shapes than its
config's, layers the config does not count), a tokenizer from another model, or a Hub id
where a directory was meant each end in one message that names the fix, not in a bare
error deep inside transformers or the model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def model_path(name: str) -> Path:
    if name == "smollm2":
        from dynslice_modifier.smollm2 import smollm2_path

        return smollm2_path()
    path = Path(name)
    if not path.exists() and re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", name):
        # Looks like a Hub id (org/name), which from_pretrained would fetch; the commands
        # here read, and compress writes beside, a local directory only.
        raise FileNotFoundError(
            f"{name} does not exist; models are not downloaded: if it is a Hugging Face Hub "
            f"id, download it first (hf download {name} --local-dir DIR) and pass DIR"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"{name} does not exist: pass the directory a model was saved to (config.json "
            "and its weights), or 'smollm2' for the packaged SmolLM2"
        )
    if path.is_file():
        raise FileNotFoundError(
            f"{name} is a file: pass the directory a model was saved to ({path.parent} holds "
            "config.json and its weights?), or 'smollm2' for the packaged SmolLM2"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{name} is not a model directory (no config.json): pass the directory a model "
            "was saved to (config.json and its weights), or 'smollm2' for the packaged SmolLM2"
        )
    return path


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"no usable tokenizer in {path} ({err}); the text is tokenized with the model's "
            "own tokenizer: copy its files (tokenizer.json, tokenizer_config.json) into "
            f"{path}"
        ) from None


def load_config(path: Path) -> Any:
    """The model's config; a file that is no config is named with the fix. (transformers'
    own ValueErrors, such as an architecture it does not know, name theirs.)"""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, TypeError, KeyError, AttributeError) as err:
        raise ValueError(
            f"{path / 'config.json'} is not a readable model config ({type(err).__name__}: "
            f"{err}): restore it, or save or fetch the model again"
        ) from None


def check_weights(path: Path, config: Any) -> None:
    """Refuse, before any calibration, a checkpoint that transformers would load only in
    part or not at all: a damaged weights file (it would fail deep in the load), tensors
    the config declares and the files lack (initialised at random, with a warning, then
    sliced and saved as if trained), layers the config does not count (dropped, with a
    warning that they can be ignored), or tensors of other shapes than the config's.
    Checkpoints in other formats are left to transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from dynslice_modifier.modeling.modeling_dynslice import first_names, stored_tensor_shapes

    shapes = stored_tensor_shapes(path)
    if shapes is None:
        if not _weight_files(path):
            raise ValueError(
                f"{path} has a config.json but no weights (model.safetensors or "
                "pytorch_model.bin, or their shards): copy the model's weight files into it"
            )
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Tensors a checkpoint stores on purpose and transformers drops on load.
    dropped = [re.compile(p) for p in model._keys_to_ignore_on_load_unexpected or []]
    stored = {name for name in shapes if not any(p.search(name) for p in dropped)}
    params = model.state_dict()
    expected = set(params)
    layers = config.num_hidden_layers
    beyond = [n for n in stored if (i := _layer_index(n)) is not None and i >= layers]
    if beyond:
        raise ValueError(
            f"{path}'s weights hold {first_names(beyond)} beyond the {layers} layers its "
            "config.json declares (num_hidden_layers): transformers would drop them. "
            "config.json does not belong to these weights: restore it, or save or fetch "
            "the model again"
        )
    differ = [n for n in expected & stored if shapes[n] != tuple(params[n].shape)]
    if differ:
        name = sorted(differ)[0]
        raise ValueError(
            f"{path}'s weights disagree in shape with its config.json: {name} is "
            f"{list(shapes[name])} in the files, {list(params[name].shape)} by the config "
            f"({len(differ)} tensors differ). config.json does not belong to these weights: "
            "restore it, or save or fetch the model again"
        )
    if getattr(config, "tie_word_embeddings", False):
        # transformers loads a tied pair from either name.
        table = model.get_input_embeddings()
        pair = {"lm_head.weight"} | {f"{n}.weight" for n, m in model.named_modules() if m is table}
        expected -= pair
        if not pair & stored:
            expected |= pair - {"lm_head.weight"}
    missing = list(expected - stored)
    # Names with nothing in common: a naming transformers converts on load, not a loss.
    if missing and expected & stored:
        raise ValueError(
            f"{path}'s weights lack {first_names(missing)}, which its config declares "
            f"({config.num_hidden_layers} layers): transformers would initialise them at "
            "random, and they would be sliced as if trained. The checkpoint is incomplete, "
            "or config.json does not belong to it: save or fetch it again"
        )


def _layer_index(name: str) -> int | None:
    """The decoder layer a tensor name belongs to (``model.layers.<i>.``), if any."""
    match = re.match(r"(?:model\.)?layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def check_vocabulary(path: Path, tokens: torch.Tensor | list[int], config: Any) -> None:
    """The directory's tokenizer and its model must agree: ids past the embedding table
    fail in the model with a bare "index out of range"."""
    import torch

    tokens = torch.as_tensor(tokens)
    vocab = getattr(config, "vocab_size", None)
    if vocab and tokens.numel() and (highest := int(tokens.max())) >= vocab:
        raise ValueError(
            f"the tokenizer in {path} gives token ids up to {highest}, but the "
            f"model's embedding table has {vocab} rows (config.json's vocab_size): the "
            "tokenizer files there belong to another model; copy the model's own "
            "(tokenizer.json, tokenizer_config.json) into it"
        )


def _weight_files(directory: Path) -> list[Path]:
    """A checkpoint's weight files, in either format transformers saves."""
    return [*directory.glob("*.safetensors"), *directory.glob("pytorch_model*.bin")]


def weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in _weight_files(directory))
