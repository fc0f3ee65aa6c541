"""The float8 split-KV decode-attention loop for Hopper, written in Gluon (Triton's explicit-layout dialect).

One 4-warp program per multiprocessor reads one slice of a float8 cache, as `decode_attention.py`'s Triton kernel
does there, but issues its tensor-core products asynchronously: block `j + 1`'s `q K^T` runs while block `j`'s
softmax does (FlashAttention-3's overlap within one warpgroup). Block `j`'s `P V` is waited for within its
iteration: when a product stayed in flight across iterations, ptxas serialised every product of the kernel. Key
rows, value tiles and both scales stream in through `cp.async` several blocks ahead; the query and the slice's value
scales are requested before them, and the result leaves in 16-byte stores. On the H200 its loop took 57-63 us per
4096-position slice against 72-74 us for the Triton kernel's (timestamped copies; docs/performance.md).

Same inputs, partial results and merge pass as the Triton kernel. `decode_attention` runs it for float8 caches in
value tiles without a mask on compute capability 9.x, where slices are short enough (`decode_attention_plan.py`
says when).
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # Triton without Gluon (before 3.5): the Triton kernel serves every call
    gluon = gl = None

__all__ = ["dense_layout", "float8_attention_sm90", "shared_memory_bytes"]

BLOCK_M = 64  # query rows per program: one warpgroup's tensor-core tile
BLOCK_N = 64  # cache positions per block: one value tile of the float8 cache (`VALUE_TILE`)
HEAD_DIMS = (64, 128, 256)
DEFAULT_STAGES = 5  # faster than 4 on every shape it serves (H200); 178.75 KiB of shared memory at Step-3's width


def shared_memory_bytes(head_dim: int, num_stages: int) -> int:
    """The kernel's shared memory: the e4m3 query, and per stage a key block, a value tile and their scales (as
    compiled by Triton 3.6, which adds 256 bytes)."""
    return BLOCK_M * head_dim + num_stages * (2 * BLOCK_N * head_dim + 2 * 4 * BLOCK_N) + 256


def _gluon_jit(fn):
    return fn if gluon is None else gluon.jit(fn)


def _constexpr_function(fn):
    return fn if gluon is None else gluon.constexpr_function(fn)


@_constexpr_function
def _copy_layout(rows, row_bytes, element_bytes):
    """A `[rows, row_bytes / element_bytes]` tile over 4 warps, 16 bytes per thread and access, rows contiguous."""
    per_thread = 16 // element_bytes
    threads_per_row = min(32, row_bytes // 16)
    return gl.BlockedLayout([1, per_thread], [32 // threads_per_row, threads_per_row], [4, 1], [1, 0])


@_gluon_jit
def _issue_block(
    index, lo, hi, k_base, v_base, stride_vt, ks_base, vs_base, k_bufs, v_bufs, ks_bufs, vs_bufs,
    HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
):  # fmt: skip
    """Starts copying block `index` of the slice (keys, value tile, both scales) into its stage. Key rows and scales
    past `hi` are not read (zeros land there); a value tile is read whole, as it lies inside the tensor: its
    positions past `hi` get probability 0."""
    stage = index % NUM_STAGES
    n0 = lo + index * BLOCK_N
    k_copy: gl.constexpr = _copy_layout(BLOCK_N, HEAD_DIM, 1)
    v_copy: gl.constexpr = _copy_layout(HEAD_DIM, BLOCK_N, 1)
    s_copy: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
    k_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, k_copy))
    k_offs = k_rows[:, None] * HEAD_DIM + gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, k_copy))[None, :]
    v_offs = (gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, v_copy))[:, None] * BLOCK_N
              + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, v_copy))[None, :])  # fmt: skip
    s_offs = gl.arange(0, BLOCK_N, layout=s_copy)
    k_rows_ok = (n0 + k_rows < hi)[:, None]
    async_copy.async_copy_global_to_shared(k_bufs.index(stage), k_base + n0 * HEAD_DIM + k_offs, mask=k_rows_ok)
    async_copy.async_copy_global_to_shared(v_bufs.index(stage), v_base + (n0 // BLOCK_N) * stride_vt + v_offs,
                                           mask=n0 < hi)  # fmt: skip
    s_ok = n0 + s_offs < hi
    async_copy.async_copy_global_to_shared(ks_bufs.index(stage), ks_base + n0 + s_offs, mask=s_ok)
    async_copy.async_copy_global_to_shared(vs_bufs.index(stage), vs_base + n0 + s_offs, mask=s_ok)
    async_copy.commit_group()


@_gluon_jit
def _float8_attention_sm90(
    Q, K, V, K_SCALE, V_SCALE, KV_END, OUT, PART_OUT, PART_LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh,
    stride_vb, stride_vh, stride_vt,
    stride_ksb, stride_ksh,
    stride_vsb, stride_vsh,
    stride_ob, stride_oh, stride_ot,
    num_kv_heads, q_len, kv_len, qk_scale_log2, num_splits,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_BOUNDS: gl.constexpr, CAUSAL_TAIL: gl.constexpr, SINGLE_SPLIT: gl.constexpr,
    LAUNCH_MERGE: gl.constexpr,
):  # fmt: skip
    """One program: all `GROUP * q_len` query rows of one (sequence, KV head) against one slice of its cache.
    Unit strides: query, scales and output along their last dimension; key rows contiguous (`HEAD_DIM` apart);
    value tiles `[D, BLOCK_N]` contiguous."""
    split = gl.program_id(0)
    seq_head = gl.program_id(1)
    b = seq_head // num_kv_heads
    kv_head = seq_head % num_kv_heads

    # Tensor-core layouts: scores [M, N] and output [M, D] as wgmma accumulators; e4m3 probabilities as the
    # register operand of `P V` (4 consecutive k per register).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout([3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_copy: gl.constexpr = _copy_layout(BLOCK_M, 2 * HEAD_DIM, 2)
    fp8: gl.constexpr = gl.float8e4nv

    q_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], fp8)
    k_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], fp8)
    v_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HEAD_DIM, BLOCK_N], fp8)
    q_smem = gl.allocate_shared_memory(fp8, [BLOCK_M, HEAD_DIM], q_shared)
    k_bufs = gl.allocate_shared_memory(fp8, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_shared)
    v_bufs = gl.allocate_shared_memory(fp8, [NUM_STAGES, HEAD_DIM, BLOCK_N], v_shared)
    flat: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    ks_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_N], flat)
    vs_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_N], flat)

    # This program's slice [lo, hi) of [0, end), cut at multiples of BLOCK_N: each block is one value tile.
    if HAS_BOUNDS:
        end = gl.load(KV_END + b)
    else:
        end = kv_len
    chunk = gl.cdiv(gl.cdiv(end, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = gl.minimum(lo + chunk, end)
    n_blocks = gl.maximum(gl.cdiv(hi - lo, BLOCK_N), 0)

    k_base = K + b * stride_kb + kv_head * stride_kh
    v_base = V + b * stride_vb + kv_head * stride_vh
    ks_base = K_SCALE + b * stride_ksb + kv_head * stride_ksh
    vs_base = V_SCALE + b * stride_vsb + kv_head * stride_vsh
    # The query and the slice's first value scales are requested before the cache blocks, which would otherwise
    # queue ahead of them (6 us of prologue at Step-3's width, measured).
    q_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_copy))
    q_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_copy))
    q_ok = (q_rows < GROUP * q_len)[:, None] & (q_cols < HEAD_DIM)[None, :]
    q_head = kv_head * GROUP + q_rows // q_len
    q_ptrs = Q + b * stride_qb + q_head[:, None] * stride_qh + (q_rows % q_len)[:, None] * stride_qt + q_cols[None, :]
    q = gl.load(q_ptrs, mask=q_ok, other=0.0)
    vmax_layout: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
    VMAX_CHUNK: gl.constexpr = 4096  # value scales per load: a slice of up to 4096 positions in one round trip
    v_offs = lo + gl.arange(0, VMAX_CHUNK, layout=vmax_layout)
    v_max = gl.load(vs_base + v_offs, mask=v_offs < hi, other=0.0)
    for i in gl.static_range(NUM_STAGES - 1):  # the first blocks stream in while the query is prepared
        _issue_block(i, lo, hi, k_base, v_base, stride_vt, ks_base, vs_base, k_bufs, v_bufs, ks_bufs, vs_bufs,
                     HEAD_DIM, BLOCK_N, NUM_STAGES)  # fmt: skip

    # The query, scaled per row into e4m3's range with the softmax scale (log2 units) folded in; the row scale
    # multiplies the scores.
    q = q.to(gl.float32) * qk_scale_log2
    q_amax = gl.max(gl.abs(q), 1)
    q_scale = gl.where(q_amax > 0.0, q_amax / 448.0, 1.0)  # e4m3's largest finite value
    q_smem.store((q / q_scale[:, None]).to(fp8))
    q_scale = gl.convert_layout(q_scale, rows_s)

    # P @ (s_v * V) == ((P * s_v / max s_v) @ V) * max s_v: the value scales go onto the probabilities' columns,
    # relative to the slice's largest, and e4m3 probabilities are lifted by 256 out of its subnormal range.
    for n0 in range(lo + VMAX_CHUNK, hi, VMAX_CHUNK):
        v_offs = n0 + gl.arange(0, VMAX_CHUNK, layout=vmax_layout)
        v_max = gl.maximum(v_max, gl.load(vs_base + v_offs, mask=v_offs < hi, other=0.0))
    p_unit = 256.0 / gl.maximum(gl.max(v_max, 0), 1e-30)

    row = gl.arange(0, BLOCK_M, layout=rows_s)
    tok = row % q_len
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    no_scores = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    async_copy.wait_group(NUM_STAGES - 2)  # block 0 has landed
    # Each thread's shared-memory writes (its copies, the query) are made visible to the tensor cores, then all meet.
    fence_async_shared()
    gl.thread_barrier()
    scores = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), no_scores, use_acc=False, is_async=True)
    scores = warpgroup_mma_wait(num_outstanding=0, deps=(scores,))
    for j in range(0, n_blocks):
        stage = j % NUM_STAGES
        # Block j + 1's q K^T runs while block j's softmax does (past the slice it multiplies zeros, unused).
        async_copy.wait_group(NUM_STAGES - 3)
        fence_async_shared()
        gl.thread_barrier()
        next_scores = warpgroup_mma(
            q_smem, k_bufs.index((j + 1) % NUM_STAGES).permute((1, 0)), no_scores, use_acc=False, is_async=True
        )

        n0 = lo + j * BLOCK_N
        scores = scores * ks_bufs.index(stage).load(cols_s)[None, :]  # q_scale > 0 is applied below
        if n0 + BLOCK_N > hi - CAUSAL_TAIL * q_len:  # the slice's end (or the causal tail) cuts this block
            offs_n = n0 + gl.arange(0, BLOCK_N, layout=cols_s)
            keep = (offs_n < hi)[None, :]
            if CAUSAL_TAIL:  # the new tokens are the last q_len cached positions
                keep = keep & (offs_n[None, :] <= end - q_len + tok[:, None])
            scores = gl.where(keep, scores, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(scores, 1) * q_scale)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at zero
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(scores * q_scale[:, None] - m_safe[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        v_scale = vs_bufs.index(stage).load(cols_s) * p_unit
        p_v = gl.convert_layout((p * v_scale[None, :]).to(fp8), p_layout)

        acc = acc * gl.convert_layout(alpha, rows_o)[:, None]
        pv = warpgroup_mma(p_v, v_bufs.index(stage).permute((1, 0)), acc, is_async=True)
        # Block j - 1's stage is free again: refill it NUM_STAGES - 1 blocks ahead.
        _issue_block(j + NUM_STAGES - 1, lo, hi, k_base, v_base, stride_vt, ks_base, vs_base, k_bufs, v_bufs, ks_bufs,
                     vs_bufs, HEAD_DIM, BLOCK_N, NUM_STAGES)  # fmt: skip
        scores = warpgroup_mma_wait(num_outstanding=1, deps=(next_scores,))
        # Nothing stays in flight across iterations: ptxas serialises every product of a loop that carries one.
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(pv,))
        m_i = m_new
    async_copy.wait_group(0)

    if LAUNCH_MERGE:  # the merge may start on the resources this grid frees from now on (it waits for the grid)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)  # fmt: skip
    has_any = l_i > 0.0
    l_o = gl.convert_layout(gl.where(has_any, l_i, 1.0), rows_o)
    out_dtype: gl.constexpr = OUT.dtype.element_ty if SINGLE_SPLIT else PART_OUT.dtype.element_ty
    # Stored 16 bytes per thread and access (the accumulator layout would store 4-byte pieces: 2-3 us, measured).
    store_layout: gl.constexpr = _copy_layout(BLOCK_M, HEAD_DIM * out_dtype.primitive_bitwidth // 8,
                                              out_dtype.primitive_bitwidth // 8)  # fmt: skip
    # acc holds P V lifted by p_unit: unlift first (l * p_unit could overflow float32 for tiny value scales)
    out = gl.convert_layout((acc * (1.0 / p_unit) * (1.0 / l_o)[:, None]).to(out_dtype), store_layout)
    o_row = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_layout))
    o_col = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, store_layout))
    o_ok = (o_row < GROUP * q_len)[:, None] & (o_col < HEAD_DIM)[None, :]
    if SINGLE_SPLIT:
        o_rows = b * stride_ob + (kv_head * GROUP + o_row // q_len) * stride_oh + (o_row % q_len) * stride_ot
        gl.store(OUT + o_rows[:, None] + o_col[None, :], out, mask=o_ok)
    else:
        part = (seq_head * num_splits + split) * (GROUP * q_len)
        gl.store(PART_OUT + (part + o_row)[:, None] * HEAD_DIM + o_col[None, :], out, mask=o_ok)
        lse = gl.where(has_any, m_i + gl.log2(gl.where(has_any, l_i, 1.0)), float("-inf"))
        gl.store(PART_LSE + part + row, lse, mask=row < GROUP * q_len)


def dense_layout(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_scale: torch.Tensor, value_scale: torch.Tensor
) -> bool:
    """Whether the tensors have the unit inner strides this kernel assumes: query and key rows, value tiles stored
    D-major with positions contiguous, and both scales. (The plan checks the rest: `decode_attention_plan.py`.)"""
    return (
        value.ndim == 5
        and value.stride(-1) == 1
        and value.stride(-2) == value.shape[-1]
        and query.stride(-1) == 1
        and key.stride(-1) == 1
        and key.stride(-2) == key.shape[-1]
        and key_scale.stride(-1) == 1
        and value_scale.stride(-1) == 1
    )


def float8_attention_sm90(
    query, key, value, key_scale, value_scale, kv_end, out_view, part_out, part_lse, scale_log2, num_splits,
    num_stages, launch_merge,
):  # fmt: skip
    """Launches the kernel on arguments `decode_attention` has checked, as its plan says (`plan_decode_attention`)."""
    batch, num_heads, q_len, head_dim = query.shape
    _, num_kv_heads, kv_len, _ = key.shape
    _float8_attention_sm90[(num_splits, batch * num_kv_heads)](
        query, key, value, key_scale, value_scale, kv_end if kv_end is not None else out_view, out_view,
        part_out, part_lse,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), value.stride(2),
        key_scale.stride(0), key_scale.stride(1),
        value_scale.stride(0), value_scale.stride(1),
        out_view.stride(0), out_view.stride(1), out_view.stride(2),
        num_kv_heads, q_len, kv_len, scale_log2, num_splits,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        NUM_STAGES=num_stages, HAS_BOUNDS=kv_end is not None, CAUSAL_TAIL=q_len > 1,
        SINGLE_SPLIT=num_splits == 1, LAUNCH_MERGE=launch_merge, num_warps=4,
    )  # fmt: skip
