"""CUDA graphs of each decoder layer's work around its attention in eager decoding (`step3_hf.kernels.decode_graphs`).

On CPU: which layers a replay may stand for (the rules that keep it equal to the eager call), that a layer's record
notices every change a capture baked in, and that CPU calls stay eager. On CUDA (skipped without a GPU): replays give
bitwise the eager logits and tokens, on the dynamic and the static cache; a replaced weight or changed setting is
captured again (dropping the layer's stale graphs), another stream, input layout or inference mode is served right,
each layer keeps at most `MAX_SHAPES_PER_LAYER` shapes, and calls the graphs must not take (recording router
logits, gradients) run eagerly.
"""

import contextlib
import copy
import gc

import pytest
import torch

import step3_hf  # noqa: F401
from step3_hf import Step3Config, Step3ForCausalLM
from step3_hf.kernels import decode_graphs
from step3_hf.kernels.cuda_graph_capture import CudaGraphCaptureError, capture_cuda_graph
from step3_hf.modeling_step3 import Step3DecoderLayer
from step3_hf.tiny_checkpoint import TINY_CONFIG

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CPU = torch.device("cpu")


def tiny_model(dtype=torch.float32, device="cpu", **overrides) -> Step3ForCausalLM:
    torch.manual_seed(0)
    config = Step3Config(**{**TINY_CONFIG, **overrides})
    model = Step3ForCausalLM(config).to(device=device, dtype=dtype).eval()
    if device == "cpu":  # CUDA's default, moe_decode, captures; CPU's default, grouped_mm, may not (below)
        model.set_experts_implementation("batched_mm")
    return model


def eager_forward(layer, *args, **kwargs):
    return Step3DecoderLayer.forward._eager_forward(layer, *args, **kwargs)


def test_installed_on_the_decoder_layer_and_on_by_default():
    assert Step3DecoderLayer.forward._eager_forward is not None
    assert decode_graphs.ENABLED is True
    decode_graphs.use_decode_graphs(Step3DecoderLayer)  # idempotent: the eager method stays the one wrapped
    assert getattr(Step3DecoderLayer.forward._eager_forward, "_eager_forward", None) is None


def test_graphable_layers_are_step3_modules_without_hooks_a_replay_would_skip():
    model = tiny_model()
    dense, moe = model.model.layers[0], model.model.layers[1]
    assert decode_graphs.layer_graphable(dense, CPU) and decode_graphs.layer_graphable(moe, CPU)
    assert not decode_graphs.layer_graphable(moe, torch.device("meta"))  # weights on another device

    for module in (moe.mlp.shared_expert.up_proj, moe.self_attn.k_proj, moe.input_layernorm):
        handle = module.register_forward_pre_hook(lambda module, args: None)
        assert not decode_graphs.layer_graphable(moe, CPU)  # a replay would skip the hook
        handle.remove()
        assert decode_graphs.layer_graphable(moe, CPU)
    up = moe.mlp.shared_expert.up_proj
    up.forward = up.forward  # a forward set on the instance (as some wrappers do) could do anything
    assert not decode_graphs.layer_graphable(moe, CPU)
    del up.forward
    assert decode_graphs.layer_graphable(moe, CPU)

    # transformers' output-recording hooks are inert until outputs are recorded; recording router logits (or
    # attentions) needs those modules to run eagerly, which the record tells per call.
    from transformers.utils.output_capturing import _active_collector

    model(torch.tensor([[1, 2, 3]]), output_router_logits=True)  # installs the recording hooks
    assert moe.mlp.gate._forward_hooks
    record = decode_graphs._record(moe, CPU)
    assert record.graphable and record.recording_hooks and not decode_graphs._recording()
    token = _active_collector.set({"router_logits": []})
    try:
        assert decode_graphs._recording()
    finally:
        _active_collector.reset(token)


