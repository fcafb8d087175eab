"""Cost of slicing in units of one forward pass of the calibration set.

Times, in one process and back to back (so machine load affects all alike): a plain
layer-by-layer forward of the calibration set through every decoder layer, the Layer
Redundancy pass, the rotate-and-slice pass, and the plain forward again (the unit is the
mean of the two forwards, which brackets the passes in time); writes
``results/slicing_cost.json``.

    python benchmarks/slicing_cost.py [--n-calib 64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import RESULTS, peak_rss_mib, protocol
from transformers import AutoModelForCausalLM
from vllm_speed import cpu_description

from dynslice_modifier import DynamicSliceModifier
from dynslice_modifier.adapters import get_adapter
from dynslice_modifier.allocation import DEFAULT_ROUND_TO
from dynslice_modifier.budget import ParameterCounter
from dynslice_modifier.calibration import capture_layer_inputs, onloaded, to_device
from dynslice_modifier.layout import LayoutPlanner
from dynslice_modifier.redundancy import dense_pass
from dynslice_modifier.slicer import RotateAndSlice, embeddings_tied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-calib", type=int, default=64)
    args = parser.parse_args()
    path, _, dataset, _ = protocol(n_calib=args.n_calib)
    batches = [{"input_ids": torch.tensor([ids])} for ids in dataset["input_ids"]]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    layers, device = adapter.layers(model), torch.device("cpu")

    def forward() -> float:
        inputs = capture_layer_inputs(model, layers[0], batches)
        start = time.perf_counter()
        with torch.no_grad():
            for layer in layers:
                with onloaded(layer, device):
                    for b in range(len(inputs)):
                        kwargs = to_device(inputs.kwargs[b], device)
                        inputs.hidden[b] = layer(inputs.hidden[b], **kwargs)
        return time.perf_counter() - start

    forward_before = forward()

    inputs = capture_layer_inputs(model, layers[0], batches)
    start = time.perf_counter()
    # With rounding unset, the modifier takes each layer input's spectrum in this pass and
    # rounds dynamic widths by it.
    measured = dense_pass(layers, inputs, device, spectra=True)
    lr_s = time.perf_counter() - start

    # The modifier's defaults otherwise too, planned as it plans them (rounding, layers
    # left whole, aligned bases: one more SVD per basis), so the cost is that of the recipe
    # users run.
    defaults = DynamicSliceModifier(sparsity=0.25, slicing_base=0.05)
    keep_tied = embeddings_tied(model) and not (defaults.untie_embeddings or defaults.slice_head)
    counter = ParameterCounter(
        model, adapter, defaults.basis, keep_tied, defaults.align_bases, defaults.slice_head
    )
    planner = LayoutPlanner(
        counter,
        defaults.round_to or DEFAULT_ROUND_TO,
        defaults.normalization,
        defaults.rounding,
        defaults.profitable_only,
        measured.scores,
        measured.spectra,
    )
    layout = planner.at(defaults.sparsity, defaults.effective_slicing_base)
    inputs = capture_layer_inputs(model, layers[0], batches)
    start = time.perf_counter()
    slicer = RotateAndSlice(
        model,
        adapter,
        layout.dims,
        device,
        defaults.basis,
        keep_tied,
        hadamard=defaults.hadamard,
        align=defaults.align_bases,
        whole=layout.whole,
        slice_head=defaults.slice_head,
    )
    slicer.run(inputs)
    slice_s = time.perf_counter() - start
    # The sliced layers are smaller, so the closing forward runs on an unsliced copy.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layers = adapter.layers(model)
    forward_after = forward()
    forward_s = (forward_before + forward_after) / 2

    result = {
        "calibration": f"{args.n_calib}x512 tokens",
        "slicer": {
            "rounding": layout.rounding,
            "whole_layers": [i for i, w in enumerate(layout.whole) if w],
            "hadamard": defaults.hadamard,
            "align_bases": defaults.align_bases,
        },
        "forward_s": round(forward_s, 1),
        "forward_before_after_s": [round(forward_before, 1), round(forward_after, 1)],
        "lr_pass_s": round(lr_s, 1),
        "slice_pass_s": round(slice_s, 1),
        "total_in_forward_passes": round((lr_s + slice_s) / forward_s, 2),
        "peak_rss_mib": round(peak_rss_mib()),
        "threads": torch.get_num_threads(),
        # The ratios move with the machine (benchmarks/README.md, "Cost of slicing").
        "cpu": cpu_description(),
    }
    (RESULTS / "slicing_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
