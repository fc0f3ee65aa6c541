"""The fused-MoE decode kernel against a float64 loop over tokens and choices: on CPU through Triton's interpreter,
and on CUDA; its transformers dispatcher (`experts_implementation="moe_decode"`) and its hand-offs to grouped_mm.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from triton_cases import (
    DEVICES,
    HAS_CUDA,
    INTERPRETED,
    dequantized_activations,
    eager_when_interpreted,
    relative_error,
)

from step3_hf import Step3Config
from step3_hf.kernels import MOE_DECODE_EXPERTS, align_pairs_to_blocks, moe_decode
from step3_hf.kernels.moe_decode import PREFILL_LAUNCH, default_launch
from step3_hf.kernels.moe_decode import align_pairs_to_blocks_torch
from step3_hf.modeling_step3 import Step3Experts, Step3ForCausalLM
from step3_hf.tiny_checkpoint import TINY_CONFIG

# The transformers hookup, whose module globals the dispatcher tests count calls through.
experts_module = importlib.import_module("step3_hf.kernels.transformers_experts")
moe_decode_module = importlib.import_module("step3_hf.kernels.moe_decode")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference_experts(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """float64, one (token, choice) at a time: `sum_k w * down @ (silu(gate @ x) * (up @ x))`."""
    inter = down_proj.shape[-1]
    out = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    for token in range(hidden.shape[0]):
        x = hidden[token].double()
        for k in range(top_k_index.shape[1]):
            expert = int(top_k_index[token, k])
            projected = gate_up_proj[expert].double() @ x
            activated = F.silu(projected[:inter]) * projected[inter:]
            out[token] += top_k_weights[token, k].double() * (down_proj[expert].double() @ activated)
    return out


def skewed_routing(num_tokens, num_experts, top_k, generator):
    """Expert 0 in every token (rows beyond one 16-row block), expert 1 in exactly one token, the last expert in
    none, the other choices spread over the rest (repeated across tokens, distinct within a token)."""
    index = torch.empty(num_tokens, top_k, dtype=torch.long)
    for token in range(num_tokens):
        rest = torch.randperm(num_experts - 3, generator=generator)[: top_k - 1] + 2
        index[token] = torch.cat([torch.tensor([0]), rest])
    index[num_tokens // 2, 1] = 1
    return index


def random_experts(num_tokens, hidden, inter, num_experts, top_k, dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=generator) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=generator) * inter**-0.5
    index = skewed_routing(num_tokens, num_experts, top_k, generator)
    weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1  # distinct, so mis-weighting shows
    tensors = [t.to(device=device, dtype=dtype) for t in (x, weights, gate_up, down)]
    return tensors[0], index.to(device), *tensors[1:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_m, block_k", [(None, 128), (16, 16)])
def test_kernel_matches_float64_loop(device, dtype, block_m, block_k):
    # 20 tokens x top-3 over 8 experts: expert 0 has 20 rows (crosses a 16-row block), expert 1 one row, expert 7
    # none. hidden 48 with block_k 128 takes the masked reduction tail, with 16 the unmasked one; inter 24 is not a
    # multiple of block_n.
    x, index, weights, gate_up, down = random_experts(20, 48, 24, 8, 3, dtype, device, seed=1)
    out = moe_decode(x, index, weights, gate_up, down, block_m=block_m, block_n=16, block_k=block_k)
    ref = reference_experts(x, index, weights, gate_up, down)
    assert out.dtype == dtype and out.shape == x.shape
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_routing_weights_scale_each_choice(device):
    # Doubling one choice's weight adds exactly that choice's contribution once more.
    x, index, weights, gate_up, down = random_experts(4, 32, 16, 6, 2, torch.float32, device, seed=2)
    base = moe_decode(x, index, weights, gate_up, down)
    doubled = weights.clone()
    doubled[:, 1] *= 2
    only_second = moe_decode(x, index, weights * torch.tensor([0.0, 1.0], device=device), gate_up, down)
    torch.testing.assert_close(moe_decode(x, index, doubled, gate_up, down), base + only_second)


def test_alignment_sorts_every_pair_into_blocks_of_one_expert():
    generator = torch.Generator().manual_seed(0)
    expert_ids = skewed_routing(40, 8, 3, generator).reshape(-1)  # expert 0: 40 rows, expert 7: none
    block_m = 16
    sorted_pair_ids, block_expert = align_pairs_to_blocks(expert_ids, 8, block_m)
    num_pairs = expert_ids.numel()
    real = sorted_pair_ids[sorted_pair_ids < num_pairs].long()
    assert sorted(real.tolist()) == list(range(num_pairs))  # each pair once, the rest is the sentinel
    assert (sorted_pair_ids[sorted_pair_ids >= num_pairs] == num_pairs).all()
    blocks = sorted_pair_ids.view(-1, block_m).long()
    used = 0
    for block, expert in zip(blocks, block_expert.tolist()):
        pairs = block[block < num_pairs]
        if expert == 8:  # past the last expert: nothing to do
            assert pairs.numel() == 0
            continue
        used += 1
        assert pairs.numel() > 0 and (expert_ids[pairs] == expert).all()
    counts = torch.bincount(expert_ids, minlength=8)
    assert used == int(((counts + block_m - 1) // block_m).sum())  # 40 rows of expert 0 take 3 blocks


def alignment_case(case, generator):
    """`(expert_ids, num_experts)` of the alignment's adversarial cases."""
    if case == "random":  # 64 tokens x top-3 over 48 experts, as at decode
        return torch.randint(0, 48, (192,), generator=generator), 48
    if case == "all_to_one":  # one expert's rows cross several blocks, every other expert empty
        return torch.full((150,), 5), 8
    if case == "every_expert":  # each expert hit, unevenly
        return torch.cat([torch.arange(8).repeat(3), torch.randint(0, 8, (37,), generator=generator)]), 8
    if case == "more_experts_than_pairs":
        return torch.randint(0, 64, (5,), generator=generator), 64
    if case == "one_pair":
        return torch.tensor([2]), 4
    if case == "expert_parallel":  # pairs routed to other ranks carry the sentinel id E of E + 1 buckets
        ids = torch.randint(0, 4, (60,), generator=generator)
        return torch.where(torch.rand(60, generator=generator) < 0.4, 4, ids), 5
    if case == "int32_many_chunks":  # int32 ids, more pairs than one chunk of the kernel's walk holds
        return torch.randint(0, 48, (1500,), generator=generator, dtype=torch.int32), 48
    raise ValueError(case)


