"""Attention-FFN Disaggregation on CPU with gloo: the split of the weights and the wire format in process,
then real multi-process launches against single-process `generate` (several checks per launch: process
start-up dominates the time)."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import step3_hf  # noqa: F401
from step3_hf.afd import (
    InProcessConnector,
    Placement,
    RemoteFFN,
    Role,
    Step3AFDAttentionForCausalLM,
    Step3FFNShard,
    WireFormat,
)
from step3_hf.afd.checkpoint import CheckpointReader, role_of_tensor
from step3_hf.afd.placement import even_split
from step3_hf.afd.wire import DispatchLayout, decode_dispatch, encode_dispatch, wire_bytes_per_token
from step3_hf.checkpoint_layout import module_tensor_shapes, official_tensor_shapes
from step3_hf.modeling_step3 import Step3DecoderLayer, Step3MLP, Step3SparseMoeBlock
from step3_hf.tiny_checkpoint import write_tiny_checkpoint

from afd_launch import PYTHON, REPO, finish, launch
from afd_worker import NEW_TOKENS, PAD, PROMPTS, SAMPLING, SEED, left_pad

WORKER = str(REPO / "tests" / "step3" / "afd_worker.py")
FP8_LOGIT_TOLERANCE = 0.05  # max |logit difference| / max |logit|, FP8 wire vs unquantised, teacher-forced
LAUNCH_TIMEOUT = 150


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("afd"), vl=True, seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").eval()


def reference_generate(model, prompts, sample=False):
    ids, mask = left_pad(prompts)
    torch.manual_seed(SEED)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD,
                             eos_token_id=None, **(SAMPLING if sample else {"do_sample": False}))
    return out[:, ids.shape[1]:]


# ----- in process ---------------------------------------------------------------------------------------------
def test_every_official_tensor_belongs_to_exactly_one_side(checkpoint):
    config = CheckpointReader(checkpoint).config
    sides = {name: role_of_tensor(name) for name in official_tensor_shapes(config)}
    assert sides["model.layers.1.moe.gate.weight"] is Role.ATTENTION  # the router runs before the exchange
    assert sides["model.layers.1.moe.up_proj.weight"] is Role.FFN
    assert sides["model.layers.0.mlp.down_proj.weight"] is Role.FFN
    assert sides["model.layers.1.share_expert.gate_proj.weight"] is Role.FFN
    assert sides["lm_head.weight"] is sides["model.layers.3.self_attn.wq.weight"] is Role.ATTENTION


def _rewrite_tensor(source, target, name, tensor):
    """A copy of the single-file checkpoint `source` in `target`, with tensor `name` replaced."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    files = sorted(target.glob("*.safetensors"))
    for file in files:
        tensors = load_file(file)
        if name in tensors:
            tensors[name] = tensor
            save_file(tensors, file, metadata={"format": "pt"})
            return target
    raise AssertionError(f"{name} not found")


@pytest.mark.parametrize("bad", ["one_row", "31_rows", "int32"])
def test_reader_refuses_a_tensor_of_the_wrong_shape_or_dtype_by_name(checkpoint, tmp_path, bad):
    # Tensor.copy_ would broadcast a [1, H] embedding into [V, H]; the reader must name the tensor instead.
    from step3_hf.loading import BrokenCheckpointError

    name = "model.embed_tokens.weight"
    vocab, hidden = official_tensor_shapes(CheckpointReader(checkpoint).config)[name]
    tensor = {
        "one_row": torch.zeros(1, hidden),
        "31_rows": torch.zeros(31, hidden),
        "int32": torch.zeros(vocab, hidden, dtype=torch.int32),
    }[bad]
    broken = _rewrite_tensor(checkpoint, tmp_path / "broken", name, tensor)
    with pytest.raises(BrokenCheckpointError, match=name.replace(".", r"\.")):
        reader = CheckpointReader(broken)  # the shape check of from_pretrained, on opening
        Step3AFDAttentionForCausalLM.from_checkpoint(reader)  # the dtype check, on reading


