"""``dynslice``: score, compress, evaluate and report on sliced models.

Calibration and evaluation text follow the project's WikiText-2 protocol (first half of the
file for calibration windows, second half for evaluation windows); ``--data`` points at any
raw text file. ``smollm2`` as a model name means the packaged SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from dynslice_modifier.allocation import DEFAULT_ROUND_TO, Normalization, Rounding
from dynslice_modifier.budget import Basis
from dynslice_modifier.checkpoint_checks import (
    check_vocabulary,
    check_weights,
    load_config,
    load_tokenizer,
    model_path,
    weights_bytes,
)
from dynslice_modifier.recipe_checks import check_recipe_layout, modifier_hint
from dynslice_modifier.version import __version__

if TYPE_CHECKING:
    import torch

QUANT_SCHEMES = ("none", "w4a16", "w8a8", "fp8")


# argparse turns a parser's ValueError into "invalid <function name> value"; the parsers
# below raise ArgumentTypeError, whose message it shows as it is.


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'} > 0, got {text!r}"
            ) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _percent_hint(value: float) -> str:
    """What a fraction given as a percentage (25 for 0.25) most likely meant; 1 means all,
    which no model can lose."""
    return f" (a fraction: {value / 100:g} for {value:g}%)" if 1.0 < value <= 100.0 else ""


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 2**64
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(
            f"must be an integer from -2**63 to 2**64 - 1 (torch's seeds), got {text!r}"
        )
    return value


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}{_percent_hint(value)}")
    return value


def _share(text: str) -> float:
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}{_percent_hint(value)}")
    return value


def _slicing_base(text: str) -> float | str:
    if text.lower() == "auto":
        return "auto"
    # [0, 1] and not [0, SP]: SB 1.0 with --target-params is constant slicing (capped at the
    # SP solved for); the modifier checks SB against the sparsity it ends up with.
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        hint = _percent_hint(value) if value is not None and value > 1.0 else ""
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1] or 'auto', got {text}{hint}")
    return value


# DynamicSliceModifier fields that `compress` exposes as flags of the same name, with the
# modifier's defaults, which --help shows. The flags hold no defaults of their own: an unset
# one is left out, so the modifier applies its default (and can tell an explicit round_to
# from its own). The defaults are written out rather than read from the modifier because
# importing it imports llm-compressor, which the [serve] and [eval] environments lack (the
# package registers the modifier only where llm-compressor is installed); a test holds them
# to the modifier's.
SLICER_FLAGS: dict[str, Any] = {
    "round_to": None,
    "rounding": None,
    "basis": "sublayer",
    "layers_per_basis": 1,
    "normalization": "minmax",
    "hadamard": False,
    "align_bases": True,
    "profitable_only": True,
    "untie_embeddings": False,
    "slice_head": False,
    "quantize_shortcuts": False,
}

# The modifier's fields that only a recipe sets (every other one is a flag).
RECIPE_ONLY = ("layer_dims", "layer_scores", "auto_fractions", "auto_holdout")


def _flag(field: str) -> str:
    """The command-line flag of an argument's ``dest``."""
    return "--" + field.replace("_", "-")


def _slicer_flag(
    p: argparse.ArgumentParser, field: str, help: str, unset: str | None = None, **kwargs: Any
) -> None:
    """``--<field>`` for ``DynamicSliceModifier.<field>``; --help shows the modifier's default
    (``unset`` says what a default of None means)."""
    if field not in SLICER_FLAGS:
        raise ValueError(f"{field} is not listed in SLICER_FLAGS")
    default = SLICER_FLAGS[field]
    if default is None:
        default = unset
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
        default = "on" if default else "off"
    p.add_argument(_flag(field), default=None, help=f"{help} (default: {default})", **kwargs)


