"""Accounting from config.json files, dicts and transformers config objects equals the presets;
configs the model cannot count fail with an error that names what is missing."""

import json
from importlib import resources

import pytest
import transformers

from step3_hf.configuration_step3 import Step3Config, Step3VLConfig
from step3_hf.cost_model import PRESETS, UnsupportedConfigError, model_spec, per_token


def preset_dict(name):
    text = resources.files("step3_hf.cost_model.presets").joinpath(f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def figures(source, context=8192):
    d = per_token(source, context).to_dict()
    d.pop("model")
    return d


@pytest.mark.parametrize("name", PRESETS)
def test_config_json_file_and_folder_equal_preset(tmp_path, name):
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(preset_dict(name)))
    assert figures(str(path)) == figures(name)
    assert figures(path.parent) == figures(name)  # a checkpoint folder works too
    assert model_spec(str(path)).name == name  # labelled by its folder


def test_official_step3_vl_config_json_uses_text_config(tmp_path):
    # The released file is a step3_vl wrapper: the language model sits under text_config.
    official = {
        "model_type": "step3_vl",
        "architectures": ["Step3VLForConditionalGeneration"],
        "text_config": preset_dict("step3"),
        "vision_config": {"model_type": "step3_vision_encoder", "hidden_size": 1792, "num_hidden_layers": 63},
        "image_token_id": 128001,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(official))
    assert figures(str(path)) == figures("step3")
    assert model_spec(str(path)).attention.family == "MFA"


def test_step3_config_objects_equal_preset():
    # The project's own classes (model_type step3_text / step3_vl), read by attribute name.
    assert figures(Step3Config()) == figures("step3")
    assert figures(Step3VLConfig()) == figures("step3")
    small = Step3Config(num_hidden_layers=6, moe_layers_enum="1,2,3,4", moe_num_experts=8, moe_top_k=2)
    spec = model_spec(small)
    assert (spec.ffn.dense_layers, spec.ffn.moe_layers, spec.ffn.experts, spec.ffn.top_k) == (2, 4, 8, 2)


def test_transformers_config_objects_equal_presets():
    cases = {
        "deepseek-v3": transformers.DeepseekV3Config,
        "kimi-k2": transformers.DeepseekV3Config,  # Kimi K2 ships the DeepSeek-V3 architecture
        "qwen3-235b-a22b": transformers.Qwen3MoeConfig,
        "qwen3-32b": transformers.Qwen3Config,
    }
    for name, cls in cases.items():
        cfg = cls(**{k: v for k, v in preset_dict(name).items() if k != "model_type"})
        assert figures(cfg) == figures(name), name
        assert figures(cfg, 32768) == figures(name, 32768), name


def test_families_and_layouts():
    assert model_spec("step3").attention.family == "MFA"
    assert model_spec("kimi-k2").attention.family == "MLA"
    assert model_spec("qwen3-235b-a22b").attention.family == "GQA"
    s3 = model_spec("step3").ffn
    assert (s3.dense_layers, s3.moe_layers, s3.shared_experts) == (5, 56, 1)  # dense 0-3 and 60
    ds = model_spec("deepseek-v3").ffn
    assert (ds.dense_layers, ds.moe_layers, ds.experts, ds.top_k) == (3, 58, 256, 8)
    assert model_spec("kimi-k2").ffn.dense_layers == 1
    assert model_spec("qwen3-32b").ffn.moe_layers == 0 and model_spec("qwen3-32b").ffn.sparsity is None
    # MHA: no num_key_value_heads means one KV head per query head; head_dim from hidden / heads.
    mha = model_spec({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "intermediate_size": 11008})
    assert mha.attention.family == "MHA" and mha.attention.kv_elements_per_layer == 2 * 4096


def test_unsupported_family_names_what_is_missing():
    mamba = {"model_type": "mamba", "hidden_size": 768, "num_hidden_layers": 24, "intermediate_size": 1536}
    with pytest.raises(UnsupportedConfigError, match=r"attention family.*'mamba'.*missing: num_attention_heads"):
        model_spec(mamba)


