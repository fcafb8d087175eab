"""Perplexity of dense, constant and dynamic slicing on SmolLM2-135M (shared protocol).

Each row runs in its own process (so peak memory is the row's own) and is appended to
``results/perplexity.jsonl``; rows already there are skipped, so an interrupted sweep
resumes. ``results/perplexity.md`` is rewritten from the JSONL at the end.

    python benchmarks/perplexity.py                 # the issue's full grid
    python benchmarks/perplexity.py --rows const:0.25 dyn:0.25:0.05 --basis layer
    python benchmarks/perplexity.py --rows dyn:0.25:auto       # slicing_base: auto
    python benchmarks/perplexity.py --rows size:0.10:const size:0.10:dyn  # equal size

``size:T:KIND`` rows remove the fraction T of all parameters (``target_params``, shortcuts
included): ``const`` (constant slicing), ``dyn`` (SB = 0.2 x SP, the default) or ``auto``.

Dynamic rows share one Layer Redundancy pass (scores depend only on the model and the
calibration data); its time is measured once and added to every dynamic row's total.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import (
    RESULTS,
    append_jsonl,
    cached_lr_scores,
    calibration_fingerprint,
    peak_rss_mib,
    protocol,
    read_jsonl,
    save_lr_scores,
)
from rounding import add_rounding_argument

JSONL = RESULTS / "perplexity.jsonl"

GRID = (
    ["dense"]
    + [f"const:{sp}" for sp in (0.10, 0.20, 0.25, 0.30)]
    + [
        f"dyn:{sp}:{sb}"
        for sp in (0.10, 0.20, 0.25, 0.30)
        for sb in (0.05, 0.10, 0.15, 0.20)
        if sb < sp
    ]
)


def parse_row(spec: str, args: argparse.Namespace) -> dict:
    parts = spec.split(":")
    row = {
        "spec": spec,
        "basis": args.basis,
        "normalization": args.normalization,
        "untie": args.untie,
        "round_to": args.round_to,
        "n_calib": args.n_calib,
        "n_eval": args.n_eval,
    }
    if args.profitable_only:
        row["profitable_only"] = True
    if args.layers_per_basis > 1:
        row["layers_per_basis"] = args.layers_per_basis
    if parts[0] == "dense":
        row.update(sparsity=0.0, slicing_base=0.0, kind="dense")
    elif parts[0] == "const":
        row.update(sparsity=float(parts[1]), slicing_base=float(parts[1]), kind="constant")
    elif parts[0] == "dyn":
        base = parts[2] if parts[2] == "auto" else float(parts[2])
        row.update(sparsity=float(parts[1]), slicing_base=base, kind="dynamic")
    elif parts[0] == "size" and parts[2] in ("const", "dyn", "auto"):
        # With target_params SB is capped at the solved SP, so 1.0 means constant slicing.
        base = {"const": 1.0, "dyn": None, "auto": "auto"}[parts[2]]
        kind = "constant" if parts[2] == "const" else "dynamic"
        row.update(target_params=float(parts[1]), sparsity=0.0, slicing_base=base, kind=kind)
    else:
        raise SystemExit(
            f"bad row {spec!r}: use dense, const:SP, dyn:SP:SB, dyn:SP:auto or size:T:KIND "
            "(KIND: const, dyn, auto)"
        )
    if row["kind"] == "dynamic" or args.rounding == "spectrum":
        # mean and nearest keep equal widths equal, so constant slicing rounds the same with
        # either; spectrum rounds each layer by its own input's spectrum.
        row["rounding"] = args.rounding
    row["key"] = json.dumps({k: row[k] for k in sorted(row) if k != "spec"}, sort_keys=True)
    return row


def run_row(row: dict) -> dict:
    """Slice (unless dense) and evaluate one row in this process."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import dynslice_modifier  # noqa: F401  registers the modifier and the architecture
    from dynslice_modifier import DynamicSliceModifier
    from dynslice_modifier.evaluation import perplexity
    from dynslice_modifier.slicer import count_parameters

    path, tokenizer, dataset, evaluation = protocol(n_calib=row["n_calib"], n_eval=row["n_eval"])
    dense_params = count_parameters(AutoModelForCausalLM.from_pretrained(path))
    out = dict(row)
    if row["kind"] == "dense":
        model = AutoModelForCausalLM.from_pretrained(path)
        out.update(oneshot_s=0.0, lr_s=0.0, mean_slice=0.0)
    else:
        scores, lr_s = None, 0.0
        fingerprint = calibration_fingerprint(path, dataset)
        cached = cached_lr_scores(fingerprint) if row["kind"] == "dynamic" else None
        if cached is not None:
            scores, lr_s = cached
        if "target_params" in row:
            budget = {"target_params": row["target_params"], "slicing_base": row["slicing_base"]}
        else:
            budget = {"sparsity": row["sparsity"], "slicing_base": row["slicing_base"]}
        modifier = DynamicSliceModifier(
            **budget,
            basis=row["basis"],
            layers_per_basis=row.get("layers_per_basis", 1),
            normalization=row["normalization"],
            untie_embeddings=row["untie"],
            round_to=row["round_to"],
            layer_scores=scores,
            rounding=row.get("rounding", "mean"),
            profitable_only=row.get("profitable_only", False),
        )
        start = time.perf_counter()
        model = oneshot(
            model=str(path),
            processor=tokenizer,
            dataset=dataset,
            recipe=[modifier],
            num_calibration_samples=row["n_calib"],
            max_seq_length=512,
        )
        oneshot_s = time.perf_counter() - start
        if scores is None and modifier.lr_scores is not None:
            lr_s = modifier.summary["lr_seconds"]
            save_lr_scores(modifier.lr_scores, lr_s, fingerprint)
            oneshot_s -= lr_s  # reported in its own column
        spec = model.config.slicing
        out.update(
            sparsity=round(spec["sparsity"], 4),
            slicing_base=round(spec["slicing_base"], 4),
            auto=row.get("slicing_base") == "auto",
            search=spec.get("slicing_base_search"),
            oneshot_s=round(oneshot_s, 1),
            lr_s=round(lr_s, 1) if row["kind"] == "dynamic" else 0.0,
            mean_slice=round(modifier.summary["mean_slice"], 4),
            dims=modifier.summary["dims"],
        )
    out["peak_mib"] = round(peak_rss_mib())
    out["params"] = count_parameters(model)
    out["dense_params"] = dense_params
    out["ppl"] = round(perplexity(model, evaluation), 3)
    return out