ALIGNMENT_CASES = ["random", "all_to_one", "every_expert", "more_experts_than_pairs", "one_pair", "expert_parallel",
                   "int32_many_chunks"]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ALIGNMENT_CASES)
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_one_launch_alignment_equals_the_torch_ops(device, case, block_m):
    """The kernel's arrays, bit for bit those of the stable sort and scatters (the order within an expert
    included), which the test above checks for what they mean."""
    expert_ids, num_experts = alignment_case(case, torch.Generator().manual_seed(block_m))
    sorted_pair_ids, block_expert = torch.ops.step3_hf.align_pairs_to_blocks(expert_ids.to(device), num_experts,
                                                                             block_m)  # fmt: skip
    reference = align_pairs_to_blocks_torch(expert_ids, num_experts, block_m)
    assert sorted_pair_ids.dtype == block_expert.dtype == torch.int32
    assert torch.equal(sorted_pair_ids.cpu(), reference[0]) and torch.equal(block_expert.cpu(), reference[1])


@pytest.mark.parametrize("device", DEVICES)
def test_alignment_takes_the_kernel_at_decode_sizes_only(device, monkeypatch):
    calls = []
    torch_ops = moe_decode_module.align_pairs_to_blocks_torch
    monkeypatch.setattr(moe_decode_module, "align_pairs_to_blocks_torch", lambda *a: calls.append(1) or torch_ops(*a))
    expert_ids = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(0)).to(device)
    fused = align_pairs_to_blocks(expert_ids, 8, 16)
    assert calls == []
    monkeypatch.setattr(moe_decode_module, "MAX_FUSED_ALIGN_PAIRS", 39)
    unfused = align_pairs_to_blocks(expert_ids, 8, 16)
    assert calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused))


@pytest.mark.parametrize("device", DEVICES)
def test_alignment_op_passes_torch_library_checks_and_compiles(device):
    expert_ids = torch.randint(0, 8, (30,), generator=torch.Generator().manual_seed(1)).to(device)
    torch.library.opcheck(torch.ops.step3_hf.align_pairs_to_blocks, (expert_ids, 8, 16),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))  # fmt: skip
    compiled = torch.compile(align_pairs_to_blocks, fullgraph=True, backend="eager")
    reference = align_pairs_to_blocks_torch(expert_ids.cpu(), 8, 16)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(compiled(expert_ids, 8, 16), reference))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_raise_clear_errors(device):
    x, index, weights, gate_up, down = random_experts(3, 32, 16, 4, 2, torch.float32, device, seed=3)
    with pytest.raises(ValueError, match="SiLU"):
        moe_decode(x, index, weights, gate_up, down, activation="gelu")
    with pytest.raises(ValueError, match="do not fit hidden size"):
        moe_decode(x, index, weights, gate_up, down[:, :16])
    with pytest.raises(ValueError, match="must both be"):
        moe_decode(x, index[:2], weights, gate_up, down)
    with pytest.raises(ValueError, match="integer"):
        moe_decode(x, index.float(), weights, gate_up, down)
    with pytest.raises(ValueError, match="share one of"):
        moe_decode(x.bfloat16(), index, weights, gate_up, down)
    with pytest.raises(ValueError, match="block_m"):
        moe_decode(x, index, weights, gate_up, down, block_m=48)
    with pytest.raises(ValueError, match=r"gate_up_proj \(0, 32, 32\) holds no experts"):
        moe_decode(x, index, weights, gate_up[:0], down[:0])


