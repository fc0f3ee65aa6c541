"""Step-3's rotary position embedding (neox style) of queries and keys in one Triton kernel launch.

The eager `apply_rotary_pos_emb` is about ten kernels per layer: for q and again for k a product with `cos`, the
chunk, negation and concatenation of `rotate_half`, a product with `sin` and the sum. At decode each touches a few
kilobytes and costs a launch, and under CUDA graphs (the AFD attention side) still a kernel's GPU time.
`apply_rotary` reads q and k where the projections left them (transposed views, any strides) and writes both
rotated in one launch. It rounds where the eager code rounds (16-bit: the product with `cos`, the product with
`sin`, the sum; fp32 without fused multiply-adds), so its results are bit-identical to the eager function's.

`use_fused_rotary(module)`, which `step3_hf` runs at import on `modeling_step3`, replaces the module's
`apply_rotary_pos_emb` by one that takes the kernel for inference calls on a device it runs on, and the eager
function for everything else (training, CPU, other dtypes, a layout other than `unsqueeze_dim=1`). Its eager
function stays reachable as `apply_rotary_pos_emb._eager_function` (`benchmarks/generate.py --eager-rope`).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from .triton_support import (
    SUPPORTED_DTYPES,
    check_kernel_inputs,
    install_dispatch,
    kernel_available,
    kernel_op,
    round_to,
    tl,
    triton,
    triton_jit,
)

__all__ = ["apply_rotary", "use_fused_rotary"]

# The elements one program rotates: a block of heads of one token (the head dimension in two halves).
_TILE = 4096


@triton_jit
def _rotate_heads(X, OUT, first_head, num_heads, stride_xh, stride_xd, stride_oh, stride_od,
                  cos_lo, cos_hi, sin_lo, sin_hi, half, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
    """`out = x * cos + rotate_half(x) * sin` for heads [first_head, first_head + BLOCK_H) of one token; X and OUT
    point at the token's head 0."""
    heads = first_head + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    ok = (heads < num_heads)[:, None] & (offs < half)[None, :]
    x_ptrs = X + heads[:, None].to(tl.int64) * stride_xh + offs[None, :] * stride_xd
    x_lo = tl.load(x_ptrs, mask=ok, other=0.0).to(tl.float32)
    x_hi = tl.load(x_ptrs + half * stride_xd, mask=ok, other=0.0).to(tl.float32)
    DTYPE: tl.constexpr = OUT.dtype.element_ty
    # rotate_half(x) = cat(-x_hi, x_lo); each product and the sum rounded to the output dtype, as in eager torch
    out_lo = round_to(round_to(x_lo * cos_lo, DTYPE) + round_to(-x_hi * sin_lo, DTYPE), DTYPE)
    out_hi = round_to(round_to(x_hi * cos_hi, DTYPE) + round_to(x_lo * sin_hi, DTYPE), DTYPE)
    o_ptrs = OUT + heads[:, None].to(tl.int64) * stride_oh + offs[None, :] * stride_od
    tl.store(o_ptrs, out_lo.to(DTYPE), mask=ok)
    tl.store(o_ptrs + half * stride_od, out_hi.to(DTYPE), mask=ok)


