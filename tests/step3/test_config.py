"""Step3Config: released defaults, official spellings in and out, and errors that name the field."""

import json

import pytest
import torch
from transformers import AutoConfig

import step3_hf  # noqa: F401
from step3_hf import Step3Config, Step3VLConfig
from step3_hf.tiny_checkpoint import TINY_CONFIG

# The `text_config` of the official `stepfun-ai/step3` config.json, with its legacy spellings.
OFFICIAL_TEXT_CONFIG = {
    "architectures": ["Step3TextForCausalLM"],
    "model_type": "step3_text",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "num_attention_heads": 64,
    "num_attention_groups": 1,
    "num_hidden_layers": 61,
    "max_seq_len": 65536,
    "vocab_size": 128815,
    "moe_intermediate_size": 5120,
    "moe_num_experts": 48,
    "moe_top_k": 3,
    "rope_theta": 500000,
    "rope_scaling": None,
    "max_position_embedding": 65536,
    "share_expert_dim": 5120,
    "share_q_dim": 2048,
    "head_dim": 256,
    "norm_expert_weight": False,
    "moe_layers_enum": ",".join(str(i) for i in range(4, 60)),
    "torch_dtype": "bfloat16",
}


def test_defaults_are_the_released_model():
    config = Step3Config()
    for key, value in OFFICIAL_TEXT_CONFIG.items():
        if key not in ("architectures", "torch_dtype", "rope_theta", "rope_scaling"):
            assert getattr(config, key) == value, key
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert config.rms_norm_eps == 1e-5 and config.hidden_act == "silu" and not config.tie_word_embeddings
    dense = [i for i in range(61) if i not in config.moe_layer_indices]
    assert dense == [0, 1, 2, 3, 60]


def test_generic_names_read_the_official_fields():
    config = Step3Config(num_attention_groups=4, max_position_embedding=1234, moe_num_experts=8, moe_top_k=2)
    assert config.num_key_value_heads == 4
    assert config.max_position_embeddings == 1234
    assert (config.num_experts, config.num_local_experts, config.num_experts_per_tok) == (8, 8, 2)


@pytest.mark.parametrize("layers", ["1, 3,2", [3, 1, 2], (1, 2, 3)])
def test_moe_layers_enum_accepts_string_list_or_tuple(layers):
    config = Step3Config(num_hidden_layers=5, moe_layers_enum=layers)
    assert config.moe_layer_indices == (1, 2, 3)
    assert config.moe_layers_enum == "1,2,3"


def test_official_vl_file_loads_and_saves_back_in_official_form(tmp_path):
    official = {
        "architectures": ["Step3VLForConditionalGeneration"],
        "model_type": "step3_vl",
        "auto_map": {"AutoConfig": "configuration_step3.Step3VLConfig"},
        "text_config": OFFICIAL_TEXT_CONFIG,
        "vision_config": {"model_type": "step3_vision_encoder", "hidden_size": 1792, "num_hidden_layers": 63},
        "image_token_id": 128001,
        "bos_token_id": 0,
        "eos_token_id": 128805,
        "image_token_len": 169,
        "understand_projector_stride": 2,
        "projector_bias": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, Step3VLConfig) and isinstance(config.text_config, Step3Config)
    assert config.get_text_config().max_position_embeddings == 65536
    assert config.image_token_id == 128001

    config.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    text = saved["text_config"]
    assert saved["model_type"] == "step3_vl" and text["model_type"] == "step3_text"
    for key in ("max_position_embedding", "num_attention_groups", "share_q_dim", "share_expert_dim",
                "norm_expert_weight", "moe_num_experts", "moe_top_k", "moe_intermediate_size", "max_seq_len"):
        assert text[key] == OFFICIAL_TEXT_CONFIG[key], key
    assert text["rope_theta"] == 500000 and text["rope_scaling"] is None
    assert text["moe_layers_enum"] == OFFICIAL_TEXT_CONFIG["moe_layers_enum"]  # official loaders split on ","
    reloaded = AutoConfig.from_pretrained(tmp_path / "out").to_dict()
    assert {k: v for k, v in reloaded.items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"
    }


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"moe_top_k": 49}, "moe_top_k"),
        ({"moe_layers_enum": "4,61"}, "moe_layers_enum"),
        ({"moe_layers_enum": "4,x"}, "moe_layers_enum"),
        ({"num_attention_groups": 3}, "num_attention_groups"),
        ({"head_dim": 0}, "head_dim"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_fields_raise_value_error_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        Step3Config(**fields)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"attention_dropout": 1.5}, "attention_dropout"),
    ],
)
def test_out_of_range_fields_raise_value_error_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        Step3Config(**fields)


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"norm_expert_weight": "false"}, "norm_expert_weight"), ({"share_q_dim": 2048.0}, "share_q_dim")],
)
def test_wrongly_typed_fields_are_refused_naming_the_field(fields, named):
    # A string "false" would be truthy and silently renormalise the router.
    with pytest.raises(Exception, match=named):
        Step3Config(**fields)


def test_vl_config_refuses_a_foreign_text_config():
    with pytest.raises(ValueError, match="text_config.model_type"):
        Step3VLConfig(text_config={"model_type": "llama", "hidden_size": 64})


@pytest.mark.parametrize("theta", [0.0, -10000.0, float("nan"), float("inf"), "500000"])
@pytest.mark.parametrize("spelling", ["rope_theta", "rope_parameters"])
def test_rope_theta_must_be_positive_and_finite(theta, spelling):
    # A base <= 0 gives NaN inverse frequencies: every attention output of the built model would be NaN.
    if spelling == "rope_theta":
        fields = {"rope_theta": theta}
    else:
        fields = {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    with pytest.raises(ValueError, match="`rope_theta` must be a positive, finite number"):
        Step3Config(**fields)
    with pytest.raises(ValueError, match="`rope_theta`"):
        Step3VLConfig(text_config=fields)


def test_a_small_positive_rope_theta_gives_finite_frequencies():
    from step3_hf.modeling_step3 import Step3RotaryEmbedding

    config = Step3Config(**{**TINY_CONFIG, "rope_theta": 0.5})
    inv_freq = Step3RotaryEmbedding(config).inv_freq.double()
    reference = 0.5 ** -(torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    torch.testing.assert_close(inv_freq, reference, rtol=1e-6, atol=0)
