"""`attn_implementation="mfa_paged"`: continuous batching (`generate_batch`, `step3-serve`) on the MFA kernel.

transformers' continuous batching runs a model on its paged cache with `sdpa`, eager or flash attention only, and
its SDPA path masks the whole packed batch against all of its keys (a `[tokens, keys]` mask, and each key repeated
for every query head). This module registers a paged attention function for it: decode tokens (a few new tokens
per sequence) go to `paged_decode_attention`, which reads every sequence's keys once for all 64 query heads, straight
from the paged cache where transformers hands the cache to the attention function (before 5.24); sequences with
more new tokens (prefill chunks) go to SDPA, one at a time. No mask is built.

`init_continuous_batching`, installed on Step-3 models by `step3_hf`, makes a model whose attention is `mfa_decode`
(the default on CUDA) or `mfa_paged` run continuous batching on this function; a model on `sdpa` keeps
transformers' own path.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from transformers import AttentionInterface
from transformers.generation import GenerationMixin
from transformers.generation.continuous_batching import PagedAttentionCache

from .paged_attention import MAX_GROUP, paged_decode_attention, ragged_sdpa_attention, token_key_ranges
from .transformers_attention import MAX_DECODE_TOKENS, MFA_DECODE_ATTENTION
from .triton_support import kernel_available

__all__ = ["PAGED_MFA_ATTENTION", "init_continuous_batching", "paged_mfa_attention_forward", "register_paged"]

_Value = TypeVar("_Value")

PAGED_MFA_ATTENTION = "mfa_paged"
# The paged SDPA name of the running transformers: `paged|sdpa` before 5.24 (where continuous batching prefixes the
# model's attention with `paged|`), plain `sdpa` after.
_UPSTREAM_PAGED_SDPA = "paged|sdpa" if "paged|sdpa" in AttentionInterface._global_mapping else "sdpa"


def _per_layer(value, layer_type: str = "full_attention"):
    """Continuous batching's per-layer-type kwargs are a dict for hybrid models and a plain value otherwise."""
    return value[layer_type] if isinstance(value, dict) else value


class _OncePerForward:
    """Values that depend on a step's packing (its cumulative lengths, read index or block table) and not on the
    layer: the first layer of a forward that asks computes each, its later layers reuse it, so the layout's small ops
    (and a prefill step's host reads) run once per step instead of once per layer. Layers run in increasing index
    order, so a layer index below the last one that asked (or the same one asking again) starts a new forward; the
    step's tensors must also be the same objects."""

    def __init__(self):
        self._layer, self._asked, self._step, self._values = -1, set(), (), {}

    def get(self, layer_idx: int, step: tuple, name: str, compute: Callable[[], _Value]) -> _Value:
        new_forward = layer_idx < self._layer or (layer_idx == self._layer and name in self._asked)
        if layer_idx != self._layer or new_forward:
            self._layer, self._asked = layer_idx, set()
        if new_forward or len(step) != len(self._step) or any(a is not b for a, b in zip(step, self._step)):
            self._step, self._values = step, {}
        self._asked.add(name)
        if name not in self._values:
            self._values[name] = compute()
        return self._values[name]


# One per paged cache (a continuous batching manager's), dropped with it.
_per_forward: weakref.WeakKeyDictionary[object, _OncePerForward] = weakref.WeakKeyDictionary()
# The attention kwargs that describe a step's packing: the same objects for every layer of one forward.
_STEP_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k", "read_index", "write_index", "block_table")


def _step_inputs(kwargs) -> tuple:
    return tuple(kwargs.get(name) for name in _STEP_INPUTS)


def _once_per_forward(cache) -> _OncePerForward:
    if cache is None:
        return _OncePerForward()
    if cache not in _per_forward:
        _per_forward[cache] = _OncePerForward()
    return _per_forward[cache]


@dataclass
class _Keys:
    """Where a step's keys are: `key`/`value` `[N, Hkv, D]` (the cache's rows if `rows` names them, else ragged), each
    sequence's lengths as cumulative `cu_seq_lens_k` and, where they are not packed one after another, `starts`."""

    key: torch.Tensor
    value: torch.Tensor
    rows: torch.Tensor | None
    cu_seq_lens_k: torch.Tensor
    max_len: int
    starts: torch.Tensor | None = None
    host_starts: list[int] | None = None
    token_ranges: tuple[torch.Tensor, torch.Tensor] | None = None  # `token_key_ranges` where it was computed already


