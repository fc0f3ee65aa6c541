"""A block-FP8 linear for decode-sized inputs: a Triton kernel that reads the float8 weight once, with the activations
as they are (weight-only) or rounded to float8 (`quantize_activations`, the model's default).

At decode a linear's input has a few dozen rows, so the product is a read of the weight, and the job is to keep enough
bytes in flight. cuBLAS's block-scaled FP8 GEMM (`fp8_linear.py`) first quantizes the activations (one launch,
`fp8_activation_quant.py`; nine-odd eager kernels per call when these measurements were made, about 600 µs per decode
step of a 4-layer Step-3) and then runs tiles sized for compute: on an H100 at 16-64 rows it took 1.5-9.4x the
weight-read time per Step-3 linear, the small ones worst (`benchmarks/kernel_breakdown.py`). Weight-only, this kernel
reads the activations as they are (no activation rounding), widens each float8 tile to the activations' dtype in
registers, and scales each `BLOCK_K` step's fp32 partial product by its weight rows' tile scales (each step lies within
one scale column). Small tiles and a split of the reduction over programs (`split_k`, partial sums added in fp32
afterwards) give every SM several programs, which is what hides the memory latency; programs of the same weight tile and
different row tiles run next to each other, so a weight tile read for one row tile is found in L2 by the others.

Measured (H100, `benchmarks/kernel_breakdown.py`, docs/step3.md): at 16 rows the best launches took 1.3-2.9x the
weight-read time on Step-3's linears (19x on the 1.8 MB k and v projections), at 64 rows 1.9-3.9x, at 256 rows
5-9x (where cuBLAS is faster); so `fp8_linear` gives it inputs of up to 64 rows, and up to 256 rows only to narrow
linears, whose few output tiles leave cuBLAS's GEMM most of the GPU idle. Not at the bandwidth yet: the
per-step widening and scaling cost more than the stream at 64 rows.

`quantize_activations=True` rounds the activations to float8 per token and 128 columns first (one launch) and
multiplies float8 by float8 on the tensor cores: no widening, and half the activation bytes per step. On an H100 at
16 and 64 rows it took 1.4-2.0x the weight-read time on the four largest linears, against 1.4-2.4x for the best
weight-only launches of a sweep, and the decode step 2.5-3.5% less; `fp8_linear.DECODE_ACTIVATIONS_FP8` (on by
default) sends the model's decode linears through it. Hopper's float8 warp-group MMA adds its products with fewer
bits than fp32 within a step (each step's partial product is then added in fp32): 3e-5 to 9e-5 of relative error
with fp32 activations in the tests, against 4e-8 with 32-column tiles.

The kernel sits behind a custom op, so compiled callers keep it inside their graph; it has no host
synchronisation, so CUDA graphs capture it. With `TRITON_INTERPRET=1` set before Triton is imported, it runs on CPU
tensors (the tests do this).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..fp8 import FP8_DTYPE, scale_shape
from .fp8_activation_quant import GROUP_SIZE, float8_products_supported, quantize_fp8_activations
from .moe_decode import _add_product, _load_k_tile
from .triton_support import (
    MIN_FP8_DOT_K,
    SUPPORTED_DTYPES,
    check_kernel_inputs,
    interpreter_enabled,
    kernel_op,
    sm_count,
    tl,
    triton,
    triton_jit,
)

__all__ = [
    "DecodeLinearLaunch",
    "decode_linear_launch",
    "float8_activations_supported",
    "fp8_decode_linear",
    "launch_block_k",
]

# Elements per program of the split-sum kernel.
SUM_BLOCK = 1024
# Programs per SM the default launch aims for with 16-row tiles, fewer for larger ones (each has more work): enough
# resident programs to hide HBM latency (an H100 sweep of Step-3's linears at 16 and 64 rows) ...
PROGRAMS_PER_SM = 4
# ... without splitting the reduction below this many steps per program.
MIN_STEPS_PER_SPLIT = 4


@triton_jit
def _fp8_decode_linear(
    X, XS, W, S, OUT,
    stride_xm, stride_xk, stride_xsm, stride_xsk, stride_wn, stride_wk, stride_sn, stride_sk, stride_os, stride_om,
    stride_on, rows, out_features, in_features, steps_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr, SN: tl.constexpr, SK: tl.constexpr, A8: tl.constexpr, GROUP: tl.constexpr,
    SCALED: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N weight rows x BLOCK_M rows of `x` over one split of the reduction, computed transposed
    (`W @ x.T`: at decode the weight rows, not the few tokens, fill the tensor cores' long side). Under A8, `x` is
    float8 with one scale per row and GROUP columns (`XS`), and the products run on float8 tensor cores. Without
    SCALED the weight is plain (bf16 / fp16 / fp32, `S` unread): `decode_linear`."""
    # int64: the output's offsets (split x rows x columns) may pass 2^31 for a caller's large inputs
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # row tiles vary fastest: they share
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # weight tiles
    split = tl.program_id(2).to(tl.int64)
    m_ok = offs_m < rows
    n_ok = offs_n < out_features
    first = split * steps_per_split
    last = tl.minimum(first + steps_per_split, tl.cdiv(in_features, BLOCK_K))
    offs_k = first * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k in range(first, last):
        k_left = in_features - k * BLOCK_K
        w = _load_k_tile(w_ptrs, n_ok, k_left, BLOCK_K, EVEN_K)
        x = _load_k_tile(x_ptrs, m_ok, k_left, BLOCK_K, EVEN_K)
        if not SCALED:
            acc = _add_product(acc, w, x, DOT_F32)
        else:
            # the step lies within one scale column: its fp32 product is scaled per weight row, exactly
            scale = tl.load(S + (offs_n // SN) * stride_sn + (k * BLOCK_K // SK) * stride_sk, mask=n_ok, other=0.0)
            if A8:  # both operands float8: no widening; the step lies within one activation group too
                x_scale = tl.load(XS + offs_m * stride_xsm + (k * BLOCK_K // GROUP) * stride_xsk, mask=m_ok,
                                  other=0.0)  # fmt: skip
                partial = _add_product(tl.zeros([BLOCK_N, BLOCK_M], tl.float32), w, x, DOT_F32)
                acc += partial * scale[:, None] * x_scale[None, :]
            else:
                partial = _add_product(tl.zeros([BLOCK_N, BLOCK_M], tl.float32), w.to(x.dtype), x, DOT_F32)
                acc += partial * scale[:, None]
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    out_ptrs = OUT + split * stride_os + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton_jit
def _sum_splits(PARTIAL, OUT, splits, numel, BLOCK: tl.constexpr):
    """`OUT = sum over splits of PARTIAL` ([splits, numel] fp32, contiguous), rounded once to OUT's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    total = tl.zeros([BLOCK], tl.float32)
    for split in range(0, splits):
        total += tl.load(PARTIAL + split * numel + offs, mask=ok, other=0.0)
    tl.store(OUT + offs, total.to(OUT.dtype.element_ty), mask=ok)


class DecodeLinearLaunch(NamedTuple):
    """Launch parameters: rows, columns and reduction depth per program, reduction splits, warps, pipeline depth."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


def launch_block_k(scale_k: int) -> int | None:
    """Reduction depth per step for scale tiles `scale_k` wide: the largest power of two up to 128 dividing it (a
    step must lie within one scale column), or None below 16 (the smallest tensor-core tile)."""
    block_k = 128
    while block_k >= 16:
        if scale_k % block_k == 0:
            return block_k
        block_k //= 2
    return None


def float8_activations_supported(in_features: int, scale_k: int, block_k: int | None = None) -> bool:
    """Whether `quantize_activations` can compute a reduction of `in_features` in steps of `block_k` (default: the
    default launch's for scale tiles `scale_k` wide): whole 128-column activation groups, float8 MMA-deep steps."""
    return float8_products_supported(block_k or launch_block_k(scale_k) or 0, in_features)


def decode_linear_launch(
    rows: int, out_features: int, in_features: int, scale_k: int, device: torch.device | str, block_n: int = 64
) -> DecodeLinearLaunch:
    """The default launch: 16 to 64 rows per tile, `block_n` columns, `launch_block_k(scale_k)` deep steps, and the
    reduction split until the grid holds `PROGRAMS_PER_SM` programs per SM for 16-row tiles (proportionally fewer for
    larger ones; each split at least `MIN_STEPS_PER_SPLIT` steps)."""
    device = torch.device(device)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_k = launch_block_k(scale_k)
    if block_k is None:
        raise ValueError(f"scale tiles {scale_k} wide: fp8_decode_linear steps through widths divisible by 16")
    tiles = max(1, triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n))
    steps = triton.cdiv(in_features, block_k)
    sms = sm_count(device)
    programs = max(1, PROGRAMS_PER_SM * 16 // block_m) * sms
    wanted = max(1, min(steps // MIN_STEPS_PER_SPLIT, triton.cdiv(programs, tiles)))
    steps_per_split = triton.cdiv(steps, wanted)
    return DecodeLinearLaunch(block_m, block_n, block_k, triton.cdiv(steps, steps_per_split))


def fp8_decode_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int],
    launch: DecodeLinearLaunch | None = None,
    quantize_activations: bool = False,
) -> torch.Tensor:
    """`x @ (weight * scale_inv).T` for a block-FP8 `weight` `[N, K]` (float8 e4m3) with `scale_inv` `[ceil(N/b0),
    ceil(K/b1)]` float32, and `x` `[M, K]` bf16 / fp16 / fp32; returns `[M, N]` in `x`'s dtype (products and sums in
    fp32). `launch` overrides the default launch parameters (`decode_linear_launch`).

    `quantize_activations` first rounds `x` to e4m3 per row and 128 columns (`quantize_fp8_activations`: the
    release's dynamic activation scheme, as cuBLAS's path computes) and multiplies on float8 tensor cores instead of
    widening the weight; it needs K a multiple of 128 and reduction steps of at least 32 (scale tiles a multiple of
    32 wide)."""
    check_kernel_inputs("fp8_decode_linear", "x", x, {"weight": weight, "scale_inv": scale_inv})
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    b0, b1 = (int(b) for b in block_size)
    expected = scale_shape(tuple(weight.shape), (b0, b1))
    if tuple(scale_inv.shape) != expected or scale_inv.dtype != torch.float32:
        raise ValueError(f"`scale_inv` must be float32 {expected} for blocks {[b0, b1]}, got {scale_inv.dtype} "
                         f"{tuple(scale_inv.shape)}")  # fmt: skip
    if launch is None:  # chosen inside the op, where compiled callers do not trace the device query
        if launch_block_k(b1) is None:
            raise ValueError(f"scale tiles {b1} wide: fp8_decode_linear steps through widths divisible by 16")
        launch = DecodeLinearLaunch(0, 0, 0, 0, 0, 0)
    elif b1 % launch.block_k or launch.block_k < 16 or launch.block_k & (launch.block_k - 1):
        raise ValueError(f"block_k {launch.block_k} must be a power of two of at least 16 dividing the scale tile "
                         f"width {b1}")  # fmt: skip
    if quantize_activations and not float8_activations_supported(x.shape[1], b1, launch.block_k):
        raise ValueError(f"quantize_activations needs K a multiple of {GROUP_SIZE} and steps of {MIN_FP8_DOT_K} to "
                         f"{GROUP_SIZE}; got K {x.shape[1]}, steps of {launch.block_k or launch_block_k(b1)}")
    return _fp8_decode_linear_op(x, weight, scale_inv, b0, b1, *launch, quantize_activations)


@kernel_op("step3_hf::fp8_decode_linear")
def _fp8_decode_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    scale_n: int,
    scale_k: int,
    block_m: int,
    block_n: int,
    block_k: int,
    split_k: int,
    num_warps: int,
    num_stages: int,
    quantize_activations: bool,
) -> torch.Tensor:
    """The launch behind `fp8_decode_linear` (block_m 0: the default launch for this call)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    if rows == 0:
        return x.new_zeros(0, out_features)
    if block_m == 0:
        block_m, block_n, block_k, split_k, num_warps, num_stages = decode_linear_launch(
            rows, out_features, in_features, scale_k, x.device
        )
    if quantize_activations:
        operand, operand_scale = quantize_fp8_activations(x)  # rows padded to a multiple of 4, read up to `rows`
    else:
        operand, operand_scale = x, None
    return launch_streaming_linear(
        operand, operand_scale, weight, scale_inv, rows, x.dtype, DecodeLinearLaunch(
            block_m, block_n, block_k, split_k, num_warps, num_stages
        ), scale_n, scale_k, quantize_activations
    )  # fmt: skip


def launch_streaming_linear(
    operand: torch.Tensor,
    operand_scale: torch.Tensor | None,
    weight: torch.Tensor,
    scale_inv: torch.Tensor | None,
    rows: int,
    out_dtype: torch.dtype,
    launch: DecodeLinearLaunch,
    scale_n: int = 1,
    scale_k: int = 1,
    float8_operand: bool = False,
) -> torch.Tensor:
    """`operand[:rows] @ weight.T` `[rows, N]` in `out_dtype` through `_fp8_decode_linear` with `launch`: block-FP8
    when `scale_inv` is given (tiles `scale_n` x `scale_k`; `float8_operand`: `operand` float8 with `operand_scale`,
    else None), a plain weight when it is None. The reduction's splits are summed in fp32 and rounded once."""
    block_m, block_n, block_k, split_k, num_warps, num_stages = launch
    out_features, in_features = weight.shape
    steps = triton.cdiv(in_features, block_k)
    steps_per_split = triton.cdiv(steps, split_k)
    split_k = triton.cdiv(steps, steps_per_split)  # no empty splits
    out = torch.empty(split_k, rows, out_features, device=weight.device,
                      dtype=out_dtype if split_k == 1 else torch.float32)  # fmt: skip
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n), split_k)
    # S is never read without SCALED, XS never without A8: the weight stands in for what is absent
    scales = weight if scale_inv is None else scale_inv
    operand_scales = scales if operand_scale is None else operand_scale
    _fp8_decode_linear[grid](
        operand, operand_scales, weight, scales, out, *operand.stride(), *operand_scales.stride(), *weight.stride(),
        *scales.stride(), *out.stride(), rows, out_features, in_features, steps_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=in_features % block_k == 0,
        DOT_F32=(out_dtype == torch.float32 and not float8_operand) or interpreter_enabled(), SN=scale_n,
        SK=scale_k, A8=float8_operand, GROUP=GROUP_SIZE, SCALED=scale_inv is not None, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    if split_k == 1:
        return out[0]
    summed = torch.empty(rows, out_features, device=weight.device, dtype=out_dtype)  # fp32 partials, one rounding
    _sum_splits[(triton.cdiv(summed.numel(), SUM_BLOCK),)](out, summed, split_k, summed.numel(), BLOCK=SUM_BLOCK)
    return summed


@_fp8_decode_linear_op.register_fake
def _(x, weight, scale_inv, scale_n, scale_k, block_m, block_n, block_k, split_k, num_warps, num_stages,
      quantize_activations):
    return x.new_empty(x.shape[0], weight.shape[0])