def _windows(
    tokenizer: Any, args: argparse.Namespace, eval_windows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol's calibration windows and ``eval_windows`` evaluation windows."""
    from dynslice_modifier.evaluation import split_protocol, wikitext_tokens

    tokens = wikitext_tokens(tokenizer, args.data)
    return split_protocol(tokens, args.samples, args.seq_len, eval_windows)


def _add_data_args(p: argparse.ArgumentParser, samples: int = 64, seq_len: int = 512) -> None:
    p.add_argument("--data", help="raw text file (default: ../shared WikiText-2 test file)")
    p.add_argument(
        "--samples",
        type=_positive(int),
        default=samples,
        help=f"calibration windows (default {samples})",
    )
    p.add_argument(
        "--seq-len",
        type=_positive(int),
        default=seq_len,
        help=f"tokens per calibration window (default {seq_len})",
    )


def quant_modifiers(
    scheme: str, config: Any, quantize_shortcuts: bool = False, quantize_head: bool = False
) -> list[Any]:
    """The llm-compressor modifiers for a ``--quantize`` choice."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if scheme == "w4a16":
        from dynslice_modifier.adapters import adapter_for
        from dynslice_modifier.modeling.configuration_dynslice import INPUT_PROJECTION

        # Groups of 128 need every quantized input width to divide; the residual widths are
        # rounded by the slicer, but the sublayers' output linears read the attention heads
        # and the MLP, which slicing does not change.
        layout = adapter_for(config).layout
        ignore = ["lm_head"]
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        if (config.num_attention_heads * head_dim) % 128:
            ignore.append(f"re:.*{layout['attn_output']}$")
        if config.intermediate_size % 128:
            ignore.append(f"re:.*{layout['mlp_output']}$")
        if quantize_shortcuts and config.hidden_size % 128:
            # A tied table's projection into layer 0 reads hidden_size.
            ignore.append(f"re:.*{INPUT_PROJECTION}$")
        if len(ignore) > 1:
            print(f"W4A16 groups of 128 do not fit {ignore[1:]}: kept in full precision")
        return [GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    if scheme == "w8a8":
        # The head is an nn.Linear: without the ignore, `targets: Linear` takes it (and
        # llm-compressor unties a tied table to quantize it).
        ignore = [] if quantize_head else ["lm_head"]
        return [GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    if scheme == "fp8":
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    return []


def _check_writable(flag: str, target: str) -> None:
    """Refuse an output file that could not be written, before the work that fills it."""
    path = Path(target)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {target} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{flag} {target}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"{flag} {target} is not writable")


def cmd_scores(args: argparse.Namespace) -> None:
    # Capturing the layers' inputs uses compressed-tensors' offloading helpers.
    _require_compression_stack("scores", "compressed_tensors", "compressed-tensors")
    import torch
    from transformers import AutoModelForCausalLM

    from dynslice_modifier.adapters import adapter_for, get_adapter
    from dynslice_modifier.calibration import capture_layer_inputs
    from dynslice_modifier.errors import UnsupportedModelError
    from dynslice_modifier.modeling import DynSliceConfig
    from dynslice_modifier.redundancy import redundancy_scores

    path = model_path(args.model)
    config = load_config(path)
    if config.model_type == DynSliceConfig.model_type:
        raise UnsupportedModelError(
            f"{args.model} is already sliced: Layer Redundancy scores are measured on the dense "
            "model, and a sliced checkpoint records the ones it was sliced by in "
            "config.json (slicing.lr_scores; `dynslice report` shows them)"
        )
    # A model the slicer cannot take is refused from its config, before its weights load.
    adapter_for(config)
    check_weights(path, config)
    if args.json:
        _check_writable("--json", args.json)
    calib, _ = _windows(load_tokenizer(path), args)
    check_vocabulary(path, calib, config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    batches = [{"input_ids": w[None]} for w in calib]
    layers = adapter.layers(model)
    inputs = capture_layer_inputs(model, layers[0], batches)
    scores = redundancy_scores(layers, inputs, torch.device("cpu"))
    print("layer  LR score")
    for i, s in enumerate(scores):
        print(f"{i:5d}  {s:8.4f}  {'#' * int(40 * max(s, 0))}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(path), "lr_scores": scores}))
        print(f"scores written to {args.json} (use as layer_scores in a recipe)")


class MissingExtraError(Exception):
    """A command needs an optional dependency group that this environment lacks."""


def _require_compression_stack(
    command: str, module: str = "llmcompressor", package: str = "llm-compressor"
) -> None:
    # The [serve] and [eval] environments have no llm-compressor (its compressed-tensors pin
    # differs from vLLM's), [eval] no compressed-tensors either; name the extra instead of
    # failing on the import.
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f'{command} needs {package} ({err}): pip install "dynslice-modifier[compress]"'
            ' (from a clone: pip install -e ".[compress]")'
        ) from None


def cmd_compress(args: argparse.Namespace) -> None:
    _require_compression_stack("compress")
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    from dynslice_modifier.adapters import adapter_for
    from dynslice_modifier.output import atomic_directory, check_free_space, check_target
    from dynslice_modifier.report import summary_markdown, write_report

    path = model_path(args.model)
    # An architecture the slicer cannot take is refused from its config, before the
    # weights are loaded (minutes for a large model) and before any data is tokenized.
    config = load_config(path)
    adapter_for(config)
    check_weights(path, config)
    output = Path(args.output)
    check_target(output, [path])
    dense_bytes = weights_bytes(path)
    # Slicing and quantizing shrink the weights; rotation alone (SP 0) adds shortcut
    # matrices, hence the margin over the input's size.
    check_free_space(output, int(1.25 * dense_bytes) + 2**20)
    recipe = _compress_recipe(args, config)
    tokenizer = load_tokenizer(path)
    calib, evaluation = _windows(tokenizer, args, args.eval_windows or 0)
    check_vocabulary(path, calib, config)
    dataset = Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": [[1] * calib.shape[1]] * len(calib)}
    )
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    # Outside the atomic write, so that its final rename is covered too.
    with _writing(output, path), atomic_directory(output) as scratch:
        oneshot(
            model=str(path),
            processor=tokenizer,
            dataset=dataset,
            recipe=recipe,
            output_dir=str(scratch),
            num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False,
        )
        _, plot = write_report(scratch, name=output.name)
    seconds = time.perf_counter() - start
    print(summary_markdown(output))
    report = f"{output / 'slicing_report.md'}" + (
        f", {output / plot.name}" if plot else " (no plot: matplotlib is not installed)"
    )
    _print_gains(path, output, dense_bytes, seconds, evaluation, args.eval_windows, report)


@contextlib.contextmanager
def _writing(output: Path, source: Path) -> Iterator[None]:
    """safetensors reports a failed write (a full disk) as its own error, not an OSError;
    the input's files were checked before, so it is most likely the output's. A permission
    lost during the run on the output's side (its directory was writable when the run
    started) is named with the fix."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise OSError(f"reading the model or writing {output} failed: {err}") from err
    except PermissionError as err:
        parent, source = output.resolve().parent, source.resolve()
        paths = [Path(name).resolve() for name in (err.filename, err.filename2) if name]
        if not any(p.is_relative_to(parent) and not p.is_relative_to(source) for p in paths):
            raise
        raise OSError(
            f"writing {output} failed: {err}; {output.parent} was writable when the run "
            "started: make it writable again, or choose another output directory"
        ) from err


