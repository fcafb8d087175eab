"""Sums across data-parallel ranks, so every rank derives the same rotation and widths.

Under llm-compressor's distributed oneshot (``torchrun``) each rank calibrates on its own
share of the data; every statistic the slicer decides from (covariances, redundancy sums,
token counts, held-out losses) is a sum over tokens, so summing it over ranks gives exactly
what one process would compute on all the data. Without a process group these are no-ops.
"""

from __future__ import annotations

from typing import TypeVar

import torch

T = TypeVar("T")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collective_device() -> torch.device:
    """Where the process group reduces: NCCL (llm-compressor's group on GPUs) takes
    accelerator tensors only, gloo takes CPU tensors."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it)."""
    if not is_distributed():
        return tensor
    device = collective_device()
    if tensor.device.type == device.type:
        torch.distributed.all_reduce(tensor)
    else:
        moved = tensor.to(device)
        torch.distributed.all_reduce(moved)
        tensor.copy_(moved)
    return tensor


def sum_over_ranks(*values: float) -> list[float]:
    """Python numbers summed over ranks, in float64."""
    if not is_distributed():
        return list(values)
    both = all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=collective_device()))
    return [float(v) for v in both]


def gathered(value: T) -> list[T]:
    """``value`` from every rank, in rank order (``[value]`` without a process group)."""
    if not is_distributed():
        return [value]
    out: list[T | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out  # type: ignore[return-value]


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def shared_across_ranks(keys: list[bytes]) -> int:
    """How many of this rank's calibration batches (by content key) another rank also has."""
    me = rank()
    others = {k for r, ks in enumerate(gathered(keys)) if r != me for k in ks}
    return sum(k in others for k in keys)
