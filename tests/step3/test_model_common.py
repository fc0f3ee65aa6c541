"""What transformers' common model tests check of every model, checked of Step-3.

transformers' `ModelTesterMixin` and `GenerationTesterMixin` are not in the wheel, so this is our own tester in
their style: a `Step3ModelTester` makes a tiny config (odd vocabulary, dense and MoE layers) and inputs, and each
test runs over every model class. It covers the loading contract (save and reload of every class, base-to-head and
head-to-base transfer, `AutoModel` on a causal-LM checkpoint, `save_original_format=False`, loading info that
reports), eager vs SDPA on left- and right-padded batches, fullgraph compilation with a static cache and no
recompilation across decode steps, the `past_key_values` deprecation and introspectable forward signatures.
"""

import ast
import copy
import inspect
import typing
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from safetensors import safe_open
from safetensors.torch import save_file
from step3_reference import step3_logits
from tp_worker import (
    GRAD_NAMES,
    INPUT_IDS,
    NEW_TOKENS,
    SPLIT_TILES,
    WEIGHT_NAMES,
    layout_result,
    ragged_generate,
    ragged_new_tokens,
    ragged_prompt_length,
    run_layouts,
    sgd_losses,
)
from transformers import AutoModel, AutoModelForCausalLM, CompileConfig, GenerationConfig, StaticCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

import step3_hf
from step3_hf import Step3Config, Step3ForCausalLM, Step3Model
from step3_hf.checkpoint_layout import base_model_layout, module_tensor_shapes, official_tensor_shapes
from step3_hf.modeling_step3 import _CACHE_NAME
from step3_hf.tiny_checkpoint import (
    TINY_CONFIG,
    TINY_FP8_BLOCK_SIZE,
    random_official_state_dict,
    write_official_checkpoint,
    write_tiny_fp8_checkpoint,
)

ALL_MODEL_CLASSES = (Step3Model, Step3ForCausalLM)
PAD = 0


class Step3ModelTester:
    """Tiny Step-3: 4 layers (1 and 2 MoE), 8 query heads on 1 KV head, and an odd vocabulary like the release's."""

    batch_size = 3
    seq_length = 7
    vocab_size = 251

    def get_config(self) -> Step3Config:
        return Step3Config(**{**TINY_CONFIG, "vocab_size": self.vocab_size})

    def prepare_config_and_inputs(self, seed: int = 0) -> tuple[Step3Config, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length), generator=generator)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


TESTER = Step3ModelTester()


def first_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def causal_lm_checkpoint(tmp_path_factory):
    """(path, config, official state dict) of a tiny causal-LM checkpoint in the official layout."""
    config = TESTER.get_config()
    state = random_official_state_dict(config)
    return write_official_checkpoint(tmp_path_factory.mktemp("causal_lm"), state, config), config, state


def saved_names(path: Path) -> set[str]:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            names.update(handle.keys())
    return names


# ----------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("save_original_format", [True, False], ids=["official_layout", "module_layout"])
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_save_load(tmp_path, model_class, save_original_format):
    config, inputs = TESTER.prepare_config_and_inputs()
    model = model_class(config).eval()
    model.save_pretrained(tmp_path, save_original_format=save_original_format)
    layout = official_tensor_shapes(config) if save_original_format else module_tensor_shapes(config)
    if model_class is Step3Model:
        layout = base_model_layout(layout)
    assert saved_names(tmp_path) == set(layout)

    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is model_class
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for name, tensor in model.state_dict().items():  # every tensor back bit for bit
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    # The outputs to float32 rounding: the reloaded copies may sit at other alignments (1-ulp GEMM differences).
    torch.testing.assert_close(first_output(reloaded.eval(), inputs), first_output(model, inputs))


def test_base_model_checkpoint_into_the_causal_lm_initialises_and_reports_the_head(tmp_path):
    config, inputs = TESTER.prepare_config_and_inputs()
    base = Step3Model(config).eval()
    base.save_pretrained(tmp_path)
    model, info = Step3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"} and not info["unexpected_keys"], info
    with torch.no_grad():  # same weights; the loaded copies may sit at other alignments (1-ulp GEMM differences)
        torch.testing.assert_close(model.model(**inputs).last_hidden_state, base(**inputs).last_hidden_state)
    # Initialised as transformers initialises every linear layer: N(0, initializer_range), not left empty.
    head = model.lm_head.weight.detach()
    assert torch.isfinite(head).all()
    assert abs(head.std().item() - config.initializer_range) < 0.1 * config.initializer_range
    assert abs(head.mean().item()) < 0.1 * config.initializer_range


