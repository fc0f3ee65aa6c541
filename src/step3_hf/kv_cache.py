"""A dynamic KV cache that appends in place, which Step-3's `generate()` uses where transformers uses `DynamicCache`.

transformers' `DynamicLayer.update` appends each step's keys and values with `torch.cat`, which copies the layer's
whole cache at every step. In an H100 profile of `generate()` at 16 x 2048 those copies took what moving the cache
costs at the copy bandwidth; at 256 x 4096 or 64 x 16384 Step-3 holds 1 GiB of keys and values per layer. Side by
side on an H100, a 4-layer Step-3's decode step at those shapes took 18.4 and 17.4 ms with `DynamicCache` and 15.4
and 14.3 ms with this cache (docs/performance.md).

`InPlaceDynamicLayer` keeps its keys and values as views of buffers with room for `SPARE_POSITIONS` more positions
and writes each step's into that room; a full buffer is replaced by a new one with room again, so the whole cache is
copied once per `SPARE_POSITIONS` steps instead of at every step. The rest is `DynamicLayer`'s own code:

- `crop` shortens the views, and later steps overwrite the positions it dropped;
- operations that replace the tensors (beam reordering, batch selection and repetition) leave tensors that are not
  views of the buffer any more, and the next step copies them into a new buffer.

`InPlaceDynamicCache` is a `DynamicCache` whose full-attention layers are such layers. `use_in_place_kv_cache(
model_class)`, which `step3_hf` runs at import for `Step3ForCausalLM`, makes its `generate()` create one where it
would create a plain `DynamicCache` (no `cache_implementation`, or `"dynamic"`; not an offloaded or quantized one, nor
a cache the caller passes). `kv_cache.ENABLED = False` switches that off: transformers' `DynamicCache` again.

Private name used: `GenerationMixin._prepare_cache_for_generation` (docs/compatibility.md).
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .modeling_step3 import _CACHE_NAME  # the cache's key in generate()'s model_kwargs: renamed in transformers 5.24

__all__ = ["ENABLED", "SPARE_POSITIONS", "InPlaceDynamicCache", "InPlaceDynamicLayer", "use_in_place_kv_cache"]

# Positions a new buffer holds beyond the current ones: one copy of the cache per this many decode steps. Memory per
# spare position and layer: batch x KV heads x head_dim x 2 (keys and values) elements (256 KiB at batch 256 for
# Step-3's bf16 single key and value head of 256).
SPARE_POSITIONS = 256

# Whether `generate()` of a model class passed to `use_in_place_kv_cache` makes an `InPlaceDynamicCache` (read at
# each call, so that benchmarks and users can compare it with transformers' `DynamicCache`).
ENABLED = True


def _append(cached: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.cat([cached, new], dim=-2)` as a view of a buffer: `buffer` itself while `cached` is still a view of its
    first positions and it has room for `new`, else a new buffer with `SPARE_POSITIONS` to spare. Returns the view
    and the buffer."""
    length = cached.shape[-2] if cached.dim() == new.dim() else 0  # the uninitialized layer's keys are empty 1-D
    end = length + new.shape[-2]
    in_buffer = (
        buffer is not None
        and length > 0
        and cached.data_ptr() == buffer.data_ptr()
        and cached.stride() == buffer.stride()
        and cached.shape[:-2] == new.shape[:-2] == buffer.shape[:-2]
        and buffer.shape[-1] == new.shape[-1]
        and buffer.dtype == new.dtype
        and end <= buffer.shape[-2]
    )
    if not in_buffer:
        buffer = new.new_empty(*new.shape[:-2], end + SPARE_POSITIONS, new.shape[-1])
        if length:
            buffer[..., :length, :].copy_(cached)
    buffer[..., length:end, :].copy_(new)
    return buffer[..., :end, :], buffer


class InPlaceDynamicLayer(DynamicLayer):
    """A `DynamicLayer` whose `update` writes into spare room of a buffer instead of concatenating."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._key_buffer = _append(self.keys, self._key_buffer, key_states)
        self.values, self._value_buffer = _append(self.values, self._value_buffer, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


class InPlaceDynamicCache(DynamicCache):
    """`DynamicCache` (same arguments) whose full-attention layers append in place (`InPlaceDynamicLayer`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layers = [InPlaceDynamicLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        if getattr(self, "layer_class_to_replicate", None) is DynamicLayer:  # a cache built without a config
            self.layer_class_to_replicate = InPlaceDynamicLayer


def use_in_place_kv_cache(model_class: type) -> None:
    """Have `generate()` of `model_class` create an `InPlaceDynamicCache` where it would create a plain
    `DynamicCache` (idempotent)."""
    prepare = model_class._prepare_cache_for_generation
    if getattr(prepare, "_step3_upstream", None) is not None:
        return

    @functools.wraps(prepare)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        passed = model_kwargs.get(_CACHE_NAME)
        result = prepare(self, generation_config, model_kwargs, *args, **kwargs)
        # Switched off, or an assistant's cache, which records its past for rollbacks: left as transformers made it.
        if not ENABLED or getattr(generation_config, "is_assistant", False):
            return result
        cache = model_kwargs.get(_CACHE_NAME)
        created = cache is not None and cache is not passed
        if created and type(cache) is DynamicCache and not getattr(cache, "offloading", False):
            model_kwargs[_CACHE_NAME] = InPlaceDynamicCache(config=self.config.get_text_config(decoder=True))
        return result

    _prepare_cache_for_generation._step3_upstream = prepare
    model_class._prepare_cache_for_generation = _prepare_cache_for_generation
