"""Generation invariances: left padding, cache types, continuous batching, sampling."""

import pytest
import torch
import transformers
from packaging import version
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import step3_hf  # noqa: F401
from step3_hf import kv_cache
from step3_hf.kv_cache import InPlaceDynamicCache
from step3_hf.modeling_step3 import _CACHE_NAME
from step3_hf.tiny_checkpoint import write_tiny_checkpoint

PAD = 0
PROMPTS = [[1, 17, 33, 90, 4, 5, 6], [1, 200], [1, 8, 9, 10, 77]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # Larger weights than the default so that greedy continuations actually vary from token to token.
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("gen"), vl=True, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(4.0)
    return model


def greedy(model, input_ids, attention_mask=None, **kwargs):
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, generation_config=config, **kwargs)
    return out[:, input_ids.shape[1] :]


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_greedy_continuations_are_not_degenerate(model):
    tokens = greedy(model, torch.tensor([PROMPTS[0]]))[0]
    assert len(set(tokens.tolist())) > 3, tokens


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_left_padded_batch_equals_each_prompt_alone(model, attention):
    model.set_attn_implementation(attention)
    try:
        ids, mask = left_pad(PROMPTS)
        batched = greedy(model, ids, mask)
        for row, prompt in enumerate(PROMPTS):
            alone = greedy(model, torch.tensor([prompt]))
            assert batched[row].tolist() == alone[0].tolist(), (attention, row)
    finally:
        model.set_attn_implementation("sdpa")


def test_static_cache_equals_dynamic_cache(model):
    ids, mask = left_pad(PROMPTS)
    dynamic = greedy(model, ids, mask)
    static = greedy(model, ids, mask, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


@pytest.mark.parametrize("search", ["greedy", "beams", "assisted"])
def test_generate_uses_it_by_default_with_transformers_tokens(model, search, monkeypatch):
    """Left-padded prompts, greedy, beam search (reordered caches) and assisted decoding (cropped caches): the tokens
    of transformers' own `DynamicCache`; the cache `generate()` made is ours (an assistant's own is left alone)."""
    ids, mask = left_pad(PROMPTS[:2])
    config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    kwargs = {"beams": dict(num_beams=3), "assisted": dict(assistant_model=model), "greedy": {}}[search]
    if search == "assisted":
        ids, mask = ids[1:], mask[1:]  # assisted decoding takes one sequence

    def generate():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True,
                                  **kwargs)  # fmt: skip

    ours = generate()
    cache = getattr(ours, "past_key_values", None) or getattr(ours, "cache", None)
    assert type(cache) is InPlaceDynamicCache
    monkeypatch.setattr(kv_cache, "ENABLED", False)
    theirs = generate()
    assert type(getattr(theirs, "past_key_values", None) or getattr(theirs, "cache", None)) is DynamicCache
    assert ours.sequences.tolist() == theirs.sequences.tolist()


def forward_lengths(model, monkeypatch, budget, ids, mask, **kwargs):
    """The greedy tokens, and the positions of each forward `generate` ran, with `PREFILL_TOKENS_PER_CHUNK =
    budget`."""
    from step3_hf import modeling_step3

    monkeypatch.setattr(modeling_step3, "PREFILL_TOKENS_PER_CHUNK", budget)
    lengths = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)  # fmt: skip
    try:
        tokens = greedy(model, ids, mask, **kwargs)
    finally:
        hook.remove()
    return tokens, lengths


