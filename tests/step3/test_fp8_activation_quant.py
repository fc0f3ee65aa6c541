"""The one-launch activation quantization of the cuBLAS FP8 path against the eager quantization, byte for byte, and
against what its bytes mean (e4m3 rounded to nearest, ties to even; values within half a step of `x / scale`): on
CPU through Triton's interpreter, and on CUDA; and `fp8_linear`'s cuBLAS path taking it.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import importlib

import pytest
import torch
from triton_cases import CUDA_ONLY, DEVICES, INTERPRETED

from step3_hf.fp8 import FP8_DTYPE, quantize_block_fp8
from step3_hf.kernels.fp8_activation_quant import quantize_fp8_activations, quantize_fp8_activations_eager

fp8_linear = importlib.import_module("step3_hf.kernels.fp8_linear")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Magnitudes (powers of ten) spread over the rows and groups: from the dtype's subnormals to near its largest value.
MAGNITUDES = {torch.bfloat16: (-40, 37), torch.float16: (-7, 4), torch.float32: (-42, 37)}


def activations(rows, width, dtype, device, seed=0):
    """Random rows whose 128-column groups range from tiny to huge magnitudes, one all-zero row (of several) and one
    all-zero group."""
    generator = torch.Generator().manual_seed(seed)
    low, high = MAGNITUDES[dtype]
    groups = width // 128
    order = torch.randperm(rows * groups, generator=generator)
    scales = torch.logspace(low, high, rows * groups, dtype=torch.float64)[order]
    x = torch.randn(rows, groups, 128, generator=generator, dtype=torch.float64) * scales.view(rows, groups, 1)
    x = x.clamp(-torch.finfo(dtype).max / 2, torch.finfo(dtype).max / 2).flatten(1).to(dtype)
    if rows > 1:
        x[rows // 2] = 0
    if groups > 1:
        x[0, 128:256] = 0
    return x.to(device)


def assert_same_bytes(out, reference):
    (q, scale), (q_ref, scale_ref) = out, reference
    assert q.dtype == q_ref.dtype == FP8_DTYPE and q.shape == q_ref.shape
    assert torch.equal(q.view(torch.uint8).cpu(), q_ref.view(torch.uint8).cpu())
    assert scale.dtype == torch.float32 and scale.shape == scale_ref.shape
    # the same layout (the stride of a dimension of size 1 means nothing: the eager code's may differ there)
    assert [s for s, n in zip(scale.stride(), scale.shape) if n > 1] == [
        s for s, n in zip(scale_ref.stride(), scale.shape) if n > 1
    ]
    assert torch.equal(scale.cpu(), scale_ref.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [128, 384])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64, 67])
def test_equals_the_eager_quantization_byte_for_byte(device, dtype, width, rows):
    x = activations(rows, width, dtype, device, seed=rows)
    q, scale = quantize_fp8_activations(x)
    padded = -(-rows // 4) * 4
    assert q.shape == (padded, width) and scale.shape == (padded, width // 128) and scale.stride() == (1, padded)
    assert_same_bytes((q, scale), quantize_fp8_activations_eager(x.cpu()))
    if x.is_cuda:  # the eager code gives the same bits on CUDA as on CPU
        assert_same_bytes((q, scale), quantize_fp8_activations_eager(x))
    # what the bytes mean: each value within half an e4m3 step of x / scale (2^-4 relative; 2^-10 below 2^-6)
    dequantized = (q.double().cpu().unflatten(1, (-1, 128)) * scale.double().cpu()[..., None]).flatten(1)[:rows]
    exact = x.double().cpu()
    bound = torch.maximum(exact.abs() * 2**-4, scale.double().cpu().repeat_interleave(128, 1)[:rows] * 2**-10)
    assert ((dequantized - exact).abs() <= bound * (1 + 1e-6)).all()


def e4m3_grid_cases():
    """fp32 rows of 127 values and 448 (so that the scale is exactly 1): every finite e4m3 value, the midpoints
    between neighbours (ties) and the fp32 values next to them, of both signs; and the bytes they round to."""
    codes = torch.arange(0x7F, dtype=torch.uint8)  # 0 .. 0x7E: 0 to 448 (0x7F is NaN)
    values = codes.view(FP8_DTYPE).float()
    midpoints = (values[:-1] + values[1:]) / 2  # exact in fp32
    ties = torch.where(codes[:-1] % 2 == 0, codes[:-1], codes[1:])  # ties to the even code
    cases = [
        (values, codes),
        (midpoints, ties),
        (torch.nextafter(midpoints, torch.tensor(1e3)), codes[1:]),
        (torch.nextafter(midpoints, torch.tensor(0.0)), codes[:-1]),
    ]
    x = torch.cat([v for v, _ in cases] + [-v for v, _ in cases])
    expected = torch.cat([c for _, c in cases] + [c | 0x80 for _, c in cases])
    rows = -(-x.numel() // 127)
    pad = rows * 127 - x.numel()  # zeros after the last case, byte 0
    grid = torch.cat([torch.cat([x, x.new_zeros(pad)]).view(rows, 127), torch.full((rows, 1), 448.0)], 1)
    bytes_ = torch.cat([torch.cat([expected, expected.new_zeros(pad)]).view(rows, 127),
                        torch.full((rows, 1), 0x7E, dtype=torch.uint8)], 1)  # fmt: skip
    return grid, bytes_


@pytest.mark.parametrize("device", DEVICES)
def test_e4m3_rounding_is_to_nearest_ties_to_even(device):
    grid, expected = e4m3_grid_cases()
    q, scale = quantize_fp8_activations(grid.to(device))
    rows = grid.shape[0]
    assert torch.equal(scale[:rows].cpu(), torch.ones(rows, 1))
    assert torch.equal(q[:rows].view(torch.uint8).cpu(), expected)
    assert_same_bytes((q, scale), quantize_fp8_activations_eager(grid))


@pytest.mark.parametrize("device", DEVICES)
def test_padded_rows_are_zeros_and_the_scales_m_contiguous(device):
    x = activations(5, 384, torch.bfloat16, device)
    q, scale = quantize_fp8_activations(x)
    assert q.shape == (8, 384) and scale.shape == (8, 3) and scale.stride() == (1, 8)
    assert scale.t().is_contiguous()  # groups one after the other, each M-contiguous: cuBLAS's BlockWise1x128 layout
    assert not q[5:].view(torch.uint8).any()
    zero_group_scale = torch.tensor(1e-12, dtype=torch.float32) * torch.tensor(1 / 448, dtype=torch.float32)
    assert torch.equal(scale[5:].cpu(), zero_group_scale.expand(3, 3))
    assert quantize_fp8_activations(x[:4])[0].shape == (4, 384)  # a multiple of 4 gets no padding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_finite_inputs_give_what_the_eager_code_gives(device, dtype):
    """No check (it would synchronise): NaN where the eager code has NaN, and nowhere else."""
    x = activations(6, 384, dtype, "cpu")
    inf, nan = float("inf"), float("nan")
    x[1, 5] = inf  # group (1, 0): inf
    x[2, 130] = nan  # group (2, 1): NaN
    x[3, 300], x[3, 301] = -inf, inf  # group (3, 2): both infinities
    x[4, 10], x[4, 11] = nan, inf  # group (4, 0): NaN and inf
    q, scale = (t.cpu() for t in quantize_fp8_activations(x.to(device)))
    q_ref, scale_ref = quantize_fp8_activations_eager(x)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0, equal_nan=True)
    is_nan = q.float().isnan()
    assert torch.equal(is_nan, q_ref.float().isnan())
    assert torch.equal(q.view(torch.uint8)[~is_nan], q_ref.view(torch.uint8)[~is_nan])
    # spelled out: an infinity makes its group's scale inf, itself NaN and the rest zeros; a NaN makes the group NaN
    assert scale[1, 0] == inf and scale[3, 2] == inf and scale[2, 1].isnan() and scale[4, 0].isnan()
    assert is_nan[1, :128].nonzero().tolist() == [[5]] and not q[1, :128].float().nan_to_num().any()
    assert is_nan[3, 256:].nonzero().tolist() == [[44], [45]]
    assert is_nan[2, 128:256].all() and is_nan[4, :128].all()
    assert is_nan.sum() == 1 + 128 + 2 + 128  # every other group as without them
    assert torch.isfinite(scale[[0, 5]]).all() and torch.isfinite(scale[1, 1:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    x = activations(10, 256, torch.float16, device)
    for view in (x[::3], x.t().contiguous().t(), x[:, 128:]):
        assert_same_bytes(quantize_fp8_activations(view), quantize_fp8_activations_eager(view.cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows(device):
    q, scale = quantize_fp8_activations(activations(1, 256, torch.bfloat16, device)[:0])
    assert q.shape == (0, 256) and scale.shape == (0, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_the_op_passes_torch_library_checks(device):
    """The fake function agrees with the op on shapes, dtypes and strides (padded and not), and the op traces under
    AOT autograd."""
    for rows in (5, 8):
        x = activations(rows, 256, torch.bfloat16, device)
        torch.library.opcheck(torch.ops.step3_hf.quantize_fp8_activations, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_without_graph_breaks(device):
    compiled = torch.compile(quantize_fp8_activations, fullgraph=True, backend="eager", dynamic=True)
    for rows in (5, 7, 12):  # dynamic row counts: the padded size is computed symbolically
        x = activations(rows, 384, torch.bfloat16, device, seed=rows)
        assert_same_bytes(compiled(x), quantize_fp8_activations_eager(x.cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_clear_errors(device):
    x = activations(3, 256, torch.bfloat16, device)
    with pytest.raises(ValueError, match="`x` has 200 features, not a multiple of the group size 128"):
        quantize_fp8_activations(x[:, :200])
    with pytest.raises(ValueError, match=r"`x` must be 2-D \[tokens, features\], got shape \(256,\)"):
        quantize_fp8_activations(x[0])
    with pytest.raises(ValueError, match="`x` must be bf16, fp16 or fp32, got torch.float64"):
        quantize_fp8_activations(x.double())
    with pytest.raises(ValueError, match="`x` must be bf16, fp16 or fp32, got torch.int32"):
        quantize_fp8_activations(x.int())


def test_cpu_without_interpreter_is_refused():
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        quantize_fp8_activations(activations(3, 256, torch.bfloat16, "cpu"))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_ONLY)])
def test_captured_in_a_cuda_graph(device):
    static = activations(67, 384, torch.bfloat16, device)
    quantize_fp8_activations(static)  # compiles the kernel before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = quantize_fp8_activations(static)
    fresh = activations(67, 384, torch.bfloat16, device, seed=1)
    static.copy_(fresh)
    graph.replay()
    assert_same_bytes(out, quantize_fp8_activations_eager(fresh.cpu()))


def cublas_case(rows, device="cuda"):
    generator = torch.Generator().manual_seed(0)
    weight, scale = quantize_block_fp8(torch.randn(384, 512, generator=generator) * 0.05, (128, 128))
    x = torch.randn(rows, 512, generator=generator).bfloat16()
    if device == "cpu":
        return x, weight, scale
    weight, scale = weight.cuda(), scale.cuda()
    if not fp8_linear.scaled_mm_supported(weight, (128, 128)):
        pytest.skip("cuBLAS block-scaled FP8 GEMM needs compute capability 9.0+")
    return x.cuda(), weight, scale


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_ONLY)])
def test_the_cublas_path_quantizes_in_one_launch(device, monkeypatch):
    """`fp8_block_linear` above 64 rows quantizes through the kernel (counted through the module global), and cuBLAS
    gets the bytes the eager quantization gives, so the product is the same."""
    x, weight, scale = cublas_case(67)
    calls = []
    kernel = fp8_linear.quantize_fp8_activations
    monkeypatch.setattr(fp8_linear, "quantize_fp8_activations", lambda a: calls.append(1) or kernel(a))
    out = fp8_linear.fp8_block_linear(x, weight, scale, (128, 128))
    assert calls == [1] and out.shape == (67, 384) and fp8_linear._cublas_failure is None
    assert torch.equal(out, fp8_linear._scaled_mm_linear(x, weight, scale, quantize_fp8_activations_eager))


def test_the_cublas_path_traces_into_one_graph():
    """torch.compile(fullgraph=True) traces the quantization and cuBLAS's block-scaled GEMM (`F.scaled_mm`) into one
    graph. On CPU, which has no such GEMM, the graph is traced and not run."""
    x, weight, scale = cublas_case(67, device="cpu")
    graphs = []

    def trace_only(gm, example_inputs):
        graphs.append(gm)
        return lambda *args: [torch.empty(0)]

    torch.compile(lambda a: fp8_linear._scaled_mm_linear(a, weight, scale), fullgraph=True, backend=trace_only)(x)
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert len(graphs) == 1 and any("scaled_mm" in target for target in targets), targets


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_ONLY)])
@pytest.mark.skipif(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 13),
                    reason="torch < 2.13 (below the supported range) cannot trace F.scaled_mm")  # fmt: skip
def test_the_cublas_path_compiles_without_graph_breaks(device):
    x, weight, scale = cublas_case(67)
    compiled = torch.compile(lambda a: fp8_linear._scaled_mm_linear(a, weight, scale), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), fp8_linear._scaled_mm_linear(x, weight, scale, quantize_fp8_activations_eager))
