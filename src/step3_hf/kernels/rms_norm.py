"""Step-3's RMSNorm in one Triton kernel: the statistics, the scaling and the weight in one launch instead of eight.

`Step3RMSNorm.forward` in eager torch is eight kernels (a cast, the square, the mean, the epsilon, the reciprocal
square root, the scaling, a cast back, the weight). At decode each touches a few kilobytes, so each costs a launch
and little else: the 4-layer benchmark model's 13 norms were 104 of a decode step's ~330 launches, and the released
model has 184 norms per step. `rms_norm` computes the same in one launch, rounding where the eager code rounds
(the normalised activations to the input's dtype, then the product with the weight to the result dtype), so its
16-bit outputs equal the eager ones but where the fp32 statistics differ in their last bits (the order of the sum,
and `1 / sqrt` against torch's `rsqrt`) and a rounding falls the other way.

`use_fused_rms_norm(Step3RMSNorm)`, which `step3_hf` runs at import, makes the norm's forward take the kernel for
inference calls on a device it runs on, and the eager forward for everything else (training, CPU, other dtypes).
"""

from __future__ import annotations

import torch

from .triton_support import (
    SUPPORTED_DTYPES,
    check_kernel_inputs,
    install_dispatch,
    kernel_available,
    kernel_op,
    tl,
    triton,
    triton_jit,
)

__all__ = ["rms_norm", "use_fused_rms_norm"]



@triton_jit
def _rms_norm(X, W, OUT, stride_x, stride_out, width, eps, BLOCK: tl.constexpr):
    """One program: one row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < width
    x = tl.load(X + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * inverse_rms).to(X.dtype.element_ty).to(tl.float32)  # the eager forward's cast back
    weight = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + offs, (weight * normed).to(OUT.dtype.element_ty), mask=ok)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)` over the last dimension, statistics in fp32; the result
    has the dtype of that product (the promotion of `weight`'s and `x`'s)."""
    check_kernel_inputs("rms_norm", "hidden_states", hidden_states, {"weight": weight})
    width = hidden_states.shape[-1]
    if weight.shape != (width,):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit hidden states of width {width}")
    if hidden_states.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm computes {SUPPORTED_DTYPES}, got {hidden_states.dtype} and {weight.dtype}")
    return _rms_norm_op(hidden_states, weight, float(eps))


@kernel_op("step3_hf::rms_norm")
def _rms_norm_op(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    width = hidden_states.shape[-1]
    x = hidden_states.reshape(-1, width)
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()  # the kernel reads it as one dense row (a no-op for a module's own weight)
    out = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(weight.dtype, hidden_states.dtype))
    if x.shape[0]:
        block = triton.next_power_of_2(width)
        num_warps = min(16, max(1, block // 512))
        _rms_norm[(x.shape[0],)](x, weight, out, x.stride(0), out.stride(0), width, eps, BLOCK=block,
                                 num_warps=num_warps)  # fmt: skip
    return out.view(*hidden_states.shape[:-1], width)


@_rms_norm_op.register_fake
def _(hidden_states, weight, eps):
    return hidden_states.new_empty(hidden_states.shape, dtype=torch.promote_types(weight.dtype, hidden_states.dtype))


def _kernel_takes(module: torch.nn.Module, hidden_states: torch.Tensor) -> bool:
    needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or module.weight.requires_grad)
    return (
        not needs_grad
        and kernel_available(hidden_states.device)
        and hidden_states.dtype in SUPPORTED_DTYPES
        and module.weight.dtype in SUPPORTED_DTYPES
        and module.weight.device == hidden_states.device
        and hidden_states.numel() > 0
    )


def use_fused_rms_norm(norm_class: type[torch.nn.Module]) -> None:
    """Make `norm_class.forward` (an RMSNorm with `weight` and `variance_epsilon`, the eager forward) take the kernel
    for inference calls where it runs (idempotent)."""

    def make(eager_forward):
        def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            if _kernel_takes(self, hidden_states):
                return rms_norm(hidden_states, self.weight, self.variance_epsilon)
            return eager_forward(self, hidden_states)

        return rms_norm_forward

    install_dispatch(norm_class, "forward", "_eager_forward", make, "RMSNorm.",
                     "fused Triton kernel at inference on CUDA")  # fmt: skip

