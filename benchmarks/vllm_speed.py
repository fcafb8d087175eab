"""Decode speed of dense and sliced SmolLM2 checkpoints in vLLM (CPU build here).

Run with the serving environment (it needs vLLM, not llm-compressor), after
``benchmarks/quantized.py`` (and, for the "SmolLM2 as ..." rows,
``benchmarks/architectures.py``) has written the checkpoints under ``out/bench``::

    .venv-serve/bin/python benchmarks/vllm_speed.py

For every model: start an engine, warm up, then time greedy generation of 128 new tokens
at batch 1 and batch 16 (``--repeats`` times each, the median kept); models alternate and
the whole sweep repeats ``--rounds`` times, so machine noise hits all models alike. Two
speeds per batch size: *generation* (new tokens over the whole ``generate`` call, prompt
included) and *decode* (the tokens after the first over the time after it: each timed
generation is paired with one of a single token, whose time, the prompt's prefill, is
taken off). They differ where the prefill is a large share, as at batch 16 on a CPU (16
prompts of 32 tokens in one compute-bound step), and the issue's goal is about decode. Each
measurement runs in a process of its own, so one engine's failure or leftovers cannot
touch the next. Results: ``results/vllm_speed.jsonl`` (one line per measurement, written as
it completes) and ``results/vllm_speed.md``.

On a GPU, run it where vLLM's CUDA build and the plugin are installed, with
``--engine-args`` for the engine settings (benchmarks/README.md, "Decode speed in vLLM on a
GPU"); the table names the GPU and vLLM's version from the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from digests import checkpoint_digest
from rounding import add_rounding_argument, rounded_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCH = ROOT / "out" / "bench"
SMOLLM2 = Path(os.environ.get("DYNSLICE_CACHE", Path.home() / ".cache" / "dynslice"))
MODELS = {
    "dense bf16": (SMOLLM2 / "SmolLM2-135M-Instruct", "bfloat16"),
    # On a CPU without AVX-512, bfloat16 is emulated and float32 is the fast float dtype
    # (serving/cpu_kernels.py), so the float32 rows are the baselines a user there would
    # compare with.
    "dense float32": (SMOLLM2 / "SmolLM2-135M-Instruct", "float32"),
    "dense W8A8": (BENCH / "dense-w8a8", "bfloat16"),
    "dense W8A8, float32 activations": (BENCH / "dense-w8a8", "float32"),
    "dense W4A16 (g64)": (BENCH / "dense-w4a16-g64", "bfloat16"),
    # Sliced = benchmarks/quantized.py's aligned checkpoints, today's defaults; --hadamard
    # takes its Hadamard variants instead (same shapes), which the earlier results measured.
    "sliced bf16": (BENCH / "sliced-aligned-none", "bfloat16"),
    "sliced float32": (BENCH / "sliced-aligned-none", "float32"),
    "sliced W8A8, shortcuts bf16": (BENCH / "sliced-aligned-w8a8", "bfloat16"),
    "sliced W8A8, shortcuts int8": (BENCH / "sliced-aligned-w8a8-qs", "bfloat16"),
    "sliced W8A8, shortcuts + head int8": (
        BENCH / "sliced-aligned-w8a8-qs-head",
        "bfloat16",
    ),
    "sliced W8A8, shortcuts + sliced head int8": (
        BENCH / "sliced-aligned-sliced-head-w8a8-qs-head",
        "bfloat16",
    ),
    "sliced W8A8 (one basis per layer), shortcuts + head int8": (
        BENCH / "sliced-aligned-layer-w8a8-qs-head",
        "bfloat16",
    ),
    "sliced W8A8 (one basis per layer), shortcuts + sliced head int8": (
        BENCH / "sliced-aligned-layer-sliced-head-w8a8-qs-head",
        "bfloat16",
    ),
    # The same with layers_per_basis: 2 (pairs of layers of one width share a basis).
    "sliced W8A8 (a basis per two layers), shortcuts + sliced head int8": (
        BENCH / "sliced-aligned-layer-pairs-sliced-head-w8a8-qs-head",
        "bfloat16",
    ),
    # The same sliced deeper (SP 0.30, 0.35): how much more slicing the speed goal takes.
    **{
        f"sliced W8A8 at SP 0.{sp} (one basis per layer), shortcuts + sliced head int8": (
            BENCH / f"sliced-aligned-layer-sliced-head-sp{sp}-w8a8-qs-head",
            "bfloat16",
        )
        for sp in (30, 35)
    },
    "sliced W8A8 (one basis per layer), shortcuts + sliced head int8, float32 activations": (
        BENCH / "sliced-aligned-layer-sliced-head-w8a8-qs-head",
        "float32",
    ),
    "sliced W4A16 (g64), shortcuts bf16": (
        BENCH / "sliced-aligned-w4a16-g64",
        "bfloat16",
    ),
    # recipes/slice_w4a16.yaml at groups of 64: MSE scales, int8 shortcuts (W8A8).
    "sliced W4A16 (g64), shortcuts int8": (
        BENCH / "sliced-aligned-w4a16-g64-mse-qs8",
        "bfloat16",
    ),
    "sliced W4A16 (g64), shortcuts 4-bit": (
        BENCH / "sliced-aligned-w4a16-g64-qs",
        "bfloat16",
    ),
    # benchmarks/architectures.py: SmolLM2 written as each architecture, sliced alike.
    **{
        f"SmolLM2 as {label}, sliced, float32": (BENCH / f"arch-{name}", "float32")
        for name, label in (("llama", "Llama"), ("phi3", "Phi-3"), ("granite", "Granite"))
    },
}


ROUNDING_HELP = "which sliced checkpoints of benchmarks/quantized.py (its --rounding)"


def checkpoint(name: str, rounding: str, hadamard: bool = False) -> tuple[Path, str]:
    """Path and dtype of MODELS[name]; ``benchmarks/quantized.py`` writes its Hadamard
    variants as ``sliced-hadamard-...`` and its ``--rounding nearest`` checkpoints with a
    ``-nearest`` suffix, beside the default ones."""
    path, dtype = MODELS[name]
    if path.parent == BENCH and path.name.startswith("sliced-"):
        name_ = path.name.replace("sliced-", "sliced-hadamard-", 1) if hadamard else path.name
        path = path.with_name(rounded_name(name_, rounding))
    return path, dtype


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """Which of benchmarks/quantized.py's sliced checkpoints a run measures, and the hidden
    ``--worker`` through which worker_command hands one model to a process of its own."""
    add_rounding_argument(parser, ROUNDING_HELP)
    parser.add_argument(
        "--hadamard",
        action="store_true",
        help="the checkpoints sliced with Hadamard rotations (the earlier results' models)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def add_models_argument(parser: argparse.ArgumentParser, default: list[str]) -> None:
    """``--models``: names in MODELS, checked when the command line is read (a wrong name
    would otherwise fail only inside a worker)."""
    parser.add_argument(
        "--models",
        nargs="*",
        default=default,
        choices=list(MODELS),
        metavar="NAME",
        help=f"names in vllm_speed's MODELS: {', '.join(MODELS)}",
    )


def checkpoint_flags(args: argparse.Namespace) -> list[str]:
    """The options of add_checkpoint_arguments, for a worker's command line."""
    return ["--rounding", args.rounding, *(["--hadamard"] if args.hadamard else [])]


