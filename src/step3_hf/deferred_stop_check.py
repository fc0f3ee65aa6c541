"""`generate()` without a host wait per decode step: transformers' deferred stop check, used on CUDA for Step-3.

Each step of `GenerationMixin._sample` (greedy and sampled decoding) ends in a stop check that reads
`unfinished_sequences.max() == 0` on the host. The host then waits for the step's last kernel before it can issue the
next step, and the GPU idles while the host prepares it: on an H100 at batch 16 x 2048 that wait was one of two per
step, together 5.1 ms of an 11 ms step (docs/performance.md, the profile).

transformers ships `DeferredStopCheck`, which copies the flag to pinned memory and reads it one step late, so the host
stays a step ahead; a run stopped by an end-of-sequence token decodes one step more, which `generate` takes back off
the output. transformers enables it on MPS only. `use_deferred_stop_check(model_class)`, which `step3_hf` runs at
import for `Step3ForCausalLM` (and so for the VL classes built on it; AFD's attention model is not one), enables it
while such a model decodes on a device in `DEVICE_TYPES`, unless:

- the cache outlives the call (`return_dict_in_generate`, or a cache the caller passed in): undoing the extra step
  would then rewrite that cache, so such calls keep the per-step check;
- the model is an assistant of assisted generation, as upstream.

Tokens then reach a streamer one step late, as on MPS. When sampling, the step taken back has drawn from the random
generator and called the logits processors once more: the run's own tokens are the same, but a later sampled call
continues from another point of the random stream than with the per-step check (as on MPS upstream).

Private names used: `DeferredStopCheck.is_supported` and `GenerationMixin._sample` (docs/compatibility.md).
"""

from __future__ import annotations

import contextvars
import functools

import torch
from transformers.generation import utils as generation_utils

__all__ = ["DEVICE_TYPES", "use_deferred_stop_check"]

# Device types whose Step-3 decoding defers the stop check (MPS is upstream's own).
DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_sampling_step3 = contextvars.ContextVar("sampling_step3", default=False)


def _defers(device: torch.device, cache_is_returned: bool, is_assistant: bool) -> bool:
    sampling_step3 = _sampling_step3.get()
    # Read once: `_sample` asks once, after the prefill; a `generate()` of another model nested inside this one (in a
    # logits processor, a streamer) must not inherit the answer. `_sample`'s wrapper restores the flag on return.
    _sampling_step3.set(False)
    return sampling_step3 and torch.device(device).type in DEVICE_TYPES and not is_assistant and not cache_is_returned


def _install_policy() -> None:
    deferred = generation_utils.DeferredStopCheck
    upstream = deferred.is_supported
    if getattr(upstream, "_step3_upstream", None) is not None:
        return

    @functools.wraps(upstream)
    def is_supported(device, cache, cache_is_returned, is_assistant):
        upstream_defers = upstream(device, cache, cache_is_returned, is_assistant)
        return upstream_defers or _defers(device, cache_is_returned, is_assistant)

    is_supported._step3_upstream = upstream
    deferred.is_supported = staticmethod(is_supported)


def use_deferred_stop_check(model_class: type) -> None:
    """Defer `generate()`'s stop check by a step while a `model_class` instance samples on a `DEVICE_TYPES` device
    (idempotent)."""
    _install_policy()
    sample = model_class._sample
    if getattr(sample, "_step3_upstream", None) is not None:
        return

    @functools.wraps(sample)
    def _sample(self, *args, **kwargs):
        token = _sampling_step3.set(True)
        try:
            return sample(self, *args, **kwargs)
        finally:
            _sampling_step3.reset(token)

    _sample._step3_upstream = sample
    model_class._sample = _sample
