"""The block-FP8 decode linear against a float64 product with the dequantized weight: on CPU through Triton's
interpreter, and on CUDA; and `fp8_block_linear`'s choice of it for decode-sized inputs.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import importlib

import pytest
import torch
from triton_cases import DEVICES, FLOAT8_MMA_FP32_TOLERANCE, INTERPRETED, dequantized_activations, relative_error

from step3_hf.fp8 import dequantize_block_fp8, quantize_block_fp8
from step3_hf.kernels.fp8_decode_linear import DecodeLinearLaunch, decode_linear_launch, fp8_decode_linear
from step3_hf.kernels.triton_support import sm_count

fp8_linear = importlib.import_module("step3_hf.kernels.fp8_linear")
# bf16 / fp16: one rounding of the output (the products and sums are fp32); fp32: the sums' order.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def quantized_linear(rows, out_features, in_features, block_size, dtype, device, seed=0):
    """Activations, a block-FP8 weight with its scales (tile magnitudes varying by 100x, so that a scale read from
    the wrong tile shows), and the float64 reference product."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight *= torch.logspace(-1, 1, in_features)[None, :]  # tiles of different magnitudes along K ...
    weight *= torch.logspace(1, -1, out_features)[:, None]  # ... and along N
    quantized, scale = quantize_block_fp8(weight, block_size)
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    reference = x.double() @ dequantize_block_fp8(quantized, scale, block_size, torch.float64).T
    return x.to(device), quantized.to(device), scale.to(device), reference


