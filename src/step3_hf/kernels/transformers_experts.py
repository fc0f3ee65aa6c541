"""`experts_implementation="moe_decode"`: the fused-MoE decode kernel for decode-sized inference calls,
transformers' `grouped_mm` for everything else.

Registered with transformers' experts functions, so `from_pretrained(..., experts_implementation="moe_decode")`
routes every MoE layer's experts through `moe_decode_experts_forward`. A call takes the kernel (`moe_decode.py`)
only for inference with up to `MAX_MOE_DECODE_TOKENS` tokens, on a device the kernel runs on (CUDA, or CPU under
`TRITON_INTERPRET=1`), with a weight layout it computes; every other call (training, long prefill, expert
parallelism, other layouts) goes to `grouped_mm_experts_forward`, an inference prefill in slices of at most
`MAX_GROUPED_MM_TOKENS` tokens so that its temporaries stay bounded. Step-3 models pick it by default where
`decode_kernel_preferred()` holds.

Block-FP8 experts (transformers' `FP8Experts`, loaded from the FP8 release on a GPU) pick the same name from
transformers' FP8 experts functions: `fp8_moe_decode_experts_forward` runs the kernel on the float8 weights and their
scales for decode-sized calls (also on a range of the experts, expert-parallel, as an AFD FFN rank holds), and
larger calls expert by expert through `fp8_linear.fp8_block_linear`.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.utils import logging

from .moe_decode import SUPPORTED_ACTIVATIONS, SUPPORTED_DTYPES, moe_decode
from .triton_support import kernel_available

__all__ = [
    "MAX_MOE_DECODE_TOKENS",
    "MOE_DECODE_EXPERTS",
    "fp8_moe_decode_experts_forward",
    "moe_decode_experts_forward",
    "register_moe_decode",
]

logger = logging.get_logger(__name__)

MOE_DECODE_EXPERTS = "moe_decode"
# Tokens per call up to which the experts function takes the kernel; above it the call is a prefill, where
# `grouped_mm`'s large tiles are the right tool.
MAX_MOE_DECODE_TOKENS = 512
# Tokens per `grouped_mm` call at inference. Its temporaries grow with the tokens times top-k (a 128 x 1024 prefill
# of Step-3 asked for one 5.25 GiB block on an H100); a long prefill runs in slices of this many tokens, whose
# temporaries stay near 1 GiB at Step-3's widths. Each token's result depends on its own row alone.
MAX_GROUPED_MM_TOKENS = 16384


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
    return _grouped_mm_in_slices(self, hidden_states, top_k_index, top_k_weights)


def _grouped_mm_in_slices(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`grouped_mm_experts_forward`, over at most `MAX_GROUPED_MM_TOKENS` tokens at a time at inference."""
    tokens = hidden_states.shape[0]
    needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or experts.gate_up_proj.requires_grad)
    if tokens <= MAX_GROUPED_MM_TOKENS or needs_grad:
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    output = torch.empty_like(hidden_states)
    for start in range(0, tokens, MAX_GROUPED_MM_TOKENS):
        rows = slice(start, start + MAX_GROUPED_MM_TOKENS)
        output[rows] = grouped_mm_experts_forward(experts, hidden_states[rows], top_k_index[rows], top_k_weights[rows])
    return output


def fp8_moe_decode_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`experts_implementation="moe_decode"` for transformers' `FP8Experts`: the kernel on float8 weights for
    decode-sized inference calls, one block-FP8 GEMM per hit expert for the rest."""
    decode = (
        kernel_available(hidden_states.device)
        and not (torch.is_grad_enabled() and hidden_states.requires_grad)
        and hidden_states.shape[0] <= MAX_MOE_DECODE_TOKENS
        and hidden_states.dtype in SUPPORTED_DTYPES
        and getattr(self, "has_gate", True)
        and getattr(self, "activation_scheme", "dynamic") == "dynamic"
    )
    if decode:
        return moe_decode(
            hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
            activation=self.config.hidden_act, gate_up_scale=self.gate_up_proj_scale_inv,
            down_scale=self.down_proj_scale_inv, block_size=self.block_size,
            expert_parallel=getattr(self, "_is_expert_parallel", False),  # e.g. an AFD FFN rank's range of experts
        )  # fmt: skip
    return _fp8_experts_by_expert(self, hidden_states, top_k_index, top_k_weights)


def _fp8_experts_by_expert(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Prefill-sized calls: each hit expert's rows through two block-FP8 GEMMs, summed in fp32."""
    from .fp8_linear import fp8_block_linear

    output = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    tokens, choices = torch.where(top_k_index < experts.num_experts)
    experts_of_pairs = top_k_index[tokens, choices]
    for expert in experts_of_pairs.unique().tolist():
        rows = experts_of_pairs == expert
        token, choice = tokens[rows], choices[rows]
        gate_up = fp8_block_linear(hidden_states[token], experts.gate_up_proj[expert],
                                   experts.gate_up_proj_scale_inv[expert], experts.block_size)  # fmt: skip
        activated = experts._apply_gate(gate_up)
        down = fp8_block_linear(activated, experts.down_proj[expert], experts.down_proj_scale_inv[expert],
                                experts.block_size)  # fmt: skip
        output.index_add_(0, token, down.float() * top_k_weights[token, choice, None].float())
    return output.to(hidden_states.dtype)


def register_moe_decode() -> None:
    """Make `experts_implementation="moe_decode"` known to transformers (idempotent), for bf16 and FP8 experts."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(MOE_DECODE_EXPERTS, moe_decode_experts_forward)
    ALL_FP8_EXPERTS_FUNCTIONS.register(MOE_DECODE_EXPERTS, fp8_moe_decode_experts_forward)
