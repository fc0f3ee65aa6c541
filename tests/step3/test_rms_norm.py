"""The one-launch RMSNorm against a float64 recomputation and against the eager `Step3RMSNorm.forward`: on CPU through
Triton's interpreter, and on CUDA; and the installed forward's choice between them.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import importlib

import pytest
import torch
from triton_cases import DEVICES, INTERPRETED, relative_error

from step3_hf.kernels import rms_norm
from step3_hf.modeling_step3 import Step3RMSNorm

rms_norm_module = importlib.import_module("step3_hf.kernels.rms_norm")
EPS = 1e-5


def reference(x, weight, eps=EPS):
    x = x.double()
    return weight.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def inputs(shape, dtype, weight_dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * torch.logspace(-2, 2, shape[-2])[:, None]).to(dtype)  # row scales
    weight = (torch.rand(shape[-1], generator=generator) + 0.5).to(weight_dtype)
    return x.to(device), weight.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                            (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)  # fmt: skip
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 200), (1, 7168)], ids=str)
def test_matches_float64_and_the_eager_forward(device, dtype, weight_dtype, shape):
    x, weight = inputs(shape, dtype, weight_dtype, device)
    out = rms_norm(x, weight, EPS)
    norm = Step3RMSNorm(shape[-1], eps=EPS).to(device=device, dtype=weight_dtype)
    norm.weight.data.copy_(weight)
    eager = Step3RMSNorm.forward._eager_forward(norm, x)
    assert out.shape == x.shape and out.dtype == eager.dtype == torch.promote_types(dtype, weight_dtype)
    assert relative_error(out.cpu(), reference(x.cpu(), weight.cpu())) < (1e-6 if dtype == torch.float32 else 1e-2)
    # the same two roundings as the eager code: on CUDA equal but for the fp32 sum's order (one ulp, rarely); the
    # interpreter rounds float casts toward zero, which may cost an ulp at each of the two roundings
    ulp = max(torch.finfo(out.dtype).eps, torch.finfo(dtype).eps)  # the coarser of the two roundings
    if dtype == torch.float32:  # no 16-bit rounding to share: torch's rsqrt and the kernel's differ by a few ulps
        assert torch.allclose(out.double(), eager.double(), rtol=16 * ulp, atol=0)
        return
    assert torch.allclose(out.double(), eager.double(), rtol=2 * ulp, atol=0)
    if not INTERPRETED:
        assert ((out.double() - eager.double()).abs() <= ulp * eager.double().abs()).float().mean() > 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_empty_inputs(device):
    x, weight = inputs((6, 64), torch.bfloat16, torch.bfloat16, device)
    strided = x[::2]  # rows 128 elements apart
    assert relative_error(rms_norm(strided, weight, EPS).cpu(), reference(strided.cpu(), weight.cpu())) < 1e-2
    column = x.t().contiguous().t()  # last dimension not contiguous
    assert relative_error(rms_norm(column, weight, EPS).cpu(), reference(x.cpu(), weight.cpu())) < 1e-2
    assert rms_norm(x[:0], weight, EPS).shape == (0, 64)
    every_other = torch.stack([weight, weight], 1)[:, 0]  # a weight view with stride 2
    assert every_other.stride() == (2,)
    assert relative_error(rms_norm(x, every_other, EPS).cpu(), reference(x.cpu(), weight.cpu())) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    x, weight = inputs((2, 64), torch.bfloat16, torch.bfloat16, device)
    with pytest.raises(ValueError, match="does not fit hidden states of width 64"):
        rms_norm(x, weight[:32], EPS)
    with pytest.raises(ValueError, match="rms_norm computes"):
        rms_norm(x.double(), weight, EPS)


def test_cpu_without_interpreter_is_refused():
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    x, weight = inputs((2, 64), torch.bfloat16, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rms_norm(x, weight, EPS)


@pytest.mark.parametrize("device", DEVICES)
def test_the_installed_forward_takes_the_kernel_for_inference_only(device, monkeypatch):
    """Counted through the module global, so that the eager path cannot pass for the kernel."""
    calls = []
    kernel = rms_norm_module.rms_norm
    monkeypatch.setattr(rms_norm_module, "rms_norm", lambda *a: calls.append(1) or kernel(*a))
    norm = Step3RMSNorm(64, eps=EPS).to(device=device, dtype=torch.bfloat16)
    x, _ = inputs((3, 64), torch.bfloat16, torch.bfloat16, device)
    with torch.no_grad():
        out = norm(x)
    assert calls == [1]
    eager = norm(x)  # the weight requires grad: training keeps the eager forward, whose gradients flow
    assert calls == [1] and eager.requires_grad
    torch.testing.assert_close(out, eager.detach())


def test_cpu_tensors_keep_the_eager_forward_without_the_interpreter(monkeypatch):
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    monkeypatch.setattr(rms_norm_module, "rms_norm", lambda *a: pytest.fail("the kernel was called on CPU"))
    norm = Step3RMSNorm(64, eps=EPS)
    x, _ = inputs((3, 64), torch.float32, torch.float32, "cpu")
    with torch.no_grad():
        assert relative_error(norm(x), reference(x, norm.weight)) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_the_installed_forward_compiles_without_graph_breaks(device):
    norm = Step3RMSNorm(64, eps=EPS).to(device=device, dtype=torch.bfloat16).requires_grad_(False)
    x, _ = inputs((3, 64), torch.bfloat16, torch.bfloat16, device)
    compiled = torch.compile(norm, fullgraph=True, backend="eager")
    assert relative_error(compiled(x).cpu(), reference(x.cpu(), norm.weight.cpu())) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_the_op_passes_torch_library_checks(device):
    """The fake (meta) function agrees with the op on shapes and dtypes, and the op traces under AOT autograd."""
    for dtype, weight_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
        x, weight = inputs((2, 3, 64), dtype, weight_dtype, device)
        torch.library.opcheck(torch.ops.step3_hf.rms_norm, (x, weight, EPS),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
