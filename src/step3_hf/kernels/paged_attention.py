"""MFA attention over continuous batching's ragged batch: each query token against its own sequence's keys.

transformers' continuous batching packs a step's requests into one row: the new tokens of every sequence one after
another (`cu_seq_lens_q`), and each sequence's keys (its cached tokens, then its new ones) one after another
(`cu_seq_lens_k`), either gathered into one ragged tensor or left in the paged cache and named row by row by a read
index. Query token `t` of a sequence with `q` new tokens and `k` keys attends to that sequence's keys
`[0, k - q + t]` (causal within the new tokens).

`paged_decode_attention` is a split-KV Triton kernel in which every query token is its own decode: one program takes
the 64 query heads of one token (sharing Step-3's one KV head) against one slice of that token's key range, reading
the rows straight from the paged cache where a read index is given (no gather). That is exactly a decode step's
shape. A prefill chunk's many tokens would each re-read their prefix, so `ragged_sdpa_attention` does those with
SDPA, sequence by sequence; it is also the reference path where the kernel cannot run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .decode_attention import _merge_splits
from .decode_attention_plan import decode_device, split_count
from .triton_support import check_kernel_inputs, interpreter_enabled, launches_on_input_device, tl, triton, triton_jit

__all__ = ["paged_decode_attention", "ragged_sdpa_attention", "token_key_ranges"]

# Query heads per KV head that one program's tile holds.
MAX_GROUP = 256


@triton_jit
def _paged_split_kv_attention(
    Q, K, V, ROWS, TOKENS, KV_START, KV_END, OUT, PART_OUT, PART_LSE,
    stride_qt, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    num_kv_heads, qk_scale_log2, num_splits,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_TOKENS: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    """One program: the GROUP query heads of one (token, KV head) against one slice of the token's key range."""
    split = tl.program_id(0)
    token_head = tl.program_id(1)
    i = token_head // num_kv_heads
    kv_head = token_head % num_kv_heads
    if HAS_TOKENS:
        t = tl.load(TOKENS + i)
    else:
        t = i

    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < GROUP
    head = kv_head * GROUP + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + t * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if DOT_F32:  # the interpreter's 16-bit dot is wrong (seen: Triton 3.8)
        q = q.to(tl.float32)

    start = tl.load(KV_START + i)
    end = tl.maximum(tl.load(KV_END + i), start)
    chunk = tl.cdiv(tl.cdiv(end - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, end)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        if HAS_ROWS:  # the paged cache: logical key position -> cache row
            rows = tl.load(ROWS + offs_n, mask=n_ok, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        tile_ok = n_ok[:, None] & d_ok[None, :]
        k_ptrs = K + rows[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :] * stride_kd
        v_ptrs = V + rows[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=tile_ok, other=0.0)
        v = tl.load(v_ptrs, mask=tile_ok, other=0.0)
        if DOT_F32:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k.to(q.dtype)))
        scores = tl.where(n_ok[None, :], scores * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None])
        m_i = m_new

    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(
            OUT + i * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:  # the layout `_merge_splits` reads: (token, KV head, split, row)
        lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
        part = (token_head * num_splits + split) * GROUP
        part_ptrs = PART_OUT + (part + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(part_ptrs, out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(PART_LSE + part + offs_m, lse, mask=row_ok)


def token_key_ranges(
    cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor, num_tokens: int, key_starts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query token's key range `[start, end)` in the ragged key layout, `int32 [num_tokens]` each, on the device
    of the lengths and without reading them on the host. Tokens past the last sequence (padding) get empty ranges.
    `key_starts` (`[B]`): where each sequence's keys start when they are not packed one after another (then
    `cu_seq_lens_k` gives only their lengths)."""
    cu_q = cu_seq_lens_q.to(torch.int64)
    cu_k = cu_seq_lens_k.to(torch.int64)
    num_seqs = cu_q.numel() - 1
    tokens = torch.arange(num_tokens, device=cu_q.device)
    seq = torch.searchsorted(cu_q[1:], tokens, right=True)
    real = seq < num_seqs
    seq = seq.clamp(max=max(num_seqs - 1, 0))
    first = cu_k[:-1] if key_starts is None else key_starts.to(torch.int64)
    start = first[seq]
    # token t sees its sequence's keys up to its own position: the last key minus the new tokens after t
    end = start + (cu_k[seq + 1] - cu_k[seq]) - (cu_q[seq + 1] - 1 - tokens)
    start = torch.where(real, start, 0)
    end = torch.where(real, end, 0)
    return start.to(torch.int32), end.to(torch.int32)


@launches_on_input_device
def paged_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    rows: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    scale: float | None = None,
    max_kv_len: int | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of single query tokens, each against its own range of a ragged or paged key/value store.

    Args:
        query: `[T, Hq, D]` (any strides), the packed new tokens.
        key, value: `[N, Hkv, D]` with `Hq % Hkv == 0`, same dtype as the query: the ragged keys, or the paged cache's
            rows when `rows` is given (then the two may hold different numbers of rows).
        kv_start, kv_end: int32 `[n]`, the key range `[start, end)` of each computed token, as positions into `rows`
            (or into `key` without it); see `token_key_ranges`. Not checked against the store on the host (that
            would wait for the device): they must lie within it.
        rows: optional integer `[K]`, the cache row of each logical key position (continuous batching's read index).
        tokens: optional integer `[n]`, which query tokens to compute (default: all, `n = T`).
        scale: softmax scale, `D ** -0.5` by default.
        max_kv_len: the longest range, to size the split count (default: `N`).
        num_splits: key slices per (token, KV head), default enough to fill the device.
    Returns:
        `[n, Hq, D]`: row `i` is token `tokens[i]` (or `i`).
    """
    others = {"key": key, "value": value, "kv_start": kv_start, "kv_end": kv_end, "rows": rows, "tokens": tokens}
    check_kernel_inputs("paged_decode_attention", "query", query, others)
    if query.ndim != 3 or key.ndim != 3 or value.ndim != 3 or value.shape[1:] != key.shape[1:]:
        raise ValueError(
            f"query must be [T, Hq, D] and key/value [N, Hkv, D] (any N each), got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if key.shape[2] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"key {tuple(key.shape)} does not match query {tuple(query.shape)} (head_dim, heads)")
    group = num_heads // num_kv_heads
    if group > MAX_GROUP:
        raise ValueError(f"{group} query heads per KV head exceed one {MAX_GROUP}-row tile")
    if query.dtype not in (torch.bfloat16, torch.float16, torch.float32) or key.dtype != query.dtype:
        raise ValueError(f"query and cache must share a float dtype (bf16, fp16, fp32), got {query.dtype}, {key.dtype}")
    count = num_tokens if tokens is None else tokens.numel()
    if kv_start.shape != (count,) or kv_end.shape != (count,):
        raise ValueError(
            f"`kv_start`/`kv_end` must have shape ({count},), got {tuple(kv_start.shape)}, {tuple(kv_end.shape)}"
        )
    scale = head_dim**-0.5 if scale is None else scale
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"`scale` must be positive and finite, got {scale}")
    out = torch.empty(count, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if count == 0:
        return out

    programs = count * num_kv_heads
    widest = key.shape[0] if max_kv_len is None else max_kv_len
    if num_splits is None:
        num_splits = split_count(programs, max(widest, 1), decode_device(query.device).sms, float8=False)
    num_splits = max(1, int(num_splits))
    if num_splits > 1:
        part_out = torch.empty(programs * num_splits * group * head_dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(programs * num_splits * group, dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused
    dummy = kv_start
    block_d = max(16, triton.next_power_of_2(head_dim))
    launch_args = (
        query, key, value, rows if rows is not None else dummy, tokens if tokens is not None else dummy,
        kv_start.to(torch.int32), kv_end.to(torch.int32), out, part_out, part_lse,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        num_kv_heads, scale * math.log2(math.e), num_splits,
    )  # fmt: skip
    constants = dict(
        GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, HAS_ROWS=rows is not None, HAS_TOKENS=tokens is not None, SINGLE_SPLIT=num_splits == 1,
        DOT_F32=query.dtype == torch.float32 or interpreter_enabled(),
    )  # fmt: skip
    # A GPU with less shared memory than asked for cannot hold the pipeline: one stage fewer per retry.
    for stages in range(num_stages, 0, -1):
        try:
            _paged_split_kv_attention[(num_splits, programs)](
                *launch_args, **constants, num_warps=num_warps, num_stages=stages
            )
            break
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise
    if num_splits > 1:
        merge_rows = min(16, triton.next_power_of_2(group))
        out_view = out[:, None]  # [n, 1, Hq, D]: the merge's (sequence, token) is our (token, -)
        _merge_splits[(triton.cdiv(group, merge_rows), programs)](
            part_out, part_lse, out_view, out_view.stride(0), out_view.stride(2), out_view.stride(1),
            out_view.stride(3), num_kv_heads, 1, num_splits,
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=merge_rows,
            BLOCK_S=min(64, max(2, triton.next_power_of_2(num_splits))), WAIT_FOR_PRIOR_GRID=False,
            num_warps=max(1, min(4, merge_rows // 2)),
        )  # fmt: skip
    return out


def ragged_sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens_q: list[int],
    cu_seq_lens_k: list[int],
    scale: float,
    sequences: list[int] | None = None,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    key_starts: list[int] | None = None,
) -> torch.Tensor:
    """The same attention with SDPA, one sequence at a time (for prefill chunks, and where the kernel cannot run).

    `query` `[T, Hq, D]`; `key`/`value` `[N, Hkv, D]` (cache rows named by `rows` if given); host-side cumulative
    lengths (and `key_starts` as in `token_key_ranges`). Computes `sequences` (default: all) into `out` `[T, Hq, D]`
    (allocated if None) and returns it.
    """
    num_tokens, num_heads, head_dim = query.shape
    group = num_heads // key.shape[1]
    if out is None:
        out = query.new_zeros(num_tokens, num_heads, head_dim)
    for b in range(len(cu_seq_lens_q) - 1) if sequences is None else sequences:
        q_lo, q_hi = cu_seq_lens_q[b], cu_seq_lens_q[b + 1]
        k_lo = cu_seq_lens_k[b] if key_starts is None else key_starts[b]
        k_hi = k_lo + cu_seq_lens_k[b + 1] - cu_seq_lens_k[b]
        q_len, k_len = q_hi - q_lo, k_hi - k_lo
        if q_len == 0:
            continue
        if rows is not None:
            index = rows[k_lo:k_hi]
            k, v = key.index_select(0, index), value.index_select(0, index)
        else:
            k, v = key[k_lo:k_hi], value[k_lo:k_hi]
        q = query[q_lo:q_hi].transpose(0, 1)  # [Hq, q, D]
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, k, D]
        if q_len == k_len:  # a whole prompt: plain causal attention (the fused kernels)
            o = F.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, scale=scale, enable_gqa=True
            )[0]
        else:  # a chunk after cached tokens: causal from the bottom right; query heads folded into their KV head's rows
            positions = torch.arange(k_len, device=q.device)
            allowed = positions[None, :] <= positions[k_len - q_len :, None]
            q_folded = q.reshape(k.shape[0], group * q_len, head_dim)
            o = F.scaled_dot_product_attention(
                q_folded[None], k[None], v[None], attn_mask=allowed.repeat(group, 1), scale=scale
            )[0].reshape(num_heads, q_len, head_dim)
        out[q_lo:q_hi] = o.transpose(0, 1)
    return out