def worker_command(script: str, name: str, args: argparse.Namespace) -> list[str] | None:
    """The command that measures MODELS[name] with ``script`` in a process of its own, or
    None (said on stdout) when the benchmark that writes the checkpoint has not run."""
    path, _ = checkpoint(name, args.rounding, args.hadamard)
    if not (path / "config.json").exists():
        writer = "architectures" if path.name.startswith("arch-") else "quantized"
        print(f"skip {name}: {path} missing (run benchmarks/{writer}.py first)")
        return None
    return [sys.executable, script, "--worker", name, *checkpoint_flags(args)]


def start_engine(
    path: Path, dtype: str, max_model_len: int = 512, max_num_seqs: int = 16, **extra: Any
) -> Any:
    """A vLLM engine with the settings every benchmark here measures under."""
    from vllm import LLM

    return LLM(
        model=str(path),
        dtype=dtype,
        max_model_len=max_model_len,
        gpu_memory_utilization=0.3,
        max_num_seqs=max_num_seqs,
        seed=0,
        **extra,
    )


def token_prompts(n: int) -> list[Any]:
    """``n`` fixed 32-token prompts (token ids, so no tokenizer differences)."""
    from vllm.inputs import TokensPrompt

    return [
        TokensPrompt(prompt_token_ids=[(7 * i + j) % 4000 + 100 for j in range(32)])
        for i in range(n)
    ]