def _print_gains(
    path: Path,
    output: Path,
    dense_bytes: int,
    seconds: float,
    evaluation: Any,
    eval_windows: int,
    report: str,
) -> None:
    """What compressing ``path`` into ``output`` gained: size, time and, given evaluation
    windows, perplexity of both."""
    from dynslice_modifier.output import directory_size

    sliced_bytes = weights_bytes(output)
    ratio = f" ({sliced_bytes / dense_bytes:.1%})" if dense_bytes else ""
    print(
        f"weights on disk: {dense_bytes / 2**20:.1f} MiB -> {sliced_bytes / 2**20:.1f} MiB"
        f"{ratio}; whole directory {directory_size(output) / 2**20:.1f} MiB"
    )
    print(f"compression took {seconds:.0f} s; report: {report}")
    if eval_windows:
        dense_ppl = _perplexity(path, evaluation)
        sliced_ppl = _perplexity(output, evaluation)
        print(
            f"perplexity ({eval_windows} x 1024 tokens): dense {dense_ppl:.2f} -> "
            f"compressed {sliced_ppl:.2f} ({sliced_ppl / dense_ppl:.2f}x)"
        )


def _compress_recipe(args: argparse.Namespace, config: Any) -> Any:
    """What compress runs: ``--recipe`` as given, once checked to slice, or the recipe the
    flags describe; every conflict among them is refused before any data is read."""
    from dynslice_modifier import DynamicSliceModifier

    given = [
        # As typed: a switch turned off is --no-<name>.
        _flag(name if getattr(args, name) is not False else f"no_{name}")
        for name in ("sparsity", "target_params", "slicing_base", *SLICER_FLAGS)
        if getattr(args, name) is not None
    ]
    if args.quantize != "none":
        given.append("--quantize")
    if args.quantize_head:
        given.append("--quantize-head")
    if args.recipe and given:
        raise ValueError(
            f"--recipe sets the whole recipe; drop {' '.join(given)} or put them in the recipe"
        )
    if args.recipe:
        import yaml
        from llmcompressor.recipe import Recipe

        if not Path(args.recipe).is_file():
            raise FileNotFoundError(f"--recipe {args.recipe} does not exist or is not a file")
        try:
            check_recipe_layout(args.recipe)
            modifiers = Recipe.create_instance(args.recipe).modifiers
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(
                f"--recipe {args.recipe} is not valid YAML (UTF-8 text): {err}"
            ) from None
        except ValueError as err:
            if hint := modifier_hint(err):
                raise ValueError(f"--recipe {args.recipe}: {err}{hint}") from None
            raise
        if not any(isinstance(m, DynamicSliceModifier) for m in modifiers):
            raise ValueError(
                f"--recipe {args.recipe} has no DynamicSliceModifier, so compress would not "
                "slice; add a slice stage before its quantizers (see recipes/slice_w8a8.yaml)"
            )
        return args.recipe
    if args.target_params is not None and args.sparsity is not None:
        raise ValueError("give either --sparsity or --target-params, not both")
    if args.quantize_shortcuts and args.quantize == "none":
        raise ValueError("--quantize-shortcuts needs a --quantize scheme to apply")
    if args.quantize_head and args.quantize != "w8a8":
        raise ValueError(
            "--quantize-head is offered with --quantize w8a8 only (an int8 head, which "
            f"vLLM's CPU kernels run fast), got --quantize {args.quantize}"
        )
    budget = (
        {"target_params": args.target_params}
        if args.target_params is not None
        else {"sparsity": 0.25 if args.sparsity is None else args.sparsity}
    )
    slicer = DynamicSliceModifier(
        **budget,
        slicing_base=args.slicing_base,
        **{f: getattr(args, f) for f in SLICER_FLAGS if getattr(args, f) is not None},
    )
    quantizers = quant_modifiers(
        args.quantize, config, slicer.quantize_shortcuts, args.quantize_head
    )
    return [slicer, *quantizers]


