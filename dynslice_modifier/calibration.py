"""Layer-by-layer execution over cached calibration activations.

The model's front end runs once to capture what the first decoder layer receives (hidden
states plus rotary embeddings and attention masks, one mask per attention type); after that
each decoder layer is moved to the compute device on its own, applied to every cached
batch, and moved back. Memory is one layer plus the activations, as in llm-compressor's
sequential pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from compressed_tensors.offload import (
    align_modules,
    disable_onloading,
    get_cache_init_kwargs,
    offload_module,
)
from compressed_tensors.offload.cache import OffloadCache
from torch import nn
from tqdm.auto import tqdm

from dynslice_modifier.errors import CalibrationError

# Keyword arguments a decoder layer receives that describe the batch, not the cache.
_LAYER_KWARGS = ("attention_mask", "position_ids", "position_embeddings")


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class LayerInputs:
    """Cached residual-stream activations, one entry per calibration batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    ids: list[torch.Tensor] = field(default_factory=list)
    # Content key of every batch, what the batch order is sorted by.
    keys: list[bytes] = field(default_factory=list)
    # transformers hands each decoder layer the mask of its attention type
    # (``config.layer_types``: sliding-window layers among full ones); ``kwargs`` hold the
    # first layer's, these the other types', one mapping per batch.
    layer_types: list[str] | None = None
    type_masks: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    def mask(self, b: int, device: torch.device) -> torch.Tensor | None:
        """Batch ``b``'s attention mask on ``device`` (None: no padding)."""
        mask = self.masks[b]
        return None if mask is None else mask.to(device)

    def release(self) -> None:
        """Drop the activations once a pass has spent them, before the next capture: two
        sets at once would double the host memory they take."""
        for held in (self.hidden, self.kwargs, self.masks, self.ids, self.keys, self.type_masks):
            held.clear()

    def layer_kwargs(self, b: int, idx: int, device: torch.device | str) -> dict[str, Any]:
        """What decoder layer ``idx`` receives besides the hidden states, for batch ``b``."""
        kwargs = self.kwargs[b]
        if self.layer_types is not None and self.layer_types[idx] in self.type_masks[b]:
            kwargs = {**kwargs, "attention_mask": self.type_masks[b][self.layer_types[idx]]}
        return to_device(kwargs, device)

    def tokens(self, skip: frozenset[int] = frozenset()) -> int:
        """Unpadded tokens in every batch but those in ``skip``."""
        return sum(
            int(m.sum()) if m is not None else h.shape[0] * h.shape[1]
            for b, (h, m) in enumerate(zip(self.hidden, self.masks, strict=True))
            if b not in skip
        )


class _StopForward(Exception):
    pass


