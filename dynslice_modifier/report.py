"""Summary of a sliced checkpoint: per-layer table (Markdown) and a plot (PNG)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dynslice_modifier.modeling.configuration_dynslice import (
    DynSliceConfig,
    check_layer_entries,
    invalid_slicing,
)
from dynslice_modifier.modeling.modeling_dynslice import REPORT_FILES
from dynslice_modifier.output import directory_size


def load_slicing(checkpoint: str | Path) -> dict[str, Any]:
    """A sliced checkpoint's config, with the per-layer entries the report reads whole and
    in range."""
    config = read_sliced_config(checkpoint)
    spec, *sizes = (config.get(key) for key in ("slicing", "hidden_size", "num_hidden_layers"))
    if not isinstance(spec, dict) or not all(type(size) is int and size > 0 for size in sizes):
        raise invalid_slicing(
            f"{Path(checkpoint) / 'config.json'} lacks its slicing section, hidden_size or "
            "num_hidden_layers"
        )
    check_layer_entries(spec, *sizes)
    return config


def read_sliced_config(checkpoint: str | Path) -> dict[str, Any]:
    """The config of a directory that holds a sliced checkpoint, unchecked beyond that."""
    config_path = Path(checkpoint) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{checkpoint} has no config.json: pass the directory a sliced model was saved to"
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(
            f"{config_path} is not valid JSON ({err}): restore it, or save the model again"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds no JSON object: restore it, or save the model again")
    if config.get("model_type") != DynSliceConfig.model_type:
        raise ValueError(
            f"{checkpoint} is not a sliced checkpoint (model_type {config.get('model_type')!r}); "
            f"slice it first with: dynslice compress {checkpoint} OUTPUT (which writes the "
            "report into OUTPUT)"
        )
    return config


def _rounding(spec: dict[str, Any]) -> str:
    if "rounding" not in spec:
        return "nearest rounding"  # written before the rounding was recorded
    return f"{spec['rounding']} rounding" if spec["rounding"] else "widths given"


def summary_markdown(checkpoint: str | Path, name: str | None = None) -> str:
    """The report's text; ``name`` titles it when the directory is not yet where it will
    live (``compress`` writes it into a scratch directory that is renamed afterwards)."""
    config = load_slicing(checkpoint)
    spec = config["slicing"]
    lines = [
        f"# Sliced checkpoint: {name or Path(checkpoint).name}",
        "",
        *_overview(config, checkpoint),
        "",
        *_layer_table(spec),
        *_search_table(spec),
    ]
    return "\n".join(lines) + "\n"


def _shared_bases(spec: dict[str, Any]) -> str:
    shared = spec.get("layers_per_basis", 1)
    return "" if shared == 1 else f" ({shared} layers per basis where of one width)"


def _fraction(value: Any) -> Any:
    # A solved sparsity carries the solver's last digits (0.3046875000006821).
    return f"{value:.4g}" if isinstance(value, float) else value


def _target(spec: dict[str, Any]) -> str:
    target = spec.get("target_params")
    return "" if target is None else f" (solved for target_params {target})"


def _overview(config: dict[str, Any], checkpoint: str | Path) -> list[str]:
    spec, hidden = config["slicing"], config["hidden_size"]
    lines = [
        f"- base architecture: {config['base_model_type']} ({config['num_hidden_layers']} layers, "
        f"hidden {hidden})",
        f"- sparsity (SP) {_fraction(spec.get('sparsity'))}{_target(spec)}, slicing base (SB) "
        f"{_fraction(spec.get('slicing_base'))}, "
        f"round_to {spec.get('round_to')} ({_rounding(spec)}), "
        f"basis {spec.get('basis')}{_shared_bases(spec)}",
        f"- mean kept width {sum(spec['mlp_dims']) / len(spec['mlp_dims']):.1f} of {hidden}",
        f"- tied embeddings: {config.get('tie_word_embeddings')}; embedding sliced: "
        f"{spec['embedding_sliced']}; head reads "
        f"{spec.get('final_dim') or hidden} of {hidden} (slice_head: {'final_dim' in spec})",
    ]
    if calibration := spec.get("calibration"):
        lines.append(
            f"- calibration: {calibration['batches']} batches, {calibration['tokens']} tokens "
            "(padding excluded)"
        )
    if params := spec.get("parameters"):
        lines.append(
            f"- parameters: {params['sliced'] / 1e6:.2f}M vs {params['dense'] / 1e6:.2f}M dense "
            f"({params['sliced'] / params['dense']:.1%}), shortcuts included"
        )
    if quant := config.get("quantization_config"):
        shortcuts = (
            "quantized with the rest, except any in its ignore list"
            if spec.get("quantizable_shortcuts")
            else "kept in model dtype"
        )
        lines.append(
            f"- quantization: {quant.get('format')} ({quant.get('quant_method')}); shortcut "
            f"matrices {shortcuts}"
        )
    # Its own files left out, so that writing the report again states the same size.
    size = directory_size(checkpoint, leave_out=REPORT_FILES)
    lines.append(f"- size on disk: {size / 2**20:.1f} MiB, this report aside")
    return lines


def _layer_table(spec: dict[str, Any]) -> list[str]:
    scores = spec.get("lr_scores") or [None] * len(spec["attn_dims"])
    lines = [
        "| layer | LR score | attention width | MLP width | attn shortcut | MLP shortcut |",
        "|---|---|---|---|---|---|",
    ]
    for i, (a, m) in enumerate(zip(spec["attn_dims"], spec["mlp_dims"], strict=True)):
        score = "" if scores[i] is None else f"{scores[i]:.3f}"
        lines.append(
            f"| {i} | {score} | {a} | {m} | {'yes' if spec['attn_shortcuts'][i] else 'no'} | "
            f"{'yes' if spec['mlp_shortcuts'][i] else 'no'} |"
        )
    return lines


def _search_table(spec: dict[str, Any]) -> list[str]:
    """The ``slicing_base: auto`` candidates, where a search ran."""
    if not spec.get("slicing_base_search"):
        return []
    lines = [
        "",
        "`slicing_base: auto` search (loss on held-out calibration batches):",
        "",
        "| SB | SP | held-out loss | held-out ppl | chosen |",
        "|---|---|---|---|---|",
    ]
    for t in spec["slicing_base_search"]:
        lines.append(
            f"| {t['slicing_base']:.4f} | {t['sparsity']:.4f} | {t['heldout_nll']:.4f} | "
            f"{math.exp(t['heldout_nll']):.2f} | {'yes' if t['chosen'] else ''} |"
        )
    return lines


def plot_slicing(checkpoint: str | Path, png: str | Path) -> Path:
    """LR score and kept width per layer, with the constant-slicing width for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    config = load_slicing(checkpoint)
    spec = config["slicing"]
    layers = list(range(len(spec["mlp_dims"])))
    constant = config["hidden_size"] * (1 - (spec.get("sparsity") or 0.0))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if spec["attn_dims"] == spec["mlp_dims"]:
        ax.plot(layers, spec["mlp_dims"], "o-", color="tab:blue", label="kept width (dynamic)")
    else:
        # A basis per sub-layer: each reads the residual at a width of its own.
        ax.plot(layers, spec["attn_dims"], "^-", color="tab:green", label="attention input width")
        ax.plot(layers, spec["mlp_dims"], "o-", color="tab:blue", label="MLP input width")
    ax.axhline(constant, color="tab:gray", ls="--", label=f"constant slicing ({constant:.0f})")
    ax.set_xlabel("decoder layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("kept residual width")
    ax.set_ylim(0, config["hidden_size"] * 1.05)
    handles, labels = ax.get_legend_handles_labels()
    if spec.get("lr_scores"):
        ax2 = ax.twinx()
        ax2.plot(layers, spec["lr_scores"], "s-", color="tab:orange", label="Layer Redundancy")
        ax2.set_ylabel("Layer Redundancy (cos sim in/out)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower left")
    ax.set_title(
        f"SP {spec.get('sparsity')}, SB {spec.get('slicing_base')} - {config['base_model_type']}"
    )
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_report(
    checkpoint: str | Path, out_dir: str | Path | None = None, name: str | None = None
) -> tuple[Path, Path | None]:
    """``slicing_report.md`` and, where matplotlib is installed (the ``compress`` extra),
    ``slicing_report.png``; None for the plot where it is not."""
    # Read first: a checkpoint that is not one fails before any directory is made.
    summary = summary_markdown(checkpoint, name)
    out = Path(out_dir or checkpoint)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"the report goes into a directory, and {out} is a file: name a directory for it"
        )
    out.mkdir(parents=True, exist_ok=True)
    md_name, png_name = REPORT_FILES
    md = out / md_name
    md.write_text(summary)
    if not _has_matplotlib():
        return md, None
    return md, plot_slicing(checkpoint, out / png_name)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
