"""Activations quantized for cuBLAS's block-scaled FP8 GEMM in one Triton launch: float8 e4m3 values and one float32
scale per token and 128 columns.

`fp8_linear`'s cuBLAS path (more than 64 rows: prefill, large decode batches) feeds `torch.nn.functional.scaled_mm`
activations rounded to e4m3 per 1 x 128 group, their scales laid out M-contiguous, and a row count that is a
multiple of 4. In eager torch that is about ten small kernels per linear (the padding, a cast, the absolute values,
the maximum, the clamp, two divisions, the clamp to e4m3's range, the cast, the scales' copy into cuBLAS's layout):
in a decode step at batch 64 on an H100, about 600 µs of them against about 930 µs of the GEMMs.
`quantize_fp8_activations` does the same in one launch, with the same bytes as `quantize_fp8_activations_eager`
(the reference, and the fallback where Triton does not run):

- each group in fp32: `scale = max(amax(|x|), 1e-12) * (1 / 448)` and `q = e4m3(clamp(x / scale, -448, 448))`,
  rounded to nearest, ties to even. The scale is a product with the fp32 reciprocal because that is what torch
  computes on CUDA for `amax / 448` (a division by a Python number: a product with its reciprocal, one ulp away from
  the quotient in about half the cases; the eager reference writes it out, so that it gives the same bits on CPU);
  `x / scale` is a true (IEEE) division on both sides.
- the rows past the input's up to the next multiple of 4 are zeros, with the scale of an all-zero group.
- non-finite inputs come out as the eager code gives them, with no check (a check would synchronise with the host
  and end CUDA-graph capture): a group holding NaN has scale NaN and all NaN values, a group holding ±inf (and no
  NaN) has scale inf, NaN where the infinities were and zeros elsewhere; other groups are unaffected.

The e4m3 bytes are computed with integer arithmetic, not Triton's float8 cast, so that Triton's interpreter (whose
float8 cast rounds differently and has no NaN) gives the GPU's bytes, and the tests on CPU check them. The kernel
sits behind a custom op (compiled callers keep it in their graph) and has no host synchronisation (CUDA graphs
capture it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fp8 import FP8_DTYPE, FP8_MAX
from .triton_support import (
    MIN_FP8_DOT_K,
    SUPPORTED_DTYPES,
    check_kernel_inputs,
    kernel_op,
    tl,
    triton,
    triton_jit,
)

__all__ = [
    "GROUP_SIZE",
    "float8_products_supported",
    "quantize_fp8_activations",
    "quantize_fp8_activations_eager",
]

# Columns per scale (cuBLAS's BlockWise1x128), and the multiple cuBLAS wants the row count to be.
GROUP_SIZE = 128
ROW_MULTIPLE = 4
# A group's smallest amax: an all-zero group gets a finite, nonzero scale (and zeros).
MIN_AMAX = 1e-12
# Rows per program: a [BLOCK_M, GROUP_SIZE] tile, whose BLOCK_M scales are one contiguous store.
BLOCK_M = 16


def float8_products_supported(block_k: int, *widths: int) -> bool:
    """Whether activations rounded per row and `GROUP_SIZE` columns can be multiplied as float8 in reductions over
    `widths`, in steps of `block_k`: whole groups, each step within one group and at least a float8 MMA deep."""
    return all(width % GROUP_SIZE == 0 for width in widths) and MIN_FP8_DOT_K <= block_k <= GROUP_SIZE


def _padded_rows(rows: int | torch.SymInt) -> int | torch.SymInt:
    """`rows` rounded up to a multiple of `ROW_MULTIPLE` (an int, or a symbolic size under compilation)."""
    return (rows + ROW_MULTIPLE - 1) // ROW_MULTIPLE * ROW_MULTIPLE


def quantize_fp8_activations_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_fp8_activations` in eager torch: the reference, and the fallback where Triton does not run."""
    rows = x.shape[0]
    if rows % ROW_MULTIPLE:
        x = F.pad(x, (0, 0, 0, _padded_rows(rows) - rows))
    groups = x.float().unflatten(-1, (-1, GROUP_SIZE))
    # `* (1 / FP8_MAX)`: what `/ FP8_MAX` computes on CUDA, written out so that the CPU gives the same bits
    scale = groups.abs().amax(-1).clamp(min=MIN_AMAX) * (1 / FP8_MAX)
    quantized = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).flatten(-2)
    return quantized, scale.t().contiguous().t()