@pytest.mark.parametrize("ffn_ranks", [1, 2, 4])
def test_each_side_reads_and_holds_only_its_own_tensors(checkpoint, reference, ffn_ranks):
    config = CheckpointReader(checkpoint).config
    shapes = official_tensor_shapes(config)
    numel = {role: sum(math.prod(s) for n, s in shapes.items() if role_of_tensor(n) is role) for role in Role}

    reader = CheckpointReader(checkpoint)
    attention = Step3AFDAttentionForCausalLM.from_checkpoint(reader)
    assert sum(p.numel() for p in attention.parameters()) == numel[Role.ATTENTION] == reader.elements_read
    assert all(role_of_tensor(n) is Role.ATTENTION for n in reader.names_read)

    placement = Placement(1, ffn_ranks)
    shard_params = 0
    x = torch.randn(7, config.hidden_size)
    for layer_idx, layer in enumerate(reference.model.layers):
        partial_sum = 0
        for index in range(ffn_ranks):
            reader = CheckpointReader(checkpoint)
            shard = Step3FFNShard.from_checkpoint(reader, placement, index)
            assert all(role_of_tensor(n) is Role.FFN for n in reader.names_read)
            assert sum(p.numel() for p in shard.parameters()) == reader.elements_read
            if layer_idx == 0:
                shard_params += reader.elements_read
            routing = reference.model.layers[layer_idx].mlp.gate(x)[1:] if layer.is_moe_layer else (None, None)
            partial_sum = partial_sum + shard(layer_idx, x, routing[1], routing[0])
        # partial sums over FFN ranks = the FFN of the single-process model
        torch.testing.assert_close(partial_sum, layer.mlp(x), rtol=1e-5, atol=1e-6)
    assert shard_params == numel[Role.FFN]  # the FFN ranks together hold every FFN weight exactly once
    assert numel[Role.ATTENTION] + numel[Role.FFN] == sum(p.numel() for p in reference.parameters())


def in_process_model(checkpoint, ffn_ranks=1, micro_batches=3, wire="raw"):
    """Both halves in this process: the attention model and `ffn_ranks` FFN shards behind an InProcessConnector."""
    attention = Step3AFDAttentionForCausalLM.from_checkpoint(CheckpointReader(checkpoint))
    placement = Placement(1, ffn_ranks)
    shards = [Step3FFNShard.from_checkpoint(CheckpointReader(checkpoint), placement, i) for i in range(ffn_ranks)]
    return attention.connect(InProcessConnector(shards), micro_batches=micro_batches, wire=wire)


def test_the_split_is_a_module_swap_under_the_single_process_names(checkpoint, reference):
    # Attention side: the model's own decoder layers, `mlp` swapped for RemoteFFN (which keeps the router as
    # `mlp.gate`); FFN side: the model's own MoE block (less its router) and MLP. Together they hold every weight of
    # the single-process model under its names, with the values from_pretrained loads from the official names.
    config = CheckpointReader(checkpoint).config
    attention = Step3AFDAttentionForCausalLM.from_checkpoint(CheckpointReader(checkpoint))
    shard = Step3FFNShard.from_checkpoint(CheckpointReader(checkpoint), Placement(1, 1), 0)
    assert all(type(layer) is Step3DecoderLayer and isinstance(layer.mlp, RemoteFFN) for layer in attention.model.layers)
    moe = set(config.moe_layer_indices)
    assert all(isinstance(block, Step3SparseMoeBlock if i in moe else Step3MLP) for i, block in enumerate(shard.layers))
    names = {name: p for name, p in attention.named_parameters()}
    names.update({f"model.layers.{n.split('.')[1]}.mlp.{n.split('.', 2)[2]}": p for n, p in shard.named_parameters()})
    expected = module_tensor_shapes(config)
    assert {n: tuple(p.shape) for n, p in names.items()} == expected
    state = reference.state_dict()
    for name, param in names.items():
        assert torch.equal(param, state[name]), name


