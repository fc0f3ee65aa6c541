"""CUDA graphs of each decoder layer's FFN half while decoding eagerly (`step3_hf.kernels.decode_graphs`).

On CPU: which layers a replay may stand for (the rules that keep it equal to the eager call), and that the graphs
are opt-in. On CUDA (skipped without a GPU), with them switched on: replays give bitwise the eager logits and
tokens, a replaced weight or changed setting is captured again (dropping the layer's stale graphs), another stream,
input layout or inference mode is served right, and calls the graphs must not take (recording router logits,
gradients) run eagerly.
"""

import gc

import pytest
import torch

import step3_hf  # noqa: F401
from step3_hf import Step3Config, Step3ForCausalLM
from step3_hf.kernels import decode_graphs
from step3_hf.modeling_step3 import Step3DecoderLayer
from step3_hf.tiny_checkpoint import TINY_CONFIG

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model(dtype=torch.float32, device="cpu", **overrides) -> Step3ForCausalLM:
    torch.manual_seed(0)
    config = Step3Config(**{**TINY_CONFIG, **overrides})
    return Step3ForCausalLM(config).to(device=device, dtype=dtype).eval()


def test_installed_on_the_decoder_layer_and_off_by_default():
    assert Step3DecoderLayer.ffn_block._eager_ffn_block is not None
    assert decode_graphs.ENABLED is False
    decode_graphs.use_ffn_decode_graphs(Step3DecoderLayer)  # idempotent: the eager method stays the one wrapped
    assert getattr(Step3DecoderLayer.ffn_block._eager_ffn_block, "_eager_ffn_block", None) is None


def test_graphable_layers_are_step3_modules_without_active_hooks():
    model = tiny_model()
    dense, moe = model.model.layers[0], model.model.layers[1]
    cpu = torch.device("cpu")
    assert decode_graphs.ffn_graphable(dense, cpu) and decode_graphs.ffn_graphable(moe, cpu)
    assert not decode_graphs.ffn_graphable(moe, torch.device("meta"))  # weights on another device

    handle = moe.mlp.shared_expert.up_proj.register_forward_pre_hook(lambda module, args: None)
    assert not decode_graphs.ffn_graphable(moe, cpu)  # a replay would skip the hook
    handle.remove()
    assert decode_graphs.ffn_graphable(moe, cpu)
    up = moe.mlp.shared_expert.up_proj
    up.forward = up.forward  # a forward set on the instance (as some wrappers do) could do anything
    assert not decode_graphs.ffn_graphable(moe, cpu)
    del up.forward
    assert decode_graphs.ffn_graphable(moe, cpu)

    # transformers' output-recording hooks are inert until outputs are recorded; recording router logits needs the
    # router to run eagerly.
    from transformers.utils.output_capturing import _active_collector

    model(torch.tensor([[1, 2, 3]]), output_router_logits=True)  # installs the recording hooks
    assert moe.mlp.gate._forward_hooks
    assert decode_graphs.ffn_graphable(moe, cpu)
    token = _active_collector.set({"router_logits": []})
    try:
        assert not decode_graphs.ffn_graphable(moe, cpu)
    finally:
        _active_collector.reset(token)


def test_block_fp8_ffns_stay_eager():
    # An FP8 FFN's capture failed on an H100 (leaving the process's CUDA generator unusable): FP8 modules are eager.
    from step3_hf.fp8 import quantize_model

    model = quantize_model(tiny_model(moe_intermediate_size=32), block_size=(16, 16))
    assert not decode_graphs.ffn_graphable(model.model.layers[0], torch.device("cpu"))  # FP8 dense MLP
    assert not decode_graphs.ffn_graphable(model.model.layers[1], torch.device("cpu"))  # FP8 experts


def test_adapters_and_remote_ffns_stay_eager():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["down_proj"]))
    layer = peft_model.base_model.model.model.layers[0]
    assert not decode_graphs.ffn_graphable(layer, torch.device("cpu"))  # an adapter can be switched off per call

    from step3_hf.afd import RemoteFFN

    config = model.config
    remote = Step3DecoderLayer(config, 1)  # an AFD attention-side layer: its FFN runs in another process
    remote.mlp = RemoteFFN(config, 1)
    assert not decode_graphs.ffn_graphable(remote, torch.device("cpu"))


def test_cpu_calls_run_the_eager_ffn(monkeypatch):
    monkeypatch.setattr(decode_graphs, "ENABLED", True)
    model = tiny_model()
    layer = model.model.layers[1]
    hidden = torch.randn(2, 1, model.config.hidden_size)
    with torch.no_grad():
        assert not decode_graphs.ffn_graph_applies(layer, hidden)
        torch.testing.assert_close(layer.ffn_block(hidden), Step3DecoderLayer.ffn_block._eager_ffn_block(layer, hidden),
                                   rtol=0, atol=0)  # fmt: skip
    assert layer not in decode_graphs._graphs


# ----- CUDA ----------------------------------------------------------------------------------------------------
def decode_logits(model, ids, steps: int):
    """Prefill, then `steps` greedy decode steps on a dynamic cache: the logits of every step."""
    from transformers import DynamicCache

    cache, logits = DynamicCache(config=model.config), []
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, cache=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.fixture
def graphs_on(monkeypatch):
    monkeypatch.setattr(decode_graphs, "ENABLED", True)


