"""Fast Step-3 decoding: a Triton split-KV decode-attention kernel (with a Gluon variant for Hopper) and the plan
that picks between them, a float8 KV cache, a fused-MoE decode kernel (also for block-FP8 experts) and its router's
top-k, block-FP8 linears (a weight-streaming kernel for decode, a one-launch activation quantization for cuBLAS), the
same weight-streaming kernel for plain bf16 linears (`decode_linear.py`, opt-in on the AFD attention side), a
one-launch RMSNorm, a one-launch RoPE of queries and keys (`rotary.py`), the q, k and v projections as one GEMM for
models that only run (`fused_qkv.py`, the AFD attention side), CUDA graphs of each layer's work around its
attention for eager decoding (`decode_graphs.py`), and their transformers hookup (`transformers_attention.py`,
`transformers_experts.py`).

Importing this package registers `attn_implementation="mfa_decode"`, its continuous-batching form
`"mfa_paged"` (`paged_attention.py`, `transformers_paged_attention.py`) and `experts_implementation="moe_decode"`
with transformers.
"""

from .decode_attention import decode_attention
from .decode_attention_plan import default_num_splits
from .decode_graphs import clear_decode_graphs, use_decode_graphs
from .decode_linear import DecodeLinear, use_decode_linears
from .float8_kv_cache import Float8KV, Float8StaticCache, Float8StaticLayer, quantize_float8
from .fp8_activation_quant import quantize_fp8_activations
from .fp8_decode_linear import fp8_decode_linear
from .fp8_linear import Step3FP8Linear, fp8_block_linear, use_fp8_kernels
from .moe_decode import align_pairs_to_blocks, moe_decode
from .moe_router import top_k_experts, use_fused_top_k
from .rms_norm import rms_norm, use_fused_rms_norm
from .rotary import apply_rotary, use_fused_rotary
from .paged_attention import paged_decode_attention, ragged_sdpa_attention, token_key_ranges
from .triton_support import interpreter_enabled, kernel_available
from .transformers_attention import (
    MAX_DECODE_TOKENS,
    MFA_DECODE_ATTENTION,
    decode_kernel_preferred,
    mfa_decode_attention_forward,
    mfa_decode_mask,
    register,
)
from .transformers_paged_attention import PAGED_MFA_ATTENTION, paged_mfa_attention_forward, register_paged
from .transformers_experts import (
    MAX_MOE_DECODE_TOKENS,
    MOE_DECODE_EXPERTS,
    fp8_moe_decode_experts_forward,
    moe_decode_experts_forward,
    register_moe_decode,
)

register()
register_paged()
register_moe_decode()

__all__ = [
    "decode_attention",
    "default_num_splits",
    "interpreter_enabled",
    "kernel_available",
    "Float8KV",
    "Float8StaticCache",
    "Float8StaticLayer",
    "quantize_float8",
    "quantize_fp8_activations",
    "MAX_DECODE_TOKENS",
    "MFA_DECODE_ATTENTION",
    "decode_kernel_preferred",
    "mfa_decode_attention_forward",
    "mfa_decode_mask",
    "PAGED_MFA_ATTENTION",
    "paged_decode_attention",
    "paged_mfa_attention_forward",
    "ragged_sdpa_attention",
    "token_key_ranges",
    "MAX_MOE_DECODE_TOKENS",
    "MOE_DECODE_EXPERTS",
    "align_pairs_to_blocks",
    "moe_decode",
    "top_k_experts",
    "use_fused_top_k",
    "moe_decode_experts_forward",
    "fp8_moe_decode_experts_forward",
    "Step3FP8Linear",
    "fp8_block_linear",
    "fp8_decode_linear",
    "DecodeLinear",
    "use_decode_linears",
    "clear_decode_graphs",
    "rms_norm",
    "use_decode_graphs",
    "use_fused_rms_norm",
    "apply_rotary",
    "use_fused_rotary",
    "use_fp8_kernels",
]
