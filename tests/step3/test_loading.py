"""Loading and saving the official layout: round trips, shards, dtypes, device maps, clear errors, sizes."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import step3_hf  # noqa: F401
from step3_hf import Step3Config, Step3ForCausalLM, Step3VLConfig, Step3VLForCausalLM, count_parameters
from step3_hf.checkpoint_layout import module_name, official_names, official_tensor_shapes
from step3_hf.tiny_checkpoint import (
    TINY_CONFIG,
    random_official_state_dict,
    write_official_checkpoint,
    write_tiny_checkpoint,
)

IDS = torch.tensor([[1, 5, 9, 200, 31, 7], [1, 2, 3, 4, 5, 6]])


def saved_tensors(path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


@pytest.mark.parametrize("vl", [True, False], ids=["step3_vl", "step3_text"])
def test_auto_classes_pick_the_right_model(tmp_path, vl):
    write_tiny_checkpoint(tmp_path, vl=vl)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, Step3VLConfig if vl else Step3Config)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model) is (Step3VLForCausalLM if vl else Step3ForCausalLM)


def test_vision_tensors_are_skipped_with_a_message(tmp_path, caplog):
    write_tiny_checkpoint(tmp_path, vl=True)
    assert any(name.startswith("vision_model.") for name in saved_tensors(tmp_path))
    with caplog.at_level("WARNING"):
        _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert "vision tower's tensors" in caplog.text and "skipped" in caplog.text


@pytest.mark.parametrize("vl", [True, False], ids=["step3_vl", "step3_text"])
def test_save_writes_official_layout_and_reloads_identically(tmp_path, vl):
    write_tiny_checkpoint(tmp_path / "src", vl=vl)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    model.save_pretrained(tmp_path / "out", max_shard_size="40KB")

    text_config = model.config.get_text_config()
    assert saved_tensors(tmp_path / "out") == official_tensor_shapes(text_config)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # sharded
    # Only the language model exists in memory, so both forms are written as the official text-only checkpoint,
    # under the architecture name vLLM / SGLang dispatch on.
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "step3_text" and saved["architectures"] == ["Step3TextForCausalLM"]
    for key in ("num_attention_groups", "share_q_dim", "share_expert_dim", "max_position_embedding",
                "moe_num_experts", "moe_top_k", "norm_expert_weight", "rope_theta"):
        assert key in saved, key
    assert saved["moe_layers_enum"] == "1,2"
    assert not any(value is None and key.startswith("max_position") for key, value in saved.items())
    assert type(model.config) is (Step3VLConfig if vl else Step3Config)  # the model's own config is unchanged

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is Step3ForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_official_names_invert_the_module_names_of_a_built_model():
    """Every weight of a built model maps to official names that partition the official layout, and back."""
    config = Step3Config(**TINY_CONFIG)
    modules = Step3ForCausalLM(config).state_dict()
    official = official_tensor_shapes(config)
    mapped = [o for name in modules for o in official_names(name)]
    assert sorted(mapped) == sorted(official)
    for name in modules:
        names = official_names(name)
        assert len(names) == (2 if name.endswith("experts.gate_up_proj") else 1)
        if len(names) == 1:
            assert module_name(names[0]) == name
            assert official[names[0]] == tuple(modules[name].shape)
        else:  # gate rows, then up rows
            assert [official[n] for n in names] == [tuple(part.shape) for part in modules[name].chunk(2, dim=1)]


def test_dtype_auto_keeps_bf16_and_device_map_auto_splits_at_decoder_layers(tmp_path):
    write_tiny_checkpoint(tmp_path, vl=True, dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").eval()
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    # A memory budget that fits the embedding and one layer forces accelerate to place (and offload) the rest.
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype="auto", device_map="auto", max_memory={"cpu": "260KB"}, offload_folder=tmp_path / "offload"
    ).eval()
    placed = model.hf_device_map
    assert placed["model.layers.0"] == "cpu" and placed["model.layers.3"] == "disk"
    assert not any(name.count(".") > 2 for name in placed), placed  # never inside a Step3DecoderLayer
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "tensor", ["model.layers.3.post_attention_layernorm.weight", "model.layers.1.moe.up_proj.weight"]
)
def test_missing_tensor_is_an_error_naming_it(tmp_path, tensor):
    config = Step3Config(**TINY_CONFIG)
    state = random_official_state_dict(config)
    del state[tensor]
    write_official_checkpoint(tmp_path, state, config)
    with pytest.raises(ValueError, match="missing " + tensor.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_tensor_is_an_error_naming_it(tmp_path):
    config = Step3Config(**TINY_CONFIG)
    state = random_official_state_dict(config)
    state["model.layers.0.self_attn.wq.weight"] = torch.zeros(10, config.share_q_dim)
    write_official_checkpoint(tmp_path, state, config)
    with pytest.raises(ValueError, match=r"wrong shape model\.layers\.0\.self_attn\.wq\.weight: expected \(128, 32\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_tensor_is_refused_after_loading_too(tmp_path, monkeypatch):
    """The post-load check (hub paths, where no header pre-check runs) refuses a partly random base model."""
    import step3_hf.loading as loading

    monkeypatch.setattr(loading, "check_checkpoint_files", lambda *args, **kwargs: None)
    config = Step3Config(**TINY_CONFIG)
    state = random_official_state_dict(config)
    del state["model.norm.weight"]
    write_official_checkpoint(tmp_path, state, config)
    with pytest.raises(ValueError, match=r"only part of Step3ForCausalLM: 1 tensor\(s\) missing: model\.norm\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_is_reported_not_refused(tmp_path):
    """As for every transformers model, a tensor the model has no place for is reported and left out."""
    config = Step3Config(**TINY_CONFIG)
    state = random_official_state_dict(config)
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(config.head_dim)
    write_official_checkpoint(tmp_path, state, config)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["unexpected_keys"]) == {"model.layers.0.self_attn.q_norm.weight"}
    assert not info["missing_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(model.model.norm.weight, state["model.norm.weight"], rtol=0, atol=0)


def test_tensor_the_index_promises_but_the_shard_lacks_is_an_error_naming_it(tmp_path):
    write_tiny_checkpoint(tmp_path, vl=False)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.2.moe.down_proj.weight"
    other = next(file for file in sorted(set(index["weight_map"].values())) if file != index["weight_map"][name])
    index["weight_map"][name] = other
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"maps {name.replace('.', '[.]')} to {other}, which does not contain it"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_shard_file_is_an_error_naming_it_and_a_tensor_in_it(tmp_path):
    write_tiny_checkpoint(tmp_path, vl=False)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    shard.unlink()
    first = next(name for name, file in weight_map.items() if file == shard.name)
    with pytest.raises(ValueError, match=f"names shard {shard.name} \\(e.g. for {first.replace('.', '[.]')}\\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_truncated_shard_error_names_the_tensors_cut_off(tmp_path):
    write_tiny_checkpoint(tmp_path, vl=False)
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    with safe_open(shard, "pt") as handle:
        names = list(handle.keys())
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut off: ") as caught:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    # The file's last tensor (all fp32, so stored in name order) is the one the missing bytes belonged to.
    assert max(names) in str(caught.value)


def test_wrong_shape_is_reported_when_mismatched_sizes_are_ignored(tmp_path):
    config = Step3Config(**TINY_CONFIG)
    state = random_official_state_dict(config)
    state["model.layers.0.self_attn.wq.weight"] = torch.zeros(10, config.share_q_dim)
    write_official_checkpoint(tmp_path, state, config)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True, output_loading_info=True)
    assert [key for key, *_ in info["mismatched_keys"]] == ["model.layers.0.self_attn.wq.weight"]


def test_full_size_model_on_meta_device_has_the_published_size():
    config = Step3Config()
    with torch.device("meta"):
        model = Step3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    counts = count_parameters(config)
    assert total == counts.total
    assert round(total / 1e9, 1) == 316.3
    assert 37.5e9 < counts.activated < 38.5e9
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert experts == counts.routed_experts