def test_remote_ffn_called_as_mlp_is_the_layers_ffn(checkpoint, reference):
    # Called as the layer's `mlp` (route, send, wait at once), RemoteFFN returns what the single-process layer's
    # MLP / MoE block returns, for a dense and an MoE layer, with the FFN split over two shards.
    model = in_process_model(checkpoint, ffn_ranks=2)
    config = model.config
    x = torch.randn(2, 3, config.hidden_size, generator=torch.Generator().manual_seed(0))
    for i in (0, config.moe_layer_indices[0]):
        with torch.no_grad():
            torch.testing.assert_close(model.model.layers[i].mlp(x), reference.model.layers[i].mlp(x),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ffn_ranks", [1, 2])
def test_in_process_connector_matches_one_process(checkpoint, reference, ffn_ranks):
    teacher, reference_logits = teacher_batch(reference)
    model = in_process_model(checkpoint, ffn_ranks)
    greedy = reference_generate(reference, PROMPTS)
    ids, mask = left_pad(PROMPTS)
    for micro_batches in (1, 3):
        model.micro_batches = micro_batches
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=PAD, eos_token_id=None)
        assert out[:, ids.shape[1]:].tolist() == greedy.tolist(), micro_batches
        with torch.no_grad():
            logits = model(**teacher).logits
        torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)


def test_static_cache_micro_batches_equal_dynamic(checkpoint):
    # Several micro-batches write their rows of one preallocated StaticCache in place (no copy per step) and the
    # layer's length advances once per step: the same logits as the DynamicCache with one micro-batch.
    model = in_process_model(checkpoint)
    ids, mask = left_pad(PROMPTS)
    runs = {}
    for cache, micro_batches in ((None, 1), ("static", 3), ("static", 2), (None, 3)):
        model.micro_batches = micro_batches
        with torch.no_grad():
            runs[cache, micro_batches] = model.generate(
                ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD,
                eos_token_id=None, cache_implementation=cache, output_logits=True, return_dict_in_generate=True,
                disable_compile=True,
            )
    base = runs[None, 1]
    for key, run in runs.items():
        assert type(run.past_key_values).__name__ == ("StaticCache" if key[0] else "DynamicCache"), key
        assert torch.equal(run.sequences, base.sequences), key
        torch.testing.assert_close(torch.stack(run.logits), torch.stack(base.logits), rtol=1e-5, atol=1e-5)
    static = runs["static", 3].past_key_values
    lengths = {int(layer.cumulative_length) for layer in static.layers}
    assert lengths == {ids.shape[1] + NEW_TOKENS - 1}  # advanced once per step, not once per micro-batch


def test_static_cache_of_another_batch_and_cuda_graphs_on_cpu_are_refused(checkpoint):
    from transformers import StaticCache

    model = in_process_model(checkpoint)
    ids, mask = left_pad(PROMPTS)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(ids[:4], attention_mask=mask[:4], cache=cache, use_cache=True)  # allocated for 4 sequences
        with pytest.raises(ValueError, match="static cache holds 4 sequences but this forward has 5"):
            model(ids, attention_mask=mask, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="CUDA graphs need the attention side on a CUDA device"):
        model.use_cuda_graphs()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_of_the_attention_phase_give_the_eager_tokens(checkpoint):
    """Replayed attention phases (one graph per layer and micro-batch, static cache) against the same model eager."""
    reader = CheckpointReader(checkpoint)
    attention = Step3AFDAttentionForCausalLM.from_checkpoint(reader, device="cuda", dtype=torch.bfloat16)
    shard = Step3FFNShard.from_checkpoint(reader, Placement(1, 1), 0, device="cuda", dtype=torch.bfloat16)
    model = attention.connect(InProcessConnector([shard]), micro_batches=3, wire="raw")
    ids, mask = (t.cuda() for t in left_pad(PROMPTS))

    def generate():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  pad_token_id=PAD, eos_token_id=None, cache_implementation="static",
                                  disable_compile=True)  # fmt: skip

    eager = generate()
    model.use_cuda_graphs()
    graphed = generate()
    assert model.attention_graphs._graphs, "no attention phase was replayed"
    assert graphed.tolist() == eager.tolist()