def test_long_prompts_are_prefilled_in_chunks_with_the_same_tokens(model, monkeypatch):
    """A prompt of more than `PREFILL_TOKENS_PER_CHUNK` tokens (batch x length) is prefilled in chunks of that many
    tokens' worth of positions, left padding included, with the tokens of one prefill, into a dynamic or a static
    cache; a prompt within it, a chunk size the caller set (also None) and `use_cache=False` are left alone."""
    ids, mask = left_pad(PROMPTS)  # 3 x 7 = 21 tokens
    decode = [1] * 11  # 12 new tokens: the prefill gives the first
    whole, lengths = forward_lengths(model, monkeypatch, 21, ids, mask)
    assert lengths == [7, *decode]
    for budget, chunks in ((20, [6, 1]), (6, [2, 2, 2, 1])):  # chunks of budget // 3 positions
        chunked, lengths = forward_lengths(model, monkeypatch, budget, ids, mask)
        assert lengths == [*chunks, *decode] and chunked.tolist() == whole.tolist(), budget
    assert forward_lengths(model, monkeypatch, 6, ids, mask, prefill_chunk_size=4)[1] == [4, 3, *decode]
    assert forward_lengths(model, monkeypatch, 6, ids, mask, prefill_chunk_size=None)[1] == [7, *decode]
    # Beams multiply the rows the prefill runs: 3 x 2 rows, chunks of 20 // 6 positions.
    beams, lengths = forward_lengths(model, monkeypatch, 20, ids, mask, num_beams=2)
    assert lengths == [3, 3, 1, *decode] and beams.tolist() == forward_lengths(model, monkeypatch, 42, ids, mask,
                                                                                num_beams=2)[0].tolist()  # fmt: skip
    static, lengths = forward_lengths(model, monkeypatch, 6, ids, mask, cache_implementation="static")
    assert lengths == [2, 2, 2, 1, *decode] and static.tolist() == whole.tolist()
    assert forward_lengths(model, monkeypatch, 6, ids, mask, use_cache=False)[1] == list(range(7, 19))


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.24"),
    reason="transformers < 5.24 hands the paged cache to the attention function instead of the model",
)
def test_continuous_batching_equals_generate(model):
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    # Explicit cache sizes: the defaults are inferred from free accelerator memory.
    paged = ContinuousBatchingConfig(num_blocks=8, max_batch_tokens=64)
    outputs = model.generate_batch(
        inputs=PROMPTS, generation_config=config, continuous_batching_config=paged, progress_bar=False
    )
    ordered = sorted(outputs.values(), key=lambda o: int(o.request_id.split("_")[-1]))
    for prompt, result in zip(PROMPTS, ordered):
        assert result.prompt_ids == prompt
        assert result.generated_tokens == greedy(model, torch.tensor([prompt]))[0].tolist()


def test_top_k_one_sampling_is_greedy(model):
    ids, mask = left_pad(PROMPTS)
    config = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=1, temperature=0.7, pad_token_id=PAD)
    with torch.no_grad():
        sampled = model.generate(ids, attention_mask=mask, generation_config=config, eos_token_id=None)
    assert sampled[:, ids.shape[1] :].tolist() == greedy(model, ids, mask).tolist()


def test_sampling_is_seeded_and_respects_processors(model):
    ids, mask = left_pad(PROMPTS)
    config = GenerationConfig(max_new_tokens=8, do_sample=True, top_k=5, temperature=0.8, pad_token_id=PAD)
    with torch.no_grad():
        torch.manual_seed(0)
        first = model.generate(ids, attention_mask=mask, generation_config=config)
        torch.manual_seed(0)
        second = model.generate(ids, attention_mask=mask, generation_config=config)
    assert first.tolist() == second.tolist()
    assert first.shape[1] <= ids.shape[1] + 8


V = 256  # the tiny checkpoint's vocabulary


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        ([[]], None, r"empty prompt: `input_ids` has shape \(1, 0\)"),
        ([[1, 17, V]], None, rf"token id {V} in `input_ids` is outside the vocabulary \[0, {V}\)"),
        ([[1, -1, 17]], None, rf"token id -1 in `input_ids` is outside the vocabulary \[0, {V}\)"),
        ([[1, 17]], [[0, 1, 1]], r"`attention_mask` has shape \(1, 3\) but `input_ids` has \(1, 2\)"),
        ([[1, 17]], [[0, 1], [1, 1]], r"`attention_mask` has shape \(2, 2\) but `input_ids` has \(1, 2\)"),
    ],
    ids=["empty", "id_at_vocab_size", "negative_id", "mask_longer", "mask_other_batch"],
)
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_bad_prompt_is_a_value_error_naming_the_problem(model, ids, mask, message, call):
    """Refused before the embedding lookup (which would raise IndexError on CPU, a device-side assert on CUDA)."""
    ids = torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1)
    mask = None if mask is None else torch.tensor(mask)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        if call == "forward":
            model(ids, attention_mask=mask)
        else:
            greedy(model, ids, mask)


def test_prompt_checks_run_at_prefill_only(model):
    """Decode steps carry a mask longer than their one new id; that is right there and must not be refused."""
    from transformers import DynamicCache, StaticCache

    ids = torch.tensor([PROMPTS[0]])
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=16)):
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids), use_cache=True, **{_CACHE_NAME: cache})
            step = model(torch.tensor([[5]]), attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long),
                         use_cache=True, **{_CACHE_NAME: cache})
        assert torch.isfinite(step.logits).all()
