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
scales for inference calls of any size (also on a range of the experts, expert-parallel, as an AFD FFN rank holds):
a prefill is one grouped launch per slice of at most `MAX_FP8_EXPERTS_TOKENS` tokens, with the kernel's prefill
launch (`moe_decode.default_launch`). Only calls the kernel cannot take (a gradient, a device without the kernel, a
layout it does not compute) run expert by expert through `fp8_linear.fp8_block_linear`. `EXPERTS_ACTIVATIONS_FP8`
has the kernel round the activations to float8 and multiply on float8 tensor cores, where the widths allow it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.utils import logging

from .fp8_activation_quant import float8_products_supported
from .moe_decode import SUPPORTED_ACTIVATIONS, SUPPORTED_DTYPES, default_launch, moe_decode
from .triton_support import float8_kernel_available, kernel_available

__all__ = [
    "MAX_FP8_EXPERTS_TOKENS",
    "MAX_GROUPED_MM_TOKENS",
    "MAX_MOE_DECODE_TOKENS",
    "MOE_DECODE_EXPERTS",
    "fp8_experts_path",
    "fp8_moe_decode_experts_forward",
    "moe_decode_experts_forward",
    "register_moe_decode",
]

logger = logging.get_logger(__name__)

MOE_DECODE_EXPERTS = "moe_decode"
# Tokens per call up to which the bf16 experts function takes the kernel; above it the call is a prefill, where
# `grouped_mm`'s large tiles are the right tool.
MAX_MOE_DECODE_TOKENS = 512
# Tokens per `grouped_mm` call at inference. Its temporaries grow with the tokens times top-k (a 128 x 1024 prefill
# of Step-3 asked for one 5.25 GiB block on an H100); a long prefill runs in slices of this many tokens, whose
# temporaries stay near 1 GiB at Step-3's widths. Each token's result depends on its own row alone.
MAX_GROUPED_MM_TOKENS = 16384
# Tokens per `moe_decode` call on FP8 experts, which run every inference call through the kernel. Its temporaries are
# `[tokens * top_k, I]` in the activations' dtype and `[tokens * top_k, H]` fp32: at Step-3's widths (top-3, H 7168,
# I 5120, bf16) 8192 tokens take 0.89 GiB, and the float8 copies of the tokens and of the intermediate 0.17 GiB more.
# Each token's result depends on its own row alone.
MAX_FP8_EXPERTS_TOKENS = 8192
# True: FP8 experts' calls of `moe_decode` round the tokens and the intermediate activation to e4m3 per row and 128
# columns (the release's dynamic activation scheme) and multiply float8 by float8 (`quantize_activations`), where
# the widths allow it: on an H100 10% faster at batch 256 and 32% at a 4096-token prefill, 1-2% at 16 and 64
# (docs/step3.md). False: weight-only, the float8 weights widened to the activations' dtype.
EXPERTS_ACTIVATIONS_FP8 = True


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