def _write_paged_cache(cache: PagedAttentionCache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs):
    """Writes the new keys and values into the paged cache and says where each sequence's keys are: the cache's
    `[N, Hkv, D]` token rows with the read index (or, on the decode path, the block table) naming them, or the new
    keys themselves when no request has cached tokens. Layouts this does not know (a sliding window, another
    allocator) get transformers' own update, a gathered copy."""
    new_key = key[0].transpose(0, 1)  # [T, Hkv, D]
    new_value = value[0].transpose(0, 1)
    if hasattr(cache, "layer_to_allocator"):  # transformers >= 5.24: one allocator per layer group
        allocator = cache.layer_to_allocator[layer_idx]
        group, layer_type = allocator.index, allocator.layer_type
        views = getattr(allocator, "_kv_token_views", {}).get(layer_idx)
        if layer_type != "full_attention" or views is None or kwargs.get("block_table") is not None:
            key, value = cache.update(key, value, layer_idx, kwargs=kwargs)
            return _Keys(key[0].transpose(0, 1), value[0].transpose(0, 1), None, kwargs["cu_seq_lens_k"],
                         kwargs["max_length_k"])  # fmt: skip
        key_cache, value_cache = views
        cu_k, max_k = kwargs["cu_seq_lens_k"][layer_type], kwargs["max_length_k"][layer_type]
    else:  # transformers < 5.24
        group, index_in_group = cache.layer_index_to_group_indices[layer_idx]
        cu_k = _per_layer(kwargs["cu_seq_lens_k"])
        max_k = _per_layer(kwargs["max_seqlen_k"])
        if cache.sliding_windows.get(layer_idx, 1) != 1:
            key, value = cache.update(key, value, layer_idx,
                                      read_index=kwargs["read_index"], write_index=kwargs["write_index"])  # fmt: skip
            return _Keys(key, value, None, cu_k, max_k)
        key_cache, value_cache = cache.key_cache[index_in_group], cache.value_cache[index_in_group]
        if kwargs.get("block_table") is not None:
            table, cu_q = kwargs["block_table"][group], kwargs["cu_seq_lens_q"]
            layout = _once_per_forward(cache).get(
                layer_idx, (*_step_inputs(kwargs), cu_k), f"block_table/{group}",
                lambda: _BlockTableLayout.of(table, cache.block_size, cu_q, cu_k, new_key.shape[0]),
            )  # fmt: skip
            key_cache.index_copy_(0, layout.write, new_key)
            value_cache.index_copy_(0, layout.write, new_value)
            return _Keys(key_cache, value_cache, layout.rows, cu_k, layout.width, starts=layout.starts,
                         host_starts=layout.host_starts, token_ranges=layout.token_ranges)  # fmt: skip
    read_index, write_index = kwargs["read_index"][group], kwargs["write_index"][group]
    key_cache.index_copy_(0, write_index, new_key)
    value_cache.index_copy_(0, write_index, new_value)
    if read_index.numel() == 0:  # every request is a whole prompt: its keys are the new ones
        return _Keys(new_key, new_value, None, cu_k, max_k)
    return _Keys(key_cache, value_cache, read_index, cu_k, max_k)


@dataclass
class _BlockTableLayout:
    """Continuous batching's decode path (transformers < 5.24, where `init_continuous_batching` enables it): a block
    table `[B, blocks]` instead of read and write indices (whose per-position lists the host would build every step).
    Position p of sequence b is cache row `table[b, p // block_size] * block_size + p % block_size`; the keys of
    sequence b are rows `[b * W, b * W + len)` of that `[B, W]` row map (`rows`), flattened. The new tokens are each
    sequence's last keys (`write`: their cache rows)."""

    rows: torch.Tensor
    width: int
    starts: torch.Tensor
    host_starts: list[int]
    token_ranges: tuple[torch.Tensor, torch.Tensor]
    write: torch.Tensor

    @classmethod
    def of(cls, block_table, block_size, cu_q, cu_k, num_tokens) -> _BlockTableLayout:
        batch, blocks = block_table.shape
        width = blocks * block_size
        offsets = torch.arange(block_size, device=block_table.device)
        rows = (block_table.long()[:, :, None] * block_size + offsets).reshape(batch * width)
        starts = torch.arange(batch, device=block_table.device) * width
        token_start, token_end = token_key_ranges(cu_q, cu_k, num_tokens, key_starts=starts)
        write = rows[(token_end.long() - 1).clamp(min=0)]  # each new token's own position: the end of its range
        host_starts = [b * width for b in range(batch)]
        return cls(rows, width, starts, host_starts, (token_start, token_end), write)


