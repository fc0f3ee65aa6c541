"""step3-inspect: header-only checks of a checkpoint directory against its config, report numbers, exit codes."""

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from step3_hf import Step3Config, Step3VisionConfig, Step3VLConfig
from step3_hf.checkpoint_layout import official_tensor_shapes
from step3_hf.inspect_checkpoint import inspect_checkpoint, main, summarize_config
from step3_hf.vision_layout import official_vision_tensor_shapes
from step3_hf.tiny_checkpoint import (
    TINY_CONFIG,
    TINY_VISION_CONFIG,
    random_official_state_dict,
    write_official_checkpoint,
)

SRC = Path(__file__).resolve().parents[2] / "src"
# Names the official step3_vl checkpoint uses for its vision tower (spelled out here, not imported).
VISION_PREFIXES = ("vision_model.", "vit_")


def tiny_configs(vl: bool) -> tuple[Step3Config, Step3Config | Step3VLConfig]:
    text = Step3Config(**TINY_CONFIG)
    vision = Step3VisionConfig(**TINY_VISION_CONFIG)
    return text, (Step3VLConfig(text_config=text, vision_config=vision, image_token_id=3) if vl else text)


# The tiny vision side's tensors, counted by hand: class / patch (weight, bias) / position embeddings, per layer
# qkv, out, fc1, fc2 (weight, bias) and two LayerNorms (weight, bias), two downsamplers (weight, bias), projector.
TINY_VISION_TENSORS = 4 + TINY_VISION_CONFIG["num_hidden_layers"] * (4 * 2 + 2 * 2) + 4 + 1


def write(path: Path, state: dict[str, torch.Tensor], vl: bool = True, **kwargs) -> Path:
    return write_official_checkpoint(path, state, tiny_configs(vl)[1], **kwargs)


def good_state() -> dict[str, torch.Tensor]:
    return random_official_state_dict(tiny_configs(False)[0])


