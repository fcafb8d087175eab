"""How much a sliced head loses when it reads fewer dims than the last layer writes.

With ``slice_head`` the last layer writes the head's basis (the PCA of its output) at its own
width, and the head reads all of it. At batch 16 the head is a fifth of a sliced SmolLM2's
multiply-adds (49152 outputs per token), so a narrower head would be the cheapest speed
left if its trailing principal directions mattered little. This cuts the head's basis of a
sliced float checkpoint to each width asked (the last rows of the last layer's output
projection and shortcut, the last columns of the head and of the final norm: what the slicer
would write with a narrower final basis) and scores it with the shared protocol::

    python benchmarks/quantized.py --rounding spectrum --rows sliced-aligned-layer-sliced-head:none
    python benchmarks/head_width.py --widths 416 384 352

Results: ``results/head_width.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from common import RESULTS, protocol
from quantized import WORK
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

import dynslice_modifier  # noqa: F401  (registers the sliced architecture)
from dynslice_modifier.evaluation import perplexity

DEFAULT = WORK / "sliced-aligned-layer-sliced-head-none-spectrum"


def _keep(module: nn.Module, name: str, index: tuple) -> None:
    tensor = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor[index].clone(), requires_grad=False))


def head_width(config: PretrainedConfig) -> int:
    """The width the checkpoint's head reads (``slicing.final_dim``)."""
    final = config.slicing.get("final_dim")
    if final is None:
        raise SystemExit(
            "this checkpoint's head reads the full hidden size: measure one sliced with slice_head"
        )
    return final


def check_width(width: int, final: int) -> None:
    if not 0 < width <= final:
        raise SystemExit(f"--widths must lie in 1..{final}, the head's width now (got {width})")


def cut_head(model: nn.Module, width: int) -> None:
    """Keep the first ``width`` dims of the head's basis (its leading principal directions)."""
    spec = model.config.slicing
    check_width(width, head_width(model.config))
    layer = model.model.layers[-1]
    mlp = getattr(layer, spec["layout"]["mlp"])
    shortcut = getattr(layer, "mlp_shortcut", None)
    if shortcut is None:
        raise SystemExit(
            "the last layer carries its residual into the head's basis without a shortcut, "
            "so its width cannot be cut here: measure a checkpoint with one (aligned bases)"
        )
    _keep(getattr(mlp, spec["layout"]["mlp_output"]), "weight", (slice(0, width),))
    _keep(shortcut, "weight", (slice(0, width),))
    _keep(model.model.norm, "weight", (slice(0, width),))
    _keep(model.get_output_embeddings(), "weight", (slice(None), slice(0, width)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT, help="a sliced float checkpoint")
    parser.add_argument("--widths", type=int, nargs="+", required=True)
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        parser.error(f"no checkpoint at {args.model}: write it first (see --help)")
    # Every width checked before the first of the evaluations (a minute each) is spent.
    config = AutoConfig.from_pretrained(args.model)
    if getattr(config, "quantization_config", None) is not None:
        parser.error(
            f"{args.model} is quantized, and its packed weights cannot be cut: measure the "
            "float checkpoint of the same slicing (quantized.py's :none rows)"
        )
    full = head_width(config)
    for width in args.widths:
        check_width(width, full)
    _, _, _, evaluation = protocol()
    rows = []
    for width in [None, *args.widths]:
        model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        if width is not None:
            cut_head(model, width)
        rows.append({"width": width or full, "ppl": round(perplexity(model, evaluation), 3)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["ppl"]
    (RESULTS / "head_width.json").write_text(
        json.dumps({"model": args.model.name, "rows": rows}, indent=1) + "\n"
    )
    lines = ["| head width | perplexity | vs the last layer's width |", "|---|---|---|"]
    lines += [f"| {r['width']} | {r['ppl']:.2f} | {r['ppl'] / base:.3f} |" for r in rows]
    (RESULTS / "head_width.md").write_text(
        f"SmolLM2-135M sliced as `{args.model.name}` (float32), its head's basis cut to each "
        "width (leading principal directions kept), perplexity on the shared protocol. "
        f"Produced by `python benchmarks/head_width.py {shlex.join(sys.argv[1:])}`.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
