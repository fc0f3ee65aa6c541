"""Step-3 modeling against an independent float64 reference, across attention and experts implementations."""

import pytest
import torch
from step3_reference import step3_logits
from transformers import AutoModelForCausalLM

import step3_hf  # noqa: F401  (registers the Auto classes)
from step3_hf import Step3Config, Step3ForCausalLM
from step3_hf.tiny_checkpoint import TINY_CONFIG, random_official_state_dict, write_official_checkpoint

ATTENTION = ["eager", "sdpa", "flex_attention"]
EXPERTS = ["eager", "batched_mm", "grouped_mm"]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def load(path, **kwargs) -> Step3ForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module", params=[1, 2], ids=["1kv", "2kv"])
def checkpoint(request, tmp_path_factory):
    """(path, config, official state dict) of a tiny fp32 checkpoint; MoE routing renormalised in the 2-KV case."""
    groups = request.param
    config = Step3Config(**{**TINY_CONFIG, "num_attention_groups": groups, "norm_expert_weight": groups == 2})
    state = random_official_state_dict(config, seed=groups)
    path = write_official_checkpoint(tmp_path_factory.mktemp(f"step3_{groups}"), state, config)
    return path, config, state


@pytest.mark.parametrize("experts", EXPERTS)
@pytest.mark.parametrize("attention", ATTENTION)
def test_logits_match_float64_reference(checkpoint, attention, experts):
    path, config, state = checkpoint
    model = load(path, attn_implementation=attention, experts_implementation=experts)
    assert model.config._attn_implementation == attention
    assert model.config._experts_implementation == experts
    input_ids = torch.randint(3, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids).logits
    assert relative_error(logits, step3_logits(state, config, input_ids)) < 1e-5


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_cached_decoding_matches_float64_reference(checkpoint, attention, cache_implementation):
    """Prefill 5 tokens, then decode one token at a time through the cache; every step's logits must equal the
    reference's logits for the whole sequence so far."""
    from transformers import DynamicCache, StaticCache

    path, config, state = checkpoint
    model = load(path, attn_implementation=attention)
    input_ids = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(11))
    reference = step3_logits(state, config, input_ids)
    if cache_implementation == "static":
        cache = StaticCache(config=model.config, max_cache_len=16)
    else:
        cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids[:, :5], cache=cache, use_cache=True)
        assert relative_error(out.logits, reference[:, :5]) < 1e-5
        for step in range(5, 9):
            out = model(input_ids[:, step : step + 1], cache=cache, use_cache=True,
                        position_ids=torch.full((2, 1), step))
            assert relative_error(out.logits[:, -1], reference[:, step]) < 1e-5, step


def test_every_official_tensor_lands_in_the_model(checkpoint):
    path, config, state = checkpoint
    params = load(path).state_dict()
    for name, tensor in state.items():
        if ".moe.gate_proj." in name or ".moe.up_proj." in name:
            gate, up = state[name.replace("up_proj", "gate_proj")], state[name.replace("gate_proj", "up_proj")]
            fused = params[name.replace("moe.gate_proj.weight", "mlp.experts.gate_up_proj").replace(
                "moe.up_proj.weight", "mlp.experts.gate_up_proj")]
            torch.testing.assert_close(fused, torch.cat([gate, up], dim=1), rtol=0, atol=0)
            continue
        ours = (
            name.replace(".moe.gate.weight", ".mlp.gate.weight")
            .replace(".moe.down_proj.weight", ".mlp.experts.down_proj")
            .replace(".share_expert.", ".mlp.shared_expert.")
        )
        torch.testing.assert_close(params[ours], tensor, rtol=0, atol=0, msg=name)


def test_kv_cache_holds_only_the_shared_heads(checkpoint):
    path, config, _ = checkpoint
    model = load(path)
    input_ids = torch.randint(3, config.vocab_size, (3, 9))
    with torch.no_grad():
        out = model(input_ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    for layer in cache.layers:
        assert layer.keys.shape == (3, config.num_attention_groups, 9, config.head_dim)
        assert layer.values.shape == (3, config.num_attention_groups, 9, config.head_dim)
        bytes_per_token = (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() // (3 * 9)
        assert bytes_per_token == 2 * config.num_attention_groups * config.head_dim * 4


def test_dense_and_moe_layers_follow_moe_layers_enum(checkpoint):
    path, config, _ = checkpoint
    model = load(path)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["Step3MLP", "Step3SparseMoeBlock", "Step3SparseMoeBlock", "Step3MLP"]
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_decoder_layer_halves_compose_to_the_layer(checkpoint):
    """The AFD interface: attention_block then ffn_block is exactly the layer."""
    path, config, _ = checkpoint
    model = load(path)
    layer = model.model.layers[1]
    x = torch.randn(2, 5, config.hidden_size)
    position_ids = torch.arange(5)[None].expand(2, -1)
    pos = model.model.rotary_emb(x, position_ids)
    with torch.no_grad():
        full = layer(x, position_embeddings=pos)
        split = layer.ffn_block(layer.attention_block(x, pos))
    torch.testing.assert_close(full, split, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [101, 51], ids=["whole", "tp_shard"])
def test_lm_head_splits_an_odd_row_count_and_matches_float64(rows):
    """Step-3's vocabulary (128815) is odd; the head multiplies the aligned rows and the rest separately. The row
    count is the weight's own, as under tensor parallelism, where a rank holds a shard of `out_features` rows."""
    from step3_hf.modeling_step3 import Step3VocabProjection

    head = Step3VocabProjection(16, 101, bias=False)
    head.weight = torch.nn.Parameter(head.weight.detach()[:rows].clone())
    hidden = torch.randn(2, 3, 16)
    reference = hidden.double() @ head.weight.detach().double().t()
    with torch.no_grad():
        logits = head(hidden)
    assert logits.shape == (2, 3, rows)
    torch.testing.assert_close(logits.double(), reference, rtol=1e-6, atol=1e-6)
    # Training takes nn.Linear's own path (one product, autograd).
    trained = head(hidden.requires_grad_())
    trained.sum().backward()
    torch.testing.assert_close(hidden.grad, head.weight.detach().sum(0).expand(2, 3, 16))