def test_cpu_without_interpreter_is_refused():
    if INTERPRETED:
        pytest.skip("the interpreter runs CPU tensors")
    x, index, weights, gate_up, down = random_experts(3, 32, 16, 4, 2, torch.float32, "cpu", seed=3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        moe_decode(x, index, weights, gate_up, down)


@pytest.fixture
def path_calls(monkeypatch):
    """Counts the calls that reach the kernel and those handed to grouped_mm, so that a silent hand-off cannot
    pass for the kernel."""
    calls = {"kernel": 0, "grouped_mm": 0}
    kernel, grouped = experts_module.moe_decode, experts_module.grouped_mm_experts_forward

    def counted_kernel(*args, **kwargs):
        calls["kernel"] += 1
        return kernel(*args, **kwargs)

    def counted_grouped(*args, **kwargs):
        calls["grouped_mm"] += 1
        return grouped(*args, **kwargs)

    monkeypatch.setattr(experts_module, "moe_decode", counted_kernel)
    monkeypatch.setattr(experts_module, "grouped_mm_experts_forward", counted_grouped)
    return calls


def tiny_experts(device):
    config = Step3Config(**TINY_CONFIG)
    config._experts_implementation = MOE_DECODE_EXPERTS
    experts = Step3Experts(config).to(device)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.2)
        experts.down_proj.normal_(std=0.2)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, config.hidden_size, generator=generator).to(device)
    index = skewed_routing(6, config.moe_num_experts, config.moe_top_k, generator).to(device)
    weights = torch.rand(6, config.moe_top_k, generator=generator).to(device)
    return experts, x, index, weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, path", [("no_grad", "kernel"), ("grad", "grouped_mm"), ("many_tokens", "grouped_mm")])
def test_dispatcher_takes_the_kernel_for_decode_inference_only(device, case, path, path_calls, monkeypatch):
    experts, x, index, weights = tiny_experts(device)
    if case == "many_tokens":
        monkeypatch.setattr(experts_module, "MAX_MOE_DECODE_TOKENS", x.shape[0] - 1)
    with torch.set_grad_enabled(case == "grad"):
        out = experts(x, index, weights)
    reference = reference_experts(x, index, weights, experts.gate_up_proj.detach(), experts.down_proj.detach())
    assert path_calls == {"kernel": int(path == "kernel"), "grouped_mm": int(path == "grouped_mm")}
    assert out.requires_grad == (case == "grad")
    assert relative_error(out.detach(), reference) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_long_inference_calls_run_grouped_mm_in_bounded_slices(device, path_calls, monkeypatch):
    # A prefill beyond MAX_GROUPED_MM_TOKENS runs in slices (bounded temporaries) with the same result; a training
    # call stays whole.
    experts, x, index, weights = tiny_experts(device)
    monkeypatch.setattr(experts_module, "MAX_MOE_DECODE_TOKENS", 0)
    monkeypatch.setattr(experts_module, "MAX_GROUPED_MM_TOKENS", 4)
    with torch.no_grad():
        sliced = experts(x, index, weights)
    assert path_calls == {"kernel": 0, "grouped_mm": 2}  # 6 tokens: 4 + 2
    reference = reference_experts(x, index, weights, experts.gate_up_proj.detach(), experts.down_proj.detach())
    assert relative_error(sliced, reference) < 1e-5
    with torch.enable_grad():
        whole = experts(x.requires_grad_(), index, weights)
    assert path_calls["grouped_mm"] == 3
    torch.testing.assert_close(whole.detach(), sliced, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatcher_hands_unsupported_activations_to_grouped_mm(device, path_calls):
    # Step3Config only accepts SiLU; a config changed after validation stands for another model's experts.
    experts, x, index, weights = tiny_experts(device)
    experts.config.hidden_act = "gelu"
    with torch.no_grad():
        out = experts(x, index, weights)
        config = experts.config
        config._experts_implementation = "eager"
        reference = experts(x, index, weights)
    assert path_calls == {"kernel": 0, "grouped_mm": 1}
    torch.testing.assert_close(out, reference)


def test_step3_defaults_to_moe_decode_where_the_kernel_is_preferred(monkeypatch):
    from step3_hf.kernels import defaults

    monkeypatch.setattr(defaults, "decode_kernel_preferred", lambda: False)  # as on a CPU-only machine
    assert Step3ForCausalLM(Step3Config(**TINY_CONFIG)).config._experts_implementation == "grouped_mm"
    monkeypatch.setattr(defaults, "decode_kernel_preferred", lambda: True)
    assert Step3ForCausalLM(Step3Config(**TINY_CONFIG)).config._experts_implementation == MOE_DECODE_EXPERTS
    for requested in ("grouped_mm", "eager"):
        config = Step3Config(**TINY_CONFIG)
        config._experts_implementation = requested
        assert Step3ForCausalLM(config).config._experts_implementation == requested


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from step3_hf.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("moe_decode"), seed=5)


@pytest.mark.parametrize("device", DEVICES)
def test_generate_matches_grouped_mm(checkpoint, device, path_calls, monkeypatch):
    from transformers import AutoModelForCausalLM

    eager_when_interpreted(monkeypatch, "rms_norm", "rotary", "top_k")

    ids = torch.tensor([[1, 17, 33, 90, 4, 5], [1, 8, 9, 10, 77, 200]], device=device)
    outputs = {}
    for experts in (MOE_DECODE_EXPERTS, "grouped_mm"):
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint, attn_implementation="sdpa", experts_implementation=experts, dtype=torch.float32
        )
        model = model.to(device).eval()
        with torch.no_grad():  # larger weights, so that greedy continuations vary from token to token
            for p in model.parameters():
                if p.ndim > 1:
                    p.mul_(4.0)
        outputs[experts] = model.generate(
            ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
        )
    assert path_calls["kernel"] > 0  # prefill and every decode step of both MoE layers
    ours, theirs = outputs[MOE_DECODE_EXPERTS], outputs["grouped_mm"]
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=1e-4, atol=1e-4)


