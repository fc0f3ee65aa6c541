"""step3-cost: report-style tables, --json records, --plot PNG, plan and sparsity sub-commands."""

import json

import pytest

from step3_hf.cost_model.cli import main, parse_context


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_parse_context():
    assert [parse_context(t) for t in ("8k", "32K", "128k", "5000")] == [8192, 32768, 131072, 5000]
    with pytest.raises(Exception, match="not a number"):
        parse_context("eight")


def test_json_one_object_per_model_and_context(capsys):
    out = run(capsys, "--models", "step3", "deepseek-v3", "qwen3-235b-a22b", "--contexts", "8k", "32k", "--json")
    records = json.loads(out)
    assert [(r["model"], r["context"]) for r in records] == [
        (m, c) for m in ("step3", "deepseek-v3", "qwen3-235b-a22b") for c in (8192, 32768)]
    step3 = records[0]
    assert round(step3["attention_usd_per_1m"]["H800"], 3) == 0.048
    assert round(step3["ffn_usd_per_1m"]["H800"], 3) == 0.015
    assert round(step3["afd_usd_per_1m"], 3) == 0.055
    assert step3["afd_pair"] == {"attention": "H20", "ffn": "H800"}
    assert f"{step3['per_token']['kv_bytes']:.2e}" == "2.56e+08"
    assert set(step3["per_token"]) >= {"kv_bytes", "attention_flops", "linear_flops", "ffn_flops",
                                       "activated_params", "arithmetic_intensity"}
    assert round(step3["min_sparsity"]["H800"], 3) == 0.058 and step3["moe_sparsity"] > 0.058


def test_default_table_is_report_style(capsys):
    out = run(capsys)  # no arguments: all five presets at 8K and 32K on the four cards
    for needle in ("USD per 1M decoded tokens at 8K", "USD per 1M decoded tokens at 32K", "H800", "910B",
                   "kimi-k2", "qwen3-32b"):
        assert needle in out
    step3_8k = next(line for line in out.splitlines() if line.strip().startswith("step3") and "|" in line)
    assert "0.048" in step3_8k and "0.015" in step3_8k and "0.055  H20+H800" in step3_8k


def test_plot_writes_png(tmp_path, capsys):
    png = tmp_path / "cost.png"
    run(capsys, "--models", "step3", "deepseek-v3", "--hardware", "H800", "H20", "--plot", str(png))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_hardware_file_adds_a_card(tmp_path, capsys):
    card = {"name": "HALF-H800", "price_per_hour_usd": 1.0, "bf16_flops": 9.89e14, "fp8_flops": 1.98e15,
            "memory_bandwidth": 3.35e12}
    path = tmp_path / "cards.json"
    path.write_text(json.dumps([card]))
    records = json.loads(run(capsys, "--models", "step3", "--contexts", "8k", "--hardware-file", str(path),
                             "--hardware", "H800", "HALF-H800", "--json"))
    costs = records[0]["attention_usd_per_1m"]
    assert costs["HALF-H800"] == pytest.approx(costs["H800"] / 2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "X", "price_per_hour_usd": 1.0}))
    capsys.readouterr()
    assert main(["--hardware-file", str(bad)]) == 2
    assert "missing bf16_flops, memory_bandwidth" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown card"):
        main(["--hardware", "B200"])


def test_config_json_path_as_model(tmp_path, capsys):
    from importlib import resources

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(
        resources.files("step3_hf.cost_model.presets").joinpath("qwen3-235b-a22b.json").read_text())
    records = json.loads(run(capsys, "--models", str(folder), "--contexts", "8k", "--json"))
    assert records[0]["model"] == "my-model" and round(records[0]["afd_usd_per_1m"], 3) == 0.062


def test_plan_table_and_json(capsys):
    out = run(capsys, "plan", "--model", "step3", "--contexts", "4k", "8k")
    assert "2A2F" in out and "4A2F" in out and "273 us per layer" in out
    plans = json.loads(run(capsys, "plan", "--contexts", "4k", "8k", "--json"))
    assert [p["shape"] for p in plans] == ["2A2F", "4A2F"] and all(p["fits"] for p in plans)


def test_sparsity_table_7(capsys):
    out = run(capsys, "sparsity")
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        ["H800", "0.058"], ["H20", "0.007"], ["A800", "0.031"], ["910B", "0.034"]]
    ds = json.loads(run(capsys, "sparsity", "--model", "deepseek-v3", "--json"))
    assert round(ds["cards"][0]["min_active_experts"]) == 14


@pytest.mark.parametrize("argv, named", [(["--models", "nonexist"], "nonexist"), (["--contexts", "0"], "context")])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, named):
    assert main(argv) == 2
    assert named in capsys.readouterr().err
