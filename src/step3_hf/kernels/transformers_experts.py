"""`experts_implementation="moe_decode"`: the fused-MoE decode kernel for decode-sized inference calls,
transformers' `grouped_mm` for everything else.

Registered with transformers' experts functions, so `from_pretrained(..., experts_implementation="moe_decode")`
routes every MoE layer's experts through `moe_decode_experts_forward`. A call takes the kernel (`moe_decode.py`)
only for inference with up to `MAX_MOE_DECODE_TOKENS` tokens, on a device the kernel runs on (CUDA, or CPU under
`TRITON_INTERPRET=1`), with a weight layout it computes; every other call (training, long prefill, expert
parallelism, other layouts) goes to `grouped_mm_experts_forward`. Step-3 models pick it by default where
`decode_kernel_preferred()` holds.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.utils import logging

from .moe_decode import SUPPORTED_ACTIVATIONS, SUPPORTED_DTYPES, moe_decode
from .triton_support import kernel_available

__all__ = ["MAX_MOE_DECODE_TOKENS", "MOE_DECODE_EXPERTS", "moe_decode_experts_forward", "register_moe_decode"]

logger = logging.get_logger(__name__)

MOE_DECODE_EXPERTS = "moe_decode"
# Tokens per call up to which the experts function takes the kernel; above it the call is a prefill, where
# `grouped_mm`'s large tiles are the right tool.
MAX_MOE_DECODE_TOKENS = 512


def _layout_unsupported(experts: torch.nn.Module) -> str | None:
    """Why the kernel cannot compute this experts module (a property of the model, not of the call), or None."""
    activation = getattr(experts.config, "hidden_act", None)
    if activation not in SUPPORTED_ACTIVATIONS:
        return f"activation `{activation}` (the kernel computes {SUPPORTED_ACTIVATIONS})"
    layout = {
        "has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
        "has_post_expert_norm": False,
    }  # fmt: skip
    for name, wanted in layout.items():
        if getattr(experts, name, wanted) != wanted:  # transformers 5.17 lacks some of these flags
            return f"`{name}={not wanted}`"
    return None


def _kernel_takes(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_weights: torch.Tensor) -> bool:
    """Whether this call goes to the kernel: an inference call of decode size, on a device the kernel runs on."""
    weights = (experts.gate_up_proj, experts.down_proj)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, top_k_weights, *weights))
    return (
        kernel_available(hidden_states.device)
        and not needs_grad
        and hidden_states.shape[0] <= MAX_MOE_DECODE_TOKENS
        and hidden_states.dtype in SUPPORTED_DTYPES
        and all(w.dtype == hidden_states.dtype for w in weights)
        and not getattr(experts, "_is_expert_parallel", False)  # sentinel expert ids past E
    )


def moe_decode_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts function (`experts_implementation="moe_decode"`): the kernel for decode-sized inference
    calls, `grouped_mm_experts_forward` for the rest (training, prefill beyond `MAX_MOE_DECODE_TOKENS` tokens, CPU
    without the interpreter, layouts the kernel does not compute)."""
    unsupported = _layout_unsupported(self)
    if unsupported is not None:
        logger.warning_once(f"moe_decode: experts with {unsupported} run through grouped_mm instead")
    elif _kernel_takes(self, hidden_states, top_k_weights):
        return moe_decode(
            hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
            activation=self.config.hidden_act,
        )  # fmt: skip
    return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register_moe_decode() -> None:
    """Make `experts_implementation="moe_decode"` known to transformers (idempotent)."""
    ALL_EXPERTS_FUNCTIONS.register(MOE_DECODE_EXPERTS, moe_decode_experts_forward)