@pytest.mark.parametrize("loader", [Step3Model, AutoModel], ids=["Step3Model", "AutoModel"])
def test_causal_lm_checkpoint_into_the_base_model_reports_the_head(causal_lm_checkpoint, loader):
    path, config, state = causal_lm_checkpoint
    _, inputs = TESTER.prepare_config_and_inputs()
    base, info = loader.from_pretrained(path, output_loading_info=True)
    assert type(base) is Step3Model
    assert info["unexpected_keys"] == {"lm_head.weight"} and not info["missing_keys"], info
    causal_lm = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = causal_lm.model(**inputs).last_hidden_state
        torch.testing.assert_close(base.eval()(**inputs).last_hidden_state, hidden)


def test_loading_info_reports_every_weight_of_a_checkpoint_that_holds_none(tmp_path):
    """Like upstream's reload test with every weight removed: a file holding no Step-3 tensor loads (randomly
    initialised) and the report names each missing weight, no more and no fewer."""
    config = TESTER.get_config()
    for model_class in ALL_MODEL_CLASSES:
        model_class(config).save_pretrained(tmp_path / model_class.__name__)
        save_file({"tensor": torch.tensor([1, 2])}, tmp_path / model_class.__name__ / "model.safetensors")
        model, info = model_class.from_pretrained(tmp_path / model_class.__name__, output_loading_info=True)
        assert info["missing_keys"] == set(model.state_dict()), model_class
        assert info["unexpected_keys"] == {"tensor"}


@pytest.mark.parametrize("save_original_format", [True, False], ids=["official_layout", "module_layout"])
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_broken_checkpoint_of_every_class_and_layout_names_the_tensor(tmp_path, model_class, save_original_format):
    """Whatever class saved it and in whichever layout, a hole in the decoder stack or a wrong shape is refused."""
    config = TESTER.get_config()
    model_class(config).save_pretrained(tmp_path, save_original_format=save_original_format)
    file = tmp_path / "model.safetensors"
    with safe_open(file, "pt") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    prefix = "model." if model_class is Step3ForCausalLM else ""
    hole = f"{prefix}layers.2.self_attn.k_proj.weight"
    del state[hole]
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"missing {hole.replace('.', '[.]')}"):
        model_class.from_pretrained(tmp_path)

    state[hole] = torch.zeros(3, config.hidden_size)
    save_file(state, file, metadata={"format": "pt"})
    wrong_shape = f"wrong shape {hole.replace('.', '[.]')}: expected \\(16, 64\\), found \\(3, 64\\)"
    with pytest.raises(ValueError, match=wrong_shape):
        model_class.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ eager vs SDPA


