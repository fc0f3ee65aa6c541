"""Split-KV decode attention against a float64 reference: on CPU through Triton's interpreter, and on CUDA.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import dataclasses
import importlib

import pytest
import torch
from triton_cases import (
    DEVICES,
    INTERPRETED,
    eager_when_interpreted,
    relative_error,
)

from step3_hf.kernels import Float8StaticCache, decode_attention, quantize_float8

# The module, which the package's `decode_attention` function shadows.
decode_attention_module = importlib.import_module("step3_hf.kernels.decode_attention")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def reference_attention(query, key, value, scale, allowed):
    """float64 softmax attention; `allowed` `[B, q, kv]` bool; returns `[B, q, Hq, D]`."""
    group = query.shape[1] // key.shape[1]
    key = key.double().repeat_interleave(group, dim=1)
    value = value.double().repeat_interleave(group, dim=1)
    scores = (query.double() @ key.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1))  # a row with nothing allowed attends to nothing (output 0)
    return (probs @ value).transpose(1, 2)


def random_case(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, q_len, heads, head_dim, generator=generator).transpose(1, 2)  # transformers' strides
    key = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    value = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator)
    return [t.to(device=device, dtype=dtype) for t in (query, key, value)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_ragged_lengths_and_split_boundaries(device, dtype, num_splits):
    # kv_len 200 with block 64 and 3 or 8 splits puts split edges inside and between blocks; lengths 1, 64, 65
    # and 200 hit a single position, a block edge, one past it, and the full cache.
    query, key, value = random_case(4, 16, 2, 1, 200, 32, dtype, device, seed=num_splits)
    lengths = torch.tensor([200, 1, 65, 64])
    out = decode_attention(query, key, value, kv_lengths=lengths.to(device), num_splits=num_splits)
    allowed = torch.arange(200)[None, None, :] < lengths[:, None, None]
    ref = reference_attention(query.cpu(), key.cpu(), value.cpu(), 32**-0.5, allowed)
    assert out.shape == (4, 1, 16, 32) and out.dtype == dtype
    assert relative_error(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_many_query_rows_in_several_row_blocks(device, dtype):
    # 64 query heads of one KV head and one sequence: the merge pass cuts those 64 rows into blocks of 8 or fewer
    # (to fill the device), each block merging the five splits' partials of its rows; checked against float64.
    query, key, value = random_case(1, 64, 1, 1, 300, 32, dtype, device, seed=5)
    out = decode_attention(query, key, value, num_splits=5)
    ref = reference_attention(query.cpu(), key.cpu(), value.cpu(), 32**-0.5, torch.ones(1, 1, 300, dtype=torch.bool))
    assert relative_error(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 2])
def test_whole_cache_in_whole_blocks(device, dtype, q_len):
    # No mask or lengths (no bounds tensors), and slices of whole 64-position blocks (2 and 4 slices of 512
    # positions): only causality among the new tokens excludes positions.
    query, key, value = random_case(2, 16, 1, q_len, 512, 32, dtype, device, seed=9)
    allowed = torch.arange(512)[None, :] <= 512 - q_len + torch.arange(q_len)[:, None]
    ref = reference_attention(query.cpu(), key.cpu(), value.cpu(), 32**-0.5, allowed[None].expand(2, -1, -1))
    for num_splits in (2, 4):
        out = decode_attention(query, key, value, num_splits=num_splits)
        assert relative_error(out.cpu(), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len", [2, 3])
def test_several_new_tokens_attend_causally_at_the_end(device, q_len):
    query, key, value = random_case(2, 8, 1, q_len, 150, 64, torch.float32, device, seed=q_len)
    lengths = torch.tensor([150, 70])
    out = decode_attention(query, key, value, kv_lengths=lengths.to(device), num_splits=2, scale=0.3)
    positions = torch.arange(150)
    last_allowed = lengths[:, None] - q_len + torch.arange(q_len)[None, :]  # [B, q]
    allowed = positions[None, None, :] <= last_allowed[:, :, None]
    ref = reference_attention(query.cpu(), key.cpu(), value.cpu(), 0.3, allowed)
    assert relative_error(out.cpu(), ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("q_len", [1, 2])
def test_boolean_mask_left_padding_and_static_tail(device, num_splits, q_len):
    # Left padding (rows start at 0, 30, 97, 5), an unwritten static-cache tail (rows end at 160, 140, 100, 190),
    # causal over the new tokens, and random holes in the last row: the kernel must follow the mask exactly (one
    # new token: the first three rows allow exactly [start, end); several: a causal staircase at the end).
    query, key, value = random_case(4, 8, 1, q_len, 192, 32, torch.float32, device, seed=7)
    positions = torch.arange(192)
    starts, ends = torch.tensor([0, 30, 97, 5]), torch.tensor([160, 140, 100, 190])
    causal_end = ends[:, None, None] - q_len + torch.arange(q_len)[:, None]
    allowed = (positions >= starts[:, None, None]) & (positions <= causal_end)
    allowed[3] &= torch.rand(q_len, 192, generator=torch.Generator().manual_seed(3)) > 0.2
    mask = allowed[:, None].to(device)
    out = decode_attention(query, key, value, attention_mask=mask, num_splits=num_splits)
    ref = reference_attention(query.cpu(), key.cpu(), value.cpu(), 32**-0.5, allowed)
    assert relative_error(out.cpu(), ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_bounds_folded_by_the_caller_are_read_as_given(device):
    # A step's layers share one mask, so its caller folds the mask once (`kv_bounds_from_mask`) and passes the bounds
    # to every layer: the same output, bit for bit. The kernel reads the bounds it is given: one position narrower
    # attends as if that key were masked out.
    query, key, value = random_case(3, 8, 1, 1, 96, 16, torch.float32, device, seed=11)
    allowed = (torch.arange(96) >= torch.tensor([0, 20, 7])[:, None, None]) & (torch.arange(96) < 90)
    mask = allowed[:, None].to(device)
    start, end = decode_attention_module.kv_bounds_from_mask(mask[:, 0])
    assert start.tolist() == [0, 20, 7] and end.tolist() == [90, 90, 90]
    folded_here = decode_attention(query, key, value, attention_mask=mask, num_splits=3)
    assert torch.equal(decode_attention(query, key, value, attention_mask=mask, kv_bounds=(start, end), num_splits=3),
                       folded_here)  # fmt: skip
    narrower = decode_attention(query, key, value, attention_mask=mask, kv_bounds=(start, end - 1), num_splits=3)
    allowed[:, :, 89] = False
    reference = reference_attention(query.cpu(), key.cpu(), value.cpu(), 0.25, allowed)
    assert relative_error(narrower.cpu(), reference) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_row_gives_zeros(device):
    query, key, value = random_case(2, 4, 1, 1, 80, 16, torch.float32, device, seed=1)
    mask = torch.ones(2, 1, 1, 80, dtype=torch.bool)
    mask[1] = False
    out = decode_attention(query, key, value, attention_mask=mask.to(device), num_splits=2)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_callers_keep_the_kernel_in_their_graph(device):
    """The kernel is a custom op: `torch.compile(fullgraph=True)` traces through it (a graph break would raise) and
    the compiled function computes the same as the eager one."""
    query, key, value = random_case(2, 8, 1, 1, 70, 16, torch.float32, device, seed=4)
    mask = torch.ones(2, 1, 1, 70, dtype=torch.bool)
    mask[1, ..., :9] = False  # left padding

    def attend(query, key, value, mask):
        return decode_attention(query, key, value, attention_mask=mask, num_splits=2)

    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out = compiled(query, key, value, mask.to(device))
    torch.testing.assert_close(out, attend(query, key, value, mask.to(device)), rtol=0, atol=0)
    ref = reference_attention(query.cpu(), key.cpu(), value.cpu(), 16**-0.5, mask[:, 0])
    assert relative_error(out.cpu(), ref) < TOLERANCE[torch.float32]


def float8_decode_attention(query, key8, value8, **kwargs):
    return decode_attention(query, key8.data, value8.data, key_scale=key8.scale, value_scale=value8.scale, **kwargs)


@pytest.fixture(params=["tensor cores", "widened"])
def float8_products(request, monkeypatch):
    """Both float8 paths: e4m3 tensor-core products (the interpreter emulates their rounding), or the cache widened
    to fp16 (GPUs before compute capability 8.9)."""
    if request.param == "widened":
        device = decode_attention_module.decode_device
        monkeypatch.setattr(
            decode_attention_module, "decode_device", lambda d: dataclasses.replace(device(d), float8_tensor_cores=False)
        )
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("cache_layout", [True, False])
@pytest.mark.parametrize("num_stages", [None, 3])
def test_float8_cache_matches_reference_of_dequantised_cache(
    device, num_splits, cache_layout, num_stages, float8_products
):
    # The cache layouts (padded storage, value tiles) take the kernel's unchecked loads; plain rows its checked ones.
    # Stages (compiled on CUDA only; the interpreter ignores them): the default (4 here: at most one program per
    # multiprocessor), or the 3 that two programs per multiprocessor get.
    query, key, value = random_case(3, 16, 1, 1, 130, 64, torch.bfloat16, device, seed=11)
    layouts = ("key_cache", "value_cache") if cache_layout else ("rows", "rows")
    key8, value8 = quantize_float8(key, layout=layouts[0]), quantize_float8(value, layout=layouts[1])
    assert key8.data.dtype == torch.float8_e4m3fn and key8.scale.shape == (3, 1, 130)
    assert key8.data.shape == key.shape and value8.data.shape == ((3, 1, 4, 64, 64) if cache_layout else value.shape)
    lengths = torch.tensor([130, 5, 64])
    out = float8_decode_attention(
        query, key8, value8, kv_lengths=lengths.to(device), num_splits=num_splits, num_stages=num_stages
    )
    allowed = torch.arange(130)[None, None, :] < lengths[:, None, None]
    dequantised = [t.dequantize(torch.float64).cpu() for t in (key8, value8)]
    ref = reference_attention(query.cpu(), *dequantised, 64**-0.5, allowed)
    # Tensor cores also round the (scaled) query and probabilities to e4m3: 3 mantissa bits, 2^-4 relative each.
    assert relative_error(out.cpu(), ref) < (5e-2 if float8_products == "tensor cores" else 1e-2)
    # ... and stays within float8's rounding of the unquantised cache.
    exact = reference_attention(query.cpu(), key.cpu(), value.cpu(), 64**-0.5, allowed)
    assert relative_error(out.cpu(), exact) < 8e-2


@pytest.mark.parametrize("device", DEVICES)
def test_float8_keeps_many_small_probabilities(device, float8_products):
    """One dominant position and 1023 at probability ~3e-4 that together carry a quarter of the weight: rounded to
    e4m3 unscaled they would fall below its subnormal spacing and vanish; value rows of very different scales."""
    batch, heads, kv_len, head_dim = 2, 8, 1024, 16
    query = torch.zeros(batch, heads, 1, head_dim)
    query[..., 0] = 4.0
    key = torch.zeros(batch, 1, kv_len, head_dim)
    key[:, :, 0, 0] = 8.0  # score 4 * 8 / sqrt(16) = 8 against 0 elsewhere
    value = -torch.ones(batch, 1, kv_len, head_dim)
    value[:, :, 0] = 1.0
    value[1] *= torch.logspace(-3, 0, kv_len)[:, None]
    key8 = quantize_float8(key.to(device), layout="key_cache")
    value8 = quantize_float8(value.to(device), layout="value_cache")
    out = float8_decode_attention(query.to(device, torch.bfloat16), key8, value8)
    dequantised = [t.dequantize(torch.float64).cpu() for t in (key8, value8)]
    ref = reference_attention(query, *dequantised, head_dim**-0.5, torch.ones(batch, 1, kv_len, dtype=torch.bool))
    assert relative_error(out.cpu(), ref) < 1e-2


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER or INTERPRETED, reason="the Gluon float8 kernel runs on compute capability 9.x")
@pytest.mark.parametrize(
    "heads, q_len, head_dim, kv_len, lengths, num_splits, num_stages",
    [
        (64, 1, 256, 1000, [1000, 77, 0, 640], None, None),
        (64, 1, 256, 1000, [1000, 77, 0, 640], 1, 3),
        (64, 1, 256, 1000, [1000, 77, 0, 640], 5, 4),
        (32, 2, 256, 1000, [1000, 77, 0, 640], 3, 6),
        (64, 1, 128, 6000, None, 1, None),  # no bounds; a slice of more than 4096 positions
    ],
)
def test_hopper_float8_kernel_matches_reference(
    monkeypatch, heads, q_len, head_dim, kv_len, lengths, num_splits, num_stages
):
    """The Gluon kernel at Step-3's widths (64 query heads on one KV head of 256): ragged lengths that end inside
    blocks, slices that end inside blocks, an empty sequence; several new tokens (causal among themselves) with 32
    heads, as 64 query rows fill its tile; a whole cache without lengths in one long slice, at head dim 128."""
    sm90_module = importlib.import_module("step3_hf.kernels.decode_attention_sm90")
    launches = []
    monkeypatch.setattr(
        decode_attention_module,
        "float8_attention_sm90",
        lambda *args: launches.append(args) or sm90_module.float8_attention_sm90(*args),
    )
    batch = 4 if lengths else 2
    query, key, value = random_case(batch, heads, 1, q_len, kv_len, head_dim, torch.bfloat16, "cuda", seed=23)
    key8, value8 = quantize_float8(key, layout="key_cache"), quantize_float8(value, layout="value_cache")
    end = torch.tensor(lengths) if lengths else torch.full((batch,), kv_len)
    kv_lengths = end.cuda() if lengths else None
    out = float8_decode_attention(
        query, key8, value8, kv_lengths=kv_lengths, num_splits=num_splits, num_stages=num_stages
    )
    assert len(launches) == 1
    position = torch.arange(kv_len)[None, None, :]
    allowed = (position < end[:, None, None]) & (position <= end[:, None, None] - q_len + torch.arange(q_len)[:, None])
    dequantised = [t.dequantize(torch.float64).cpu() for t in (key8, value8)]
    ref = reference_attention(query.cpu(), *dequantised, head_dim**-0.5, allowed)
    assert relative_error(out.cpu(), ref) < 5e-2
    # The same e4m3 rounding as the Triton kernel, up to summation order and slicing: per sequence, far closer than
    # to float64 (dropping one position of a sequence moves it by ~1e-2).
    monkeypatch.setattr(decode_attention_module, "dense_layout", lambda *args: False)  # the Triton kernel
    triton_out = float8_decode_attention(query, key8, value8, kv_lengths=kv_lengths, num_splits=num_splits)
    assert len(launches) == 1
    for seq in range(batch):
        if end[seq] == 0:  # nothing to attend to
            assert torch.equal(out[seq].cpu(), torch.zeros_like(out[seq].cpu()))
        else:
            assert relative_error(out[seq].cpu(), triton_out[seq].cpu().double()) < 5e-3


@pytest.mark.parametrize("device", DEVICES)
def test_plain_caches_never_read_past_their_valid_range(device):
    """A bf16/fp32 cache that is a view of a larger buffer holding NaN past the valid positions (torch.empty
    memory may): the kernel must not read them, even though the storage holds them (0 * NaN is NaN)."""
    query, key, value = random_case(2, 8, 1, 1, 128, 16, torch.float32, device, seed=5)
    value[:, :, 40:] = float("nan")
    out = decode_attention(query, key[:, :, :48], value[:, :, :48], kv_lengths=torch.tensor([40, 17], device=device))
    allowed = torch.arange(48)[None, None, :] < torch.tensor([40, 17])[:, None, None]
    ref = reference_attention(query.cpu(), key[:, :, :48].cpu(), value[:, :, :48].nan_to_num().cpu(), 16**-0.5, allowed)
    assert relative_error(out.cpu(), ref) < 1e-5
    out = decode_attention(query, key[:, :, :40], value[:, :, :40])
    allowed = torch.ones(2, 1, 40, dtype=torch.bool)
    ref = reference_attention(query.cpu(), key[:, :, :40].cpu(), value[:, :, :40].cpu(), 16**-0.5, allowed)
    assert relative_error(out.cpu(), ref) < 1e-5


def test_unchecked_loads_only_where_whole_blocks_stay_in_storage():
    """The kernel reads whole blocks past the cache's end without bounds checks only if the storage holds them: the
    plan gets how many positions it holds."""
    stored = decode_attention_module._stored_positions
    tight = torch.zeros(2, 1, 10, 4)
    assert stored(tight, 2) == 10
    assert stored(tight[:, :, :8], 2) == 10  # the last sequence's rows 8 and 9 are still storage
    assert stored(tight[:, :, 2:], 2) == 8
    assert stored(torch.zeros(2, 1, 1, 4).expand(2, 1, 10, 4), 2) > 10**9  # stride 0: every index is the same row
    key8 = quantize_float8(torch.randn(2, 1, 10, 16), layout="key_cache")
    value8 = quantize_float8(torch.randn(2, 1, 10, 16), layout="value_cache")
    assert key8.data.shape == (2, 1, 10, 16) and stored(key8.data, 2) >= 10 + 63 and stored(key8.scale, 2) >= 73
    assert value8.data.shape == (2, 1, 2, 16, 64) and stored(value8.data, 2) == 2 and stored(value8.scale, 2) >= 73
    with pytest.raises(ValueError, match="layout"):
        quantize_float8(torch.randn(1, 1, 2, 16), layout="tiles")


def test_quantize_float8_round_trip_within_e4m3_precision():
    states = torch.randn(2, 1, 33, 64) * torch.logspace(-3, 3, 33)[None, None, :, None]
    quantized = quantize_float8(states)
    restored = quantized.dequantize(torch.float64)
    error = (restored - states.double()).abs() / states.double().abs().amax(-1, keepdim=True)
    assert error.max().item() <= 2**-4  # e4m3 keeps 3 mantissa bits: half-ulp <= 1/16 of the row's amax


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    query, key, value = random_case(1, 8, 1, 1, 16, 16, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(query, key.expand(1, 3, 16, 16), value.expand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="key_scale"):
        decode_attention(query, key.to(torch.float8_e4m3fn), value.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="boolean"):
        decode_attention(query, key, value, attention_mask=torch.zeros(1, 1, 1, 16, device=device))
    with pytest.raises(ValueError, match="either"):
        decode_attention(query, key, value, attention_mask=torch.ones(1, 1, 1, 16, dtype=torch.bool, device=device),
                         kv_lengths=torch.tensor([16], device=device))
    with pytest.raises(ValueError, match="boolean"):  # a mask for another batch size
        decode_attention(query, key, value, attention_mask=torch.ones(2, 1, 1, 16, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="kv_lengths"):
        decode_attention(query, key, value, kv_lengths=torch.tensor([16, 16], device=device))
    bounds = (torch.zeros(1, dtype=torch.int32, device=device), torch.full((1,), 16, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="pass the mask too"):
        decode_attention(query, key, value, kv_bounds=bounds)
    with pytest.raises(ValueError, match=r"`kv_bounds` end must be int32 \(1,\)"):
        decode_attention(query, key, value, attention_mask=torch.ones(1, 1, 1, 16, dtype=torch.bool, device=device),
                         kv_bounds=(bounds[0], bounds[1].long()))  # fmt: skip
    with pytest.raises(ValueError, match=r"\[0, 16\]"):  # longer than the cache (checked when given on the CPU)
        decode_attention(query, key, value, kv_lengths=torch.tensor([17]))
    with pytest.raises(ValueError, match="differs"):
        decode_attention(query, key.half(), value.half())
    for scale in (0.0, -0.5, float("nan"), float("inf"), 1e-60):
        with pytest.raises(ValueError, match="`scale` must be positive"):
            decode_attention(query, key, value, scale=scale)
    with pytest.raises(ValueError, match="value"):
        decode_attention(query, key, value[..., :8])
    with pytest.raises(ValueError, match="4-D"):
        decode_attention(query[0], key, value)
    with pytest.raises(ValueError, match="`value` is on meta"):
        decode_attention(query, key, value.to("meta"))
    for launch in ({"block_n": 48}, {"block_n": 8}, {"num_warps": 3}):
        with pytest.raises(ValueError, match="powers of two"):
            decode_attention(query, key, value, **launch)
    with pytest.raises(ValueError, match="`num_stages` must be at least 1"):
        decode_attention(query, key, value, num_stages=0)


def test_cpu_without_interpreter_is_refused():
    if INTERPRETED:
        pytest.skip("this process runs the interpreter")
    query, key, value = random_case(1, 8, 1, 1, 16, 16, torch.float32, "cpu", seed=0)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        decode_attention(query, key, value)


def test_float8_static_cache_stores_e4m3_and_scales():
    from step3_hf import Step3Config
    from step3_hf.tiny_checkpoint import TINY_CONFIG

    cache = Float8StaticCache(Step3Config(**TINY_CONFIG), max_cache_len=10)
    assert len(cache.layers) == TINY_CONFIG["num_hidden_layers"]
    key, value = torch.randn(2, 1, 3, 16), torch.randn(2, 1, 3, 16)
    stored_key, stored_value = cache.update(key, value, layer_idx=0)
    assert stored_key.data.dtype == torch.float8_e4m3fn and stored_key.data.shape == (2, 1, 10, 16)
    # Storage padded by one tile of 64 positions; values in tiles, positions contiguous.
    assert stored_value.data.shape == (2, 1, 2, 16, 64) and stored_value.data.is_contiguous()
    assert cache.layers[0].keys.shape == (2, 1, 74, 16) and cache.layers[0].key_scales.shape == (2, 1, 74)
    torch.testing.assert_close(stored_key.dequantize(torch.float32)[:, :, :3], key, rtol=0.07, atol=0.0)
    torch.testing.assert_close(stored_value.dequantize(torch.float32)[:, :, :3], value, rtol=0.07, atol=0.0)
    assert (stored_key.scale[:, :, 3:] == 0).all()
    assert int(cache.get_seq_length(0)) == 3
    cache.update(torch.randn(2, 1, 1, 16), torch.randn(2, 1, 1, 16), layer_idx=0)
    assert int(cache.get_seq_length(0)) == 4
    # Beam search reorders the batch and keeps the layout.
    before = [t.dequantize(torch.float32) for t in cache.update(key[:, :, :0], value[:, :, :0], layer_idx=0)]
    cache.layers[0].reorder_cache(torch.tensor([1, 0]))
    after = [t.dequantize(torch.float32) for t in cache.update(key[:, :, :0], value[:, :, :0], layer_idx=0)]
    assert all(torch.equal(b.flip(0), a) for b, a in zip(before, after))
    assert cache.layers[0].values.shape == (2, 1, 2, 16, 64) and cache.layers[0].values.is_contiguous()


def test_float8_static_cache_refuses_other_attention_implementations():
    from step3_hf import Step3Config
    from step3_hf.tiny_checkpoint import TINY_CONFIG

    config = Step3Config(**TINY_CONFIG)
    config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="needs attn_implementation='mfa_decode'; this model uses 'sdpa'"):
        Float8StaticCache(config, max_cache_len=10)


# --- through transformers: `attn_implementation="mfa_decode"` in generate() ---

PROMPTS = [[1, 17, 33, 90, 4, 5, 6], [1, 200], [1, 8, 9, 10, 77]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from step3_hf.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("decode_kernel"), seed=3)


def load(checkpoint, attention, device, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation=attention, dtype=dtype)
    model = model.to(device).eval()
    with torch.no_grad():  # larger weights, so that greedy continuations vary from token to token
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
    return model


@pytest.fixture
def eager_norms_rope_and_top_k(monkeypatch):
    eager_when_interpreted(monkeypatch, "rms_norm", "rotary", "top_k")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach the kernel, so that a silent fall back to SDPA cannot pass for the kernel."""
    from step3_hf.kernels import transformers_attention

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(transformers_attention, "decode_attention", counted)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_len, is_causal, takes_kernel", [(3, None, True), (3, False, False), (9, None, False)])
def test_unmasked_calls_take_the_kernel_only_where_it_agrees_with_sdpa(
    device, kv_len, is_causal, takes_kernel, kernel_calls
):
    # Without a mask SDPA is causal from the top left (or not at all with is_causal=False); the kernel's implicit
    # causal tail is the same only when the new tokens are the whole cache.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from step3_hf.kernels import mfa_decode_attention_forward

    query, key, value = random_case(2, 8, 1, 3, kv_len, 16, torch.float32, device, seed=kv_len)
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 8
    kwargs = {} if is_causal is None else {"is_causal": is_causal}
    ours, _ = mfa_decode_attention_forward(module, query, key, value, None, **kwargs)
    theirs, _ = sdpa_attention_forward(module, query, key, value, None, **kwargs)
    assert len(kernel_calls) == int(takes_kernel)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_decode_masks_are_built_without_reading_the_device(monkeypatch, padded):
    # SDPA's skip decision reads the padding mask on the host, a stall per decode step; for decode-sized queries the
    # mfa_decode mask is built instead, and equals SDPA's built mask. Prefill keeps SDPA's skip.
    from transformers.masking_utils import sdpa_mask

    from step3_hf.kernels import mfa_decode_mask

    attention_mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        attention_mask[1, :3] = 0
    host_reads = []
    read = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda tensor: host_reads.append(1) or read(tensor))
    for q_length in (1, 4):
        kwargs = dict(batch_size=2, q_length=q_length, kv_length=9, q_offset=9 - q_length, kv_offset=0,
                      attention_mask=attention_mask.bool(), device="cpu")  # fmt: skip
        mask = mfa_decode_mask(**kwargs)
        assert not host_reads
        want = sdpa_mask(**kwargs, allow_is_causal_skip=False)
        assert mask.dtype == torch.bool and mask.shape == (2, 1, q_length, 9) and torch.equal(mask, want)
    prefill = dict(batch_size=2, q_length=9, kv_length=9, q_offset=0, kv_offset=0, attention_mask=attention_mask.bool(),
                   device="cpu")  # fmt: skip
    assert (mfa_decode_mask(**prefill) is None) is not padded  # SDPA's causal skip, decided on the host
    assert host_reads


