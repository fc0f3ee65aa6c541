"""The connector between the two halves of a disaggregated Step-3, and its in-process implementation.

The attention side `dispatch`es one micro-batch of one layer (post-attention-norm hidden states, plus the top-k
routing on MoE layers) and later `combine`s the FFN result of that dispatch; the FFN side `receive`s what the
attention side sent and `respond`s to each arrival. Three implementations:

* `InProcessConnector`: both halves in one process on the same device -- for profiling each half on one GPU and for
  tests. The wire format is applied exactly as between processes (FP8 quantisation included), then the FFN
  shards run at once on the current stream;
* `GlooAttentionConnector` / `GlooFFNConnector` and `NcclAttentionConnector` / `NcclFFNConnector`
  (`exchange.py`): torch.distributed point-to-point messages between processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .timing import PhaseTimer
from .wire import DispatchLayout, WireFormat, decode_dispatch, encode_dispatch


@dataclass
class Arrival:
    """One micro-batch of one layer as the FFN side receives it (from attention rank `source`)."""

    source: int
    layer: int
    hidden: torch.Tensor
    top_k_index: torch.Tensor | None
    top_k_weights: torch.Tensor | None


class AttentionConnector(ABC):
    """The attention side's end: several dispatches may be in flight; each is combined once, in any order.

    `timer` (optional) times the connector's own phases (`wire`, and `ffn` where the FFN runs in this process)."""

    timer: PhaseTimer | None = None

    def _phase(self, name: str):
        return self.timer.phase(name) if self.timer is not None else nullcontext()

    @abstractmethod
    def dispatch(
        self,
        layer: int,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor | None,
        top_k_weights: torch.Tensor | None,
        wire: WireFormat,
    ) -> object:
        """Send `hidden [n, H]` (+ routing `[n, k]`) of layer `layer`; returns a handle for `combine`."""

    @abstractmethod
    def combine(self, handle: object) -> torch.Tensor:
        """The FFN result `[n, H]` of a dispatch, summed over FFN ranks; waits (boundedly) for it."""

    def close(self) -> None:
        """Tell the FFN side that this attention side is done."""


class FFNConnector(ABC):
    """The FFN side's end: rounds of arrivals until every attention side has closed."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """Every attention side has closed."""

    @abstractmethod
    def receive_round(self) -> list[Arrival]:
        """What has arrived (at least one message, or a close), within the timeout."""

    @abstractmethod
    def respond(self, arrival: Arrival, result: torch.Tensor) -> None:
        """Send `result [n, H]` back; answers go in arrival order for each attention side."""

    def close(self) -> None:
        """Flush what is still being sent."""


class InProcessConnector(AttentionConnector):
    """Both halves in this process: each dispatch is encoded to the wire format and decoded again (as the FFN
    side would), and every FFN shard computes its part on the current stream; `combine` sums the parts.

    `timer` (optional) times the wire and the FFN separately from the attention, as phases `wire` and `ffn`.
    """

    def __init__(self, shards: list[torch.nn.Module], *, timer: PhaseTimer | None = None):
        if not shards:
            raise ValueError("InProcessConnector needs at least one FFN shard")
        self.shards = list(shards)
        self.timer = timer

    def dispatch(self, layer, hidden, top_k_index, top_k_weights, wire):
        wire = WireFormat(wire)
        with self._phase("wire"):
            payload = encode_dispatch(hidden, top_k_index, top_k_weights, wire)
            top_k = 0 if top_k_index is None else top_k_index.shape[-1]
            layout = DispatchLayout(hidden.shape[0], hidden.shape[-1], top_k, wire, hidden.dtype)
            received, index, weights = decode_dispatch(payload, layout)
        with self._phase("ffn"):
            result = None
            for shard in self.shards:
                part = shard(layer, received, index, weights)
                result = part if result is None else result + part
        return result

    def combine(self, handle):
        return handle