@triton_jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton_jit
def _e4m3_bytes(q):
    """The float8_e4m3fn bytes of fp32 `q` (|q| <= 448, or NaN) as torch's cast gives them: nearest, ties to even;
    NaN -> 0x7F with `q`'s sign bit."""
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # |q| >= 2^-6 (normal in e4m3): exponent bias 127 -> 7, 23 mantissa bits -> 3 (the carry may raise the exponent)
    normal = (magnitude - (120 << 23) + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20
    # |q| < 2^-6 (subnormal in e4m3, steps of 2^-9): the fp32 sum with 2^14 rounds |q| to a multiple of 2^-9, and its
    # low mantissa bits count those steps
    subnormal = (tl.abs(q) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    code = tl.where(magnitude < (121 << 23), subnormal, normal)
    code = tl.where(q != q, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton_jit
def _quantize_fp8_activations(
    X, Q, S, stride_xm, stride_xk, rows, rows_padded, width,
    FP8_MAX: tl.constexpr, INV_FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M rows x one group of GROUP columns; rows from `rows` to `rows_padded` read as zeros."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    offs_k = group * GROUP + tl.arange(0, GROUP)
    x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=(offs_m < rows)[:, None],
                other=0.0).to(tl.float32)  # fmt: skip
    # NaN propagates through the maximum and the clamp, as in torch's amax and clamp
    amax = tl.reduce(tl.abs(x), 1, _max_keeping_nan)
    scale = tl.maximum(amax, MIN_AMAX, propagate_nan=tl.PropagateNan.ALL) * INV_FP8_MAX
    quotient = tl.div_rn(x, scale[:, None])  # IEEE division, as torch's
    q = tl.where(quotient != quotient, quotient, tl.clamp(quotient, -FP8_MAX, FP8_MAX))  # NaN stays NaN, as in torch
    written = offs_m < rows_padded
    tl.store(Q + offs_m[:, None] * width + offs_k[None, :], _e4m3_bytes(q), mask=written[:, None])
    tl.store(S + group * rows_padded + offs_m, scale, mask=written)  # M-contiguous, as cuBLAS reads the scales


def _empty_outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float8 `[M_pad, K]` and float32 scales `[M_pad, K / GROUP_SIZE]` with strides (1, M_pad), as the eager
    `.t().contiguous().t()` lays them out."""
    rows_padded = _padded_rows(x.shape[0])
    groups = x.shape[1] // GROUP_SIZE
    quantized = x.new_empty(rows_padded, x.shape[1], dtype=FP8_DTYPE)
    scale = x.new_empty_strided((rows_padded, groups), (1, torch.sym_max(rows_padded, 1)), dtype=torch.float32)
    return quantized, scale


def quantize_fp8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[M, K]` (bf16, fp16 or fp32; K a multiple of 128) -> float8_e4m3fn `[M_pad, K]` and float32 scales
    `[M_pad, K / 128]` (one per token and 128 columns, `x ~ q * scale`, laid out M-contiguous as cuBLAS's
    block-scaled GEMM reads them), `M_pad` being M rounded up to a multiple of 4 (the rows added are zeros). One
    launch, the bytes of `quantize_fp8_activations_eager`."""
    check_kernel_inputs("quantize_fp8_activations", "x", x, {})
    if x.ndim != 2:
        raise ValueError(f"`x` must be 2-D [tokens, features], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"`x` must be bf16, fp16 or fp32, got {x.dtype}")
    if x.shape[1] % GROUP_SIZE:
        raise ValueError(f"`x` has {x.shape[1]} features, not a multiple of the group size {GROUP_SIZE}")
    return _quantize_fp8_activations_op(x)


@kernel_op("step3_hf::quantize_fp8_activations")
def _quantize_fp8_activations_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    quantized, scale = _empty_outputs(x)
    rows, width = x.shape
    rows_padded = quantized.shape[0]
    if rows_padded and width:
        grid = (triton.cdiv(rows_padded, BLOCK_M), width // GROUP_SIZE)
        _quantize_fp8_activations[grid](
            x, quantized.view(torch.uint8), scale, *x.stride(), rows, rows_padded, width,
            FP8_MAX=FP8_MAX, INV_FP8_MAX=1 / FP8_MAX, MIN_AMAX=MIN_AMAX, BLOCK_M=BLOCK_M, GROUP=GROUP_SIZE,
        )  # fmt: skip
    return quantized, scale


@_quantize_fp8_activations_op.register_fake
def _(x):
    return _empty_outputs(x)