def test_a_layer_record_notices_every_change_a_capture_baked_in():
    model = tiny_model()
    layer = model.model.layers[1]

    def changed(change) -> bool:
        record = decode_graphs._record(layer, CPU)
        assert decode_graphs._record(layer, CPU) is record  # nothing changed: the same record, graphs kept
        change()
        return decode_graphs._record(layer, CPU) is not record

    down = layer.mlp.shared_expert.down_proj
    assert changed(lambda: setattr(down, "weight", torch.nn.Parameter(down.weight.detach().clone())))
    wq = layer.self_attn.wq
    assert changed(lambda: setattr(wq.weight, "data", wq.weight.data.clone()))  # what `.to()` does in place
    assert changed(lambda: setattr(layer.mlp.gate, "top_k", 1))  # a plain attribute
    o_proj = layer.self_attn.o_proj
    assert changed(lambda: setattr(layer.self_attn, "o_proj", torch.nn.Linear(o_proj.in_features, o_proj.out_features)))
    handle = None

    def add_hook():
        nonlocal handle
        handle = layer.post_attention_layernorm.register_forward_hook(lambda *args: None)

    assert changed(add_hook)
    assert changed(handle.remove)
    top_k = layer.mlp.gate.top_k
    assert changed(lambda: delattr(layer.mlp.gate, "top_k"))  # an attribute gone
    assert changed(lambda: setattr(layer.mlp.gate, "top_k", top_k))
    assert changed(lambda: setattr(layer.mlp.gate, "jitter", 0.1))  # an attribute added
    assert changed(lambda: setattr(layer, "mlp", copy.deepcopy(layer.mlp)))  # a direct child of the layer replaced
    assert changed(lambda: setattr(layer, "input_layernorm", copy.deepcopy(layer.input_layernorm)))

    # The same submodule object never goes unnoticed through a reused `id`: replaced twice between two calls.
    record = decode_graphs._record(layer, CPU)
    for _ in range(2):
        layer.self_attn.o_proj = torch.nn.Linear(o_proj.in_features, o_proj.out_features)
    assert decode_graphs._record(layer, CPU) is not record

    # Forward calls themselves change nothing a capture baked in (or every step would capture again).
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        model(ids, output_router_logits=True)  # installs transformers' recording hooks: one change
        record = decode_graphs._record(layer, CPU)
        for _ in range(3):
            model(ids)
            model(ids, output_router_logits=True)
    assert decode_graphs._record(layer, CPU) is record


def test_only_experts_implementations_that_capture_are_graphed():
    model = tiny_model()
    layer = model.model.layers[1]
    assert decode_graphs._record(layer, CPU).graphable
    for implementation, graphable in (("eager", False), ("grouped_mm", False), ("batched_mm", True)):
        model.set_experts_implementation(implementation)  # a config setting: the record is taken again
        assert decode_graphs._record(layer, CPU).graphable is graphable, implementation
    assert decode_graphs.layer_graphable(model.model.layers[0], CPU)  # a dense layer has no experts


def test_a_step_copies_its_rope_tables_in_once_for_all_layers():
    cos, sin = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    positions = decode_graphs._PositionInputs(cos, sin)
    assert torch.equal(positions.cos, cos) and positions.cos is not cos

    def copied(new_cos, new_sin) -> bool:
        positions.cos.fill_(0)  # a marker: a load that copies overwrites it
        positions.load(new_cos, new_sin)
        return not bool((positions.cos == 0).all())

    assert not copied(cos, sin)  # the next layers of the same step: nothing to copy
    assert copied(cos.clone(), sin)  # the next step's tables
    cos = cos.clone()
    positions.load(cos, sin)
    cos.mul_(2)  # changed in place since
    assert copied(cos, sin) and torch.equal(positions.cos, cos)
    with torch.inference_mode():  # no version counter: copied every time
        frozen_cos, frozen_sin = cos.clone(), sin.clone()
    assert copied(frozen_cos, frozen_sin) and copied(frozen_cos, frozen_sin)


def test_a_step_folds_its_mask_once_for_all_layers(monkeypatch):
    # Every layer of a step gets the same mask; the decode kernel's bounds of it are folded by the first layer that
    # reads it and reused by the others (`decode_kv_bounds` runs the fold kernel, which needs a GPU: counted here).
    folds = []
    monkeypatch.setattr(decode_graphs, "decode_kv_bounds", lambda mask: folds.append(mask) or (mask.sum(), mask.sum()))
    model = tiny_model()
    model.config._attn_implementation = "mfa_decode"
    first, second = model.model.layers[:2]
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    bounds = decode_graphs._kv_bounds(first, mask)
    assert list(bounds) == ["decode_kv_bounds"] and len(folds) == 1
    assert decode_graphs._kv_bounds(second, mask) == bounds and len(folds) == 1  # the next layers of the same step
    decode_graphs._kv_bounds(first, mask.clone())  # the next step's mask
    assert len(folds) == 2
    mask[1, ..., 0] = False  # changed in place since
    assert decode_graphs._kv_bounds(first, mask)["decode_kv_bounds"][0] == 9 and len(folds) == 3
    with torch.inference_mode():  # no version counter: folded every time
        frozen = mask.clone()
    decode_graphs._kv_bounds(first, frozen), decode_graphs._kv_bounds(second, frozen)
    assert len(folds) == 5
    assert decode_graphs._kv_bounds(first, None) == {}
    model.config._attn_implementation = "sdpa"  # another attention implementation reads no bounds
    assert decode_graphs._kv_bounds(first, mask.clone()) == {} and len(folds) == 5