def left_padded_batch(device):
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS], device=device)
    return ids, (ids != 0).long()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generate_matches_sdpa_with_left_padding(
    checkpoint, device, cache_implementation, kernel_calls, eager_norms_rope_and_top_k
):
    from transformers import GenerationConfig

    ids, mask = left_padded_batch(device)
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
        cache_implementation=cache_implementation,
        output_scores=True, return_dict_in_generate=True, disable_compile=True,  # test_gpu.py covers compiled runs
    )  # fmt: skip
    outputs = {}
    for attention in ("sdpa", "mfa_decode"):
        with torch.no_grad():
            outputs[attention] = load(checkpoint, attention, device).generate(
                ids, attention_mask=mask, generation_config=config
            )
    assert outputs["mfa_decode"].sequences.tolist() == outputs["sdpa"].sequences.tolist()
    for ours, theirs in zip(outputs["mfa_decode"].scores, outputs["sdpa"].scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # 4 layers x every decode step
    assert len(kernel_calls) == 4 * (NEW_TOKENS - 1) and all(shape[2] == 1 for shape in kernel_calls)


@pytest.mark.parametrize("device", DEVICES)
def test_afd_step_folds_each_micro_batchs_mask_once_for_every_layer(checkpoint, device, kernel_calls, monkeypatch):
    # The AFD attention side (both halves in process, static cache, two micro-batches) folds each micro-batch's mask
    # into the kernel's bounds once per step, not once per layer, and generates what one process with SDPA does.
    from transformers import AutoModelForCausalLM

    from step3_hf.afd import InProcessConnector, Placement, Step3AFDAttentionForCausalLM, Step3FFNShard
    from step3_hf.afd.checkpoint import CheckpointReader
    from step3_hf.kernels import transformers_attention

    folds = []
    fold = transformers_attention.kv_bounds_from_mask
    monkeypatch.setattr(transformers_attention, "kv_bounds_from_mask", lambda mask: folds.append(1) or fold(mask))
    monkeypatch.setattr(decode_attention_module, "kv_bounds_from_mask", lambda mask: folds.append(1) or fold(mask))
    ids, mask = left_padded_batch(device)
    reader = CheckpointReader(checkpoint)
    attention = Step3AFDAttentionForCausalLM.from_checkpoint(reader, device=device, dtype=torch.float32,
                                                             attn_implementation="mfa_decode")  # fmt: skip
    shard = Step3FFNShard.from_checkpoint(reader, Placement(1, 1), 0, device=device, dtype=torch.float32)
    model = attention.connect(InProcessConnector([shard]), micro_batches=2, wire="raw")
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True)  # fmt: skip
    one_process = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").to(device).eval()
    with torch.no_grad():
        afd = model.generate(ids, cache_implementation="static", disable_compile=True, **kwargs)
        want = one_process.generate(ids, **kwargs)
    assert afd.sequences.tolist() == want.sequences.tolist()
    torch.testing.assert_close(torch.stack(afd.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-4)
    steps, layers = 2, model.config.num_hidden_layers
    assert len(kernel_calls) == steps * 2 * layers and len(folds) == steps * 2  # not steps * 2 * layers


@pytest.mark.parametrize("device", DEVICES)
def test_generate_with_float8_cache(
    checkpoint, device, kernel_calls, monkeypatch, float8_products, eager_norms_rope_and_top_k
):
    from transformers import GenerationConfig

    from step3_hf.kernels import transformers_attention
    from step3_hf.modeling_step3 import _CACHE_NAME  # `cache` from transformers 5.24, `past_key_values` before

    ids, mask = left_padded_batch(device)
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
        return_dict_in_generate=True, disable_compile=True,
    )  # fmt: skip
    model = load(checkpoint, "mfa_decode", device)

    def generate(cache):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, generation_config=config, **{_CACHE_NAME: cache})

    cache = Float8StaticCache(model.config, max_cache_len=ids.shape[1] + NEW_TOKENS)
    with_kernel = generate(cache)
    assert cache.layers[0].keys.dtype == torch.float8_e4m3fn
    assert len(kernel_calls) == 4 * (NEW_TOKENS - 1)
    # The same float8 cache dequantised in memory and read by SDPA: the same tokens and logits where the kernel widens
    # the cache to fp16, close logits where it also rounds the query and probabilities to e4m3.
    monkeypatch.setattr(transformers_attention, "MAX_DECODE_TOKENS", 0)
    dequantised = generate(Float8StaticCache(model.config, max_cache_len=ids.shape[1] + NEW_TOKENS))
    assert len(kernel_calls) == 4 * (NEW_TOKENS - 1)
    if float8_products == "widened":
        assert with_kernel.sequences.tolist() == dequantised.sequences.tolist()
        for ours, theirs in zip(with_kernel.logits, dequantised.logits):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    else:  # e4m3 query and probabilities: close, not equal (greedy tokens of a random model may then part ways)
        ours, theirs = with_kernel.logits[1].double(), dequantised.logits[1].double()
        assert 0 < ((ours - theirs).norm() / theirs.norm()).item() < 0.1
    # And float8 rounding moves the first decode step's logits only a little from those of the unquantised cache.
    full = generate(None)
    first_full, first_fp8 = full.logits[1].double(), with_kernel.logits[1].double()
    assert ((first_fp8 - first_full).norm() / first_full.norm()).item() < 0.15