# (rows, out, in, block): partial edge tiles in N and K, one row, more rows than one tile, 128-wide tiles.
SHAPES = [(1, 40, 72, (16, 16)), (5, 50, 200, (32, 32)), (37, 64, 96, (16, 32)), (3, 130, 256, (128, 128))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_matches_the_float64_product_with_the_dequantized_weight(device, dtype, shape):
    rows, out_features, in_features, block_size = shape
    x, weight, scale, reference = quantized_linear(rows, out_features, in_features, block_size, dtype, device)
    out = fp8_decode_linear(x, weight, scale, block_size)
    assert out.shape == (rows, out_features) and out.dtype == dtype
    assert relative_error(out.cpu(), reference) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_every_launch_gives_the_same_product(device):
    """Split reductions, column tiles and row tiles change the order of fp32 sums only."""
    x, weight, scale, reference = quantized_linear(20, 96, 256, (32, 32), torch.float32, device, seed=1)
    default = decode_linear_launch(20, 96, 256, 32, device)
    assert default.split_k > 1  # a small weight is split to fill the GPU
    for launch in (default, DecodeLinearLaunch(16, 32, 32, 1), DecodeLinearLaunch(32, 64, 16, 5),
                   DecodeLinearLaunch(16, 16, 32, 8, num_warps=2, num_stages=2)):  # fmt: skip
        assert relative_error(fp8_decode_linear(x, weight, scale, (32, 32), launch).cpu(), reference) < 1e-5, launch


# (rows, out, in, block) with K a multiple of 128 and tiles at least 32 wide: one row, a partial row tile, 128-wide.
A8_SHAPES = [(1, 40, 256, (16, 32)), (20, 48, 256, (32, 64)), (3, 130, 256, (128, 128))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", A8_SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_float8_activations_match_the_float64_product_of_both_dequantized_operands(device, dtype, shape):
    """`quantize_activations`: the product of the activations as rounded per row and 128 columns with the
    dequantized weight, for the default launch and split, row and column tiles; and that rounding really happened
    (the weight-only product differs from it by about e4m3's precision)."""
    rows, out_features, in_features, block_size = shape
    x, weight, scale, weight_only_reference = quantized_linear(rows, out_features, in_features, block_size, dtype,
                                                               device, seed=3)  # fmt: skip
    w = dequantize_block_fp8(weight.cpu(), scale.cpu(), block_size, torch.float64)
    reference = dequantized_activations(x) @ w.T
    assert 1e-3 < relative_error(reference, weight_only_reference) < 6e-2
    tolerance = FLOAT8_MMA_FP32_TOLERANCE if dtype == torch.float32 else TOLERANCE[dtype]
    for launch in (None, DecodeLinearLaunch(16, 32, 32, 3), DecodeLinearLaunch(32, 16, 32, 1, num_warps=2)):
        out = fp8_decode_linear(x, weight, scale, block_size, launch, quantize_activations=True)
        assert out.shape == (rows, out_features) and out.dtype == dtype
        assert relative_error(out.cpu(), reference) < tolerance, launch


@pytest.mark.parametrize("device", DEVICES)
def test_split_reductions_with_a_partial_last_step(device):
    """K = 200 with 32-wide tiles: 7 steps, the last one partial, split 1, 2, 3 and 7 ways."""
    x, weight, scale, reference = quantized_linear(5, 50, 200, (32, 32), torch.bfloat16, device, seed=2)
    for split_k in (1, 2, 3, 7):
        out = fp8_decode_linear(x, weight, scale, (32, 32), DecodeLinearLaunch(16, 32, 32, split_k))
        assert relative_error(out.cpu(), reference) < TOLERANCE[torch.bfloat16], split_k


@pytest.mark.parametrize("device", DEVICES)
def test_the_op_passes_torch_library_checks(device):
    """The fake (meta) function agrees with the op on shapes and dtypes, one split and several, and the op traces
    under AOT autograd. (`test_schema` is left out: it multiplies the float8 weight, which float8 does not do.)"""
    x, weight, scale, _ = quantized_linear(5, 50, 200, (32, 32), torch.bfloat16, device)
    wide = quantized_linear(5, 50, 256, (32, 32), torch.bfloat16, device)  # K a multiple of 128: fp8 activations
    for args, launch in (((x, weight, scale), (16, 32, 32, 1, 4, 3, False)),
                         ((x, weight, scale), (16, 32, 32, 3, 4, 3, False)), ((x, weight, scale), (0,) * 6 + (False,)),
                         (wide[:3], (16, 32, 32, 3, 4, 3, True)), (wide[:3], (0,) * 6 + (True,))):  # fmt: skip
        torch.library.opcheck(torch.ops.step3_hf.fp8_decode_linear, (*args, 32, 32, *launch),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_give_an_empty_product(device):
    x, weight, scale, _ = quantized_linear(1, 40, 72, (16, 16), torch.bfloat16, device)
    assert fp8_decode_linear(x[:0], weight, scale, (16, 16)).shape == (0, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    x, weight, scale, _ = quantized_linear(2, 40, 64, (16, 16), torch.bfloat16, device)
    with pytest.raises(ValueError, match=r"x \[M, K\] and weight \[N, K\]"):
        fp8_decode_linear(x[:, :32], weight, scale, (16, 16))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_decode_linear(x, weight.bfloat16(), scale, (16, 16))
    with pytest.raises(ValueError, match="`scale_inv` must be float32 \\(3, 4\\)"):
        fp8_decode_linear(x, weight, scale[:2], (16, 16))
    with pytest.raises(ValueError, match="block_k 48 must be a power of two"):
        fp8_decode_linear(x, weight, scale, (16, 16), DecodeLinearLaunch(16, 16, 48, 1))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        fp8_decode_linear(x.double(), weight, scale, (16, 16))
    with pytest.raises(ValueError, match="K a multiple of 128 .* got K 64"):
        fp8_decode_linear(x, weight, scale, (16, 16), quantize_activations=True)
    wide = quantized_linear(2, 40, 128, (16, 16), torch.bfloat16, device)
    with pytest.raises(ValueError, match="steps of 32 to 128; got K 128, steps of 16"):
        fp8_decode_linear(*wide[:3], (16, 16), quantize_activations=True)
    deep = quantized_linear(2, 40, 256, (256, 256), torch.bfloat16, device)  # a 256-deep step spans two groups
    with pytest.raises(ValueError, match="steps of 32 to 128; got K 256, steps of 256"):
        fp8_decode_linear(*deep[:3], (256, 256), DecodeLinearLaunch(16, 32, 256, 1), quantize_activations=True)


def test_cpu_without_interpreter_is_refused():
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    x, weight, scale, _ = quantized_linear(2, 40, 64, (16, 16), torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fp8_decode_linear(x, weight, scale, (16, 16))


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_block_linear_takes_the_kernel_for_decode_sized_inference_only(device, monkeypatch):
    """Counted through the module global, so that a silent hand-off to another path cannot pass for the kernel; the
    other paths' products agree with the kernel's."""
    calls = []
    kernel = fp8_linear.fp8_decode_linear
    monkeypatch.setattr(fp8_linear, "fp8_decode_linear", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(fp8_linear, "MAX_DECODE_LINEAR_ROWS", 8)
    monkeypatch.setattr(fp8_linear, "MAX_NARROW_LINEAR_ROWS", 8)  # narrow linears: the next test
    x, weight, scale, reference = quantized_linear(8, 40, 64, (16, 16), torch.bfloat16, device)
    out = fp8_linear.fp8_block_linear(x[None], weight, scale, (16, 16))  # [1, 8, K]: 8 rows
    assert calls == [1] and out.shape == (1, 8, 40)
    assert relative_error(out[0].cpu(), reference) < TOLERANCE[torch.bfloat16]
    longer = torch.cat([x, x[:1]])  # 9 rows: past the limit, another path
    assert relative_error(fp8_linear.fp8_block_linear(longer, weight, scale, (16, 16))[:8].cpu(), reference) < 3e-2
    x_grad = x.clone().requires_grad_()  # training: the dequantized weight, so that gradients flow
    fp8_linear.fp8_block_linear(x_grad, weight, scale, (16, 16)).sum().backward()
    assert calls == [1] and x_grad.grad is not None
    odd = quantized_linear(2, 40, 72, (24, 24), torch.bfloat16, device)  # 24-wide tiles: steps of 8 would be needed
    fp8_linear.fp8_block_linear(odd[0], odd[1], odd[2], (24, 24))
    assert calls == [1]


@pytest.mark.parametrize("device", DEVICES)
def test_narrow_linears_take_the_kernel_for_more_rows(device, monkeypatch):
    """Past `MAX_DECODE_LINEAR_ROWS`, up to `MAX_NARROW_LINEAR_ROWS`, a linear whose 128 x 128 output tiles would
    occupy fewer than `NARROW_TILES_PER_SM` of the SMs still takes the kernel; a wider one, or more rows, does not."""
    calls = []
    kernel = fp8_linear.fp8_decode_linear
    monkeypatch.setattr(fp8_linear, "fp8_decode_linear", lambda *a, **k: calls.append(a[0].shape[0]) or kernel(*a, **k))
    monkeypatch.setattr(fp8_linear, "MAX_DECODE_LINEAR_ROWS", 8)
    monkeypatch.setattr(fp8_linear, "MAX_NARROW_LINEAR_ROWS", 16)
    monkeypatch.setattr(fp8_linear, "NARROW_TILES_PER_SM", 4 / sm_count(device))  # narrow: at most 3 tiles
    for rows, out_features, expected in ((9, 40, True), (16, 384, True), (16, 385, False), (17, 40, False)):
        x, weight, scale, reference = quantized_linear(rows, out_features, 64, (16, 16), torch.bfloat16, device)
        calls.clear()
        out = fp8_linear.fp8_block_linear(x, weight, scale, (16, 16))
        assert (calls == [rows]) is expected, (rows, out_features)
        assert relative_error(out.cpu(), reference) < 3e-2


def test_on_an_h100_the_narrow_linears_are_the_k_and_v_projections(monkeypatch):
    """The defaults on 132 SMs: Step-3's k and v projections (256 outputs) take the kernel up to 256 rows; its q
    projection (2048) and o_proj (7168) take cuBLAS from 65 rows."""
    monkeypatch.setattr(fp8_linear, "sm_count", lambda device: 132)
    narrow = {(rows, out): fp8_linear._decode_sized(rows, out, "cuda") for rows in (64, 65, 128, 256, 257)
              for out in (256, 2048, 7168)}  # fmt: skip
    assert [key for key, takes in narrow.items() if takes] == [
        (64, 256), (64, 2048), (64, 7168), (65, 256), (128, 256), (256, 256)
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_block_linear_rounds_activations_only_when_asked_and_able(device, monkeypatch):
    """`DECODE_ACTIVATIONS_FP8` sends decode calls with whole 128-column groups and tiles at least 32 wide through
    the float8-activation kernel, bit for bit its product; other calls, and every call when it is off, stay
    weight-only."""
    cases = {"able": ((4, 40, 256, (32, 32)), True), "K of 64": ((4, 40, 64, (16, 16)), False),
             "16-wide tiles": ((4, 40, 128, (16, 16)), False)}  # fmt: skip
    for flag in (False, True):
        monkeypatch.setattr(fp8_linear, "DECODE_ACTIVATIONS_FP8", flag)
        for name, ((rows, out_features, in_features, block), able) in cases.items():
            x, weight, scale, _ = quantized_linear(rows, out_features, in_features, block, torch.bfloat16, device)
            expected = fp8_decode_linear(x, weight, scale, block, quantize_activations=flag and able)
            assert torch.equal(fp8_linear.fp8_block_linear(x, weight, scale, block), expected), (flag, name)


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_without_graph_breaks(device):
    """A compiled caller (static-cache `generate()`) keeps the op in its graph: the default launch, which asks the
    device for its SM count, is chosen inside the op, out of dynamo's sight."""
    x, weight, scale, reference = quantized_linear(3, 40, 64, (16, 16), torch.bfloat16, device)
    compiled = torch.compile(lambda a: fp8_decode_linear(a, weight, scale, (16, 16)), fullgraph=True, backend="eager")
    assert relative_error(compiled(x).cpu(), reference) < TOLERANCE[torch.bfloat16]