def report_row(row: dict) -> None:
    """A worker's result, in the line ``worker_row`` reads back."""
    print("ROW " + json.dumps(row), flush=True)


def worker_row(cmd: list[str], label: str) -> dict | None:
    """Run one measurement in a process of its own; its ``ROW`` line, or None on failure
    (after printing the tail of its stderr)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not found:
        print(f"{label}: failed (exit {proc.returncode})")
        print(proc.stderr[-2000:])
        return None
    return json.loads(found[-1][4:])


def measure(
    path: Path, dtype: str, new_tokens: int, repeats: int, engine_args: dict[str, Any]
) -> dict:
    # apply_model pickles count_fused_shortcuts to send it to the engine core process.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import SamplingParams

    from dynslice_modifier.serving.vllm_dynslice import count_fused_shortcuts

    llm = start_engine(path, dtype, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prompts = token_prompts(16)
    # Warm-up on both timed batch shapes: a shape's first run pays one-off costs (oneDNN
    # kernel selection), which would otherwise land in the first timed prefill.
    for batch in (1, 16):
        llm.generate(prompts[:batch], SamplingParams(temperature=0.0, max_tokens=4))
    first_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    out = {}
    for batch in (1, 16):
        # The median of several timed generations in one engine: a single one is at the
        # mercy of whatever else the machine does in those seconds. Each is paired with a
        # one-token generation just before it, so the decode speed takes off a prefill
        # timed under the same conditions.
        speeds, decode = [], []
        for _ in range(repeats):
            prefill = timed(llm.generate, prompts[:batch], first_token)
            whole = timed(llm.generate, prompts[:batch], params)
            speeds.append(batch * new_tokens / whole)
            decode.append(decode_speed(batch, new_tokens, prefill, whole))
        out[f"b{batch}_tok_s"] = statistics.median(speeds)
        out[f"b{batch}_each"] = [round(s, 2) for s in speeds]
        out[f"b{batch}_decode_tok_s"] = statistics.median(decode)
        out[f"b{batch}_decode_each"] = [round(s, 2) for s in decode]
    out["fused_shortcuts"] = llm.apply_model(count_fused_shortcuts)[0]
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if callable(getattr(engine_core, "shutdown", None)):
        engine_core.shutdown()
    del llm
    gc.collect()
    return out


def timed(call: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def decode_speed(batch: int, new_tokens: int, prefill_s: float, whole_s: float) -> float:
    """Tokens/s after the first: the ``new_tokens - 1`` decode steps of ``batch`` sequences
    took the whole generation's time less that of a one-token generation (the prefill)."""
    if new_tokens < 2 or whole_s <= prefill_s:
        raise ValueError(
            f"no decode time: {new_tokens} new tokens in {whole_s:.3f} s against a prefill of "
            f"{prefill_s:.3f} s (ask for at least 2 new tokens)"
        )
    return batch * (new_tokens - 1) / (whole_s - prefill_s)


