"""Step-3's expert selection in one Triton launch: top-k of the router's probabilities and the cast of their
weights to the activations' dtype.

After its linear and fp32 softmax, `Step3TopKRouter` picks experts with `torch.topk` and casts the weights back: two
launches per MoE layer at decode, each on a few hundred bytes (issue 21: a decode step is bound by the host issuing
launches). `top_k_experts` does both in one, with the same result bit for bit: the weights are the selected fp32
probabilities themselves, rounded once to nearest-even (bf16 by integer arithmetic, as Triton's interpreter would
truncate). Two steps stay torch's, as a kernel's fp32 sums in another order than torch's (which differs between CPU
and CUDA) would move results by an ulp: the softmax, and the renormalisation of configs with `norm_expert_weight`
(false in the release), which keep the eager selection.

Ties choose the lowest expert index first; NaN counts as larger than every number (as in `torch.topk`).

`use_fused_top_k(Step3TopKRouter)`, which `step3_hf` runs at import, makes the router's `select_experts` take the
kernel for inference calls on a device it runs on, and the eager code for everything else (training, CPU, fp16,
renormalisation).
"""

from __future__ import annotations

import torch

from .triton_support import (
    check_kernel_inputs,
    install_dispatch,
    kernel_available,
    kernel_op,
    round_to_bfloat16,
    tl,
    triton,
    triton_jit,
)

__all__ = ["MAX_ROUTER_EXPERTS", "top_k_experts", "use_fused_top_k"]

# The kernel holds a row of probabilities in one program.
MAX_ROUTER_EXPERTS = 1024
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


@triton_jit
def _top_k_experts(PROBS, WEIGHTS, INDEX, stride_p, stride_w, stride_i, num_experts, top_k,
                   BF16: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """One program: one token's row of probabilities."""
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    probs = tl.load(PROBS + row * stride_p + experts, mask=experts < num_experts, other=0.0)
    key = tl.where(probs != probs, float("inf"), probs)  # NaN above everything
    chosen = experts >= num_experts
    choices = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], tl.float32)
    index = tl.zeros([BLOCK_K], tl.int32)
    for k in range(0, top_k):
        largest = tl.max(tl.where(chosen, float("-inf"), key), axis=0)
        pick = tl.min(tl.where((key == largest) & ~chosen, experts, BLOCK_E), axis=0)  # lowest index of the ties
        weight = tl.sum(tl.where(experts == pick, probs, 0.0), axis=0)  # that probability, exactly
        weights = tl.where(choices == k, weight, weights)
        index = tl.where(choices == k, pick, index)
        chosen = chosen | (experts == pick)
    stored = choices < top_k
    tl.store(INDEX + row * stride_i + choices, index.to(tl.int64), mask=stored)
    if BF16:
        tl.store(WEIGHTS + row * stride_w + choices, _bfloat16_bits(weights), mask=stored)
    else:
        tl.store(WEIGHTS + row * stride_w + choices, weights, mask=stored)


@triton_jit
def _bfloat16_bits(x):
    """The bits (int16) of `x` rounded to the nearest bfloat16, ties to even (NaN: the canonical quiet NaN)."""
    rounded = round_to_bfloat16(x).to(tl.uint32, bitcast=True) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


def top_k_experts(router_probs: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(router_probs, top_k)`, its weights cast to `dtype`.

    Args:
        router_probs: `[..., E]` float32 probabilities.

    Returns:
        `[..., top_k]` weights in `dtype` and int64 expert indices, in descending order of probability (ties: the
        lower index first).
    """
    check_kernel_inputs("top_k_experts", "router_probs", router_probs, {})
    if router_probs.ndim == 0:
        raise ValueError("router_probs must be [..., E] probabilities, got a 0-d tensor")
    num_experts = router_probs.shape[-1]
    if router_probs.dtype != torch.float32:
        raise ValueError(f"router_probs must be float32 probabilities, got {router_probs.dtype}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"top_k_experts casts the weights to {SUPPORTED_DTYPES}, not {dtype}")
    if not 1 <= top_k <= num_experts or num_experts > MAX_ROUTER_EXPERTS:
        raise ValueError(
            f"top_k_experts picks 1 <= top_k <= E <= {MAX_ROUTER_EXPERTS} experts, got top_k {top_k} of {num_experts}"
        )
    return _top_k_experts_op(router_probs, top_k, dtype)


@kernel_op("step3_hf::top_k_experts")
def _top_k_experts_op(router_probs: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = router_probs.shape[-1]
    probs = router_probs.reshape(-1, num_experts)
    if probs.stride(-1) != 1:
        probs = probs.contiguous()
    bf16 = dtype == torch.bfloat16
    weights = torch.empty(probs.shape[0], top_k, dtype=torch.int16 if bf16 else dtype, device=probs.device)
    index = torch.empty(probs.shape[0], top_k, dtype=torch.long, device=probs.device)
    if probs.shape[0]:
        _top_k_experts[(probs.shape[0],)](
            probs, weights, index, probs.stride(0), weights.stride(0), index.stride(0), num_experts, top_k,
            BF16=bf16, BLOCK_E=max(16, triton.next_power_of_2(num_experts)),
            BLOCK_K=max(2, triton.next_power_of_2(top_k)), num_warps=1,
        )  # fmt: skip
    shape = (*router_probs.shape[:-1], top_k)
    return (weights.view(torch.bfloat16) if bf16 else weights).view(shape), index.view(shape)


@_top_k_experts_op.register_fake
def _(router_probs, top_k, dtype):
    shape = (*router_probs.shape[:-1], top_k)
    return router_probs.new_empty(shape, dtype=dtype), router_probs.new_empty(shape, dtype=torch.long)


def _kernel_takes(router: torch.nn.Module, router_probs: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        not (torch.is_grad_enabled() and router_probs.requires_grad)
        and not router.norm_expert_weight
        and kernel_available(router_probs.device)
        and router_probs.dtype == torch.float32
        and dtype in SUPPORTED_DTYPES
        and 1 <= router.top_k <= router_probs.shape[-1] <= MAX_ROUTER_EXPERTS
        and router_probs.numel() > 0
    )


def use_fused_top_k(router_class: type[torch.nn.Module]) -> None:
    """Make `router_class.select_experts(router_probs, dtype)` (a router with `top_k` and `norm_expert_weight`, the
    eager selection) take the kernel for inference calls where it runs (idempotent)."""

    def make(eager_select):
        def select_experts(self, router_probs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            if _kernel_takes(self, router_probs, dtype):
                return top_k_experts(router_probs, self.top_k, dtype)
            return eager_select(self, router_probs, dtype)

        return select_experts

    install_dispatch(router_class, "select_experts", "_eager_select_experts", make, "Top-k.",
                     "one Triton kernel at inference on CUDA")  # fmt: skip