# Step-3's released widths on the GPU: 7168 hidden, 5120 per expert, 48 experts, top-3.
STEP3_WIDTHS = dict(hidden=7168, inter=5120, num_experts=48, top_k=3)


@pytest.fixture(scope="module")
def step3_expert_weights():
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter, num_experts = STEP3_WIDTHS["hidden"], STEP3_WIDTHS["inter"], STEP3_WIDTHS["num_experts"]
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
    down = torch.randn(num_experts, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=generator)
    return gate_up.mul_(hidden**-0.5), down.mul_(inter**-0.5)


def random_decode_batch(batch, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, STEP3_WIDTHS["hidden"], device="cuda", generator=generator).bfloat16()
    logits = torch.randn(batch, STEP3_WIDTHS["num_experts"], device="cuda", generator=generator)
    weights, index = logits.softmax(-1).topk(STEP3_WIDTHS["top_k"], dim=-1)
    return x, index, weights.bfloat16()


def reference_by_expert(x, index, weights, gate_up, down):
    """float64 per expert (the per-token loop is too slow at these widths), on the GPU."""
    inter = down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for expert in range(gate_up.shape[0]):
        token, k = torch.where(index == expert)
        if token.numel() == 0:
            continue
        projected = x[token].double() @ gate_up[expert].double().T
        activated = F.silu(projected[:, :inter]) * projected[:, inter:]
        out.index_add_(0, token, weights[token, k, None].double() * (activated @ down[expert].double().T))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_step3_widths_match_float64_on_gpu(batch, step3_expert_weights):
    gate_up, down = step3_expert_weights
    x, index, weights = random_decode_batch(batch, seed=batch)
    out = moe_decode(x, index, weights, gate_up, down)
    assert relative_error(out, reference_by_expert(x, index, weights, gate_up, down)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_capture_without_host_syncs(step3_expert_weights):
    gate_up, down = step3_expert_weights
    x, index, weights = random_decode_batch(64, seed=1)
    with torch.no_grad():
        moe_decode(x, index, weights, gate_up, down)  # warm-up: compilation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the call raises
        try:
            moe_decode(x, index, weights, gate_up, down)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            moe_decode(x, index, weights, gate_up, down)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe_decode(x, index, weights, gate_up, down)
        new_x, new_index, new_weights = random_decode_batch(64, seed=2)  # another routing, replayed
        x.copy_(new_x)
        index.copy_(new_index)
        weights.copy_(new_weights)
        graph.replay()
        torch.cuda.synchronize()
    reference = reference_by_expert(new_x, new_index, new_weights, gate_up, down)
    assert relative_error(out, reference) < 1e-2


# ------------------------------------------------------------------------------------------------ block-FP8 experts


def fp8_experts(hidden, inter, num_experts, block_size, device, seed):
    """Random experts quantized to block FP8, and the same weights dequantized in float64 (the reference's)."""
    from step3_hf.fp8 import dequantize_block_fp8, quantize_block_fp8

    _, _, _, gate_up, down = random_experts(2, hidden, inter, num_experts, 2, torch.float32, "cpu", seed)
    quantized = [quantize_block_fp8(w, block_size) for w in (gate_up, down)]
    exact = [dequantize_block_fp8(q, s, block_size, torch.float64) for q, s in quantized]
    on_device = [(q.to(device), s.to(device)) for q, s in quantized]
    return on_device, exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_weights_match_the_dequantized_float64_loop(device, dtype):
    # hidden 72 with 16 x 16 tiles: a partial tile column in gate_up and a masked K tail; 20 tokens x top-3 over 8
    # experts, one expert's rows crossing a 16-row block.
    block = (16, 16)
    ((gate_up, gate_up_scale), (down, down_scale)), (gate_up_ref, down_ref) = fp8_experts(72, 32, 8, block, device, 3)
    x, index, weights, _, _ = random_experts(20, 72, 32, 8, 3, dtype, device, seed=4)
    out = moe_decode(x, index, weights, gate_up, down, gate_up_scale=gate_up_scale, down_scale=down_scale,
                     block_size=block, block_n=16)  # fmt: skip
    ref = reference_experts(x.double(), index, weights.double(), gate_up_ref.to(device), down_ref.to(device))
    assert out.dtype == dtype and relative_error(out, ref) < TOLERANCE[dtype]


def reference_float8_activations(x, index, weights, gate_up, down, dtype):
    """float64 of `quantize_activations`: the tokens rounded to e4m3 per row and 128 columns, each pair's
    intermediate activation rounded to `dtype` (as the kernel stores it) and then to e4m3 the same way."""
    inter = down.shape[-1]
    tokens = dequantized_activations(x)
    pairs = [(token, k, int(index[token, k])) for token in range(x.shape[0]) for k in range(index.shape[1])]
    activated = torch.stack([F.silu(p[:inter]) * p[inter:] for p in (gate_up[e] @ tokens[t] for t, _, e in pairs)])
    activated = dequantized_activations(activated.to(dtype))
    out = torch.zeros(tokens.shape, dtype=torch.float64)
    for (token, k, expert), row in zip(pairs, activated):
        out[token] += weights[token, k].double().cpu() * (down[expert] @ row)
    return out


# fp32 on CUDA: the float8 MMA's sums (`FLOAT8_MMA_FP32_TOLERANCE`) move the few intermediate values near an e4m3
# rounding boundary across it, a whole e4m3 step each (H100, 2026-12-07: 1.2e-3 with the prefill launch).
A8_TOLERANCE = {torch.float32: 1e-5 if INTERPRETED else 5e-3, torch.bfloat16: TOLERANCE[torch.bfloat16]}
# (hidden, intermediate, scale tiles, launch): the decode launch, 16-row blocks with 32-deep steps in 128-wide
# tiles launched expert blocks first, and the prefill launch (64-row blocks, 8 warps).
A8_CASES = {"decode": (256, 128, (32, 64), {}),
            "16 rows, 32 deep": (128, 256, (128, 128), dict(block_m=16, block_k=32, expert_blocks_first=True)),
            "prefill": (256, 128, (64, 128), dict(PREFILL_LAUNCH))}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", A8_CASES)
def test_fp8_float8_activations_match_the_float64_loop_of_the_rounded_operands(device, dtype, case):
    """`quantize_activations`: the float64 loop over the rounded tokens and intermediate activations and the
    dequantized weights; and that the rounding really happened (the weight-only loop differs by e4m3's precision).
    20 tokens x top-3 over 8 experts, expert 0 in every token (two 16-row blocks), rows and groups of different
    magnitudes."""
    hidden, inter, block, launch = A8_CASES[case]
    ((gate_up, gate_up_scale), (down, down_scale)), (gate_up_ref, down_ref) = fp8_experts(hidden, inter, 8, block,
                                                                                          device, 21)  # fmt: skip
    x, index, weights, _, _ = random_experts(20, hidden, inter, 8, 3, dtype, device, seed=22)
    # Rows and 128-column groups 100x apart in size, so that a scale read from the wrong row or group shows.
    spread = torch.logspace(-1, 1, 20)[:, None] * torch.logspace(1, -1, hidden // 128).repeat_interleave(128)
    x = x * spread.to(x)
    out = moe_decode(x, index, weights, gate_up, down, gate_up_scale=gate_up_scale, down_scale=down_scale,
                     block_size=block, quantize_activations=True, **launch)  # fmt: skip
    ref = reference_float8_activations(x, index.cpu(), weights, gate_up_ref, down_ref, dtype)
    weight_only = reference_experts(x.double().cpu(), index.cpu(), weights.double().cpu(), gate_up_ref, down_ref)
    assert 1e-3 < relative_error(ref, weight_only) < 0.1
    assert out.dtype == dtype and relative_error(out.cpu(), ref) < A8_TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_float8_activations_refuse_what_they_cannot_compute(device):
    ((gate_up, gate_up_scale), (down, down_scale)), _ = fp8_experts(192, 128, 4, (64, 64), device, 23)
    x, index, weights, bf16_gate_up, bf16_down = random_experts(3, 192, 128, 4, 2, torch.float32, device, seed=23)
    with pytest.raises(ValueError, match="multiples of 128.*got FP8 weights, hidden 192, intermediate 128"):
        moe_decode(x, index, weights, gate_up, down, gate_up_scale=gate_up_scale, down_scale=down_scale,
                   block_size=(64, 64), quantize_activations=True)  # fmt: skip
    with pytest.raises(ValueError, match="needs block-FP8 weights.*got torch.float32 weights"):
        moe_decode(x, index, weights, bf16_gate_up, bf16_down, quantize_activations=True)
    ((gate_up, gate_up_scale), (down, down_scale)), _ = fp8_experts(256, 128, 4, (64, 64), device, 24)
    x, index, weights, _, _ = random_experts(3, 256, 128, 4, 2, torch.float32, device, seed=24)
    with pytest.raises(ValueError, match="steps of 32 to 128 columns; .* steps of 16"):
        moe_decode(x, index, weights, gate_up, down, gate_up_scale=gate_up_scale, down_scale=down_scale,
                   block_size=(64, 64), quantize_activations=True, block_k=16)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_bad_arguments_raise_clear_errors(device):
    ((gate_up, gate_up_scale), (down, down_scale)), _ = fp8_experts(48, 32, 4, (16, 16), device, 15)
    x, index, weights, _, _ = random_experts(3, 48, 32, 4, 2, torch.float32, device, seed=15)

    def call(gate_up_scale=gate_up_scale, down_scale=down_scale, block_size=(16, 16), gate_up=gate_up):
        return moe_decode(x, index, weights, gate_up, down, gate_up_scale=gate_up_scale, down_scale=down_scale,
                          block_size=block_size)  # fmt: skip

    with pytest.raises(ValueError, match="need gate_up_scale, down_scale and block_size together"):
        call(down_scale=None)
    with pytest.raises(ValueError, match="float8_e4m3fn, got torch.float32"):
        call(gate_up=gate_up.float())
    with pytest.raises(ValueError, match=r"`gate_up_scale` must be float32 \(4, 4, 3\) for blocks \[16, 16\]"):
        call(gate_up_scale=gate_up_scale[:, :, :2])
    with pytest.raises(ValueError, match="`down_scale` must be float32"):
        call(down_scale=down_scale.double())
    with pytest.raises(ValueError, match="split inside a scale tile: intermediate 32 % 24"):
        call(torch.ones(4, 3, 3, device=device), torch.ones(4, 2, 2, device=device), (24, 16))
    with pytest.raises(ValueError, match=r"block_k 24 \(capped to the scale tile width 24\) must divide it"):
        call(torch.ones(4, 4, 2, device=device), torch.ones(4, 3, 2, device=device), (16, 24))


def fp8_experts_module(device, num_tokens, hidden=64, inter=32, block=(16, 16)):
    """transformers' own `FP8Experts` (by default hidden 64, 6 experts of 32, top-2, 16 x 16 tiles) with
    `experts_implementation="moe_decode"`, a routed batch, its float64 reference and the dequantized float64 weights
    `(gate_up, down)` it comes from."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    config = Step3Config(**{**TINY_CONFIG, "moe_intermediate_size": inter, "hidden_size": hidden})
    config._experts_implementation = MOE_DECODE_EXPERTS
    cls = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)
    experts = cls(config=config, block_size=block).to(device)
    ((gate_up, gate_up_scale), (down, down_scale)), (gate_up_ref, down_ref) = fp8_experts(hidden, inter, 6, block,
                                                                                          device, 5)  # fmt: skip
    with torch.no_grad():
        for name, value in (("gate_up_proj", gate_up), ("gate_up_proj_scale_inv", gate_up_scale),
                            ("down_proj", down), ("down_proj_scale_inv", down_scale)):  # fmt: skip
            getattr(experts, name).data = value
    x, index, weights, _, _ = random_experts(num_tokens, hidden, inter, 6, 2, torch.float32, device, seed=6)
    dequantized = (gate_up_ref.to(device), down_ref.to(device))
    return experts, x, index, weights, reference_experts(x.double(), index, weights.double(), *dequantized), dequantized


@pytest.fixture
def kernel_calls(monkeypatch):
    """The `moe_decode` calls the dispatcher makes (the number of tokens of each)."""
    calls = []
    kernel = experts_module.moe_decode

    def counted(hidden_states, *args, **kwargs):
        calls.append(hidden_states.shape[0])
        return kernel(hidden_states, *args, **kwargs)

    monkeypatch.setattr(experts_module, "moe_decode", counted)
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_experts_module_dispatches_to_the_kernel_and_by_expert(device, kernel_calls):
    """Decode calls take the kernel, calls with a gradient go expert by expert; both equal the dequantized float64
    reference."""
    experts, x, index, weights, ref, _ = fp8_experts_module(device, num_tokens=6)
    with torch.no_grad():
        decoded = experts(x, index, weights)
    by_expert = experts(x.requires_grad_(), index, weights)
    assert kernel_calls == [6]  # only the no-grad call took the kernel
    assert experts_module.fp8_experts_path(experts, x, 2).startswith("expert by expert")
    assert relative_error(decoded, ref) < 1e-5 and relative_error(by_expert.detach(), ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_experts_round_activations_only_when_asked_and_able(device, monkeypatch):
    """`EXPERTS_ACTIVATIONS_FP8` has the module's kernel calls round their activations where the widths allow it
    (hidden and intermediate 128, 32 x 64 tiles), bit for bit the direct call's product; 64-wide experts, and every
    call while it is off, stay weight-only."""
    asked = []
    kernel = experts_module.moe_decode

    def recorded(*args, **kwargs):
        asked.append(kwargs["quantize_activations"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(experts_module, "moe_decode", recorded)
    widths = {True: dict(hidden=128, inter=128, block=(32, 64)), False: dict(hidden=64, inter=32, block=(16, 16))}
    for flag in (False, True):
        monkeypatch.setattr(experts_module, "EXPERTS_ACTIVATIONS_FP8", flag)
        for able, sizes in widths.items():
            experts, x, index, weights, _, _ = fp8_experts_module(device, num_tokens=5, **sizes)
            asked.clear()
            with torch.no_grad():
                out = experts(x, index, weights)
            assert asked == [flag and able], (flag, able)
            expected = kernel(x, index, weights, experts.gate_up_proj, experts.down_proj,
                              gate_up_scale=experts.gate_up_proj_scale_inv, down_scale=experts.down_proj_scale_inv,
                              block_size=experts.block_size, quantize_activations=flag and able)  # fmt: skip
            assert torch.equal(out, expected), (flag, able)
            path = experts_module.fp8_experts_path(experts, x, 2)
            assert ("float8 activations" in path) == (flag and able), path
    experts.block_size = None  # transformers allows it: `moe_decode`'s clear error, not a TypeError on the way
    with pytest.raises(ValueError, match="need gate_up_scale, down_scale and block_size together"), torch.no_grad():
        experts(x, index, weights)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_experts_module_with_a_routing_gradient_goes_by_expert(device, kernel_calls):
    """The kernel has no backward: a call whose routing weights alone need a gradient goes expert by expert, and the
    gradient reaches them (d sum(out) / d w[t, k] is the sum of that choice's expert output); there a negative
    (another rank's) id adds nothing, as in the kernel."""
    experts, x, index, weights, ref, dequantized = fp8_experts_module(device, num_tokens=6)
    experts.requires_grad_(False)  # frozen float8 weights (no gradient accumulates into float8)
    weights = weights.clone().requires_grad_()
    out = experts(x, index, weights)
    out.sum().backward()
    assert kernel_calls == [] and relative_error(out.detach(), ref) < 1e-5
    ones = torch.ones(6, 1, dtype=torch.float64, device=device)
    for k in range(index.shape[1]):
        choice = reference_experts(x.double(), index[:, k : k + 1], ones, *dequantized)
        torch.testing.assert_close(weights.grad[:, k].double(), choice.sum(-1), rtol=1e-4, atol=1e-5)
    elsewhere = torch.zeros_like(index, dtype=torch.bool)
    elsewhere[::2, 1] = True
    out = experts(x, index.masked_fill(elsewhere, -1), weights)
    local = reference_experts(x.double(), index, weights.detach().double() * ~elsewhere, *dequantized)
    assert kernel_calls == [] and relative_error(out.detach(), local) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_experts_with_a_clamped_gate_go_by_expert(device, kernel_calls):
    """The kernel computes plain SwiGLU: an `FP8Experts` whose gate is clamped (`swiglu_limit`) runs expert by
    expert, whose `_apply_gate` clamps, and equals the float64 loop with the clamps."""
    experts, x, index, weights, _, (gate_up, down) = fp8_experts_module(device, num_tokens=6)
    experts.limit = limit = 0.05
    assert "`limit=0.05`" in experts_module._fp8_layout_unsupported(experts)
    with torch.no_grad():
        out = experts(x, index, weights)
    assert kernel_calls == []
    ref = torch.zeros(x.shape, dtype=torch.float64, device=device)
    for token in range(x.shape[0]):
        for k in range(index.shape[1]):
            gate, up = (gate_up[index[token, k]] @ x[token].double()).chunk(2)
            activated = F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
            ref[token] += weights[token, k].double() * (down[index[token, k]] @ activated)
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_prefill_takes_the_kernel_in_token_slices(device, kernel_calls, monkeypatch):
    """A prefill-sized FP8 call (beyond the bf16 decode limit and beyond the slice size) runs the kernel on slices of
    at most `MAX_FP8_EXPERTS_TOKENS` tokens; the result equals the float64 reference and one unsliced call."""
    experts, x, index, weights, ref, _ = fp8_experts_module(device, num_tokens=24)
    monkeypatch.setattr(experts_module, "MAX_MOE_DECODE_TOKENS", 4)  # the bf16 hand-off to grouped_mm: not for FP8
    monkeypatch.setattr(experts_module, "MAX_FP8_EXPERTS_TOKENS", 10)
    with torch.no_grad():
        path = experts_module.fp8_experts_path(experts, x, 2)
        assert "moe_decode on the float8 weights, float32 activations, 3 call(s)" in path
        sliced = experts(x, index, weights)
        assert kernel_calls == [10, 10, 4]
        monkeypatch.setattr(experts_module, "MAX_FP8_EXPERTS_TOKENS", 24)
        whole = experts(x, index, weights)
    assert kernel_calls[3:] == [24]
    assert sliced.shape == x.shape and relative_error(sliced, ref) < 1e-5
    # Each token's rows see the same launch (16-row blocks at these sizes) and the same products: equal up to the
    # order in which a BLAS sums a tile's products (a few float32 ulps; 2.4e-7 on an AMD EPYC under the interpreter).
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)


def random_top_k(num_tokens, num_experts, top_k, generator):
    """Distinct experts per token, uniformly drawn: about `num_tokens * top_k / num_experts` rows per expert."""
    return torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("block_m", [16, 32, 64, 128])  # the decode launches', the prefill one's, the sweep's
def test_every_block_m_matches_float64(device, fp8, block_m):
    # 150 tokens x top-3 over 8 experts: expert 0 in every token (150 rows: two blocks of 128, three of 64, ten of
    # 16), expert 1 in one token, expert 7 in none. hidden 72 over 16 x 16 tiles: a partial scale column and a masked
    # K tail at block_k 64.
    block = (16, 16)
    ((gate_up, gate_up_scale), (down, down_scale)), (gate_up_ref, down_ref) = fp8_experts(72, 32, 8, block, device, 9)
    x, index, weights, _, _ = random_experts(150, 72, 32, 8, 3, torch.float32, device, seed=10)
    quantized = dict(gate_up_scale=gate_up_scale, down_scale=down_scale, block_size=block) if fp8 else {}
    if not fp8:
        gate_up, down = gate_up_ref.float().to(device), down_ref.float().to(device)
    block_k = 16 if fp8 else 64
    out = moe_decode(x, index, weights, gate_up, down, block_m=block_m, block_n=32, block_k=block_k, **quantized)
    ref = reference_experts(x.double(), index, weights.double(), gate_up_ref.to(device), down_ref.to(device))
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True])
def test_prefill_sized_calls_take_the_prefill_launch(device, fp8):
    """Above `MAX_DECODE_ROWS_PER_EXPERT` (32) rows per expert the default launch is the prefill one, and computes the
    float64 reference. 120 tokens x top-2 over 4 experts: about 60 rows each, some experts over one 64-row block.
    32 x 128 scale tiles (as the release's 128 x 128) against the prefill launch's 64-deep reduction steps: two steps
    per scale column; hidden 160 and intermediate 64 end in partial tiles."""
    generator = torch.Generator().manual_seed(12)
    block = (32, 128)
    ((gate_up, gate_up_scale), (down, down_scale)), (gate_up_ref, down_ref) = fp8_experts(160, 64, 4, block, device, 11)
    index = random_top_k(120, 4, 2, generator).to(device)
    x = torch.randn(120, 160, generator=generator).to(device)
    weights = (torch.rand(120, 2, generator=generator) + 0.1).to(device)
    quantized = dict(gate_up_scale=gate_up_scale, down_scale=down_scale, block_size=block) if fp8 else {}
    if not fp8:
        gate_up, down = gate_up_ref.float().to(device), down_ref.float().to(device)
    assert default_launch(index.numel(), 4) == PREFILL_LAUNCH and PREFILL_LAUNCH["block_k"] < block[1]
    assert default_launch(60 * 2, 4) != PREFILL_LAUNCH  # 30 rows per expert: decode-sized
    out = moe_decode(x, index, weights, gate_up, down, **quantized)
    ref = reference_by_expert(x, index, weights, gate_up_ref.to(device), down_ref.to(device))
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_strided_top_1_columns(device):
    """A `[T, 1]` column of wider routing tensors (rows 3 apart, which `reshape(-1)` keeps as a strided view)."""
    x, index, weights, gate_up, down = random_experts(20, 48, 24, 8, 3, torch.float32, device, seed=13)
    out = moe_decode(x, index[:, 1:2], weights[:, 1:2], gate_up, down)
    ref = reference_experts(x.double(), index[:, 1:2], weights[:, 1:2].double(), gate_up, down)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_choices_outside_the_experts_add_nothing_at_decode_sizes(device):
    """Without `expert_parallel` the ids are not checked (a check would synchronise with the host); where the
    one-launch alignment runs, a choice outside `[0, E)` adds nothing (no uninitialised partial row is summed)."""
    x, index, weights, gate_up, down = random_experts(20, 48, 24, 8, 3, torch.float32, device, seed=14)
    outside = torch.zeros_like(index, dtype=torch.bool)
    outside[::3, 2], outside[1::4, 0] = True, True
    bad = torch.where(outside, torch.where(index % 2 == 0, -1, 8), index)
    for _ in range(3):  # fresh allocations each time
        out = moe_decode(x, bad, weights, gate_up, down)
        ref = reference_experts(x.double(), index, weights.double() * ~outside, gate_up, down)
        assert relative_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True])