def weights_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def recorded_mib(rows: list[dict], name: str) -> float | None:
    """The size a run recorded for ``name`` (runs before the rows carried it: None)."""
    return next((r["weights_mib"] for r in rows if r["model"] == name and "weights_mib" in r), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed generations per batch size per engine"
    )
    add_models_argument(parser, list(MODELS))
    parser.add_argument(
        "--baselines",
        nargs="+",
        default=["dense bf16"],
        choices=list(MODELS),
        metavar="NAME",
        help="the models the ratios are taken against, each in columns of its own "
        "(default: dense bf16, the issue's)",
    )
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="measure nothing: write results/<out>.md again from results/<out>.jsonl "
        "(e.g. against other --baselines)",
    )
    parser.add_argument(
        "--out", default="vllm_speed", help="results/<out>.jsonl and .md (for a run of a subset)"
    )
    parser.add_argument(
        "--engine-args",
        type=engine_args,
        default={},
        metavar="JSON",
        help="more keyword arguments of vllm.LLM for every engine, as a JSON object (e.g. "
        '\'{"compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}}\' '
        "on a GPU: CUDA graphs without torch.compile, whose start-up per sliced model, every "
        "layer a shape of its own, would outlast the measurement)",
    )
    parser.add_argument(
        "--all-cores",
        action="store_true",
        help="bind the model's threads to every core (vLLM on CPU keeps one for its engine "
        "process by default)",
    )
    add_checkpoint_arguments(parser)
    args = parser.parse_args()
    if not args.worker and not args.tables_only:
        missing = [name for name in args.baselines if name not in args.models]
        if missing:
            parser.error(f"--baselines {missing} are not among --models")
    if args.repeats < 1 or args.rounds < 1:
        parser.error(
            f"--repeats and --rounds must be at least 1 (got {args.repeats} and {args.rounds})"
        )
    if args.new_tokens < 2:
        parser.error(
            f"--new-tokens must be at least 2, so that some tokens are decoded after the "
            f"first (got {args.new_tokens})"
        )
    if args.all_cores:
        # The engine's scheduler then shares the cores with the model's threads.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if args.worker:
        path, dtype = checkpoint(args.worker, args.rounding, args.hadamard)
        report_row(measure(path, dtype, args.new_tokens, args.repeats, args.engine_args))
        return
    jsonl = RESULTS / f"{args.out}.jsonl"
    if args.tables_only:
        text = jsonl.read_text() if jsonl.exists() else ""
        rows = [json.loads(line) for line in text.splitlines() if line]
        if not rows:
            parser.error(
                f"--tables-only reads the measurements of an earlier run, and {jsonl} has "
                "none: run without --tables-only first (with the same --out)"
            )
        write_table(rows, args)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    jsonl.write_text("")
    rows = []
    # Facts of the machine, the same for every row of the run.
    machine = {"cpu": cpu_description(), **serving_stack()}
    # Each checkpoint's digest, taken once it is known to exist (a missing one is skipped).
    builds: dict[str, str] = {}
    for round_ in range(args.rounds):
        # Reversed every other round (ABBA), so that no model always runs first.
        for name in args.models if round_ % 2 == 0 else args.models[::-1]:
            cmd = worker_command(__file__, name, args)
            if cmd is None:
                continue
            cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
            cmd += ["--engine-args", json.dumps(args.engine_args)]
            result = worker_row(cmd, f"{name}, round {round_}")
            if result is None:
                continue
            path = checkpoint(name, args.rounding, args.hadamard)[0]
            if name not in builds:
                builds[name] = checkpoint_digest(path)
            row = {
                "model": name,
                "round": round_,
                # As measured: a checkpoint rebuilt later has another size and digest.
                "weights_mib": round(weights_mib(path), 1),
                "checkpoint_sha256": builds[name],
                "rounding": args.rounding,
                "hadamard": args.hadamard,
                "all_cores": args.all_cores,
                "new_tokens": args.new_tokens,
                "engine_args": args.engine_args,
                **machine,
            }
            row |= result
            print(json.dumps(row), flush=True)
            rows.append(row)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
    if not rows:
        raise SystemExit(f"no model was measured (see above); {jsonl} holds no rows")
    write_table(rows, args)


# The speeds a row can hold: the key suffix and how the tables name it. Rows from before
# decode was measured hold generation only.
METRICS = {"generation": ("tok_s", ""), "decode": ("decode_tok_s", "decode ")}


def measured_metrics(rows: list[dict]) -> list[str]:
    """The speeds every row of ``rows`` holds."""
    return [m for m, (key, _) in METRICS.items() if all(f"b1_{key}" in r for r in rows)]


def paired_ratios(
    rows: list[dict], name: str, baseline: str, batch: int, metric: str = "generation"
) -> list[float]:
    """``name``'s tokens/s at ``batch`` over ``baseline``'s in the same round, round by round:
    the two ran minutes apart, so these ratios carry less of the machine's drift than the
    ratio of two medians."""
    key = f"b{batch}_{METRICS[metric][0]}"
    base = {r["round"]: r[key] for r in rows if r["model"] == baseline}
    return [r[key] / base[r["round"]] for r in rows if r["model"] == name and r["round"] in base]


