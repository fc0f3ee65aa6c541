"""Shared set-up of the Triton kernel tests: the same cases run compiled on CUDA and, on CPU, through Triton's
interpreter.

`TRITON_INTERPRET=1` only takes effect if it is set before Triton is first imported, and other test modules import
step3_hf (hence Triton) into the same pytest process. So unless this process already runs under the interpreter, a
kernel test file's kernel cases run in this process only on CUDA, and `test_triton_interpreter.py` runs all the
kernel files again in one interpreter-mode subprocess.
"""

import pytest
import torch

from step3_hf.kernels import interpreter_enabled

INTERPRETED = interpreter_enabled()
HAS_CUDA = torch.cuda.is_available() and not INTERPRETED
# The marks of a case that runs on CUDA only.
CUDA_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
DEVICES = ["cpu"] if INTERPRETED else [pytest.param("cuda", marks=CUDA_ONLY)]

skip_if_interpreted = pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter")


def eager_when_interpreted(monkeypatch, *kernels: str) -> None:
    """Under the interpreter, a test of one kernel inside a whole Step-3 model runs the model's other one-launch
    kernels, named here ("rms_norm", "rotary", "top_k"), as the eager code they replace. Each gives the eager
    result bit for bit (its own test file checks that), and interpreted they took most of such a test's time. On
    CUDA the model runs as users get it."""
    if not INTERPRETED:
        return
    from step3_hf import modeling_step3

    installed = {
        "rms_norm": (modeling_step3.Step3RMSNorm, "forward", "_eager_forward"),
        "rotary": (modeling_step3, "apply_rotary_pos_emb", "_eager_function"),
        "top_k": (modeling_step3.Step3TopKRouter, "select_experts", "_eager_select_experts"),
    }
    for kernel in kernels:
        owner, name, eager = installed[kernel]
        monkeypatch.setattr(owner, name, getattr(getattr(owner, name), eager))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """`|out - ref| / |ref|` in float64, after checking that `out` is finite."""
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# fp32 products of float8 x float8 operands: Hopper's float8 warp-group MMA adds them with fewer bits than fp32 within
# a step (H100, 2026-12-07: 3e-5 to 9e-5 off float64 with 64-column tiles, 4e-8 with 32-column ones, on the same
# operands); the interpreter's fp32 sums stay within 1e-5.
FLOAT8_MMA_FP32_TOLERANCE = 1e-5 if INTERPRETED else 2e-4


def dequantized_activations(x: torch.Tensor) -> torch.Tensor:
    """`x` as `quantize_fp8_activations` rounds it (e4m3 per row and 128 columns), in float64 on the CPU."""
    from step3_hf.kernels.fp8_activation_quant import GROUP_SIZE, quantize_fp8_activations_eager

    quantized, scale = quantize_fp8_activations_eager(x.cpu())
    groups = quantized.double().unflatten(-1, (-1, GROUP_SIZE)) * scale.double()[..., None]
    return groups.flatten(-2)[: x.shape[0]]
