"""Step-3 under transformers' own parallelism, beyond the two-rank layouts of test_model_common.py (TP, EP, TP x EP,
a TP training step, FSDP2 fine-tuning, attention data parallelism with EP): sizes the plans cannot split, and 4 ranks
(TP=4, EP=4, TP x EP on one mesh, and separate TP and EP groups). Every launch is CPU processes with gloo
(`tp_worker.py`), compared with one process in fp32."""

import pytest
import torch
from tp_worker import (
    HAS_EP,
    INPUT_IDS,
    NEW_TOKENS,
    layout_result,
    ragged_generate,
    run_layouts,
)
from transformers import AutoModelForCausalLM, DistributedConfig

from step3_hf import Step3Config, Step3ForCausalLM, Step3VLForCausalLM
from step3_hf.configuration_step3 import Step3VLConfig
from step3_hf.fp8 import fp8_quantization_config
from step3_hf.parallel import attention_data_parallel_config, check_parallel_sizes
from step3_hf.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint

# ------------------------------------------------------------------------------ sizes the plans cannot split


def test_heads_or_experts_the_ranks_do_not_divide_are_refused_naming_the_field():
    """transformers' sharding step (`maybe_distribute_model`, after the model is built and before a weight loads)
    refuses them; no process group is needed to reach it (without a mesh the step shards nothing)."""
    with torch.device("meta"):
        model = Step3ForCausalLM(Step3Config(**TINY_CONFIG))  # 8 query heads, 6 experts
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) does not divide over tp_size \(3\) ranks"):
        Step3ForCausalLM.maybe_distribute_model(model, DistributedConfig(tp_size=3), None)
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) does not divide over tp_size \(3\)"):
        Step3ForCausalLM.maybe_distribute_model(model, DistributedConfig(tp_size=3, tp_plan="auto"), None)
    # Sizes that divide, and a TP size with no TP rule, pass through.
    assert Step3ForCausalLM.maybe_distribute_model(model, DistributedConfig(tp_size=4), None) is model
    assert Step3ForCausalLM.maybe_distribute_model(model, DistributedConfig(tp_size=3, tp_plan={}), None) is model
    assert Step3ForCausalLM.maybe_distribute_model(model, None, None) is model
    # The VL model's language model is checked through its text config.
    with torch.device("meta"):
        vl = Step3VLForCausalLM(Step3VLConfig(text_config=Step3Config(**{**TINY_CONFIG, "num_attention_heads": 6})))
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\) does not divide over tp_size \(4\)"):
        Step3VLForCausalLM.maybe_distribute_model(vl, DistributedConfig(tp_size=4), None)
    if HAS_EP:
        with pytest.raises(ValueError, match=r"moe_num_experts \(6\) does not divide over ep_size \(4\) ranks"):
            Step3ForCausalLM.maybe_distribute_model(model, DistributedConfig(fsdp_size=4, ep_size=4), None)
        assert Step3ForCausalLM.maybe_distribute_model(model, DistributedConfig(fsdp_size=3, ep_size=3), None) is model


def test_block_fp8_sizes_that_would_split_a_tile_are_refused_for_the_released_config():
    """The released widths in 128 x 128 tiles: TP cuts the shared expert's 5120 rows (40 tiles) into whole tiles for
    2, 4 and 8 ranks (2560, 1280, 640 rows) but not 16 (320); EP alone splits by expert and never cuts a tile. FSDP
    (here DP-attn+EP) cuts K and V, 256 rows (2 tiles), into 32 rows on 8 ranks: refused where the weights are
    dequantized at load (CPU), passed where FSDP gathers whole float8 weights and scales before use."""
    config, fp8 = Step3Config(), fp8_quantization_config((128, 128))
    assert (config.share_expert_dim, config.num_attention_groups * config.head_dim) == (5120, 256)
    for size in (2, 4, 8):
        check_parallel_sizes(config, DistributedConfig(tp_size=size, tp_plan="auto"), fp8)
    with pytest.raises(ValueError, match=r"shared_expert\.gate_proj\.weight \(5120 x 7168\) is block-FP8 in 128 x 128 "
                       r"tiles: tp_size \(16\) would split its rows \(share_expert_dim = 5120\) into 320 per rank"):
        check_parallel_sizes(config, DistributedConfig(tp_size=16, tp_plan="auto"), fp8)
    check_parallel_sizes(config, DistributedConfig(tp_size=16, tp_plan="auto"), None)  # bf16: any size that divides
    check_parallel_sizes(config, DistributedConfig(tp_size=16, tp_plan="auto"), {"quant_method": "bitsandbytes"})
    # EP alone and DP-attn+EP (ep_size beside these, on transformers >= 5.21) split the experts by expert only.
    check_parallel_sizes(config, DistributedConfig(tp_size=16, tp_plan={}), fp8)
    dp_ep = DistributedConfig(fsdp_size=8)
    check_parallel_sizes(config, dp_ep, fp8)
    with pytest.raises(ValueError, match=r"k_proj\.weight \(256 x 7168\) .* fsdp_size \(8\) would split its rows "
                       r"\(num_attention_groups x head_dim = 256\) into 32 per rank"):
        check_parallel_sizes(config, dp_ep, {**fp8, "dequantize": True})
    check_parallel_sizes(config, DistributedConfig(fsdp_size=2), {**fp8, "dequantize": True})  # 128 rows each
    # TP and FSDP split wq's rows together: 4 heads of 128 over 4 x 2 ranks are 64 rows each (K and V, 2 heads of
    # 128, are 128 rows on each of the 2 FSDP ranks: whole tiles).
    with pytest.raises(ValueError, match=r"wq\.weight \(512 x 2048\) .* tp_size \(4\) x fsdp_size \(2\) would split "
                       r"its rows \(num_attention_heads x head_dim = 512\) into 64 per rank"):
        check_parallel_sizes(Step3Config(num_attention_heads=4, num_attention_groups=2, head_dim=128),
                             DistributedConfig(tp_size=4, fsdp_size=2), {**fp8, "dequantize": True})  # fmt: skip
    # Row-wise: o_proj's columns.
    with pytest.raises(ValueError, match=r"o_proj\.weight \(7168 x 16384\) .* tp_size \(16\) would split its "
                       r"columns \(num_attention_heads x head_dim = 16384\) into 1024"):
        check_parallel_sizes(config, DistributedConfig(tp_size=16, tp_plan="auto"), fp8_quantization_config((128, 2048)))


