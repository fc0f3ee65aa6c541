"""`RemoteFFN`: what takes the place of a decoder layer's `mlp` on the attention side of a disaggregated Step-3.

It keeps the MoE router (as `gate`, where `Step3SparseMoeBlock` keeps it, so the parameter names are the single-
process model's) and hands the FFN itself to the FFN side through a connector. Called as the layer's `mlp` it
routes, sends and waits at once (one micro-batch, no overlap); the pipeline (`pipeline.py`) instead calls `route`
(inside the attention phase, which CUDA graphs may replay), `send` and `combine` separately to keep several
micro-batches in flight.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configuration_step3 import Step3Config
from ..modeling_step3 import Step3TopKRouter
from .connector import AttentionConnector
from .wire import WireFormat

NOT_CONNECTED = (
    "this attention-side model is not connected to an FFN side: call `connect(connector)` or build it through "
    "`step3_hf.afd.start(...).attention_model()`"
)


class RemoteFFN(nn.Module):
    """Routing here, the dense MLP or MoE experts on the FFN side; `forward(x)` returns `FFN(x)` like the module it
    replaces."""

    def __init__(self, config: Step3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Step3TopKRouter(config) if layer_idx in config.moe_layer_indices else None
        self.connector: AttentionConnector | None = None
        self.wire = WireFormat.FP8

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(top_k_index, top_k_weights)` of `hidden_states [n, H]` on MoE layers, `(None, None)` on dense ones."""
        if self.gate is None:
            return None, None
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        return top_k_index, top_k_weights

    def send(self, hidden_states, top_k_index, top_k_weights) -> object:
        """Send `hidden_states [n, H]` and their routing to the FFN side; returns the handle for `combine`."""
        if self.connector is None:
            raise RuntimeError(NOT_CONNECTED)
        return self.connector.dispatch(self.layer_idx, hidden_states, top_k_index, top_k_weights, self.wire)

    def combine(self, handle: object) -> torch.Tensor:
        return self.connector.combine(handle)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        return self.combine(self.send(flat, *self.route(flat))).view(hidden_states.shape)
