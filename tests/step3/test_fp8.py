"""Block-FP8 checkpoints (the `stepfun-ai/step3-fp8` layout): tile math, loading through transformers' fine-grained
FP8 support (dequantized on CPU), save round trip, the quantize command and the inspector."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import step3_hf  # noqa: F401
from step3_hf import Step3Config
from step3_hf.checkpoint_layout import official_tensor_shapes
from step3_hf.fp8 import (
    Fp8LayoutError,
    dequantize_block_fp8,
    fp8_tensor_shapes,
    is_quantized_weight,
    main as quantize_main,
    quantize_block_fp8,
    quantize_checkpoint,
)
from step3_hf.inspect_checkpoint import inspect_checkpoint, main as inspect_main
from step3_hf.loading import BrokenCheckpointError, check_checkpoint_files
from step3_hf.tiny_checkpoint import (
    TINY_CONFIG,
    TINY_FP8_BLOCK_SIZE,
    TINY_FP8_CONFIG,
    random_official_state_dict,
    write_official_checkpoint,
    write_tiny_fp8_checkpoint,
)

from step3_reference import step3_logits

BLOCK = TINY_FP8_BLOCK_SIZE
IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 200]])


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def dequantized_state(directory: Path) -> dict[str, torch.Tensor]:
    """Official-name float64 weights of an FP8 checkpoint, dequantized tile by tile with plain loops (independent of
    `step3_hf.fp8`)."""
    tensors = read_all(directory)
    state = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv") or name.startswith("vi"):
            continue
        scale = tensors.get(name + "_scale_inv")
        if scale is None:
            state[name] = tensor.double()
            continue
        weight = tensor.double().clone()
        for index in torch.cartesian_prod(*[torch.arange(n) for n in scale.shape]).view(-1, scale.dim()).tolist():
            *lead, i, j = index
            rows = slice(i * BLOCK[0], (i + 1) * BLOCK[0])
            cols = slice(j * BLOCK[1], (j + 1) * BLOCK[1])
            weight[(*lead, rows, cols)] *= float(scale[tuple(index)])
        state[name] = weight
    return state


# ------------------------------------------------------------------------------------------------ tile math


def test_tile_math_with_partial_edge_tiles():
    weight = torch.randn(2, 40, 72, generator=torch.Generator().manual_seed(0)) * 0.03
    weight[1, 32:, 64:] = 0  # an all-zero (partial) tile
    quantized, scale = quantize_block_fp8(weight, BLOCK)
    assert quantized.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (2, math.ceil(40 / 16), math.ceil(72 / 16)) == (2, 3, 5)
    assert scale[1, 2, 4] == 1  # zero tile: scale 1, not 0
    for e in range(2):
        for i in range(3):
            for j in range(5):
                tile = weight[e, i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16].double()
                q = quantized[e, i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16].double()
                if tile.abs().max() > 0:
                    assert q.abs().max() == 448  # each tile's largest value uses the whole e4m3 range
                    err = (q * float(scale[e, i, j]) - tile).abs().max()
                    assert err <= tile.abs().max() * 2**-4  # e4m3: 3 mantissa bits
    dequantized = dequantize_block_fp8(quantized, scale, BLOCK, torch.float64)
    assert dequantized.shape == weight.shape
    assert torch.allclose(dequantized, weight.double(), atol=0.03 * 2**-4 * 4)


def test_which_tensors_are_quantized():
    names = official_tensor_shapes(Step3Config(**TINY_CONFIG))
    kept = sorted(name for name in names if not is_quantized_weight(name))
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" in kept and "model.norm.weight" in kept
    assert "model.layers.1.moe.gate.weight" in kept and "model.layers.0.self_attn.inter_norm.weight" in kept
    assert all(name.endswith(("norm.weight", "moe.gate.weight", "embed_tokens.weight", "lm_head.weight")) for name in kept)
    for quantized in ("model.layers.1.moe.gate_proj.weight", "model.layers.1.moe.down_proj.weight",
                      "model.layers.1.share_expert.up_proj.weight", "model.layers.0.self_attn.wq.weight",
                      "model.layers.0.mlp.down_proj.weight"):  # fmt: skip
        assert is_quantized_weight(quantized)
    assert not is_quantized_weight("vision_model.transformer.layers.0.self_attn.qkv_proj.weight")


def test_non_finite_weight_is_refused_naming_it():
    state = random_official_state_dict(Step3Config(**{**TINY_CONFIG, **TINY_FP8_CONFIG}))
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    with pytest.raises(Fp8LayoutError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: the weight holds NaN"):
        write_tiny_fp8_checkpoint("/nonexistent-never-written", state_dict=state, vl=False)


# ------------------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("fp8")
    config = Step3Config(**{**TINY_CONFIG, **TINY_FP8_CONFIG})
    original = random_official_state_dict(config, seed=3, std=0.08, dtype=torch.bfloat16)
    write_tiny_fp8_checkpoint(path, state_dict=original, vl=True)
    return path, original


def test_fp8_checkpoint_logits_equal_the_dequantized_float64_reference(fp8_checkpoint, caplog):
    path, original = fp8_checkpoint
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert next(model.parameters()).dtype == torch.float32
    config = model.config.get_text_config()
    with torch.no_grad():
        logits = model(IDS).logits.double()
    reference = step3_logits(dequantized_state(path), config, IDS)
    # float32 compute against the float64 reference: the dequantized weights are exact in float32 here.
    assert (logits - reference).abs().max() < 1e-5 * reference.abs().max(), (logits - reference).abs().max()

    # Within FP8 error of the unquantized original.
    unquantized = step3_logits({k: v.double() for k, v in original.items()}, config, IDS)
    error = (logits - unquantized).abs().max() / unquantized.abs().max()
    assert 0 < error < 0.1, error


def test_fp8_checkpoint_loads_in_bf16_by_default_and_keeps_the_router_exact(fp8_checkpoint):
    path, original = fp8_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    # bf16 tensors of the checkpoint (router, norms, embeddings) arrive unchanged.
    assert torch.equal(model.model.layers[1].mlp.gate.weight, original["model.layers.1.moe.gate.weight"])
    assert torch.equal(model.model.embed_tokens.weight, original["model.embed_tokens.weight"])


def test_vl_checkpoint_quantized_loads_into_the_vl_model_and_saves_back(tmp_path):
    pytest.importorskip("tokenizers")
    from step3_hf import Step3VLForConditionalGeneration
    from step3_hf.tiny_checkpoint import synthetic_corpus
    from step3_hf.tiny_vl_checkpoint import write_tiny_vl_checkpoint

    bf16 = write_tiny_vl_checkpoint(tmp_path / "bf16", synthetic_corpus(50), dtype=torch.bfloat16, **TINY_FP8_CONFIG)
    fp8 = quantize_checkpoint(bf16, tmp_path / "fp8", block_size=BLOCK, progress=False)
    assert (fp8 / "processor_config.json").exists() or (fp8 / "preprocessor_config.json").exists()
    model, info = Step3VLForConditionalGeneration.from_pretrained(fp8, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    source = read_all(bf16)
    vision = {name: t for name, t in source.items() if name.startswith(("vision_model.", "vit_"))}
    assert vision and all(torch.equal(model.state_dict()[name], t) for name, t in vision.items())
    model.save_pretrained(tmp_path / "saved")
    written, saved = read_all(fp8), read_all(tmp_path / "saved")
    assert saved.keys() == written.keys() and all(same_bytes(saved[k], written[k]) for k in written)


def test_device_map_auto_loads_fp8(fp8_checkpoint):
    path, _ = fp8_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")
    assert model(IDS).logits.isfinite().all()


def broken_copy(src: Path, dst: Path, edit) -> Path:
    """Copy the checkpoint `src` to `dst` as one `model.safetensors`, with `edit(tensors)` applied."""
    dst.mkdir()
    tensors = read_all(src)
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


SCALE = "model.layers.1.moe.gate_proj.weight_scale_inv"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(SCALE), rf"missing {SCALE} \(6, 2, 4\)"),
        (lambda t: t.__setitem__(SCALE, torch.ones(6, 2, 5)), rf"wrong shape {SCALE}: expected \(6, 2, 4\), found \(6, 2, 5\)"),
        (lambda t: t.__setitem__("model.layers.1.moe.gate.weight_scale_inv", torch.ones(1, 4)),
         r"unexpected model\.layers\.1\.moe\.gate\.weight_scale_inv \(1, 4\)"),
        (lambda t: t.__setitem__(SCALE, t[SCALE].to(torch.bfloat16)), rf"wrong dtype {SCALE}: expected F32, found BF16"),
    ],
    ids=["missing", "wrong-shape", "extra", "wrong-dtype"],
)  # fmt: skip
def test_bad_scales_are_refused_naming_the_tensor(fp8_checkpoint, tmp_path, edit, message):
    path, _ = fp8_checkpoint
    broken = broken_copy(path, tmp_path / "broken", edit)
    with pytest.raises(BrokenCheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(broken)


def test_partial_tiles_are_written_and_inspected_but_not_loaded(tmp_path, capsys):
    # hidden 72 with 16x16 tiles: the last tile column of most weights is 8 wide.
    path = write_tiny_fp8_checkpoint(tmp_path / "partial", vl=False, hidden_size=72)
    report = inspect_checkpoint(path)
    assert report.ok, report.problems()
    assert read_all(path)["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (2, 5)
    with pytest.raises(BrokenCheckpointError, match=r"partial FP8 tiles in model\.layers\.0\.self_attn\.q_proj\.weight"):
        check_checkpoint_files(path)


def test_scales_without_fp8_config_are_refused(fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    copy = broken_copy(path, tmp_path / "noconfig", lambda t: None)
    raw = json.loads((copy / "config.json").read_text())
    raw.pop("quantization_config")
    (copy / "config.json").write_text(json.dumps(raw))
    with pytest.raises(BrokenCheckpointError, match="is a block-FP8 scale, but config.json has no fp8 quantization_config"):
        check_checkpoint_files(copy)


# ------------------------------------------------------------------------------------------------ saving


def test_save_reload_is_byte_identical(fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")
    source = {k: v for k, v in read_all(path).items() if not k.startswith("vi")}
    saved = read_all(tmp_path / "saved")
    assert saved.keys() == source.keys()
    assert all(same_bytes(saved[name], source[name]) for name in source)
    raw = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert raw["quantization_config"]["weight_block_size"] == list(BLOCK)

    # Saved again from the reloaded copy: still the same bytes.
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    again.save_pretrained(tmp_path / "again")
    resaved = read_all(tmp_path / "again")
    assert resaved.keys() == source.keys()
    assert all(same_bytes(t, source[name]) for name, t in resaved.items())


def test_a_changed_weight_is_quantized_afresh_on_save(fp8_checkpoint, tmp_path):
    path, _ = fp8_checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(2)
    model.save_pretrained(tmp_path / "saved")
    source, saved = read_all(path), read_all(tmp_path / "saved")
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    assert torch.equal(saved[name], 2 * source[name])  # a power of two: same fp8 values, doubled scales
    assert same_bytes(saved["model.layers.0.self_attn.q_proj.weight"], source["model.layers.0.self_attn.q_proj.weight"])


# ------------------------------------------------------------------------------------------------ quantize command


def test_quantize_command_round_trip(tmp_path, capsys):
    config = Step3Config(**{**TINY_CONFIG, **TINY_FP8_CONFIG})
    state = random_official_state_dict(config, seed=5, dtype=torch.bfloat16)
    src = write_official_checkpoint(tmp_path / "bf16", state, config)
    (src / "tokenizer_config.json").write_text("{}")
    dst = tmp_path / "fp8"
    assert quantize_main([str(src), str(dst), "--block-size", "16,16", "--max-shard-size", "0.00005"]) == 0
    assert (dst / "tokenizer_config.json").exists()
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    written = read_all(dst)
    assert set(written) == set(fp8_tensor_shapes(config, BLOCK)) == set(index["weight_map"])
    for name, tensor in state.items():
        if is_quantized_weight(name):
            expected_q, expected_s = quantize_block_fp8(tensor, BLOCK)
            assert same_bytes(written[name], expected_q) and torch.equal(written[name + "_scale_inv"], expected_s)
        else:
            assert same_bytes(written[name], tensor)
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["weight_block_size"] == [16, 16]
    assert inspect_checkpoint(dst).ok

    # Loaded, saved, quantized again: the same bytes.
    AutoModelForCausalLM.from_pretrained(dst).save_pretrained(tmp_path / "resaved")
    resaved = read_all(tmp_path / "resaved")
    assert resaved.keys() == written.keys()
    assert all(same_bytes(t, written[name]) for name, t in resaved.items())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--block-size", "0,16"], "two positive ints"),
        (["--block-size", "abc"], "expected ROWS,COLS"),
        (["--max-shard-size", "0"], "must be positive"),
    ],
)
def test_quantize_command_user_errors_exit_2(tmp_path, capsys, args, message):
    src = write_official_checkpoint(tmp_path / "bf16", random_official_state_dict(Step3Config(**TINY_CONFIG)),
                                    Step3Config(**TINY_CONFIG))  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        quantize_main([str(src), str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("step3-quantize-fp8: error:") and message in err[-1]


def test_quantize_refuses_a_quantized_source_and_a_full_destination(fp8_checkpoint, tmp_path, capsys):
    path, _ = fp8_checkpoint
    with pytest.raises(Fp8LayoutError, match="already quantized"):
        quantize_checkpoint(path, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert quantize_main([str(path), str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("step3-quantize-fp8: error:") and "is not an empty directory" in err


def test_quantize_refuses_a_non_finite_weight_and_leaves_nothing(tmp_path, capsys):
    config = Step3Config(**{**TINY_CONFIG, **TINY_FP8_CONFIG})
    state = random_official_state_dict(config, dtype=torch.bfloat16)
    state["model.layers.2.moe.down_proj.weight"][3, 0, 0] = float("inf")
    src = write_official_checkpoint(tmp_path / "bf16", state, config)
    assert quantize_main([str(src), str(tmp_path / "fp8"), "--block-size", "16,16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.layers.2.moe.down_proj.weight: the weight holds NaN or Inf" in err
    assert not (tmp_path / "fp8").exists()


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_counts_parameters_without_scales_and_bytes(fp8_checkpoint, capsys):
    path, original = fp8_checkpoint
    assert inspect_main([str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text_parameters"] == sum(t.numel() for t in original.values()) == report["config"]["total_parameters"]
    on_disk = sum(t.numel() * t.element_size() for t in read_all(path).values())
    # The layout's bytes count the config's whole vision tower (bf16); the tiny checkpoint holds stand-ins.
    vision_difference = 2 * (report["vision_parameters_expected"] - report["vision_parameters"])
    assert report["bytes_on_disk"] == on_disk == report["bytes_expected"] - vision_difference
    assert report["fp8_block_size"] == [16, 16]


def test_inspect_names_bad_scale_values_and_layout(fp8_checkpoint, tmp_path, capsys):
    path, _ = fp8_checkpoint

    def poison(tensors):
        tensors[SCALE][0, 0, 0] = 0
        tensors[SCALE][1, 1, 1] = float("nan")
        tensors.pop("model.layers.1.moe.up_proj.weight_scale_inv")
        tensors["model.layers.1.moe.down_proj.weight_scale_inv"] = torch.ones(6, 4, 3)

    broken = broken_copy(path, tmp_path / "bad", poison)
    assert inspect_main([str(broken)]) == 1
    out = capsys.readouterr().out
    assert "model.layers.1.moe.up_proj.weight_scale_inv  expected (6, 2, 4)" in out
    assert "model.layers.1.moe.down_proj.weight_scale_inv  expected (6, 4, 2), found (6, 4, 3)" in out
    assert inspect_main([str(broken), "--values"]) == 1
    out = capsys.readouterr().out
    assert f"BAD SCALES (1):\n    {SCALE}  1 zero, 1 NaN or Inf entries" in out


def test_released_fp8_size_from_the_config_alone():
    from step3_hf import Step3VLConfig
    from step3_hf.fp8 import fp8_quantization_config
    from step3_hf.inspect_checkpoint import expected_bytes

    config = Step3VLConfig()
    bf16 = expected_bytes(config, official_tensor_shapes(config.get_text_config()))
    config.quantization_config = fp8_quantization_config()
    fp8 = expected_bytes(config, fp8_tensor_shapes(config.get_text_config(), (128, 128)))
    # The hub lists ~642 GB (bf16) and ~326 GB (fp8); the tensors alone are 636 GB and 322 GB.
    assert round(bf16 / 1e9) == 636 and round(fp8 / 1e9) == 322


# ------------------------------------------------------------------------------------------------ in memory


def test_quantize_model_in_memory_equals_the_streaming_quantizer(tmp_path):
    """A bf16 model quantized in memory (transformers' FP8 modules, computing through step3_hf's FP8 paths: here the
    CPU fallbacks) gives the dequantized float64 reference's logits and saves the same bytes as
    `quantize_checkpoint` of its checkpoint."""
    from step3_hf.fp8 import quantize_model

    config = Step3Config(**{**TINY_CONFIG, **TINY_FP8_CONFIG})
    state = random_official_state_dict(config, seed=7, std=0.08, dtype=torch.bfloat16)
    write_official_checkpoint(tmp_path / "bf16", state, config)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32,
                                                 experts_implementation="moe_decode")  # fmt: skip
    quantize_model(model, BLOCK)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays

    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", block_size=BLOCK, progress=False)
    with torch.no_grad():
        logits = model(IDS).logits.double()
    reference = step3_logits(dequantized_state(tmp_path / "fp8"), config, IDS)
    assert (logits - reference).abs().max() < 1e-5 * reference.abs().max()

    # Saved from bf16 (the checkpoint's dtype, so that the unquantized tensors compare too).
    model = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16"), BLOCK)
    model.save_pretrained(tmp_path / "saved")
    saved, streamed = read_all(tmp_path / "saved"), read_all(tmp_path / "fp8")
    assert saved.keys() == streamed.keys() and all(same_bytes(saved[k], streamed[k]) for k in streamed)
    with pytest.raises(Fp8LayoutError, match="already quantized"):
        quantize_model(model, BLOCK)


def test_a_model_quantized_on_the_cpu_computes_its_fp8_experts_there(tmp_path, caplog):
    """transformers' FP8 experts functions need its Hub kernel and a GPU (on a CPU, grouped_mm tried to download
    the kernel): a CPU model quantized in memory with `grouped_mm` experts (transformers' choice on a CPU) computes
    through `moe_decode`'s FP8 path, says so once, and gives the logits of one that asked for `moe_decode`."""
    from step3_hf.fp8 import quantize_model

    config = Step3Config(**{**TINY_CONFIG, **TINY_FP8_CONFIG})
    write_official_checkpoint(tmp_path, random_official_state_dict(config, seed=3, std=0.08), config)
    chosen = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_decode"), BLOCK)
    default = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="grouped_mm")  # transformers' CPU
    with caplog.at_level(logging.WARNING, logger="step3_hf.fp8"):
        quantize_model(default, BLOCK)
    assert default.config._experts_implementation == "moe_decode"
    assert [r.message for r in caplog.records if r.name == "step3_hf.fp8"] == [
        "quantize_model: FP8 experts on the CPU: the model's experts compute through `moe_decode` instead of "
        "`grouped_mm`, whose FP8 kernel needs a GPU"
    ]
    with torch.no_grad():
        assert torch.equal(default(IDS).logits, chosen(IDS).logits)


