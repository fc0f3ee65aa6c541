"""The gloo and NCCL connectors (`connector.py`): the per-layer exchange between attention and FFN ranks over
torch.distributed point-to-point messages.

Every message from an attention rank to an FFN rank is a 4-integer header `[kind, layer, tokens, wire]`
followed (for `FORWARD`) by one dispatch buffer (see `wire.py`); the FFN rank answers each `FORWARD` with one
combine tensor `[tokens, hidden]`. Messages between two ranks are matched in order, so no ids are needed.
Dispatches and answers travel in two process groups of their own, so that (on NCCL, where each group has its
own stream) an answer never queues behind a posted receive of the next dispatch. An attention rank keeps
several micro-batches in flight: `dispatch` only posts the sends and the receive of the answer, `combine`
waits for it.

Every wait is bounded. On gloo (`GlooAttentionConnector`, `GlooFFNConnector`) a peer that died (its connection
closes) or stalled (no message within `timeout_s`) raises `PeerLostError` naming it. On NCCL
(`NcclAttentionConnector`, `NcclFFNConnector`) the waits are stream-ordered (blocking the CPU on each would
serialise the pipeline); there the groups' timeout and NCCL's watchdog bound them instead. `p2p_connector` picks
the pair for a backend; roles and process groups are explicit arguments."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .connector import Arrival, AttentionConnector, FFNConnector
from .placement import Placement, Role
from .wire import DispatchLayout, WireFormat, decode_dispatch, encode_dispatch

FORWARD, DONE = 1, 2
HEADER_FIELDS = 4


@dataclass(frozen=True)
class ExchangeGroups:
    """The two process groups of the exchange (every rank of the launch is in both)."""

    dispatch: dist.ProcessGroup  # attention -> FFN: headers and dispatch buffers
    combine: dist.ProcessGroup  # FFN -> attention: results

    @classmethod
    def create(cls, timeout: timedelta) -> "ExchangeGroups":
        """Collective: every rank calls it once, in the same order."""
        return cls(dispatch=dist.new_group(timeout=timeout), combine=dist.new_group(timeout=timeout))


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

    def __init__(
        self, placement: Placement, rank: int, device: torch.device, timeout_s: float, groups: "ExchangeGroups",
        bounded: bool,
    ):
        self.placement = placement
        self.groups = groups
        self.rank = rank
        self.device = device
        self.timeout_s = timeout_s
        self.bounded = bounded  # the CPU waits with a timeout (gloo); else stream-ordered waits (NCCL)
        self._sends: list[tuple[dist.Work, int, torch.Tensor]] = []  # in flight; the tensor must stay alive

    def send(self, tensor: torch.Tensor, peer: int, group: dist.ProcessGroup) -> None:
        self._sends.append((dist.isend(tensor, peer, group=group), peer, tensor))
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
        values = torch.tensor([kind, layer, tokens, wire], dtype=torch.int64)
        if self.device.type == "cuda":  # from pinned memory, so the copy does not wait for the GPU's queue
            return values.pin_memory().to(self.device, non_blocking=True)
        return values


@dataclass
class InFlight:
    """One micro-batch of one layer sent to the FFN ranks; `results[i]` arrives from FFN rank `peers[i]`."""

    layer: int
    peers: list[int]
    results: list[torch.Tensor]
    works: list[dist.Work]


class P2PAttentionConnector(AttentionConnector):
    """The attention rank's end: dispatch normed hidden states (+ routing) to every FFN rank, sum what returns."""

    bounded: bool  # the CPU waits for each answer with a timeout

    def __init__(
        self, placement: Placement, rank: int, groups: ExchangeGroups, *, hidden_size: int, dtype: torch.dtype,
        device: torch.device, timeout_s: float,
    ):
        if placement.role(rank) is not Role.ATTENTION:
            raise ValueError(f"{placement.describe(rank)} is not an attention rank")
        self.link = _Link(placement, rank, device, timeout_s, groups, self.bounded)
        self.ffn_ranks = placement.ffn_rank_ids
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.counters = WireCounters()
        self.closed = False

    def dispatch(self, layer, hidden, top_k_index, top_k_weights, wire) -> InFlight:
        tokens = hidden.shape[0]
        with self._phase("wire"):  # the wire encoding (FP8 quantisation)
            payload = encode_dispatch(hidden, top_k_index, top_k_weights, wire)
        header = self.link.header(FORWARD, layer, tokens, wire.code)
        results, works = [], []
        for peer in self.ffn_ranks:
            self.link.send(header, peer, self.link.groups.dispatch)
            self.link.send(payload, peer, self.link.groups.dispatch)
            result = torch.empty(tokens, self.hidden_size, dtype=self.dtype, device=self.link.device)
            works.append(dist.irecv(result, peer, group=self.link.groups.combine))
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
            self.link.send(done, peer, self.link.groups.dispatch)
        self.link.flush_sends()


class GlooAttentionConnector(P2PAttentionConnector):
    bounded = True


class NcclAttentionConnector(P2PAttentionConnector):
    bounded = False  # stream-ordered: the groups' timeout and NCCL's watchdog bound the waits


