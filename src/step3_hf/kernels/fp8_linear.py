"""Block-FP8 linears on the GPU: the attention projections and the dense and shared MLPs of an FP8 Step-3.

transformers' `FP8Linear` (which replaces those `nn.Linear`s when a block-FP8 checkpoint loads on a GPU of compute
capability 8.9 or higher) computes through the `kernels-community/finegrained-fp8` hub kernel or DeepGEMM, which need
the `kernels` package and a download. `fp8_block_linear` computes the same product without them:

- decode-sized inputs (up to `MAX_DECODE_LINEAR_ROWS` rows, narrow linears up to `MAX_NARROW_LINEAR_ROWS`; inference,
  CUDA or the Triton interpreter): the Triton
  weight-streaming kernel `fp8_decode_linear`, which reads the float8 weight once; by default
  (`DECODE_ACTIVATIONS_FP8`) it rounds the activations to float8 per token and 128 columns in one launch and
  multiplies on float8 tensor cores, else it widens the weight to the bf16 activations (weight-only FP8);
- larger inputs on Hopper and later: cuBLAS's block-scaled FP8 GEMM (`torch.nn.functional.scaled_mm`, activations
  quantized per token and 128 columns in one launch by `quantize_fp8_activations`, the weight's 128 x 128 scales as
  they are), FP8 tensor cores for prefill;
- where neither applies (other block sizes, unaligned widths, older GPUs, CPU), the weight dequantized for the call
  (weight-only FP8), said once in the log.
`use_fp8_kernels(model)` points a loaded model's `FP8Linear`s at it (`Step3FP8Linear`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.utils import logging

from ..fp8 import dequantize_block_fp8
from .fp8_activation_quant import GROUP_SIZE, quantize_fp8_activations, quantize_fp8_activations_eager
from .fp8_decode_linear import float8_activations_supported, fp8_decode_linear, launch_block_k
from .triton_support import float8_kernel_available, kernel_available, sm_count

__all__ = [
    "MAX_DECODE_LINEAR_ROWS",
    "Step3FP8Linear",
    "decode_kernel_applies",
    "fp8_block_linear",
    "fp8_linear_path",
    "scaled_mm_supported",
    "use_fp8_kernels",
]

logger = logging.get_logger(__name__)

# cuBLAS's block-scaled FP8 GEMM: 1 x 128 activation groups, 128 x 128 weight tiles.
CUBLAS_BLOCK = GROUP_SIZE
# Rows up to which `fp8_decode_linear` computes; above it cuBLAS's FP8 tensor-core GEMM is faster (H100 sweep of
# Step-3's linears, docs/step3.md: at 256 rows cuBLAS won every large shape).
MAX_DECODE_LINEAR_ROWS = 64
# Above that, up to this many rows, a narrow linear still takes `fp8_decode_linear`: cuBLAS's block-scaled GEMM computes
# 128 x 128 output tiles, and the k and v projections (256 x 7168) give it 4 at 256 rows, for 132 SMs on an H100.
# There, at 256 rows, cuBLAS took 55.3 µs per projection and the kernel (weight-only, with the launch that is now its
# default) 14.8 µs (2026-12-06, docs/results/h100_2026-12-06c/kernel_breakdown_fp8_v2_sweep.log; cuBLAS's activations
# were then quantized in eager torch, since in one launch) ...
MAX_NARROW_LINEAR_ROWS = 256
# ... narrow meaning: fewer output tiles than this share of the SMs (8.25 on an H100: the k and v projections). The q
# projection (32 tiles at 256 rows) stays on cuBLAS: 64.6 µs there against the kernel's 43.6 µs in that log, but that
# cuBLAS time included the eager quantization, and what is left of the difference since is not measured.
NARROW_TILES_PER_SM = 1 / 16
# False: FP8 linears above `MAX_DECODE_LINEAR_ROWS` rows compute weight-only (dequantized per call, bf16
# activations, no activation rounding); decode-sized ones still take `fp8_decode_linear`.
USE_CUBLAS = True
# True: `fp8_decode_linear` rounds the activations to e4m3 per row and 128 columns (as the cuBLAS path above
# `MAX_DECODE_LINEAR_ROWS` does, the release's dynamic activation scheme) and multiplies on float8 tensor cores
# instead of widening the weight: a 2.5-3.5% faster decode step at batch 16 and 64 on an H100 (docs/step3.md). False:
# weight-only, bf16 activations.
DECODE_ACTIVATIONS_FP8 = True
# Why cuBLAS's block-scaled GEMM failed on first use in this process (then every call dequantizes), or None.
_cublas_failure: str | None = None


def scaled_mm_supported(weight: torch.Tensor, block_size) -> bool:
    """Whether cuBLAS's block-scaled GEMM computes this weight: CUDA, compute capability 9.0+, 128 x 128 tiles, both
    widths multiples of 128."""
    if not USE_CUBLAS or _cublas_failure is not None:
        return False
    if weight.device.type != "cuda" or not hasattr(F, "scaled_mm") or block_size is None:
        return False
    out_features, in_features = weight.shape
    return (
        torch.cuda.get_device_capability(weight.device) >= (9, 0)
        and tuple(block_size) == (CUBLAS_BLOCK, CUBLAS_BLOCK)
        and in_features % CUBLAS_BLOCK == 0
        and out_features % CUBLAS_BLOCK == 0
    )


def decode_kernel_applies(x: torch.Tensor, weight: torch.Tensor, block_size) -> bool:
    """Whether `fp8_decode_linear` computes this call: inference on decode-sized inputs (`_decode_sized`) of bf16 /
    fp16 activations, on a device the kernel runs on (a GPU of compute capability 8.9+, whose Triton has float8),
    with a scale tile width it steps through."""
    return (
        _decode_kernel_runs(x.device, block_size)
        and not (torch.is_grad_enabled() and x.requires_grad)
        and _decode_sized(math.prod(x.shape[:-1]), weight.shape[0], x.device)
        and x.dtype in (torch.bfloat16, torch.float16)
    )


def _decode_sized(rows: int, out_features: int, device: torch.device) -> bool:
    """Up to `MAX_DECODE_LINEAR_ROWS` rows, or up to `MAX_NARROW_LINEAR_ROWS` where cuBLAS's 128 x 128 output tiles
    would occupy fewer than `NARROW_TILES_PER_SM` of the SMs."""
    if rows <= MAX_DECODE_LINEAR_ROWS:
        return True
    tiles = -(-rows // CUBLAS_BLOCK) * -(-out_features // CUBLAS_BLOCK)
    return rows <= MAX_NARROW_LINEAR_ROWS and tiles < NARROW_TILES_PER_SM * sm_count(device)


def _decode_kernel_runs(device: torch.device, block_size) -> bool:
    """`fp8_decode_linear` runs on `device` (a GPU of compute capability 8.9+, whose Triton has float8, or the
    interpreter) for scale tiles of `block_size`."""
    return (
        block_size is not None
        and float8_kernel_available(device)
        and launch_block_k(int(block_size[1])) is not None
    )


def _scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """cuBLAS's block-scaled FP8 GEMM of `x` `[M, K]` with `weight`; `quantize` rounds the activations (default: the
    one-launch kernel where it runs, else the same in eager torch)."""
    rows = x.shape[0]
    if quantize is None:
        quantize = quantize_fp8_activations if kernel_available(x.device) else quantize_fp8_activations_eager
    a, a_scale = quantize(x)  # rows padded to a multiple of 4, as cuBLAS wants
    k_blocks = scale_inv.shape[1]
    if k_blocks % 4:  # ... and the weight's K blocks a multiple of 4
        scale_inv = F.pad(scale_inv, (0, -k_blocks % 4))
    out = F.scaled_mm(
        a, weight.t(), a_scale, F.ScalingType.BlockWise1x128, scale_inv.t(), F.ScalingType.BlockWise128x128,
        output_dtype=x.dtype,
    )  # fmt: skip
    return out[:rows]


def _rounds_activations(weight: torch.Tensor, block_size) -> bool:
    """Whether `fp8_decode_linear` rounds the activations of this weight's decode calls to float8
    (`DECODE_ACTIVATIONS_FP8`, where its width and scale tiles allow it)."""
    return DECODE_ACTIVATIONS_FP8 and float8_activations_supported(weight.shape[1], int(block_size[1]))


def fp8_block_linear(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ (weight * scale_inv).T (+ bias)` for a block-FP8 `weight` `[N, K]` and its `scale_inv`."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    out = None
    if decode_kernel_applies(x, weight, block_size):
        float8 = _rounds_activations(weight, block_size)
        out = fp8_decode_linear(x, weight, scale_inv, block_size, quantize_activations=float8)
    elif scaled_mm_supported(weight, block_size) and not needs_grad and x.dtype in (torch.bfloat16, torch.float16):
        try:
            out = _scaled_mm_linear(x.contiguous(), weight, scale_inv.float())
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
            global _cublas_failure
            _cublas_failure = f"{type(err).__name__}: {err}"
            logger.warning(f"cuBLAS block-scaled FP8 GEMM failed ({_cublas_failure}); FP8 linears dequantize per call")
    if out is None:
        if weight.device.type == "cuda":
            logger.warning_once(
                f"FP8 linear {tuple(weight.shape)} with blocks {list(block_size)}: cuBLAS's block-scaled GEMM does "
                "not apply (it needs compute capability 9.0+, 128 x 128 blocks and widths that are multiples of 128); "
                "its weights are dequantized at each call instead"
            )
        out = F.linear(x, dequantize_block_fp8(weight, scale_inv, tuple(block_size), x.dtype, torch.float32))
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], -1)


def fp8_linear_path(weight: torch.Tensor, block_size) -> str:
    """Which paths `fp8_block_linear` takes for `weight` (for reports): the Triton kernel for decode-sized inputs,
    and cuBLAS or the dequantized weight (and why) for larger ones."""
    decode = ""
    if _decode_kernel_runs(weight.device, block_size):
        activations = "float8 activations" if _rounds_activations(weight, block_size) else "activations as they are"
        decode = (f"Triton fp8_decode_linear ({activations}) up to {MAX_DECODE_LINEAR_ROWS} rows (narrow linears up to "
                  f"{MAX_NARROW_LINEAR_ROWS}), above that ")
    if scaled_mm_supported(weight, block_size):
        return decode + "cuBLAS block-scaled FP8 GEMM (torch scaled_mm)"
    reason = _cublas_failure or ("USE_CUBLAS is off" if not USE_CUBLAS else "not CUDA 9.0+ with 128 x 128 tiles")
    return decode + f"weight dequantized per call ({reason})"


def _fp8_linear_class():
    from transformers.integrations.finegrained_fp8 import FP8Linear

    return FP8Linear


class Step3FP8Linear(_fp8_linear_class()):
    """transformers' `FP8Linear` (same parameters, same state dict) computing through `fp8_block_linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight.element_size() > 1:
            return F.linear(input, self.weight, self.bias)
        if self.activation_scheme != "dynamic":
            return super().forward(input)
        return fp8_block_linear(input, self.weight, self.weight_scale_inv, self.block_size, self.bias)


def use_fp8_kernels(model: torch.nn.Module) -> int:
    """Point every transformers `FP8Linear` of `model` at `fp8_block_linear`; returns how many there were."""
    fp8_linear = _fp8_linear_class()
    count = 0
    for module in model.modules():
        if type(module) is fp8_linear:
            module.__class__ = Step3FP8Linear  # a subclass with no state of its own: only `forward` changes
            count += 1
    return count