def test_in_process_connector_times_attention_wire_and_ffn_apart(checkpoint):
    from step3_hf.afd.timing import PhaseTimer

    model = in_process_model(checkpoint, wire="fp8")
    model.timer = PhaseTimer(torch.device("cpu"), keep_trace=True)
    model.connector.timer = model.timer
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    layers, micro_batches = len(model.model.layers), 3
    trace = model.timer.last_trace
    for name in ("attention", "wire", "ffn"):
        spans = sorted((e["layer"], e["micro_batch"]) for e in trace if e["name"] == name)
        assert spans == [(l, m) for l in range(layers) for m in range(micro_batches)], name
    assert all(0 <= e["start_us"] <= e["end_us"] for e in trace)
    # phases do not nest: each micro-batch's attention ends before its wire starts, which ends before its FFN
    by_key = {(e["name"], e["layer"], e["micro_batch"]): e for e in trace}
    for l in range(layers):
        for m in range(micro_batches):
            assert by_key["attention", l, m]["end_us"] <= by_key["wire", l, m]["start_us"]
            assert by_key["wire", l, m]["end_us"] <= by_key["ffn", l, m]["start_us"]


def test_even_split_covers_every_item_once():
    for size, parts in [(48, 1), (48, 5), (7, 7), (10, 3)]:
        ranges = [even_split(size, parts, i) for i in range(parts)]
        assert [r[0] for r in ranges[1:]] == [r[1] for r in ranges[:-1]] and ranges[0][0] == 0 and ranges[-1][1] == size
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_launch_that_does_not_add_up_is_refused():
    with pytest.raises(ValueError, match=r"--attention-ranks 2 \+ --ffn-ranks 1 = 3 ranks, but the launch started 2"):
        Placement.for_world(2, 1, world_size=2)
    with pytest.raises(ValueError, match="at least one rank of each role"):
        Placement(2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [0, 3])
def test_wire_round_trip(dtype, top_k):
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(5, 64, generator=generator) * torch.logspace(-3, 2, 5)[:, None]).to(dtype)
    ids = torch.randint(0, 48, (5, top_k), generator=generator) if top_k else None
    weights = torch.rand(5, top_k, generator=generator).to(dtype) if top_k else None
    for wire in WireFormat:
        buffer = encode_dispatch(hidden, ids, weights, wire)
        layout = DispatchLayout(5, 64, top_k, wire, dtype)
        assert buffer.dtype == torch.uint8 and buffer.numel() == layout.nbytes
        back, back_ids, back_weights = decode_dispatch(buffer, layout)
        if top_k:
            assert torch.equal(back_ids, ids) and torch.equal(back_weights, weights)
        if wire is WireFormat.RAW:
            assert torch.equal(back, hidden)
        else:  # e4m3: 3 mantissa bits -> relative error <= 2^-4 per value, plus the subnormal step of the row's scale
            x = hidden.double()
            scale = x.abs().amax(-1, keepdim=True) / 448
            assert ((back.double() - x).abs() <= 2**-4 * x.abs() + 2**-10 * scale + 1e-2 * x.abs() * (dtype == torch.bfloat16)).all()


def test_wire_format_codes_round_trip_and_unknown_codes_are_refused():
    assert [WireFormat.from_code(w.code) for w in WireFormat] == list(WireFormat)
    for code in (-1, len(WireFormat)):
        with pytest.raises(ValueError, match=f"unknown wire format code {code}"):
            WireFormat.from_code(code)


def test_wire_bytes_per_token_match_step3_report():
    # Step-3: H = 7168, top-3. FP8 hidden + fp32 scale + 3 x (int32 id + fp32 weight) out, bf16 back: ~3H bytes.
    out, back = wire_bytes_per_token(7168, 3, WireFormat.FP8, torch.bfloat16)
    assert (out, back) == (7168 + 4 + 24, 2 * 7168)


