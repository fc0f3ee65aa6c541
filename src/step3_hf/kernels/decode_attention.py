"""Split-KV (flash-decoding) attention for a few new query tokens per sequence against a KV cache, in Triton.

MFA shares one key and one value head among all 64 query heads, so a decode step is `[64 heads x new tokens]`
queries against one stream of K/V. Each program folds all query heads of its KV head (times the new tokens) into
the M dimension of one tensor-core tile and reads its slice of the cache exactly once; the cache is cut into
`num_splits` slices so that small batches with long contexts still fill every multiprocessor, and a second pass
merges the slices' partial results by their log-sum-exp. The cache may be bf16/fp16/fp32, or float8 e4m3 with one
float32 scale per cached token (see `float8_kv_cache.py`). On Hopper, float8 caches in value tiles without a mask
run the Gluon kernel of `decode_attention_sm90.py` where their slices are short enough, with the same merge.
`decode_attention_plan.py` decides which kernel runs and how (splits, stages, early merge, unchecked loads); this
module checks the arguments and executes that plan.

With `TRITON_INTERPRET=1` set before Triton is imported, the kernels run on CPU tensors through Triton's
interpreter (the tests do this).
"""

from __future__ import annotations

import math
import sys

import torch

from .decode_attention_plan import DecodePlan, decode_device, plan_decode_attention
from .decode_attention_sm90 import dense_layout, float8_attention_sm90
from .triton_support import check_kernel_inputs, kernel_op, tl, triton, triton_jit

__all__ = ["decode_attention", "kv_bounds_from_mask"]

_CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
# Query rows (query heads per KV head x new tokens) that one program's tensor-core tile holds.
MAX_QUERY_ROWS = 256


@triton_jit
def _round_to_e4m3_emulated(x):
    """float32 -> the nearest e4m3 value (ties away from zero), in float32: the interpreter's own cast is wrong."""
    magnitude = tl.abs(x)
    exponent = tl.floor(tl.log2(tl.maximum(magnitude, 0.015625)))  # subnormals share 2^-6's spacing
    spacing = tl.exp2(exponent - 3.0)  # 3 mantissa bits
    rounded = tl.minimum(tl.floor(magnitude / spacing + 0.5) * spacing, 448.0)
    return tl.where(x < 0.0, -rounded, rounded)


