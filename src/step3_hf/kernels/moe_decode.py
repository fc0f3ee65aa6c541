"""Routed SwiGLU experts: a Triton "sorted token blocks" fused-MoE kernel, built for decode-sized batches.

At decode each of Step-3's 48 experts sees a handful of token rows (~4 at batch 64, ~16 at batch 256), so an
expert layer is a memory-bound stream of ~10.6 GB of weights, and the job is to read every hit expert's weights
once, at close to HBM bandwidth. The (token, k) pairs are sorted by expert and each expert's rows padded to a
multiple of `BLOCK_M`; one program multiplies one block of an expert's rows by one `BLOCK_N` slice of that expert's
weights, so in the common case (an expert's rows fit one block) every weight byte is read exactly once.

- Alignment (`align_pairs_to_blocks`): one single-program Triton launch at decode sizes (torch ops beyond them),
  with no host synchronisation, so the whole path can be captured in a CUDA graph. Its arrays have static
  upper-bound lengths; padding slots hold a sentinel pair id and blocks past the last expert's a sentinel expert id
  (those programs exit at once).
- Kernel 1: `gate_up_proj[e]` `[2I, H]` against the block's rows, gate and up halves in two fp32 accumulators,
  writing `act(gate) * up` in the weight dtype to an `[S, I]` buffer at each pair's index.
- Kernel 2: `down_proj[e]` `[H, I]` against that buffer, scaled by each pair's routing weight, fp32 `[S, H]`; the
  top-k partial outputs of each token are then summed in fp32 and rounded once, by a third small kernel (a
  deterministic sum in a fixed order; atomics in kernel 2 would not be).

At decode the path is four launches (align, the two kernels, the sum), where the torch alignment and reduction
alone were ~17 (issue 21: a decode step is bound by the host issuing launches).

Block-FP8 expert weights (float8 e4m3 with one float32 `scale_inv` per `[SN, SK]` tile, transformers' `FP8Experts`)
run through the same kernels: each `BLOCK_K` step lies within one scale column, so a step's float8 tile is widened
exactly to the activations' dtype, multiplied, and the fp32 partial product scaled per output row; weights are read
as one byte each. With `quantize_activations` the kernels' inputs (the tokens, then the intermediate activation) are
first rounded to e4m3 per row and 128 columns (`quantize_fp8_activations`, one launch each: the release's dynamic
activation scheme), and each step multiplies float8 by float8 on the tensor cores, its fp32 product scaled per
weight row and per activation row: no widening, and tensor cores twice as fast as bf16's for a prefill.

The kernels take any token count. `default_launch` picks the launch from the average rows per expert: the decode
launch above, or for prefill-sized calls (the FP8 experts' prefill; bf16 prefill goes to `grouped_mm`), where the
FLOPs rather than the weight bytes set the roofline, 64-row blocks of 64 x 64 tiles over 8 warps.

`transformers_experts.py` registers it with transformers as `experts_implementation="moe_decode"` (also for
`FP8Experts`).
With `TRITON_INTERPRET=1` set before Triton is imported, the kernels run on CPU tensors (the tests do this).
"""

from __future__ import annotations

import torch

from .fp8_activation_quant import GROUP_SIZE, float8_products_supported, quantize_fp8_activations
from .triton_support import (
    MIN_FP8_DOT_K,
    check_kernel_inputs,
    interpreter_enabled,
    kernel_available,
    kernel_op,
    tl,
    triton,
    triton_jit,
)

__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "SUPPORTED_DTYPES",
    "align_pairs_to_blocks",
    "default_block_m",
    "default_launch",
    "moe_decode",
]