def run_json(path: Path, capsys) -> tuple[int, dict]:
    code = main([str(path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def run_text(path: Path, capsys) -> tuple[int, str, str]:
    code = main([str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def written_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor on disk, read back with safetensors itself (an independent reader)."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                out[name] = tuple(handle.get_slice(name).get_shape())
    return out


# ------------------------------------------------------------------------------------------ good checkpoints


@pytest.mark.parametrize("vl", [True, False], ids=["step3_vl", "step3_text"])
def test_good_sharded_checkpoint_matches_and_totals_equal_what_was_written(tmp_path, capsys, vl):
    state = good_state()
    write(tmp_path, state, vl=vl)
    code, report = run_json(tmp_path, capsys)

    assert code == 0 and report["ok"] is True
    written_params = sum(t.numel() for t in state.values())
    assert report["text_tensors"] == len(state)
    assert report["text_parameters"] == written_params
    assert report["config"]["total_parameters"] == written_params
    on_disk = written_tensors(tmp_path)
    vision = [name for name in on_disk if name.startswith(VISION_PREFIXES)]
    assert len(vision) == (TINY_VISION_TENSORS if vl else 0)
    assert report["vision_tensors_skipped"] == len(vision)
    assert report["vision_parameters"] == sum(math.prod(on_disk[name]) for name in vision)
    assert report["vision_parameters"] == (report["vision_parameters_expected"] if vl else 0)
    assert report["dtypes"] == {
        "F32": {"tensors": len(on_disk), "bytes": 4 * sum(math.prod(shape) for shape in on_disk.values())}
    }
    assert report["missing"] == {} and report["unexpected"] == {} and report["wrong_shape"] == []
    assert report["file_problems"] == []
    assert report["sharded"] is True and len(report["files"]) == 3
    assert report["model_type"] == ("step3_vl" if vl else "step3_text")
    # 4 layers x (K + V) x 1 KV head x head_dim 16
    assert report["config"]["kv_cache_bytes_per_token_bf16"] == 4 * 2 * 1 * 16 * 2
    assert report["config"]["kv_cache_bytes_per_token_fp8"] == 4 * 2 * 1 * 16 * 1


def test_vision_tensors_are_checked_against_the_vision_config(tmp_path, capsys):
    """A mis-shaped, a missing and a stray vision tensor are each named; the language model's tensors are fine."""
    write(tmp_path, good_state(), vl=True)
    shard = next(tmp_path.glob("*.safetensors"))
    tensors = safetensors.torch.load_file(shard)
    vision = sorted(name for name in tensors if name.startswith(VISION_PREFIXES))
    assert len(vision) >= 2, "the fixture needs two vision tensors in one shard"
    reshaped, dropped = vision[0], vision[1]
    good_shape = tuple(tensors[reshaped].shape)
    tensors[reshaped] = torch.zeros(3, 5)
    del tensors[dropped]
    tensors["vision_model.transformer.layers.9.mlp.fc1.weight"] = torch.zeros(2, 2)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    index["weight_map"]["vision_model.transformer.layers.9.mlp.fc1.weight"] = shard.name
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    code, report = run_json(tmp_path, capsys)
    assert code == 1 and report["ok"] is False
    assert report["wrong_shape"] == [
        {"name": reshaped, "expected": list(good_shape), "found": [3, 5], "file": shard.name}
    ]
    assert list(report["missing"]) == [dropped]
    assert report["unexpected"] == {"vision_model.transformer.layers.9.mlp.fc1.weight": [2, 2]}
    code, out, _ = run_text(tmp_path, capsys)
    assert f"{reshaped}  expected {good_shape}, found (3, 5) in {shard.name}" in out
    assert f"{dropped}  expected" in out and "MISMATCH: 3 problem(s)" in out


def test_language_model_only_step3_vl_export_is_not_asked_for_vision_tensors(tmp_path, capsys):
    write(tmp_path, good_state(), vl=True, with_vision=False)
    code, report = run_json(tmp_path, capsys)
    assert code == 0 and report["ok"] is True
    assert report["vision_tensors_skipped"] == 0 and report["vision_parameters"] == 0


def test_single_file_bf16_checkpoint_with_bare_text_config(tmp_path, capsys):
    state = {name: t.to(torch.bfloat16) for name, t in good_state().items()}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(tiny_configs(False)[1].to_dict()))
    code, report = run_json(tmp_path, capsys)
    assert code == 0, report
    assert report["files"] == ["model.safetensors"] and report["sharded"] is False
    numel = sum(t.numel() for t in state.values())
    assert report["dtypes"] == {"BF16": {"tensors": len(state), "bytes": 2 * numel}}
    assert report["text_parameters"] == numel


def test_hand_written_official_vl_config_with_loader_keys(tmp_path, capsys):
    """The released file carries architectures / auto_map / torch_dtype / transformers_version and a
    `model_type` at both levels; all of that must be accepted. Its torch_dtype is checked, so the tensors are bf16."""
    write(tmp_path, {name: t.to(torch.bfloat16) for name, t in good_state().items()}, vl=True)
    text = {
        **TINY_CONFIG,
        "model_type": "step3_text",
        "architectures": ["Step3TextForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_step3.Step3TextForCausalLM"},
        "torch_dtype": "bfloat16",
        "rope_scaling": None,
    }
    official = {
        "architectures": ["Step3VLForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_step3.Step3VLConfig"},
        "model_type": "step3_vl",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0",
        "image_token_id": 3,
        "text_config": text,
        "vision_config": {"model_type": "step3_vision_encoder", **TINY_VISION_CONFIG},
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    code, report = run_json(tmp_path, capsys)
    assert code == 0, report
    # The vision tensors were checked against the hand-written vision config: a released width there mismatches.
    official["vision_config"]["hidden_size"] = 1792
    (tmp_path / "config.json").write_text(json.dumps(official))
    code, mismatched = run_json(tmp_path, capsys)
    assert code == 1 and mismatched["wrong_shape"][0]["name"].startswith(VISION_PREFIXES)
    assert report["model_type"] == "step3_vl" and report["config"]["num_moe_layers"] == 2


# ------------------------------------------------------------------------------------------- mismatches


def test_missing_tensor_is_named(tmp_path, capsys):
    state = good_state()
    del state["model.layers.2.moe.up_proj.weight"]
    write(tmp_path, state)
    code, report = run_json(tmp_path, capsys)
    assert code == 1 and report["ok"] is False
    assert report["missing"] == {"model.layers.2.moe.up_proj.weight": [6, 24, 64]}
    assert report["unexpected"] == {} and report["wrong_shape"] == []

    code, out, _ = run_text(tmp_path, capsys)
    assert code == 1
    assert "MISSING (1)" in out and "model.layers.2.moe.up_proj.weight  expected (6, 24, 64)" in out


def test_wrong_shape_tensor_is_named_with_both_shapes(tmp_path, capsys):
    state = good_state()
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(31, 64)
    state["model.layers.1.moe.down_proj.weight"] = torch.zeros(5, 64, 24)  # one expert short
    write(tmp_path, state)
    code, report = run_json(tmp_path, capsys)
    assert code == 1
    found = {m["name"]: (m["expected"], m["found"]) for m in report["wrong_shape"]}
    assert found == {
        "model.layers.0.self_attn.q_proj.weight": ([32, 64], [31, 64]),
        "model.layers.1.moe.down_proj.weight": ([6, 64, 24], [5, 64, 24]),
    }
    assert report["missing"] == {} and report["unexpected"] == {}

    code, out, _ = run_text(tmp_path, capsys)
    assert code == 1
    assert "model.layers.0.self_attn.q_proj.weight  expected (32, 64), found (31, 64)" in out


def test_unexpected_tensor_is_named(tmp_path, capsys):
    state = good_state()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    write(tmp_path, state, vl=False)
    code, report = run_json(tmp_path, capsys)
    assert code == 1
    assert report["unexpected"] == {"model.layers.0.self_attn.rotary_emb.inv_freq": [8]}
    assert report["text_tensors"] == len(state)
    code, out, _ = run_text(tmp_path, capsys)
    assert code == 1 and "UNEXPECTED (1)" in out and "rotary_emb.inv_freq  (8)" in out


def test_checkpoint_for_a_different_config_reports_every_difference(tmp_path, capsys):
    """Weights of a 3-layer model under a 4-layer config: layer 3 is missing entirely."""
    small = Step3Config(**{**TINY_CONFIG, "num_hidden_layers": 3})
    write_official_checkpoint(tmp_path, random_official_state_dict(small), small)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    code, report = run_json(tmp_path, capsys)
    assert code == 1
    layer3 = {name for name in official_tensor_shapes(Step3Config(**TINY_CONFIG)) if ".layers.3." in name}
    assert set(report["missing"]) == layer3 and len(layer3) == 11


def test_truncated_shard_is_a_mismatch_naming_the_file(tmp_path, capsys):
    write(tmp_path, good_state())
    shard = tmp_path / "model-00002-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)  # an interrupted download
    code, report = run_json(tmp_path, capsys)
    assert code == 1
    assert len(report["file_problems"]) == 1
    assert "model-00002-of-00003.safetensors is truncated" in report["file_problems"][0]
    assert report["missing"] == {} and report["wrong_shape"] == []


def test_index_pointing_at_the_wrong_shard_is_a_mismatch(tmp_path, capsys):
    write(tmp_path, good_state())
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.embed_tokens.weight"
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    index_path.write_text(json.dumps(index))
    code, report = run_json(tmp_path, capsys)
    assert code == 1
    assert any(name in problem and wrong in problem for problem in report["file_problems"])


# -------------------------------------------------------------------------------------- unusable input


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["text_config"].update(moe_top_k=99), "moe_top_k"),
        (lambda c: c["text_config"].update(num_attention_groups=3), "num_attention_groups"),
        (lambda c: c["text_config"].update(moe_layers_enum="1,9"), "moe_layers_enum"),
        (lambda c: c["text_config"].update(hidden_act="gelu"), "hidden_act"),
        (lambda c: c.update(model_type="llama"), "'llama'"),
        (lambda c: c["text_config"].update(model_type="llama"), "'llama'"),
    ],
    ids=["moe_top_k", "num_attention_groups", "moe_layers_enum", "hidden_act", "model_type", "text_model_type"],
)
def test_bad_config_exits_2_naming_the_field(tmp_path, capsys, edit, named):
    write(tmp_path, good_state(), vl=True)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = run_text(tmp_path, capsys)
    assert code == 2 and out == ""
    assert named in err and "config.json" in err
    code, report = run_json(tmp_path, capsys)
    assert code == 2 and report["ok"] is False and named in report["error"]


def test_bad_field_of_a_bare_text_config_exits_2(tmp_path, capsys):
    write(tmp_path, good_state(), vl=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 0}))
    code, _, err = run_text(tmp_path, capsys)
    assert code == 2 and "head_dim" in err


