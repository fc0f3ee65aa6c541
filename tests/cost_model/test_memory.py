"""Memory planner (`step3-cost fit`): per-card weights, KV and decode working set of each layout, against hand
arithmetic of the released Step-3 config."""

import json
import math

import pytest

from step3_hf import Step3Config, count_parameters
from step3_hf.cost_model.cli import main
from step3_hf.cost_model.memory import fit_layouts, weight_params

# The released text config, by hand.
H, V, L, Q, HEADS, D, FFN, E, W, SHARED = 7168, 128815, 61, 2048, 64, 256, 18432, 48, 5120, 5120
DENSE, MOE = 5, 56
NORMS = L * (2 * H + Q) + H
ROUTER = MOE * E * H
Q_PROJ = L * H * Q
KV_PROJ = L * 2 * H * D  # one shared K and V head per layer
HEADS_PROJ = L * (Q * HEADS * D + HEADS * D * H)  # wq and o_proj
DENSE_MLP = DENSE * 3 * H * FFN
SHARED_MLP = MOE * 3 * H * SHARED
ROUTED = MOE * E * 3 * H * W
KV_PER_TOKEN_BF16 = L * 2 * D * 2
FP8 = 1 + 4 / 128**2


def _act(tokens, logits=True):
    return tokens * (2 * (6 * H + 3 * HEADS * D + 2 * (3 * W + SHARED)) + (6 * V if logits else 0))


def _layout(fit, name):
    return next(layout for layout in fit.layouts if layout.layout == name)


def test_weight_params_match_the_checkpoint_layout_count():
    p = weight_params("step3")
    assert p.total == count_parameters(Step3Config()).total == 2 * V * H + NORMS + ROUTER + Q_PROJ + KV_PROJ \
        + HEADS_PROJ + DENSE_MLP + SHARED_MLP + ROUTED
    assert (p.attention_replicated, p.attention_kv, p.routed_experts) == (Q_PROJ, KV_PROJ, ROUTED)
    # Other presets land on their published sizes.
    assert round(weight_params("deepseek-v3").total / 1e9) == 671
    assert round(weight_params("qwen3-235b-a22b").total / 1e9) == 235


def test_tp8_bf16_on_80GB_by_hand():
    fit = fit_layouts("step3", 80e9, 8, weights="bf16", kv="bf16", batch=64, context=8192)
    card = _layout(fit, "TP=8").loads[0]
    replicated = V * H + NORMS + ROUTER + Q_PROJ + KV_PROJ
    split = (HEADS_PROJ + DENSE_MLP + SHARED_MLP) / 8 + ROUTED * 6 / 48 + math.ceil(V / 8) * H
    assert card.weight_bytes == pytest.approx(2 * (replicated + split), rel=1e-12)
    assert card.kv_bytes == 64 * 8192 * KV_PER_TOKEN_BF16  # the single KV head is replicated on every rank
    assert card.activation_bytes == _act(64)
    assert card.headroom_bytes == pytest.approx(80e9 - 2e9 - card.weight_bytes - card.kv_bytes - card.activation_bytes)
    assert not card.fits and fit.weight_bytes == 2 * weight_params("step3").total


def test_ep_dp_attention_and_tp_x_ep_by_hand():
    fit = fit_layouts("step3", 96e9, 16, weights="fp8", kv="fp8", batch=256, context=4096, reserve_bytes=0)
    plain = V * H * 2 + NORMS + ROUTER
    quantised = Q_PROJ + KV_PROJ + HEADS_PROJ + DENSE_MLP + SHARED_MLP
    ep = _layout(fit, "EP=16").loads[0]
    assert ep.weight_bytes == pytest.approx(2 * plain + FP8 * (quantised + ROUTED * 3 / 48), rel=1e-12)
    assert ep.kv_bytes == 256 * 4096 * KV_PER_TOKEN_BF16 / 2
    dp = _layout(fit, "DP-attn+EP=16").loads[0]
    assert dp.weight_bytes == ep.weight_bytes and dp.kv_bytes == 16 * 4096 * KV_PER_TOKEN_BF16 / 2
    mixed = _layout(fit, "TP=4 x EP=4").loads[0]  # 4 groups of 4 TP ranks, experts over all 16 cards
    assert mixed.weight_bytes == pytest.approx(
        2 * (V * H + NORMS + ROUTER + math.ceil(V / 4) * H)
        + FP8 * (Q_PROJ + KV_PROJ + (HEADS_PROJ + DENSE_MLP + SHARED_MLP) / 4 + ROUTED * 3 / 48), rel=1e-12)
    assert mixed.kv_bytes == 64 * 4096 * KV_PER_TOKEN_BF16 / 2 and mixed.activation_bytes == _act(64)
    assert [layout.layout for layout in fit.layouts] == [
        "TP=16", "EP=16", "DP-attn+EP=16", "TP=2 x EP=8", "TP=4 x EP=4", "TP=8 x EP=2", "AFD 1A+1F"]


