"""CUDA graphs of the attention side's per-micro-batch work: one graph per layer and micro-batch holding the attention
block, the post-attention norm and the router, replayed on decode steps against a static cache.

A decode micro-batch is a few hundred small kernels (norms, rotary, projections, the cache write, the decode
kernel, the router) whose launch can cost more host time than the GPU spends on them; a replay issues them at once.
Each micro-batch has static input buffers (hidden states, rotary cos/sin, mask rows and the decode kernel's bounds of
them) that every layer's graph reads: the mask, its bounds and cos/sin are copied in once per step, the hidden states
before each replay. The cache is written in place through `StaticRowsCache`, whose update is device work only, and
its lengths advance outside the graphs.
The graphs are captured on the first decode step and captured again when the cache, the batch split or the layers
change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..kernels.cuda_graph_capture import capture_cuda_graph
from .pipeline import attention_phase, is_static, step_kv_bounds


@dataclass
class _Inputs:
    hidden: torch.Tensor
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None
    kv_bounds: dict  # {} or {"decode_kv_bounds": (start, end)} of `mask`


class AttentionGraphs:
    """The captured attention phases of one attention-side model (see module docstring)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._inputs: list[_Inputs] = []
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple]] = {}
        self._pool = None

    @staticmethod
    def applies(hidden_states: torch.Tensor, cache: Cache | None) -> bool:
        """Decode steps (one new token per sequence) on a static cache on CUDA; prefill runs eagerly."""
        return hidden_states.device.type == "cuda" and hidden_states.shape[1] == 1 and is_static(cache)

    def prepare(self, layers: nn.ModuleList, cache: Cache, rows: list[slice], masks, cos_sin, hidden_states) -> None:
        """Fill the static inputs of this step (capturing anew when what the graphs were captured on changed)."""
        first = cache.layers[0]
        key = (
            id(layers), len(layers), first.keys.data_ptr(), tuple((r.start, r.stop) for r in rows),
            tuple(None if m is None else tuple(m.shape) for m in masks), hidden_states.dtype,
            layers[0].self_attn.config._attn_implementation,
        )
        if key != self._key:
            self._key, self._graphs, self._pool = key, {}, None
            self._inputs = [
                _Inputs(
                    hidden=torch.empty_like(hidden_states[r]),
                    cos_sin=tuple(torch.empty_like(t) for t in cs),
                    mask=None if mask is None else torch.empty_like(mask),
                    kv_bounds={},
                )
                for r, mask, cs in zip(rows, masks, cos_sin)
            ]
        for inputs, mask, cs in zip(self._inputs, masks, cos_sin):
            for static, value in zip(inputs.cos_sin, cs):
                static.copy_(value)
            if mask is not None:
                inputs.mask.copy_(mask)
            bounds = step_kv_bounds(layers, inputs.mask)
            if bounds.keys() != inputs.kv_bounds.keys():  # first step: these tensors become the static ones
                inputs.kv_bounds = bounds
                continue
            for name, pair in bounds.items():
                for static, value in zip(inputs.kv_bounds[name], pair):
                    static.copy_(value)

    def run(self, layer_idx: int, layer: nn.Module, m: int, hidden_states: torch.Tensor, cache):
        """Micro-batch `m` through layer `layer_idx`'s attention phase: (hidden states, normed, routing)."""
        inputs = self._inputs[m]
        inputs.hidden.copy_(hidden_states)
        entry = self._graphs.get((layer_idx, m))
        if entry is None:
            entry = self._capture(layer, inputs, cache)
            self._graphs[layer_idx, m] = entry
        graph, outputs = entry
        graph.replay()
        return outputs

    def _capture(self, layer: nn.Module, inputs: _Inputs, cache):
        def phase():
            return attention_phase(layer, inputs.hidden, inputs.cos_sin, inputs.mask, cache, **inputs.kv_bounds)

        # Warmed up on a side stream first; this run writes this step's keys and values, as the replay does again.
        graph, outputs = capture_cuda_graph(phase, inputs.hidden.device, self._pool)
        self._pool = graph.pool()
        return graph, outputs