def test_attention_data_parallel_config_names_the_model_modules_it_keeps_whole():
    """FSDP over the ranks with EP over the same ranks; its FSDP rules name modules that exist (transformers would
    warn and not apply a rule that names nothing). Where `DistributedConfig` has no `ep_size` it says so."""
    if not HAS_EP:
        with pytest.raises(ValueError, match="needs transformers >= 5.21"):
            attention_data_parallel_config(4)
        return
    config = attention_data_parallel_config(4)
    assert (config.fsdp_size, config.ep_size, config.tp_size) == (4, 4, 1)
    with torch.device("meta"):
        names = {name for name, _ in Step3ForCausalLM(Step3Config(**TINY_CONFIG)).named_modules()}
    assert "model.embed_tokens" in names and "model.layers.0" in names
    assert set(config.fsdp_plan) == {"model.embed_tokens", "model.layers.*"}
    assert set(config.fsdp_plan.values()) == {"keep_full_weight"}


# ------------------------------------------------------------------------------------------------ 4 ranks

# 8 experts (2 whole ones per rank); MLP widths and a vocabulary that 4 ranks do not divide, which
# transformers splits unevenly (the slices of gate, up and down line up).
PARALLEL_CONFIG = dict(vocab_size=251, moe_num_experts=8, intermediate_size=90, share_expert_dim=26)


@pytest.fixture(scope="module")
def four_rank_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("parallel"), vl=False, **PARALLEL_CONFIG)


FOUR_RANK_LAYOUTS = {  # layout: (data-parallel groups, experts per rank, LM-head rows and wq rows on rank 0)
    "tp": (1, 8, 63, 32),  # tp_plan="auto" keeps the routed experts whole per rank
    "ep": (1, 2, 251, 128),
    "tp_ep": (1, 2, 63, 32),
    "tp2_ep": (2, 2, 126, 32),  # TP groups {0, 1} and {2, 3} (64 rows of wq each, FSDP halves them), experts over all 4
}


@pytest.fixture(scope="module")
def four_ranks(four_rank_checkpoint, tmp_path_factory):
    return run_layouts(four_rank_checkpoint, tmp_path_factory.mktemp("four_ranks"), list(FOUR_RANK_LAYOUTS), world=4)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(FOUR_RANK_LAYOUTS))
def test_four_ranks_match_one_process(four_rank_checkpoint, four_ranks, layout):
    """One four-rank launch runs TP=4, EP=4, TP=4 x EP=4 on one mesh, and TP=2 x EP=4 with separate groups
    (`tp_size=2, fsdp_size=2, ep_size=4`: each TP pair serves its own sequence, the experts span both pairs).
    Logits within 1e-5 of one process and the same greedy tokens; the splits are the ones asked for (the MLP
    widths 90 and 26 and the vocabulary 251 do not divide by 4: transformers splits them unevenly)."""
    result = layout_result(four_ranks, layout)
    groups, experts, head_rows, wq_rows = FOUR_RANK_LAYOUTS[layout]
    assert (result["groups"], result["local_experts"], result["local_rows"]) == (groups, experts, head_rows)
    assert result["wq_local_rows"] == (wq_rows, wq_rows)
    model = AutoModelForCausalLM.from_pretrained(four_rank_checkpoint, attn_implementation="sdpa").eval()
    input_ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        logits, tokens = model(input_ids).logits, model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5)
    assert result["tokens"].tolist() == tokens.tolist()
    # With two TP pairs, each pair then decodes its own row alone, another prompt length and number of steps.
    assert len(result.get("ragged_tokens", [])) == (groups if groups > 1 else 0)
    for group, ragged in enumerate(result.get("ragged_tokens", [])):
        assert ragged.tolist() == ragged_generate(model, group).tolist()
