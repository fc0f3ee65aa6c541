"""A static KV cache stored as float8 e4m3 with one float32 scale per cached token and head.

Decoding reads the whole cache every step, so halving its bytes nearly halves the attention time. Each new key
(value) row is scaled by `amax(|row|) / 448` (448 being e4m3's largest finite value) and rounded to e4m3; the
decode kernel multiplies the bytes on float8 tensor cores (or widens them tile by tile on GPUs without them) and
applies the scales to the scores (keys) and to the probabilities (values), so the cache is never dequantised in
memory. Values are stored as tiles of `VALUE_TILE` positions, `[B, H, S / VALUE_TILE, D, VALUE_TILE]`, positions
contiguous within a tile: the operand layout float8 tensor cores need for the probabilities-times-values product,
and one contiguous 16 KiB read per tile for Step-3 (a `[D, S]` layout reads 64-byte pieces strided across memory,
which cost a quarter of the bandwidth on the H200). Calls the kernel does not take (prefill) see the dequantised
cache.

    cache = Float8StaticCache(model.config, max_cache_len=4096)
    model.generate(**inputs, past_key_values=cache)  # with attn_implementation="mfa_decode"

(transformers 5.24 names the argument `cache=`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, StaticLayer

__all__ = ["VALUE_TILE", "Float8KV", "Float8StaticLayer", "Float8StaticCache", "quantize_float8"]

FLOAT8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0
# Positions per value tile: one tile is one step of the decode kernel's loop.
VALUE_TILE = 64


class Float8KV(NamedTuple):
    """A float8 cache tensor and its scales: `scale` `[B, H, S]` float32; `data` e4m3 `[B, H, S, D]` (any strides),
    or value tiles `[B, H, ceil(S / T), D, T]` (see the module docstring)."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def value_tiles(self) -> bool:
        """Whether `data` holds value tiles (one dimension more than rows)."""
        return self.data.ndim == self.scale.ndim + 2

    def view(self, positions: int) -> Float8KV:
        """The first `positions` cached rows (of padded storage: the memory past them stays readable)."""
        data = self.data if self.value_tiles else self.data[..., :positions, :]
        return Float8KV(data, self.scale[..., :positions])

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """`[B, H, S, D]` in `dtype`."""
        data = self.data
        if self.value_tiles:
            data = data.transpose(-1, -2).flatten(-3, -2)[..., : self.scale.shape[-1], :]
        return (data.to(torch.float32) * self.scale[..., None]).to(dtype)