def round_ratios(
    rows: list[dict], baseline: str = "dense bf16", metric: str = "generation"
) -> list[str]:
    """A line per model with its round-by-round ratios against ``baseline`` (paired_ratios)."""
    lines = []
    label = METRICS[metric][1]
    for name in MODELS:
        if name == baseline or not paired_ratios(rows, name, baseline, 1, metric):
            continue
        parts = []
        for b in (1, 16):
            ratios = paired_ratios(rows, name, baseline, b, metric)
            each = ", ".join(f"{x:.2f}" for x in ratios)
            parts.append(f"batch {b}: {each} (median {statistics.median(ratios):.2f}x)")
        lines.append(f"- {name}, {label}round by round against {baseline}: " + "; ".join(parts))
    return ["", *lines] if lines else []


def engine_args(text: str) -> dict[str, Any]:
    """``--engine-args``: a JSON object, whose keys become vllm.LLM's keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        value = err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"--engine-args takes a JSON object of vllm.LLM keyword arguments, e.g. "
            f"'{{\"enforce_eager\": true}}'; got {text!r}"
        )
    return value


def serving_stack() -> dict[str, str]:
    """vLLM's version and, where vLLM runs on one, the GPU: this script measures vllm-cpu
    here and vLLM's CUDA build where a GPU was lent, and the table says which."""
    import torch
    import vllm

    stack = {"vllm": vllm.__version__}
    if torch.cuda.is_available():
        stack["gpu"] = torch.cuda.get_device_name(0)
    return stack


def cpu_description(cpuinfo: str | None = None) -> str:
    """This machine's cores, CPU model and the vector extensions vLLM's CPU kernels use
    (from ``cpuinfo``, the text of /proc/cpuinfo): sessions have run on different machines,
    and the bf16 and int8 GEMMs, so every ratio, depend on them."""
    if cpuinfo is None:
        proc = Path("/proc/cpuinfo")
        cpuinfo = proc.read_text() if proc.exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    present = set(flags.group(1).split()) if flags else set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    extensions = ", ".join(f for f in wanted if f in present) or "none of " + "/".join(wanted)
    name = model.group(1).strip() if model else "unknown CPU"
    return f"{os.cpu_count()} CPU cores ({name}; {extensions})"