def _in_token_slices(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    max_tokens: int,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """`forward(hidden_states, top_k_index, top_k_weights)` over at most `max_tokens` tokens at a time, so that its
    temporaries stay bounded (inference only: the slices are written into one output)."""
    tokens = hidden_states.shape[0]
    if tokens <= max_tokens:
        return forward(hidden_states, top_k_index, top_k_weights)
    output = torch.empty_like(hidden_states)
    for start in range(0, tokens, max_tokens):
        rows = slice(start, start + max_tokens)
        output[rows] = forward(hidden_states[rows], top_k_index[rows], top_k_weights[rows])
    return output


def _grouped_mm_in_slices(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`grouped_mm_experts_forward`, over at most `MAX_GROUPED_MM_TOKENS` tokens at a time at inference."""
    needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or experts.gate_up_proj.requires_grad)
    if needs_grad:
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)

    def forward(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return grouped_mm_experts_forward(experts, hidden, index, weights)

    return _in_token_slices(forward, MAX_GROUPED_MM_TOKENS, hidden_states, top_k_index, top_k_weights)


def fp8_moe_decode_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`experts_implementation="moe_decode"` for transformers' `FP8Experts`: the kernel on float8 weights for
    inference calls of any size (in slices of at most `MAX_FP8_EXPERTS_TOKENS` tokens), one block-FP8 GEMM per hit
    expert for the calls it cannot take (a gradient, a device without the kernel, a layout it does not compute)."""
    unsupported = _fp8_layout_unsupported(self)
    if unsupported is not None:
        logger.warning_once(f"moe_decode: FP8 experts with {unsupported} run expert by expert instead")
    if unsupported is not None or not _fp8_call_takes(hidden_states, top_k_weights):
        return _fp8_experts_by_expert(self, hidden_states, top_k_index, top_k_weights)

    def forward(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return moe_decode(
            hidden, index, weights, self.gate_up_proj, self.down_proj,
            activation=self.config.hidden_act, gate_up_scale=self.gate_up_proj_scale_inv,
            down_scale=self.down_proj_scale_inv, block_size=self.block_size,
            expert_parallel=getattr(self, "_is_expert_parallel", False),  # e.g. an AFD FFN rank's range of experts
            quantize_activations=_rounds_activations(self, index.numel()),
        )  # fmt: skip

    return _in_token_slices(forward, MAX_FP8_EXPERTS_TOKENS, hidden_states, top_k_index, top_k_weights)


def _fp8_layout_unsupported(experts: torch.nn.Module) -> str | None:
    """`_layout_unsupported` for an `FP8Experts`, which also has an activation scheme and optional gate clamps or
    softcaps (in `_apply_gate`, which the expert-by-expert path runs and the kernel does not)."""
    unsupported = _layout_unsupported(experts)
    if unsupported is not None:
        return unsupported
    scheme = getattr(experts, "activation_scheme", "dynamic")
    if scheme != "dynamic":
        return f"`activation_scheme={scheme!r}`"
    for name in ("swiglu_alpha", "limit", "gate_softcap", "up_softcap"):  # transformers 5.17 lacks some
        if getattr(experts, name, None) is not None:
            return f"`{name}={getattr(experts, name)}`"
    # The kernel steps through a scale tile in power-of-two reductions of up to 128 columns, and splits the fused
    # gate/up rows between tiles. (No block size at all is `moe_decode`'s error to raise: the other path has none.)
    block_size = getattr(experts, "block_size", None)
    if block_size is not None and block_size[1] % 128 and block_size[1] not in (16, 32, 64):
        return f"scale tiles {list(block_size)}"
    if block_size is not None and experts.gate_up_proj.shape[1] // 2 % block_size[0]:
        return f"scale tiles {list(block_size)} that straddle the gate and up rows"
    return None


def _fp8_call_takes(hidden_states: torch.Tensor, top_k_weights: torch.Tensor | None = None) -> bool:
    """Whether `moe_decode` computes this call on the float8 weights of experts whose layout it computes
    (`_fp8_layout_unsupported`): inference (the kernel has no backward), on a device the kernel runs on with float8
    (a GPU of compute capability 8.9+, or the interpreter)."""
    device = hidden_states.device
    inputs = (hidden_states,) if top_k_weights is None else (hidden_states, top_k_weights)
    return (
        float8_kernel_available(device)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))
        and hidden_states.dtype in SUPPORTED_DTYPES
    )


def _rounds_activations(experts: torch.nn.Module, num_pairs: int) -> bool:
    """Whether an FP8 experts call of `num_pairs` (token, choice) pairs rounds its activations to float8:
    `EXPERTS_ACTIVATIONS_FP8`, where the widths and the default launch's reduction steps allow it."""
    block_size = getattr(experts, "block_size", None)
    if not EXPERTS_ACTIVATIONS_FP8 or block_size is None:  # no block size: `moe_decode`'s error to raise
        return False
    block_k = min(default_launch(num_pairs, experts.num_experts)["block_k"], int(block_size[1]))
    return float8_products_supported(block_k, experts.gate_up_proj.shape[-1], experts.down_proj.shape[-1])


def fp8_experts_path(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k: int) -> str:
    """Which path `fp8_moe_decode_experts_forward` takes for `experts` (an `FP8Experts`) on a call of `hidden_states`
    with `top_k` choices per token, and the kernel's launch (for reports)."""
    if _fp8_layout_unsupported(experts) is not None or not _fp8_call_takes(hidden_states):
        return "expert by expert (fp8_block_linear per hit expert)"
    tokens = hidden_states.shape[0]
    slices = -(-tokens // MAX_FP8_EXPERTS_TOKENS)
    pairs = min(tokens, MAX_FP8_EXPERTS_TOKENS) * top_k
    launch = default_launch(pairs, experts.num_experts)
    activations = "float8" if _rounds_activations(experts, pairs) else str(hidden_states.dtype).removeprefix("torch.")
    return (
        f"Triton moe_decode on the float8 weights, {activations} activations, {slices} call(s) of at most "
        f"{MAX_FP8_EXPERTS_TOKENS} tokens, launch {launch}"
    )


def _fp8_experts_by_expert(
    experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Calls the kernel cannot take (a gradient, a device without the kernel, a layout it does not compute): each hit
    expert's rows through two block-FP8 GEMMs, summed in fp32. Choices outside `[0, E)` (expert parallelism's) add
    nothing, as in `moe_decode`."""
    from .fp8_linear import fp8_block_linear

    output = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    # both bounds: a negative id would index the last expert
    tokens, choices = torch.where((top_k_index >= 0) & (top_k_index < experts.num_experts))
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
