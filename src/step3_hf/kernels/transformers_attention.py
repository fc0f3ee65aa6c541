"""`attn_implementation="mfa_decode"`: the split-KV decode kernel for decode steps, SDPA for everything else.

Registered with transformers' `AttentionInterface` and, with SDPA's boolean mask builder (`mfa_decode_mask`), its
`AttentionMaskInterface`, so `from_pretrained(..., attn_implementation="mfa_decode")` and `generate()` use it with
dynamic, static and `Float8StaticCache` caches. Each call takes the kernel only when the kernel computes exactly
what SDPA would: a few new tokens per sequence, no dropout or gradient, a boolean (or no) mask shared by the
heads, on CUDA (or on CPU under `TRITON_INTERPRET=1`). The kernel is a custom op
(`torch.ops.step3_hf.decode_attention`), so compiled static-cache `generate()` keeps it inside its CUDA graphs.
Step-3 models pick it by default where `decode_kernel_preferred()` holds.

Every layer of a decode step gets the same mask, and the kernel first folds it into each sequence's first and last
position to visit (three launches). A caller that runs the step's layers computes that once, `decode_kv_bounds(mask)`,
and passes it to every layer's attention as the `decode_kv_bounds` keyword (the AFD pipeline, the decode graphs).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .decode_attention import MAX_QUERY_ROWS, decode_attention, kv_bounds_from_mask
from .triton_support import kernel_available, triton
from .float8_kv_cache import Float8KV

__all__ = [
    "MFA_DECODE_ATTENTION",
    "MAX_DECODE_TOKENS",
    "DECODE_KV_BOUNDS",
    "decode_kernel_preferred",
    "decode_kv_bounds",
    "mfa_decode_attention_forward",
    "mfa_decode_mask",
]

MFA_DECODE_ATTENTION = "mfa_decode"
# New tokens per sequence that still count as decoding (speculative drafts, a few tokens of chunked input); above
# this the call is compute-bound and SDPA's prefill kernels are the right tool.
MAX_DECODE_TOKENS = 4
# Calls whose kwargs ask for something the kernel does not do.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")
# The attention keyword that carries `decode_kv_bounds(attention_mask)` from the caller of a step's layers.
DECODE_KV_BOUNDS = "decode_kv_bounds"


def decode_kernel_preferred() -> bool:
    """Whether Step-3 defaults to `mfa_decode`: Triton present and a CUDA device with bf16 (compute capability 8+)."""
    if triton is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (8, 0)


def _unmasked_call_agrees(module, query, cache, kwargs) -> bool:
    """Without a mask SDPA attends to everything for one new token, and for several it is causal from the top left
    (`is_causal`, unless the call or module turns it off). The kernel's implicit causal tail (the new tokens are the
    last positions) is the same only when the new tokens are the whole cache."""
    if query.shape[2] == 1:
        return True
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    return bool(is_causal) and cache.shape[2] == query.shape[2]


def _kernel_takes(module, query, key, attention_mask, dropout, kwargs) -> bool:
    """Whether the kernel computes exactly what `sdpa_attention_forward` would for this call."""
    cache = key.data if isinstance(key, Float8KV) else key
    return (
        kernel_available(query.device)
        and query.shape[2] <= MAX_DECODE_TOKENS
        and query.shape[1] // cache.shape[1] * query.shape[2] <= MAX_QUERY_ROWS
        and query.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and cache.dtype in (query.dtype, torch.float8_e4m3fn)
        and (dropout == 0.0 or not module.training)
        and not (torch.is_grad_enabled() and query.requires_grad)
        and (
            (attention_mask is None and _unmasked_call_agrees(module, query, cache, kwargs))
            or (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1)
        )
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(name) is None for name in _UNSUPPORTED_KWARGS)
    )


def decode_kv_bounds(attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The bounds the decode kernel folds `attention_mask` into (`kv_bounds_from_mask`), for a caller to compute once
    per step and pass to every layer as `decode_kv_bounds`; None where the kernel would not read this mask."""
    decode_mask = (
        attention_mask is not None
        and attention_mask.dtype == torch.bool
        and attention_mask.ndim == 4
        and attention_mask.shape[1] == 1
        and attention_mask.shape[2] <= MAX_DECODE_TOKENS
    )
    if not decode_mask or attention_mask.numel() == 0 or not kernel_available(attention_mask.device):
        return None
    return kv_bounds_from_mask(attention_mask[:, 0])


def mfa_decode_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | Float8KV,
    value: torch.Tensor | Float8KV,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: `query` `[B, Hq, q, D]`, cache `[B, Hkv, kv, D]` -> `([B, q, Hq, D], None)`."""
    if _kernel_takes(module, query, key, attention_mask, dropout, kwargs):
        bounds = kwargs.get(DECODE_KV_BOUNDS)
        if bounds is not None and bounds[0].shape != (query.shape[0],):  # a mask broadcast over the batch
            bounds = None
        if isinstance(key, Float8KV):
            out = decode_attention(
                query, key.data, value.data, scale=scaling, attention_mask=attention_mask, kv_bounds=bounds,
                key_scale=key.scale, value_scale=value.scale,
            )  # fmt: skip
        else:
            out = decode_attention(query, key, value, scale=scaling, attention_mask=attention_mask, kv_bounds=bounds)
        return out, None
    if isinstance(key, Float8KV):
        key, value = key.dequantize(query.dtype), value.dequantize(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def mfa_decode_mask(*args, **kwargs) -> torch.Tensor | None:
    """SDPA's boolean mask, built rather than skipped for decode-sized queries. Deciding whether SDPA may skip the mask
    reads the padding mask on the host (`_ignore_causal_mask_sdpa`), which stalls every decode step until the device
    has caught up; the kernel reads a `(batch, 1, q, kv)` boolean mask at the cost of one byte per key and sequence.
    Prefill keeps SDPA's skip (its flash kernel takes no mask), at one host read per prompt."""
    q_length = kwargs["q_length"] if "q_length" in kwargs else args[1]
    if q_length <= MAX_DECODE_TOKENS:
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make `attn_implementation="mfa_decode"` known to transformers (idempotent)."""
    AttentionInterface.register(MFA_DECODE_ATTENTION, mfa_decode_attention_forward)
    AttentionMaskInterface.register(MFA_DECODE_ATTENTION, mfa_decode_mask)
