"""The stacked q/k/v GEMM (`kernels.fused_qkv`): a fused model's logits equal a float64 recomputation of the published
math and the unfused model's, its parameters keep their names and memory, and training and unstackable layers keep
the three projections."""

import pytest
import torch
from step3_reference import step3_logits
from triton_cases import relative_error
from torch import nn
from transformers import AutoModelForCausalLM

from step3_hf import Step3Config, Step3ForCausalLM
from step3_hf.fp8 import quantize_block_fp8, quantize_model
from step3_hf.kernels.fp8_linear import Step3FP8Linear
from step3_hf.kernels.fused_qkv import fuse_qkv_projections, unfuse_qkv_projections
from step3_hf.modeling_step3 import Step3Attention
from step3_hf.tiny_checkpoint import TINY_CONFIG, random_official_state_dict, write_official_checkpoint

IDS = torch.tensor([[3, 17, 33, 90, 5, 61, 2], [1, 8, 9, 10, 77, 5, 200]])


@pytest.fixture(scope="module", params=[1, 2], ids=["1kv", "2kv"])
def checkpoint(request, tmp_path_factory):
    """(path, config, official state dict) of a tiny fp32 checkpoint with one or two shared KV heads."""
    config = Step3Config(**{**TINY_CONFIG, "num_attention_groups": request.param})
    state = random_official_state_dict(config, seed=request.param)
    return write_official_checkpoint(tmp_path_factory.mktemp("fused_qkv"), state, config), config, state


def load(path) -> Step3ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_fused_logits_equal_float64_and_the_three_projections(checkpoint):
    path, config, state = checkpoint
    model = load(path)
    with torch.no_grad():
        eager = model(input_ids=IDS).logits
    names = set(dict(model.named_parameters()))
    numel = sum(p.numel() for p in model.parameters())
    assert fuse_qkv_projections(model) == config.num_hidden_layers
    attention = model.model.layers[0].self_attn
    stacked = attention.qkv_proj
    calls, q_calls = count_calls(stacked), count_calls(attention.q_proj)
    with torch.no_grad():
        fused = model(input_ids=IDS).logits
    assert len(calls) == 1 and not q_calls  # the stacked GEMM ran, the separate q projection did not
    assert relative_error(fused, step3_logits(state, config, IDS)) < 1e-5
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    # the checkpoint's parameter names, unchanged, now views of the stacked weight: no memory added
    assert set(dict(model.named_parameters())) == names and sum(p.numel() for p in model.parameters()) == numel
    kv_rows = config.num_attention_groups * config.head_dim
    weight = stacked.weight
    for offset, name in ((0, "q_proj"), (config.share_q_dim, "k_proj"), (config.share_q_dim + kv_rows, "v_proj")):
        view = getattr(attention, name).weight
        assert view.data_ptr() == weight.data_ptr() + offset * weight.stride(0) * weight.element_size()
        assert torch.equal(view, state[f"model.layers.0.self_attn.{name}.weight"])


@pytest.mark.parametrize("checkpoint", [1], indirect=True, ids=["1kv"])  # the release's one KV head
def test_generate_after_fusing_gives_the_same_tokens(checkpoint):
    model = load(checkpoint[0])
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(12.0)  # tokens that vary from step to step
    mask = torch.ones_like(IDS)
    mask[0, :2] = 0  # left padding

    def greedy():
        return model.generate(IDS, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[:, IDS.shape[1]:]  # fmt: skip

    expected = greedy()
    fuse_qkv_projections(model)
    calls = count_calls(model.model.layers[1].self_attn.qkv_proj)
    assert torch.equal(greedy(), expected) and len(set(expected.flatten().tolist())) > 3
    assert len(calls) == 6  # the prefill and five decode steps


@pytest.mark.parametrize("checkpoint", [1], indirect=True, ids=["1kv"])
def test_training_takes_the_three_projections(checkpoint):
    model = load(checkpoint[0]).train()
    fuse_qkv_projections(model)
    attention = model.model.layers[0].self_attn
    stacked_calls, k_calls = count_calls(attention.qkv_proj), count_calls(attention.k_proj)
    model(input_ids=IDS).logits.sum().backward()  # the eager path under grad: nothing stacked is differentiated
    assert not stacked_calls and len(k_calls) == 1


def _fp8_linear(out_features, in_features, block, seed):
    generator = torch.Generator().manual_seed(seed)
    weight, scale = quantize_block_fp8(torch.randn(out_features, in_features, generator=generator), block)
    with torch.device("meta"):
        linear = Step3FP8Linear(in_features, out_features, block_size=block)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
    return linear


@pytest.mark.parametrize("q_out, stacks", [(32, True), (24, False)], ids=["whole tiles", "q ends inside a tile"])
def test_fp8_projections_stack_with_their_scales_on_whole_tiles(q_out, stacks):
    block = (16, 16)
    holder = nn.Module()
    holder.q_proj, holder.k_proj, holder.v_proj = (_fp8_linear(n, 48, block, seed) for seed, n in
                                                   enumerate((q_out, 16, 16)))  # fmt: skip
    x = torch.randn(5, 48)
    expected = [holder.q_proj(x), holder.k_proj(x), holder.v_proj(x)]
    assert fuse_qkv_projections(holder) == int(stacks)
    if not stacks:
        assert not hasattr(holder, "qkv_proj")
        return
    assert holder.qkv_proj.weight_scale_inv.shape == (4, 3)
    for got, want in zip(holder.qkv_proj(x).split(holder.qkv_sizes, dim=-1), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_an_fp8_model_fuses_with_its_scales_and_keeps_its_logits(checkpoint):
    """A model quantized to block FP8 in memory (`fp8_decode.py`'s fused columns) stacks each layer's float8
    projections and scales, runs the stacked GEMM, and gives the unfused model's logits."""
    path, config, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", experts_implementation="moe_decode")
    quantize_model(model.eval(), (8, 8))
    with torch.no_grad():
        unfused = model(input_ids=IDS).logits
    assert fuse_qkv_projections(model) == config.num_hidden_layers
    stacked = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(stacked, Step3FP8Linear) and stacked.weight.dtype == torch.float8_e4m3fn
    calls, k_calls = count_calls(stacked), count_calls(model.model.layers[0].self_attn.k_proj)
    with torch.no_grad():
        fused = model(input_ids=IDS).logits
    assert len(calls) == 1 and not k_calls  # the stacked GEMM ran, the separate k projection did not
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_mixed_or_biased_projections_are_left_alone():
    config = Step3Config(**TINY_CONFIG)
    attention = Step3Attention(config, 0)
    attention.k_proj = nn.Linear(config.hidden_size, config.head_dim, bias=True)
    assert fuse_qkv_projections(attention) == 0 and not hasattr(attention, "qkv_proj")


@pytest.mark.parametrize("checkpoint", [1], indirect=True, ids=["1kv"])
def test_unfusing_runs_the_three_projections_again(checkpoint):
    path, config, state = checkpoint
    model = load(path)
    fuse_qkv_projections(model)
    assert unfuse_qkv_projections(model) == config.num_hidden_layers
    attention = model.model.layers[0].self_attn
    q_calls = count_calls(attention.q_proj)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert len(q_calls) == 1 and not hasattr(attention, "qkv_proj")
    assert relative_error(logits, step3_logits(state, config, IDS)) < 1e-5
