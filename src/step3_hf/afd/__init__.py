"""Attention-FFN Disaggregation (AFD) for Step-3 on torch.distributed.

Attention ranks hold the embedding, attention layers, norms, routers, LM head and KV cache and run the
ordinary `generate()`; FFN ranks hold the dense MLPs, shared experts and routed experts (split by expert) and
serve every layer's FFN half. See `docs/afd.md`; launch with `torchrun ... -m step3_hf.afd`.
"""

from .attention_model import Step3AFDAttentionForCausalLM
from .connector import Arrival, AttentionConnector, FFNConnector, InProcessConnector
from .exchange import (
    GlooAttentionConnector,
    GlooFFNConnector,
    NcclAttentionConnector,
    NcclFFNConnector,
    PeerLostError,
    p2p_connector,
)
from .ffn_server import Step3FFNMoE, Step3FFNShard, serve
from .graphs import AttentionGraphs
from .remote_ffn import RemoteFFN
from .placement import Placement, Role
from .session import AFDRank, AFDSettings, start
from .wire import WireFormat, wire_bytes_per_token

__all__ = [
    "AFDRank",
    "AFDSettings",
    "Arrival",
    "AttentionConnector",
    "AttentionGraphs",
    "FFNConnector",
    "GlooAttentionConnector",
    "GlooFFNConnector",
    "InProcessConnector",
    "NcclAttentionConnector",
    "NcclFFNConnector",
    "PeerLostError",
    "Placement",
    "RemoteFFN",
    "Role",
    "Step3AFDAttentionForCausalLM",
    "Step3FFNMoE",
    "Step3FFNShard",
    "WireFormat",
    "p2p_connector",
    "serve",
    "start",
    "wire_bytes_per_token",
]
