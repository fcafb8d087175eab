"""Rows of ``quantized.py`` re-run after a change in the code, each beside its value before.

Each change keeps the rows it re-ran, as recorded before it, in a file of its own; the value
after a change is the one the next change's file holds for that row, or the one
``results/quantized.jsonl`` records now. Writes one table per change::

    python benchmarks/reruns.py

- ``layer-by-layer``: until ``conversion.convert_to_sliced`` gave the sliced model the sliced
  layer class as ``_no_split_modules``, llm-compressor's sequential pipeline found no layer
  to split a sliced model at and calibrated every quantizer after the slicer on the whole
  model as one subgraph (rows as recorded at commit b4f9621).
- ``eager-calibration``: until ``convert_to_sliced`` gave every module sharing the dense
  config the sliced one, the sliced attention kept the dense config, so llm-compressor's
  switch to eager attention for calibration missed it and GPTQ calibrated it through sdpa
  (rows as recorded at commit aab1614; the recipe's row as recorded before 1a08765).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from common import RESULTS, read_jsonl
from quantized import JSONL, key


class Change(NamedTuple):
    name: str  # as the docstring above lists it
    before: Path  # the rows it re-ran, as recorded before it
    table: Path  # the table written
    text: str  # what the table says
    columns: tuple[str, str]  # the perplexity columns' names, before and after


# Oldest first.
CHANGES = [
    Change(
        "layer-by-layer",
        RESULTS / "quantized_before_layer_by_layer.jsonl",
        RESULTS / "quantized_layer_by_layer.md",
        "each row's perplexity when the quantizer calibrated the whole sliced model as one "
        "subgraph (as recorded at commit b4f9621, "
        "`results/quantized_before_layer_by_layer.jsonl`) and re-run with it going one "
        "decoder layer at a time. For GPTQ's own run-to-run spread: `recipes/slice_w8a8.yaml` "
        "run twice before the fix scored 54.70 and 54.66 (`results/recipes_cpu.md`, "
        "`results/recipes_cpu_w8a8_rerun.md`). The `sliced-hadamard-aligned` rows with "
        "quantized shortcuts (`-qs`) were recorded before slicing format 5 as well, with "
        "boundary shortcuts stored as deltas, so their change includes that one.",
        ("one subgraph", "layer by layer"),
    ),
    Change(
        "eager-calibration",
        RESULTS / "quantized_before_eager.jsonl",
        RESULTS / "quantized_eager_calibration.md",
        "each row's perplexity when GPTQ calibrated the sliced attention through sdpa (the "
        "sliced layers kept the dense config, so llm-compressor's switch to eager attention "
        "for calibration missed them; as recorded at commit aab1614, "
        "`results/quantized_before_eager.jsonl`) and re-run with it calibrating through "
        "eager attention, as for a dense model. Both compute the same function to float "
        "rounding; GPTQ's rounding decisions move.",
        ("sdpa", "eager"),
    ),
]


def table(index: int) -> str:
    change = CHANGES[index]
    old_name, new_name = change.columns
    # The value after this change: as the next change found it, else as recorded now.
    later = [read_jsonl(c.before) for c in CHANGES[index + 1 :]] + [read_jsonl(JSONL)]
    lines = [
        f"| model | quantization | rounding | perplexity, {old_name} | perplexity, "
        f"{new_name} | change | weights MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, old in sorted((key(r), r) for r in read_jsonl(change.before)):
        new = next((r for rows in later for r in rows if key(r) == k), None)
        if new is None:
            raise SystemExit(
                f"{k}: no such row in {JSONL.name}; run it with python benchmarks/quantized.py"
            )
        if new["ppl"] == old["ppl"] and new.get("oneshot_s") == old.get("oneshot_s"):
            raise SystemExit(f"{k}: not re-run since (python benchmarks/quantized.py --redo)")
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {old['ppl']:.2f} | {new['ppl']:.2f} | "
            f"{new['ppl'] / old['ppl'] - 1:+.2%} | {new['mib']} |"
        )
    return (
        "SmolLM2-135M, the protocol and rows of `benchmarks/quantized.py` (SP 0.25 or, in "
        f"-spNN rows, 0.NN; SB 0.05; GPTQ after the slicer in one `oneshot`): {change.text} "
        "Produced by `python benchmarks/reruns.py`.\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    for index, change in enumerate(CHANGES):
        change.table.write_text(table(index))


if __name__ == "__main__":
    main()