@cuda
@pytest.mark.gpu
def test_cuda_replays_equal_the_eager_ffn_bitwise(graphs_on, monkeypatch):
    model = tiny_model(torch.bfloat16, "cuda", hidden_size=128, share_q_dim=128, moe_intermediate_size=128,
                       intermediate_size=256)  # fmt: skip
    ids = torch.randint(3, 256, (3, 7), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    graphed = decode_logits(model, ids, steps=4)
    layers = list(model.model.layers)
    assert all(len(decode_graphs._graphs[layer]) == 1 for layer in layers)  # one capture per layer, then replays
    first = [next(iter(decode_graphs._graphs[layer].values())) for layer in layers]
    decode_logits(model, ids, steps=2)
    assert [next(iter(decode_graphs._graphs[layer].values())) for layer in layers] == first

    monkeypatch.setattr(decode_graphs, "ENABLED", False)
    eager = decode_logits(model, ids, steps=4)
    assert torch.equal(graphed, eager)
    assert decode_graphs.clear_decode_graphs(model) == len(layers)


@cuda
@pytest.mark.gpu
def test_cuda_generate_with_graphs_gives_the_eager_tokens(graphs_on, monkeypatch):
    model = tiny_model(torch.bfloat16, "cuda")
    ids = torch.randint(3, 256, (4, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    graphed = model.generate(ids, **kwargs)
    assert model.model.layers[2] in decode_graphs._graphs
    monkeypatch.setattr(decode_graphs, "ENABLED", False)
    assert torch.equal(graphed, model.generate(ids, **kwargs))


@cuda
@pytest.mark.gpu
def test_cuda_replaced_weight_is_captured_again(graphs_on):
    model = tiny_model(torch.bfloat16, "cuda")
    layer = model.model.layers[1]
    hidden = torch.randn(2, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    other_batch = torch.randn(3, 1, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.ffn_block(other_batch)
        layer.ffn_block(hidden)
        before = set(map(id, decode_graphs._graphs[layer].values()))
        down = layer.mlp.shared_expert.down_proj
        down.weight = torch.nn.Parameter(torch.randn_like(down.weight))
        graphed = layer.ffn_block(hidden)
        # the other batch's graph read the old weight too: it is gone, not kept stale
        assert len(decode_graphs._graphs[layer]) == 1
        assert not before & set(map(id, decode_graphs._graphs[layer].values()))
        eager = Step3DecoderLayer.ffn_block._eager_ffn_block(layer, hidden)
        assert torch.equal(graphed, eager)
        layer.mlp.gate.top_k = 1  # a plain attribute the capture baked in
        graphed = layer.ffn_block(hidden)
        eager_top_1 = Step3DecoderLayer.ffn_block._eager_ffn_block(layer, hidden)
    assert torch.equal(graphed, eager_top_1) and not torch.equal(eager_top_1, eager)


@cuda
@pytest.mark.gpu
def test_cuda_other_streams_and_layouts_get_graphs_of_their_own(graphs_on):
    model = tiny_model(torch.bfloat16, "cuda")
    layer = model.model.layers[1]
    decode_graphs.clear_decode_graphs(model)
    size = model.config.hidden_size
    strided = torch.randn(2, 1, 2 * size, device="cuda", dtype=torch.bfloat16)[..., :size]  # a slice: not dense
    hidden = strided.contiguous()  # same shape and values, other strides
    eager = Step3DecoderLayer.ffn_block._eager_ffn_block
    with torch.inference_mode():  # captured under inference mode, replayed outside it below
        want = eager(layer, hidden)
        assert torch.equal(layer.ffn_block(hidden), want)
    with torch.no_grad():
        assert torch.equal(layer.ffn_block(hidden), want)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = layer.ffn_block(hidden)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(on_side, want)
        assert torch.equal(layer.ffn_block(strided), eager(layer, strided))
    assert len(decode_graphs._graphs[layer]) == 3


@cuda
@pytest.mark.gpu
def test_cuda_calls_graphs_must_not_take_run_eagerly(graphs_on):
    model = tiny_model(torch.bfloat16, "cuda")
    decode_graphs.clear_decode_graphs(model)
    ids = torch.tensor([[1, 5, 9]], device="cuda")
    with torch.no_grad():
        out = model(ids[:, :1], output_router_logits=True)  # one token: decode-sized, but router logits are recorded
    moe_layers = [model.model.layers[i] for i in (1, 2)]  # TINY_CONFIG's MoE layers: their routers record
    assert len(out.router_logits) == 2 and not any(layer in decode_graphs._graphs for layer in moe_layers)
    assert model.model.layers[0] in decode_graphs._graphs  # a dense FFN has nothing to record
    decode_graphs.clear_decode_graphs(model)
    model(ids[:, :1]).logits.sum().backward()  # gradients: eager
    assert not any(layer in decode_graphs._graphs for layer in model.model.layers)


@cuda
@pytest.mark.gpu
def test_cuda_captures_again_after_every_graph_of_a_pool_is_gone(graphs_on):
    # The allocator refuses a capture into a memory pool whose graphs have all been freed: the pool goes with them.
    hidden = torch.randn(2, 1, TINY_CONFIG["hidden_size"], device="cuda", dtype=torch.bfloat16)
    key = (hidden.device, torch.cuda.current_stream().cuda_stream)
    first = tiny_model(torch.bfloat16, "cuda")
    with torch.no_grad():
        first.model.layers[0].ffn_block(hidden)
    assert key in decode_graphs._pools
    for layer in list(decode_graphs._graphs.keys()):  # every model's graphs, this test's and earlier ones'
        decode_graphs._graphs.pop(layer, None)
    gc.collect()
    assert key not in decode_graphs._pools
    second = tiny_model(torch.bfloat16, "cuda")
    with torch.no_grad():
        graphed = second.model.layers[0].ffn_block(hidden)
        eager = Step3DecoderLayer.ffn_block._eager_ffn_block(second.model.layers[0], hidden)
    assert torch.equal(graphed, eager) and decode_graphs._pools[key][1] == 1
