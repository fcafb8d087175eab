"""One pretrained model written as three architectures slices to one model.

SmolLM2-135M is a Llama. Its weights, rearranged, are also exactly a Phi-3 (q/k/v and
gate/up fused into one linear each) and a Granite (its four scalars set to values of
Granite 3's kind, the weights divided by them so the function is unchanged). The three
differ only in what their adapters describe: fused linears, and scalars the slicer folds
or leaves to the model. Each is sliced by the same recipe on the shared protocol, and
every perplexity, dense and sliced, must agree with the Llama's up to float32 rounding
(``TOLERANCE``; the script fails otherwise)::

    python benchmarks/architectures.py [--n-calib 64] [--n-eval 32]

Each architecture runs in a process of its own (a fresh llm-compressor session). Results:
``results/architectures.json`` and ``.md``; the sliced checkpoints are kept under
``out/bench/arch-<name>`` for serving.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, protocol
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "bench"
ARCHITECTURES = ("llama", "phi3", "granite")
# Granite 3's kind of values (its 2B model: 12, 0.22, 8); attention keeps 1 / sqrt(64).
GRANITE = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0}
# The rounding its results were recorded with (the default before spectrum).
RECIPE = {"sparsity": 0.25, "slicing_base": 0.05, "rounding": "mean"}
# Largest relative perplexity difference from the Llama that float32 rounding explains.
TOLERANCE = 1e-4


def _shared_fields(llama: PreTrainedModel) -> dict:
    c = llama.config
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_parameters": dict(c.rope_parameters),
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "hidden_act": c.hidden_act,
    }


def _load(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """``state`` into ``model``, every weight named; the head may be left to the tie."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise KeyError(f"rewrite named {unexpected} it should not and missed {missing}")
    return model.eval()