def _remove(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: d / "nowhere", "is not a directory"),
        (lambda d: d / "config.json", "is not a directory"),
        (lambda d: (_remove(d / "config.json"), d)[1], "no config.json"),
        (lambda d: (_remove(d / "model.safetensors.index.json"), d)[1], "no model.safetensors or"),
        (lambda d: (_remove(d / "model-00003-of-00003.safetensors"), d)[1], "model-00003-of-00003.safetensors"),
        (lambda d: ((d / "config.json").write_text("{not json"), d)[1], "not valid JSON"),
    ],
    ids=["no_such_dir", "a_file", "no_config", "no_weights", "index_names_missing_shard", "config_not_json"],
)
def test_unusable_input_exits_2_with_the_reason(tmp_path, capsys, break_it, message):
    write(tmp_path, good_state())
    target = break_it(tmp_path)
    code, out, err = run_text(target, capsys)
    assert code == 2 and out == ""
    assert message in err


def test_corrupt_header_exits_2_naming_the_file(tmp_path, capsys):
    write(tmp_path, good_state())
    shard = tmp_path / "model-00001-of-00003.safetensors"
    shard.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    code, _, err = run_text(tmp_path, capsys)
    assert code == 2 and "model-00001-of-00003.safetensors" in err


# --------------------------------------------------------------------------------------- header only


