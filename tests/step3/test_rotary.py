"""The one-launch RoPE of queries and keys against the eager `apply_rotary_pos_emb` (bit for bit) and a float64
rotation by the positions' angles: on CPU through Triton's interpreter, and on CUDA; the installed function's choice
between kernel and eager code; and a tiny Step-3 whose logits and greedy tokens do not change with the kernel.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import importlib

import pytest
import torch
from triton_cases import (
    DEVICES,
    INTERPRETED,
    eager_when_interpreted,
    relative_error,
)

from step3_hf import Step3Config, Step3ForCausalLM, modeling_step3
from step3_hf.kernels import apply_rotary, decode_graphs
from step3_hf.modeling_step3 import Step3RotaryEmbedding
from step3_hf.tiny_checkpoint import TINY_CONFIG

rotary_module = importlib.import_module("step3_hf.kernels.rotary")
eager_rotary = modeling_step3.apply_rotary_pos_emb._eager_function
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
THETA = 10000.0


def rope_tables(head_dim, position_ids, dtype, device):
    """`cos`, `sin` `[B, S, D]` as the model's own rotary embedding returns them."""
    config = Step3Config(**{**TINY_CONFIG, "head_dim": head_dim, "rope_theta": THETA})
    rotary = Step3RotaryEmbedding(config).to(device)
    return rotary(torch.empty(0, dtype=dtype, device=device), position_ids.to(device))


def projected(batch, heads, seq_len, head_dim, dtype, device, generator):
    """A `[B, H, S, D]` transposed view of a `[B, S, H * D]` projection output, as the attention module makes it."""
    x = torch.randn(batch, seq_len, heads * head_dim, generator=generator).to(dtype).to(device)
    return x.view(batch, seq_len, heads, head_dim).transpose(1, 2)


def positions(batch, seq_len, shared):
    """Per-sequence positions (each row starts elsewhere, as after left padding or at different cache lengths), or one
    row shared by the batch."""
    if shared:
        return torch.arange(seq_len)[None] + 5
    return torch.arange(seq_len)[None] + torch.tensor([0, 37, 1000, 4095, 3, 11])[:batch, None]


