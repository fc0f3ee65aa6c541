"""CUDA graphs for the FFN half of each decoder layer while decoding eagerly (default `generate()`, dynamic cache).

An uncompiled decode step is bound by the host: it issues a few hundred small kernels per step, and each Triton
launch costs tens of microseconds of Python (docs/performance.md, "model.generate() as users call it"). A decoder
layer's FFN half (`Step3DecoderLayer.ffn_block`: the post-attention norm, the router, the routed and shared experts,
the residual) has the same shapes at every step of a batch; only the attention half reads the growing cache. So the
FFN half is captured once per layer and input shape in a CUDA graph and replayed afterwards: its ~30 launches become
a copy in, one replay and a copy out. A replay runs the kernels the eager call ran on the same inputs, so its result
is bitwise the eager one.

`use_ffn_decode_graphs(Step3DecoderLayer)`, which `step3_hf` runs at import, installs the switch; the graphs are
opt-in (`decode_graphs.ENABLED = True`): on an H100 they moved default `generate()` by -7% to +8% per step
(docs/performance.md), and a block-FP8 FFN's capture failed there. A call is graphed only where the capture stays
true:

- inference on CUDA (no gradient, no autocast, not compiling: compiled generation has CUDA graphs of its own, not
  inside another capture), decode-sized (up to `MAX_DECODE_TOKENS` new tokens per sequence, `MAX_GRAPH_TOKENS` in
  all);
- the FFN is made only of Step-3's own modules with plain linears (a block-FP8 FFN, a peft adapter, which can be
  switched off between calls, or a remote FFN of AFD runs eagerly), on the input's device, with no hooks that would
  have to run (accelerate's device hooks; transformers' output-recording hooks while outputs are being recorded) and
  no `forward` replaced on an instance;
- graphs are kept per input shape, strides, dtype, device and CUDA stream (a graph is replayed only on the stream
  it was made for, so graphs replayed on different streams never share memory); a layer's graphs are all captured
  again when one of the FFN's weights is another tensor than at capture (a module or weight replaced, moved or
  cast) or one of its modules' plain attributes changed (a router's `top_k`); weights changed in place are read as
  they are.

Graphs live as long as their layer. `clear_decode_graphs(model)` frees a model's graphs earlier, e.g. after moving it
off the GPU.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .transformers_attention import MAX_DECODE_TOKENS
from .transformers_experts import MAX_MOE_DECODE_TOKENS

try:  # transformers' switch for its output-recording hooks (private; docs/compatibility.md lists it)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # then any hook keeps the FFN eager
    _active_collector = None

__all__ = [
    "ENABLED",
    "MAX_GRAPH_TOKENS",
    "clear_decode_graphs",
    "ffn_graph_applies",
    "ffn_graphable",
    "use_ffn_decode_graphs",
]

# Opt-in: True replays decode-sized FFN halves from CUDA graphs where `ffn_graph_applies` holds.
ENABLED = False
# Tokens per call up to which the FFN half is graphed: the decode range of the experts kernel.
MAX_GRAPH_TOKENS = MAX_MOE_DECODE_TOKENS
# transformers' output-recording hook: inert unless outputs are being recorded.
_RECORDING_HOOK = "output_capturing_hook"


@dataclass
class _FFNGraph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor
    output: torch.Tensor
    weights: tuple  # what the capture read: each module, each parameter's and buffer's storage, dtype and layout


# layer -> {(shape, strides, dtype, device, stream): _FFNGraph}. Held beside the modules, not in them: a model stays
# deep-copyable and picklable, and its graphs go when it does.
_graphs: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
# One memory pool per device and stream: replays on one stream run one after another, so a graph's temporaries may
# share memory with another's (each graph's input and output stay allocated while it lives). Each pool is held with
# the number of live graphs that use it and forgotten when the last one goes: the allocator refuses (an internal
# assert, then a CUDA random generator left in capture mode) a capture into a pool whose graphs are all gone.
_pools: dict[tuple[torch.device, int], list] = {}


@functools.cache
def _allowed_module_types() -> tuple[type, ...]:
    """What an FFN half may be made of to be graphed: Step-3's modules and plain linears. Block-FP8 modules are left
    out: an FP8 FFN's capture failed on an H100 (tests/step3/test_decode_graphs.py), and a failed capture leaves the
    process's CUDA random generator unusable."""
    from transformers.activations import ACT2CLS

    from ..modeling_step3 import Step3Experts, Step3MLP, Step3RMSNorm, Step3SparseMoeBlock, Step3TopKRouter

    activations = tuple({cls if isinstance(cls, type) else cls[0] for cls in ACT2CLS.values()})
    return (Step3MLP, Step3SparseMoeBlock, Step3TopKRouter, Step3Experts, Step3RMSNorm, *activations)


def _ffn_modules(layer: nn.Module) -> list[nn.Module]:
    return [layer.post_attention_layernorm, *layer.mlp.modules()]


def _hooks_inert(module: nn.Module) -> bool:
    """No hook that a replay would skip: none, or only transformers' output recording while nothing is recorded."""
    if getattr(module, "_hf_hook", None) is not None or module._forward_pre_hooks or module._backward_hooks:
        return False
    if not module._forward_hooks:
        return True
    recording = _active_collector is None or bool(_active_collector.get())
    return not recording and all(getattr(h, "__name__", "") == _RECORDING_HOOK for h in module._forward_hooks.values())


