"""device_map="auto" placement on the meta device: whole decoder layers, the layout transformers would compute, and
the 61 layers of the released config on 8 x 80 GB checked against hand arithmetic of the layer sizes."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from transformers.integrations.accelerate import _get_device_map

from step3_hf import Step3Config, Step3ForCausalLM
from step3_hf.device_map import layer_placement
from step3_hf.tiny_checkpoint import TINY_CONFIG

# The released text config, by hand (layers 0-3 and 60 dense, 4-59 MoE).
H, V, Q, HEADS, D, FFN, E, W, SHARED = 7168, 128815, 2048, 64, 256, 18432, 48, 5120, 5120
ATTENTION = H * Q + Q * HEADS * D + 2 * H * D + HEADS * D * H  # q_proj, wq, k_proj + v_proj, o_proj
NORMS = 2 * H + Q  # input and post-attention layernorms, inter_norm
DENSE_LAYER = ATTENTION + NORMS + 3 * H * FFN
MOE_QUANTISED = ATTENTION + E * 3 * H * W + 3 * H * SHARED
MOE_LAYER = MOE_QUANTISED + NORMS + E * H  # + router
GB80 = 80e9


def _tiny_meta():
    with init_empty_weights():
        return Step3ForCausalLM(Step3Config(**TINY_CONFIG))


def test_no_split_modules_name_the_decoder_layer():
    assert Step3ForCausalLM._no_split_modules == ["Step3DecoderLayer"]


@pytest.mark.parametrize("device_map", ["auto", "sequential"])
def test_tiny_placement_is_what_from_pretrained_computes(device_map):
    # Tight devices force a split; the placement must equal the map transformers builds for `from_pretrained`.
    layer_bytes = [sum(p.numel() for p in layer.parameters()) * 2 for layer in _tiny_meta().model.layers]
    budget = {0: 2 * max(layer_bytes), 1: 2 * max(layer_bytes), "cpu": 10**9}
    placement = layer_placement(Step3Config(**TINY_CONFIG), budget, device_map=device_map)
    model = _tiny_meta().to(torch.bfloat16)
    expected = _get_device_map(model, device_map, dict(budget), None)
    assert placement.device_map == dict(expected)
    assert len(set(placement.device_map.values())) >= 2
    # `_no_split_modules` holds: no key below a decoder layer, every layer placed whole.
    assert all(k.count(".") <= 2 for k in placement.device_map if k.startswith("model.layers."))
    assert len(placement.layer_devices()) == TINY_CONFIG["num_hidden_layers"]


def test_released_config_on_8x80GB_bf16():
    placement = layer_placement("step3", {i: GB80 for i in range(8)})
    sizes = placement.module_bytes
    assert all(sizes[f"model.layers.{i}"] == 2 * DENSE_LAYER for i in (0, 1, 2, 3, 60))
    assert all(sizes[f"model.layers.{i}"] == 2 * MOE_LAYER for i in range(4, 60))
    assert sizes["model.embed_tokens"] == 2 * V * H

    # Balancing cannot lower the cap: the weights/8 plus 1.25 MoE layers of slack exceed 80 GB.
    assert placement.max_memory == {i: GB80 for i in range(8)}
    # GPU 0 keeps the largest layer free (accelerate's offload reserve): embedding, 4 dense layers, then MoE layers.
    on_gpu0 = 4 + int((GB80 - 2 * MOE_LAYER - 2 * V * H - 4 * 2 * DENSE_LAYER) // (2 * MOE_LAYER))
    per_gpu = int(GB80 // (2 * MOE_LAYER))
    expected = [0] * on_gpu0
    for gpu in range(1, 8):
        expected += [gpu] * per_gpu
    expected += ["disk"] * (61 - len(expected))
    assert (on_gpu0, per_gpu) == (9, 7)
    assert placement.layer_devices() == expected
    assert placement.device_map["lm_head"] == "disk"  # bf16 Step-3 (632.6 GB) does not fit 8 x 80 GB
    assert json.loads(json.dumps(placement.to_dict()))["layer_devices"] == expected
    assert "layers 0-8, embed_tokens" in placement.table()


def test_released_config_on_16x80GB_bf16_is_balanced_by_the_largest_layer():
    # from_pretrained's balancing adds 1.25 x the largest no-split module (a MoE layer) to weights/16 per GPU;
    # slack from the first (dense) layer alone would be too little and push layers to disk.
    total = 2 * (2 * V * H + H + 5 * DENSE_LAYER + 56 * MOE_LAYER)
    placement = layer_placement("step3", {i: GB80 for i in range(16)})
    cap = placement.max_memory[0]
    assert cap == pytest.approx(total / 16 + 1.25 * 2 * MOE_LAYER, abs=1e4)
    devices = placement.layer_devices()
    assert devices == sorted(devices) and all(isinstance(d, int) for d in devices)
    assert max(placement.used_bytes().values()) <= cap


def test_released_config_on_8x80GB_fp8_fits_with_room_for_the_cache():
    placement = layer_placement("step3", {i: GB80 for i in range(8)}, weights="fp8")
    moe_fp8 = MOE_QUANTISED + 2 * (NORMS + E * H)
    assert placement.module_bytes["model.layers.30"] == moe_fp8
    devices = placement.layer_devices()
    assert devices == sorted(devices) and set(devices) == set(range(8))  # in order, every GPU, nothing offloaded
    used = placement.used_bytes()
    total = sum(used.values())
    assert total == pytest.approx(2 * 2 * V * H + 5 * (ATTENTION + 3 * H * FFN) + 56 * MOE_QUANTISED
                                  + 2 * (61 * NORMS + H + 56 * E * H), abs=1e4)  # + rotary buffer
    assert max(used.values()) < 0.7 * GB80


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="weights"):
        layer_placement("step3", {0: GB80}, weights="int4")
    with pytest.raises(ValueError, match="max_memory"):
        layer_placement("step3", {})
    with pytest.raises(ValueError, match="model_type 'deepseek_v3'"):
        layer_placement("deepseek-v3", {0: GB80})