def test_no_tensor_data_is_ever_loaded(tmp_path, capsys, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the inspector must not load tensor data")

    for module, attr in [
        (safetensors, "safe_open"),
        (safetensors.torch, "safe_open"),
        (safetensors.torch, "load_file"),
        (safetensors.torch, "load"),
        (torch, "load"),
        (torch, "frombuffer"),
    ]:
        monkeypatch.setattr(module, attr, forbidden)
    state = good_state()
    write(tmp_path, state)
    code, report = run_json(tmp_path, capsys)
    assert code == 0 and report["text_parameters"] == sum(t.numel() for t in state.values())


def _write_header_only_shard(
    path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None
) -> None:
    """A safetensors file (bf16 unless `dtypes` names another dtype) whose data section is a sparse hole: the header
    is real, the bytes are not."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        dtype = (dtypes or {}).get(name, "BF16")
        size = {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)


def test_header_only_shard_writer_makes_valid_safetensors(tmp_path):
    """The fixture below is only meaningful if safetensors itself reads such a file (its data reads as zeros)."""
    _write_header_only_shard(tmp_path / "small.safetensors", {"a": (3, 5), "b": (7,)})
    loaded = safetensors.torch.load_file(tmp_path / "small.safetensors")
    assert {name: (tuple(t.shape), t.dtype) for name, t in loaded.items()} == {
        "a": ((3, 5), torch.bfloat16),
        "b": ((7,), torch.bfloat16),
    }
    assert all(not t.any() for t in loaded.values())


def test_full_size_632_gb_checkpoint_is_inspected_from_headers_in_seconds(tmp_path, capsys):
    """The released model's tensor list in 8 sparse shards (~632 GB apparent size, no disk used)."""
    config = Step3VLConfig()
    text_shapes = official_tensor_shapes(config.get_text_config())
    shapes = {**text_shapes, **official_vision_tensor_shapes(config)}
    names = list(shapes)
    weight_map = {}
    for index in range(8):
        file = f"model-{index + 1:05d}-of-00008.safetensors"
        _write_header_only_shard(tmp_path / file, {name: shapes[name] for name in names[index::8]})
        weight_map.update({name: file for name in names[index::8]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    apparent = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert apparent > 600e9

    start = time.perf_counter()
    code, report = run_json(tmp_path, capsys)
    assert time.perf_counter() - start < 10
    assert code == 0, report
    numel = sum(math.prod(shape) for shape in text_shapes.values())
    assert report["text_parameters"] == numel == report["config"]["total_parameters"]
    assert round(numel / 1e9, 1) == 316.3
    # hidden 1792, intermediate 3072, 63 layers, patch 14 at 728 px (52 x 52 + 1 positions), downsamplers
    # 1792 -> 4096 (k2) -> 8192 (k3), projector 8192 -> 7168 without bias: summed by hand.
    d, i = 1792, 3072
    layer = (3 * d * d + 3 * d) + (d * d + d) + (i * d + i) + (d * i + d) + 4 * d
    vision = d + (d * 3 * 14 * 14 + d) + (52 * 52 + 1) * d + 63 * layer
    vision += (4096 * d * 4 + 4096) + (8192 * 4096 * 9 + 8192) + 7168 * 8192
    assert report["vision_parameters"] == vision == report["vision_parameters_expected"] == 1_900_068_352
    total = numel + vision
    assert report["dtypes"] == {"BF16": {"tensors": len(names), "bytes": 2 * total}}


def test_full_size_fp8_checkpoint_from_headers(tmp_path, capsys):
    """The FP8 release's layout for the released config in sparse shards: the bf16 release's parameter count (scales
    are not parameters) and its bytes on disk (the hub lists ~326 GB for the release, vision tower included)."""
    from step3_hf.fp8 import fp8_quantization_config, fp8_tensor_shapes, is_quantized_weight

    config = Step3VLConfig()
    shapes = fp8_tensor_shapes(config.get_text_config(), (128, 128))
    dtypes = {name: "F32" if name.endswith("_scale_inv") else "F8_E4M3" if is_quantized_weight(name) else "BF16"
              for name in shapes}  # fmt: skip
    names = list(shapes)
    weight_map = {}
    for index in range(8):
        file = f"model-{index + 1:05d}-of-00008.safetensors"
        _write_header_only_shard(tmp_path / file, {name: shapes[name] for name in names[index::8]}, dtypes)
        weight_map.update({name: file for name in names[index::8]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    raw = {**config.to_dict(), "quantization_config": fp8_quantization_config(), "dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(raw))

    code, report = run_json(tmp_path, capsys)
    assert code == 0, report["wrong_dtype"][:3] or report["missing"]
    bf16_numel = sum(math.prod(shape) for shape in official_tensor_shapes(config.get_text_config()).values())
    assert report["text_parameters"] == bf16_numel == report["config"]["total_parameters"]
    assert report["bytes_on_disk"] == sum(header_bytes for header_bytes in [
        {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dtypes[name]] * math.prod(shape) for name, shape in shapes.items()
    ])  # fmt: skip
    # The language model's tensors: 318.2 GB; with the bf16 vision tower the layout is 322.0 GB.
    assert round(report["bytes_on_disk"] / 1e8) == 3182 and round(report["bytes_expected"] / 1e8) == 3220
    assert report["fp8_block_size"] == [128, 128]


# ------------------------------------------------------------------------------------------ config only


@pytest.mark.parametrize("config", [Step3Config(), Step3VLConfig()], ids=["step3_text", "step3_vl"])
def test_released_model_numbers_from_the_config_alone(config):
    summary = summarize_config(config)
    assert round(summary.total_parameters / 1e9, 1) == 316.3
    assert round(summary.activated_parameters / 1e9, 1) == 37.9
    # 61 layers x (K + V) x 1 shared KV head x head_dim 256, per byte of the cached dtype.
    assert summary.kv_cache_bytes_per_token_fp8 == 61 * 2 * 1 * 256 == 31_232
    assert summary.kv_cache_bytes_per_token_bf16 == 2 * 31_232
    assert (summary.num_hidden_layers, summary.num_moe_layers) == (61, 56)


def test_function_api_returns_a_report(tmp_path):
    state = good_state()
    del state["lm_head.weight"]
    write(tmp_path, state, vl=False)
    report = inspect_checkpoint(tmp_path)
    assert not report.ok and report.missing == {"lm_head.weight": (256, 64)}


# ----------------------------------------------------------------------------------------- console script


def test_module_runs_as_a_console_script(tmp_path):
    write(tmp_path / "good", good_state())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "step3_hf.inspect_checkpoint", str(tmp_path / "good")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "OK: every tensor matches the config" in result.stdout
    assert f"vision tensors    {TINY_VISION_TENSORS} holding" in result.stdout and "step3_vl" in result.stdout


# ------------------------------------------------------------------------------------------------- dtypes


def bf16_checkpoint(path: Path, state: dict[str, torch.Tensor], spelling: str = "dtype", **config_fields) -> Path:
    config = Step3Config(**TINY_CONFIG, **config_fields)
    write_official_checkpoint(path, state, config)
    raw = json.loads((path / "config.json").read_text())
    raw.pop("dtype", None)
    (path / "config.json").write_text(json.dumps({**raw, spelling: "bfloat16"}))
    return path


@pytest.mark.parametrize("spelling", ["dtype", "torch_dtype"])
def test_tensor_of_another_dtype_than_the_config_is_named(tmp_path, capsys, spelling):
    state = {name: t.to(torch.bfloat16) for name, t in good_state().items()}
    bf16_checkpoint(tmp_path, state, spelling)
    assert run_json(tmp_path, capsys)[0] == 0

    state["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    state["model.layers.1.moe.up_proj.weight"] = state["model.layers.1.moe.up_proj.weight"].float()
    bf16_checkpoint(tmp_path, state, spelling)
    code, report = run_json(tmp_path, capsys)
    assert code == 1 and report["ok"] is False
    assert report["dtype_rules"] == [{"pattern": "*", "dtypes": ["BF16"], "source": "config dtype bfloat16"}]
    found = {m["name"]: (m["expected"], m["found"]) for m in report["wrong_dtype"]}
    assert found == {
        "model.norm.weight": (["BF16"], "I32"),
        "model.layers.1.moe.up_proj.weight": (["BF16"], "F32"),
    }
    assert report["missing"] == {} and report["wrong_shape"] == [] and report["unexpected"] == {}
    code, out, _ = run_text(tmp_path, capsys)
    assert code == 1 and "WRONG DTYPE (2)" in out
    assert "model.norm.weight  expected BF16 (config dtype bfloat16), found I32 in model-0000" in out


def fp8_checkpoint_with_dtype(path: Path, edit=None) -> Path:
    """A tiny block-FP8 checkpoint (one file) whose config names dtype bfloat16, with `edit(tensors)` applied."""
    from safetensors.torch import load_file, save_file

    from step3_hf.tiny_checkpoint import write_tiny_fp8_checkpoint

    source = write_tiny_fp8_checkpoint(path / "source", vl=False)
    tensors = {k: v for f in sorted(source.glob("*.safetensors")) for k, v in load_file(f).items()}
    if edit is not None:
        edit(tensors)
    target = path / "edited"
    target.mkdir(exist_ok=True)
    save_file(tensors, target / "model.safetensors")
    raw = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**raw, "dtype": "bfloat16"}))
    return target


def test_fp8_dtype_rules_follow_the_layout(tmp_path, capsys):
    # Quantized weights float8, their scales float32, everything else (norms, router, embeddings) the config dtype.
    code, report = run_json(fp8_checkpoint_with_dtype(tmp_path), capsys)
    assert code == 0, report["wrong_dtype"]
    assert [r["dtypes"] for r in report["dtype_rules"]] == [["F32"], ["F8_E4M3"], ["BF16"]]

    def edit(tensors):
        tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
        tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].bfloat16()
        tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(2, 4, dtype=torch.bfloat16)

    code, report = run_json(fp8_checkpoint_with_dtype(tmp_path, edit), capsys)
    wrong = {m["name"]: (m["expected"], m["found"]) for m in report["wrong_dtype"]}
    assert code == 1 and wrong == {
        "model.norm.weight": (["BF16"], "I32"),
        "model.layers.0.self_attn.q_proj.weight": (["F8_E4M3"], "BF16"),
        "model.layers.0.self_attn.q_proj.weight_scale_inv": (["F32"], "BF16"),
    }


def test_unknown_config_dtype_exits_2(tmp_path, capsys):
    bf16_checkpoint(tmp_path, good_state())
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "dtype": "banana"}))
    code, out, err = run_text(tmp_path, capsys)
    assert code == 2 and out == "" and "banana" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------- values