def test_afd_attention_and_ffn_cards_by_hand():
    fit = fit_layouts("step3", 80e9, 32, weights="bf16", kv="fp8", batch=512, context=8192, gpus_per_instance=8)
    assert [layout.layout for layout in fit.layouts if layout.layout.startswith("AFD")] == [
        "AFD 1A+3F", "AFD 2A+2F", "AFD 3A+1F"]
    attention, ffn = _layout(fit, "AFD 2A+2F").loads
    assert (attention.cards, ffn.cards) == (16, 16)
    assert attention.weight_bytes == 2 * (2 * V * H + NORMS + ROUTER + Q_PROJ + KV_PROJ + HEADS_PROJ)
    assert attention.kv_bytes == 32 * 8192 * KV_PER_TOKEN_BF16 / 2 and attention.activation_bytes == _act(32)
    assert ffn.weight_bytes == pytest.approx(2 * ((DENSE_MLP + SHARED_MLP) / 16 + ROUTED * 3 / 48), rel=1e-12)
    assert ffn.kv_bytes == 0 and ffn.activation_bytes == _act(512, logits=False)
    assert _layout(fit, "AFD 2A+2F").fits


def test_impossible_layouts_say_why():
    three = fit_layouts("step3", 80e9, 3)
    assert "64 query heads do not divide over 3 ranks" in _layout(three, "TP=3").impossible
    assert [layout.layout for layout in three.layouts if layout.layout.startswith("AFD")] == ["AFD 1A+2F", "AFD 2A+1F"]
    odd = fit_layouts("step3", 80e9, 24, gpus_per_instance=16)
    assert "24 cards do not make two or more instances of 16" in _layout(odd, "AFD (instances of 16)").impossible
    many = fit_layouts("step3", 80e9, 64)
    assert "48 experts cannot be split over 64 ranks" in _layout(many, "EP=64").impossible
    assert not _layout(many, "EP=64").fits
    dense = fit_layouts("qwen3-32b", 80e9, 8)
    assert [layout.layout for layout in dense.layouts] == ["TP=8", "AFD 1A+1F"]


def test_gqa_kv_heads_split_until_ranks_outnumber_them():
    # Qwen3-235B has 4 KV heads: TP=2 holds 2 of them per rank, TP=8 one (each head on two ranks).
    fit = fit_layouts("qwen3-235b-a22b", 80e9, 8, kv="bf16", batch=8, context=1000)
    per_sequence = fit.kv_bytes_per_sequence
    assert per_sequence == 94 * 2 * 4 * 128 * 2 * 1000
    assert _layout(fit, "TP=8").loads[0].kv_bytes == 8 * per_sequence / 4
    assert _layout(fit, "TP=2 x EP=4").loads[0].kv_bytes == 2 * per_sequence / 2


@pytest.mark.parametrize("kwargs, field", [
    ({"cards": 0}, "cards"), ({"batch": 2.5}, "batch"), ({"memory_bytes": -1.0}, "memory_bytes"),
    ({"weights": "int4"}, "weights"), ({"kv": "fp4"}, "kv"), ({"reserve_bytes": float("nan")}, "reserve_bytes"),
    ({"gpus_per_instance": 0}, "gpus_per_instance"), ({"context": 0}, "context"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"model": "step3", "memory_bytes": 80e9, "cards": 8, **kwargs}
    with pytest.raises(ValueError, match=field):
        fit_layouts(args.pop("model"), args.pop("memory_bytes"), args.pop("cards"), **args)


def test_cli_fit_table_and_json(capsys):
    assert main(["fit", "--card", "H20", "--cards", "16", "--weights", "fp8", "--kv", "fp8", "--batch", "256"]) == 0
    out = capsys.readouterr().out
    assert "on 16 x H20 (96.0 GB)" in out and "AFD 1A+1F" in out and "fits: TP=16" in out
    assert main(["fit", "--memory", "141GB", "--cards", "8", "--context", "32k", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory_bytes"] == 141e9 and data["context"] == 32768 and data["card"] is None
    direct = fit_layouts("step3", 141e9, 8, weights="bf16", kv="bf16", batch=64, context=32768)
    assert data["layouts"] == json.loads(json.dumps(direct.to_dict()["layouts"]))


def test_cli_fit_device_map_on_a_config_file(tmp_path, capsys):
    from step3_hf.tiny_checkpoint import TINY_CONFIG

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "step3_text", **TINY_CONFIG}))
    assert main(["fit", "--model", str(path), "--memory", "0.0002GB", "--cards", "2", "--device-map", "--json"]) == 0
    placement = json.loads(capsys.readouterr().out)["device_map"]
    assert len(placement["layer_devices"]) == 4 and placement["weights"] == "bf16"


@pytest.mark.parametrize("argv, needle", [
    (["--cards", "0"], "--cards"), (["--memory", "lots"], "--memory"), (["--weights", "int4"], "--weights"),
    (["--card", "H800", "--memory", "80GB"], "--card or --memory"), (["--card", "B200"], "unknown card"),
    (["--context", "0"], "context"), (["--batch", "-3"], "--batch"),
])
def test_cli_fit_errors_are_one_line_exit_2(capsys, argv, needle):
    assert main(["fit", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("step3-cost: error:") and needle in err and err.count("\n") == 1