def _sb_label(r: dict) -> str:
    return f"auto→{r['slicing_base']:.3f}" if r.get("auto") else f"{r['slicing_base']:.2f}"


def _basis_label(r: dict) -> str:
    shared = r.get("layers_per_basis", 1)
    return r["basis"] if shared == 1 else f"{r['basis']}, {shared} per basis"


def is_plain_constant(row: dict) -> bool:
    """Whether ``row`` is SliceGPT's constant slicing, one width for every layer: the `vs
    const` reference (constant rows record a rounding only when it is spectrum, which gives
    up the single width)."""
    return row["kind"] == "constant" and "rounding" not in row


def sp_table(rows: list[dict]) -> list[str]:
    """Rows by slice percentage SP."""
    const = {
        (r["sparsity"], r["basis"], r["untie"], r["normalization"]): r["ppl"]
        for r in rows
        if is_plain_constant(r)
    }
    columns = ["run", "SP", "SB", "rounding", "basis", "norm.", "untie", "mean slice", "ppl",
               "vs const", "params (M)", "vs dense", "slice s", "+LR s", "peak MiB"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(
        rows,
        key=lambda r: (
            r["kind"] != "dense",
            r["sparsity"],
            -r["slicing_base"],
            r.get("rounding", ""),
            r["basis"],
            r["normalization"],
            r["untie"],
        ),
    ):
        ref = const.get((r["sparsity"], r["basis"], r["untie"], r["normalization"]))
        if ref is None:
            ref = const.get((r["sparsity"], r["basis"], r["untie"], "minmax"))
        vs = f"{r['ppl'] / ref:.3f}" if ref and r["kind"] != "dense" else ""
        lines.append(
            f"| {r['kind']}{', profitable_only' if r.get('profitable_only') else ''} | "
            f"{r['sparsity']:.2f} | {_sb_label(r)} | {r.get('rounding', '-')} | "
            f"{_basis_label(r)} | "
            f"{r['normalization']} | {'yes' if r['untie'] else 'no'} | {r['mean_slice']:.3f} | "
            f"{r['ppl']:.2f} | {vs} | {r['params'] / 1e6:.1f} | "
            f"{r['params'] / r['dense_params']:.3f} | "
            f"{r['oneshot_s']:.0f} | {r['lr_s']:.0f} | {r['peak_mib']} |"
        )
    return lines


def size_table(rows: list[dict]) -> list[str]:
    """Rows by real parameter reduction (``target_params``): equal-size comparison."""
    const = {
        (r["target_params"], r["basis"], r["untie"]): r["ppl"] for r in rows if is_plain_constant(r)
    }
    columns = ["target", "run", "profitable only", "solved SP", "SB", "rounding", "basis",
               "untie", "params (M)", "vs dense", "ppl", "vs const"]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(rows, key=lambda r: (r["target_params"], r["kind"] != "constant")):
        ref = const.get((r["target_params"], r["basis"], r["untie"]))
        vs = f"{r['ppl'] / ref:.3f}" if ref else ""
        lines.append(
            f"| {r['target_params']:.2f} | {r['kind']} | "
            f"{'yes' if r.get('profitable_only') else 'no'} | {r['sparsity']:.4f} | "
            f"{_sb_label(r)} | {r.get('rounding', '-')} | "
            f"{_basis_label(r)} | {'yes' if r['untie'] else 'no'} | {r['params'] / 1e6:.2f} | "
            f"{r['params'] / r['dense_params']:.3f} | {r['ppl']:.2f} | {vs} |"
        )
    return lines


def best_dynamic_by_sp(rows: list[dict]) -> list[dict]:
    """The SP grid's best hand-picked SB per SP: dynamic slicing without profitable_only,
    rounded to the mean slice (mean or spectrum) where an SP has such rows: nearest
    rounding slices less than SP, which would flatter it."""
    best: dict[float, dict] = {}
    for r in rows:
        plain = r["basis"] == "sublayer" and r["normalization"] == "minmax" and not r["untie"]
        hand_picked = not r.get("auto") and not r.get("profitable_only")
        if r["kind"] != "dynamic" or not plain or not hand_picked:
            continue
        rank = (r["rounding"] == "nearest", r["ppl"])
        held = best.get(r["sparsity"])
        if held is None or rank < (held["rounding"] == "nearest", held["ppl"]):
            best[r["sparsity"]] = r
    return list(best.values())


def plot_sizes(rows: list[dict], grid: list[dict], dense: dict | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = "auto SB" if r.get("auto") else r["kind"]
        rule = ", profitable_only" if r.get("profitable_only") else ""
        groups.setdefault(f"{label} ({_basis_label(r)}{rule})", []).append(r)
    for label, group in sorted(groups.items()):
        group.sort(key=lambda r: r["params"])
        ax.plot([r["params"] / 1e6 for r in group], [r["ppl"] for r in group], "o-", label=label)
    if grid:
        grid = sorted(grid, key=lambda r: r["params"])
        ax.plot(
            [r["params"] / 1e6 for r in grid],
            [r["ppl"] for r in grid],
            "s--",
            color="gray",
            label="dynamic, SP grid, best SB (no profitable_only)",
        )
    if dense:
        ax.plot([dense["params"] / 1e6], [dense["ppl"]], "k*", ms=12, label="dense")
        ax.axvline(dense["params"] / 1e6, color="k", lw=0.5, ls=":")
    ax.set_xlabel("parameters (M), shortcuts and tied table included")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("SmolLM2-135M: perplexity at equal size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_tables(rows: list[dict]) -> None:
    by_sp = [r for r in rows if "target_params" not in r]
    by_size = [r for r in rows if "target_params" in r]
    text = (
        "SmolLM2-135M, WikiText-2 protocol (64x512 calibration, 32x1024 evaluation), float32, "
        "2 CPU cores. Produced by `python benchmarks/perplexity.py`. Rounding (dynamic rows): "
        "how widths became multiples of 16, `mean` (this script's default and the slicer's "
        "until `spectrum` was measured: the realised mean slice is SP), `spectrum` "
        "(`--rounding spectrum`, the slicer's default for dynamic widths: the same mean "
        "slice, layers rounded up by the share of their input's signal the step keeps) or "
        "`nearest` (`--rounding nearest`, each width on its own, as before `mean` existed); "
        "constant rows are "
        "rounded by `mean` (equal widths) unless the column says `spectrum`, and `vs const` "
        "compares with the former. `+LR s` is the Layer Redundancy pass, run once and "
        "shared by the dynamic rows; a `spectrum` row's `slice s` includes its own pass over "
        "the unsliced model for the spectra.\n\n" + "\n".join(sp_table(by_sp)) + "\n"
    )
    if by_size:
        text += "\n## Equal size (target_params)\n\n" + "\n".join(size_table(by_size)) + "\n"
        dense = next((r for r in by_sp if r["kind"] == "dense"), None)
        plot_sizes(by_size, best_dynamic_by_sp(by_sp), dense, RESULTS / "perplexity_vs_params.png")
    (RESULTS / "perplexity.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        nargs="*",
        default=GRID,
        help="rows to measure: dense, const:SP, dyn:SP:SB, dyn:SP:auto or size:T:KIND "
        "(KIND const, dyn or auto); default: the issue's grid",
    )
    parser.add_argument("--basis", default="sublayer", choices=["sublayer", "layer"])
    parser.add_argument(
        "--layers-per-basis", type=int, default=1, help="with --basis layer (the slicer's option)"
    )
    parser.add_argument("--normalization", default="minmax", choices=["minmax", "rank"])
    parser.add_argument("--untie", action="store_true")
    parser.add_argument("--round-to", type=int, default=16)
    add_rounding_argument(parser, "the slicer's rounding of widths (dynamic rows)")
    parser.add_argument(
        "--profitable-only",
        action="store_true",
        help="leave layers whole whose slice cannot pay for its shortcuts (off: plain SP rows)",
    )
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        append_jsonl(JSONL, run_row(json.loads(args.worker)))
        return
    done = {r["key"] for r in read_jsonl(JSONL)}
    for spec in args.rows:
        row = parse_row(spec, args)
        if row["key"] in done:
            continue
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(row)], check=True)
    write_tables(read_jsonl(JSONL))


if __name__ == "__main__":
    main()