def as_phi3(llama: PreTrainedModel) -> PreTrainedModel:
    """The same function with q/k/v and gate/up fused, as Phi-3 stores them."""
    config = Phi3Config(
        **_shared_fields(llama),
        # No long-context RoPE: Llama's default embedding over the whole head.
        original_max_position_embeddings=llama.config.max_position_embeddings,
        partial_rotary_factor=1.0,
    )
    model = Phi3ForCausalLM(config)
    state = {}
    for name, tensor in llama.state_dict().items():
        if ".self_attn.q_proj." in name:
            prefix = name.split(".q_proj.")[0]
            parts = [llama.state_dict()[f"{prefix}.{p}_proj.weight"] for p in "qkv"]
            state[f"{prefix}.qkv_proj.weight"] = torch.cat(parts)
        elif ".mlp.gate_proj." in name:
            prefix = name.split(".gate_proj.")[0]
            parts = [llama.state_dict()[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up")]
            state[f"{prefix}.gate_up_proj.weight"] = torch.cat(parts)
        elif not any(f".{p}_proj." in name for p in ("k", "v", "up")):
            state[name] = tensor
    return _load(model, state)


def as_granite(llama: PreTrainedModel) -> PreTrainedModel:
    """The same function with Granite's scalars set and the weights divided by them (for a
    tied model: the head is the table, read through the final norm)."""
    if not llama.config.tie_word_embeddings:
        raise ValueError("as_granite rewrites tied models only (SmolLM2 is one)")
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    config = GraniteConfig(**_shared_fields(llama), attention_multiplier=head_dim**-0.5, **GRANITE)
    model = GraniteForCausalLM(config)
    state = dict(llama.state_dict())
    e, r, s = (
        GRANITE[k] for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling")
    )
    # Lookups are multiplied by e; the tied head reads the table through the final norm and
    # has its logits divided by s.
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] / e
    state["model.norm.weight"] = state["model.norm.weight"] * e * s
    for name in state:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = state[name] / r
    state.pop("lm_head.weight", None)
    return _load(model, state)


def run_one(name: str, n_calib: int, n_eval: int) -> dict:
    """Write SmolLM2 as ``name``, score it, slice it and score the sliced model."""
    from llmcompressor import oneshot

    import dynslice_modifier  # noqa: F401  registers the modifier and the architecture
    from dynslice_modifier import DynamicSliceModifier
    from dynslice_modifier.evaluation import perplexity
    from dynslice_modifier.slicer import count_parameters

    path, tokenizer, dataset, evaluation = protocol(n_calib=n_calib, n_eval=n_eval)
    llama = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = {"llama": lambda m: m, "phi3": as_phi3, "granite": as_granite}[name](llama)
    dense = OUT / f"arch-{name}-dense"
    model.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    row = {"architecture": name, "class": type(model).__name__}
    row["dense_ppl"] = perplexity(model, evaluation)
    row["dense_params"] = count_parameters(model)
    del model, llama
    modifier = DynamicSliceModifier(**RECIPE)
    start = time.perf_counter()
    sliced = oneshot(
        model=str(dense),
        dataset=dataset,
        recipe=[modifier],
        num_calibration_samples=n_calib,
        max_seq_length=512,
        output_dir=str(OUT / f"arch-{name}"),
    )
    row["oneshot_s"] = round(time.perf_counter() - start, 1)
    spec = sliced.config.slicing
    row.update(
        format_version=spec["format_version"],
        layout_inputs=spec["layout"]["attn_inputs"] + spec["layout"]["mlp_inputs"],
        lr_scores=modifier.lr_scores,
        dims=modifier.summary["dims"],
        sliced_params=count_parameters(sliced),
        sliced_ppl=perplexity(sliced, evaluation),
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-calib", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--worker", choices=ARCHITECTURES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("ROW " + json.dumps(run_one(args.worker, args.n_calib, args.n_eval)), flush=True)
        return
    rows = []
    for name in ARCHITECTURES:
        cmd = [sys.executable, __file__, "--worker", name]
        cmd += ["--n-calib", str(args.n_calib), "--n-eval", str(args.n_eval)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        rows.append(json.loads(lines[-1].removeprefix("ROW ")))
        print(rows[-1], flush=True)
    reference = rows[0]
    for row in rows:
        row["dense_vs_llama"] = row["dense_ppl"] / reference["dense_ppl"] - 1
        row["sliced_vs_llama"] = row["sliced_ppl"] / reference["sliced_ppl"] - 1
        row["same_dims"] = row["dims"] == reference["dims"]
        row["lr_max_diff"] = max(
            abs(a - b) for a, b in zip(row["lr_scores"], reference["lr_scores"], strict=True)
        )
    out = RESULTS / "architectures"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| architecture | class | linears reading the residual | slicing format | dense "
        "perplexity | vs Llama | sliced perplexity | vs Llama | widths as Llama's | max LR "
        "difference | parameters (sliced) |",
        "|---" * 11 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['architecture']} | {r['class']} | {', '.join(r['layout_inputs'])} | "
            f"{r['format_version']} | {r['dense_ppl']:.4f} | {r['dense_vs_llama']:+.1e} | "
            f"{r['sliced_ppl']:.4f} | {r['sliced_vs_llama']:+.1e} | "
            f"{'yes' if r['same_dims'] else 'no'} | {r['lr_max_diff']:.1e} | "
            f"{r['sliced_params']:,} |"
        )
    out.with_suffix(".md").write_text(
        "SmolLM2-135M written as three architectures with the same function (float32), each "
        f"sliced with `DynamicSliceModifier({', '.join(f'{k}={v}' for k, v in RECIPE.items())})` "
        f"on the shared protocol ({args.n_calib} calibration windows of 512 tokens, "
        f"{args.n_eval} evaluation windows of 1024). Granite: "
        + ", ".join(f"{k} {v}" for k, v in GRANITE.items())
        + ", the weights divided by them. Produced by `python benchmarks/architectures.py"
        + "".join(f" {a}" for a in sys.argv[1:])
        + "`.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    # Rewriting Granite's scalars into the weights and back rounds in float32, no more.
    off = [
        r["architecture"]
        for r in rows
        if max(abs(r["dense_vs_llama"]), abs(r["sliced_vs_llama"])) > TOLERANCE
        or not r["same_dims"]
    ]
    if off:
        sys.exit(f"{off} did not slice to the Llama's model (results written anyway)")


if __name__ == "__main__":
    main()
