"""The per-layer exchange between attention and FFN ranks over torch.distributed point-to-point messages.

Every message from an attention rank to an FFN rank is a 4-integer header `[kind, layer, tokens, wire]`
followed (for `FORWARD`) by one dispatch buffer (see `wire.py`); the FFN rank answers each `FORWARD` with one
combine tensor `[tokens, hidden]`. Messages between two ranks are matched in order, so no ids are needed.
An attention rank keeps several micro-batches in flight: `dispatch` only posts the sends and the receive of
the answer, `combine` waits for it.

Every wait is bounded on gloo: a peer that died (its connection closes) or stalled (no message within
`timeout_s`) raises `PeerLostError` naming it. On NCCL the waits are stream-ordered (blocking the CPU on each
would serialise the pipeline); there the process group's timeout and NCCL's watchdog bound them instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .placement import Placement
from .wire import DispatchLayout, WireFormat, decode_dispatch, encode_dispatch

FORWARD, DONE = 1, 2
HEADER_FIELDS = 4


class PeerLostError(RuntimeError):
    """A peer rank died or stopped answering within the timeout."""


@dataclass
class WireCounters:
    """Bytes and tokens moved, to report bytes per token per layer."""

    bytes_to_ffn: int = 0
    bytes_from_ffn: int = 0
    token_layers: int = 0  # tokens x layers dispatched (per attention rank, counted once over FFN ranks)


class _Link:
    """Point-to-point messages of one rank with bounded waits (see module docstring)."""

    def __init__(self, placement: Placement, rank: int, device: torch.device, timeout_s: float):
        self.placement = placement
        self.rank = rank
        self.device = device
        self.timeout_s = timeout_s
        self.bounded = dist.get_backend() == "gloo"
        self._sends: list[tuple[dist.Work, int, torch.Tensor]] = []  # in flight; the tensor must stay alive

    def send(self, tensor: torch.Tensor, peer: int) -> None:
        self._sends.append((dist.isend(tensor, peer), peer, tensor))
        if len(self._sends) > 64:
            self.flush_sends(keep=32)

    def flush_sends(self, keep: int = 0) -> None:
        while len(self._sends) > keep:
            work, peer, _ = self._sends.pop(0)
            self.wait(work, peer, "accept a message")

    def wait(self, work: dist.Work, peer: int, what: str) -> None:
        if not self.bounded:
            work.wait()
            return
        started = time.monotonic()
        try:
            work.wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as err:
            waited = time.monotonic() - started
            cause = "stopped answering" if waited >= 0.9 * self.timeout_s else "is gone"
            raise PeerLostError(
                f"AFD {self.placement.describe(self.rank)}: peer {self.placement.describe(peer)} {cause} -- it did "
                f"not {what} within {waited:.1f} s (timeout {self.timeout_s:g} s; the peer died, stalled or was "
                f"started with other arguments). Underlying error: {str(err).splitlines()[0]}"
            ) from err

    def header(self, kind: int, layer: int = 0, tokens: int = 0, wire: int = 0) -> torch.Tensor:
        return torch.tensor([kind, layer, tokens, wire], dtype=torch.int64, device=self.device)


@dataclass
class InFlight:
    """One micro-batch of one layer sent to the FFN ranks; `results[i]` arrives from FFN rank `peers[i]`."""

    layer: int
    peers: list[int]
    results: list[torch.Tensor]
    works: list[dist.Work]


class AttentionExchange:
    """The attention rank's end: dispatch normed hidden states (+ routing) to every FFN rank, sum what returns."""

    def __init__(
        self, placement: Placement, rank: int, *, hidden_size: int, dtype: torch.dtype, device: torch.device,
        timeout_s: float,
    ):
        self.link = _Link(placement, rank, device, timeout_s)
        self.ffn_ranks = placement.ffn_rank_ids
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.counters = WireCounters()
        self.closed = False

    def dispatch(
        self,
        layer: int,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor | None,
        top_k_weights: torch.Tensor | None,
        wire: WireFormat,
    ) -> InFlight:
        tokens = hidden.shape[0]
        payload = encode_dispatch(hidden, top_k_index, top_k_weights, wire)
        header = self.link.header(FORWARD, layer, tokens, wire.code)
        results, works = [], []
        for peer in self.ffn_ranks:
            self.link.send(header, peer)
            self.link.send(payload, peer)
            result = torch.empty(tokens, self.hidden_size, dtype=self.dtype, device=self.link.device)
            works.append(dist.irecv(result, peer))
            results.append(result)
        self.counters.bytes_to_ffn += payload.numel() * len(self.ffn_ranks)
        self.counters.bytes_from_ffn += tokens * self.hidden_size * self.dtype.itemsize * len(self.ffn_ranks)
        self.counters.token_layers += tokens
        return InFlight(layer, list(self.ffn_ranks), results, works)

    def combine(self, inflight: InFlight) -> torch.Tensor:
        """Wait for every FFN rank's (partial) result and add them up."""
        total = None
        for peer, result, work in zip(inflight.peers, inflight.results, inflight.works):
            self.link.wait(work, peer, f"return the FFN result of layer {inflight.layer}")
            total = result if total is None else total + result
        return total

    def close(self) -> None:
        """Tell every FFN rank that this attention rank is done; FFN ranks stop once all attention ranks are."""
        if self.closed:
            return
        self.closed = True
        done = self.link.header(DONE)
        for peer in self.ffn_ranks:
            self.link.send(done, peer)
        self.link.flush_sends()


@dataclass
class Arrival:
    """One micro-batch of one layer received from one attention rank."""

    source: int
    layer: int
    hidden: torch.Tensor
    top_k_index: torch.Tensor | None
    top_k_weights: torch.Tensor | None


class FFNExchange:
    """The FFN rank's end: one round takes the next message of every attention rank still running."""

    def __init__(
        self, placement: Placement, rank: int, *, hidden_size: int, top_k: int, moe_layers: set[int],
        dtype: torch.dtype, device: torch.device, timeout_s: float,
    ):
        self.link = _Link(placement, rank, device, timeout_s)
        self.running = placement.attention_rank_ids
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.moe_layers = moe_layers
        self.dtype = dtype

    @property
    def finished(self) -> bool:
        return not self.running

    def receive_round(self) -> list[Arrival]:
        headers = {}
        for source in self.running:
            header = torch.empty(HEADER_FIELDS, dtype=torch.int64, device=self.link.device)
            headers[source] = (header, dist.irecv(header, source))
        pending = []
        for source, (header, work) in headers.items():
            self.link.wait(work, source, "send its next layer")
            kind, layer, tokens, wire = header.tolist()
            if kind == DONE:
                self.running = [r for r in self.running if r != source]
                continue
            if kind != FORWARD:
                raise RuntimeError(f"AFD: unknown message kind {kind} from {self.link.placement.describe(source)}")
            top_k = self.top_k if layer in self.moe_layers else 0
            layout = DispatchLayout(tokens, self.hidden_size, top_k, WireFormat.from_code(wire), self.dtype)
            payload = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.link.device)
            pending.append((source, layer, layout, payload, dist.irecv(payload, source)))
        arrivals = []
        for source, layer, layout, payload, work in pending:
            self.link.wait(work, source, "send its hidden states")
            arrivals.append(Arrival(source, layer, *decode_dispatch(payload, layout)))
        return arrivals

    def respond(self, arrival: Arrival, result: torch.Tensor) -> None:
        self.link.send(result.contiguous(), arrival.source)

    def close(self) -> None:
        self.link.flush_sends()
