"""Step-3 under transformers' own parallelism beyond two-rank TP and EP (those are in test_model_common.py):
sizes the plans cannot split, FSDP2 fine-tuning, attention data parallelism with expert parallelism, and 4 ranks
(TP=4, EP=4, TP x EP on one mesh, and separate TP and EP groups). Every launch is CPU processes with gloo
(`tp_worker.py`), compared with one process in fp32."""

import inspect

import pytest
import torch
from afd_launch import PYTHON, REPO, finish, launch
from tp_worker import INPUT_IDS, LEARNING_RATE, MOMENTUM, NEW_TOKENS, TRAIN_STEPS, run_layouts
from transformers import AutoModelForCausalLM, DistributedConfig

from step3_hf import Step3Config, Step3ForCausalLM, Step3VLForCausalLM
from step3_hf.configuration_step3 import Step3VLConfig
from step3_hf.tiny_checkpoint import TINY_CONFIG, write_tiny_checkpoint

HAS_EP = "ep_size" in inspect.signature(DistributedConfig).parameters
# 8 experts (whole ones over 2 or 4 ranks); MLP widths and a vocabulary that 4 ranks do not divide, which
# transformers splits unevenly (the slices of gate, up and down line up).
PARALLEL_CONFIG = dict(vocab_size=251, moe_num_experts=8, intermediate_size=90, share_expert_dim=26)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("parallel"), vl=False, **PARALLEL_CONFIG)


def one_process(path):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    input_ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        return model(input_ids).logits, model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)


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


def test_from_pretrained_under_tp_refuses_a_head_count_the_ranks_do_not_divide(tmp_path):
    """Two CPU ranks, 3 query heads: each rank exits with the error naming the field, not with the reshape
    traceback of the first forward that a split head gave before."""
    path = write_tiny_checkpoint(tmp_path / "three_heads", vl=False, num_attention_heads=3)
    worker = str(REPO / "tests" / "step3" / "tp_worker.py")
    argv = [PYTHON, worker, str(path), str(tmp_path / "out.pt"), "tp"]
    with launch(lambda rank: argv, 2, extra_env={"PYTHONPATH": str(REPO / "src")}) as procs:
        results = finish(procs, timeout=300)
    for rank, (code, _, err) in enumerate(results):
        assert code != 0, f"rank {rank} ran"
        assert "ValueError: num_attention_heads (3) does not divide over tp_size (2) ranks" in err, err[-2000:]
        assert "RuntimeError" not in err
    assert not (tmp_path / "out.pt").exists()


# ----------------------------------------------------------------------- data parallelism on two ranks


@pytest.fixture(scope="module")
def two_ranks(checkpoint, tmp_path_factory):
    """One two-rank launch: FSDP2 fine-tuning, then attention data parallelism with expert parallelism."""
    return run_layouts(checkpoint, tmp_path_factory.mktemp("two_ranks"), ["fsdp_train", "dp_ep"], world=2)


def test_fsdp2_fine_tuning_gives_the_losses_and_parameters_of_one_process(checkpoint, two_ranks):
    """`DistributedConfig(fsdp_size=2)`: each rank trains on its own row of the batch with the dense weights
    sharded; after `TRAIN_STEPS` SGD steps with momentum the per-step mean loss and every parameter equal one process trained on
    the whole batch (FSDP averages the two ranks' gradients, each rank's loss being a mean over as many tokens)."""
    fsdp = two_ranks["fsdp_train"]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    input_ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():  # each rank trained on its own row (group g has rows g::2)
        rows = [model(input_ids[row : row + 1], labels=input_ids[row : row + 1]).loss for row in range(2)]
    torch.testing.assert_close(fsdp["first_rank_losses"], torch.stack(rows), rtol=1e-5, atol=1e-6)
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    assert fsdp["wq_local_rows"] == 64  # the weights were sharded: half of wq's 128 rows per rank
    torch.testing.assert_close(fsdp["losses"], torch.stack(losses), rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]  # the steps trained
    params = dict(model.named_parameters())
    assert set(fsdp["params"]) == set(params)
    for name, param in fsdp["params"].items():
        torch.testing.assert_close(param, params[name].detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_attention_data_parallel_with_expert_parallel_matches_one_process(checkpoint, two_ranks):
    """`DistributedConfig(fsdp_size=2, ep_size=2)`: rank r computes attention (and holds the KV cache) for its own
    sequence only, holds 4 of the 8 experts, and the ranks exchange tokens all-to-all. Each rank's logits and greedy
    tokens equal one process's on that sequence."""
    if not HAS_EP:
        pytest.skip("this transformers' DistributedConfig has no ep_size (5.17)")
    dp_ep = two_ranks["dp_ep"]
    assert dp_ep["groups"] == 2 and dp_ep["local_experts"] == 4
    logits, tokens = one_process(checkpoint)  # each row is its own: no padding, and routing is per token
    torch.testing.assert_close(dp_ep["logits"], logits, rtol=1e-5, atol=1e-5)
    assert dp_ep["tokens"].tolist() == tokens.tolist()


# ------------------------------------------------------------------------------------------------ 4 ranks

FOUR_RANK_LAYOUTS = {  # layout: (data-parallel groups, experts per rank, LM-head rows on rank 0)
    "tp": (1, 8, 63),  # tp_plan="auto" keeps the routed experts whole per rank
    "ep": (1, 2, 251),
    "tp_ep": (1, 2, 63),
    "tp2_ep": (2, 2, 126),  # TP groups {0, 1} and {2, 3}, experts over all four ranks
}


@pytest.fixture(scope="module")
def four_ranks(checkpoint, tmp_path_factory):
    return run_layouts(checkpoint, tmp_path_factory.mktemp("four_ranks"), list(FOUR_RANK_LAYOUTS), world=4)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(FOUR_RANK_LAYOUTS))
def test_four_ranks_match_one_process(checkpoint, four_ranks, layout):
    """One four-rank launch runs TP=4, EP=4, TP=4 x EP=4 on one mesh, and TP=2 x EP=4 with separate groups
    (`tp_size=2, fsdp_size=2, ep_size=4`: each TP pair serves its own sequence, the experts span both pairs).
    Logits within 1e-5 of one process and the same greedy tokens; the splits are the ones asked for (the MLP
    widths 90 and 26 and the vocabulary 251 do not divide by 4: transformers splits them unevenly)."""
    result = four_ranks[layout]
    groups, experts, head_rows = FOUR_RANK_LAYOUTS[layout]
    assert (result["groups"], result["local_experts"], result["local_rows"]) == (groups, experts, head_rows)
    logits, tokens = one_process(checkpoint)
    torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5)
    assert result["tokens"].tolist() == tokens.tolist()
