"""The shipped recipes run as users run them, on whatever device llm-compressor picks.

One ``oneshot`` per file in ``recipes/`` on SmolLM2-135M with the shared protocol (64 x 512
calibration tokens), each in a process of its own: on a machine with a GPU, llm-compressor
onloads one decoder layer at a time to it, so this is the slicer's accelerator path end to
end. Each checkpoint is then reloaded on the same device and its perplexity taken in
float32 (32 x 1024 evaluation windows, as ``results/quantized.md``). Recorded per recipe:
seconds of the ``oneshot``, peak accelerator memory during it (torch's allocator), peak host
memory of the process, weights on disk and perplexity; a run on two devices checks that the
accelerator path makes the same model as the CPU path. A recipe the slicer refuses for this
model (a group size its widths do not take) is recorded with the refusal and the seconds it
took to come.

``--decode`` also times greedy decoding in transformers (not vLLM), 128 new tokens after a
32-token prompt at batch 1 and 16, bfloat16, for the dense model and every recipe without a
quantizer (transformers runs compressed-tensors checkpoints through decompression, so their
speed there says nothing about serving): the median of 3 generations after a warm-up, one
model after the other, not alternating.

    python benchmarks/shipped_recipes.py [--out recipes_cpu] [--decode] [--recipes FILE ...]

Results: ``OUT.jsonl`` (a line per recipe as it completes) and ``OUT.md``; a bare name goes
under ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, append_jsonl, peak_rss_mib, read_jsonl
from vllm_speed import cpu_description

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "out" / "recipes"
DECODE_TOKENS, PROMPT_TOKENS, BATCHES, REPEATS = 128, 32, (1, 16), 3


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_description()


def run_recipe(recipe: str, decode: bool) -> dict:
    """``oneshot`` with ``recipe`` (or none: the dense model), reload, perplexity; with
    ``decode``, decode speed of the reloaded model too unless it is quantized."""
    import torch
    from common import protocol
    from llmcompressor import oneshot
    from llmcompressor.utils.dev import get_main_device
    from transformers import AutoModelForCausalLM

    import dynslice_modifier  # noqa: F401  registers DynamicSliceModifier for YAML recipes
    from dynslice_modifier.allocation import mean_slice
    from dynslice_modifier.errors import DynSliceError
    from dynslice_modifier.evaluation import perplexity

    path, tokenizer, dataset, evaluation = protocol()
    device = get_main_device()
    row = {"recipe": recipe, "device": device_name(), "torch": torch.__version__}
    seconds = accelerator_mib = None
    out = path
    if recipe != "dense":
        out = WORK / Path(recipe).stem
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            oneshot(
                model=str(path),
                processor=tokenizer,
                dataset=dataset,
                recipe=str(ROOT / recipe),
                num_calibration_samples=len(dataset),
                max_seq_length=len(dataset[0]["input_ids"]),
                output_dir=str(out),
            )
        except DynSliceError as err:
            # A recipe written for other models (groups this one's widths do not take):
            # the slicer's refusal, and how soon it came, are the result.
            return dict(row, refused=str(err), oneshot_s=round(time.perf_counter() - start, 1))
        seconds = round(time.perf_counter() - start, 1)
        if device.type == "cuda":
            accelerator_mib = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    host_mib = round(peak_rss_mib(), 1)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device)
    spec = getattr(model.config, "slicing", None)
    quantized = hasattr(model.config, "quantization_config")
    row = {
        **row,
        "oneshot_s": seconds,
        "peak_accelerator_mib": accelerator_mib,
        "peak_host_mib": host_mib,
        "mib": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20, 1),
        "mean_slice": round(mean_slice(spec["mlp_dims"], model.config.hidden_size), 4)
        if spec
        else 0.0,
        "ppl": round(perplexity(model, evaluation), 3),
        "quantized": quantized,
        "path": str(out),
    }
    if decode and not quantized:
        # The float32 checkpoint cast in place is what a bfloat16 load would give.
        row.update(decode_speed(model.to(torch.bfloat16)))
    return row


def tokens_per_second(model, ids) -> float:
    """One greedy generation of DECODE_TOKENS new tokens for every row of ``ids``."""
    import torch

    sync = torch.cuda.synchronize if ids.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=DECODE_TOKENS,
        min_new_tokens=DECODE_TOKENS,
        pad_token_id=0,
    )
    sync()
    return ids.shape[0] * DECODE_TOKENS / (time.perf_counter() - start)


def decode_speed(model) -> dict:
    """Median tokens/s of ``model``'s greedy generation at each batch size."""
    import torch

    speeds = {}
    for batch in BATCHES:
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS)).to(model.device)
        tokens_per_second(model, ids)  # warm-up: kernels chosen, caches allocated
        runs = [tokens_per_second(model, ids) for _ in range(REPEATS)]
        speeds[f"batch_{batch}_tok_s"] = round(statistics.median(runs), 1)
    return speeds