@triton_jit
def _rotary(
    Q, K, COS, SIN, Q_OUT, K_OUT,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    stride_qob, stride_qoh, stride_qos, stride_qod,
    stride_kob, stride_koh, stride_kos, stride_kod,
    seq_len, q_heads, k_heads, half, q_blocks,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Grid (B * S, q head blocks + k head blocks): one token's block of query heads, or of key heads."""
    token = tl.program_id(0)
    block = tl.program_id(1)
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    ok = offs < half
    cos_ptrs = COS + b * stride_cb + s * stride_cs + offs * stride_cd
    sin_ptrs = SIN + b * stride_sb + s * stride_ss + offs * stride_sd
    cos_lo = tl.load(cos_ptrs, mask=ok, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_ptrs + half * stride_cd, mask=ok, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_ptrs, mask=ok, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_ptrs + half * stride_sd, mask=ok, other=0.0).to(tl.float32)[None, :]
    if block < q_blocks:
        _rotate_heads(Q + b * stride_qb + s * stride_qs, Q_OUT + b * stride_qob + s * stride_qos,
                      block * BLOCK_HQ, q_heads, stride_qh, stride_qd, stride_qoh, stride_qod,
                      cos_lo, cos_hi, sin_lo, sin_hi, half, BLOCK_HQ, BLOCK_HALF)  # fmt: skip
    else:
        _rotate_heads(K + b * stride_kb + s * stride_ks, K_OUT + b * stride_kob + s * stride_kos,
                      (block - q_blocks) * BLOCK_HK, k_heads, stride_kh, stride_kd, stride_koh, stride_kod,
                      cos_lo, cos_hi, sin_lo, sin_hi, half, BLOCK_HK, BLOCK_HALF)  # fmt: skip


def _check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_kernel_inputs("apply_rotary", "q", q, {"k": k, "cos": cos, "sin": sin})
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads, seq, head_dim], got shape {tuple(q.shape)}")
    batch, _, seq_len, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"q's head_dim must be even (RoPE rotates its two halves), got {head_dim}")
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}: expected [{batch}, kv_heads, "
                         f"{seq_len}, {head_dim}]")  # fmt: skip
    for name, table in (("cos", cos), ("sin", sin)):  # [B, S, D], a 1 in B or S broadcasting
        if table.dim() != 3 or table.shape[2] != head_dim or table.shape[0] not in (1, batch) or (
            table.shape[1] not in (1, seq_len)
        ):
            raise ValueError(f"{name} {tuple(table.shape)} does not fit q {tuple(q.shape)}: expected [{batch} or 1, "
                             f"{seq_len}, {head_dim}]")  # fmt: skip
    if q.dtype != k.dtype or cos.dtype != sin.dtype:
        raise ValueError(f"q and k must share a dtype, and so must cos and sin; got q {q.dtype}, k {k.dtype}, "
                         f"cos {cos.dtype}, sin {sin.dtype}")  # fmt: skip
    if q.dtype not in SUPPORTED_DTYPES or cos.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"apply_rotary computes {SUPPORTED_DTYPES}, got q {q.dtype} and cos {cos.dtype}")


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)` with `cos`/`sin` `[B, S, D]` broadcast over
    the heads of q `[B, Hq, S, D]` and k `[B, Hkv, S, D]` (a leading 1 broadcasts over the batch too): new tensors in
    the layout of q and k, of the dtype torch promotes q's and cos's to."""
    _check_inputs(q, k, cos, sin)
    return _apply_rotary_op(q, k, cos, sin)


def _outputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager function's outputs: q's and k's layout (TensorIterator follows the first operand's), promoted dtype."""
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=dtype)


@kernel_op("step3_hf::apply_rotary")
def _apply_rotary_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_heads, seq_len, head_dim = q.shape
    k_heads = k.shape[1]
    q_out, k_out = _outputs(q, k, cos)
    if q_out.numel() == 0 and k_out.numel() == 0:
        return q_out, k_out
    cos, sin = cos.expand(batch, seq_len, head_dim), sin.expand(batch, seq_len, head_dim)  # stride 0 where broadcast
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_heads = max(1, _TILE // (2 * block_half))
    block_hq = min(triton.next_power_of_2(max(q_heads, 1)), block_heads)
    block_hk = min(triton.next_power_of_2(max(k_heads, 1)), block_heads)
    q_blocks, k_blocks = triton.cdiv(q_heads, block_hq), triton.cdiv(k_heads, block_hk)
    _rotary[(batch * seq_len, q_blocks + k_blocks)](
        q, k, cos, sin, q_out, k_out,
        *q.stride(), *k.stride(), *cos.stride(), *sin.stride(), *q_out.stride(), *k_out.stride(),
        seq_len, q_heads, k_heads, half, q_blocks,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=4 if block_hq * block_half >= 1024 else 1,
        enable_fp_fusion=False,  # fp32: a fused multiply-add would skip the rounding of `q * cos`
    )  # fmt: skip
    return q_out, k_out


@_apply_rotary_op.register_fake
def _(q, k, cos, sin):
    return _outputs(q, k, cos)


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    tensors = (q, k, cos, sin)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (
        not needs_grad
        and kernel_available(q.device)
        and all(t.device == q.device for t in tensors)
        and q.dtype == k.dtype
        and cos.dtype == sin.dtype
        and q.dtype in SUPPORTED_DTYPES
        and cos.dtype in SUPPORTED_DTYPES
    )


def use_fused_rotary(module: ModuleType) -> None:
    """Make `module.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` (the eager neox-style function, looked up
    as a module global by its callers) take the kernel for inference calls where it runs (idempotent)."""

    def make(eager):
        @functools.wraps(eager)
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
            # unsqueeze_dim=1 is the [B, H, S, D] layout the kernel reads; shape errors are the kernel's to report
            if unsqueeze_dim == 1 and _kernel_takes(q, k, cos, sin):
                return apply_rotary(q, k, cos, sin)
            return eager(q, k, cos, sin, unsqueeze_dim)

        return apply_rotary_pos_emb

    install_dispatch(module, "apply_rotary_pos_emb", "_eager_function", make, "RoPE.",
                     "one Triton kernel for both at inference on CUDA")  # fmt: skip