# ----- launches -----------------------------------------------------------------------------------------------
def run_worker_launch(checkpoint, tmp_path, attention_ranks, ffn_ranks, teacher=None, scenarios=None):
    """Every rank's saved results; `scenarios`: the names of afd_worker.SCENARIOS to generate (default all)."""
    world = attention_ranks + ffn_ranks
    argv = [PYTHON, WORKER, str(checkpoint), str(tmp_path), str(attention_ranks), str(ffn_ranks)]
    if teacher is not None:
        argv.append(str(teacher))
    extra_env = None if scenarios is None else {"AFD_WORKER_SCENARIOS": ",".join(scenarios)}
    with launch(lambda rank: argv, world, extra_env=extra_env) as procs:
        results = finish(procs, LAUNCH_TIMEOUT)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def gather(saved, name, attention_ranks, key="tokens"):
    parts = sorted((s[name]["first"], s[name][key]) for s in saved[:attention_ranks] if s[name][key].shape[0])
    return torch.cat([p for _, p in parts])


def teacher_batch(reference):
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=PAD, eos_token_id=None)
        full_mask = torch.cat([mask, torch.ones(len(PROMPTS), NEW_TOKENS, dtype=mask.dtype)], dim=1)
        logits = reference(out, attention_mask=full_mask).logits
    return {"input_ids": out, "attention_mask": full_mask}, logits


@pytest.mark.parametrize("attention_ranks,ffn_ranks", [(2, 1), (1, 2)])
def test_launch_matches_single_process_generate(checkpoint, reference, tmp_path, attention_ranks, ffn_ranks):
    teacher, reference_logits = teacher_batch(reference)
    torch.save(teacher, tmp_path / "teacher.pt")
    saved = run_worker_launch(checkpoint, tmp_path, attention_ranks, ffn_ranks, tmp_path / "teacher.pt")
    greedy = reference_generate(reference, PROMPTS)

    # Unquantised wire in fp32: the same greedy tokens as one process, for 1, 2 and 3 micro-batches.
    for name in ("raw_mb1", "raw_mb2", "raw_mb3"):
        assert gather(saved, name, attention_ranks).tolist() == greedy.tolist(), name
    raw_logits = gather(saved, "teacher_raw", attention_ranks, key="logits")
    torch.testing.assert_close(raw_logits, reference_logits, rtol=1e-4, atol=1e-4)

    # FP8 wire: logits within the stated tolerance (teacher-forced, so both see the same sequences).
    fp8_logits = gather(saved, "teacher_fp8", attention_ranks, key="logits")
    valid = teacher["attention_mask"].bool()
    error = (fp8_logits - reference_logits).abs()[valid].max() / reference_logits[valid].abs().max()
    agreement = (fp8_logits.argmax(-1) == reference_logits.argmax(-1))[valid].float().mean().item()
    fp8_tokens = gather(saved, "fp8_mb3", attention_ranks)
    generated_agreement = (fp8_tokens == greedy).float().mean().item()
    print(f"\nFP8 wire ({attention_ranks}A+{ffn_ranks}F): max |logit error| / max |logit| = {error:.4f}; "
          f"teacher-forced argmax agreement {agreement:.1%}; generated-token agreement {generated_agreement:.1%}")
    assert 0 < error <= FP8_LOGIT_TOLERANCE
    assert agreement >= 0.9

    # Sampling through generate()'s logits warpers: with one attention rank the random stream is the same.
    if attention_ranks == 1:
        assert gather(saved, "sample_mb3", 1).tolist() == reference_generate(reference, PROMPTS, sample=True).tolist()

    # The gloo connector computes what the in-process connector computes, FP8 quantisation included.
    in_process = in_process_model(checkpoint, ffn_ranks)
    for wire, got in (("raw", raw_logits), ("fp8", fp8_logits)):
        in_process.wire = wire
        with torch.no_grad():
            torch.testing.assert_close(got, in_process(**teacher).logits, rtol=1e-5, atol=1e-5)

    # Each side held only its own weights; the FFN ranks batched what the attention ranks sent.
    attention_numel = sum(s["parameters"] for s in saved[:attention_ranks]) / attention_ranks
    ffn_numel = sum(s["parameters"] for s in saved[attention_ranks:])
    assert attention_numel + ffn_numel == sum(p.numel() for p in reference.parameters())
    report = {r["name"]: r for r in saved[0]["report"]}
    assert all(r["steps"] > 0 and 0 < r["busy_s"] <= r["elapsed_s"] for r in report.values())