def poisoned_state() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    state = good_state()
    state["model.layers.2.moe.down_proj.weight"][5, 63, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    state["model.embed_tokens.weight"][0, 0] = float("nan")
    state["model.layers.0.self_attn.k_proj.weight"].zero_()
    # Counted independently of the inspector, on the tensors before they were written.
    counts = {name: int((~torch.isfinite(t)).sum()) for name, t in state.items() if not torch.isfinite(t).all()}
    return state, counts


def test_values_names_non_finite_and_all_zero_tensors(tmp_path, capsys):
    state, counts = poisoned_state()
    write(tmp_path, state)
    assert run_json(tmp_path, capsys)[0] == 0  # headers alone cannot see values

    code = main([str(tmp_path), "--values", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["values_scanned"] is True
    assert report["non_finite"] == counts == {"model.layers.2.moe.down_proj.weight": 3, "model.embed_tokens.weight": 1}
    assert report["all_zero"] == ["model.layers.0.self_attn.k_proj.weight"]
    assert report["missing"] == {} and report["wrong_shape"] == [] and report["file_problems"] == []

    code = main([str(tmp_path), "--values"])
    out = capsys.readouterr().out
    assert code == 1 and "NON-FINITE VALUES (2)" in out and "ALL-ZERO (1)" in out
    assert "model.layers.2.moe.down_proj.weight  3 NaN or Inf" in out


def test_values_of_a_clean_checkpoint_are_ok_including_float8(tmp_path, capsys):
    path = fp8_checkpoint_with_dtype(tmp_path)
    code = main([str(path), "--values"])
    out = capsys.readouterr().out
    assert code == 0 and "every tensor read" in out and "no NaN, Inf or all-zero tensor" in out

    def poison(tensors):
        nan8 = tensors["model.layers.1.moe.gate_proj.weight"].float()
        nan8[0, 0, :2] = float("nan")
        tensors["model.layers.1.moe.gate_proj.weight"] = nan8.to(torch.float8_e4m3fn)

    report = inspect_checkpoint(fp8_checkpoint_with_dtype(tmp_path, poison), values=True)
    assert report.non_finite == {"model.layers.1.moe.gate_proj.weight": 2}


def test_values_are_read_in_bounded_slices(tmp_path, monkeypatch):
    """However large a tensor, no read returns more than VALUE_CHUNK_BYTES (one row when a row is larger)."""
    import step3_hf.inspect_checkpoint as inspector

    state, counts = poisoned_state()
    write(tmp_path, state)
    largest_read = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            largest_read.append(tensor.numel() * tensor.element_size())
            return tensor

        def get_slice(self, name):
            view = self.inner.get_slice(name)

            class Slice:
                get_shape, get_dtype = view.get_shape, view.get_dtype

                def __getitem__(self, index):
                    tensor = view[index]
                    largest_read.append(tensor.numel() * tensor.element_size())
                    return tensor

            return Slice()

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    monkeypatch.setattr(inspector, "VALUE_CHUNK_BYTES", 1024)
    report = inspect_checkpoint(tmp_path, values=True)
    assert report.non_finite == counts and report.all_zero == ["model.layers.0.self_attn.k_proj.weight"]
    # The largest tensor (256 x 64 fp32 = 64 KiB) was read 1 KiB at a time; a 64 x 24 expert row is 6 KiB.
    assert max(largest_read) == 64 * 24 * 4
    # Every tensor, vision included, read exactly once.
    assert sum(largest_read) == 4 * sum(math.prod(shape) for shape in written_tensors(tmp_path).values())


def test_values_progress_bar_and_truncated_shard(tmp_path, capsys):
    write(tmp_path, good_state())
    report = inspect_checkpoint(tmp_path, values=True, progress=True)
    assert report.ok and "reading values" in capsys.readouterr().err
    shard = tmp_path / "model-00002-of-00003.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    code = main([str(tmp_path), "--values", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and len(report["file_problems"]) == 1 and "is truncated" in report["file_problems"][0]