def test_block_fp8_layers_stay_eager():
    # An FP8 FFN's capture failed on an H100 (leaving the process's CUDA generator unusable): FP8 modules are eager.
    from step3_hf.fp8 import quantize_model

    model = quantize_model(tiny_model(moe_intermediate_size=32), block_size=(16, 16))
    assert not decode_graphs.layer_graphable(model.model.layers[0], CPU)  # FP8 dense MLP and attention
    assert not decode_graphs.layer_graphable(model.model.layers[1], CPU)  # FP8 experts


def test_adapters_and_remote_ffns_stay_eager():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    for target in ("down_proj", "wq"):
        peft_model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=[target]))
        layer = peft_model.base_model.model.model.layers[0]
        assert not decode_graphs.layer_graphable(layer, CPU)  # an adapter can be switched off per call

    from step3_hf.afd import RemoteFFN

    config = tiny_model().config
    remote = Step3DecoderLayer(config, 1)  # an AFD attention-side layer: its FFN runs in another process
    remote.mlp = RemoteFFN(config, 1)
    assert not decode_graphs.layer_graphable(remote, CPU)


def test_cpu_calls_run_eagerly():
    model = tiny_model()
    layer = model.model.layers[1]
    hidden = torch.randn(2, 1, model.config.hidden_size)
    decode_graphs.clear_decode_graphs(model)
    with torch.no_grad():
        assert not decode_graphs.decode_graph_applies(layer, hidden)
        model(torch.tensor([[1]]))  # decode-sized
    assert layer not in decode_graphs._records  # not even looked at: CPU calls stop at the first check


def test_a_capture_allocates_its_cublas_workspace_in_its_pool(monkeypatch):
    """cuBLAS's workspaces are cleared after the eager warm-up and before the capture, so that the capture allocates
    its own inside the graph's pool, and again after it, also when the capture fails (see cuda_graph_capture.py).
    On CPU: torch.cuda's stream and graph calls are recorded instead of run."""
    events = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def recorded(name):
        events.append(f"{name} begins")
        yield
        events.append(f"{name} ends")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: recorded("eager"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None, stream=None: recorded("capture"))
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: events.append("clear"), raising=False)

    capture_cuda_graph(lambda: events.append("run"), torch.device("cuda"))
    assert events == ["eager begins", "run", "eager ends", "clear", "capture begins", "run", "capture ends", "clear"]

    events.clear()
    calls = []

    def fails_when_captured():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(CudaGraphCaptureError, match="not permitted when stream is capturing"):
        capture_cuda_graph(fails_when_captured, torch.device("cuda"))
    assert events[-2:] == ["capture begins", "clear"]


# ----- CUDA ----------------------------------------------------------------------------------------------------
def decode_logits(model, ids, steps: int, cache=None):
    """Prefill, then `steps` greedy decode steps (on a new dynamic cache unless given one): every step's logits."""
    from transformers import DynamicCache

    cache, logits = cache if cache is not None else DynamicCache(config=model.config), []
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, cache=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1)


def graphs_of(layer) -> list:
    record = decode_graphs._records.get(layer)
    return list(record.graphs.values()) if record is not None else []


def layer_call(model, layer, hidden):
    """`layer(hidden)` for one new token per row, without a cache, as `Step3Model` calls it."""
    positions = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    position_embeddings = model.model.rotary_emb(hidden, position_ids=positions)
    return layer(hidden, position_embeddings=position_embeddings, attention_mask=None)


def eager_layer_call(model, layer, hidden):
    positions = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    position_embeddings = model.model.rotary_emb(hidden, position_ids=positions)
    return eager_forward(layer, hidden, position_embeddings, None)


