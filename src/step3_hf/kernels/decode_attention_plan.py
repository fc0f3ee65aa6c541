"""How `decode_attention` runs a call: which kernel, how many cache slices, how deep a pipeline, whether the merge
starts early and whether tile loads skip their bounds checks.

`plan_decode_attention` is a pure function of the call's shapes and dtypes and of the device's properties
(`DecodeDevice`, plain values), so every gate reads in one place and is tested on CPU; the launch code in
`decode_attention.py` only executes the `DecodePlan` it returns. The thresholds were swept on the H200
(docs/performance.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from . import decode_attention_sm90 as sm90

__all__ = ["DecodeDevice", "DecodePlan", "decode_device", "default_num_splits", "plan_decode_attention", "split_count"]

# Each split writes a partial result that the merge reads back; a split narrower than this many cache positions is
# not worth that traffic.
MIN_POSITIONS_PER_SPLIT = 512
# Split counts aim at one program per multiprocessor: a bf16 program's pipeline fills its shared memory. Float8 tiles
# are half the size, so two programs fit, and two stream faster than one (one float8 program is bound by its own
# instruction latency); but each program also pays fixed costs (its prologue, unequal finish times, the merge). Float8
# slices of at most this many positions run one per multiprocessor, with a deeper pipeline.
SHORT_FLOAT8_SLICE = 4096
# On Hopper, float8 slices of at most this many positions (at one program per multiprocessor) run the Gluon kernel;
# longer ones stream faster as two Triton programs per multiprocessor.
SM90_LONGEST_SLICE = 8192
# Multiprocessors the interpreter stands for: a few splits, so that the CPU tests cross split boundaries.
INTERPRETER_SMS = 4


@dataclass(frozen=True)
class DecodeDevice:
    """What the dispatch reads about a device."""

    sms: int  # multiprocessors
    capability: tuple[int, int] | None  # compute capability; None for Triton's CPU interpreter
    shared_memory: int  # bytes of shared memory one program may use
    gluon: bool  # Triton's Gluon dialect is importable (Triton 3.5+)
    float8_tensor_cores: bool  # e4m3 tensor-core products (capability 8.9+; the interpreter emulates them)


@dataclass(frozen=True)
class DecodePlan:
    """One `decode_attention` call's launches."""

    kernel: Literal["sm90", "triton"]  # the Gluon Hopper float8 kernel, or the Triton kernel
    num_splits: int  # cache slices per (sequence, KV head); above 1 a merge pass follows
    num_stages: int  # pipeline depth (the Triton launch steps down from it where shared memory runs out)
    merge_early: bool  # the merge launches while the attention grid drains (programmatic dependent launch)
    unchecked_loads: bool  # the Triton kernel reads whole tiles past a slice's end without bounds checks
    float8_products: bool  # a float8 cache meets e4m3 tensor cores; else its tiles are widened to fp16
    float32_products: bool  # exact float32 products: a float32 query, or the interpreter (whose bf16 dot is wrong)
    merge_rows: int  # query rows per merge program


def decode_device(device: torch.device | str) -> DecodeDevice:
    """The properties of `device` (CUDA; any other device type means the interpreter) that the plan reads."""
    device = torch.device(device)
    if device.type != "cuda":
        return DecodeDevice(INTERPRETER_SMS, None, 0, gluon=False, float8_tensor_cores=True)
    props = torch.cuda.get_device_properties(device)
    capability = (props.major, props.minor)
    return DecodeDevice(
        sms=props.multi_processor_count,
        capability=capability,
        shared_memory=props.shared_memory_per_block_optin,
        gluon=sm90.gluon is not None,
        float8_tensor_cores=capability >= (8, 9),
    )