@triton_jit
def _load_rows(ptrs, rows_ok, d_ok, CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    """A `[rows, D]` tile, bounds-checked only where the caller cannot rule out reading past the cache."""
    if CHECK_ROWS and CHECK_D:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif CHECK_D:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton_jit
def _split_kv_attention(
    Q, K, V, K_SCALE, V_SCALE, MASK, KV_START, KV_END, OUT, PART_OUT, PART_LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vn, stride_vd,
    stride_ksb, stride_ksh, stride_ksn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_mb, stride_mt, stride_mn,
    stride_ob, stride_oh, stride_ot, stride_od,
    num_kv_heads, q_len, kv_len, qk_scale_log2, num_splits,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, V_TILE: tl.constexpr, READABLE: tl.constexpr, HAS_BOUNDS: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL_TAIL: tl.constexpr,
    IS_FP8: tl.constexpr, FP8_MMA: tl.constexpr, SINGLE_SPLIT: tl.constexpr, SINGLE_TOKEN: tl.constexpr,
    DOT_F32: tl.constexpr, LAUNCH_MERGE: tl.constexpr,
):  # fmt: skip
    """One program: all `GROUP * q_len` query rows of one (sequence, KV head) against one slice of its cache."""
    split = tl.program_id(0)
    seq_head = tl.program_id(1)
    b = seq_head // num_kv_heads
    kv_head = seq_head % num_kv_heads

    # Row m of the tile is query head `kv_head * GROUP + m // q_len` at new token `m % q_len`.
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < GROUP * q_len
    head = kv_head * GROUP + offs_m // q_len
    tok = offs_m % q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # Tensor-core operands: the query's dtype for a 16-bit cache. A float8 cache with FP8_MMA multiplies e4m3 by
    # e4m3 (the cache tiles go from memory to the tensor cores untouched): q is scaled per row into e4m3's range,
    # with the softmax scale folded in, and the scale is applied to the scores. Without FP8_MMA (GPUs before Ada)
    # the cache tiles are widened to fp16. float32 where the interpreter's bf16 dot is wrong (seen: Triton 3.8);
    # there, e4m3 rounding is emulated in float32 (the interpreter's float32 -> e4m3 cast is wrong too).
    # Other caches' scores are taken to log2 units (score_scale > 0) after masking, fused with the max subtraction.
    score_scale = 1.0 if IS_FP8 else qk_scale_log2
    if IS_FP8:
        q = q.to(tl.float32) * qk_scale_log2
        if FP8_MMA:
            q_amax = tl.max(tl.abs(q), 1)
            q_scale = tl.where(q_amax > 0.0, q_amax / 448.0, 1.0)  # e4m3's largest finite value
            q = q / q_scale[:, None]
            if DOT_F32:
                q = _round_to_e4m3_emulated(q)
            else:
                q = q.to(tl.float8e4nv)
        elif not DOT_F32:
            q = q.to(tl.float16)
    if DOT_F32:
        q = q.to(tl.float32)

    # This program's slice of the valid range [start, end), cut at multiples of BLOCK_N from `start` rounded down to
    # 16 (the positions before `start` are masked out), so that value tiles are read in aligned 16-position vectors.
    if HAS_BOUNDS:
        start = tl.load(KV_START + b)
        end = tl.maximum(tl.load(KV_END + b), start)
    else:  # no mask and no lengths: every sequence fills the cache (and no bounds tensors were built)
        start = 0
        end = kv_len
    aligned_start = start // 16 * 16
    chunk = tl.cdiv(tl.cdiv(end - aligned_start, num_splits), BLOCK_N) * BLOCK_N
    lo = aligned_start + split * chunk
    hi = tl.minimum(lo + chunk, end)
    # Value tiles hold whole 16-position vectors, so reading up to `hi` rounded up stays inside them (the padding
    # holds finite values; the positions past `hi` get probability 0).
    v_hi = tl.cdiv(hi, 16) * 16 if V_TILE else hi

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    k_scales = K_SCALE + b * stride_ksb + kv_head * stride_ksh
    v_scales = V_SCALE + b * stride_vsb + kv_head * stride_vsh
    if IS_FP8:
        # P @ (s_v * V) == ((P * s_v / max s_v) @ V) * max s_v: the value scales go onto the probabilities' columns,
        # relative to the largest scale in this slice (read up front: 4 bytes per position, against 2 x D), so
        # that they stay within [0, 1]; e4m3 probabilities are also lifted by 256 out of its subnormal range.
        v_max = tl.zeros([1024], tl.float32)
        for n0 in range(lo, hi, 1024):
            offs = n0 + tl.arange(0, 1024)
            v_max = tl.maximum(v_max, tl.load(v_scales + offs * stride_vsn, mask=offs < hi, other=0.0))
        p_unit = (256.0 if FP8_MMA else 1.0) / tl.maximum(tl.max(v_max, 0), 1e-30)

    # READABLE: the host checked that whole blocks past `hi` stay inside the tensors (the float8 cache is padded
    # so), and the tile loads go without bounds checks (with them the float8 loop took 15% longer on the H200);
    # the positions outside [start, hi) are excluded from the scores either way.
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = _load_rows(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok, not READABLE,
            HEAD_DIM != BLOCK_D,
        )
        if DOT_F32:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k.to(q.dtype)))
        if IS_FP8:
            if READABLE:
                k_scale = tl.load(k_scales + offs_n * stride_ksn)
            else:
                k_scale = tl.load(k_scales + offs_n * stride_ksn, mask=n_ok, other=0.0)
            if FP8_MMA:
                scores = scores * (q_scale[:, None] * k_scale[None, :])
            else:
                scores = scores * k_scale[None, :]
        # Positions before `start` are excluded by the mask they came from; rows past GROUP * q_len hold q = 0 (finite
        # scores) and are never stored.
        keep = n_ok[None, :]
        if HAS_MASK:
            if SINGLE_TOKEN:  # one mask row shared by all heads: a [BLOCK_N] load, not a [BLOCK_M, BLOCK_N] tile
                allowed = tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0)[None, :]
            else:
                allowed = tl.load(
                    MASK + b * stride_mb + tok[:, None] * stride_mt + offs_n[None, :] * stride_mn,
                    mask=keep,
                    other=0,
                )
            keep = keep & (allowed != 0)
        if CAUSAL_TAIL:  # the new tokens are the last q_len cached positions
            keep = keep & (offs_n[None, :] <= end - q_len + tok[:, None])
        scores = tl.where(keep, scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, 1) * score_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores * score_scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_TILE:  # float8 value tiles: [V_TILE positions x D] stored D-major, positions contiguous
            v_ptrs = v_base + (offs_n // V_TILE)[:, None] * stride_vt + (offs_n % V_TILE)[:, None] * stride_vn
        else:
            v_ptrs = v_base + offs_n[:, None] * stride_vn
        v = _load_rows(v_ptrs + offs_d[None, :] * stride_vd, offs_n < v_hi, d_ok, not READABLE, HEAD_DIM != BLOCK_D)
        if IS_FP8:
            if READABLE:
                v_scale = tl.load(v_scales + offs_n * stride_vsn)
            else:
                v_scale = tl.load(v_scales + offs_n * stride_vsn, mask=n_ok, other=0.0)
            p_v = p * (v_scale * p_unit)[None, :]
            if FP8_MMA and DOT_F32:
                p_v = _round_to_e4m3_emulated(p_v)
            elif FP8_MMA:
                p_v = p_v.to(tl.float8e4nv)
        else:
            p_v = p
        if DOT_F32:
            acc = tl.dot(p_v, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p_v.to(q.dtype), v.to(q.dtype), acc * alpha[:, None])
        m_i = m_new

    if LAUNCH_MERGE:  # the merge (launched early, see the plan) may start on the resources this grid frees from now on
        tl.extra.cuda.gdc_launch_dependents()
    if IS_FP8:
        acc = acc / p_unit
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(
            OUT + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + offs_d[None, :] * stride_od,
            out.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
        rows = GROUP * q_len
        part = (seq_head * num_splits + split) * rows
        part_rows = PART_OUT + (part + offs_m[:, None]) * HEAD_DIM
        tl.store(part_rows + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(PART_LSE + part + offs_m, lse, mask=row_ok)


@triton_jit
def _merge_splits(
    PART_OUT, PART_LSE, OUT,
    stride_ob, stride_oh, stride_ot, stride_od,
    num_kv_heads, q_len, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr, WAIT_FOR_PRIOR_GRID: tl.constexpr,
):  # fmt: skip
    """One program per `BLOCK_R` query rows of one (sequence, KV head): weight each split's partial output by
    exp(lse_split - lse_total) and sum. The loop over splits reads whole `[BLOCK_R, D]` tiles, so its loads are
    contiguous and pipelined (one program per row with a handful of splits took ~15 us for 16 MiB on the H200)."""
    row_block = tl.program_id(0)
    seq_head = tl.program_id(1)
    b = seq_head // num_kv_heads
    kv_head = seq_head % num_kv_heads
    rows = GROUP * q_len
    offs_r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    first = seq_head * num_splits * rows  # PART_* index of split 0, row 0 of this (sequence, KV head)
    if WAIT_FOR_PRIOR_GRID:  # launched early (programmatic dependent launch): wait for the attention kernel
        tl.extra.cuda.gdc_wait()

    offs_s = tl.arange(0, BLOCK_S)
    lse_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + offs_s < num_splits
        lse = tl.load(
            PART_LSE + first + (s0 + offs_s)[:, None] * rows + offs_r[None, :],
            mask=s_ok[:, None] & r_ok[None, :],
            other=float("-inf"),
        )
        lse_max = tl.maximum(lse_max, tl.max(lse, 0))
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)

    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        part = first + split * rows + offs_r
        weight = tl.exp2(tl.load(PART_LSE + part, mask=r_ok, other=float("-inf")) - lse_max)
        partial = tl.load(
            PART_OUT + part[:, None] * HEAD_DIM + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0
        )
        total += weight
        acc += partial.to(tl.float32) * weight[:, None]
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    head = kv_head * GROUP + offs_r // q_len
    tok = offs_r % q_len
    tl.store(
        OUT + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=r_ok[:, None] & d_ok[None, :],
    )


@triton_jit
def _mask_bounds(
    MASK, KV_START, KV_END, stride_mb, stride_mt, stride_mn, q_len, kv_len, BLOCK: tl.constexpr
):  # fmt: skip
    """Folds one block of a sequence's mask into its first / one-past-last allowed position (atomic min / max)."""
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    allowed = n < 0  # all False
    for t in range(0, q_len):
        row = tl.load(MASK + b * stride_mb + t * stride_mt + n * stride_mn, mask=n < kv_len, other=0)
        allowed = allowed | (row != 0)
    tl.atomic_min(KV_START + b, tl.min(tl.where(allowed, n, kv_len), 0))
    tl.atomic_max(KV_END + b, tl.max(tl.where(allowed, n + 1, 0), 0))


def _stored_positions(tensor: torch.Tensor, dim: int) -> int:
    """How many indices along `dim` (the other indices anywhere within the shape) stay inside `tensor`'s storage."""
    room = tensor.untyped_storage().nbytes() // tensor.element_size() - 1 - tensor.storage_offset()
    room -= sum((n - 1) * stride for d, (n, stride) in enumerate(zip(tensor.shape, tensor.stride())) if d != dim)
    if room < 0:
        return 0
    return sys.maxsize if tensor.stride(dim) == 0 else room // tensor.stride(dim) + 1


def kv_bounds_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last cache position any new token of each sequence may attend to: `[B]` int32 each.

    `mask` is boolean `[B, q_len, kv_len]` (True = attend). The attention kernel visits only `[start, end)` and
    applies the mask exactly inside it, which skips left padding and the unwritten tail of a static cache. One
    small kernel on the device, no host synchronisation.
    """
    batch, q_len, kv_len = mask.shape
    start = torch.full((batch,), kv_len, dtype=torch.int32, device=mask.device)
    end = torch.zeros_like(start)
    block = 4096
    _mask_bounds[(batch, triton.cdiv(kv_len, block))](
        mask, start, end, *mask.stride(), q_len, kv_len, BLOCK=block, num_warps=4
    )
    return start, end  # start > end where nothing is allowed: the attention kernel then visits nothing


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
    kv_lengths: torch.Tensor | None = None,
    kv_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_scale: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Attention of a few new tokens per sequence against a KV cache; returns `[B, q_len, Hq, D]` like transformers.

    Args:
        query: `[B, Hq, q_len, D]` (any strides).
        key, value: the cache, `[B, Hkv, kv_len, D]` with `Hq % Hkv == 0`; bf16/fp16/fp32, or float8 e4m3 together
            with `key_scale`/`value_scale` `[B, Hkv, kv_len]` float32 (dequantised value = fp8 value * scale). A
            float8 `value` may also be value tiles `[B, Hkv, ceil(kv_len / T), D, T]` (T a multiple of 16; as
            `quantize_float8(..., layout="value_cache")` and `Float8StaticCache` store it), the layout read fastest:
            with it, positions past a sequence's valid range are read where the tensors' storage holds them (whole
            blocks, without bounds checks) and get probability 0, so the bytes and scales stored there must be
            finite (the cache layouts hold zeros or written values there). Other layouts are bounds-checked.
        scale: softmax scale (positive), `D ** -0.5` by default.
        attention_mask: optional boolean `[B, 1, q_len, kv_len]` (True = attend), e.g. transformers' `sdpa_mask`
            for left-padded batches and static caches. Without it the new tokens are the last `q_len` positions of
            each sequence's valid range and attend causally.
        kv_lengths: optional `[B]` valid cache length per sequence (positions `[0, length)`, length <= kv_len),
            instead of a mask. Lengths given on the CPU are checked; on the device they are not (that would wait
            for it).
        kv_bounds: optional `kv_bounds_from_mask(attention_mask[:, 0])` for this call's mask, when the caller has
            it already: the layers of a step share one mask, so it can be folded once per step instead of once per
            layer (three launches each). It must be that function's result for `attention_mask`.
        num_splits: cache slices per sequence and KV head (default: enough to fill the device).
        block_n, num_warps, num_stages: Triton launch parameters (cache positions per iteration, warps per
            program, software-pipelining depth: 3 by default, 2 with a mask and several new tokens; one more
            for a float8 cache read by at most one program per multiprocessor). The Hopper float8 kernel takes
            block_n=64 and num_warps=4 only, and num_stages from 3 up to what fits in shared memory (default 5, or
            fewer where shared memory holds fewer); other values run the Triton kernel.
    """
    others = {"key": key, "value": value, "attention_mask": attention_mask, "key_scale": key_scale,
              "value_scale": value_scale}  # fmt: skip
    check_kernel_inputs("decode_attention", "query", query, others)
    value_tiles = value.ndim == 5 and value.dtype == torch.float8_e4m3fn
    if query.ndim != 4 or key.ndim != 4 or (value.ndim != 4 and not value_tiles):
        raise ValueError(
            f"query/key/value must be 4-D [B, H, S, D] (float8 value tiles: 5-D), got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, num_heads, q_len, head_dim = query.shape
    _, num_kv_heads, kv_len, _ = key.shape
    if value_tiles:
        tile = value.shape[-1]
        value_ok = value.shape[:2] == key.shape[:2] and value.shape[3] == head_dim and value.shape[2] * tile >= kv_len
        if tile % 16 or value.stride(-1) != 1 or not value_ok:
            raise ValueError(
                f"value tiles must be [B, Hkv, ceil(kv_len / T), D, T] with T a multiple of 16 and positions "
                f"contiguous; got {tuple(value.shape)} with strides {value.stride()} for key {tuple(key.shape)}"
            )
    elif key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in shape")
    if key.shape[0] != batch or key.shape[-1] != head_dim:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} do not match query {tuple(query.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if key.dtype not in _CACHE_DTYPES or value.dtype != key.dtype:
        raise ValueError(f"unsupported cache dtypes {key.dtype}/{value.dtype}; expected one of {_CACHE_DTYPES}")
    if query.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported query dtype {query.dtype}")
    is_fp8 = key.dtype == torch.float8_e4m3fn
    if is_fp8:
        if key_scale is None or value_scale is None:
            raise ValueError("a float8 cache needs `key_scale` and `value_scale` ([B, Hkv, kv_len] float32)")
        for name, s in (("key_scale", key_scale), ("value_scale", value_scale)):
            if s.shape != key.shape[:3] or s.dtype != torch.float32:
                raise ValueError(f"`{name}` must be float32 {tuple(key.shape[:3])}, got {s.dtype} {tuple(s.shape)}")
    elif key.dtype != query.dtype:
        raise ValueError(f"query dtype {query.dtype} differs from the cache's {key.dtype}")
    if attention_mask is not None and kv_lengths is not None:
        raise ValueError("pass either `attention_mask` or `kv_lengths`, not both")
    if kv_bounds is not None:
        if attention_mask is None:
            raise ValueError("`kv_bounds` are the bounds of an `attention_mask`: pass the mask too")
        for name, bound in zip(("start", "end"), kv_bounds):
            if bound.shape != (batch,) or bound.dtype != torch.int32 or bound.device != query.device:
                raise ValueError(
                    f"`kv_bounds` {name} must be int32 ({batch},) on {query.device}, got {bound.dtype} "
                    f"{tuple(bound.shape)} on {bound.device}"
                )
    if kv_lengths is not None and kv_lengths.shape != (batch,):
        raise ValueError(f"`kv_lengths` must have shape ({batch},), got {tuple(kv_lengths.shape)}")
    lengths_on_host = kv_lengths is not None and kv_lengths.device.type == "cpu"
    if lengths_on_host and not bool(((kv_lengths >= 0) & (kv_lengths <= kv_len)).all()):
        raise ValueError(f"`kv_lengths` must lie in [0, {kv_len}] (the cache's length), got {kv_lengths.tolist()}")
    group = num_heads // num_kv_heads
    if group * q_len > MAX_QUERY_ROWS:
        raise ValueError(
            f"{group} query heads per KV head x {q_len} new tokens exceeds one {MAX_QUERY_ROWS}-row tile"
        )

    if attention_mask is not None:
        mask_ok = (
            attention_mask.ndim == 4
            and attention_mask.shape[0] in (1, batch)
            and attention_mask.shape[-2:] == (q_len, kv_len)
        )
        if attention_mask.dtype != torch.bool or not mask_ok:
            raise ValueError(
                f"`attention_mask` must be boolean [{batch} or 1, 1, {q_len}, {kv_len}], got {attention_mask.dtype} "
                f"{tuple(attention_mask.shape)}"
            )
        mask = attention_mask.expand(batch, -1, -1, -1)[:, 0]
        if attention_mask.shape[1] != 1:  # one mask per head: the kernel takes the head-shared form only
            if not torch.equal(attention_mask, attention_mask[:, :1].expand_as(attention_mask)):
                raise ValueError("`attention_mask` must be the same for every head")
    else:
        mask = None
    if block_n < 16 or block_n & (block_n - 1) or num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"`block_n` (>= 16) and `num_warps` must be powers of two, got {block_n} and {num_warps}")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"`num_stages` must be at least 1, got {num_stages}")
    if kv_lengths is not None:
        kv_lengths = kv_lengths.to(device=query.device, dtype=torch.int32)
    scale = head_dim**-0.5 if scale is None else scale
    if not (math.isfinite(scale) and scale * math.log2(math.e) >= torch.finfo(torch.float32).tiny):
        raise ValueError(f"`scale` must be positive, finite and not below float32's range, got {scale}")
    return _decode_attention_op(
        query, key, value, mask, kv_lengths, *(kv_bounds or (None, None)), key_scale, value_scale, scale, num_splits,
        block_n, num_warps, num_stages,
    )  # fmt: skip


# A custom op, so that compiled models (transformers compiles static-cache generation on CUDA, with CUDA graphs) keep
# the kernel inside their graph instead of breaking it.
@kernel_op("step3_hf::decode_attention")
def _decode_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
    key_scale: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    scale: float,
    num_splits: int | None,
    block_n: int,
    num_warps: int,
    num_stages: int | None,
) -> torch.Tensor:
    """The launches behind `decode_attention`, on arguments it has checked; `mask` is `[B, q_len, kv_len]`, `kv_start`
    and `kv_end` its bounds where the caller has them."""
    plan = _plan(query, key, value, mask, key_scale, value_scale, num_splits, block_n, num_warps, num_stages)
    batch, num_heads, q_len, head_dim = query.shape
    _, num_kv_heads, kv_len, _ = key.shape
    is_fp8 = key.dtype == torch.float8_e4m3fn
    rows = num_heads // num_kv_heads * q_len
    num_splits = plan.num_splits
    device = query.device
    if mask is not None:
        if kv_end is None:  # not folded by the caller
            kv_start, kv_end = kv_bounds_from_mask(mask)
    elif kv_lengths is not None:
        kv_start, kv_end = torch.zeros_like(kv_lengths), kv_lengths
    else:  # the kernel takes [0, kv_len) for every sequence: no bounds tensors to fill (two launches less)
        kv_start = kv_end = None

    out = torch.empty(batch, q_len, num_heads, head_dim, dtype=query.dtype, device=device)
    out_view = out.transpose(1, 2)  # [B, Hq, q_len, D] strides for the kernel
    if num_splits > 1:
        # Each split's partial output is normalised; float32, except for a float8 cache, whose e4m3 rounding (2^-4
        # relative) dwarfs bf16's (2^-9), and whose splits are short enough that partials were ~10% of its traffic.
        part_dtype = torch.bfloat16 if is_fp8 else torch.float32
        part_out = torch.empty(batch * num_kv_heads * num_splits * rows * head_dim, dtype=part_dtype, device=device)
        part_lse = torch.empty(batch * num_kv_heads * num_splits * rows, dtype=torch.float32, device=device)
    else:
        part_out = part_lse = out  # unused
    scale_log2 = scale * math.log2(math.e)
    if plan.kernel == "sm90":
        float8_attention_sm90(
            query, key, value, key_scale, value_scale, kv_end, out_view, part_out, part_lse, scale_log2, num_splits,
            plan.num_stages, plan.merge_early,
        )  # fmt: skip
    else:
        _launch_triton(
            plan, query, key, value, mask, kv_start, kv_end, key_scale, value_scale, out_view, part_out, part_lse,
            scale_log2, block_n, num_warps,
        )  # fmt: skip
    if num_splits > 1:
        _merge_splits[(triton.cdiv(rows, plan.merge_rows), batch * num_kv_heads)](
            part_out, part_lse, out_view, *out_view.stride(), num_kv_heads, q_len, num_splits,
            GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_R=plan.merge_rows, BLOCK_S=min(64, max(2, triton.next_power_of_2(num_splits))),
            WAIT_FOR_PRIOR_GRID=plan.merge_early, num_warps=max(1, min(4, plan.merge_rows // 2)),
            **({"launch_pdl": True} if plan.merge_early else {}),
        )  # fmt: skip
    return out


def _plan(query, key, value, mask, key_scale, value_scale, num_splits, block_n, num_warps, num_stages) -> DecodePlan:
    """`plan_decode_attention` for these tensors on their device."""
    batch, num_heads, q_len, head_dim = query.shape
    _, num_kv_heads, kv_len, _ = key.shape
    value_tile = value.shape[-1] if value.ndim == 5 else 0
    if value_tile:  # float8 value tiles; the key and scales are `[B, Hkv, positions(, D)]`
        stored = min(
            _stored_positions(value, 2) * value_tile,
            *(_stored_positions(t, 2) for t in (key, key_scale, value_scale)),
        )
    else:
        stored = kv_len  # rows: every load is bounds-checked
    return plan_decode_attention(
        batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads, q_len=q_len, kv_len=kv_len, head_dim=head_dim,
        float8=key.dtype == torch.float8_e4m3fn, float32_query=query.dtype == torch.float32,
        masked=mask is not None, device=decode_device(query.device), value_tile=value_tile,
        dense=bool(value_tile) and dense_layout(query, key, value, key_scale, value_scale), stored_positions=stored,
        num_splits=num_splits, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def _launch_triton(
    plan, query, key, value, mask, kv_start, kv_end, key_scale, value_scale, out_view, part_out, part_lse,
    scale_log2, block_n, num_warps,
):  # fmt: skip
    """The Triton attention kernel, as `plan` says."""
    batch, num_heads, q_len, head_dim = query.shape
    _, num_kv_heads, kv_len, _ = key.shape
    is_fp8 = key.dtype == torch.float8_e4m3fn
    group = num_heads // num_kv_heads
    dummy = out_view  # stands in for absent optional pointers
    if value.ndim == 5:  # value tiles [B, H, tiles, D, T]: (batch, head, tile, position in tile, d) strides
        v_tile = value.shape[-1]
        v_strides = (*value.stride()[:3], value.stride(4), value.stride(3))
    else:
        v_tile = 0
        v_strides = (*value.stride()[:2], 0, *value.stride()[2:])
    launch_args = (
        query, key, value, key_scale if is_fp8 else dummy, value_scale if is_fp8 else dummy,
        mask if mask is not None else dummy, kv_start if kv_start is not None else dummy,
        kv_end if kv_end is not None else dummy, out_view, part_out, part_lse,
        *query.stride(), *key.stride(), *v_strides,
        *(key_scale.stride() if is_fp8 else (0, 0, 0)), *(value_scale.stride() if is_fp8 else (0, 0, 0)),
        *(mask.stride() if mask is not None else (0, 0, 0)), *out_view.stride(),
        num_kv_heads, q_len, kv_len, scale_log2, plan.num_splits,
    )  # fmt: skip
    constants = dict(
        GROUP=group, BLOCK_M=max(16, triton.next_power_of_2(group * q_len)), HEAD_DIM=head_dim, BLOCK_N=block_n,
        # e4m3 tensor-core products reduce over at least 32 elements
        BLOCK_D=max(32 if plan.float8_products else 16, triton.next_power_of_2(head_dim)),
        HAS_MASK=mask is not None, CAUSAL_TAIL=mask is None and q_len > 1, IS_FP8=is_fp8,
        FP8_MMA=plan.float8_products, V_TILE=v_tile, READABLE=plan.unchecked_loads, HAS_BOUNDS=kv_end is not None,
        SINGLE_SPLIT=plan.num_splits == 1, SINGLE_TOKEN=q_len == 1, DOT_F32=plan.float32_products,
        LAUNCH_MERGE=plan.merge_early,
    )  # fmt: skip
    # A GPU with less shared memory than the H200 cannot hold the default pipeline: one stage fewer per retry.
    for stages in range(plan.num_stages, 0, -1):
        try:
            _split_kv_attention[(plan.num_splits, batch * num_kv_heads)](
                *launch_args, **constants, num_warps=num_warps, num_stages=stages
            )
            return
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise


@_decode_attention_op.register_fake
def _(query, key, value, mask, kv_lengths, kv_start, kv_end, key_scale, value_scale, scale, num_splits, block_n,
      num_warps, num_stages):  # fmt: skip
    batch, num_heads, q_len, head_dim = query.shape
    return query.new_empty(batch, q_len, num_heads, head_dim)
