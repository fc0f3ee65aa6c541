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
    assert main(["--hardware", "B200"]) == 2  # issue 22: exit 2 with one line, was SystemExit(1)
    assert capsys.readouterr().err == "step3-cost: error: unknown card(s) B200; known: H800, H20, A800, 910B\n"


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


# ------------------------------------------------------------------------------------ hostile and careless input

H800 = {"name": "X1", "price_per_hour_usd": 2.0, "bf16_flops": 9.89e14, "memory_bandwidth": 3.35e12}


def hardware_file(tmp_path, content):
    path = tmp_path / "cards.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return ["--hardware-file", str(path)]


@pytest.mark.parametrize("content, named", [
    ({**H800, "memory_bandwidth": 0}, "`memory_bandwidth` must be a positive number, got 0"),
    ({**H800, "price_per_hour_usd": "2.0"}, "`price_per_hour_usd` must be a positive number, got '2.0'"),
    ({**H800, "price_per_hour_usd": -2.0}, "`price_per_hour_usd` must be a positive number, got -2.0"),
    ({**H800, "bf16_flops": True}, "`bf16_flops` must be a positive number, got True"),
    ({**H800, "fp8_flops": -1}, "`fp8_flops`"),
    ({**H800, "nic_gbps": 0}, "`nic_gbps`"),
    ({**H800, "nics_per_server": 2.5}, "`nics_per_server` must be a positive integer"),
    ({**H800, "memory_bytes": "80GB"}, "`memory_bytes`"),
    ({**H800, "name": ""}, "`name` must be a non-empty string"),
    ([1.0, 2.0, 3.0], "must be a JSON object"),
    ("[{\"name\": ", "cards.json"),
    (json.dumps(H800).replace("989000000000000.0", "1e999"), "`bf16_flops` must be a positive number, got inf"),
], ids=["zero_bandwidth", "string_price", "negative_price", "bool_flops", "negative_fp8", "zero_nic",
        "fractional_nics", "string_memory", "empty_name", "list_of_numbers", "broken_json", "infinite"])
def test_invalid_hardware_file_exits_2_naming_the_field(tmp_path, capsys, content, named):
    argv = hardware_file(tmp_path, content)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"step3-cost: error: {tmp_path / 'cards.json'}: ") and named in captured.err


def _config(tmp_path, **changes):
    from importlib import resources

    config = json.loads(resources.files("step3_hf.cost_model.presets").joinpath("qwen3-235b-a22b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    return str(tmp_path)


@pytest.mark.parametrize("argv, named", [
    (["--kv-bits", "0"], "argument --kv-bits: '0' is not a bit width from 1 to 32"),
    (["--kv-bits=-8"], "argument --kv-bits: '-8' is not a bit width from 1 to 32"),
    (["--weight-bits", "0"], "argument --weight-bits"),
    (["--weight-bits", "33"], "argument --weight-bits"),
    (["--weight-bits", "eight"], "argument --weight-bits"),
    (["--contexts", "99999999999999999999k"], "from 1 token to 2**40 tokens"),
    (["--contexts=-8k"], "from 1 token to 2**40 tokens"),
    (["--contexts", "infk"], "not a number of tokens"),
    (["--contexts", "nan"], "not a number of tokens"),
    (["--hardware", "B200"], "unknown card(s) B200"),
    (["plan", "--tpot-ms", "0"], "argument --tpot-ms: '0' is not a positive number"),
    (["plan", "--tpot-ms", "nan"], "argument --tpot-ms"),
    (["plan", "--stages", "0"], "argument --stages"),
    (["plan", "--micro-batch", "-1"], "argument --micro-batch"),
    (["plan", "--ffn-bandwidth-efficiency", "0"], "ffn_bandwidth_efficiency"),
    (["plan", "--attention-card", "B200"], "unknown card(s) B200"),
    (["sparsity", "--model", "nonexist"], "nonexist"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_every_user_error_exits_2_with_one_line(capsys, argv, named):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("step3-cost: error: ") and named in captured.err


@pytest.mark.parametrize("changes, named", [
    ({"num_attention_heads": -8}, "`num_attention_heads` must be a positive integer, got -8"),
    ({"hidden_size": 0}, "`hidden_size` must be a positive integer, got 0"),
    ({"num_hidden_layers": "94"}, "`num_hidden_layers` must be a positive integer, got '94'"),
    ({"num_experts_per_tok": 0}, "`num_experts_per_tok`"),
    ({"moe_intermediate_size": -1536}, "`moe_intermediate_size`"),
    ({"decoder_sparse_step": 0}, "`decoder_sparse_step`"),
    ({"num_experts_per_tok": 200}, "200 experts per token but only 128 experts"),
    ({"mlp_only_layers": [94]}, "`mlp_only_layers` must be layer indices from 0 to 93"),
], ids=["negative_heads", "zero_hidden", "string_layers", "zero_top_k", "negative_width", "zero_step",
        "top_k_above_experts", "layer_out_of_range"])
def test_invalid_model_config_exits_2_naming_the_field(tmp_path, capsys, changes, named):
    assert main(["--models", _config(tmp_path, **changes), "--contexts", "8k"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and named in captured.err


def test_extreme_but_valid_inputs_print_positive_finite_costs(tmp_path, capsys):
    """The bounds themselves are accepted, and what they give is a positive, finite cost in readable columns."""
    cheap = {**H800, "name": "TINY", "price_per_hour_usd": 1e-6, "memory_bandwidth": 1.0, "nic_gbps": 1e-3}
    argv = ["--models", "step3", "qwen3-32b", "--contexts", "1", str(2**40), "--kv-bits", "1", "--weight-bits", "32",
            *hardware_file(tmp_path, [cheap]), "--json"]
    records = json.loads(run(capsys, *argv))
    for r in records:
        costs = [*r["attention_usd_per_1m"].values(), *r["ffn_usd_per_1m"].values(), r["afd_usd_per_1m"]]
        figures = [v for v in r["per_token"].values() if isinstance(v, (int, float))]
        assert all(0 < v < float("inf") for v in costs + figures), r
    table = run(capsys, *argv[:-1])
    bars = {tuple(i for i, ch in enumerate(line) if ch == "|") for line in table.splitlines() if "|" in line}
    assert len(bars) == 1  # every row keeps the header's columns, even at 2**40 tokens
    assert "-" not in "".join(line.split("|", 1)[-1] for line in table.splitlines() if "|" in line)
    plan = run(capsys, "plan", "--contexts", "4k", str(2**40)).splitlines()
    assert [len(line.split()) for line in plan[2:4]] == [15, 15]  # no two columns run together
    shape = json.loads(run(capsys, "plan", "--contexts", str(2**40), "--json"))[0]["shape"]
    assert plan[3].split()[:2] == ["1073741824K", shape]
