"""Attention-FFN Disaggregation (AFD) for Step-3 on torch.distributed.

Attention ranks hold the embedding, attention layers, norms, routers, LM head and KV cache and run the
ordinary `generate()`; FFN ranks hold the dense MLPs, shared experts and routed experts (split by expert) and
serve every layer's FFN half. See `docs/afd.md`; launch with `torchrun ... -m step3_hf.afd`.
"""

from .attention_model import Step3AFDAttentionForCausalLM
from .exchange import AttentionExchange, FFNExchange, PeerLostError
from .ffn_server import Step3FFNShard, serve
from .placement import Placement, Role
from .session import AFDRank, AFDSettings, start
from .wire import WireFormat, wire_bytes_per_token

__all__ = [
    "AFDRank",
    "AFDSettings",
    "AttentionExchange",
    "FFNExchange",
    "PeerLostError",
    "Placement",
    "Role",
    "Step3AFDAttentionForCausalLM",
    "Step3FFNShard",
    "WireFormat",
    "serve",
    "start",
    "wire_bytes_per_token",
]