@cuda
@pytest.mark.gpu
def test_cuda_replays_equal_the_eager_layers_bitwise(monkeypatch):
    model = tiny_model(torch.bfloat16, "cuda", hidden_size=128, share_q_dim=128, moe_intermediate_size=128,
                       intermediate_size=256)  # fmt: skip
    ids = torch.randint(3, 256, (3, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    graphed = decode_logits(model, ids, steps=4)
    layers = list(model.model.layers)
    assert all(len(graphs_of(layer)) == 1 for layer in layers)  # one capture per layer, then replays
    first = [graphs_of(layer)[0] for layer in layers]
    decode_logits(model, ids, steps=2)
    assert [graphs_of(layer)[0] for layer in layers] == first

    monkeypatch.setattr(decode_graphs, "ENABLED", False)
    eager = decode_logits(model, ids, steps=4)
    assert torch.equal(graphed, eager)
    assert decode_graphs.clear_decode_graphs(model) == len(layers)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cuda_generate_with_graphs_gives_the_eager_tokens(cache, monkeypatch):
    from transformers import StaticCache

    model = tiny_model(torch.bfloat16, "cuda")
    ids = torch.randint(3, 256, (4, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate():
        if cache == "dynamic":
            return model.generate(ids, **kwargs)
        # uncompiled: compiled decoding keeps its own graphs and never enters these
        static = StaticCache(config=model.config, max_cache_len=32)
        return model.generate(ids, past_key_values=static, disable_compile=True, **kwargs)

    decode_graphs.clear_decode_graphs(model)
    graphed = generate()
    assert len(graphs_of(model.model.layers[2])) == 1
    monkeypatch.setattr(decode_graphs, "ENABLED", False)
    assert torch.equal(graphed, generate())


@cuda
@pytest.mark.gpu
def test_cuda_graphs_outlive_cleared_cublas_workspaces(monkeypatch):
    """torch.compile's CUDA graph trees (compiled static-cache `generate()`) free cuBLAS's workspaces. Graphs that
    had baked in an eager call's workspace then wrote into freed memory: an illegal memory access on an H100 at
    Step-3 widths. Here: captured graphs, the workspaces freed and their memory handed out again, then a compiled
    static-cache `generate()` between two default ones; the replays' tokens are the eager ones and the memory handed
    out is left alone."""
    model = tiny_model(torch.bfloat16, "cuda", hidden_size=512, share_q_dim=512, moe_intermediate_size=512,
                       intermediate_size=1024)  # fmt: skip
    ids = torch.randint(3, 256, (8, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    decode_graphs.clear_decode_graphs(model)
    with torch.no_grad():
        graphed = model.generate(ids, **kwargs)
        assert all(len(graphs_of(layer)) == 1 for layer in model.model.layers)
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        filler = torch.full((64, 1024, 1024), 7.0, device="cuda", dtype=torch.bfloat16)  # takes the freed memory
        assert torch.equal(model.generate(ids, **kwargs), graphed)
        torch.cuda.synchronize()
        assert bool((filler == 7.0).all()), "a replay wrote into memory it no longer owned"
        del filler
        model.generate(ids, cache_implementation="static", **kwargs)  # compiled, under CUDA graph trees
        torch.cuda.empty_cache()
        after_compile = model.generate(ids, **kwargs)
        monkeypatch.setattr(decode_graphs, "ENABLED", False)
        eager = model.generate(ids, **kwargs)
    assert torch.equal(graphed, eager) and torch.equal(after_compile, eager)


@cuda
@pytest.mark.gpu
def test_cuda_captured_matmuls_leave_freed_cublas_workspaces_alone():
    """The capture's clears at their root: matmuls at Step-3 widths and decode rows (reductions cuBLAS splits through
    its workspace) captured; then the workspaces freed, as torch.compile's graph trees free them, their memory given
    back to the driver and handed out again to buffers that fill the GPU. The replays give the eager products and
    leave those buffers alone."""
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(5)
    shapes = [(16, 7168, 2048), (16, 16384, 7168), (64, 7168, 256)]  # (rows, K, N): q_proj (low rank), o_proj, k_proj
    operands = [(torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=generator),
                 torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=generator)) for rows, k, n in shapes]
    eager = [x @ w.T for x, w in operands]
    captured = [capture_cuda_graph(lambda x=x, w=w: x @ w.T, device) for x, w in operands]
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    chunk = 32 << 20
    free, _ = torch.cuda.mem_get_info(device)
    fillers = [torch.full((chunk,), 7, dtype=torch.uint8, device=device) for _ in range((free - (2 << 30)) // chunk)]
    assert fillers, f"{free} bytes free: too few to hand the freed workspaces out again"
    for graph, _ in captured:
        graph.replay()
    torch.cuda.synchronize()
    for (_, out), expected in zip(captured, eager):
        torch.testing.assert_close(out, expected)
    assert all(bool((filler == 7).all()) for filler in fillers), "a replay wrote into memory it no longer owned"
    del fillers
    torch.cuda.empty_cache()


@cuda
@pytest.mark.gpu
def test_cuda_replaced_weight_is_captured_again():
    model = tiny_model(torch.bfloat16, "cuda")
    layer = model.model.layers[1]
    hidden = torch.randn(2, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    other_batch = torch.randn(3, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer_call(model, layer, other_batch)
        layer_call(model, layer, hidden)
        before = set(map(id, graphs_of(layer)))
        assert len(before) == 2
        down = layer.mlp.shared_expert.down_proj
        down.weight = torch.nn.Parameter(torch.randn_like(down.weight))
        graphed = layer_call(model, layer, hidden)
        # the other batch's graphs read the old weight too: they are gone, not kept stale
        assert len(graphs_of(layer)) == 1 and not before & set(map(id, graphs_of(layer)))
        eager = eager_layer_call(model, layer, hidden)
        assert torch.equal(graphed, eager)
        layer.mlp.gate.top_k = 1  # a plain attribute the capture baked in
        graphed = layer_call(model, layer, hidden)
        eager_top_1 = eager_layer_call(model, layer, hidden)
    assert torch.equal(graphed, eager_top_1) and not torch.equal(eager_top_1, eager)


@cuda
@pytest.mark.gpu
def test_cuda_other_streams_layouts_and_shapes_get_graphs_of_their_own(monkeypatch):
    model = tiny_model(torch.bfloat16, "cuda")
    layer = model.model.layers[1]
    decode_graphs.clear_decode_graphs(model)
    size = model.config.hidden_size
    strided = torch.randn(2, 1, 2 * size, device="cuda", dtype=torch.bfloat16)[..., :size]  # a slice: not dense
    hidden = strided.contiguous()  # same shape and values, other strides
    with torch.inference_mode():  # captured under inference mode, replayed outside it below
        want = eager_layer_call(model, layer, hidden)
        assert torch.equal(layer_call(model, layer, hidden), want)
    with torch.no_grad():
        assert torch.equal(layer_call(model, layer, hidden), want)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = layer_call(model, layer, hidden)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(on_side, want)
        assert torch.equal(layer_call(model, layer, strided), eager_layer_call(model, layer, strided))
        assert len(graphs_of(layer)) == 3

        monkeypatch.setattr(decode_graphs, "MAX_SHAPES_PER_LAYER", 2)  # the least recently used shapes go
        batches = [torch.randn(rows, 1, size, device="cuda", dtype=torch.bfloat16) for rows in (3, 4)]
        for batch in batches:
            assert torch.equal(layer_call(model, layer, batch), eager_layer_call(model, layer, batch))
    assert [entry.hidden.shape[0] for entry in graphs_of(layer)] == [3, 4]


@cuda
@pytest.mark.gpu
def test_cuda_calls_graphs_must_not_take_run_eagerly():
    model = tiny_model(torch.bfloat16, "cuda")
    decode_graphs.clear_decode_graphs(model)
    ids = torch.tensor([[1, 5, 9]], device="cuda")
    with torch.no_grad():
        out = model(ids[:, :1], output_router_logits=True)  # one token: decode-sized, but router logits are recorded
    # Recording installs transformers' hooks on every layer's attention and router: while outputs are recorded,
    # no layer is replayed; once nothing is recorded, the same hooks are inert and the layers are graphed.
    assert len(out.router_logits) == 2 and not any(graphs_of(layer) for layer in model.model.layers)
    with torch.no_grad():
        model(ids[:, :1])
    assert all(graphs_of(layer) for layer in model.model.layers)
    decode_graphs.clear_decode_graphs(model)
    model(ids[:, :1]).logits.sum().backward()  # gradients: eager
    assert not any(graphs_of(layer) for layer in model.model.layers)


@cuda
@pytest.mark.gpu
def test_cuda_captures_again_after_every_graph_of_a_pool_is_gone():
    # The allocator refuses a capture into a memory pool whose graphs have all been freed: the pool goes with them.
    hidden = torch.randn(2, 1, TINY_CONFIG["hidden_size"], device="cuda", dtype=torch.bfloat16)
    key = (hidden.device, torch.cuda.current_stream().cuda_stream)
    first = tiny_model(torch.bfloat16, "cuda")
    with torch.no_grad():
        layer_call(first, first.model.layers[0], hidden)
    assert key in decode_graphs._pools
    for layer in list(decode_graphs._records.keys()):  # every model's graphs, this test's and earlier ones'
        decode_graphs._records.pop(layer, None)
    gc.collect()
    assert key not in decode_graphs._pools
    second = tiny_model(torch.bfloat16, "cuda")
    with torch.no_grad():
        graphed = layer_call(second, second.model.layers[0], hidden)
        eager = eager_layer_call(second, second.model.layers[0], hidden)
    assert torch.equal(graphed, eager) and decode_graphs._pools[key][1] == 2  # the layer's two graphs
