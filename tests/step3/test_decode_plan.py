"""The decode-attention dispatch (`plan_decode_attention`), on CPU: every gate between the Gluon Hopper kernel and the
Triton kernel, and the splits, stages, early merge and unchecked loads each call gets. The expected plans are worked
out by hand from the rules (split counts from the multiprocessor count, stage counts from shared memory)."""

import dataclasses

import pytest
import torch

from step3_hf.kernels.decode_attention_plan import (
    DecodeDevice,
    DecodePlan,
    decode_device,
    default_num_splits,
    plan_decode_attention,
)
from step3_hf.kernels.decode_attention_sm90 import shared_memory_bytes

H200 = DecodeDevice(sms=132, capability=(9, 0), shared_memory=232_448, gluon=True, float8_tensor_cores=True)
A100 = DecodeDevice(sms=108, capability=(8, 0), shared_memory=166_912, gluon=True, float8_tensor_cores=False)
L40S = DecodeDevice(sms=142, capability=(8, 9), shared_memory=101_376, gluon=True, float8_tensor_cores=True)
B200 = DecodeDevice(sms=148, capability=(10, 0), shared_memory=232_448, gluon=True, float8_tensor_cores=True)
INTERPRETER = DecodeDevice(sms=4, capability=None, shared_memory=0, gluon=False, float8_tensor_cores=True)

# Step-3 decoding one token per sequence: 64 query heads on one KV head of 256, a float8 cache in 64-position value
# tiles whose padded storage holds whole blocks past its end, 32 sequences of 16384 positions.
STEP3 = dict(
    batch=32, num_heads=64, num_kv_heads=1, q_len=1, kv_len=16384, head_dim=256, float8=True, float32_query=False,
    masked=False, value_tile=64, dense=True, stored_positions=16384 + 64,
)  # fmt: skip
BF16 = {**STEP3, "float8": False, "value_tile": 0, "dense": False, "stored_positions": 16384}


def plan(device=H200, **changes) -> DecodePlan:
    return plan_decode_attention(**{**STEP3, **changes}, device=device)


def test_step3_float8_decode_runs_the_hopper_kernel_one_program_per_multiprocessor():
    # 132 // 32 = 4 slices of 4096 positions: 128 programs on 132 multiprocessors; the default 5 stages fit.
    assert plan() == DecodePlan(
        kernel="sm90", num_splits=4, num_stages=5, merge_early=True, unchecked_loads=False, float8_products=True,
        float32_products=False, merge_rows=4,
    )  # fmt: skip


def test_merge_rows_keep_two_merge_programs_per_multiprocessor():
    # 64 rows: 16 rows per program gives 32 x 4 = 128 programs < 264, 8 gives 256 < 264, 4 gives 512.
    assert plan().merge_rows == 4
    assert plan(batch=1, kv_len=65536).merge_rows == 1  # 64 programs at one row each: still under 264
    assert plan(batch=128, kv_len=4096).merge_rows == 16  # 512 programs at 16 rows
    assert plan(batch=512, num_heads=8, kv_len=4096).merge_rows == 8  # never more rows than the call has


def test_slices_longer_than_8192_positions_run_two_triton_programs_per_multiprocessor():
    # Four Hopper slices of 65536 / 4 = 16384 positions are too long: the Triton kernel at round(264 / 32) = 8
    # slices, 256 programs, so the float8 stage bonus (one program per multiprocessor) does not apply.
    long = plan(kv_len=65536, stored_positions=65536 + 63)
    assert (long.kernel, long.num_splits, long.num_stages, long.unchecked_loads) == ("triton", 8, 3, True)
    # The threshold itself: 4 x 8192 positions still run the Hopper kernel, one more does not.
    assert plan(kv_len=32768, stored_positions=32768 + 63).kernel == "sm90"
    assert plan(kv_len=32769, stored_positions=32769 + 63).kernel == "triton"
    assert plan(num_splits=1, kv_len=8192).kernel == "sm90"
    assert plan(num_splits=1, kv_len=8193).kernel == "triton"


def test_bf16_cache_runs_triton_with_one_program_per_multiprocessor():
    # round(132 / 32) = 4 slices; three stages; no unchecked loads for rows; no e4m3 products.
    assert plan(**BF16) == DecodePlan(
        kernel="triton", num_splits=4, num_stages=3, merge_early=True, unchecked_loads=False, float8_products=False,
        float32_products=False, merge_rows=4,
    )  # fmt: skip
    assert plan(**{**BF16, "float32_query": True}).float32_products
    # Split counts: round(sms / programs), none narrower than 512 positions, at least one.
    assert plan(**{**BF16, "batch": 1, "kv_len": 1000, "stored_positions": 1000}).num_splits == 2
    assert plan(**{**BF16, "batch": 1, "kv_len": 1_000_000, "stored_positions": 10**6}).num_splits == 132
    assert plan(**{**BF16, "batch": 512}).num_splits == 1


def test_a_mask_sends_float8_to_triton_with_a_shallower_pipeline_for_several_tokens():
    # Float8 at one program per multiprocessor (16384 / 4 = 4096 positions per slice): 3 + 1 stages.
    masked = plan(masked=True)
    assert (masked.kernel, masked.num_splits, masked.num_stages, masked.unchecked_loads) == ("triton", 4, 4, True)
    # Several new tokens with a mask load a per-token mask tile: 2 stages, + 1 for float8 at one program per SM.
    two_tokens = dict(num_heads=32, q_len=2, masked=True)
    assert plan(**two_tokens).num_stages == 3
    assert plan(**{**BF16, **two_tokens}).num_stages == 2
    assert plan(**{**BF16, "q_len": 2, "num_heads": 32}).num_stages == 3  # no mask: the causal tail needs no tile