def _model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def capture_layer_inputs(
    model: nn.Module,
    first_layer: nn.Module,
    dataloader: Iterable[dict[str, Any]],
) -> LayerInputs:
    """Run the model up to ``first_layer`` on every batch and keep what it would receive.

    Kept on the CPU: the accelerator holds one decoder layer at a time, not the activations
    of every calibration batch.
    """
    offload_device = "cpu"
    cache = LayerInputs()
    device = _model_device(model)
    layer_types = getattr(model.config, "layer_types", None) or None
    other_types = sorted(set(layer_types) - {layer_types[0]}) if layer_types else []
    grabbed: dict[str, Any] = {}

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        grabbed["hidden"] = args[0] if args else kwargs["hidden_states"]
        grabbed["kwargs"] = {k: kwargs.get(k) for k in _LAYER_KWARGS}
        raise _StopForward

    def front(input_ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        with contextlib.suppress(_StopForward):
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        if "kwargs" not in grabbed:
            raise CalibrationError(
                f"the model's forward never ran its first decoder layer "
                f"({type(first_layer).__name__}): the adapter's layers are not the ones "
                "the model runs (was a layer replaced or wrapped after loading?)"
            )
        return grabbed.pop("kwargs")

    keys: list[bytes] = []
    vocab = model.get_input_embeddings().num_embeddings
    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in tqdm(dataloader, desc="Capturing calibration inputs", leave=False):
                input_ids, mask = _batch_tensors(batch, vocab, device)
                if not input_ids.shape[-1]:
                    # Refused rather than skipped: the quantizers' calibration after the
                    # slicer crashes on it, with a message that does not say why.
                    raise CalibrationError(
                        "a calibration sample has no tokens (an empty text, e.g. a blank "
                        "line tokenized without a BOS token); drop empty texts from the "
                        "dataset, e.g. dataset.filter(lambda s: len(s['input_ids']) > 0)"
                    )
                cache.kwargs.append(to_device(front(input_ids, mask), offload_device))
                cache.hidden.append(grabbed.pop("hidden").detach().to(offload_device))
                type_masks = {}
                for kind in other_types:
                    with _first_layer_typed(model.config, kind):
                        kind_mask = front(input_ids, mask)["attention_mask"]
                        type_masks[kind] = to_device(kind_mask, offload_device)
                cache.type_masks.append(type_masks)
                cache.masks.append(None if mask is None else mask.bool().to(offload_device))
                cache.ids.append(input_ids.to(offload_device))
                keys.append(_batch_key(input_ids, mask))
    finally:
        handle.remove()
    if not cache.hidden:
        raise CalibrationError(
            "the calibration dataloader yielded no batches; pass a dataset to oneshot "
            "(dataset=..., num_calibration_samples=...)"
        )
    # Sums over batches depend on their order in floating point, and llm-compressor
    # shuffles calibration samples; a content order makes the result depend on the
    # calibration *set* only, so reruns give byte-identical checkpoints.
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return LayerInputs(
        hidden=[cache.hidden[i] for i in order],
        kwargs=[cache.kwargs[i] for i in order],
        masks=[cache.masks[i] for i in order],
        ids=[cache.ids[i] for i in order],
        keys=[keys[i] for i in order],
        layer_types=list(layer_types) if other_types else None,
        type_masks=[cache.type_masks[i] for i in order],
    )


def _batch_tensors(
    batch: Any, vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A calibration batch's token ids and attention mask, batched and on ``device``."""
    # A Mapping, not only a dict: padding collators yield BatchEncoding.
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise CalibrationError(
            "calibration batches must be mappings with 'input_ids' (as llm-compressor's "
            f"dataloader yields); got {type(batch).__name__}"
        )
    mask = batch.get("attention_mask")
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
    if mask is not None:
        mask = torch.as_tensor(mask).to(device)
    _check_token_ids(input_ids, vocab)
    return input_ids.to(device), mask


@contextlib.contextmanager
def _first_layer_typed(config: Any, kind: str) -> Iterator[None]:
    """Mark the first layer as of attention type ``kind`` for one front-end pass.

    transformers builds each type's mask in the model's forward and hands the layers theirs
    by ``config.layer_types``; replaying the front end with the first entry changed makes
    the hook on the first layer receive that type's mask, built exactly as the real layers
    get it, without running any decoder layer.
    """
    saved = config.layer_types
    config.layer_types = [kind, *saved[1:]]
    try:
        yield
    finally:
        config.layer_types = saved


def _batch_key(input_ids: torch.Tensor, mask: torch.Tensor | None) -> bytes:
    digest = hashlib.sha256(input_ids.cpu().numpy().tobytes())
    if mask is not None:
        digest.update(mask.cpu().numpy().tobytes())
    return digest.digest()


@contextlib.contextmanager
def onloaded(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Keep ``module`` on ``device`` for the duration, then return it where it was.

    A module offloaded by compressed-tensors (a ``device_map`` model, or llm-compressor's
    sequential onloading) fetches its weights anew at every access: every calibration batch
    would copy the whole layer again. It is kept onloaded instead, and onloaded to
    ``device`` even where its own onload device is another one (a multi-GPU device map),
    so every tensor of the computation is on one device. Weights assigned meanwhile go to
    its offload device as usual.
    """
    offloaded = offloaded_modules(module)
    if offloaded:
        with align_modules(offloaded, device):
            yield module
        return
    home = next(module.parameters()).device
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def is_offloaded(module: nn.Module) -> bool:
    """Whether compressed-tensors offloads ``module``'s own parameters."""
    return isinstance(module._parameters, OffloadCache)


def offloaded_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if is_offloaded(m)]


def offload_settings(module: nn.Module) -> dict[str, Any] | None:
    """How compressed-tensors offloads ``module`` (None: it does not)."""
    if not is_offloaded(module):
        return None
    return get_cache_init_kwargs(module)


def storage_device(offload: dict[str, Any]) -> torch.device:
    """Where to build a module that will be offloaded with ``offload``."""
    # A disk cache writes what it is given from host memory.
    device = offload["offload_device"]
    return torch.device("cpu") if device == "disk" else torch.device(device)


def offload_new_parts(module: nn.Module, offload: dict[str, Any]) -> None:
    """Offload what ``module`` holds that is not yet offloaded, as ``offload`` says: a
    module left plain would be taken by the pipeline's onloading for one living on the
    accelerator, and stay there."""
    for part in module.modules():
        owns = next(part.parameters(recurse=False), None) is not None
        if owns and not is_offloaded(part):
            offload_module(part, **offload)


def trainable(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module``'s parameter ``name`` requires grad as stored (see
    ``stored_parameters``)."""
    with disable_onloading():
        return getattr(module, name).requires_grad


def stored_parameters(module: nn.Module) -> list[torch.Tensor]:
    """``module``'s parameters as stored, for their dtype and ``requires_grad``: an
    offloaded module's are read without fetching them (a fetched copy is made under
    ``no_grad``, so it never requires grad)."""
    with disable_onloading():
        return list(module.parameters())


def _check_token_ids(input_ids: torch.Tensor, vocab: int) -> None:
    """Ids outside the embedding table mean text tokenized for another model; the
    embedding would fail with a bare "index out of range"."""
    if input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise CalibrationError(
            f"calibration token ids run from {low} to {high}, but the model's embedding "
            f"table has {vocab} rows: the data was tokenized for another model; tokenize "
            "it with the model's own tokenizer"
        )


def check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise CalibrationError(
            f"non-finite activations at {where}. Run calibration in float32 or bfloat16 "
            "rather than float16, or check the input model's weights for inf/NaN."
        )