def cli(checkpoint, prompts, attention_ranks, ffn_ranks, *extra):
    return [PYTHON, "-m", "step3_hf.afd", "--model", str(checkpoint), "--attention-ranks", str(attention_ranks),
            "--ffn-ranks", str(ffn_ranks), "--prompts", str(prompts), *map(str, extra)]


def test_torchrun_cli_1a1f_prints_completions_and_timing(checkpoint, reference, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    done = subprocess.run(
        torchrun + cli(checkpoint, prompts, 1, 1, "--max-new-tokens", NEW_TOKENS, "--wire", "raw",
                       "--cache-implementation", "static")[1:],  # 3 micro-batches on one static cache
        cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    completions = [json.loads(line) for line in lines if line.startswith("{")]
    assert [c["completion_ids"] for c in completions] == reference_generate(reference, PROMPTS).tolist()
    assert any("AFD timing per rank" in line for line in lines)
    assert any("rank 1 (ffn 0)" in line for line in lines) and any("bytes per token per layer" in line for line in lines)


PEER_TIMEOUT_S = 5


@contextlib.contextmanager
def generating_pair(checkpoint, tmp_path):
    """A 1 attention + 1 FFN launch with a `PEER_TIMEOUT_S` peer timeout, yielded once generation is under way."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    argv = cli(checkpoint, prompts, 1, 1, "--max-new-tokens", 400, "--timeout", PEER_TIMEOUT_S, "--progress")
    with launch(lambda rank: argv, 2) as (attention, ffn):
        deadline = time.monotonic() + 60
        for line in attention.stderr:
            if "step 5" in line or time.monotonic() > deadline:
                break
        yield attention, ffn


@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_a_lost_ffn_rank_fails_the_attention_rank_with_a_clear_error(checkpoint, tmp_path, fault):
    timeout = PEER_TIMEOUT_S
    with generating_pair(checkpoint, tmp_path) as (attention, ffn):
        ffn.send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        lost = time.monotonic()
        out, err = attention.communicate(timeout=timeout + 30)
        elapsed = time.monotonic() - lost
    assert attention.returncode != 0
    assert "step3_hf.afd: error:" in err and "peer rank 1 (ffn 0)" in err, err[-2000:]
    assert ("is gone" if fault == "killed" else "stopped answering") in err, err[-2000:]
    # The process group is destroyed, or given up on after a bounded wait, before the rank exits.
    assert "step3_hf.afd: process group torn down" in err or "process group not torn down within" in err, err[-2000:]
    assert elapsed < timeout + 15
    assert "completion_ids" not in out  # no partial output presented as complete


def test_a_lost_attention_rank_fails_the_ffn_rank_within_the_timeout(checkpoint, tmp_path):
    # The other direction: the FFN rank's wait for the next dispatch is bounded too, and names the lost peer.
    timeout = PEER_TIMEOUT_S
    with generating_pair(checkpoint, tmp_path) as (attention, ffn):
        attention.send_signal(signal.SIGKILL)
        lost = time.monotonic()
        out, err = ffn.communicate(timeout=timeout + 30)
        elapsed = time.monotonic() - lost
    assert ffn.returncode != 0
    assert "step3_hf.afd: error:" in err and "rank 0 (attention 0)" in err, err[-2000:]
    assert "process group torn down" in err or "process group not torn down within" in err, err[-2000:]
    assert elapsed < timeout + 15


def test_mismatched_arguments_fail_fast_on_every_rank(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"input_ids": PROMPTS[0]}) + "\n")
    argv = lambda rank: cli(checkpoint, prompts, 1, 1, "--micro-batches", 3 if rank == 0 else 2)
    started = time.monotonic()
    with launch(argv, 2) as procs:
        results = finish(procs, 60)
    assert time.monotonic() - started < 60
    for code, _, err in results:
        assert code != 0 and "was started with different arguments (micro_batches: " in err, err[-2000:]

    # a launch whose ranks do not add up fails before joining any process group
    with launch(lambda rank: cli(checkpoint, prompts, 2, 1), 2) as procs:
        results = finish(procs, 60)
    for code, _, err in results:
        assert code != 0 and "= 3 ranks, but the launch started 2 processes" in err, err[-2000:]


# ----- block-FP8 checkpoints ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    from step3_hf.tiny_checkpoint import write_tiny_fp8_checkpoint

    return write_tiny_fp8_checkpoint(tmp_path_factory.mktemp("afd_fp8"), vl=True, seed=3)


@pytest.fixture(scope="module")
def fp8_reference(fp8_checkpoint):
    """One process loading the FP8 checkpoint (transformers dequantizes it on CPU), in fp32."""
    return AutoModelForCausalLM.from_pretrained(fp8_checkpoint, dtype=torch.float32, attn_implementation="sdpa").eval()


def fp8_numel(checkpoint, role):
    """Elements (weights and scales) of one side's tensors in a checkpoint, from the files themselves."""
    from safetensors import safe_open

    total = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                if not name.startswith("vi") and role_of_tensor(name.removesuffix("_scale_inv")) is role:
                    total += math.prod(handle.get_slice(name).get_shape())
    return total


@pytest.mark.parametrize("keep_fp8", [False, True], ids=["dequantized", "float8"])
@pytest.mark.parametrize("ffn_ranks", [1, 2, 4])
def test_fp8_checkpoint_in_process_matches_one_process(fp8_checkpoint, fp8_reference, ffn_ranks, keep_fp8):
    # Each FFN rank reads only its experts' float8 weights and scales; kept in float8 (as on CUDA, here computed
    # expert by expert) or dequantized once at load (the CPU default), the logits are one process's. With 4 FFN
    # ranks the experts split 2+2+1+1 and the MLP channel cuts (24 of 96, 8 of 32) fall inside 16 x 16 tiles.
    from transformers.testing_utils import CaptureLogger

    from step3_hf.afd import ffn_server

    teacher, reference_logits = teacher_batch(fp8_reference)
    attention = Step3AFDAttentionForCausalLM.from_checkpoint(CheckpointReader(fp8_checkpoint), fp8_weights=keep_fp8)
    placement, shards, read = Placement(1, ffn_ranks), [], 0
    for index in range(ffn_ranks):
        reader = CheckpointReader(fp8_checkpoint)
        with CaptureLogger(ffn_server.logger) as log:
            shards.append(Step3FFNShard.from_checkpoint(reader, placement, index, fp8_experts=keep_fp8))
        assert all(role_of_tensor(n.removesuffix("_scale_inv")) is Role.FFN for n in reader.names_read)
        assert "model.layers.1.moe.down_proj.weight_scale_inv" in reader.names_read
        read += reader.elements_read
        dequantized = "FP8 expert weights dequantized to torch.float32 at load"  # one line, only when it happens
        assert log.out.count(dequantized) == (0 if keep_fp8 else 1) and log.out.count("\n") == (0 if keep_fp8 else 1)
        experts = shards[-1].layers[1].experts
        local = even_split(6, ffn_ranks, index)[1] - even_split(6, ffn_ranks, index)[0]  # TINY_CONFIG: 6 experts
        assert experts.gate_up_proj.shape == (local, 64, 64)
        if keep_fp8:
            assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
            assert experts.gate_up_proj_scale_inv.shape == (local, 4, 4)
            assert experts.down_proj_scale_inv.shape == (local, 4, 2)
        else:
            assert experts.gate_up_proj.dtype == torch.float32 and not hasattr(experts, "gate_up_proj_scale_inv")
    if ffn_ranks < 4:  # cuts on tile edges: together every FFN weight and scale once, nothing else
        assert read == fp8_numel(fp8_checkpoint, Role.FFN)
    model = attention.connect(InProcessConnector(shards), micro_batches=2, wire="raw")
    with torch.no_grad():
        logits = model(**teacher).logits
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)


def test_random_shard_with_fp8_experts_computes_its_dequantized_weights(checkpoint):
    # The benchmarks' FP8 FFN rank: the same random draw as the bf16 shard, its routed experts quantized to block
    # FP8 (float8 + scales, as `from_checkpoint` keeps them) and the rest left as it is. Its output is what the
    # dequantized experts compute, and it differs from the unquantized shard by FP8 rounding only.
    from step3_hf.fp8 import dequantize_block_fp8

    config, block = CheckpointReader(checkpoint).config, (16, 16)
    plain = Step3FFNShard.from_random(config, Placement(1, 1), 0, dtype=torch.float32, seed=5)
    fp8 = Step3FFNShard.from_random(config, Placement(1, 1), 0, dtype=torch.float32, seed=5, fp8_block_size=block)
    experts = fp8.layers[1].experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.float8_e4m3fn
    assert experts.down_proj_scale_inv.shape == (6, 4, 2) and fp8.config._experts_implementation == "moe_decode"
    assert fp8.layers[1].shared_expert.gate_proj.weight.dtype == torch.float32
    reference = copy.deepcopy(plain)  # the same draw, its experts replaced by the dequantized weights below
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            weight, scale = getattr(experts, name), getattr(experts, name + "_scale_inv")
            getattr(reference.layers[1].experts, name).copy_(dequantize_block_fp8(weight, scale, block))
        hidden = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(0))
        index = torch.tensor([[0, 3], [5, 1], [2, 2], [4, 0], [1, 5]])
        weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
        got, want, unquantized = (s(1, hidden, index, weights) for s in (fp8, reference, plain))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    error = (got - unquantized).abs().max() / unquantized.abs().max()
    assert 0 < error < 0.05


