"""The one-launch top-k of Step-3's router against `torch.topk` and the eager `Step3TopKRouter`, bit for bit: on CPU
through Triton's interpreter, and on CUDA; its tie rule, its bf16 rounding, and the installed router's choice
between kernel and eager code.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import importlib

import pytest
import torch
from triton_cases import DEVICES, INTERPRETED

from step3_hf import Step3Config
from step3_hf.kernels import top_k_experts
from step3_hf.modeling_step3 import Step3TopKRouter
from step3_hf.tiny_checkpoint import TINY_CONFIG

router_module = importlib.import_module("step3_hf.kernels.moe_router")


def random_probs(shape, seed):
    """Softmax rows of random logits (fp32: ties among them do not occur at these sizes)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).softmax(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape, top_k", [((64, 48), 3), ((5, 6), 2), ((2, 3, 33), 5), ((4, 1), 1), ((3, 256), 8)])
def test_equals_torch_topk_bit_for_bit(device, dtype, shape, top_k):
    probs = random_probs(shape, seed=top_k)
    weights, index = top_k_experts(probs.to(device), top_k, dtype)
    reference_weights, reference_index = torch.topk(probs, top_k, dim=-1)
    assert index.dtype == torch.long and weights.dtype == dtype and weights.shape == (*shape[:-1], top_k)
    assert torch.equal(index.cpu(), reference_index)
    assert torch.equal(weights.cpu(), reference_weights.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows(device):
    probs = random_probs((6, 2, 48), seed=1)[:, 0]  # rows 96 apart
    weights, index = top_k_experts(probs.to(device), 3, torch.float32)
    reference_weights, reference_index = torch.topk(probs, 3, dim=-1)
    assert torch.equal(index.cpu(), reference_index) and torch.equal(weights.cpu(), reference_weights)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_take_the_lowest_index_first_and_nan_counts_as_largest(device):
    probs = torch.tensor([
        [0.1, 0.3, 0.3, 0.1, 0.2, 0.3],
        [0.25, 0.25, 0.25, 0.25, 0.0, 0.0],
        [0.2, float("nan"), 0.5, 0.3, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    ])  # fmt: skip
    weights, index = top_k_experts(probs.to(device), 4, torch.float32)
    assert index.tolist() == [[1, 2, 5, 4], [0, 1, 2, 3], [1, 2, 3, 0], [5, 0, 1, 2]]
    expected = torch.gather(probs, 1, index.cpu())
    assert torch.equal(weights.cpu().nan_to_num(-1.0), expected.nan_to_num(-1.0))  # the probabilities themselves
    assert torch.isnan(weights[2, 0]) and (weights[3] == torch.tensor([1.0, 0.0, 0.0, 0.0], device=device)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_weights_round_to_nearest_even(device):
    # fp32 values exactly halfway between two bfloat16 (lower 16 bits 0x8000), with an even and an odd upper half,
    # just below and above halfway, and ones that round up into the next binade
    upper = torch.tensor([0x3E80, 0x3E81, 0x3E80, 0x3E80, 0x3F7F, 0x3C23], dtype=torch.int32)
    lower = torch.tensor([0x8000, 0x8000, 0x7FFF, 0x8001, 0xFFFF, 0x8000], dtype=torch.int32)
    values = ((upper << 16) | lower).view(torch.float32)
    probs = torch.cat([values, torch.zeros(2)])[None]
    weights, index = top_k_experts(probs.to(device), values.numel(), torch.bfloat16)
    assert torch.equal(weights.cpu(), torch.gather(probs, 1, index.cpu()).bfloat16())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    probs = random_probs((2, 8), seed=0).to(device)
    with pytest.raises(ValueError, match="float32 probabilities"):
        top_k_experts(probs.bfloat16(), 2, torch.bfloat16)
    with pytest.raises(ValueError, match="casts the weights to"):
        top_k_experts(probs, 2, torch.float16)
    with pytest.raises(ValueError, match="top_k 9 of 8"):
        top_k_experts(probs, 9, torch.float32)
    with pytest.raises(ValueError, match="router_probs must be \\[..., E\\] probabilities, got a 0-d tensor"):
        top_k_experts(probs[0, 0], 1, torch.float32)


def test_cpu_without_interpreter_is_refused():
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        top_k_experts(random_probs((2, 8), seed=0), 2, torch.float32)


def tiny_router(device, dtype, **config):
    router = Step3TopKRouter(Step3Config(**{**TINY_CONFIG, "moe_num_experts": 48, "moe_top_k": 3, **config}))
    with torch.no_grad():
        router.weight.normal_(generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(7, router.hidden_dim, generator=torch.Generator().manual_seed(1))
    return router.to(device=device, dtype=dtype), hidden.to(device=device, dtype=dtype)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Calls that reach the kernel, counted through the module global, so that the eager path cannot pass for it."""
    calls = []
    kernel = router_module.top_k_experts
    monkeypatch.setattr(router_module, "top_k_experts", lambda *a: calls.append(1) or kernel(*a))
    return calls


def eager_router(router, hidden):
    """`Step3TopKRouter.forward` with the eager selection."""
    logits = torch.nn.functional.linear(hidden, router.weight)
    probs = torch.softmax(logits, dtype=torch.float32, dim=-1)
    return logits, *Step3TopKRouter.select_experts._eager_select_experts(router, probs, hidden.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_installed_router_takes_the_kernel_for_inference_only(device, dtype, kernel_calls):
    router, hidden = tiny_router(device, dtype)
    with torch.no_grad():
        logits, weights, index = router(hidden)
        reference = eager_router(router, hidden)
    assert kernel_calls == [1]
    for ours, eager in zip((logits, weights, index), reference):
        assert ours.dtype == eager.dtype and torch.equal(ours, eager)
    trained = router(hidden)  # the weight requires grad: training keeps the eager code, whose gradients flow
    assert kernel_calls == [1] and trained[1].requires_grad
    assert torch.equal(trained[1].detach(), weights) and torch.equal(trained[2], index)


@pytest.mark.parametrize("device", DEVICES)
def test_renormalised_and_float16_routers_keep_the_eager_selection(device, kernel_calls):
    router, hidden = tiny_router(device, torch.float32, norm_expert_weight=True)
    with torch.no_grad():
        _, weights, index = router(hidden)
        _, reference_weights, reference_index = eager_router(router, hidden)
    assert kernel_calls == []
    assert torch.equal(weights, reference_weights) and torch.equal(index, reference_index)
    torch.testing.assert_close(weights.sum(-1), torch.ones(7, device=device))  # renormalised
    router, hidden = tiny_router(device, torch.float16)
    with torch.no_grad():
        router(hidden)
    assert kernel_calls == []


def test_cpu_tensors_keep_the_eager_selection_without_the_interpreter(monkeypatch):
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    monkeypatch.setattr(router_module, "top_k_experts", lambda *a: pytest.fail("the kernel was called on CPU"))
    router, hidden = tiny_router("cpu", torch.float32)
    with torch.no_grad():
        _, weights, index = router(hidden)
    reference_weights, reference_index = torch.topk(torch.softmax(hidden @ router.weight.T, -1), 3, dim=-1)
    assert torch.equal(index, reference_index)
    torch.testing.assert_close(weights, reference_weights)


@pytest.mark.parametrize("device", DEVICES)
def test_the_installed_router_compiles_without_graph_breaks_and_the_op_passes_checks(device):
    router, hidden = tiny_router(device, torch.bfloat16)
    router.requires_grad_(False)
    compiled = torch.compile(router, fullgraph=True, backend="eager")
    for ours, eager in zip(compiled(hidden), eager_router(router, hidden)):
        assert torch.equal(ours, eager)
    probs = random_probs((2, 3, 48), seed=2).to(device)
    for dtype in (torch.bfloat16, torch.float32):
        torch.library.opcheck(torch.ops.step3_hf.top_k_experts, (probs, 3, dtype),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
