"""The plain-weight decode linear against a float64 product, on CPU through Triton's interpreter and on CUDA; and
`DecodeLinear`, the `nn.Linear` that takes it for decode-sized inference calls.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import copy

import pytest
import torch
from torch import nn
from triton_cases import DEVICES, INTERPRETED, relative_error

from step3_hf.kernels import decode_linear as decode_linear_module
from step3_hf.kernels.decode_linear import DecodeLinear, decode_linear, use_decode_linears
from step3_hf.kernels.fp8_decode_linear import DecodeLinearLaunch, decode_linear_launch

# bf16 / fp16: one rounding of the output (the products and sums are fp32); fp32: the sums' order.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def operands(rows, out_features, in_features, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight *= torch.logspace(-1, 1, in_features)[None, :]  # magnitudes that vary along K: a mis-summed split shows
    x = torch.randn(rows, in_features, generator=generator)
    reference = x.double() @ weight.double().T
    return x.to(device, dtype), weight.to(device, dtype), reference


# (rows, out, in): one row, partial tiles in N and K, more rows than one tile, a K of many steps.
SHAPES = [(1, 40, 72), (5, 50, 200), (37, 64, 96), (3, 130, 1280)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_float64_product(device, dtype, shape):
    x, weight, reference = operands(*shape, dtype, device)
    out = decode_linear(x, weight)
    assert out.shape == shape[:2] and out.dtype == dtype
    assert relative_error(out.cpu(), reference) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_every_launch_gives_the_same_product(device):
    """Split reductions, column tiles and row tiles change the order of fp32 sums only."""
    x, weight, reference = operands(20, 96, 1024, torch.float32, device, seed=1)
    default = decode_linear_launch(20, 96, 1024, 128, device)
    assert default.split_k > 1  # a small weight is split to fill the GPU
    for launch in (default, DecodeLinearLaunch(16, 32, 32, 1), DecodeLinearLaunch(32, 64, 16, 5),
                   DecodeLinearLaunch(16, 16, 64, 8, num_warps=2, num_stages=2)):  # fmt: skip
        assert relative_error(decode_linear(x, weight, launch).cpu(), reference) < 1e-5, launch


@pytest.mark.parametrize("device", DEVICES)
def test_bad_operands_are_refused_by_name(device):
    x, weight, _ = operands(4, 16, 32, torch.float32, device)
    with pytest.raises(ValueError, match=r"x \[M, K\] and weight \[N, K\]"):
        decode_linear(x, weight[:, :16])
    with pytest.raises(ValueError, match="share a dtype"):
        decode_linear(x, weight.double())
    with pytest.raises(ValueError, match="block_k 24"):
        decode_linear(x, weight, DecodeLinearLaunch(16, 16, 24, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_linear_module_keeps_nn_linear_and_takes_the_kernel_only_for_decode_inference(device, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48, bias=True), nn.ReLU(), nn.Linear(48, 32, bias=False)).to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 5, 64, device=device, dtype=torch.float64)
    expected = copy.deepcopy(model).double()(x)
    model.to(torch.bfloat16)
    assert use_decode_linears(model) == 2 and use_decode_linears(model) == 0  # only plain nn.Linear, once
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2])) and type(model[0]) is DecodeLinear
    assert model.state_dict().keys() == before.keys()
    calls = []
    kernel = decode_linear_module.decode_linear
    monkeypatch.setattr(decode_linear_module, "decode_linear", lambda *a: calls.append(a[0].shape) or kernel(*a))
    with torch.no_grad():
        out = model(x.to(torch.bfloat16))
    assert calls == [(15, 64), (15, 48)]  # 15 rows: the kernel, the leading dimensions flattened
    assert relative_error(out.double().cpu(), expected.cpu()) < 2e-2
    calls.clear()
    with torch.no_grad():  # above MAX_ROWS: cuBLAS (F.linear)
        model(torch.randn(decode_linear_module.MAX_ROWS + 1, 64, device=device, dtype=torch.bfloat16))
    model(x.to(torch.bfloat16)).sum().backward()  # training: F.linear, with gradients
    assert calls == [] and model[0].weight.grad is not None
    with torch.no_grad():  # no rows: an empty result, as nn.Linear gives
        assert model(torch.empty(0, 5, 64, device=device, dtype=torch.bfloat16)).shape == (0, 5, 32)


@pytest.mark.skipif(INTERPRETED, reason="the CPU without the interpreter: no kernel")
def test_without_a_kernel_device_decode_linear_is_nn_linear():
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    use_decode_linears(layer)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("device", DEVICES)
def test_afd_attention_side_with_decode_linears_generates_what_cublas_does(device, tmp_path, monkeypatch):
    """`decode_linears=True`: the attention layers' q/k/v (stacked), wq and o_proj run through the kernel in every
    micro-batch, and the in-process AFD model generates the tokens and logits it does without."""
    from step3_hf.afd import InProcessConnector, Placement, Step3AFDAttentionForCausalLM, Step3FFNShard
    from step3_hf.afd.checkpoint import CheckpointReader
    from step3_hf.tiny_checkpoint import write_tiny_checkpoint

    reader = CheckpointReader(write_tiny_checkpoint(tmp_path, seed=3))
    shard = Step3FFNShard.from_checkpoint(reader, Placement(1, 1), 0, device=device, dtype=torch.float32)
    calls = []
    kernel = decode_linear_module.decode_linear
    monkeypatch.setattr(decode_linear_module, "decode_linear", lambda *a: calls.append(a[0].shape) or kernel(*a))
    ids = torch.tensor([[1, 17, 33, 90], [1, 8, 9, 10], [1, 5, 6, 7]], device=device)
    outputs = {}
    for decode_linears in (False, True):
        attention = Step3AFDAttentionForCausalLM.from_checkpoint(reader, device=device, dtype=torch.float32,
                                                                 decode_linears=decode_linears)  # fmt: skip
        model = attention.connect(InProcessConnector([shard]), micro_batches=2, wire="raw")
        calls.clear()
        with torch.no_grad():
            outputs[decode_linears] = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                                     eos_token_id=None, output_logits=True,
                                                     return_dict_in_generate=True)  # fmt: skip
        layers = attention.config.num_hidden_layers
        # 3 forwards (the prompt, 2 decode steps) x 2 micro-batches x layers x (q/k/v, wq, o_proj)
        assert len(calls) == (3 * 2 * layers * 3 if decode_linears else 0)
    assert outputs[True].sequences.tolist() == outputs[False].sequences.tolist()
    torch.testing.assert_close(torch.stack(outputs[True].logits), torch.stack(outputs[False].logits), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