def padded_batch(prompts: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids (counting real tokens only) of a batch padded on `side`."""
    width = max(map(len, prompts))
    rows = [[PAD] * (width - len(p)) + p if side == "left" else p + [PAD] * (width - len(p)) for p in prompts]
    masks = [[int(i < len(p)) for i in range(width)] for p in prompts]
    mask = torch.tensor([m[::-1] for m in masks]) if side == "left" else torch.tensor(masks)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return torch.tensor(rows), mask, position_ids


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model_class", ALL_MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_eager_matches_sdpa_on_padded_batches(causal_lm_checkpoint, model_class, padding_side):
    """Each real position of a padded batch gives, under eager and under SDPA, what its prompt gives alone; for the
    causal LM that is the float64 reference's logits."""
    path, config, state = causal_lm_checkpoint
    prompts = [[1, 17, 33, 90, 4, 5, 6], [1, 200], [1, 8, 9, 10, 77]]
    input_ids, attention_mask, position_ids = padded_batch(prompts, padding_side)
    sdpa = model_class.from_pretrained(path, attn_implementation="sdpa").eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")

    outputs = {}
    for name, model in (("eager", eager), ("sdpa", sdpa)):
        kwargs = dict(attention_mask=attention_mask, position_ids=position_ids)
        outputs[name] = first_output(model, {"input_ids": input_ids, **kwargs})
    real = attention_mask.bool()
    torch.testing.assert_close(outputs["eager"][real], outputs["sdpa"][real], rtol=1e-5, atol=1e-5)
    for row, prompt in enumerate(prompts):
        alone = first_output(sdpa, {"input_ids": torch.tensor([prompt])})[0]
        torch.testing.assert_close(outputs["eager"][row][real[row]], alone, rtol=1e-5, atol=1e-5)
        if model_class is Step3ForCausalLM:
            reference = step3_logits(state, config, torch.tensor([prompt]))[0]
            torch.testing.assert_close(alone.double(), reference, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ compile


def test_forward_compiles_fullgraph_with_a_static_cache_and_never_recompiles(causal_lm_checkpoint):
    """One graph for the prefill, one for a decode step, and the same one for every later step."""
    path, config, _ = causal_lm_checkpoint
    assert Step3ForCausalLM._can_compile_fullgraph
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    caches = [StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for step, (start, end) in enumerate([(0, 5), (5, 6), (6, 7), (7, 8), (8, 9)]):
            kwargs = dict(use_cache=True, position_ids=torch.arange(start, end)[None].expand(2, -1))
            ours = compiled(ids[:, start:end], cache=caches[0], **kwargs).logits
            plain = model(ids[:, start:end], cache=caches[1], **kwargs).logits
            torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
            assert counter.frame_count == min(step + 1, 2), step
    torch._dynamo.reset()


def test_static_cache_generate_compiles_fullgraph_without_recompiling(causal_lm_checkpoint):
    path, *_ = causal_lm_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    input_ids, attention_mask, _ = padded_batch([[1, 17, 33, 90, 4], [1, 200, 7]], "left")
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                              cache_implementation="static")  # fmt: skip
    with torch.no_grad():
        expected = model.generate(input_ids, attention_mask=attention_mask, generation_config=config)
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # transformers' switch for compiling on CPU, meant for tests
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=attention_mask, generation_config=config, compile_config=compile_config
        )
    assert hasattr(model, "_compiled_call")  # the decode steps did run compiled
    assert torch.equal(out, expected)
    # Another prompt length and more new tokens: the cache keeps its (bucketed) length, so the graph is reused.
    longer_ids, longer_mask, _ = padded_batch([[1, 17, 33, 90, 4, 5, 6, 7], [1, 200, 7]], "left")
    longer = GenerationConfig(max_new_tokens=9, do_sample=False, pad_token_id=PAD, eos_token_id=None,
                              cache_implementation="static")  # fmt: skip
    with torch.no_grad():
        expected = model.generate(longer_ids, attention_mask=longer_mask, generation_config=longer, disable_compile=True)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        out = model.generate(
            longer_ids, attention_mask=longer_mask, generation_config=longer, compile_config=compile_config
        )
    assert torch.equal(out, expected)
    torch._dynamo.reset()


# ------------------------------------------------------------------------ tensor, expert and data parallelism

# Every two-rank layout runs in one CPU (gloo) launch of `tp_worker.py`, one after the other: one process start-up.
TWO_RANK_LAYOUTS = [
    "tp", "ep", "tp_ep", "tp_train", "tp_ep_train", "dp_ep_train", "fsdp_train", "dp_ep", "tp_odd_heads",
    "fp8_tp", "fp8_ep", "fp8_tp_split_tiles",
]  # fmt: skip


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> Path:
    """A tiny block-FP8 checkpoint (16 x 16 tiles, every quantized dimension whole tiles, and whole tiles per rank
    of 2 wherever TP splits one)."""
    return write_tiny_fp8_checkpoint(tmp_path_factory.mktemp("fp8"), vl=False, seed=3)


@pytest.fixture(scope="module")
def two_ranks(causal_lm_checkpoint, fp8_checkpoint, tmp_path_factory) -> dict[str, dict]:
    path, _, _ = causal_lm_checkpoint
    out = tmp_path_factory.mktemp("two_ranks")
    return run_layouts(path, out, TWO_RANK_LAYOUTS, world=2, fp8_model_path=fp8_checkpoint)


def one_process_logits_and_tokens(path: Path, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    single = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs).eval()
    input_ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        return single(input_ids).logits, single.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_tensor_parallel_lm_head_of_an_odd_vocabulary_gives_the_full_logits(causal_lm_checkpoint, two_ranks):
    """Two CPU ranks (gloo) with `tp_plan="auto"`: the head's vocabulary shards are uneven (126 and 125 rows of
    251) and each splits at its own aligned row count; the gathered logits are the final hidden states times the
    whole head weight, in float64."""
    path, config, state = causal_lm_checkpoint
    tp = layout_result(two_ranks, "tp")
    assert tp["local_rows"] == 126
    torch.testing.assert_close(tp["head_weight"], state["lm_head.weight"], rtol=0, atol=0)
    reference = tp["hidden"].double() @ state["lm_head.weight"].double().T
    assert tp["logits"].shape == (2, 7, config.vocab_size)
    torch.testing.assert_close(tp["logits"].double(), reference, rtol=1e-5, atol=1e-5)
    # The whole plan (MFA, dense and shared-expert MLPs, routed experts, head) against one process.
    logits, tokens = one_process_logits_and_tokens(path)
    torch.testing.assert_close(tp["logits"], logits, rtol=1e-5, atol=1e-5)
    assert tp["tokens"].tolist() == tokens.tolist()


@pytest.mark.parametrize("layout", ["ep", "tp_ep"])
def test_expert_parallel_alone_and_with_tensor_parallel_match_one_process(causal_lm_checkpoint, two_ranks, layout):
    """Two CPU ranks (gloo): `ep` splits the 6 experts 3 and 3 and keeps the rest whole
    (`DistributedConfig(tp_size=2, ep_size=2, tp_plan={})`); `tp_ep` adds the TP plan on the same two ranks
    (`tp_plan="auto"`). Logits and greedy tokens equal one process's."""
    path, config, _ = causal_lm_checkpoint
    parallel = layout_result(two_ranks, layout)
    logits, tokens = one_process_logits_and_tokens(path)
    assert parallel["local_rows"] == (config.vocab_size if layout == "ep" else 126)  # EP alone leaves the head whole
    torch.testing.assert_close(parallel["logits"], logits, rtol=1e-5, atol=1e-5)
    assert parallel["tokens"].shape == (2, 7 + NEW_TOKENS)
    assert parallel["tokens"].tolist() == tokens.tolist()


@pytest.mark.parametrize("layout", ["tp_train", "tp_ep_train", "dp_ep_train"])
def test_a_training_step_under_tensor_parallelism_gives_the_loss_and_gradients_of_one_process(
    causal_lm_checkpoint, two_ranks, layout
):
    """One fp32 batch, backward on two CPU ranks: the mean loss and the whole gradients (gathered with
    `full_tensor()`) of split (`wq`, `o_proj`, MLPs, head, experts) and replicated (`q_proj`, `k_proj`, embedding)
    parameters equal one process's. `tp_train`: `tp_plan="auto"`, whose replicated K/V head sees only each rank's
    query heads, so its gradient is summed over the ranks (without that sum every gradient below the head was
    wrong). `tp_ep_train`: the experts split as well. `dp_ep_train`: FSDP with EP, each rank on its own row, the
    experts' tokens exchanged all-to-all and the gradients averaged over the ranks."""
    path, _, _ = causal_lm_checkpoint
    tp = layout_result(two_ranks, layout)
    single = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").train()
    input_ids = torch.tensor(INPUT_IDS)
    loss = single(input_ids, labels=input_ids).loss
    loss.backward()
    params = dict(single.named_parameters())
    torch.testing.assert_close(tp["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(tp["grads"]) == set(GRAD_NAMES)
    for name, grad in tp["grads"].items():
        assert params[name].grad.abs().max() > 0, name  # a gradient that is there to compare
        torch.testing.assert_close(grad, params[name].grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_fsdp2_fine_tuning_gives_the_losses_and_parameters_of_one_process(causal_lm_checkpoint, two_ranks):
    """`DistributedConfig(fsdp_size=2)`: each rank trains on its own row of the batch with the weights sharded
    (FSDP2); after `TRAIN_STEPS` SGD steps with momentum the mean loss of every step and every parameter equal one
    process trained on the whole batch (FSDP averages the ranks' gradients, and each rank's loss is a mean over as
    many label tokens)."""
    path, _, _ = causal_lm_checkpoint
    fsdp = layout_result(two_ranks, "fsdp_train")
    assert fsdp["wq_local_rows"] == 64  # the weights were sharded: half of wq's 128 rows per rank
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").train()
    input_ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():  # each rank trained on its own row (group g takes rows g::2)
        rows = [model(input_ids[row : row + 1], labels=input_ids[row : row + 1]).loss for row in range(2)]
    torch.testing.assert_close(fsdp["first_rank_losses"], torch.stack(rows), rtol=1e-5, atol=1e-6)
    losses = sgd_losses(model, input_ids)
    torch.testing.assert_close(fsdp["losses"], losses, rtol=1e-5, atol=1e-6)
    assert losses[-1] < losses[0]  # the steps trained
    params = dict(model.named_parameters())
    assert set(fsdp["params"]) == set(params)
    for name, param in fsdp["params"].items():
        torch.testing.assert_close(param, params[name].detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_attention_data_parallel_with_expert_parallel_matches_one_process(causal_lm_checkpoint, two_ranks):
    """`attention_data_parallel_config(2)` (`fsdp_size=2, ep_size=2`, dense weights kept whole): rank r computes
    attention (and holds the KV cache) for its own sequence only, holds 3 of the 6 experts, and the ranks exchange
    tokens all-to-all. The attention weights load sharded (64 of `wq`'s 128 rows) and stay whole after the first
    forward. The ranks' logits and greedy tokens equal one process's (each row is its own: no padding, and routing
    is per token)."""
    path, _, _ = causal_lm_checkpoint
    dp_ep = layout_result(two_ranks, "dp_ep")
    assert dp_ep["groups"] == 2 and dp_ep["local_experts"] == 3
    assert dp_ep["wq_local_rows"] == (64, 128)
    logits, tokens = one_process_logits_and_tokens(path)
    torch.testing.assert_close(dp_ep["logits"], logits, rtol=1e-5, atol=1e-5)
    assert dp_ep["tokens"].tolist() == tokens.tolist()
    # The ranks decode apart: rank 1 a shorter prompt for more steps (generate keeps the finished rank stepping, so
    # the all-to-all of every layer meets its peer).
    single = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    for group, ragged in enumerate(dp_ep["ragged_tokens"]):
        expected = ragged_generate(single, group)
        assert ragged.shape == (1, ragged_prompt_length(group) + ragged_new_tokens(group))
        assert ragged.tolist() == expected.tolist()


def test_from_pretrained_under_tp_refuses_a_head_count_the_ranks_do_not_divide(two_ranks):
    """Two ranks, the checkpoint's 8 heads overridden to 3 in its config: each rank's `from_pretrained` raises the
    error naming the field before a weight loads (loading first would have failed on the weights' shapes instead;
    before the check, a split head failed in the first forward's reshape)."""
    error = two_ranks["tp_odd_heads"]["error"]
    assert error is not None and error.startswith(
        "ValueError: num_attention_heads (3) does not divide over tp_size (2) ranks"
    ), error


@pytest.mark.parametrize("layout", ["fp8_tp", "fp8_ep"])
def test_fp8_checkpoint_under_tensor_or_expert_parallel_matches_one_process(fp8_checkpoint, two_ranks, layout):
    """The block-FP8 checkpoint on two CPU ranks, loaded in float32 (transformers dequantizes each rank's slice of
    the float8 weights with its slice of `weight_scale_inv`): `fp8_tp` (`tp_plan="auto"`) splits `wq`, `o_proj`,
    the shared expert and the head, `fp8_ep` the experts. The gathered weights equal one process's (which loads the
    same checkpoint, dequantized whole), and so do the logits and greedy tokens."""
    stored = {}  # the split weights are stored as float8
    for file in fp8_checkpoint.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            stored.update({name: handle.get_slice(name).get_dtype() for name in handle.keys()})
    for name in ("model.layers.0.self_attn.wq.weight", "model.layers.1.share_expert.up_proj.weight",
                 "model.layers.1.moe.gate_proj.weight"):  # fmt: skip
        assert stored[name] == "F8_E4M3" and stored[name + "_scale_inv"] == "F32", name
    parallel = layout_result(two_ranks, layout)
    if layout == "fp8_tp":
        assert parallel["wq_local_rows"] == (64, 64) and parallel["local_rows"] == 128
    else:
        assert parallel["local_experts"] == 3
    single = AutoModelForCausalLM.from_pretrained(fp8_checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    params = dict(single.named_parameters())
    assert set(parallel["weights"]) == set(WEIGHT_NAMES)
    for name, weight in parallel["weights"].items():
        assert weight.dtype == torch.float32, name
        torch.testing.assert_close(weight, params[name].detach(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    logits, tokens = one_process_logits_and_tokens(fp8_checkpoint, dtype=torch.float32)
    torch.testing.assert_close(parallel["logits"], logits, rtol=1e-5, atol=1e-5)
    assert parallel["tokens"].tolist() == tokens.tolist()


def test_fp8_tensor_parallel_refuses_sizes_that_split_a_tile(two_ranks):
    """The FP8 checkpoint with `share_expert_dim` overridden to 48 (3 tiles of 16 rows): 2 TP ranks would take 24
    rows each, and transformers slices the scales by their own grid (2 tile rows and 1), so each rank's shared
    expert would be dequantized with the wrong scales (without the check, a checkpoint written with these widths
    loaded and gave logits off by 5e-2 of 1.35, no error). `from_pretrained` refuses before a weight loads, naming
    the weight, the field and the sizes."""
    error = two_ranks["fp8_tp_split_tiles"]["error"]
    assert SPLIT_TILES == {"share_expert_dim": 48} and TINY_FP8_BLOCK_SIZE == (16, 16)
    assert error is not None and error.startswith(
        "ValueError: model.layers.*.mlp.shared_expert.gate_proj.weight (48 x 64) is block-FP8 in 16 x 16 tiles: "
        "tp_size (2) would split its rows (share_expert_dim = 48) into 24 per rank"
    ), error


# ----------------------------------------------------------------------------- deprecations, introspection


def test_past_key_values_is_taken_as_the_cache_and_warns_where_transformers_renamed_it(causal_lm_checkpoint):
    path, config, _ = causal_lm_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        prefix = model(ids[:, :5], use_cache=True)
        cache = getattr(prefix, _CACHE_NAME)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = model(ids[:, 5:], past_key_values=cache, use_cache=True)
        full = model(ids)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 6  # the cache passed under the old name was the one used
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning) and "past_key_values" in str(w.message)]
    # transformers 5.24 renamed the argument to `cache`; before that `past_key_values` is the current name.
    assert len(deprecations) == (1 if _CACHE_NAME == "cache" else 0), [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "method, returns",
    [(Step3Model.forward, MoeModelOutputWithPast), (Step3ForCausalLM.forward, MoeCausalLMOutputWithPast)],
    ids=["Step3Model", "Step3ForCausalLM"],
)
def test_forward_signatures_are_introspectable(method, returns):
    """Tools (and transformers' own tests) read the forward's return type and parameters from its signature."""
    signature = inspect.signature(method)
    assert signature.return_annotation is returns
    assert "cache" in signature.parameters and "past_key_values" not in signature.parameters
    assert typing.get_type_hints(method)["return"] is returns


def test_router_logits_are_recorded_for_every_moe_layer():
    config, inputs = TESTER.prepare_config_and_inputs()
    model = Step3ForCausalLM(config).eval()
    with torch.no_grad():
        out = model(**inputs, output_router_logits=True)
    tokens = TESTER.batch_size * TESTER.seq_length
    assert [tuple(logits.shape) for logits in out.router_logits] == [(tokens, config.moe_num_experts)] * 2
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


def test_modeling_file_holds_only_the_model():
    """transformers greps the modeling file (attention interface, experts decorator); the loading checks, the
    checkpoint's names and the kernel defaults live elsewhere."""
    source = Path(step3_hf.modeling_step3.__file__).read_text()
    assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in source and "@use_experts_implementation" in source
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "__future__" not in imported
    assert not any("kernels" in name or "inspect_checkpoint" in name for name in imported), imported


@pytest.mark.parametrize("preferred", [False, True], ids=["cpu_default", "cuda_default"])
def test_default_kernels_are_chosen_outside_the_modeling_file(monkeypatch, preferred):
    from step3_hf.kernels import MFA_DECODE_ATTENTION, MOE_DECODE_EXPERTS, defaults

    monkeypatch.setattr(defaults, "decode_kernel_preferred", lambda: preferred)
    model = Step3ForCausalLM(TESTER.get_config())
    expected = (MFA_DECODE_ATTENTION, MOE_DECODE_EXPERTS) if preferred else ("sdpa", "grouped_mm")
    assert (model.config._attn_implementation, model.config._experts_implementation) == expected
    config = TESTER.get_config()
    config._attn_implementation = "eager"
    assert Step3ForCausalLM(config).config._attn_implementation == "eager"  # a named implementation wins