def test_fp8_modules_load_and_save_byte_identical_where_transformers_keeps_float8(fp8_checkpoint, tmp_path, monkeypatch):
    """transformers keeps the FP8 modules (FP8Linear, FP8Experts) only where it sees a GPU of compute capability 8.9+;
    made to see one, CPU runs the same loading: every float8 weight and scale lands where it belongs (the fused
    gate/up experts and their scales concatenated), the model computes (CPU fallbacks of step3_hf's FP8 paths) and
    saves the checkpoint's bytes back."""
    from transformers.integrations.finegrained_fp8 import FP8Experts

    from step3_hf.kernels import Step3FP8Linear

    path, _ = fp8_checkpoint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    model, info = AutoModelForCausalLM.from_pretrained(
        path, device_map="cpu", output_loading_info=True, attn_implementation="sdpa", experts_implementation="moe_decode"
    )
    assert not any(info.values())
    source = read_all(path)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, FP8Experts) and type(model.model.layers[0].self_attn.q_proj) is Step3FP8Linear
    gate_up = torch.cat([source[f"model.layers.1.moe.{p}_proj.weight"] for p in ("gate", "up")], 1)
    gate_up_scale = torch.cat([source[f"model.layers.1.moe.{p}_proj.weight_scale_inv"] for p in ("gate", "up")], 1)
    assert same_bytes(experts.gate_up_proj, gate_up) and torch.equal(experts.gate_up_proj_scale_inv, gate_up_scale)
    assert same_bytes(experts.down_proj, source["model.layers.1.moe.down_proj.weight"])
    shared = model.model.layers[1].mlp.shared_expert.up_proj
    assert torch.equal(shared.weight_scale_inv, source["model.layers.1.share_expert.up_proj.weight_scale_inv"])
    assert torch.equal(model.model.layers[1].mlp.gate.weight, source["model.layers.1.moe.gate.weight"])

    with torch.no_grad():
        logits = model(IDS).logits.double()
    reference = step3_logits(dequantized_state(path), model.config.get_text_config(), IDS)
    assert ((logits - reference).norm() / reference.norm()) < 2e-2  # bf16 compute

    model.save_pretrained(tmp_path / "saved")
    saved = read_all(tmp_path / "saved")
    source = {k: v for k, v in source.items() if not k.startswith("vi")}
    assert saved.keys() == source.keys() and all(same_bytes(saved[k], source[k]) for k in source)


