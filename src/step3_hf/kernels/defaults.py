"""Step-3's default kernels: the attention and experts implementations a Step-3 model gets when its caller names none.

On a CUDA GPU that runs them (Triton present, compute capability 8.0 or newer) decoding goes through `mfa_decode`
and `moe_decode`, which hand every call they do not cover to SDPA and grouped_mm; elsewhere transformers chooses.
`step3_hf` installs these on `Step3PreTrainedModel` at import, so the modeling file depends on transformers alone.
"""

from . import MFA_DECODE_ATTENTION, MOE_DECODE_EXPERTS, decode_kernel_preferred

__all__ = ["default_attn_implementation", "default_experts_implementation"]


def default_attn_implementation() -> str | None:
    """`mfa_decode` where the decode kernels are preferred, else None (transformers' own default)."""
    return MFA_DECODE_ATTENTION if decode_kernel_preferred() else None


def default_experts_implementation() -> str | None:
    """`moe_decode` where the decode kernels are preferred, else None (transformers' own default)."""
    return MOE_DECODE_EXPERTS if decode_kernel_preferred() else None
