"""The AFD dispatch message of the FP8 wire (`afd/wire.py`) encoded and decoded in one Triton launch each.

A dispatch carries one micro-batch's routing and its post-attention-norm hidden states, rounded to e4m3 with one
float32 scale per token. In eager torch, encoding is about ten kernels (the absolute values, the row maximum, the
clamp, the division by 448, a cast, the quotient, the float8 cast, the routing's casts, the concatenation into one
buffer) and decoding about six more. At a 43-token micro-batch on an H100 they took 69 µs per layer, a quarter of the
attention phase they follow (docs/afd.md), on the attention GPU's critical path. Here each side is one launch, one
program per token, writing the same bytes (`encode_fp8_dispatch`) and reading them back to the same tensors
(`decode_fp8_dispatch`) as the eager functions of `afd/wire.py`:

- scale `= max(amax(|x|), 1e-12) * (1 / 448)` in fp32, the values `e4m3(x / scale)`, nearest, ties to even (the
  float8 bytes by integer arithmetic, `fp8_activation_quant._e4m3_bytes`, so that Triton's interpreter gives the
  GPU's bytes and the CPU tests check them); a token holding NaN or inf comes out as the eager code gives it;
- decoding: `e4m3 * scale` in fp32, rounded once to the model's dtype; ids widened to int64, weights rounded to the
  model's dtype.
"""

from __future__ import annotations

import torch

from ..fp8 import FP8_MAX
from .fp8_activation_quant import MIN_AMAX, _e4m3_bytes, _max_keeping_nan
from .triton_support import SUPPORTED_DTYPES, kernel_available, kernel_op, round_to, tl, triton, triton_jit

__all__ = [
    "ENABLED",
    "decode_fp8_dispatch",
    "encode_fp8_dispatch",
    "fp8_wire_kernels_decode",
    "fp8_wire_kernels_take",
]

# False: the wire encodes and decodes in eager torch everywhere (to time the two side by side).
ENABLED = True


@triton_jit
def _encode(X, IDS, WEIGHTS, IDS_OUT, WEIGHTS_OUT, SCALES_OUT, VALUES_OUT, stride_xm, stride_xk, stride_im,
            stride_ik, stride_wm, stride_wk, width, top_k,
            INV_FP8_MAX: tl.constexpr, FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK: tl.constexpr,
            BLOCK_K: tl.constexpr, ROUTED: tl.constexpr):  # fmt: skip
    """One program: one token's routing, scale and float8 values."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < width
    x = tl.load(X + row * stride_xm + offs * stride_xk, mask=ok, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 0, _max_keeping_nan)
    scale = tl.maximum(amax, MIN_AMAX, propagate_nan=tl.PropagateNan.ALL) * INV_FP8_MAX
    quotient = tl.div_rn(x, scale)
    q = tl.where(quotient != quotient, quotient, tl.clamp(quotient, -FP8_MAX, FP8_MAX))
    tl.store(VALUES_OUT + row * width + offs, _e4m3_bytes(q), mask=ok)
    tl.store(SCALES_OUT + row, scale)
    if ROUTED:
        k = tl.arange(0, BLOCK_K)
        k_ok = k < top_k
        ids = tl.load(IDS + row * stride_im + k * stride_ik, mask=k_ok, other=0)
        weights = tl.load(WEIGHTS + row * stride_wm + k * stride_wk, mask=k_ok, other=0.0)
        tl.store(IDS_OUT + row * top_k + k, ids.to(tl.int32), mask=k_ok)
        tl.store(WEIGHTS_OUT + row * top_k + k, weights.to(tl.float32), mask=k_ok)


@triton_jit
def _e4m3_value(code):
    """fp32 value of float8_e4m3fn bytes (int32 0-255): exact, NaN for 0x7F and 0xFF."""
    magnitude = code & 0x7F
    exponent = magnitude >> 3
    # normal: exponent bias 7 -> 127, 3 mantissa bits -> 23, as fp32 bits
    normal = (((exponent + 120) << 23) | ((magnitude & 7) << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, (magnitude & 7).to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2^-9
    value = tl.where(magnitude == 0x7F, float("nan"), value)
    return tl.where((code & 0x80) != 0, -value, value)


@triton_jit
def _decode(IDS_IN, WEIGHTS_IN, SCALES_IN, VALUES_IN, HIDDEN, IDS, WEIGHTS, width, top_k,
            BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ROUTED: tl.constexpr):  # fmt: skip
    """One program: one token's hidden states and routing back in the model's dtypes."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < width
    codes = tl.load(VALUES_IN + row * width + offs, mask=ok, other=0).to(tl.int32)
    scale = tl.load(SCALES_IN + row)
    DTYPE: tl.constexpr = HIDDEN.dtype.element_ty
    tl.store(HIDDEN + row * width + offs, round_to(_e4m3_value(codes) * scale, DTYPE).to(DTYPE), mask=ok)
    if ROUTED:
        k = tl.arange(0, BLOCK_K)
        k_ok = k < top_k
        ids = tl.load(IDS_IN + row * top_k + k, mask=k_ok, other=0)
        weights = tl.load(WEIGHTS_IN + row * top_k + k, mask=k_ok, other=0.0)
        tl.store(IDS + row * top_k + k, ids.to(tl.int64), mask=k_ok)
        WEIGHTS_DTYPE: tl.constexpr = WEIGHTS.dtype.element_ty
        tl.store(WEIGHTS + row * top_k + k, round_to(weights, WEIGHTS_DTYPE).to(WEIGHTS_DTYPE), mask=k_ok)