def write_table(rows: list[dict], md: Path, command: str) -> None:
    decode = any("batch_1_tok_s" in r for r in rows)
    head = (
        "| recipe | oneshot s | peak accelerator MiB | peak host MiB | weights MiB "
        "| mean slice | perplexity |"
    )
    lines = [
        head + (" transformers bf16 tok/s, batch 1 / 16 |" if decode else ""),
        "|---" * (head.count("|") - 1 + decode) + "|",
    ]
    for r in rows:
        if "refused" in r:
            refusal = r["refused"].split(":")[0]
            lines.append(f"| {r['recipe']} | refused after {r['oneshot_s']:.0f} s: {refusal} |")
            continue
        cells = [
            r["recipe"],
            "-" if r["oneshot_s"] is None else f"{r['oneshot_s']:.0f}",
            "-" if r["peak_accelerator_mib"] is None else f"{r['peak_accelerator_mib']:.0f}",
            f"{r['peak_host_mib']:.0f}",
            f"{r['mib']}",
            f"{r['mean_slice']:.3f}",
            f"{r['ppl']:.2f}",
        ]
        if decode:
            cells.append(
                f"{r['batch_1_tok_s']} / {r['batch_16_tok_s']}" if "batch_1_tok_s" in r else "-"
            )
        lines.append("| " + " | ".join(cells) + " |")
    devices = sorted({r["device"] for r in rows})
    md.write_text(
        f"SmolLM2-135M on {', '.join(devices)} (torch {rows[0]['torch']}): each shipped recipe "
        "in one `oneshot` (64 x 512 calibration tokens), the checkpoint reloaded on the same "
        "device, perplexity in float32 on 32 x 1024 WikiText-2 tokens. Peak accelerator "
        "memory: torch's allocator during the `oneshot`; peak host memory: the process's "
        f"resident peak. Produced by `{command}`.\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.yaml")),
        help="recipe files, relative to the repository (default: every file in recipes/)",
    )
    parser.add_argument("--out", default="recipes_cpu", help="results stem (name or path)")
    parser.add_argument("--decode", action="store_true", help="also time transformers decoding")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task = json.loads(args.worker)
        append_jsonl(Path(task["jsonl"]), run_recipe(task["recipe"], task["decode"]))
        return
    stem = Path(args.out) if "/" in args.out else RESULTS / args.out
    jsonl, md = stem.with_suffix(".jsonl"), stem.with_suffix(".md")
    jsonl.unlink(missing_ok=True)
    command = " ".join(["python benchmarks/shipped_recipes.py", *sys.argv[1:]])
    failed = []
    for recipe in ["dense", *args.recipes]:
        task = {"recipe": recipe, "decode": args.decode, "jsonl": str(jsonl)}
        # One recipe's failure is reported, and the others still run.
        if subprocess.run([sys.executable, __file__, "--worker", json.dumps(task)]).returncode:
            failed.append(recipe)
        if jsonl.exists():
            write_table(read_jsonl(jsonl), md, command)
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their errors are above)")


if __name__ == "__main__":
    main()
