"""The benchmarks' ``--rounding``: which of the slicer's rounding modes a run uses, and
where ``benchmarks/quantized.py`` keeps the checkpoints of each (both environments import
this, so it stays free of llm-compressor and vLLM)."""

from __future__ import annotations

import argparse
from typing import get_args

from dynslice_modifier.allocation import Rounding


def add_rounding_argument(parser: argparse.ArgumentParser, help: str) -> None:
    # mean, with which most recorded rows were run; the slicer itself rounds dynamic widths
    # by spectrum unless told otherwise.
    parser.add_argument(
        "--rounding",
        default="mean",
        choices=get_args(Rounding),
        help=f"{help} (default: mean; the slicer's own default for dynamic widths is spectrum)",
    )


def rounded_name(name: str, rounding: str | None) -> str:
    """A sliced checkpoint's directory name: the benchmarks' default (mean) rounding's
    plain, the others' beside it with the rounding as a suffix."""
    return name if rounding in (None, "mean") else f"{name}-{rounding}"
