"""The attention rank's decoder loop: micro-batches in flight through attention here and the FFN over there.

For each layer, micro-batch `m` first takes the FFN answer of the previous layer (sent `N - 1` micro-batches
ago, so usually already back), runs `attention_block`, the post-attention norm and the router, and dispatches;
then micro-batch `m + 1` does the same. So while the FFN ranks compute micro-batch `m` of layer `l`, this rank
computes the attention of micro-batch `m + 1`, and the exchange runs asynchronously underneath.

With several micro-batches each one attends over its own rows of the cache `generate()` holds, which stays the
ordinary one: a `StaticCache` (preallocated; each micro-batch writes its rows in place, nothing is copied per
step: `StaticRowsCache`) or a `DynamicCache` (grown once per layer and step for all rows: `MicroBatchedCache`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, StaticLayer

from ..kernels.transformers_attention import DECODE_KV_BOUNDS, MFA_DECODE_ATTENTION, decode_kv_bounds
from .placement import even_split
from .timing import PhaseTimer

if TYPE_CHECKING:
    from .graphs import AttentionGraphs


class MicroBatchedCache:
    """A `DynamicCache` shared by the micro-batches of one forward, each updating only its own rows.

    Decoding: the first micro-batch to reach a layer grows that layer's keys and values by the new positions
    for all rows (the one copy `DynamicCache` itself makes per step); each micro-batch writes its rows into the
    new positions and attends over a view of its rows. Prefill (nothing cached yet): the new keys are kept
    until every micro-batch has run the layer. `commit(layer)` then hands the layer back to the cache.
    """

    def __init__(self, cache: DynamicCache):
        self.cache = cache
        self._grown: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def rows(self, rows: slice) -> "_RowsOfCache":
        return _RowsOfCache(self, rows)

    def update(self, rows: slice, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        layers = self.cache.layers
        layer = layers[layer_idx] if layer_idx < len(layers) else None
        if layer is None or not layer.is_initialized or layer.keys.numel() == 0:
            self._pending.setdefault(layer_idx, []).append((key_states, value_states))
            return key_states, value_states
        if layer_idx not in self._grown:
            past = layer.keys.shape[-2]
            grown = []
            for old in (layer.keys, layer.values):
                new = old.new_empty((*old.shape[:-2], past + key_states.shape[-2], old.shape[-1]))
                new[..., :past, :] = old
                grown.append(new)
            self._grown[layer_idx] = (*grown, past)
        keys, values, past = self._grown[layer_idx]
        keys[rows, :, past:] = key_states
        values[rows, :, past:] = value_states
        return keys[rows], values[rows]

    def commit(self, layer_idx: int) -> None:
        if layer_idx in self._pending:
            keys, values = zip(*self._pending.pop(layer_idx))
            self.cache.update(torch.cat(keys), torch.cat(values), layer_idx)
        elif layer_idx in self._grown:
            layer = self.cache.layers[layer_idx]
            layer.keys, layer.values, _ = self._grown.pop(layer_idx)


class StaticRowsCache:
    """A `StaticCache` shared by the micro-batches of one forward: each writes its new keys and values into its own
    rows, in place, and attends over a view of its rows; no copy of the cache per step.

    Every micro-batch writes at the same positions (the layer's length so far); `commit(layer)` advances the
    layer's length by the forward's `new_tokens` once all micro-batches have run it. A layer not yet allocated is
    allocated for the whole batch. `update` does only device work, so it can be replayed from a CUDA graph.
    """

    def __init__(self, cache: Cache, batch: int, new_tokens: int):
        self.cache = cache
        self.batch = batch
        self.new_tokens = new_tokens

    def rows(self, rows: slice) -> "_RowsOfCache":
        return _RowsOfCache(self, rows)

    def update(self, rows: slice, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        layer = self.cache.layers[layer_idx]
        if not layer.is_initialized:  # sized by the whole batch, not by the micro-batch that comes first
            layer.lazy_initialization(
                key_states[:1].expand(self.batch, -1, -1, -1), value_states[:1].expand(self.batch, -1, -1, -1)
            )
        elif layer.keys.shape[0] != self.batch:
            raise ValueError(
                f"the static cache holds {layer.keys.shape[0]} sequences but this forward has {self.batch}: use a "
                "cache made for this batch"
            )
        new_tokens = key_states.shape[-2]
        if new_tokens == 1:  # decode: the position is the layer's length itself (no arange and add: two launches)
            positions = layer.cumulative_length.reshape(1)
        else:
            positions = torch.arange(new_tokens, device=layer.keys.device) + layer.cumulative_length
        keys, values = layer.keys[rows], layer.values[rows]  # views: the writes land in the shared tensors
        keys.index_copy_(2, positions, key_states)
        values.index_copy_(2, positions, value_states)
        return keys, values

    def commit(self, layer_idx: int) -> None:
        self.cache.layers[layer_idx].cumulative_length.add_(self.new_tokens)


class _RowsOfCache:
    """What one micro-batch's attention sees as its cache: `update` goes to its rows of the shared cache."""

    def __init__(self, shared: MicroBatchedCache | StaticRowsCache, rows: slice):
        self.shared, self.rows = shared, rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.shared.update(self.rows, key_states, value_states, layer_idx)


def _rows_of(tensor: torch.Tensor | None, rows: slice, batch: int):
    """A per-batch tensor's rows; tensors broadcast over the batch (leading 1) are shared as they are."""
    if tensor is None or tensor.shape[0] != batch:
        return tensor
    return tensor[rows]


def split_micro_batches(batch: int, micro_batches: int) -> list[slice]:
    count = min(micro_batches, batch)
    return [slice(*even_split(batch, count, i)) for i in range(count)]


def is_static(cache: Cache | None) -> bool:
    layers = getattr(cache, "layers", [])
    return bool(layers) and all(type(layer) is StaticLayer for layer in layers)


def micro_batch_caches(cache: Cache | None, batch: int, new_tokens: int, rows: list[slice], rows_view: bool = False):
    """(shared cache to commit per layer or None, the cache each micro-batch's attention sees). `rows_view`: a
    static cache goes through `StaticRowsCache` even for one micro-batch (what CUDA graphs replay)."""
    if cache is None or (len(rows) == 1 and not (rows_view and is_static(cache))):
        return None, [cache] * len(rows)
    layers = getattr(cache, "layers", [])
    if type(cache) is DynamicCache and all(not getattr(layer, "is_sliding", False) for layer in layers):
        shared = MicroBatchedCache(cache)
    elif is_static(cache):
        shared = StaticRowsCache(cache, batch, new_tokens)
    else:
        raise TypeError(
            f"AFD with --micro-batches > 1 runs on a DynamicCache or a StaticCache; got {type(cache).__name__}. Use "
            "one of those (`cache_implementation` unset or \"static\") or one micro-batch."
        )
    return shared, [shared.rows(r) for r in rows]


def step_kv_bounds(layers: nn.ModuleList, mask: torch.Tensor | None) -> dict:
    """`{"decode_kv_bounds": ...}` of one micro-batch's mask for every layer of the step, where the decode kernel
    reads the mask (it would fold the mask again in each layer otherwise); else `{}`."""
    if mask is None or layers[0].self_attn.config._attn_implementation != MFA_DECODE_ATTENTION:
        return {}
    bounds = decode_kv_bounds(mask)
    return {} if bounds is None else {DECODE_KV_BOUNDS: bounds}


def attention_phase(layer, hidden_states, cos_sin, mask, cache, **attention_kwargs):
    """One micro-batch through one layer's attention half: (new hidden states, normed `[n, H]`, routing)."""
    hidden_states = layer.attention_block(hidden_states, cos_sin, mask, cache=cache, **attention_kwargs)
    normed = layer.post_attention_layernorm(hidden_states).reshape(-1, hidden_states.shape[-1])
    return hidden_states, normed, layer.mlp.route(normed)


def run_layers(
    layers: nn.ModuleList,
    hidden_states: torch.Tensor,
    *,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    micro_batches: int,
    timer: PhaseTimer,
    graphs: "AttentionGraphs | None" = None,
    **attention_kwargs,
) -> torch.Tensor:
    """All decoder layers over `hidden_states [B, S, H]`; each layer's `mlp` is a `RemoteFFN`, whose `send` and
    `combine` bracket the FFN on the other side. The mask and the rotary embeddings are built once per step, by the
    caller, and cut into micro-batches once. With `graphs`, decode steps on a static cache replay each layer's and
    micro-batch's attention phase from a CUDA graph."""
    batch = hidden_states.shape[0]
    rows = split_micro_batches(batch, micro_batches)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"AFD splits the attention mask by rows; got a {type(attention_mask).__name__}")
    use_graphs = graphs is not None and graphs.applies(hidden_states, cache)
    shared, caches = micro_batch_caches(cache, batch, hidden_states.shape[1], rows, rows_view=use_graphs)
    states = [hidden_states[r] for r in rows]
    masks = [_rows_of(attention_mask, r, batch) for r in rows]
    cos_sin = [tuple(_rows_of(t, r, batch) for t in position_embeddings) for r in rows]
    inflight: list[object | None] = [None] * len(rows)
    if use_graphs:
        graphs.prepare(layers, cache, rows, masks, cos_sin, hidden_states)
    else:
        bounds = [step_kv_bounds(layers, mask) for mask in masks]

    def add_ffn_result(m: int, mlp) -> None:
        with timer.phase("wait"):
            ffn_out = mlp.combine(inflight[m])
        states[m] = states[m] + ffn_out.view_as(states[m])

    previous = None
    for layer_idx, layer in enumerate(layers):
        for m in range(len(rows)):
            if timer.keep_trace:  # labels go only into a kept trace
                timer.labels = {"layer": layer_idx, "micro_batch": m}
            if inflight[m] is not None:
                add_ffn_result(m, previous.mlp)
            with timer.phase("attention"):  # the attention half, its norm and the router
                if use_graphs:
                    states[m], normed, routing = graphs.run(layer_idx, layer, m, states[m], caches[m])
                else:
                    states[m], normed, routing = attention_phase(
                        layer, states[m], cos_sin[m], masks[m], caches[m], **attention_kwargs, **bounds[m]
                    )
            inflight[m] = layer.mlp.send(normed, *routing)  # the connector times the wire (and an in-process FFN)
        if shared is not None:
            shared.commit(layer_idx)
        previous = layer

    for m in range(len(rows)):
        if timer.keep_trace:
            timer.labels = {"layer": len(layers) - 1, "micro_batch": m}
        add_ffn_result(m, previous.mlp)
    return torch.cat(states) if len(states) > 1 else states[0]
