"""Sliced GPTQ rows of ``quantized.py`` before and after the quantizers went layer by layer.

Until the fix in ``conversion.convert_to_sliced`` (it gives the sliced model the sliced layer
class as ``_no_split_modules``), llm-compressor's sequential pipeline found no layer to split
a sliced model at and calibrated every quantizer after the slicer on the whole model as one
subgraph. ``results/quantized_before_layer_by_layer.jsonl`` holds the rows of
``results/quantized.jsonl`` that were re-run after the fix (``quantized.py --redo``), as
they were recorded before it (commit b4f9621); this script sets them beside the rows now
recorded and writes ``results/quantized_layer_by_layer.md``::

    python benchmarks/layer_by_layer.py
"""

from __future__ import annotations

from common import RESULTS, read_jsonl
from quantized import JSONL, key


def main() -> None:
    before = {key(r): r for r in read_jsonl(RESULTS / "quantized_before_layer_by_layer.jsonl")}
    now = {key(r): r for r in read_jsonl(JSONL)}
    lines = [
        "| model | quantization | rounding | perplexity, one subgraph | perplexity, layer by "
        "layer | change | weights MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, old in sorted(before.items()):
        new = now.get(k)
        if new is None:
            raise SystemExit(
                f"{k}: no such row in {JSONL.name}; run it with python benchmarks/quantized.py"
            )
        if new["ppl"] == old["ppl"] and new.get("oneshot_s") == old.get("oneshot_s"):
            raise SystemExit(f"{k}: not re-run since (python benchmarks/quantized.py --redo)")
        change = new["ppl"] / old["ppl"] - 1
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {old['ppl']:.2f} | {new['ppl']:.2f} | "
            f"{change:+.2%} | {new['mib']} |"
        )
    (RESULTS / "quantized_layer_by_layer.md").write_text(
        "SmolLM2-135M, the protocol and rows of `benchmarks/quantized.py` (SP 0.25 or, in "
        "-spNN rows, 0.NN; SB 0.05; GPTQ after the slicer in one `oneshot`): each row's "
        "perplexity when the quantizer calibrated the whole sliced model as one subgraph (as "
        "recorded at commit b4f9621, "
        "`results/quantized_before_layer_by_layer.jsonl`) and re-run with it going one "
        "decoder layer at a time (`results/quantized.jsonl`). For GPTQ's own run-to-run "
        "spread: `recipes/slice_w8a8.yaml` run twice before the fix scored 54.70 and 54.66 "
        "(`results/recipes_cpu.md`, `results/recipes_cpu_w8a8_rerun.md`). The "
        "`sliced-hadamard-aligned` rows with quantized shortcuts (`-qs`) were recorded "
        "before slicing format 5 as well, with boundary shortcuts stored as deltas, so their "
        "change includes that one. Produced by `python benchmarks/layer_by_layer.py`.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
