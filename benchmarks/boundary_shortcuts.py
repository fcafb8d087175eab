"""Which shortcuts to store as their difference from the identity: the quantization error of
each way of storing them, on a float sliced SmolLM2 checkpoint with aligned bases.

Within an aligned chain a shortcut ``S`` is nearly the rectangular identity ``E``, so its
delta ``S - E`` is small and quantizes with little error. The shortcuts that join the
original basis (layer 0's input projection from the tied table, the last layer's shortcut
into the unsliced head, those around a layer left whole) are general rotations, whose delta
is larger than ``S`` itself. For every shortcut this reports ``|S - E| / |S|`` and the error
of round-to-nearest quantization of the stored weight, relative to ``|S|``, stored as a
delta and stored whole: int8 per output channel (W8A8's weights) and int4 in groups of 16
along the input. The slicer stores a shortcut as a delta exactly when ``|S - E| < |S|``
(``SlicingResult.stored_as_delta``). Results: ``results/boundary_shortcuts.json`` and
``.md``.

    python benchmarks/boundary_shortcuts.py [CHECKPOINT]   # default: out/bench/sliced-aligned-none
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from common import RESULTS
from safetensors.torch import load_file
from shortcut_structure import BENCH, rtn

from dynslice_modifier.modeling.configuration_dynslice import declared_shortcuts, delta_shortcuts


def shortcut_matrices(directory: Path) -> dict[str, torch.Tensor]:
    """Every declared shortcut's matrix ``S`` (out x in, as stored by linears), by name."""
    spec = json.loads((directory / "config.json").read_text())["slicing"]
    tensors: dict[str, torch.Tensor] = {}
    for path in directory.glob("*.safetensors"):
        tensors.update(load_file(path))
    deltas = delta_shortcuts(spec)
    matrices = {}
    for name in declared_shortcuts(spec):
        stored = tensors[f"model.layers.{name}.weight"].double()
        identity = torch.eye(*stored.shape, dtype=stored.dtype)
        matrices[name] = stored + identity if name in deltas else stored
    return matrices


def errors(matrix: torch.Tensor) -> dict[str, float]:
    norm = matrix.norm()
    delta = matrix - torch.eye(*matrix.shape, dtype=matrix.dtype)
    row = {"delta_over_matrix": float(delta.norm() / norm)}
    for storage, weight in (("delta", delta), ("whole", matrix)):
        row[f"int8_{storage}"] = float((rtn(weight, 8, None) - weight).norm() / norm)
        row[f"int4_{storage}"] = float((rtn(weight, 4, 16) - weight).norm() / norm)
    return row


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH / "sliced-aligned-none"
    if not (directory / "config.json").exists():
        raise SystemExit(f"{directory} missing: run benchmarks/quantized.py first")
    rows = {name: errors(matrix) for name, matrix in shortcut_matrices(directory).items()}
    groups: dict[str, list[dict[str, float]]] = {"interior": [], "boundary": []}
    for row in rows.values():
        groups["interior" if row["delta_over_matrix"] < 1 else "boundary"].append(row)
    summary = {
        group: {"shortcuts": len(members)}
        | {key: statistics.mean(r[key] for r in members) for key in members[0]}
        for group, members in groups.items()
        if members
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": directory.name, "summary": summary, "shortcuts": rows}
    (RESULTS / "boundary_shortcuts.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Checkpoint `{directory.name}`; errors relative to `|S|`, means over the group.",
        "",
        "| shortcuts | count | mean ‖S - E‖/‖S‖ | int8 as delta | int8 whole "
        "| int4 g16 as delta | int4 g16 whole |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, s in summary.items():
        lines.append(
            f"| {group} | {s['shortcuts']} | {s['delta_over_matrix']:.3f} | "
            f"{s['int8_delta']:.4f} | {s['int8_whole']:.4f} | {s['int4_delta']:.4f} | "
            f"{s['int4_whole']:.4f} |"
        )
    boundary = [name for name, row in rows.items() if row["delta_over_matrix"] >= 1]
    lines += ["", f"Boundary shortcuts (stored whole): {', '.join(boundary) or 'none'}."]
    (RESULTS / "boundary_shortcuts.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
