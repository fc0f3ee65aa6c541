"""The attention rank's decoder loop: micro-batches in flight through attention here and the FFN over there.

For each layer, micro-batch `m` first takes the FFN answer of the previous layer (sent `N - 1` micro-batches
ago, so usually already back), runs `attention_block`, the post-attention norm and the router, and dispatches;
then micro-batch `m + 1` does the same. So while the FFN ranks compute micro-batch `m` of layer `l`, this rank
computes the attention of micro-batch `m + 1`, and the exchange runs asynchronously underneath.

With several micro-batches each one attends over its own rows of the shared `DynamicCache` through
`MicroBatchCacheView`; a layer's new keys and values are appended to the cache once all micro-batches have
run it, so the cache `generate()` holds stays the ordinary one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from .exchange import AttentionExchange, InFlight
from .placement import even_split
from .timing import PhaseTimer
from .wire import WireFormat


class MicroBatchCacheView:
    """The rows `rows` of a `DynamicCache`, for one micro-batch: `update` returns past + new keys of those rows
    and holds the new ones until `commit_layer` appends every micro-batch's at once."""

    def __init__(self, cache: DynamicCache, rows: slice):
        self.cache = cache
        self.rows = rows
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.pending[layer_idx] = (key_states, value_states)
        if layer_idx < len(self.cache.layers) and self.cache.layers[layer_idx].is_initialized:
            layer = self.cache.layers[layer_idx]
            if layer.keys.numel():
                key_states = torch.cat([layer.keys[self.rows], key_states], dim=-2)
                value_states = torch.cat([layer.values[self.rows], value_states], dim=-2)
        return key_states, value_states


def commit_layer(cache: DynamicCache, views: list[MicroBatchCacheView], layer_idx: int) -> None:
    keys, values = zip(*(view.pending.pop(layer_idx) for view in views))
    cache.update(torch.cat(keys), torch.cat(values), layer_idx)


def _rows_of(tensor: torch.Tensor | None, rows: slice, batch: int):
    """A per-batch tensor's rows; tensors broadcast over the batch (leading 1) are shared as they are."""
    if tensor is None or tensor.shape[0] != batch:
        return tensor
    return tensor[rows]


def split_micro_batches(batch: int, micro_batches: int) -> list[slice]:
    count = min(micro_batches, batch)
    return [slice(*even_split(batch, count, i)) for i in range(count)]


def run_layers(
    layers: nn.ModuleList,
    hidden_states: torch.Tensor,
    *,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    exchange: AttentionExchange,
    micro_batches: int,
    wire: WireFormat,
    timer: PhaseTimer,
    **attention_kwargs,
) -> torch.Tensor:
    """All decoder layers over `hidden_states [B, S, H]`, the FFN halves on the FFN ranks."""
    batch, hidden_size = hidden_states.shape[0], hidden_states.shape[-1]
    rows = split_micro_batches(batch, micro_batches)
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"AFD splits the attention mask by rows; got a {type(attention_mask).__name__}")
    if len(rows) == 1 or cache is None:
        caches = [cache] * len(rows)
    elif isinstance(cache, DynamicCache) and all(not getattr(layer, "is_sliding", False) for layer in cache.layers):
        caches = [MicroBatchCacheView(cache, r) for r in rows]
    else:
        raise TypeError(
            f"AFD with --micro-batches > 1 runs on a DynamicCache; got {type(cache).__name__}. Use the default "
            "cache (no `cache_implementation`) or one micro-batch."
        )
    states = [hidden_states[r] for r in rows]
    masks = [_rows_of(attention_mask, r, batch) for r in rows]
    cos_sin = [tuple(_rows_of(t, r, batch) for t in position_embeddings) for r in rows]
    inflight: list[InFlight | None] = [None] * len(rows)

    for layer_idx, layer in enumerate(layers):
        for m in range(len(rows)):
            if inflight[m] is not None:
                with timer.phase("wait"):
                    ffn_out = exchange.combine(inflight[m])
                states[m] = states[m] + ffn_out.view_as(states[m])
            with timer.phase("attention"):
                states[m] = layer.attention_block(
                    states[m], cos_sin[m], masks[m], cache=caches[m], **attention_kwargs
                )
                normed = layer.post_attention_layernorm(states[m]).reshape(-1, hidden_size)
                top_k_index = top_k_weights = None
                if layer.router is not None:
                    _, top_k_weights, top_k_index = layer.router(normed)
                inflight[m] = exchange.dispatch(layer_idx, normed, top_k_index, top_k_weights, wire)
        if isinstance(caches[0], MicroBatchCacheView):
            commit_layer(cache, caches, layer_idx)

    for m in range(len(rows)):
        with timer.phase("wait"):
            ffn_out = exchange.combine(inflight[m])
        states[m] = states[m] + ffn_out.view_as(states[m])
    return torch.cat(states) if len(states) > 1 else states[0]
