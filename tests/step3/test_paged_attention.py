"""Continuous batching on the MFA kernel (`mfa_paged`): the ragged/paged kernel and the attention function against a
float64 reference, `generate_batch` against `generate()`, and `step3-serve`'s default.

The kernel cases run on CPU under Triton's interpreter in a subprocess (`test_triton_interpreter.py`) and on CUDA; the
attention function and `generate_batch` also run here without the kernel (its SDPA path, what a CPU gets).
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from triton_cases import (
    DEVICES,
    INTERPRETED,
    eager_when_interpreted,
    relative_error,
    skip_if_interpreted,
)

import step3_hf  # noqa: F401
from step3_hf.kernels import (
    MFA_DECODE_ATTENTION,
    PAGED_MFA_ATTENTION,
    kernel_available,
    paged_decode_attention,
    paged_mfa_attention_forward,
    token_key_ranges,
)
from step3_hf.kernels import transformers_paged_attention
from step3_hf.serve import _with_step3_defaults, continuous_batching_attention
from step3_hf.tiny_checkpoint import write_tiny_checkpoint

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# (cached tokens, new tokens) per sequence: decodes, a few-token chunk, prefill chunks with and without a past.
MIXED = [(9, 1), (0, 7), (20, 3), (130, 1), (5, 12), (0, 1), (64, 4)]
DECODE = [(9, 1), (20, 3), (130, 1), (0, 1), (64, 4), (200, 2)]


def ragged_case(sequences, heads, kv_heads, head_dim, dtype, device, seed):
    """Packed queries `[T, Hq, D]`, ragged keys/values `[K, Hkv, D]` (each sequence's cached then new tokens) and the
    cumulative lengths."""
    generator = torch.Generator().manual_seed(seed)
    cu_q, cu_k = [0], [0]
    for past, new in sequences:
        cu_q.append(cu_q[-1] + new)
        cu_k.append(cu_k[-1] + past + new)
    query = torch.randn(cu_q[-1], heads, head_dim, generator=generator)
    key = torch.randn(cu_k[-1], kv_heads, head_dim, generator=generator)
    value = torch.randn(cu_k[-1], kv_heads, head_dim, generator=generator)
    tensors = [t.to(device=device, dtype=dtype) for t in (query, key, value)]
    return (*tensors, torch.tensor(cu_q, device=device), torch.tensor(cu_k, device=device))


def reference(query, key, value, sequences, scale):
    """float64: token j of a sequence with p cached tokens attends to its keys [0, p + j]; `[T, Hq, D]`."""
    group = query.shape[1] // key.shape[1]
    out, q_at, k_at = [], 0, 0
    for past, new in sequences:
        k = key[k_at : k_at + past + new].double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, k, D]
        v = value[k_at : k_at + past + new].double().repeat_interleave(group, dim=1).transpose(0, 1)
        q = query[q_at : q_at + new].double().transpose(0, 1)  # [Hq, new, D]
        scores = (q @ k.transpose(-1, -2)) * scale
        allowed = torch.arange(past + new)[None, :] <= torch.arange(past, past + new)[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out.append((probs @ v).transpose(0, 1))
        q_at, k_at = q_at + new, k_at + past + new
    return torch.cat(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("paged", [False, True])
def test_kernel_on_ragged_and_paged_keys_equals_float64(device, dtype, num_splits, paged):
    heads, kv_heads, head_dim = 16, 2, 32
    query, key, value, cu_q, cu_k = ragged_case(DECODE, heads, kv_heads, head_dim, dtype, device, seed=num_splits)
    ref = reference(query.cpu(), key.cpu(), value.cpu(), DECODE, head_dim**-0.5)
    rows = None
    if paged:  # the keys scattered over a larger cache, found through a read index as continuous batching keeps them
        generator = torch.Generator().manual_seed(7)
        rows = torch.randperm(key.shape[0] + 50, generator=generator)[: key.shape[0]].to(device)
        cache_k = torch.randn(key.shape[0] + 50, kv_heads, head_dim, generator=generator).to(device, dtype)
        cache_v = torch.randn(key.shape[0] + 50, kv_heads, head_dim, generator=generator).to(device, dtype)
        cache_k[rows], cache_v[rows] = key, value
        key, value = cache_k, cache_v
    start, end = token_key_ranges(cu_q, cu_k, query.shape[0])
    out = paged_decode_attention(query, key, value, start, end, rows=rows, num_splits=num_splits)
    assert out.shape == query.shape and out.dtype == dtype
    assert relative_error(out.cpu(), ref) < TOLERANCE[dtype]
    # a subset of the tokens, in another order
    tokens = torch.tensor([5, 0, 3], device=device)
    out = paged_decode_attention(query, key, value, start[tokens], end[tokens], rows=rows, tokens=tokens)
    assert relative_error(out.cpu(), ref[tokens.cpu()]) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_refuses_mismatched_inputs(device):
    query, key, value, cu_q, cu_k = ragged_case(DECODE, 16, 2, 32, torch.float32, device, seed=0)
    start, end = token_key_ranges(cu_q, cu_k, query.shape[0])
    with pytest.raises(ValueError, match="kv_start"):
        paged_decode_attention(query, key, value, start[:2], end[:2])
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(query, key.bfloat16(), value.bfloat16(), start, end)
    with pytest.raises(ValueError, match="does not match"):
        paged_decode_attention(query, key[..., :16], value[..., :16], start, end)


class Layer(torch.nn.Module):
    layer_idx = 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sequences", [MIXED, DECODE], ids=["prefill-and-decode", "decode"])
def test_attention_function_on_packed_batch_equals_float64(dtype, sequences):
    """transformers' call as continuous batching makes it after the model updated the cache (5.24 on): packed
    queries `[1, Hq, T, D]`, each sequence's keys gathered `[1, Hkv, K, D]`. Here: the SDPA path; under the
    interpreter: the kernel for decode tokens beside SDPA for prefill chunks."""
    heads, kv_heads, head_dim = 16, 1, 32
    query, key, value, cu_q, cu_k = ragged_case(sequences, heads, kv_heads, head_dim, dtype, "cpu", seed=len(sequences))
    max_q = max(new for _, new in sequences)
    max_k = max(past + new for past, new in sequences)
    kwargs = {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": {"full_attention": cu_k}, "max_length_q": max_q,
              "max_length_k": {"full_attention": max_k}}  # fmt: skip
    out, weights = paged_mfa_attention_forward(
        Layer(), query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None], None,
        scaling=head_dim**-0.5, **kwargs,
    )  # fmt: skip
    assert weights is None and out.shape == (1, *query.shape)
    assert relative_error(out[0], reference(query, key, value, sequences, head_dim**-0.5)) < TOLERANCE[dtype]


def test_attention_function_refuses_an_unpacked_call():
    query = torch.randn(1, 8, 3, 16)
    key = torch.randn(1, 1, 3, 16)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        paged_mfa_attention_forward(Layer(), query, key, key, None)


PROMPTS = [[1, 17, 33, 90, 4, 5, 6], [1, 200], [1, 8, 9, 10, 77], [1, *range(40, 60)]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("paged"), seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=MFA_DECODE_ATTENTION).eval()
    with torch.no_grad():  # larger weights, so that greedy continuations vary from token to token
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
    return model


@pytest.mark.parametrize("device", ["cpu", *DEVICES[:1]] if not INTERPRETED else ["cpu"])
def test_generate_batch_on_mfa_paged_equals_generate_one_prompt_at_a_time(model, device, monkeypatch):
    eager_when_interpreted(monkeypatch, "rms_norm", "rotary", "top_k")
    model = model if device == "cpu" else copy.deepcopy(model).to(device)  # float32 on CUDA too: exact products
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    # 8 tokens a step: the 21-token prompt is prefilled in chunks after cached tokens, beside other requests' decodes.
    paged = ContinuousBatchingConfig(block_size=16, num_blocks=16, max_batch_tokens=8)
    decoded, ranges = [], []
    kernel, key_ranges = transformers_paged_attention.paged_decode_attention, transformers_paged_attention.token_key_ranges

    def counting_kernel(*args, **kwargs):
        decoded.append(args[0].shape[0])
        return kernel(*args, **kwargs)

    def counting_key_ranges(*args, **kwargs):
        ranges.append(args[2])
        return key_ranges(*args, **kwargs)

    monkeypatch.setattr(transformers_paged_attention, "paged_decode_attention", counting_kernel)
    monkeypatch.setattr(transformers_paged_attention, "token_key_ranges", counting_key_ranges)
    outputs = model.generate_batch(
        inputs=PROMPTS, generation_config=config, continuous_batching_config=paged, progress_bar=False
    )
    assert model.config._attn_implementation == MFA_DECODE_ATTENTION  # restored when the manager stopped
    assert bool(decoded) == kernel_available(device)  # the kernel ran where it can (CUDA, or CPU under the interpreter)
    if decoded:  # each step's key ranges are computed by its first layer and reused by the others
        assert len(ranges) * model.config.get_text_config().num_hidden_layers == len(decoded)
    ordered = sorted(outputs.values(), key=lambda o: int(o.request_id.split("_")[-1]))
    assert len(ordered) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, ordered):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt], device=device), generation_config=config)[0, len(prompt) :]
        assert result.prompt_ids == prompt
        assert result.generated_tokens == alone.tolist()


@skip_if_interpreted
def test_step_layout_is_computed_once_per_forward():
    """The first layer of a forward computes a step's layout, the later layers reuse it; a forward that starts again
    (a layer index not above the last, even on the same tensors, as with static buffers) or another step's tensors
    compute it again."""
    once = transformers_paged_attention._OncePerForward()
    computed = []

    def get(layer, step, name="ranges"):
        return once.get(layer, step, name, lambda: computed.append((layer, name)) or len(computed))

    lengths, other = torch.tensor([0, 3]), torch.tensor([0, 3])
    assert [get(layer, (lengths,)) for layer in range(3)] == [1, 1, 1]
    assert get(1, (lengths,), "host_lengths") == 2 and get(2, (lengths,), "host_lengths") == 2  # names apart
    assert get(0, (lengths,)) == 3  # a new forward on the same tensors
    assert get(1, (other,)) == 4  # another step's tensors
    assert get(0, (other,)) == 5 and get(0, (other,)) == 6  # a one-layer model: every call a new forward
    assert computed == [(0, "ranges"), (1, "host_lengths"), (0, "ranges"), (1, "ranges"), (0, "ranges"), (0, "ranges")]


@skip_if_interpreted
def test_generate_refuses_mfa_paged_outside_continuous_batching(model):
    model.set_attn_implementation(PAGED_MFA_ATTENTION)
    try:
        with pytest.raises(ValueError, match="generate_batch"):
            model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=2, do_sample=False)
    finally:
        model.set_attn_implementation(MFA_DECODE_ATTENTION)


@skip_if_interpreted
def test_serving_batches_on_the_mfa_kernel_where_it_runs(monkeypatch):
    import step3_hf.serve as serve

    for kernel_runs, expected in [(True, MFA_DECODE_ATTENTION), (False, "sdpa")]:
        monkeypatch.setattr(serve, "decode_kernel_preferred", lambda: kernel_runs)
        assert continuous_batching_attention() == expected
        assert _with_step3_defaults(["ckpt"]) == ["ckpt", "--continuous-batching", "--attn-implementation", expected]
    assert _with_step3_defaults(["ckpt", "--attn-implementation", "eager"]).count("--attn-implementation") == 1
    assert "--attn-implementation" not in _with_step3_defaults(["ckpt", "--no-continuous-batching"])
    monkeypatch.undo()
    if not torch.cuda.is_available():
        assert continuous_batching_attention() == "sdpa"  # a CPU serves on transformers' paged SDPA