def test_vl_fp8_modules_keep_the_vision_tower_in_bf16_without_a_module_list(tmp_path, monkeypatch):
    """A release config that lists no `modules_to_not_convert` (the release's own is unverified): Step-3's list keeps
    transformers from turning the vision tower's linears into FP8 modules where it keeps float8."""
    pytest.importorskip("tokenizers")
    from step3_hf import Step3VLForConditionalGeneration
    from step3_hf.tiny_checkpoint import synthetic_corpus
    from step3_hf.tiny_vl_checkpoint import write_tiny_vl_checkpoint

    bf16 = write_tiny_vl_checkpoint(tmp_path / "bf16", synthetic_corpus(30), dtype=torch.bfloat16, **TINY_FP8_CONFIG)
    fp8 = quantize_checkpoint(bf16, tmp_path / "fp8", block_size=BLOCK, progress=False)
    raw = json.loads((fp8 / "config.json").read_text())
    del raw["quantization_config"]["modules_to_not_convert"]
    (fp8 / "config.json").write_text(json.dumps(raw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    model, info = Step3VLForConditionalGeneration.from_pretrained(
        fp8, device_map="cpu", output_loading_info=True, attn_implementation="sdpa", experts_implementation="moe_decode"
    )
    assert not any(info.values())
    assert type(model.vit_large_projector) is torch.nn.Linear
    assert all(type(m) is not torch.nn.Linear or m.weight.dtype == torch.bfloat16 for m in model.vision_model.modules())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    written = read_all(fp8)
    state = model.state_dict()
    assert all(torch.equal(state[k], t) for k, t in written.items() if k.startswith(("vision_model.", "vit_")))