@pytest.mark.parametrize("bad", ["missing", "misshaped", "bf16"])
def test_fp8_scale_missing_or_misshaped_is_refused_naming_it(tmp_path, bad):
    from step3_hf.configuration_step3 import Step3Config
    from step3_hf.fp8 import fp8_quantization_config, quantize_state_dict
    from step3_hf.loading import BrokenCheckpointError
    from step3_hf.tiny_checkpoint import (
        TINY_CONFIG,
        TINY_FP8_BLOCK_SIZE,
        TINY_FP8_CONFIG,
        random_official_state_dict,
        write_official_checkpoint,
    )

    config = Step3Config(**{**TINY_CONFIG, **TINY_FP8_CONFIG})
    original = random_official_state_dict(config, dtype=torch.bfloat16)
    state = dict(quantize_state_dict(original.items(), TINY_FP8_BLOCK_SIZE))
    name = "model.layers.2.moe.up_proj.weight_scale_inv"
    if bad == "missing":
        del state[name]
    elif bad == "misshaped":
        state[name] = state[name][:, :, :1].contiguous()
    else:
        state[name] = state[name].bfloat16()
    config.quantization_config = fp8_quantization_config(TINY_FP8_BLOCK_SIZE)
    broken = write_official_checkpoint(tmp_path / "broken", state, config)
    with pytest.raises(BrokenCheckpointError, match=name.replace(".", r"\.")):
        Step3FFNShard.from_checkpoint(CheckpointReader(broken), Placement(1, 2), 1, fp8_experts=True)


def test_fp8_checkpoint_launch_matches_one_process(fp8_checkpoint, fp8_reference, tmp_path):
    # gloo, one attention rank and two FFN ranks (experts split 3 + 3), raw wire, teacher-forced.
    teacher, reference_logits = teacher_batch(fp8_reference)
    torch.save(teacher, tmp_path / "teacher.pt")
    saved = run_worker_launch(fp8_checkpoint, tmp_path, 1, 2, tmp_path / "teacher.pt", scenarios=[])
    torch.testing.assert_close(saved[0]["teacher_raw"]["logits"], reference_logits, rtol=1e-5, atol=1e-5)
    assert sum(s["elements_read"] for s in saved[1:]) == fp8_numel(fp8_checkpoint, Role.FFN)
    for ffn in saved[1:]:
        assert {n for n in ffn["names_read"] if "moe.gate_proj" in n} == {
            f"model.layers.{layer}.moe.gate_proj.weight{suffix}" for layer in (1, 2) for suffix in ("", "_scale_inv")
        }