def quantize_float8(states: torch.Tensor, layout: Literal["rows", "key_cache", "value_cache"] = "rows") -> Float8KV:
    """Per-row (last dimension) symmetric e4m3 quantisation of `[..., S, D]` states.

    `layout` "rows" returns `[..., S, D]` bytes. The cache layouts are those of `Float8StaticCache`, in which the
    decode kernel reads fastest: "key_cache" rows and "value_cache" value tiles `[..., tiles, D, VALUE_TILE]`, each
    in storage (bytes and scales) zero-padded by `VALUE_TILE` positions past the end, so that the kernel reads
    whole blocks without bounds checks.
    """
    amax = states.detach().abs().amax(dim=-1).to(torch.float32)
    scale = torch.clamp(amax, min=torch.finfo(torch.float32).tiny) / FLOAT8_MAX
    data = (states.to(torch.float32) / scale[..., None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
    if layout == "rows":
        return Float8KV(data, scale)
    if layout not in ("key_cache", "value_cache"):
        raise ValueError(f"unknown layout {layout!r}: expected 'rows', 'key_cache' or 'value_cache'")
    *lead, positions, dim = data.shape
    stored = _cache_storage(lead, positions, dim, data.device, value_tiles=layout == "value_cache")
    if layout == "value_cache":
        _write_value_rows(stored.data, torch.arange(positions, device=data.device), data)
    else:
        stored.data[..., :positions, :] = data
    stored.scale[..., :positions] = scale
    return stored.view(positions)


def _cache_storage(
    lead: Sequence[int], positions: int, dim: int, device: torch.device, value_tiles: bool
) -> Float8KV:
    """Zeroed bytes and scales for `positions` cached rows of `dim`, padded by `VALUE_TILE` positions: key rows
    `[*lead, positions + VALUE_TILE, dim]` or value tiles `[*lead, tiles, dim, VALUE_TILE]`."""
    padded = positions + VALUE_TILE
    if value_tiles:
        shape = (*lead, -(-padded // VALUE_TILE), dim, VALUE_TILE)
    else:
        shape = (*lead, padded, dim)
    data = torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device)
    return Float8KV(data, torch.zeros(*lead, padded, dtype=torch.float32, device=device))


def _write_value_rows(tiles: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> None:
    """Stores e4m3 `rows` `[..., n, D]` at cache `positions` `[n]` of value tiles `[..., tiles, D, T]`."""
    tile = tiles.shape[-1]
    # Indexing two non-adjacent dimensions puts the indexed one first: the target is `[n, ..., D]`. (Bytes:
    # index_put_ has no float8 kernel.)
    tiles.view(torch.uint8)[..., positions // tile, :, positions % tile] = rows.view(torch.uint8).movedim(-2, 0)


class Float8StaticLayer(StaticLayer):
    """`StaticLayer` whose keys and values are float8 e4m3 plus per-token scales; `update` returns `Float8KV`s.

    `keys` are rows `[B, H, S + VALUE_TILE, D]`, `values` value tiles `[B, H, tiles, D, VALUE_TILE]`, with scales
    `[B, H, S + VALUE_TILE]`: storage padded past the `S = max_cache_len` positions that `update` hands out (see
    `quantize_float8`).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        lead = (self.batch_size, self.num_heads)
        self.keys, self.key_scales = _cache_storage(lead, self.max_cache_len, self.k_head_dim, self.device, False)
        self.values, self.value_scales = _cache_storage(lead, self.max_cache_len, self.v_head_dim, self.device, True)
        self.cumulative_length = self.cumulative_length.to(self.device)
        # Fixed addresses, as `StaticLayer` marks its tensors: compiled generation (CUDA graphs) updates them in place.
        if not torch.compiler.is_compiling():
            for tensor in (self.keys, self.values, self.key_scales, self.value_scales, self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[Float8KV, Float8KV]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_tokens = key_states.shape[-2]
        positions = torch.arange(new_tokens, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(new_tokens)
        keys, values = quantize_float8(key_states), quantize_float8(value_states)
        # index_copy_ has no float8 kernel: copy the bytes.
        self.keys.view(torch.uint8).index_copy_(2, positions, keys.data.view(torch.uint8))
        _write_value_rows(self.values, positions, values.data)
        self.key_scales.index_copy_(2, positions, keys.scale)
        self.value_scales.index_copy_(2, positions, values.scale)
        cached = (Float8KV(self.keys, self.key_scales), Float8KV(self.values, self.value_scales))
        return tuple(stored.view(self.max_cache_len) for stored in cached)

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.view(torch.uint8).zero_()
            self.values.view(torch.uint8).zero_()
            self.key_scales.zero_()
            self.value_scales.zero_()
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:  # in place: compiled generation holds on to these addresses
            beam_idx = beam_idx.to(self.device)
            stored = (self.keys.view(torch.uint8), self.values.view(torch.uint8), self.key_scales, self.value_scales)
            for tensor in stored:
                tensor.copy_(tensor.index_select(0, beam_idx))


class Float8StaticCache(Cache):
    """Static cache of `max_cache_len` tokens per layer in float8 e4m3 (half the bytes of bf16)."""

    def __init__(self, config: PreTrainedConfig, max_cache_len: int):
        text_config = config.get_text_config(decoder=True)
        # Its layers hand `Float8KV`s to the attention function, which only `mfa_decode` reads; fail here rather
        # than with an attribute error deep inside another attention function.
        attention = text_config._attn_implementation
        if attention is not None and attention != "mfa_decode":
            raise ValueError(
                f"Float8StaticCache needs attn_implementation='mfa_decode'; this model uses {attention!r} "
                "(load it with attn_implementation='mfa_decode' or call model.set_attn_implementation('mfa_decode'))"
            )
        num_layers = text_config.num_hidden_layers
        super().__init__(layers=[Float8StaticLayer(max_cache_len=max_cache_len) for _ in range(num_layers)])