def test_hybrid_and_sliding_layers_are_refused():
    base = {"model_type": "hybrid", "hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2, "intermediate_size": 4096}
    with pytest.raises(UnsupportedConfigError, match="linear_attention, sliding_attention"):
        model_spec({**base, "layer_types": ["full_attention", "linear_attention", "sliding_attention", "full_attention"]})
    with pytest.raises(UnsupportedConfigError, match="attn_type_list"):
        model_spec({**base, "model_type": "minimax_m1", "attn_type_list": [0, 1, 0, 1]})
    with pytest.raises(UnsupportedConfigError, match="attention_chunk_size"):
        model_spec({**base, "model_type": "llama4_text", "attention_chunk_size": 8192})


def test_missing_fields_are_named():
    broken = preset_dict("step3")
    del broken["share_q_dim"]
    with pytest.raises(UnsupportedConfigError, match=r"MFA.*missing share_q_dim"):
        model_spec(broken)
    mla = preset_dict("deepseek-v3")
    del mla["qk_rope_head_dim"], mla["v_head_dim"]
    with pytest.raises(UnsupportedConfigError, match="missing qk_rope_head_dim, v_head_dim"):
        model_spec(mla)
    moe = preset_dict("qwen3-235b-a22b")
    del moe["num_experts_per_tok"]
    with pytest.raises(UnsupportedConfigError, match="missing num_experts_per_tok"):
        model_spec(moe)
    with pytest.raises(UnsupportedConfigError, match="missing hidden_size"):
        model_spec({"model_type": "x", "num_hidden_layers": 2})
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        model_spec("no-such-model")
    with pytest.raises(ValueError, match="context must be at least 1"):
        per_token("step3", 0)


def test_cost_model_imports_without_torch_or_transformers():
    # step3_hf/__init__ registers the model classes (torch); the cost model must not need that, so
    # load it under a bare parent package with torch and transformers made unimportable.
    import subprocess
    import sys
    from pathlib import Path

    import step3_hf.cost_model as cm

    parent = str(Path(cm.__file__).resolve().parents[1])
    code = f"""
import sys, types
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
pkg = types.ModuleType('step3_hf'); pkg.__path__ = [{parent!r}]; sys.modules['step3_hf'] = pkg
import step3_hf.cost_model as cm, step3_hf.cost_model.cli
print(round(cm.cost_report('step3', 8192, cm.builtin_cards()).afd, 3))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "0.055"


def test_api_refuses_what_would_print_nonsense():
    import dataclasses

    from step3_hf.cost_model import Quantization, builtin_cards, check_context
    from step3_hf.cost_model.planner import PlanAssumptions, plan_afd

    h800 = builtin_cards()["H800"]
    for field, value in [("price_per_hour_usd", -2.0), ("memory_bandwidth", 0), ("nic_gbps", float("nan")),
                         ("gpus_per_server", 0), ("fp8_flops", "1e15")]:
        with pytest.raises(ValueError, match=f"`{field}` must be a positive"):
            dataclasses.replace(h800, **{field: value})
    for bad in (0, -1.0, 1 / 16, 4.5, "1"):
        with pytest.raises(ValueError, match="`kv_bytes` must be between 1/8 and 4 bytes"):
            Quantization(kv_bytes=bad)
    assert Quantization(weight_bytes=1 / 8, kv_bytes=4).weight_bytes == 0.125  # 1 and 32 bits are the bounds
    check_context(2**40)
    for bad in (0, 2**40 + 1, 8192.0, True):
        with pytest.raises(ValueError, match="context must be"):
            per_token("step3", bad)
    with pytest.raises(ValueError, match="context must be"):
        plan_afd("step3", h800, h800, 0)
    with pytest.raises(ValueError, match="`tpot_ms` must be a positive number"):
        PlanAssumptions(tpot_ms=0)
    with pytest.raises(ValueError, match="`micro_batch` must be an integer >= 1"):
        PlanAssumptions(micro_batch=0)
    step3 = preset_dict("step3")
    with pytest.raises(ValueError, match="`moe_layers_enum` must be layer indices from 0 to 60"):
        model_spec({**step3, "moe_layers_enum": "4,5,61"})
    with pytest.raises(ValueError, match="`share_expert_dim` must be a non-negative integer, got -1"):
        model_spec({**step3, "share_expert_dim": -1})