def fp8_wire_kernels_take(hidden: torch.Tensor, top_k_index: torch.Tensor | None) -> bool:
    """Whether the kernels encode this dispatch: `ENABLED`, a 2-D tensor of a supported dtype on a device they run
    on, integer routing (if any) beside it."""
    return (
        ENABLED
        and kernel_available(hidden.device)
        and hidden.ndim == 2
        and hidden.dtype in SUPPORTED_DTYPES
        and (top_k_index is None or (top_k_index.device == hidden.device and not top_k_index.is_floating_point()))
    )


def _fields(buffer: torch.Tensor, tokens: int, width: int, top_k: int) -> tuple[torch.Tensor, ...]:
    """Typed views of a dispatch buffer's fields: ids int32, weights float32, scales float32, values uint8."""
    ids, weights, scales, values = torch.split(buffer, [4 * tokens * top_k, 4 * tokens * top_k, 4 * tokens,
                                                        tokens * width])  # fmt: skip
    return ids.view(torch.int32), weights.view(torch.float32), scales.view(torch.float32), values


def _blocks(width: int, top_k: int) -> dict:
    block = triton.next_power_of_2(max(width, 1))
    return dict(BLOCK=block, BLOCK_K=triton.next_power_of_2(max(top_k, 1)), ROUTED=top_k > 0,
                num_warps=min(16, max(1, block // 512)))  # fmt: skip


def encode_fp8_dispatch(
    hidden: torch.Tensor, top_k_index: torch.Tensor | None, top_k_weights: torch.Tensor | None
) -> torch.Tensor:
    """`afd.wire.encode_dispatch(hidden, top_k_index, top_k_weights, WireFormat.FP8)` in one launch: the same uint8
    buffer (ids int32, weights float32, one scale per token, e4m3 values)."""
    if top_k_index is None:
        top_k_index = top_k_weights = hidden.new_empty(hidden.shape[0], 0)
    return _encode_op(hidden, top_k_index, top_k_weights)


@kernel_op("step3_hf::encode_fp8_dispatch")
def _encode_op(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    tokens, width = hidden.shape
    top_k = top_k_index.shape[1]
    buffer = hidden.new_empty(tokens * (8 * top_k + 4 + width), dtype=torch.uint8)
    ids, weights, scales, values = _fields(buffer, tokens, width, top_k)
    if tokens:
        routing = (top_k_index, top_k_weights) if top_k else (ids, weights)  # stand-ins the kernel never reads
        strides = (*top_k_index.stride(), *top_k_weights.stride()) if top_k else (0, 0, 0, 0)
        _encode[(tokens,)](
            hidden, *routing, ids, weights, scales, values, *hidden.stride(), *strides, width, top_k,
            INV_FP8_MAX=1 / FP8_MAX, FP8_MAX=FP8_MAX, MIN_AMAX=MIN_AMAX,
            **_blocks(width, top_k),
        )  # fmt: skip
    return buffer


@_encode_op.register_fake
def _(hidden, top_k_index, top_k_weights):
    tokens, width = hidden.shape
    return hidden.new_empty(tokens * (8 * top_k_index.shape[1] + 4 + width), dtype=torch.uint8)


def fp8_wire_kernels_decode(buffer: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernel decodes a dispatch in `buffer` for a model of `dtype`."""
    return ENABLED and kernel_available(buffer.device) and dtype in SUPPORTED_DTYPES


def decode_fp8_dispatch(
    buffer: torch.Tensor, tokens: int, width: int, top_k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`afd.wire.decode_dispatch` of an FP8 dispatch in one launch: hidden states `[tokens, width]` in `dtype`, ids
    int64 and weights in `dtype` (None for a dense layer's dispatch)."""
    hidden, ids, weights = _decode_op(buffer, tokens, width, top_k, dtype)
    return (hidden, ids, weights) if top_k else (hidden, None, None)


@kernel_op("step3_hf::decode_fp8_dispatch")
def _decode_op(
    buffer: torch.Tensor, tokens: int, width: int, top_k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids_in, weights_in, scales, values = _fields(buffer, tokens, width, top_k)
    hidden = buffer.new_empty((tokens, width), dtype=dtype)
    ids = buffer.new_empty((tokens, top_k), dtype=torch.int64)
    weights = buffer.new_empty((tokens, top_k), dtype=dtype)
    if tokens:
        _decode[(tokens,)](ids_in, weights_in, scales, values, hidden, ids, weights, width, top_k,
                           **_blocks(width, top_k))  # fmt: skip
    return hidden, ids, weights


@_decode_op.register_fake
def _(buffer, tokens, width, top_k, dtype):
    return (buffer.new_empty((tokens, width), dtype=dtype), buffer.new_empty((tokens, top_k), dtype=torch.int64),
            buffer.new_empty((tokens, top_k), dtype=dtype))  # fmt: skip