def split_count(programs: int, kv_len: int, sms: int, float8: bool, one_program_per_sm: bool = False) -> int:
    """Default slices per (sequence, KV head) for `programs` (sequences x KV heads) on `sms` multiprocessors;
    `one_program_per_sm`: for the Hopper float8 kernel, whose pipeline fills a multiprocessor's shared memory."""
    widest = math.ceil(kv_len / MIN_POSITIONS_PER_SPLIT)
    if not float8:
        return max(1, min(round(sms / programs), widest))
    one_per_sm = max(1, min(sms // programs, widest))  # never more programs than multiprocessors
    if one_program_per_sm or kv_len / one_per_sm <= SHORT_FLOAT8_SLICE:
        return one_per_sm
    return max(1, min(round(2 * sms / programs), widest))


def default_num_splits(
    batch_size: int, num_kv_heads: int, kv_len: int, device: torch.device | str, float8: bool = False
) -> int:
    """Slices per (sequence, KV head) the Triton kernel gets by default: enough programs to fill the GPU, none
    narrower than a few hundred positions."""
    return split_count(batch_size * num_kv_heads, kv_len, decode_device(device).sms, float8)


def _sm90_stages(head_dim: int, num_stages: int | None, shared_memory: int) -> int:
    """The Gluon kernel's pipeline depth: as asked, else its default capped by what fits in shared memory."""
    if num_stages is not None:
        return num_stages
    per_stage = sm90.shared_memory_bytes(head_dim, 1) - sm90.shared_memory_bytes(head_dim, 0)
    fitting = (shared_memory - sm90.shared_memory_bytes(head_dim, 0)) // per_stage
    return min(sm90.DEFAULT_STAGES, fitting)


def plan_decode_attention(
    *,
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    float8: bool,
    float32_query: bool,
    masked: bool,
    device: DecodeDevice,
    value_tile: int = 0,
    dense: bool = False,
    stored_positions: int = 0,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> DecodePlan:
    """The launches for one call whose arguments `decode_attention` has checked.

    Args:
        float8: a float8 e4m3 cache (with per-position scales); else bf16/fp16/fp32 like the query.
        float32_query: the query is float32.
        masked: an attention mask is given (else lengths or the whole cache, and a causal tail).
        value_tile: positions per value tile of a float8 cache in the value-cache layout; 0 for rows.
        dense: the query, key rows, value tiles and scales have the unit inner strides the Gluon kernel assumes.
        stored_positions: cache positions per (sequence, KV head) that the storage of the key, value tiles and both
            scales holds (at least `kv_len`); unchecked loads need `kv_len + block_n - 1`.
        num_splits, block_n, num_warps, num_stages: as given to `decode_attention` (None: chosen here).
    """
    programs = batch * num_kv_heads
    rows = num_heads // num_kv_heads * q_len
    float8_products = float8 and device.float8_tensor_cores

    # The Gluon kernel (asynchronous tensor-core products): float8 value tiles without a mask on Hopper, at the
    # widths and launch parameters it implements, with a pipeline that fits in shared memory, one program per
    # multiprocessor, on slices of at most SM90_LONGEST_SLICE positions.
    sm90_stages = _sm90_stages(head_dim, num_stages, device.shared_memory)
    use_sm90 = (
        float8_products
        and not masked
        and device.gluon
        and device.capability is not None
        and device.capability[0] == 9
        and value_tile == sm90.BLOCK_N
        and dense
        and head_dim in sm90.HEAD_DIMS
        and rows <= sm90.BLOCK_M
        and block_n == sm90.BLOCK_N
        and num_warps == 4
        and 3 <= sm90_stages
        and sm90.shared_memory_bytes(head_dim, sm90_stages) <= device.shared_memory
    )
    if use_sm90:
        sm90_splits = num_splits
        if sm90_splits is None:
            sm90_splits = split_count(programs, kv_len, device.sms, float8=True, one_program_per_sm=True)
        use_sm90 = 0 < programs * sm90_splits <= device.sms and kv_len <= SM90_LONGEST_SLICE * sm90_splits
        if use_sm90:
            num_splits = sm90_splits
    if num_splits is None:
        num_splits = split_count(programs, kv_len, device.sms, float8)
    num_splits = max(1, min(num_splits, math.ceil(kv_len / block_n)))

    if use_sm90:
        stages = sm90_stages
    elif num_stages is not None:
        stages = num_stages
    else:  # three stages of K/V tiles (+ a per-token mask tile) fill shared memory, or for float8 with one program
        # per multiprocessor, four
        stages = 2 if masked and q_len > 1 else 3
        stages += int(float8 and programs * num_splits <= device.sms)

    # Rows per merge program: up to 16, fewer where that leaves fewer than two programs per multiprocessor.
    merge_rows = min(16, 1 << max(0, rows - 1).bit_length())
    while merge_rows > 1 and programs * math.ceil(rows / merge_rows) < 2 * device.sms:
        merge_rows //= 2

    return DecodePlan(
        kernel="sm90" if use_sm90 else "triton",
        num_splits=num_splits,
        num_stages=stages,
        # Hopper and later launch the merge while the attention kernel drains: each attention program lets it
        # start once its loop is done, and the merge waits for the whole grid in-kernel.
        merge_early=num_splits > 1 and device.capability is not None and device.capability >= (9, 0),
        # Unchecked loads read whatever lies past each sequence's valid range, with probability 0; 0 * NaN is NaN,
        # so they are only for the float8 cache layout (value tiles), whose storage holds zeros or written values
        # there, and only where the last block of a slice (up to block_n - 1 positions past the cache's end) stays
        # inside it. The Gluon kernel bounds its own reads.
        unchecked_loads=not use_sm90 and value_tile > 0 and stored_positions >= kv_len + block_n - 1,
        float8_products=float8_products,
        float32_products=float32_query or device.capability is None,
        merge_rows=merge_rows,
    )