# transformers' activation names that the kernel computes (SiLU, as Step-3's `hidden_act`).
SUPPORTED_ACTIVATIONS = ("silu", "swish")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton_jit
def _expert_block(BLOCK_EXPERT, SORTED_PAIR, block, num_pairs, BLOCK_M: tl.constexpr):
    """A block's expert, its rows' pair ids, and which rows are real (padding slots hold the sentinel `num_pairs`).
    Both int64: expert * stride exceeds int32 at Step-3 widths (48 x 2 x 5120 x 7168), and so does pair * stride in
    the `[S, H]` and `[S, I]` buffers of a long prefill (S * 7168 above 2^31 from 300k pairs)."""
    expert = tl.load(BLOCK_EXPERT + block).to(tl.int64)
    pair = tl.load(SORTED_PAIR + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return expert, pair, pair < num_pairs


@triton_jit
def _program_ids(BLOCKS_FIRST: tl.constexpr):
    """(output-column slice, expert block) of this program. BLOCKS_FIRST: the grid's first axis runs over the expert
    blocks, so the programs launched together read the same column slice of every expert, and the blocks of one
    expert read it at about the same time (the second from L2)."""
    if BLOCKS_FIRST:
        return tl.program_id(1), tl.program_id(0)
    else:
        return tl.program_id(0), tl.program_id(1)


@triton_jit
def _load_k_tile(ptrs, rows_ok, k_left, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """A `[rows, BLOCK_K]` tile of a K-contiguous operand: masked rows and, unless EVEN_K, the K tail read as 0."""
    mask = rows_ok[:, None]
    if not EVEN_K:
        mask = mask & (tl.arange(0, BLOCK_K) < k_left)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton_jit
def _add_product(acc, a, w, DOT_F32: tl.constexpr):
    """`acc + a @ w.T`; exact float32 products under DOT_F32 (the interpreter's bf16 dot is wrong, seen with
    Triton 3.8)."""
    if DOT_F32:
        acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        acc += tl.dot(a, tl.trans(w))
    return acc


@triton_jit
def _row_scales(AS, rows, rows_ok, k, stride_asm, stride_ask, A8: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP: tl.constexpr):  # fmt: skip
    """Under A8, the float8 activation rows' scales for this K step (which lies within one group); else unused."""
    if A8:
        return tl.load(AS + rows * stride_asm + (k * BLOCK_K // GROUP) * stride_ask, mask=rows_ok, other=0.0)
    return tl.zeros(rows.shape, tl.float32)


@triton_jit
def _add_scaled_product(acc, a, w, S, rows_ok, k, DOT_F32: tl.constexpr, FP8: tl.constexpr, BLOCK_K: tl.constexpr,
                        SN: tl.constexpr, SK: tl.constexpr, offs_rows, stride_sn, stride_sk, a_scale,
                        A8: tl.constexpr):  # fmt: skip
    """`acc + a @ w.T`, with block-FP8 `w` widened to `a`'s dtype (under A8, float8 `a` and `w` multiplied as they
    are, and the product scaled by `a_scale` per row of `a` too) and the product scaled by each weight row's tile
    scale for this K step (`S` points at the expert's scales)."""
    if FP8:
        scale = tl.load(S + (offs_rows // SN) * stride_sn + (k * BLOCK_K // SK) * stride_sk, mask=rows_ok, other=0.0)
        partial = tl.zeros(acc.shape, tl.float32)
        if A8:
            partial = _add_product(partial, a, w, DOT_F32)
            acc += partial * scale[None, :] * a_scale[:, None]
        else:
            partial = _add_product(partial, a, w.to(a.dtype), DOT_F32)
            acc += partial * scale[None, :]
    else:
        acc = _add_product(acc, a, w, DOT_F32)
    return acc


@triton_jit
def _gate_up_swiglu(
    X, XS, W, S, SORTED_PAIR, BLOCK_EXPERT, INTER,
    stride_xt, stride_xh, stride_xst, stride_xsh, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
    stride_is, stride_in, num_pairs, num_experts, hidden, inter, top_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr, FP8: tl.constexpr, SN: tl.constexpr, SK: tl.constexpr, A8: tl.constexpr,
    GROUP: tl.constexpr, BLOCKS_FIRST: tl.constexpr,
):  # fmt: skip
    """One program: rows of one expert block x one BLOCK_N slice of the intermediate dimension (gate and up). Under
    A8, X is float8 with one scale per token and GROUP columns (XS)."""
    pid_n, block = _program_ids(BLOCKS_FIRST)
    expert, pair, row_ok = _expert_block(BLOCK_EXPERT, SORTED_PAIR, block, num_pairs, BLOCK_M)
    if expert >= num_experts:  # a block past the last expert's rows: no work
        return
    token = tl.where(row_ok, pair // top_k, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = X + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
    # Gate rows [n-slice] and up rows [I + n-slice] of gate_up_proj[e] ([2I, H], K-contiguous): [BLOCK_N, BLOCK_K]
    # tiles, multiplied transposed.
    gate_ptrs = W + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    up_ptrs = gate_ptrs + inter * stride_wn
    scales = S + expert * stride_se
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_left = hidden - k * BLOCK_K
        x = _load_k_tile(x_ptrs, row_ok, k_left, BLOCK_K, EVEN_K)
        gate = _load_k_tile(gate_ptrs, n_ok, k_left, BLOCK_K, EVEN_K)
        up = _load_k_tile(up_ptrs, n_ok, k_left, BLOCK_K, EVEN_K)
        x_scale = _row_scales(XS, token, row_ok, k, stride_xst, stride_xsh, A8, BLOCK_K, GROUP)
        acc_gate = _add_scaled_product(acc_gate, x, gate, scales, n_ok, k, DOT_F32, FP8, BLOCK_K, SN, SK,
                                       offs_n, stride_sn, stride_sk, x_scale, A8)  # fmt: skip
        acc_up = _add_scaled_product(acc_up, x, up, scales, n_ok, k, DOT_F32, FP8, BLOCK_K, SN, SK,
                                     inter + offs_n, stride_sn, stride_sk, x_scale, A8)  # fmt: skip
        x_ptrs += BLOCK_K * stride_xh
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk

    activated = acc_gate * tl.sigmoid(acc_gate) * acc_up  # SiLU(gate) * up
    out_ptrs = INTER + pair[:, None] * stride_is + offs_n[None, :] * stride_in
    tl.store(out_ptrs, activated.to(INTER.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton_jit
def _down_weighted(
    INTER, IS, W, S, SORTED_PAIR, BLOCK_EXPERT, ROUTING, OUT,
    stride_is, stride_in, stride_iss, stride_isn, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk,
    stride_os, stride_oh, num_pairs, num_experts, hidden, inter,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr, FP8: tl.constexpr, SN: tl.constexpr, SK: tl.constexpr, A8: tl.constexpr,
    GROUP: tl.constexpr, BLOCKS_FIRST: tl.constexpr,
):  # fmt: skip
    """One program: rows of one expert block x one BLOCK_N slice of the hidden dimension, times routing weights.
    Under A8, INTER is float8 with one scale per pair and GROUP columns (IS)."""
    pid_n, block = _program_ids(BLOCKS_FIRST)
    expert, pair, row_ok = _expert_block(BLOCK_EXPERT, SORTED_PAIR, block, num_pairs, BLOCK_M)
    if expert >= num_experts:
        return
    safe_pair = tl.where(row_ok, pair, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = INTER + safe_pair[:, None] * stride_is + offs_k[None, :] * stride_in
    w_ptrs = W + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    scales = S + expert * stride_se
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        k_left = inter - k * BLOCK_K
        a = _load_k_tile(a_ptrs, row_ok, k_left, BLOCK_K, EVEN_K)
        w = _load_k_tile(w_ptrs, n_ok, k_left, BLOCK_K, EVEN_K)
        a_scale = _row_scales(IS, safe_pair, row_ok, k, stride_iss, stride_isn, A8, BLOCK_K, GROUP)
        acc = _add_scaled_product(acc, a, w, scales, n_ok, k, DOT_F32, FP8, BLOCK_K, SN, SK, offs_n,
                                  stride_sn, stride_sk, a_scale, A8)  # fmt: skip
        a_ptrs += BLOCK_K * stride_in
        w_ptrs += BLOCK_K * stride_wk

    routing = tl.load(ROUTING + safe_pair, mask=row_ok, other=0.0).to(tl.float32)
    out_ptrs = OUT + pair[:, None] * stride_os + offs_n[None, :] * stride_oh
    tl.store(out_ptrs, acc * routing[:, None], mask=row_ok[:, None] & n_ok[None, :])


# Average rows per expert up to which a call is decode-sized: memory-bound, so the launch reads each weight byte once.
# Above it (prefill) the FLOPs rather than the weight bytes set the roofline.
MAX_DECODE_ROWS_PER_EXPERT = 32
DECODE_LAUNCH = dict(block_n=64, block_k=128, num_warps=4, num_stages=4, expert_blocks_first=False)  # the sweeps
# Prefill: 64-row blocks (every block but an expert's last one full) and 64 x 64 tiles over 8 warps, the largest that
# Triton 3.8 compiles for sm_90 without register spills (`ptxas -v`: 128-row or 128-column tiles spill 0.7-3.5 KB
# per thread in the gate/up kernel, which holds two accumulators). Not timed yet: `benchmarks/moe_decode.py
# --sweep-fp8` prints the best launch beside it.
PREFILL_LAUNCH = dict(block_m=64, block_n=64, block_k=64, num_warps=8, num_stages=3, expert_blocks_first=False)


@triton_jit
def _sum_choices(PARTIAL, EXPERT_IDS, OUT, hidden, top_k, num_experts, BLOCK_H: tl.constexpr):
    """One program: one token's BLOCK_H columns, its top-k fp32 partial rows summed in order k = 0, 1, ... and
    rounded once to the output dtype (deterministic: no atomics). A choice outside `[0, num_experts)` adds nothing:
    no program wrote its partial row."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < hidden
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in range(0, top_k):
        expert = tl.load(EXPERT_IDS + token * top_k + k)
        hit = (expert >= 0) & (expert < num_experts)
        acc += tl.load(PARTIAL + (token * top_k + k) * hidden + offs, mask=ok & hit, other=0.0)
    tl.store(OUT + token * hidden + offs, acc.to(OUT.dtype.element_ty), mask=ok)


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block. Decode-sized calls: twice the average rows per expert, rounded up to a power of two, within
    [16, 64] (tensor-core tiles need 16 rows), so that in the common case one block holds all of an expert's rows and
    its weights are read once. (At the average itself, batch 256 on the H200: 1.30x the weight-read time instead of
    0.99x at batch 64, as the busier half of the experts took two blocks.) Prefill-sized calls (above
    `MAX_DECODE_ROWS_PER_EXPERT` rows per expert on average): `PREFILL_LAUNCH`'s."""
    return default_launch(num_pairs, num_experts)["block_m"]


def default_launch(num_pairs: int, num_experts: int) -> dict[str, int]:
    """`moe_decode`'s launch parameters for `num_pairs` (token, choice) pairs over `num_experts` experts, by the
    average rows per expert: `DECODE_LAUNCH` up to `MAX_DECODE_ROWS_PER_EXPERT`, `PREFILL_LAUNCH` above."""
    average = -(-num_pairs // num_experts)  # rounded up
    if average > MAX_DECODE_ROWS_PER_EXPERT:
        return dict(PREFILL_LAUNCH)
    return dict(block_m=min(64, max(16, triton.next_power_of_2(2 * average))), **DECODE_LAUNCH)


# The one-launch alignment runs in one program, which walks the pairs (and the slots) in chunks of a
# `[experts, chunk]` one-hot tile; beyond these sizes (not decode) the torch ops take over.
# 512 tokens (transformers_experts.MAX_MOE_DECODE_TOKENS, bf16 experts) x top-8; FP8 prefill slices go beyond it.
MAX_FUSED_ALIGN_PAIRS = 4096
MAX_FUSED_ALIGN_EXPERTS = 1024


@triton_jit
def _one_hot_chunk(EXPERT_IDS, start, num_pairs, num_experts, experts, CHUNK: tl.constexpr):
    """`[BLOCK_E, CHUNK]` int32 one-hot of the expert ids of pairs `start + [0, CHUNK)`, those pair ids (int32) and
    which of them are pairs with an id in `[0, num_experts)` (others hit no expert)."""
    pairs = start + tl.arange(0, CHUNK)
    ids = tl.load(EXPERT_IDS + pairs, mask=pairs < num_pairs, other=-1)
    valid = (pairs < num_pairs) & (ids >= 0) & (ids < num_experts)
    ids = tl.where(valid, ids, -1).to(tl.int32)
    return (ids[None, :] == experts[:, None]).to(tl.int32), pairs, valid


@triton_jit
def _align_pairs(EXPERT_IDS, SORTED_PAIR, BLOCK_EXPERT, num_pairs, num_experts, num_blocks,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """One program: `align_pairs_to_blocks` (the histogram of expert ids, the prefix sums of the experts' padded
    rows, each pair's slot, the sentinel in padding slots, the expert of each block)."""
    experts = tl.arange(0, BLOCK_E)
    real_expert = (experts < num_experts)[:, None]
    counts = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, num_pairs, CHUNK):
        hit, _, _ = _one_hot_chunk(EXPERT_IDS, start, num_pairs, num_experts, experts, CHUNK)
        counts += tl.sum(hit, axis=1)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    padded_start = (block_end - blocks) * BLOCK_M  # first slot of each expert

    # A pair's slot: its expert's first slot plus the earlier pairs of that expert (stable, as a stable sort).
    earlier = tl.zeros([BLOCK_E], tl.int32)  # pairs of each expert in the chunks before
    for start in range(0, num_pairs, CHUNK):
        hit, pairs, valid = _one_hot_chunk(EXPERT_IDS, start, num_pairs, num_experts, experts, CHUNK)
        before = tl.cumsum(hit, axis=1) - hit + earlier[:, None]
        slot = tl.sum(hit * (padded_start[:, None] + before), axis=0)
        tl.store(SORTED_PAIR + slot, pairs, mask=valid)
        earlier += tl.sum(hit, axis=1)

    # The sentinel in every slot that no pair takes (disjoint from the stores above: no ordering needed).
    num_slots = num_blocks * BLOCK_M
    for start in range(0, num_slots, CHUNK):
        slots = start + tl.arange(0, CHUNK)
        row = slots[None, :] - padded_start[:, None]
        taken = tl.sum(((row >= 0) & (row < counts[:, None])).to(tl.int32), axis=0)
        sentinel = tl.full([CHUNK], 0, tl.int32) + num_pairs
        tl.store(SORTED_PAIR + slots, sentinel, mask=(slots < num_slots) & (taken == 0))

    # A block's expert: the experts whose blocks end at or before it (`num_experts` past the last one).
    for start in range(0, num_blocks, CHUNK):
        block = start + tl.arange(0, CHUNK)
        expert = tl.sum(((block_end[:, None] <= block[None, :]) & real_expert).to(tl.int32), axis=0)
        tl.store(BLOCK_EXPERT + block, expert, mask=block < num_blocks)


def align_pairs_to_blocks(
    expert_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the flattened (token, k) pairs by expert into blocks of `block_m` rows, without host synchronisation.

    Args:
        expert_ids: `[S]` expert of each pair (pair `i` is token `i // top_k`, choice `i % top_k`), in `[0, E)`
            (unchecked: the one-launch kernel leaves other ids out of every block, the torch ops fail on them).

    Returns:
        `sorted_pair_ids` `[num_blocks * block_m]` int32: each expert's pairs in ascending order, its rows padded to
        a multiple of `block_m` with the sentinel `S`; `block_expert` `[num_blocks]` int32: the expert of each
        block, `E` for blocks past the last expert's rows. `num_blocks` is a static upper bound, `min(S, (S +
        min(E, S) * (block_m - 1)) // block_m)`, so the shapes depend on `S` only (and graphs can be captured).

    Where the kernels run and for up to `MAX_FUSED_ALIGN_PAIRS` pairs over `MAX_FUSED_ALIGN_EXPERTS` experts, one
    Triton launch computes it; otherwise ~15 torch ops (`align_pairs_to_blocks_torch`), with the same result.
    """
    if (
        kernel_available(expert_ids.device)
        and 0 < expert_ids.numel() <= MAX_FUSED_ALIGN_PAIRS
        and num_experts <= MAX_FUSED_ALIGN_EXPERTS
    ):
        return _align_pairs_op(expert_ids.reshape(-1), num_experts, block_m)
    return align_pairs_to_blocks_torch(expert_ids, num_experts, block_m)


def _num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    nonempty = min(num_experts, num_pairs)  # experts that can have rows
    return min(num_pairs, (num_pairs + nonempty * (block_m - 1)) // block_m)


@kernel_op("step3_hf::align_pairs_to_blocks")
def _align_pairs_op(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_pairs = expert_ids.numel()
    num_blocks = _num_blocks(num_pairs, num_experts, block_m)
    sorted_pair_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=expert_ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=expert_ids.device)
    block_e = max(16, triton.next_power_of_2(num_experts))
    _align_pairs[(1,)](
        expert_ids.contiguous(), sorted_pair_ids, block_expert, num_pairs, num_experts, num_blocks,
        BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=max(16, 8192 // block_e), num_warps=4,
    )  # fmt: skip
    return sorted_pair_ids, block_expert


@_align_pairs_op.register_fake
def _(expert_ids, num_experts, block_m):
    num_blocks = _num_blocks(expert_ids.numel(), num_experts, block_m)
    return expert_ids.new_empty(num_blocks * block_m, dtype=torch.int32), expert_ids.new_empty(
        num_blocks, dtype=torch.int32
    )


def align_pairs_to_blocks_torch(
    expert_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`align_pairs_to_blocks` in torch ops (a stable sort by expert, and scatters), on any device and size."""
    num_pairs = expert_ids.numel()
    device = expert_ids.device
    num_blocks = _num_blocks(num_pairs, num_experts, block_m)
    expert_ids = expert_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids))
    blocks_per_expert = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(blocks_per_expert, 0)
    padded_start = (block_end - blocks_per_expert) * block_m  # first padded row of each expert
    start = torch.cumsum(counts, 0) - counts  # first row of each expert without padding

    sorted_experts, order = torch.sort(expert_ids, stable=True)
    rank = torch.arange(num_pairs, device=device) - start[sorted_experts]  # row of each pair within its expert
    sorted_pair_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[padded_start[sorted_experts] + rank] = order.to(torch.int32)
    blocks = torch.arange(num_blocks, device=device)
    block_expert = torch.searchsorted(block_end, blocks, right=True).to(torch.int32)  # E past the last expert
    return sorted_pair_ids, block_expert


def moe_decode(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    activation: str = "silu",
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    block_size: tuple[int, int] | None = None,
    expert_parallel: bool = False,
    quantize_activations: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    expert_blocks_first: bool | None = None,
) -> torch.Tensor:
    """`sum_k w[t, k] * down[e] @ (act(gate[e] @ x_t) * (up[e] @ x_t))` with `e = top_k_index[t, k]`, per token.

    Args:
        hidden_states: `[T, H]` tokens.
        top_k_index: `[T, top_k]` integer expert of each choice, in `[0, E)` (not checked: that would synchronise
            with the host). A choice outside it adds nothing where the one-launch alignment runs (decode sizes).
        top_k_weights: `[T, top_k]` routing weights.
        gate_up_proj: `[E, 2I, H]`, the gate rows first (transformers' concatenated, untransposed layout).
        down_proj: `[E, H, I]`.
        activation: the gate's activation, a transformers name; SiLU only.
        gate_up_scale, down_scale, block_size: for block-FP8 weights (float8 e4m3 `gate_up_proj` and `down_proj`),
            their `weight_scale_inv` `[E, ceil(out/b0), ceil(in/b1)]` and `block_size` `(b0, b1)`; `block_k` is then
            capped to `b1`, which it must divide.
        expert_parallel: the weights are this rank's `E` experts of a larger set: a choice whose id lies outside
            `[0, E)` (transformers' expert-parallel sentinel `E`) is routed elsewhere and adds nothing here.
        quantize_activations: block-FP8 weights only: round the tokens and the intermediate activation to e4m3 per
            row and 128 columns and multiply on float8 tensor cores (`float8_products_supported` says where).
        block_m, block_n, block_k, num_warps, num_stages: Triton launch parameters (rows per block; output columns
            and reduction depth per program; warps; pipelining depth); those left None come from `default_launch`,
            which depends on the rows per expert (decode or prefill sized).
        expert_blocks_first: the launch order: the programs of one output-column slice for every expert block
            together (True), or all slices of one expert block together (False).

    Returns:
        `[T, H]` in `hidden_states`' dtype (products in fp32, the intermediate activation in the weights' dtype).
    """
    others = {"top_k_index": top_k_index, "top_k_weights": top_k_weights, "gate_up_proj": gate_up_proj,
              "down_proj": down_proj, "gate_up_scale": gate_up_scale, "down_scale": down_scale}  # fmt: skip
    check_kernel_inputs("moe_decode", "hidden_states", hidden_states, others)
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"moe_decode computes SiLU-gated experts ({SUPPORTED_ACTIVATIONS}), not `{activation}`")
    if hidden_states.ndim != 2 or gate_up_proj.ndim != 3 or down_proj.ndim != 3:
        raise ValueError(
            f"expected hidden_states [T, H], gate_up_proj [E, 2I, H] and down_proj [E, H, I]; got "
            f"{tuple(hidden_states.shape)}, {tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}"
        )
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, _ = gate_up_proj.shape
    inter = two_inter // 2
    if num_experts == 0:
        raise ValueError(f"gate_up_proj {tuple(gate_up_proj.shape)} holds no experts")
    if gate_up_proj.shape != (num_experts, 2 * inter, hidden) or down_proj.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"gate_up_proj {tuple(gate_up_proj.shape)} and down_proj {tuple(down_proj.shape)} do not fit hidden size "
            f"{hidden}: expected [E, 2I, {hidden}] and [E, {hidden}, I]"
        )
    if top_k_index.ndim != 2 or top_k_index.shape[0] != num_tokens or top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} must both be "
            f"[{num_tokens}, top_k]"
        )
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise ValueError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
    fp8 = gate_up_scale is not None or down_scale is not None or block_size is not None
    given = dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                 expert_blocks_first=expert_blocks_first)  # fmt: skip
    launch = default_launch(top_k_index.numel(), num_experts)
    launch.update({name: value for name, value in given.items() if value is not None})
    block_m, block_n, block_k, num_warps, num_stages, expert_blocks_first = (launch[name] for name in given)
    for name in ("block_m", "block_n", "block_k"):
        if launch[name] < 16 or launch[name] & (launch[name] - 1):
            raise ValueError(f"`{name}` must be a power of two of at least 16 (tensor-core tiles), got {launch[name]}")
    scale_n = scale_k = 1
    if fp8:
        block_k, scale_n, scale_k = _check_fp8_experts(
            gate_up_proj, down_proj, gate_up_scale, down_scale, block_size, block_k
        )
        dtypes = {hidden_states.dtype}
    else:
        dtypes = {hidden_states.dtype, gate_up_proj.dtype, down_proj.dtype}
    if quantize_activations and not (fp8 and float8_products_supported(block_k, hidden, inter)):
        raise ValueError(
            f"quantize_activations needs block-FP8 weights, hidden and intermediate sizes that are multiples of "
            f"{GROUP_SIZE} and steps of {MIN_FP8_DOT_K} to {GROUP_SIZE} columns; got "
            f"{'FP8' if fp8 else gate_up_proj.dtype} weights, hidden {hidden}, intermediate {inter}, steps of {block_k}"
            + (f" (block_k capped to the scale tile width {block_size[1]})" if fp8 else "")
        )
    if len(dtypes) != 1 or hidden_states.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"hidden_states and expert weights must share one of {SUPPORTED_DTYPES}, got {sorted(map(str, dtypes))}"
        )
    return _moe_decode_op(
        hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_scale, down_scale,
        block_m, block_n, block_k, num_warps, num_stages, scale_n, scale_k, expert_parallel, quantize_activations,
        bool(expert_blocks_first),
    )  # fmt: skip


def _check_fp8_experts(gate_up_proj, down_proj, gate_up_scale, down_scale, block_size, block_k) -> tuple[int, ...]:
    """Checks of block-FP8 expert weights; returns the `block_k` the kernels use and the scale tile `(b0, b1)`."""
    if gate_up_scale is None or down_scale is None or block_size is None:
        raise ValueError("block-FP8 experts need gate_up_scale, down_scale and block_size together")
    if gate_up_proj.dtype != torch.float8_e4m3fn or down_proj.dtype != torch.float8_e4m3fn:
        raise ValueError(f"block-FP8 experts are float8_e4m3fn, got {gate_up_proj.dtype} and {down_proj.dtype}")
    b0, b1 = (int(b) for b in block_size)
    num_experts, two_inter, hidden = gate_up_proj.shape
    for name, weight, scale in (("gate_up_scale", gate_up_proj, gate_up_scale), ("down_scale", down_proj, down_scale)):
        expected = (num_experts, -(-weight.shape[1] // b0), -(-weight.shape[2] // b1))
        if tuple(scale.shape) != expected or scale.dtype != torch.float32:
            raise ValueError(f"`{name}` must be float32 {expected} for blocks {[b0, b1]}, got {scale.dtype} "
                             f"{tuple(scale.shape)}")  # fmt: skip
    if (two_inter // 2) % b0:
        raise ValueError(f"the fused gate/up rows split inside a scale tile: intermediate {two_inter // 2} % {b0}")
    block_k = min(block_k, b1)
    if b1 % block_k or block_k < 16 or block_k & (block_k - 1):
        raise ValueError(
            f"block_k {block_k} (capped to the scale tile width {b1}) must divide it and be a power of two of at "
            "least 16"
        )
    return block_k, b0, b1


# A custom op, so that compiled callers keep the kernels inside their graph instead of breaking it.
@kernel_op("step3_hf::moe_decode")
def _moe_decode_op(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_scale: torch.Tensor | None,
    down_scale: torch.Tensor | None,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    scale_n: int,
    scale_k: int,
    expert_parallel: bool,
    quantize_activations: bool,
    expert_blocks_first: bool,
) -> torch.Tensor:
    """The alignment and the two launches behind `moe_decode`, on arguments it has checked."""
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, _ = gate_up_proj.shape
    inter = two_inter // 2
    top_k = top_k_index.shape[1]
    num_pairs = num_tokens * top_k
    device = hidden_states.device
    if num_pairs == 0:
        return torch.zeros(num_tokens, hidden, dtype=hidden_states.dtype, device=device)
    # Contiguous: the kernels index pairs as `token * top_k + k` (reshape keeps a strided view of a `[T, 1]` column).
    expert_ids = top_k_index.reshape(-1).contiguous()
    if expert_parallel:
        # Choices routed to other ranks become expert E: align sorts them into blocks of "expert E", whose programs
        # exit at once (as blocks past the last expert's do), and the top-k sum skips them.
        expert_ids = torch.where((expert_ids < 0) | (expert_ids >= num_experts), num_experts, expert_ids)
    sorted_pair_ids, block_expert = align_pairs_to_blocks(expert_ids, num_experts + int(expert_parallel), block_m)
    num_blocks = block_expert.numel()
    a8 = quantize_activations
    dot_f32 = (hidden_states.dtype == torch.float32 and not a8) or interpreter_enabled()
    fp8 = gate_up_scale is not None
    launch = dict(num_warps=num_warps, num_stages=num_stages, FP8=fp8, SN=scale_n, SK=scale_k, DOT_F32=dot_f32,
                  A8=a8, GROUP=GROUP_SIZE, BLOCKS_FIRST=expert_blocks_first)  # fmt: skip

    def grid(columns: int) -> tuple[int, int]:
        slices = triton.cdiv(columns, block_n)
        return (num_blocks, slices) if expert_blocks_first else (slices, num_blocks)

    # Without scales the kernels never read them (FP8 and A8 are compile-time constants): an existing tensor stands
    # in for the pointer, with zero strides, and nothing is allocated for it.
    gate_up_scale = gate_up_scale if fp8 else top_k_weights
    down_scale = down_scale if fp8 else gate_up_scale
    # Under A8: float8 rows (padded to a multiple of 4, read up to the real ones) and their per-group scales.
    x, x_scale = quantize_fp8_activations(hidden_states) if a8 else (hidden_states, top_k_weights)

    activated = torch.empty(num_pairs, inter, dtype=hidden_states.dtype, device=device)
    _gate_up_swiglu[grid(inter)](
        x, x_scale, gate_up_proj, gate_up_scale, sorted_pair_ids, block_expert, activated,
        *x.stride(), *_strides(x_scale, a8, 2), *gate_up_proj.stride(), *_strides(gate_up_scale, fp8, 3),
        *activated.stride(), num_pairs, num_experts, hidden, inter, top_k,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=hidden % block_k == 0, **launch,
    )  # fmt: skip
    a, a_scale = quantize_fp8_activations(activated) if a8 else (activated, top_k_weights)
    routing = top_k_weights.reshape(-1).contiguous()
    partial = torch.empty(num_pairs, hidden, dtype=torch.float32, device=device)
    _down_weighted[grid(hidden)](
        a, a_scale, down_proj, down_scale, sorted_pair_ids, block_expert, routing, partial,
        *a.stride(), *_strides(a_scale, a8, 2), *down_proj.stride(), *_strides(down_scale, fp8, 3),
        *partial.stride(), num_pairs, num_experts, hidden, inter,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=inter % block_k == 0, **launch,
    )  # fmt: skip
    # The top-k partial rows of each token: summed in fp32, then rounded once, in one launch.
    out = torch.empty(num_tokens, hidden, dtype=hidden_states.dtype, device=device)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _sum_choices[(num_tokens, triton.cdiv(hidden, block_h))](
        partial, expert_ids, out, hidden, top_k, num_experts, BLOCK_H=block_h
    )
    return out


def _strides(scales: torch.Tensor, read: bool, dims: int) -> tuple[int, ...]:
    """The strides of scales the kernel reads; zeros for the stand-in tensor of scales it never reads."""
    return tuple(scales.stride()) if read else (0,) * dims


@_moe_decode_op.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_scale, down_scale, block_m,
      block_n, block_k, num_warps, num_stages, scale_n, scale_k, expert_parallel, quantize_activations,
      expert_blocks_first):  # fmt: skip
    return torch.empty_like(hidden_states)


def __getattr__(name: str):
    # Transitional: modeling_step3 imports the registration name from here until issue 17 part 4 moves its kernel
    # defaults into kernels/; the name lives in transformers_experts.py.
    if name == "MOE_DECODE_EXPERTS":
        from .transformers_experts import MOE_DECODE_EXPERTS

        return MOE_DECODE_EXPERTS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