def reference(x, position_ids):
    """float64 rotation of the pairs (x_i, x_{i + D/2}) by position * theta^(-2i/D)."""
    x = x.double().cpu()
    half = x.shape[-1] // 2
    inv_freq = THETA ** (-torch.arange(0, half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = (position_ids.double()[..., None] * inv_freq)[:, None]  # [B or 1, 1, S, D/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)


def small_case(device, seed):
    """bf16 q `[2, 4, 3, 16]` and k `[2, 1, 3, 16]` as the projections leave them, and per-sequence cos/sin."""
    generator = torch.Generator().manual_seed(seed)
    q = projected(2, 4, 3, 16, torch.bfloat16, device, generator)
    k = projected(2, 1, 3, 16, torch.bfloat16, device, generator)
    cos, sin = rope_tables(16, positions(2, 3, shared=False), torch.bfloat16, device)
    return q, k, cos, sin


def same_layout(out, eager):
    """Equal strides wherever a dimension has more than one element (a size-1 dimension's stride is arbitrary)."""
    return all(a == b for n, a, b in zip(out.shape, out.stride(), eager.stride()) if n > 1)


# (batch, query heads, kv heads, seq_len, head_dim): Step-3's decode shape (64 heads on 1 KV head of 256), prefill
# with several KV heads, a small head_dim whose half is no power of two, a decode batch.
SHAPES = [(1, 64, 1, 1, 256), (3, 4, 2, 5, 16), (2, 8, 1, 7, 64), (4, 6, 3, 1, 10)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("shared_positions", [False, True], ids=["per_sequence", "shared"])
def test_bit_identical_to_the_eager_function(device, dtype, shape, shared_positions):
    batch, q_heads, k_heads, seq_len, head_dim = shape
    generator = torch.Generator().manual_seed(sum(shape))
    q = projected(batch, q_heads, seq_len, head_dim, dtype, device, generator)
    k = projected(batch, k_heads, seq_len, head_dim, dtype, device, generator)
    position_ids = positions(batch, seq_len, shared_positions)
    cos, sin = rope_tables(head_dim, position_ids, dtype, device)
    assert cos.shape == (1 if shared_positions else batch, seq_len, head_dim)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    q_eager, k_eager = eager_rotary(q, k, cos, sin)
    for out, eager, x in ((q_out, q_eager, q), (k_out, k_eager, k)):
        assert out.dtype == eager.dtype == dtype and out.shape == eager.shape
        assert torch.equal(out, eager)
        assert same_layout(out, eager) and out.data_ptr() != x.data_ptr()
        # cos/sin are rounded to dtype before they multiply, so 16-bit results stray by their rounding, not more
        assert relative_error(out.cpu(), reference(x, position_ids)) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_strides_and_mixed_dtypes(device, dtype):
    """Queries and keys cut from one fused projection (not dense), contiguous `[B, H, S, D]`, cos/sin with strides of
    their own, and fp32 tables with 16-bit q/k (promoted to fp32 as torch does)."""
    generator = torch.Generator().manual_seed(1)
    batch, q_heads, k_heads, seq_len, head_dim = 2, 4, 2, 3, 32
    fused = torch.randn(batch, seq_len, (q_heads + 2 * k_heads) * head_dim, generator=generator).to(dtype).to(device)
    q = fused[..., : q_heads * head_dim].view(batch, seq_len, q_heads, head_dim).transpose(1, 2)
    k = fused[..., q_heads * head_dim : (q_heads + k_heads) * head_dim]
    k = k.view(batch, seq_len, k_heads, head_dim).transpose(1, 2)
    position_ids = positions(batch, seq_len, shared=False)
    cos, sin = rope_tables(head_dim, position_ids, dtype, device)
    cases = {
        "fused": (q, k, cos, sin),
        "contiguous": (q.contiguous(), k.contiguous(), cos, sin),
        "strided tables": (q, k, torch.stack([cos, sin], -2)[..., 0, :], torch.stack([sin, cos], -2)[..., 0, :]),
        "fp32 tables": (q, k, *rope_tables(head_dim, position_ids, torch.float32, device)),
    }
    for name, args in cases.items():
        out, eager = apply_rotary(*args), eager_rotary(*args)
        for o, e in zip(out, eager):
            assert o.dtype == e.dtype and torch.equal(o, e), name
    assert apply_rotary(*cases["fp32 tables"])[0].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    q = torch.zeros(0, 4, 1, 16, device=device)
    k = torch.zeros(0, 1, 1, 16, device=device)
    cos = sin = torch.zeros(1, 1, 16, device=device)
    q_out, k_out = apply_rotary(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    q, k, cos, sin = small_case(device, seed=2)
    bad = [
        ((q[0], k, cos, sin), r"q must be \[batch, heads, seq, head_dim\], got shape \(4, 3, 16\)"),
        ((q[..., :15], k[..., :15], cos[..., :15], sin[..., :15]), "head_dim must be even"),
        ((q, k[..., :8], cos, sin), r"k \(2, 1, 3, 8\) does not fit q \(2, 4, 3, 16\)"),
        ((q, k[:1], cos, sin), r"k \(1, 1, 3, 16\) does not fit q"),
        ((q, k, cos[:, :2], sin), r"cos \(2, 2, 16\) does not fit q"),
        ((q, k, cos, sin[..., :8]), r"sin \(2, 3, 8\) does not fit q"),
        ((q, k, cos[0], sin[0]), r"cos \(3, 16\) does not fit q"),
        ((q, k.float(), cos, sin), "q and k must share a dtype"),
        ((q.double(), k.double(), cos, sin), "apply_rotary computes"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            apply_rotary(*args)
    with torch.no_grad(), pytest.raises(ValueError, match=r"cos \(2, 2, 16\) does not fit q"):
        modeling_step3.apply_rotary_pos_emb(q, k, cos[:, :2], sin)  # the installed function reports it too


def test_cpu_without_interpreter_is_refused():
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    q, k = torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        apply_rotary(q, k, torch.ones(1, 1, 8), torch.zeros(1, 1, 8))


def count_kernel_calls(monkeypatch) -> list:
    """Counts calls of the kernel through the module global the installed function calls, so that the eager path
    cannot pass for the kernel."""
    calls = []
    kernel = rotary_module.apply_rotary
    monkeypatch.setattr(rotary_module, "apply_rotary", lambda *a: calls.append(1) or kernel(*a))
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_the_installed_function_takes_the_kernel_for_inference_only(device, monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    q, k, cos, sin = small_case(device, seed=3)
    with torch.no_grad():
        out = modeling_step3.apply_rotary_pos_emb(q, k, cos, sin)
    assert calls == [1]
    q.requires_grad_()
    trained = modeling_step3.apply_rotary_pos_emb(q, k, cos, sin)  # training keeps the eager function's gradients
    assert calls == [1] and trained[0].requires_grad
    trained[0].float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    for a, b in zip(out, trained):
        assert torch.equal(a, b.detach())
    with torch.no_grad():  # a [B, S, H, D] layout (unsqueeze_dim=2) is the eager function's
        modeling_step3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    assert calls == [1]


def test_cpu_tensors_keep_the_eager_function_without_the_interpreter(monkeypatch):
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    monkeypatch.setattr(rotary_module, "apply_rotary", lambda *a: pytest.fail("the kernel was called on CPU"))
    generator = torch.Generator().manual_seed(4)
    q = projected(1, 2, 3, 8, torch.float32, "cpu", generator)
    k = projected(1, 1, 3, 8, torch.float32, "cpu", generator)
    position_ids = positions(1, 3, shared=True)
    cos, sin = rope_tables(8, position_ids, torch.float32, "cpu")
    with torch.no_grad():
        q_out, _ = modeling_step3.apply_rotary_pos_emb(q, k, cos, sin)
    assert relative_error(q_out, reference(q, position_ids)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_the_installed_function_compiles_without_graph_breaks(device):
    q, k, cos, sin = small_case(device, seed=5)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    compiled = torch.compile(modeling_step3.apply_rotary_pos_emb, fullgraph=True, backend=backend)
    with torch.no_grad():
        out = compiled(q, k, cos, sin)
    assert len(graphs) == 1 and "step3_hf.apply_rotary" in graphs[0]
    for a, b in zip(out, eager_rotary(q, k, cos, sin)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_the_op_passes_torch_library_checks(device):
    """The fake (meta) function agrees with the op on shapes, strides and dtypes, and the op traces under AOT
    autograd."""
    generator = torch.Generator().manual_seed(6)
    for dtype, table_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
        q = projected(2, 4, 3, 16, dtype, device, generator)
        k = projected(2, 1, 3, 16, dtype, device, generator)
        cos, sin = rope_tables(16, positions(1, 3, shared=True), table_dtype, device)
        torch.library.opcheck(torch.ops.step3_hf.apply_rotary, (q, k, cos, sin),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_a_tiny_step3_decodes_the_same_with_the_kernel(device, monkeypatch):
    """Logits of a left-padded batch (per-sequence positions, prefill and decode) and greedy tokens equal the eager
    function's, and the kernel ran in every layer of every step."""
    eager_when_interpreted(monkeypatch, "rms_norm", "top_k")
    # a CUDA graph's replay issues the kernel without calling it from Python, which the count below needs
    monkeypatch.setattr(decode_graphs, "ENABLED", False)
    torch.manual_seed(0)
    config = Step3Config(**TINY_CONFIG)
    model = Step3ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(12.0)  # tokens that vary from step to step
    ids = torch.tensor([[0, 0, 1, 17, 33, 90], [1, 8, 9, 10, 77, 5]], device=device)
    mask = (ids != 0).long()
    new_tokens = 5

    def run():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)  # fmt: skip
        return logits, tokens[:, ids.shape[1] :]

    calls = count_kernel_calls(monkeypatch)
    logits, tokens = run()
    assert len(calls) == config.num_hidden_layers * (1 + new_tokens)  # the forward, the prefill, 4 decode steps
    monkeypatch.setattr(modeling_step3, "apply_rotary_pos_emb", eager_rotary)
    eager_logits, eager_tokens = run()
    assert torch.equal(logits, eager_logits)
    assert torch.equal(tokens, eager_tokens) and len(set(tokens.flatten().tolist())) > 3
