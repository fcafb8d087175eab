"""How far the shortcut matrices of float sliced SmolLM2 checkpoints are from the identity,
what round-to-nearest quantization of their stored weights costs, with and without
``align_bases``, and how low the rank of ``S - E`` is.

Reads the float checkpoints ``benchmarks/quantized.py`` writes (``sliced-hadamard-none``:
unaligned; ``sliced-hadamard-aligned-none``: aligned, stored as ``S - E``;
``sliced-aligned-none``: aligned without Hadamard, today's defaults). For every shortcut
between two sliced bases (the input projection and the last layer's shortcut map from and to
the original basis, so they are left out) it reports ``|S - E| / |S|``, the error of
quantizing the *stored* weight, ``|q(W) - W| / |S|``, for int8 per output channel (W8A8's
weights) and int4 in groups of 16 along the input (W4A16 style; 16 divides every width),
the rank that holds 99% of ``|S - E|^2`` (median over shortcuts) and what the best rank-64
``S - E`` leaves, relative to ``|S|``: a shortcut stored as identity plus a rank-r delta
would cost ``2 r d`` multiply-adds instead of ``d^2``, exactly only if the delta had that
rank. Results: ``results/shortcut_structure.json`` and ``.md``.

    python benchmarks/shortcut_structure.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from common import RESULTS
from safetensors.torch import load_file

from dynslice_modifier.modeling.configuration_dynslice import delta_shortcuts

BENCH = Path(__file__).resolve().parents[1] / "out" / "bench"
CHECKPOINTS = {
    "unaligned, Hadamard": "sliced-hadamard-none",
    "aligned, Hadamard": "sliced-hadamard-aligned-none",
    "aligned (defaults)": "sliced-aligned-none",
}
# The delta rank whose leftover the table reports.
RANK = 64


def rtn(weight: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric round-to-nearest, per output row or per group of ``group`` inputs."""
    rows, cols = weight.shape
    grouped = weight.reshape(rows, -1, group) if group else weight.reshape(rows, 1, cols)
    levels = 2 ** (bits - 1) - 1
    scale = grouped.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
    return ((grouped / scale).round().clamp(-levels - 1, levels) * scale).reshape(rows, cols)


def shortcuts(directory: Path) -> list[tuple[torch.Tensor, bool]]:
    """Stored weights (out x in) of the shortcuts between sliced bases, each with whether it
    is stored as a delta."""
    config = json.loads((directory / "config.json").read_text())
    layers = config["num_hidden_layers"]
    deltas = delta_shortcuts(config["slicing"])
    tensors: dict[str, torch.Tensor] = {}
    for path in directory.glob("*.safetensors"):
        tensors.update(load_file(path))
    names = [f"{i}.attn_shortcut" for i in range(layers)]
    names += [f"{i}.mlp_shortcut" for i in range(layers - 1)]
    return [
        (tensors[f"model.layers.{n}.weight"].double(), n in deltas)
        for n in names
        if f"model.layers.{n}.weight" in tensors
    ]


def measure(directory: Path) -> dict:
    found = shortcuts(directory)
    stored = [weight for weight, _ in found]
    keys = ("dist_from_identity", "int8_error", "int4_error", "rank_residual")
    stats: dict[str, list[float]] = {key: [] for key in keys}
    ranks = []
    for weight, delta in found:
        identity = torch.eye(*weight.shape, dtype=weight.dtype)
        full = weight + identity if delta else weight
        norm = full.norm()
        difference = weight if delta else full - identity
        stats["dist_from_identity"].append(float(difference.norm() / norm))
        stats["int8_error"].append(float((rtn(weight, 8, None) - weight).norm() / norm))
        stats["int4_error"].append(float((rtn(weight, 4, 16) - weight).norm() / norm))
        singular = torch.linalg.svdvals(difference)
        energy = (singular**2).cumsum(0) / (singular**2).sum()
        ranks.append(int((energy < 0.99).sum()) + 1)
        stats["rank_residual"].append(float(singular[RANK:].norm() / norm))
    return {
        "shortcuts": len(stored),
        **{k: statistics.mean(v) for k, v in stats.items()},
        "rank_99": statistics.median(ranks),
        # Multiply-adds per token: d_out x d_in as stored, r (d_in + d_out) as E + U V.
        "macs_m": sum(w.numel() for w in stored) / 1e6,
        "rank_macs_m": sum(RANK * sum(w.shape) for w in stored) / 1e6,
    }


def main() -> None:
    rows = {}
    for name, folder in CHECKPOINTS.items():
        if not (BENCH / folder / "config.json").exists():
            raise SystemExit(f"{BENCH / folder} missing: run benchmarks/quantized.py first")
        rows[name] = measure(BENCH / folder)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shortcut_structure.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| bases | shortcuts | mean ‖S - E‖/‖S‖ | int8 per-channel error | int4 g16 error "
        f"| median rank for 99% of ‖S - E‖² | mean rank-{RANK} leftover "
        f"| multiply-adds per token (M): stored, as E + rank-{RANK} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['shortcuts']} | {r['dist_from_identity']:.3f} | "
            f"{r['int8_error']:.4f} | {r['int4_error']:.4f} | {r['rank_99']:g} | "
            f"{r['rank_residual']:.4f} | {r['macs_m']:.2f}, {r['rank_macs_m']:.2f} |"
        )
    (RESULTS / "shortcut_structure.md").write_text(
        "SmolLM2-135M sliced at SP 0.25 (SB 0.05, mean rounding), float checkpoints of "
        "benchmarks/quantized.py. Errors: round-to-nearest of the stored weight, relative to "
        f"‖S‖; rank-{RANK} leftover: ‖S - E‖ less its best rank-{RANK} part, relative to ‖S‖. "
        "Produced by `python benchmarks/shortcut_structure.py`.\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