def paged_mfa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for continuous batching: `query` `[1, Hq, T, D]` packed, keys `[1, Hkv, K, D]`
    ragged (or the paged cache in `kwargs["cache"]`) -> `([1, T, Hq, D], None)`."""
    if "cu_seq_lens_q" not in kwargs:
        raise ValueError(
            f"`{PAGED_MFA_ATTENTION}` was called without `cu_seq_lens_q`: it runs continuous batching's packed "
            f"batches (`generate_batch`); use `{MFA_DECODE_ATTENTION}` for other calls"
        )
    if dropout and module.training:
        raise ValueError(f"`{PAGED_MFA_ATTENTION}` does not do attention dropout (the model is in training mode)")
    cache = kwargs.get("cache")
    if isinstance(cache, PagedAttentionCache):  # the model handed the cache over (`updates_paged_cache`)
        keys = _write_paged_cache(cache, key, value, module.layer_idx, kwargs)
        once = _once_per_forward(cache)
    else:  # the model updated the cache and gathered each sequence's keys
        once = _once_per_forward(None)
        keys = _Keys(key[0].transpose(0, 1), value[0].transpose(0, 1), None, _per_layer(kwargs["cu_seq_lens_k"]),
                     _per_layer(kwargs.get("max_seqlen_k", kwargs.get("max_length_k"))))  # fmt: skip
    key, value, rows, cu_k, max_k = keys.key, keys.value, keys.rows, keys.cu_seq_lens_k, keys.max_len
    cu_q = kwargs["cu_seq_lens_q"]
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"`cu_seq_lens_k` has {cu_k.numel()} entries, `cu_seq_lens_q` {cu_q.numel()}")
    max_q = kwargs.get("max_seqlen_q", kwargs.get("max_length_q"))
    query = query[0].transpose(0, 1)  # [T, Hq, D]
    num_tokens = query.shape[0]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling

    kernel = (
        kernel_available(query.device)
        and query.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and key.dtype == query.dtype
        and query.shape[1] // key.shape[1] <= MAX_GROUP
        and not (torch.is_grad_enabled() and query.requires_grad)
    )
    step = (*_step_inputs(kwargs), cu_k)  # with this layer group's key lengths

    def token_ranges():
        return keys.token_ranges or once.get(
            module.layer_idx, step, "token_ranges",
            lambda: token_key_ranges(cu_q, cu_k, num_tokens, key_starts=keys.starts),
        )  # fmt: skip

    if kernel and isinstance(max_q, int) and max_q <= MAX_DECODE_TOKENS:  # decode steps: no host sync
        start, end = token_ranges()
        out = paged_decode_attention(query, key, value, start, end, rows=rows, scale=scale, max_kv_len=max_k)
        return out[None], None

    # Prefill chunks (or no kernel here): their sequences through SDPA, the decode tokens beside them the kernel.
    cu_q_host, cu_k_host = once.get(module.layer_idx, step, "host_lengths", lambda: (cu_q.tolist(), cu_k.tolist()))
    q_lens = [hi - lo for lo, hi in zip(cu_q_host[:-1], cu_q_host[1:])]
    long = [b for b, n in enumerate(q_lens) if n > MAX_DECODE_TOKENS or not kernel]
    out = ragged_sdpa_attention(
        query, key, value, cu_q_host, cu_k_host, scale, sequences=long, rows=rows, key_starts=keys.host_starts
    )
    if kernel and len(long) < len(q_lens):

        def decode_tokens():
            long_set = set(long)
            host = [t for b, n in enumerate(q_lens) if b not in long_set for t in range(cu_q_host[b], cu_q_host[b] + n)]
            tokens = torch.tensor(host, dtype=torch.int32).to(query.device, non_blocking=True)
            start, end = token_ranges()
            picked = tokens.long()
            return tokens, picked, start[picked], end[picked]

        tokens, picked, start, end = once.get(module.layer_idx, step, "decode_tokens", decode_tokens)
        decoded = paged_decode_attention(
            query, key, value, start, end, rows=rows, tokens=tokens, scale=scale, max_kv_len=max_k
        )
        out.index_copy_(0, picked, decoded)
    return out[None], None


# The model hands this function the paged cache instead of a gathered copy of it (see `Step3Attention.forward`).
paged_mfa_attention_forward.updates_paged_cache = True


def register_paged() -> None:
    """Make `attn_implementation="mfa_paged"` known to transformers (idempotent). It builds no mask: the
    kernel and the SDPA fallback take each sequence's causal range from the cumulative lengths."""
    AttentionInterface.register(PAGED_MFA_ATTENTION, paged_mfa_attention_forward)


def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, *args, **kwargs):
    """transformers' `init_continuous_batching`, running `mfa_paged` for a model on `mfa_decode`.

    transformers' manager accepts only its own attention names, so it is built under the paged SDPA name and the
    model is then switched to ours; when the manager stops, transformers restores the attention the model had."""
    requested = self.config._attn_implementation
    if requested not in (MFA_DECODE_ATTENTION, PAGED_MFA_ATTENTION):
        return GenerationMixin.init_continuous_batching(
            self, generation_config, continuous_batching_config, *args, **kwargs
        )
    self.config._attn_implementation = _UPSTREAM_PAGED_SDPA
    try:
        manager = GenerationMixin.init_continuous_batching(
            self, generation_config, continuous_batching_config, *args, **kwargs
        )
    finally:
        self.config._attn_implementation = PAGED_MFA_ATTENTION
    manager._original_attn_impl = requested if requested != PAGED_MFA_ATTENTION else manager._original_attn_impl
    if _UPSTREAM_PAGED_SDPA == "paged|sdpa" and getattr(manager, "batch_processor", None) is None:
        # transformers < 5.24 keeps its block-table decode path for flash attention; `mfa_paged` reads the block
        # table too (`_BlockTableLayout`), which spares the host a list of every cached position each step.
        requested_blocks = getattr(continuous_batching_config, "max_blocks_per_request", None)
        manager.continuous_batching_config.max_blocks_per_request = requested_blocks
    return manager