def test_expert_parallel_range_adds_only_its_own_choices(device, fp8):
    """An FFN rank holding experts [3, 6) of 8: choices elsewhere carry the sentinel id (3, transformers' convention)
    or any id outside [0, 3), and the kernel's sum is the float64 loop over the local choices alone; the ranks'
    sums add up to the whole."""
    block = (16, 16)
    ((gate_up, gate_up_scale), (down, down_scale)), (gate_up_ref, down_ref) = fp8_experts(64, 32, 8, block, device, 7)
    if not fp8:
        gate_up, down = gate_up_ref.float().to(device), down_ref.float().to(device)
    x, index, weights, _, _ = random_experts(20, 64, 32, 8, 3, torch.float32, device, seed=8)
    quantized = dict(gate_up_scale=gate_up_scale, down_scale=down_scale, block_size=block) if fp8 else {}
    total = 0
    for first, last in ((0, 3), (3, 6), (6, 8)):
        local = index - first
        elsewhere = (local < 0) | (local >= last - first)
        sentinel = local.masked_fill(elsewhere, last - first)
        if first == 3:
            sentinel = torch.where(elsewhere & (index % 2 == 0), -1, sentinel)  # other out-of-range ids
        rows = slice(first, last)
        out = moe_decode(x, sentinel, weights, gate_up[rows], down[rows], expert_parallel=True, block_n=16,
                         **{k: (v[rows] if torch.is_tensor(v) else v) for k, v in quantized.items()})  # fmt: skip
        ref = reference_experts(x.double(), local.clamp(0, last - first - 1), weights.double() * ~elsewhere,
                                gate_up_ref[rows].to(device), down_ref[rows].to(device))  # fmt: skip
        assert relative_error(out, ref) < 1e-5, (first, last)
        total = total + out.double()
    whole = reference_experts(x.double(), index, weights.double(), gate_up_ref.to(device), down_ref.to(device))
    assert relative_error(total, whole) < 1e-5