def ffn_graph_applies(layer: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether `layer.ffn_block(hidden_states)` runs from a CUDA graph (see the module docstring)."""
    if not (ENABLED and hidden_states.is_cuda and not torch.is_grad_enabled() and not layer.training):
        return False
    if torch.is_autocast_enabled("cuda"):  # a replay would keep the capture's autocast state
        return False
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False
    if hidden_states.dim() != 3 or hidden_states.shape[1] > MAX_DECODE_TOKENS:
        return False
    if hidden_states.shape[0] * hidden_states.shape[1] > MAX_GRAPH_TOKENS or hidden_states.numel() == 0:
        return False
    return ffn_graphable(layer, hidden_states.device)


def ffn_graphable(layer: nn.Module, device: torch.device) -> bool:
    """Whether a replay of `layer`'s FFN half computes what its eager call would, on `device`: Step-3's own modules
    with plain linears, their weights plain parameters on `device`, and no hook or instance `forward` a replay
    would skip."""
    nn_hooks = nn.modules.module
    if nn_hooks._global_forward_hooks or nn_hooks._global_forward_pre_hooks:
        return False
    allowed = _allowed_module_types()
    for module in _ffn_modules(layer):
        plain_linear = type(module) is nn.Linear  # not a subclass: FP8Linear is one
        if not (plain_linear or isinstance(module, allowed)) or not _hooks_inert(module) or "forward" in vars(module):
            return False
        for param in module.parameters(recurse=False):
            if type(param) is not nn.Parameter or param.device != device:  # a DTensor, an offloaded weight
                return False
        if any(buffer.device != device for buffer in module.buffers(recurse=False)):
            return False
    return True


def _weights(layer: nn.Module) -> tuple:
    modules = _ffn_modules(layer)
    experts_impl = getattr(layer.mlp, "experts", None)
    implementation = getattr(getattr(experts_impl, "config", None), "_experts_implementation", None)
    tensors = (t for m in modules for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    # plain attributes (a router's `top_k`, a norm's epsilon) are baked into the graph like the weights' addresses
    settings = (tuple((k, v) for k, v in vars(m).items() if type(v) in (bool, int, float, str)) for m in modules)
    return (implementation, *(id(m) for m in modules), *settings, *(
        (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in tensors
    ))  # fmt: skip


def _pool(device: torch.device, stream: int) -> list:
    """`[pool handle, live graphs]` of `(device, stream)`, a new pool where none is in use."""
    if (device, stream) not in _pools:
        _pools[device, stream] = [torch.cuda.graph_pool_handle(), 0]
    return _pools[device, stream]


def _release_pool(key: tuple[torch.device, int], record: list) -> None:
    record[1] -= 1
    if record[1] == 0 and _pools.get(key) is record:
        del _pools[key]


def _capture(layer: nn.Module, hidden_states: torch.Tensor, eager, weights: tuple, stream: int) -> _FFNGraph:
    device = hidden_states.device
    with torch.inference_mode(False):  # a normal tensor: later calls outside inference mode copy into it
        inputs = hidden_states.clone()
    # Outside the capture, and outside the `try`: Triton compiles, cuBLAS sets up its workspaces, and an input the
    # eager call refuses (a dtype the weights do not have) is reported as the eager call reports it.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        eager(layer, inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    pool = _pool(device, stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool[0]):
            output = eager(layer, inputs)
    except RuntimeError as err:  # e.g. a kernel that synchronises with the host cannot be captured
        # Not hidden behind an eager fallback: a failed capture can leave the process's CUDA state (its random
        # generator among it) unusable.
        raise RuntimeError(
            f"decode graphs: the FFN half of layer {layer.self_attn.layer_idx} could not be captured in a CUDA "
            f"graph for input {tuple(hidden_states.shape)} ({err}); set "
            "step3_hf.kernels.decode_graphs.ENABLED = False to run it eagerly"
        ) from err
    entry = _FFNGraph(graph, inputs, output, weights)
    pool[1] += 1
    weakref.finalize(entry, _release_pool, (device, stream), pool)
    return entry


def use_ffn_decode_graphs(layer_class: type[nn.Module]) -> None:
    """Make `layer_class.ffn_block` (a decoder layer's FFN half, one tensor in and out) replay a CUDA graph where
    `ffn_graph_applies` holds, and run eagerly elsewhere (idempotent)."""
    if getattr(layer_class.ffn_block, "_eager_ffn_block", None) is not None:
        return
    eager = layer_class.ffn_block

    def ffn_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not ffn_graph_applies(self, hidden_states):
            return eager(self, hidden_states)
        device = hidden_states.device
        with torch.cuda.device(device):  # a replay launches on the current device's stream: the input's
            stream = torch.cuda.current_stream(device).cuda_stream
            graphs = _graphs.setdefault(self, {})
            key = (tuple(hidden_states.shape), hidden_states.stride(), hidden_states.dtype, device, stream)
            weights = _weights(self)
            if graphs and next(iter(graphs.values())).weights != weights:
                graphs.clear()  # every graph of the layer read the old weights; their memory goes back first
            entry = graphs.get(key)
            if entry is None:
                entry = graphs[key] = _capture(self, hidden_states, eager, weights, stream)
            entry.inputs.copy_(hidden_states)
            entry.graph.replay()
            return entry.output.clone()  # the caller's own tensor: the next replay overwrites `entry.output`

    ffn_block._eager_ffn_block = eager
    ffn_block.__doc__ = f"{eager.__doc__} (replayed from a CUDA graph when decoding on CUDA)"
    layer_class.ffn_block = ffn_block


def clear_decode_graphs(model: nn.Module) -> int:
    """Free the CUDA graphs of `model`'s layers; returns how many there were."""
    count = 0
    for module in model.modules():
        count += len(_graphs.pop(module, {}))
    return count