def _perplexity(path: Path, evaluation: Any) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from dynslice_modifier.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return perplexity(model, evaluation)


def cmd_eval(args: argparse.Namespace) -> None:
    from dynslice_modifier.adapters import ADAPTERS
    from dynslice_modifier.evaluation import evaluation_windows, wikitext_tokens
    from dynslice_modifier.modeling import DynSliceConfig

    path = model_path(args.model)
    config = load_config(path)
    # The architectures the check knows the stored names of (transformers converts others'
    # on load, MoE experts say); a quantized checkpoint's tensors have other names and
    # shapes than its config's float model.
    if config.model_type in {DynSliceConfig.model_type, *ADAPTERS} and not getattr(
        config, "quantization_config", None
    ):
        check_weights(path, config)
    tokens = wikitext_tokens(load_tokenizer(path), args.data)
    check_vocabulary(path, tokens, config)
    evaluation = evaluation_windows(tokens, args.windows, args.window_len)
    ppl = _perplexity(path, evaluation)
    print(f"perplexity of {path} on {args.windows} x {args.window_len} tokens: {ppl:.3f}")


def cmd_report(args: argparse.Namespace) -> None:
    from dynslice_modifier.report import summary_markdown, write_report

    md, png = write_report(args.checkpoint, args.out)
    print(summary_markdown(args.checkpoint))
    if png is None:
        print(f"wrote {md}; no plot: matplotlib is not installed (pip install matplotlib)")
    else:
        print(f"wrote {md} and {png}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynslice", description="Dynamic layer-specific slicing (SliceGPT + Layer Redundancy)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_scores, _add_compress, _add_eval, _add_report):
        add(sub)
    return parser


def _add_scores(sub: Any) -> None:
    p = sub.add_parser("scores", help="compute and show the Layer Redundancy of every layer")
    p.add_argument("model", help="model directory, or 'smollm2' for the packaged SmolLM2-135M")
    _add_data_args(p, samples=16)
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.set_defaults(func=cmd_scores)


def _add_compress(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="slice (and optionally quantize) into an output dir",
        epilog="Set only in a --recipe: " + ", ".join(RECIPE_ONLY) + " (see the modifier's "
        "docstring; dynslice scores --json writes layer_scores).",
    )
    p.add_argument("model", help="model directory, or 'smollm2'")
    p.add_argument(
        "output",
        help="output directory: new, empty or an earlier result (written atomically; input "
        "never touched)",
    )
    p.add_argument("--recipe", help="llm-compressor YAML recipe (instead of the flags below)")
    _add_budget_flags(p)
    _add_slicer_flags(p)
    _add_quantize_flags(p)
    p.add_argument(
        "--eval-windows",
        type=_positive(int),
        help="evaluate perplexity before/after on this many 1024-token windows",
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="torch seed set before compressing (default 0)"
    )
    _add_data_args(p)
    p.set_defaults(func=cmd_compress)


def _add_budget_flags(p: argparse.ArgumentParser) -> None:
    """How much to slice: SP or a parameter target, and the slicing base."""
    p.add_argument("--sparsity", type=_fraction, help="SP, mean fraction sliced (default 0.25)")
    p.add_argument(
        "--target-params",
        type=_share,
        help="instead of --sparsity: fraction of all parameters to remove (shortcuts, "
        "embedding and head included); SP is solved for",
    )
    p.add_argument(
        "--slicing-base",
        type=_slicing_base,
        help="SB in [0, SP] (default 0.2*SP; with --target-params in [0, 1], capped at the SP "
        "solved for), or 'auto' to choose it on held-out calibration text",
    )


def _add_slicer_flags(p: argparse.ArgumentParser) -> None:
    """How the slicer rounds widths and builds its bases."""
    _slicer_flag(
        p,
        "round_to",
        "width multiple",
        unset=f"{DEFAULT_ROUND_TO}, raised to what --quantize's kernels need",
        type=_positive(int),
    )
    _slicer_flag(
        p,
        "rounding",
        "round widths keeping the mean slice at SP (mean: largest remainders up; spectrum: "
        "the layers whose next step keeps most of their input's signal up), or each to its "
        "nearest",
        unset="spectrum for dynamic widths, mean for constant ones",
        choices=get_args(Rounding),
    )
    _slicer_flag(
        p,
        "basis",
        "PCA basis per sub-layer (SliceGPT) or per layer (fewer shortcuts)",
        choices=get_args(Basis),
    )
    _slicer_flag(
        p,
        "layers_per_basis",
        "with --basis layer: blocks of this many layers share a basis where sliced to one "
        "width (no shortcut between them)",
        type=_positive(int),
    )
    _slicer_flag(
        p, "normalization", "how LR scores are spread over [0, 1]", choices=get_args(Normalization)
    )
    _slicer_flag(
        p,
        "hadamard",
        "fold block Hadamard rotations into the kept bases (on SmolLM2 with aligned bases: "
        "W8A8 0.3%% better at most, FP8 and W4A16 at the W4A16 recipe's settings worse; "
        "benchmarks/README.md)",
    )
    _slicer_flag(
        p,
        "align_bases",
        "align consecutive bases so shortcuts are near the identity and stored as their "
        "difference from it (helps quantized shortcuts)",
    )
    _slicer_flag(
        p,
        "profitable_only",
        "leave a layer whole (full width, no shortcut) where slicing it would add more "
        "shortcut weights than it removes",
    )
    _slicer_flag(p, "untie_embeddings", "untie a tied head and slice the embedding table")
    _slicer_flag(
        p,
        "slice_head",
        "slice the head's input too (a tied table is untied for it; pays off with "
        "--quantize-head or an untied model)",
    )


def _add_quantize_flags(p: argparse.ArgumentParser) -> None:
    """The quantizer that follows the slicer in the same oneshot pass."""
    p.add_argument(
        "--quantize",
        choices=QUANT_SCHEMES,
        default="none",
        help="quantize after slicing in the same oneshot pass (default: none)",
    )
    _slicer_flag(
        p,
        "quantize_shortcuts",
        "let --quantize take the shortcut matrices too (smaller and faster; off, they stay "
        "in model dtype)",
    )
    p.add_argument(
        "--quantize-head",
        action="store_true",
        help="let --quantize w8a8 take the head too (faster decoding; a tied table is "
        "untied, so the checkpoint stores a second, int8 one)",
    )


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity on the evaluation half of the text")
    p.add_argument("model", help="model directory (sliced, quantized or dense), or 'smollm2'")
    p.add_argument("--data", help="raw text file (default: ../shared WikiText-2 test file)")
    p.add_argument(
        "--windows", type=_positive(int), default=32, help="evaluation windows (default 32)"
    )
    p.add_argument(
        "--window-len", type=_positive(int), default=1024, help="tokens per window (default 1024)"
    )
    p.set_defaults(func=cmd_eval)


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="Markdown table and PNG plot for a sliced checkpoint")
    p.add_argument("checkpoint", help="sliced checkpoint directory (written by compress)")
    p.add_argument("--out", help="directory for the report files (default: the checkpoint)")
    p.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # SIGTERM (timeout, Slurm, docker stop) and SIGHUP would end the process without
    # unwinding, leaving a finished-looking scratch checkpoint beside the output; as an
    # exit they run the same cleanup as an error or Ctrl-C.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, _exit_on_signal)
    # With flags the slicer's settings came from them; a recipe's errors name its own fields.
    flags = args.command == "compress" and not args.recipe
    if flags:
        from loguru import logger

        # The modifier's warnings name its fields as its errors do.
        logger.configure(patcher=_log_in_flag_terms)
    try:
        args.func(args)
    except (ValueError, OSError, MissingExtraError) as err:
        print(f"error: {_in_cli_terms(_message(err), slicer_flags=flags)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # The commands' own cleanup (compress's scratch checkpoint) has run on the way here.
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        # Called from Python (or a test), the caller's handlers are its own again.
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if flags:
            logger.configure(patcher=_leave_record)


def _log_in_flag_terms(record: dict[str, Any]) -> None:
    if record["name"].startswith("dynslice_modifier."):
        record["message"] = _in_cli_terms(record["message"], slicer_flags=True)


def _leave_record(record: dict[str, Any]) -> None:
    """A patcher that changes nothing: loguru has no public way to remove one."""


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# The library's errors name oneshot's arguments; these are the flags that set them here.
_CLI_TERMS = {
    "batch size 1 in oneshot gives one batch per sample": "--samples: one batch per window",
    "num_calibration_samples": "--samples",
    "max_seq_length": "--seq-len",
    "add calibration samples": "raise --samples",
}
# Recipe settings with no flag of their own, for errors about a run set up by flags.
_RECIPE_ONLY = re.compile(r"\b(auto_holdout)\b")


def _message(err: Exception) -> str:
    """The error's own words: a pydantic ValidationError (the modifier's validators) without
    its header, error type and documentation link."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(err, pydantic.ValidationError):
        return str(err)
    messages = []
    for error in err.errors():
        if error["type"] == "value_error":
            # A validator's own message, which names its field.
            messages.append(error["msg"].removeprefix("Value error, "))
        elif error["type"] == "extra_forbidden":
            messages.append(_unknown_setting(err.title, str(error["loc"][-1])))
        else:
            where = ".".join(str(part) for part in error["loc"]) or "value"
            messages.append(f"{where} ({error['msg']}, got {error['input']!r})")
    return "; ".join(messages)


def _unknown_setting(owner: str, name: str) -> str:
    """A recipe's misspelt setting, with the nearest one ``owner`` (a modifier class) has."""
    import difflib

    from pydantic import BaseModel

    classes, fields = [BaseModel], []
    while classes and not fields:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls.__name__ == owner:
            fields = list(cls.model_fields)
    close = difflib.get_close_matches(name, fields, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "check its spelling in the recipe"
    return f"{owner} has no setting {name!r} ({hint})"


def _slicer_terms() -> list[tuple[re.Pattern[str], Any]]:
    """The modifier's field names, as errors write them, to the flags that set them."""
    fields = ("sparsity", "target_params", "slicing_base", *SLICER_FLAGS)
    terms: list[tuple[re.Pattern[str], Any]] = []
    for field in fields:
        # Not inside a longer name (effective_slicing_base, --slicing-base) or a value shown
        # as field=value ("round_to=128 exceeds hidden_size=64").
        name = rf"(?<![\w-]){field}(?![\w=-])"
        if isinstance(SLICER_FLAGS.get(field), bool):
            terms.append(
                (
                    re.compile(rf"{name}: (true|false)\b", re.IGNORECASE),
                    lambda m, field=field: _flag(
                        field if m[1].lower() == "true" else "no_" + field
                    ),
                )
            )
        # The recipe's "field: value" ("basis: layer", "slicing_base: auto").
        terms.append((re.compile(rf"{name}: (?=[a-z0-9.'\"])"), _flag(field) + " "))
        # Everywhere else only names no sentence uses as a word (sparsity is, as the flag).
        if "_" in field or field == "sparsity":
            terms.append((re.compile(name), _flag(field)))
    return terms


def _in_cli_terms(message: str, slicer_flags: bool = False) -> str:
    for term, flag in _CLI_TERMS.items():
        message = message.replace(term, flag)
    if slicer_flags:
        for pattern, flag in _slicer_terms():
            message = pattern.sub(flag, message)
        message = _RECIPE_ONLY.sub(r"\1 (a recipe setting: --recipe)", message)
    return message


if __name__ == "__main__":
    main()