def speed_table(
    rows: list[dict], baselines: list[str], weights_mib_of: Callable[[str], float]
) -> list[str]:
    """The markdown table of ``rows`` (medians over rounds, ratios against each baseline that
    was measured), for each speed the rows hold, and the round-by-round ratios under it."""
    metrics = measured_metrics(rows)
    names = [name for name in MODELS if any(r["model"] == name for r in rows)]
    medians = {
        (name, metric, b): statistics.median(
            r[f"b{b}_{METRICS[metric][0]}"] for r in rows if r["model"] == name
        )
        for name in names
        for metric in metrics
        for b in (1, 16)
    }
    bases = [name for name in baselines if name in names]
    columns = []
    for metric in metrics:
        label = METRICS[metric][1]
        columns += [f"batch {b} {label}tok/s" for b in (1, 16)]
        columns += [f"batch {b} {label}vs {base}" for base in bases for b in (1, 16)]
    lines = [
        "| model | weights MiB | fused shortcuts | runs | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for name in names:
        runs = sum(r["model"] == name for r in rows)
        mib = weights_mib_of(name)
        fused = next(r["fused_shortcuts"] for r in rows if r["model"] == name)
        cells = []
        for metric in metrics:
            cells += [f"{medians[name, metric, b]:.1f}" for b in (1, 16)]
            cells += [
                f"{medians[name, metric, b] / medians[base, metric, b]:.2f}x"
                for base in bases
                for b in (1, 16)
            ]
        shown = fused if name.startswith("sliced") else "-"
        lines.append(f"| {name} | {mib:.1f} | {shown} | {runs} | " + " | ".join(cells) + " |")
    for metric in metrics:
        for base in bases:
            lines += round_ratios(rows, base, metric)
    if "decode" in metrics:
        lines += ["", *prefill_lines(rows, names)]
    return lines


def prefill_seconds(row: dict, batch: int, new_tokens: int) -> float:
    """The median over a row's timed generations at ``batch`` of the prompts' prefill: the
    whole generation's time less its decode time (both from the row's speeds)."""
    wholes = [batch * new_tokens / s for s in row[f"b{batch}_each"]]
    decodes = [batch * (new_tokens - 1) / s for s in row[f"b{batch}_decode_each"]]
    return statistics.median(w - d for w, d in zip(wholes, decodes, strict=True))


def prefill_lines(rows: list[dict], names: list[str]) -> list[str]:
    """A line per model with its prefill and whole-generation seconds at batch 16, the
    medians over rounds: what separates generation speed from decode speed."""
    lines = []
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        prefill = statistics.median(prefill_seconds(r, 16, r["new_tokens"]) for r in mine)
        whole = statistics.median(16 * r["new_tokens"] / r["b16_tok_s"] for r in mine)
        lines.append(
            f"- {name}, batch 16: prefill {prefill:.3f} s of a {whole:.3f} s generation "
            "(medians over rounds)"
        )
    return lines


def machine_sentence(run: dict) -> str:
    """Where ``run`` (a row) was measured: vllm-cpu on this machine's cores, or vLLM's CUDA
    build on a GPU; and the engine arguments it was given."""
    if "gpu" in run:
        machine = f"vLLM {run['vllm']} on one {run['gpu']} (host: {run['cpu']})"
    else:
        cores = (
            "the model's threads on both (--all-cores)"
            if run["all_cores"]
            else "the model on one, vLLM's engine on the other (its default)"
        )
        # Rows from before the version was recorded are vllm-cpu 0.32's.
        version = run.get("vllm", "0.32")
        machine = f"vllm-cpu {version} on {run.get('cpu', cpu_description())}, {cores}"
    if run.get("engine_args"):
        machine += f"; engine arguments {json.dumps(run['engine_args'])}"
    return machine


def rounds_phrase(rows: list[dict]) -> str:
    """How many alternating rounds the medians are over, saying so when a run was cut short
    and some models have fewer than others."""
    rounds = len({r["round"] for r in rows})
    phrase = f"{rounds} alternating round{'s' if rounds > 1 else ''}"
    runs = {sum(r["model"] == name for r in rows) for name in {r["model"] for r in rows}}
    if len(runs) > 1:
        phrase = f"up to {phrase} (the run stopped early: the runs column gives each model's)"
    return phrase


def speeds_sentence(rows: list[dict]) -> str:
    """What the tok/s columns time, as the rows measured it."""
    if "decode" not in measured_metrics(rows):
        return "tok/s: new tokens over the whole generation, the prompt's prefill included."
    return (
        "tok/s: new tokens over the whole generation, the prompt's prefill included; decode "
        "tok/s: the tokens after the first over the generation's time less that of a "
        "one-token generation (the prefill) timed just before it."
    )


def write_table(rows: list[dict], args: argparse.Namespace) -> None:
    # The run's settings come from its rows, so that --tables-only describes the
    # measurements it reads rather than its own command line.
    run = rows[0]
    rounding, hadamard = run["rounding"], run["hadamard"]
    repeats = max(len(r["b1_each"]) for r in rows)
    lines = speed_table(
        rows,
        args.baselines,
        lambda name: (
            recorded_mib(rows, name) or weights_mib(checkpoint(name, rounding, hadamard)[0])
        ),
    )
    command = f"`.venv-serve/bin/python benchmarks/vllm_speed.py {shlex.join(sys.argv[1:])}`"
    if args.tables_only:
        command += f" from the measurements in results/{args.out}.jsonl"
    (RESULTS / f"{args.out}.md").write_text(
        f"{machine_sentence(run)}; greedy, "
        f"{run.get('new_tokens', args.new_tokens)} new tokens after a 32-token prompt, "
        f"bfloat16 activations unless the name says float32; medians of {rounds_phrase(rows)}, "
        f"each the median of {repeats} timed generations in "
        f"one engine. {speeds_sentence(rows)} Weights MiB: the checkpoint's safetensors on "
        "disk (dense bf16 is the packaged float32 file, served as bfloat16, as sliced bf16 "
        "is). Sliced: SP 0.25, "
        f"SB 0.05, {'Hadamard, ' if hadamard else ''}aligned bases, {rounding} rounding of "
        "widths (benchmarks/quantized.py); vLLM runs each shortcut in one GEMM with the "
        "projection that reads the same residual (all of them in the bf16 and "
        "quantized-shortcut rows, none where shortcuts stay bf16 beside quantized linears; "
        "the fused shortcuts column counts them in the running engine). Produced by "
        f"{command}.\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