class P2PFFNConnector(FFNConnector):
    """The FFN rank's end. A round takes the messages that have arrived by the time the first one does, so
    attention ranks at the same layer are computed as one batch and none waits for another."""

    bounded: bool

    def __init__(
        self, placement: Placement, rank: int, groups: ExchangeGroups, *, hidden_size: int, top_k: int,
        moe_layers: set[int], dtype: torch.dtype, device: torch.device, timeout_s: float,
    ):
        if placement.role(rank) is not Role.FFN:
            raise ValueError(f"{placement.describe(rank)} is not an FFN rank")
        self.link = _Link(placement, rank, device, timeout_s, groups, self.bounded)
        self.running = placement.attention_rank_ids
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.moe_layers = moe_layers
        self.dtype = dtype

    @property
    def finished(self) -> bool:
        return not self.running

    def _post_header(self, source: int) -> tuple[torch.Tensor, dist.Work]:
        header = torch.empty(HEADER_FIELDS, dtype=torch.int64, device=self.link.device)
        return header, dist.irecv(header, source, group=self.link.groups.dispatch)

    def _payload(self, source: int, header: torch.Tensor):
        """After a header: `None` for DONE, else the dispatch layout and its posted receive."""
        kind, layer, tokens, wire = header.tolist()
        if kind == DONE:
            return None
        if kind != FORWARD:
            raise RuntimeError(f"AFD: unknown message kind {kind} from {self.link.placement.describe(source)}")
        top_k = self.top_k if layer in self.moe_layers else 0
        layout = DispatchLayout(tokens, self.hidden_size, top_k, WireFormat.from_code(wire), self.dtype)
        payload = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.link.device)
        return layer, layout, payload, dist.irecv(payload, source, group=self.link.groups.dispatch)

    def _take(self, source: int, item) -> Arrival | None:
        if isinstance(item, Exception):
            raise item
        if item is None:
            self.running = [r for r in self.running if r != source]
        return item

    def respond(self, arrival: Arrival, result: torch.Tensor) -> None:
        self.link.send(result.contiguous(), arrival.source, self.link.groups.combine)

    def close(self) -> None:
        self.link.flush_sends()


class GlooFFNConnector(P2PFFNConnector):
    """gloo completes a receive only inside `wait`, so one thread per attention rank receives its messages into a
    queue, and a round is what the queue holds once its first item has come (within the timeout)."""

    bounded = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._inbox: queue.Queue = queue.Queue()  # (source, Arrival | None for done | PeerLostError)
        for source in self.running:
            threading.Thread(target=self._listen, args=(source,), daemon=True).start()

    def _listen(self, source: int) -> None:
        """Receive `source`'s messages in order until it is done or lost. An idle attention rank is not an error
        here; the main loop's timeout decides when silence means a stall."""
        try:
            while True:
                header, work = self._post_header(source)
                work.wait(timedelta(days=1))
                message = self._payload(source, header)
                if message is None:
                    self._inbox.put((source, None))
                    return
                layer, layout, payload, work = message
                self.link.wait(work, source, "send its hidden states")
                self._inbox.put((source, Arrival(source, layer, *decode_dispatch(payload, layout))))
        except Exception as err:  # a closed connection: hand it to the main loop, which names the peer
            if not isinstance(err, PeerLostError):
                err = PeerLostError(
                    f"AFD {self.link.placement.describe(self.link.rank)}: lost {self.link.placement.describe(source)}"
                    f" -- {str(err).splitlines()[0]}"
                )
            self._inbox.put((source, err))

    def _silence(self, waited: float) -> PeerLostError:
        names = ", ".join(self.link.placement.describe(r) for r in self.running)
        return PeerLostError(
            f"AFD {self.link.placement.describe(self.link.rank)}: no attention rank sent anything for {waited:.1f} s "
            f"(timeout {self.link.timeout_s:g} s); still expected: {names}. They died, stalled, or stopped without "
            "closing."
        )

    def receive_round(self) -> list[Arrival]:
        try:
            first = [self._inbox.get(timeout=self.link.timeout_s)]
        except queue.Empty:
            raise self._silence(self.link.timeout_s) from None
        while not self._inbox.empty():
            first.append(self._inbox.get_nowait())
        return [a for a in (self._take(source, item) for source, item in first) if a is not None]


class NcclFFNConnector(P2PFFNConnector):
    """A round takes the next message of every running attention rank, in rank order (the header's `tolist` waits
    for it). Attention ranks run the same schedule, so this is also what has arrived together; an attention rank
    that stops must `close()`, and NCCL's watchdog (the groups' timeout) bounds a wait on a lost one."""

    bounded = False

    def receive_round(self) -> list[Arrival]:
        arrivals = []
        for source in list(self.running):
            header, work = self._post_header(source)
            work.wait()
            message = self._payload(source, header)
            if message is None:
                self._take(source, None)
                continue
            layer, layout, payload, work = message
            work.wait()
            arrivals.append(Arrival(source, layer, *decode_dispatch(payload, layout)))
        return arrivals


_CONNECTORS = {
    "gloo": {Role.ATTENTION: GlooAttentionConnector, Role.FFN: GlooFFNConnector},
    "nccl": {Role.ATTENTION: NcclAttentionConnector, Role.FFN: NcclFFNConnector},
}


def p2p_connector(backend: str, role: Role) -> type[P2PAttentionConnector] | type[P2PFFNConnector]:
    """The connector class of `role` for a torch.distributed backend (`gloo` or `nccl`)."""
    if backend not in _CONNECTORS:
        raise ValueError(f"AFD runs on the gloo or nccl backend, got {backend!r}")
    return _CONNECTORS[backend][Role(role)]
