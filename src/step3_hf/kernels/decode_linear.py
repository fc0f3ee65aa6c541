"""A linear for decode-sized inputs with plain (bf16 / fp16 / fp32) weights: the weight-streaming Triton kernel of
`fp8_decode_linear`, without scales.

At decode a linear's input has a few dozen rows, so the product is a read of the weight. cuBLAS took 1.20-1.30x the
weight-read time on `o_proj` and the dense gate + up at 16-64 rows on an H100 (docs/step3.md's linears table,
`docs/results/h100_2026-12-06c/kernel_breakdown_fp8_v2_sweep.log`), where `moe_decode`, a kernel of the same design
over the experts' weights, reads them at 1.02-1.05x. This launches the same program as `fp8_decode_linear` (`W @ x.T`
in tiles of weight rows, the reduction split over programs until the grid fills the GPU, the splits summed in fp32 and
rounded once) on an unscaled weight.

`DecodeLinear` is `nn.Linear` computing through it on inference calls of at most `MAX_ROWS` rows on a GPU that runs the
kernels, and through `F.linear` otherwise (training, prefill, CPU): the same parameters and state dict, so checkpoints,
LoRA and device moves see an `nn.Linear`. `use_decode_linears(module)` switches a module's linears to it.

The kernel sits behind a custom op (compiled callers keep it in their graph) and has no host synchronisation (CUDA
graphs capture it). With `TRITON_INTERPRET=1` set before Triton is imported, it runs on CPU tensors (the tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_decode_linear import DecodeLinearLaunch, decode_linear_launch, launch_streaming_linear
from .triton_support import SUPPORTED_DTYPES, check_kernel_inputs, compute_capability, kernel_available, kernel_op

__all__ = ["ENABLED", "MAX_ROWS", "DecodeLinear", "decode_linear", "use_decode_linears"]

# False: `DecodeLinear` computes through `F.linear` (cuBLAS) everywhere, for side-by-side timings.
ENABLED = True
# Rows up to which `DecodeLinear` takes the kernel (decode batches, AFD micro-batches of batches up to 192); cuBLAS
# above, where the FP8 form of the program took 5-9x the weight-read time at 256 rows (docs/step3.md).
MAX_ROWS = 64
# Bytes of a weight row per reduction step: 128 bf16 columns (a 16 KB tile of 64 rows), 64 fp32 ones.
STEP_BYTES = 256


def decode_linear(x: torch.Tensor, weight: torch.Tensor, launch: DecodeLinearLaunch | None = None) -> torch.Tensor:
    """`x @ weight.T` for `x` `[M, K]` and `weight` `[N, K]` of the same dtype (bf16, fp16 or fp32); returns `[M, N]`
    in that dtype (products and sums in fp32). `launch` overrides the default launch (`decode_linear_launch`)."""
    check_kernel_inputs("decode_linear", "x", x, {"weight": weight})
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x [M, K] and weight [N, K]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a dtype of bf16, fp16 or fp32; got {x.dtype} and {weight.dtype}")
    if launch is None:  # chosen inside the op, where compiled callers do not trace the device query
        launch = DecodeLinearLaunch(0, 0, 0, 0, 0, 0)
    elif launch.block_k < 16 or launch.block_k & (launch.block_k - 1):
        raise ValueError(f"block_k {launch.block_k} must be a power of two of at least 16")
    return _decode_linear_op(x, weight, list(launch))


@kernel_op("step3_hf::decode_linear")
def _decode_linear_op(x: torch.Tensor, weight: torch.Tensor, launch: list[int]) -> torch.Tensor:
    """The launch behind `decode_linear`: `launch` is a `DecodeLinearLaunch`'s fields (all 0: the default launch for
    this call)."""
    rows, in_features = x.shape
    if rows == 0:
        return x.new_zeros(0, weight.shape[0])
    chosen = DecodeLinearLaunch(*launch)
    if chosen.block_m == 0:
        chosen = decode_linear_launch(rows, weight.shape[0], in_features, STEP_BYTES // x.element_size(), x.device)
    return launch_streaming_linear(x, None, weight, None, rows, x.dtype, chosen)


@_decode_linear_op.register_fake
def _(x, weight, launch):
    return x.new_empty(x.shape[0], weight.shape[0])


def decode_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `DecodeLinear` computes this call through the kernel: inference outside autocast on at most `MAX_ROWS`
    rows of activations of the weight's dtype (bf16, fp16, or fp32 with exact fp32 products), on a device the kernels
    run on (a GPU of compute capability 8.0+, or the interpreter)."""
    return (  # the shape and dtype first: every call of a DecodeLinear asks, and most prefill calls stop there
        ENABLED
        and math.prod(x.shape[:-1]) <= MAX_ROWS
        and x.dtype in SUPPORTED_DTYPES
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and kernel_available(x.device)
        and (x.device.type != "cuda" or compute_capability(x.device) >= (8, 0))
        and not torch.is_autocast_enabled(x.device.type)
    )


class DecodeLinear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) computing decode-sized inference calls through `decode_linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not decode_linear_applies(input, self.weight):
            return F.linear(input, self.weight, self.bias)
        out = decode_linear(input.reshape(-1, input.shape[-1]), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*input.shape[:-1], self.out_features)


def use_decode_linears(module: nn.Module) -> int:
    """Switch every plain `nn.Linear` inside `module` to `DecodeLinear` (a subclass with no state of its own: only
    `forward` changes); returns how many."""
    count = 0
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = DecodeLinear
            count += 1
    return count