@pytest.mark.parametrize(
    "device, kernel, float8_products, merge_early",
    [(A100, "triton", False, False), (L40S, "triton", True, False), (B200, "triton", True, True),
     (H200, "sm90", True, True)],
)  # fmt: skip
def test_compute_capability_gates(device, kernel, float8_products, merge_early):
    """The Hopper kernel on 9.x only; e4m3 products from 8.9; the early merge from 9.0."""
    got = plan(device)
    assert (got.kernel, got.float8_products, got.merge_early) == (kernel, float8_products, merge_early)


def test_without_gluon_or_on_the_interpreter_the_triton_kernel_runs():
    assert plan(dataclasses.replace(H200, gluon=False)).kernel == "triton"
    interpreted = plan(INTERPRETER, batch=2, kv_len=4096, stored_positions=4096 + 63)
    # 4 // 2 = 2 slices of 2048 positions; float8 at one program per "multiprocessor": 4 stages.
    assert interpreted == DecodePlan(
        kernel="triton", num_splits=2, num_stages=4, merge_early=False, unchecked_loads=True, float8_products=True,
        float32_products=True, merge_rows=16,
    )  # fmt: skip
    assert decode_device("cpu") == INTERPRETER
    assert default_num_splits(2, 1, 4096, "cpu", float8=True) == 2
    assert default_num_splits(2, 1, 4096, "cpu") == 2  # round(4 / 2)


@pytest.mark.parametrize(
    "changes",
    [dict(head_dim=96), dict(head_dim=512), dict(num_heads=128), dict(q_len=2), dict(block_n=32),
     dict(num_warps=8), dict(value_tile=128), dict(value_tile=0), dict(dense=False)],
)  # fmt: skip
def test_shapes_and_launch_parameters_the_hopper_kernel_does_not_implement(changes):
    assert plan(**changes).kernel == "triton"


def test_query_rows_up_to_one_warpgroup_tile_run_the_hopper_kernel():
    assert plan(num_heads=32, q_len=2).kernel == "sm90"  # 64 rows
    assert plan(num_heads=16, q_len=4, head_dim=128).kernel == "sm90"
    assert plan(head_dim=64).kernel == "sm90"


def test_the_hopper_kernel_runs_at_most_one_program_per_multiprocessor():
    assert plan(num_splits=4).kernel == "sm90"  # 128 programs
    forced = plan(num_splits=5)  # 160 programs on 132 multiprocessors
    assert (forced.kernel, forced.num_splits) == ("triton", 5)
    # 133 sequences: one slice each is already one program too many.
    many = plan(batch=133, kv_len=4096, stored_positions=4096 + 63)
    assert (many.kernel, many.num_splits) == ("triton", 1)


def test_hopper_stages_capped_by_shared_memory():
    # At head dim 256 a stage takes 2 x 64 x 256 + 2 x 4 x 64 = 33280 bytes over 16640 for the query and the rest.
    assert shared_memory_bytes(256, 6) == 16640 + 6 * 33280 <= 232_448 < shared_memory_bytes(256, 7)
    assert (plan(num_stages=6).kernel, plan(num_stages=6).num_stages) == ("sm90", 6)
    assert (plan(num_stages=7).kernel, plan(num_stages=7).num_stages) == ("triton", 7)
    assert (plan(num_stages=2).kernel, plan(num_stages=2).num_stages) == ("triton", 2)  # below the kernel's 3
    # With less shared memory the default 5 comes down to what fits, and below 3 stages the Triton kernel runs.
    smaller = dataclasses.replace(H200, shared_memory=150_000)  # (150000 - 16640) // 33280 = 4
    assert (plan(smaller).kernel, plan(smaller).num_stages) == ("sm90", 4)
    assert plan(dataclasses.replace(H200, shared_memory=100_000)).kernel == "triton"  # 2 would fit
    assert plan(smaller, head_dim=128).num_stages == 5  # half the bytes per stage


@pytest.mark.parametrize("num_splits", [0, -3])
def test_no_splits_asked_means_one(num_splits):
    got = plan(num_splits=num_splits)
    assert (got.kernel, got.num_splits, got.merge_early) == ("triton", 1, False)
    # One slice on 32 programs: float8 at one program per multiprocessor, 4 stages.
    assert got.num_stages == 4


def test_splits_never_exceed_the_blocks_of_the_cache():
    got = plan(**{**BF16, "batch": 1, "kv_len": 100, "stored_positions": 100}, num_splits=8)
    assert (got.num_splits, got.merge_early) == (2, True)  # ceil(100 / 64)
    assert plan(**{**BF16, "kv_len": 0, "stored_positions": 0}).num_splits == 1


def test_unchecked_loads_need_value_tiles_and_whole_blocks_in_storage():
    # The last block of a slice reaches block_n - 1 = 63 positions past the cache's end.
    assert plan(kv_len=65536, stored_positions=65536 + 63).unchecked_loads
    assert not plan(kv_len=65536, stored_positions=65536 + 62).unchecked_loads
    assert not plan(kv_len=65536, stored_positions=10**9, value_tile=0).unchecked_loads  # float8 rows: checked
    assert plan(kv_len=65536, stored_positions=65536 + 31, block_n=32).unchecked_loads
    assert not plan(**{**BF16, "kv_len": 65536}).unchecked_loads  # bf16 rows
    assert not plan().unchecked_loads  # the Hopper kernel bounds its own reads


def test_decode_device_reads_a_cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    props = torch.cuda.get_device_properties(0)
    device = decode_device("cuda:0")
    assert device.sms == props.multi_processor_count and device.capability == (props.major, props.minor)
    assert device.float8_tensor_cores == ((props.major, props.minor) >= (8, 9))
