"""Decode throughput of Step-3 with Attention-FFN Disaggregation (AFD) on a 2-GPU machine.

Question: with real Step-3 layer widths, is one attention GPU + one FFN GPU (step3_hf.afd over NCCL) worth
more tokens/s per GPU than the same model on one GPU, or than two independent one-GPU replicas?

Side by side, in one run:
  * colocated  -- `Step3ForCausalLM` on one GPU (the baseline a user would otherwise run);
  * replicas   -- the same on both GPUs at once, independently (per-GPU rate with the host shared);
  * AFD        -- rank 0 = attention GPU (embedding, attention, routers, LM head, KV cache), rank 1 = FFN GPU
                  (shared + routed experts), 1 or 3 micro-batches, FP8 wire;
  * ceiling    -- NCCL round trip of one micro-batch's dispatch + combine bytes between the two GPUs, and the
                  cost model's roofline prediction (`step3_hf.cost_model.planner`) of attention and FFN time
                  per micro-batch and layer on an H200.
The model: the release's widths (hidden 7168, 64 query heads on 1 KV head of 256, 48 experts top-3 of 5120,
shared expert 5120) with `--layers` MoE layers, random bf16 weights, a KV cache pre-filled to `--context`
tokens (decode only). Batches that do not fit on one GPU next to the experts are the point of AFD.

    python benchmarks/afd_decode.py --layers 11 --context 1024 --out afd_results

`--connector inprocess` asks instead where each half's time goes, on ONE GPU: both halves in one process
(`InProcessConnector`), attention (+ norm + router), the wire's FP8 quantisation and the FFN each timed with CUDA
events per micro-batch and layer, against their rooflines (weights + KV bytes over the measured copy bandwidth) and
the cost model's prediction, for a static vs dynamic cache, mfa_decode vs sdpa, CUDA graphs, and the FFN's experts
kernel and weights (bf16, or block-FP8 routed experts in `ffn:fp8`); context 4096, as many of the 61 layers'
attention as fit (the FFN side holds one MoE layer of experts and serves every layer with it):

    python benchmarks/afd_decode.py --connector inprocess --quick --out afd_inprocess \
        --trace afd_inprocess/trace.json                          # < 4 min on one H100
    python benchmarks/afd_timeline_svg.py afd_inprocess/trace.json --out docs/img/afd_step_timeline.svg
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import step3_hf  # noqa: E402,F401
from step3_hf.configuration_step3 import Step3Config  # noqa: E402

GIB = 2**30


def step3_config(layers: int) -> Step3Config:
    """The released widths, `layers` layers, all MoE (56 of the release's 61 layers are)."""
    return Step3Config(num_hidden_layers=layers, moe_layers_enum=",".join(map(str, range(layers))))


# ----- shared by the workers ----------------------------------------------------------------------------------
def random_init_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def kv_bytes(config: Step3Config, batch: int, context: int) -> int:
    return kv_layer_bytes(config, batch, context) * config.num_hidden_layers


def fits(config: Step3Config, batch: int, context: int, device, headroom: float = 1.25) -> bool:
    """KV cache + one grown layer + logits, with headroom for activations, against free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    need = kv_bytes(config, batch, context) * (1 + 1 / config.num_hidden_layers) + batch * config.vocab_size * 6
    return need * headroom < free


@torch.no_grad()
def decode(model, config, batch, context, steps, warmup, device, kind: str = "dynamic") -> dict:
    """Greedy decode `steps` tokens after `warmup`, from a pre-filled cache; tokens/s of the timed steps."""
    cache = make_cache(kind, config, batch, context, context + warmup + steps + 1, device, torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            window_start = started
        positions = torch.full((batch, 1), context + i, device=device)
        logits = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    del cache
    return {"batch": batch, "step_ms": 1e3 * elapsed / steps, "tokens_per_s": batch * steps / elapsed,
            "window": [window_start, time.perf_counter()]}


# ----- worker: colocated -------------------------------------------------------------------------------------
def run_colocated(args) -> None:
    from step3_hf.modeling_step3 import Step3ForCausalLM, Step3RotaryEmbedding

    device = torch.device("cuda", args.gpu)
    torch.cuda.set_device(device)
    config = step3_config(args.layers)
    with torch.device("meta"):
        model = Step3ForCausalLM(config)
    model.to(torch.bfloat16).to_empty(device=device)
    model.model.rotary_emb = Step3RotaryEmbedding(config).to(device)
    random_init_(model, seed=0)
    if args.attn_implementation:  # default: Step-3's own choice (the mfa_decode kernel on CUDA)
        model.set_attn_implementation(args.attn_implementation)
    model.set_experts_implementation("grouped_mm")  # what the FFN shard runs
    model.eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    results = {"gpu": args.gpu, "weights_gib": weights / GIB,
               "experts_implementation": model.config._experts_implementation,
               "attn_implementation": model.config._attn_implementation, "rows": []}
    for batch in args.batches:
        if not fits(config, batch, args.context, device):
            results["rows"].append({"batch": batch, "oom": True})
            continue
        try:
            results["rows"].append(decode(model, config, batch, args.context, args.steps, args.warmup, device, args.cache))
        except torch.cuda.OutOfMemoryError:
            results["rows"].append({"batch": batch, "oom": True})
        torch.cuda.empty_cache()
        print(f"[colocated gpu{args.gpu}] {results['rows'][-1]}", flush=True)
    Path(args.result).write_text(json.dumps(results))


# ----- worker: AFD (one process per GPU, torchrun environment) --------------------------------------------------
def run_afd(args) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from step3_hf.afd import (
        NcclAttentionConnector,
        NcclFFNConnector,
        Placement,
        Step3AFDAttentionForCausalLM,
        Step3FFNShard,
        WireFormat,
        serve,
    )
    from step3_hf.afd.exchange import ExchangeGroups
    from step3_hf.afd.timing import PhaseTimer
    from step3_hf.afd.wire import DispatchLayout

    rank = int(os.environ["RANK"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=timedelta(seconds=120), device_id=device)
    groups = ExchangeGroups.create(timedelta(seconds=120))
    placement = Placement(1, 1)
    config = step3_config(args.layers)
    results = {"rank": rank, "rows": []}
    if rank == 0:
        model = Step3AFDAttentionForCausalLM.from_random(config, device=device, dtype=torch.bfloat16,
                                                         attn_implementation=args.attn_implementation)
        connector = NcclAttentionConnector(placement, 0, groups, hidden_size=config.hidden_size,
                                           dtype=torch.bfloat16, device=device, timeout_s=120)
        model.connect(connector, micro_batches=3, wire=WireFormat.FP8)
        model.use_cuda_graphs(args.cuda_graphs)
        results["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
        results["attn_implementation"] = model.config._attn_implementation
        dist.barrier()
        for batch in args.batches:
            for micro_batches in args.micro_batches:
                if not fits(config, batch, args.context, device):
                    results["rows"].append({"batch": batch, "micro_batches": micro_batches, "oom": True})  # no fit
                    continue
                model.micro_batches = micro_batches
                model.timer = connector.timer = PhaseTimer(device)
                row = decode(model, config, batch, args.context, args.steps, args.warmup, device, args.cache)
                timed = model.timer.steps[args.warmup:]
                row.update(micro_batches=micro_batches,
                           attention_ms=1e3 * sum(s.phases_s.get("attention", 0) + s.phases_s.get("wire", 0)
                                                  for s in timed) / len(timed),
                           wait_ms=1e3 * sum(s.phases_s.get("wait", 0) for s in timed) / len(timed))
                results["rows"].append(row)
                torch.cuda.empty_cache()
                print(f"[afd attention] {row}", flush=True)
        connector.close()
    else:
        shard = Step3FFNShard.from_random(config, placement, 0, device=device, dtype=torch.bfloat16)
        connector = NcclFFNConnector(placement, 1, groups, hidden_size=config.hidden_size, top_k=config.moe_top_k,
                                     moe_layers=set(config.moe_layer_indices), dtype=torch.bfloat16, device=device,
                                     timeout_s=600)
        results["weights_gib"] = sum(p.numel() * p.element_size() for p in shard.parameters()) / GIB
        dist.barrier()
        timer = PhaseTimer(device)
        serve(shard, connector, timer)
        results["rounds"] = [[s.started_at, s.wall_s, s.phases_s.get("ffn", 0.0)] for s in timer.steps]

    # NCCL round trip of one micro-batch's dispatch (FP8) + combine (bf16) between the GPUs: the transfer stage.
    results["round_trip_us"] = {}
    for tokens in args.transfer_tokens:
        out = torch.empty(DispatchLayout(tokens, config.hidden_size, config.moe_top_k, WireFormat.FP8,
                                         torch.bfloat16).nbytes, dtype=torch.uint8, device=device)
        back = torch.empty(tokens, config.hidden_size, dtype=torch.bfloat16, device=device)
        times = []
        for i in range(25):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            if rank == 0:
                dist.send(out, 1)
                dist.recv(back, 1)
            else:
                dist.recv(out, 0)
                dist.send(back, 0)
            torch.cuda.synchronize(device)
            if i >= 5:
                times.append(time.perf_counter() - started)
        results["round_trip_us"][tokens] = 1e6 * sorted(times)[len(times) // 2]
    Path(args.result.replace("RANK", str(rank))).write_text(json.dumps(results))
    dist.destroy_process_group()


# ----- in process: both halves on one device, each timed on its own ---------------------------------------------
# name -> (cache, attention implementation, CUDA graphs, FFN experts implementation). "dynamic" is what the 2-GPU
# runs above used (DynamicCache grown by a copy per layer and step); "static" is the preallocated cache whose
# micro-batches write their rows in place; "graphs" replays each layer's and micro-batch's attention phase from a
# CUDA graph. The FFN runs Step-3's default experts kernel (moe_decode) except in "ffn:grouped_mm" (what the 2-GPU
# runs above used); "ffn:fp8" holds the routed experts in block FP8 (128 x 128 tiles, as the FP8 release's FFN ranks
# keep them), through moe_decode's FP8 path.
@dataclass(frozen=True)
class Variant:
    cache: str  # generate()'s cache: "static" or "dynamic"
    attention: str  # attn_implementation
    graphs: bool  # the attention phases replayed from CUDA graphs
    experts: str  # the FFN shard's experts_implementation, or "fp8": float8 experts through moe_decode
    fused_qkv: bool = True  # q, k and v projections in one GEMM (the attention model's default)
    wire_kernels: bool = True  # the FP8 wire encoded and decoded in one launch each (else eager torch)
    decode_linears: bool = False  # the attention layers' bf16 linears through `decode_linear` (else cuBLAS)


VARIANTS = {
    "static+mfa_decode": Variant("static", "mfa_decode", False, "moe_decode"),
    "dynamic+mfa_decode": Variant("dynamic", "mfa_decode", False, "moe_decode"),
    "dynamic+sdpa": Variant("dynamic", "sdpa", False, "moe_decode"),  # the first 2-GPU runs' attention
    "static+mfa_decode+graphs": Variant("static", "mfa_decode", True, "moe_decode"),
    "static+mfa_decode,ffn:grouped_mm": Variant("static", "mfa_decode", False, "grouped_mm"),
    "static+mfa_decode+graphs,ffn:fp8": Variant("static", "mfa_decode", True, "fp8"),
    "static+mfa_decode+graphs,ffn:fp8,separate q/k/v": Variant("static", "mfa_decode", True, "fp8", fused_qkv=False),
    "static+mfa_decode+graphs,ffn:fp8,eager wire": Variant("static", "mfa_decode", True, "fp8", wire_kernels=False),
    "static+mfa_decode+graphs,ffn:fp8,decode_linear": Variant("static", "mfa_decode", True, "fp8",
                                                              decode_linears=True),
}
QUICK = dict(batches=[128, 512], variants=list(VARIANTS), steps=3, warmup=2)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_attention_heads=8, num_attention_groups=1,
            head_dim=16, share_q_dim=32, moe_num_experts=6, moe_top_k=2, moe_intermediate_size=24,
            share_expert_dim=24, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # the script's own CPU check (--tiny): same code path, toy widths
FP8_BLOCK_TINY = (8, 8)  # TINY's widths in whole tiles


class CyclicFFN(torch.nn.Module):
    """FFN layer `l` of the attention model served by shard layer `l mod n`: one GPU cannot hold 61 layers of
    experts beside the attention, and every MoE layer has the same shapes, so its time is the same."""

    def __init__(self, shard: torch.nn.Module, layers: int):
        super().__init__()
        self.shard, self.layers = shard, layers

    def forward(self, layer, hidden, top_k_index=None, top_k_weights=None):
        return self.shard(layer % self.layers, hidden, top_k_index, top_k_weights)


def inprocess_config(args, layers: int) -> Step3Config:
    if args.tiny:
        return Step3Config(**TINY, num_hidden_layers=layers, moe_layers_enum=",".join(map(str, range(layers))))
    return step3_config(layers)


def attention_layer_bytes(model) -> int:
    """Weights one micro-batch's attention phase reads per layer: attention, both norms and the router."""
    layer = model.model.layers[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def ffn_layer_bytes(config: Step3Config, tokens: int, itemsize: int = 2, expert_itemsize: float = 2) -> float:
    """Expected weight bytes one micro-batch of `tokens` reads in an MoE layer: the shared expert plus each routed
    expert with the probability that at least one token picks it (`expert_itemsize` 1 for float8 experts, whose
    128 x 128 tiles' float32 scales add 4 / 16384 bytes per weight)."""
    h, e, k = config.hidden_size, config.moe_num_experts, config.moe_top_k
    hit = 1 - (1 - k / e) ** tokens
    shared = itemsize * 3 * h * config.share_expert_dim
    return shared + expert_itemsize * hit * e * 3 * h * config.moe_intermediate_size


def kv_layer_bytes(config: Step3Config, rows: int, length: int, itemsize: int = 2) -> int:
    return 2 * rows * length * config.num_attention_groups * config.head_dim * itemsize


def make_cache(kind: str, config: Step3Config, batch: int, context: int, max_len: int, device, dtype):
    """A cache holding `context` random positions for `batch` sequences in every layer of `config`."""
    from transformers.cache_utils import DynamicCache, StaticCache

    shape = (batch, config.num_attention_groups, 1, config.head_dim)
    if kind == "dynamic":
        cache = DynamicCache(config=config)
        full = (batch, config.num_attention_groups, context, config.head_dim)
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(full, device=device, dtype=dtype), torch.randn(full, device=device, dtype=dtype), layer)
        return cache
    cache = StaticCache(config=config, max_cache_len=max_len)
    for layer in cache.layers:
        layer.lazy_initialization(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
        layer.cumulative_length.fill_(context)
    return cache


def layers_that_fit(config, built: int, batch: int, max_len: int, kind: str, device) -> int:
    """Attention layers whose KV cache (plus, for the dynamic cache, one layer's growth copy) fits beside the
    weights, keeping room for the logits and activations."""
    if device.type != "cuda":
        return built
    free, _ = torch.cuda.mem_get_info(device)
    reserve = batch * config.vocab_size * 10 + (3 << 30)
    per_layer = kv_layer_bytes(config, batch, max_len)
    usable = free - reserve - (2 * per_layer if kind == "dynamic" else 0)
    return max(0, min(built, int(usable // per_layer)))


@torch.no_grad()
def inprocess_run(model, config, kind: str, batch: int, context: int, args, device, trace: bool) -> dict:
    """Greedy decode of `batch` sequences from a cache of `context` tokens; per-phase times per micro-batch-layer."""
    from step3_hf.afd.pipeline import split_micro_batches
    from step3_hf.afd.timing import PhaseTimer

    steps = args.warmup + args.steps
    cache = make_cache(kind, config, batch, context, context + steps + 1, device, torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (batch, 1), device=device)
    model.timer = PhaseTimer(device)
    model.connector.timer = model.timer
    for i in range(steps):
        model.timer.keep_trace = trace and i == steps - 1
        positions = torch.full((batch, 1), context + i, device=device)
        logits = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits
        ids = logits[:, -1].argmax(-1, keepdim=True)
    del cache
    timed = model.timer.steps[args.warmup:]
    sizes = [r.stop - r.start for r in split_micro_batches(batch, args.micro_batches)]
    per = len(model.model.layers) * len(sizes)  # micro-batch-layers per step

    def mean_us(name: str, host: bool = False) -> float:
        return 1e6 * sum((s.host_s if host else s.phases_s).get(name, 0.0) for s in timed) / len(timed) / per

    row = {"batch": batch, "cache": kind, "layers": len(model.model.layers), "micro_batches": len(sizes),
           "micro_batch_tokens": max(sizes), "step_ms": 1e3 * sum(s.wall_s for s in timed) / len(timed)}
    for name in ("attention", "wire", "ffn"):
        row[f"{name}_us"] = mean_us(name)
        row[f"{name}_host_us"] = mean_us(name, host=True)
    if trace:
        row["trace"] = model.timer.last_trace
    return row


def run_inprocess(args) -> None:
    """Both halves in this process (`InProcessConnector`): attention and FFN µs per micro-batch and layer against
    their rooflines and the cost model, for each cache / attention-implementation variant."""
    from step3_hf.afd import InProcessConnector, Placement, Step3AFDAttentionForCausalLM, Step3FFNShard
    from step3_hf.kernels import decode_linear, fp8_wire
    from step3_hf.kernels.fused_qkv import fuse_qkv_projections, unfuse_qkv_projections

    device = torch.device(args.device)
    if device.type == "cuda":
        from decode_attention import copy_bandwidth

        if device.index is None:  # torch.cuda.set_device and mem_get_info need the index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        name = torch.cuda.get_device_name(device)
        bandwidth = copy_bandwidth()
        torch.cuda.empty_cache()  # the copy's 8 GiB go back before the layers that fit are counted
        card = "H200" if "H200" in name else "H100"
    else:
        name, card = "cpu", "H100"
        src = torch.empty(1 << 26, dtype=torch.int16).random_()
        started = time.perf_counter()
        src.clone()
        bandwidth = 2 * src.numel() * 2 / (time.perf_counter() - started)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# afd_decode in process {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: {' '.join(sys.argv)}",
             f"# ran: batches {args.batches}, variants {args.variants}, steps {args.steps} after {args.warmup} warm-up"
             + (" (--quick sets these)" if args.quick else ""),
             f"{name}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)"]
    print("\n".join(lines), flush=True)

    # The attention side: as many of the requested layers as fit beside one FFN layer and the smallest batch's KV.
    full = inprocess_config(args, args.layers)
    ffn = Step3FFNShard.from_random(inprocess_config(args, args.ffn_layers), Placement(1, 1), 0, device=device,
                                    dtype=torch.bfloat16)
    ffn_fp8 = None  # the same draw with float8 experts, only when a variant asks for it
    if any(VARIANTS[variant].experts == "fp8" for variant in args.variants):
        ffn_fp8 = Step3FFNShard.from_random(inprocess_config(args, args.ffn_layers), Placement(1, 1), 0, device=device,
                                            dtype=torch.bfloat16, fp8_block_size=FP8_BLOCK_TINY if args.tiny else (128, 128))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the bf16 draw it was quantized from goes back before the layers that fit are counted
    with torch.device("meta"):  # sizes only
        probe = Step3AFDAttentionForCausalLM(inprocess_config(args, 1)).to(torch.bfloat16)
    per_layer = attention_layer_bytes(probe)
    fixed = sum(p.numel() * 2 for n, p in probe.named_parameters() if ".layers." not in n)
    built = args.layers
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        max_len = args.context + args.warmup + args.steps + 1
        kv = kv_layer_bytes(full, min(args.batches), max_len)
        room = free - fixed - min(args.batches) * full.vocab_size * 10 - (3 << 30)
        built = max(1, min(args.layers, int(room // (per_layer + kv))))
    config = inprocess_config(args, built)
    # Built with `DecodeLinear`s, which `decode_linear.ENABLED` turns on for the variants that ask (cuBLAS otherwise,
    # the default's behaviour).
    model = Step3AFDAttentionForCausalLM.from_random(config, device=device, dtype=torch.bfloat16, decode_linears=True)
    decode_linear.ENABLED = False
    served = CyclicFFN(ffn, args.ffn_layers)
    model.connect(InProcessConnector([served]), micro_batches=args.micro_batches, wire="fp8")
    all_layers = model.model.layers
    summary = {"args": vars(args), "device": name, "copy_bandwidth": bandwidth, "layers_built": built,
               "attention_layer_bytes": per_layer, "rows": []}
    print(f"attention side: {built} layers ({per_layer / GIB:.3f} GiB of weights each); FFN: {args.ffn_layers} "
          f"MoE layer(s) of weights serving every layer", flush=True)

    for batch in args.batches:
        for variant in args.variants:
            kind, attention, graphs, experts, fused_qkv, wire_kernels, decode_linears = astuple(VARIANTS[variant])
            max_len = args.context + args.warmup + args.steps + 1
            layers = layers_that_fit(config, built, batch, max_len, kind, device)
            if layers < 1:
                summary["rows"].append({"batch": batch, "variant": variant, "oom": True})
                print(f"[in process] batch {batch} {variant}: no fit", flush=True)
                continue
            model.model.layers = all_layers[:layers]
            model.set_attn_implementation(attention)
            trace = bool(args.trace) and batch == args.trace_batch and variant == args.variants[0]
            try:
                served.shard = ffn_fp8 if experts == "fp8" else ffn
                if experts != "fp8":
                    ffn.set_experts_implementation(experts)
                model.use_cuda_graphs(graphs)
                if not fused_qkv:
                    unfuse_qkv_projections(model)
                fp8_wire.ENABLED = wire_kernels
                decode_linear.ENABLED = decode_linears
                row = inprocess_run(model, inprocess_config(args, layers), kind, batch, args.context, args, device, trace)
            except torch.cuda.OutOfMemoryError:
                row = {"batch": batch, "oom": True}
            except Exception as err:  # report it and go on with the other variants
                row = {"batch": batch, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            finally:
                model.use_cuda_graphs(False)
                fuse_qkv_projections(model)  # the defaults again (a no-op on fused layers)
                fp8_wire.ENABLED = True
                decode_linear.ENABLED = False
            row["variant"] = variant
            if not row.get("oom") and not row.get("error"):
                tokens = row["micro_batch_tokens"]
                kv = kv_layer_bytes(config, tokens, args.context + args.warmup + args.steps // 2)
                row["attention_roofline_us"] = 1e6 * (per_layer + kv) / bandwidth
                expert_itemsize = 1 + 4 / 128**2 if experts == "fp8" else 2
                row["ffn_roofline_us"] = 1e6 * ffn_layer_bytes(config, tokens, expert_itemsize=expert_itemsize) / bandwidth
                pred = prediction(args, [tokens], card=card, config=config)[tokens]
                row["predicted_attention_us"], row["predicted_ffn_us"] = pred["attention_us"], pred["ffn_us"]
                if trace:
                    trace_file = Path(args.trace)
                    trace_file.parent.mkdir(parents=True, exist_ok=True)
                    trace_file.write_text(json.dumps({
                        "device": name, "batch": batch, "variant": variant, "layers": layers,
                        "micro_batches": row["micro_batches"], "context": args.context, "events": row.pop("trace"),
                    }))
                    print(f"trace of one step written to {trace_file}", flush=True)
            summary["rows"].append(row)
            (out / "inprocess_summary.json").write_text(json.dumps(summary, indent=1))
            print(f"[in process] {json.dumps({k: v for k, v in row.items() if k != 'trace'})}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    model.model.layers = all_layers
    decode_linear.ENABLED = True
    text = inprocess_table(summary, args, card)
    (out / "inprocess_table.txt").write_text("\n".join(lines) + "\n" + text + "\n")
    print(text, flush=True)


def inprocess_table(summary: dict, args, card: str) -> str:
    lines = [
        f"\nOne {summary['device']}, both halves in process (InProcessConnector), {'toy' if args.tiny else 'Step-3'} widths, context "
        f"{args.context}, {args.micro_batches} micro-batches, bf16, FP8 wire. Per micro-batch and layer, µs (GPU time, "
        "CUDA events); roofline = bytes / measured copy bandwidth; pred = cost model (planner, "
        f"{card} spec, bf16; FFN at 50% of peak bandwidth)",
        f"{'batch':>6} {'variant':<32} {'layers':>6} {'mb tok':>6} | {'attn':>7} {'roof':>6} {'x':>5} {'pred':>6} "
        f"{'host':>6} | {'wire':>5} | {'FFN':>7} {'roof':>6} {'x':>5} {'pred':>6} | {'step ms':>8}",
    ]
    for r in summary["rows"]:
        if r.get("oom") or r.get("error"):
            lines.append(f"{r['batch']:>6} {r['variant']:<32} {'no fit' if r.get('oom') else r['error']}")
            continue
        lines.append(
            f"{r['batch']:>6} {r['variant']:<32} {r['layers']:>6} {r['micro_batch_tokens']:>6} | "
            f"{r['attention_us']:>7.0f} {r['attention_roofline_us']:>6.0f} "
            f"{r['attention_us'] / r['attention_roofline_us']:>5.2f} {r['predicted_attention_us']:>6.0f} "
            f"{r['attention_host_us']:>6.0f} | {r['wire_us']:>5.0f} | "
            f"{r['ffn_us']:>7.0f} {r['ffn_roofline_us']:>6.0f} {r['ffn_us'] / r['ffn_roofline_us']:>5.2f} "
            f"{r['predicted_ffn_us']:>6.0f} | {r['step_ms']:>8.1f}"
        )
    lines.append("attn: attention block + post-attention norm + router; host: CPU time issuing it (launch-bound where "
                 "it reaches attn); wire: FP8 quantisation + dequantisation; x: measured / roofline (target <= 1.3)")
    return "\n".join(lines)


# ----- orchestration --------------------------------------------------------------------------------------------
def worker_command(args, role: str, result: str, **extra) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", role, "--result", result, "--layers", str(args.layers),
           "--context", str(args.context), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.attn_implementation:
        cmd += ["--attn-implementation", args.attn_implementation]
    cmd += ["--cache", args.cache] + (["--cuda-graphs"] if args.cuda_graphs else [])
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return cmd


def run_all(procs: list[subprocess.Popen], timeout: float, log) -> list[int | None]:
    """Wait for every worker within `timeout` seconds in total; kill whatever is left."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        log(f"workers timed out after {timeout} s; killed")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs]


def nccl_smoke(args, out: Path, log) -> dict:
    """The CLI over NCCL on a tiny checkpoint (fp32, raw wire) vs single-process generate on CPU."""
    from transformers import AutoModelForCausalLM

    from step3_hf.tiny_checkpoint import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp())
    path = write_tiny_checkpoint(tmp / "tiny", vl=True, seed=3)
    prompts = [[1, 17, 33, 90, 4, 5, 6], [1, 200], [1, 8, 9, 10, 77], [1, 5, 6, 7], [1, 99, 3]]
    (tmp / "p.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "step3_hf.afd",
           "--model", str(path), "--attention-ranks", "1", "--ffn-ranks", "1", "--prompts", str(tmp / "p.jsonl"),
           "--max-new-tokens", "10", "--wire", "raw", "--dtype", "float32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.phase_timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    (out / "nccl_smoke.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    got = [json.loads(line)["completion_ids"] for line in done.stdout.splitlines() if line.startswith("{")]
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = ref[:, width:].tolist()
    result = {"returncode": done.returncode, "identical": got == ref, "timing": done.stdout.splitlines()[-4:]}
    log(f"NCCL smoke (tiny model, 1A+1F, fp32, raw wire): rc={done.returncode} identical to one process: "
        f"{got == ref}")
    return result


CARDS = {  # the cost model's view of the card (spec sheet, dense peaks); price is irrelevant to time
    "H100": dict(bf16_flops=9.89e14, fp8_flops=1.979e15, memory_bandwidth=3.35e12, memory_bytes=80e9),
    "H200": dict(bf16_flops=9.89e14, fp8_flops=1.979e15, memory_bandwidth=4.8e12, memory_bytes=141e9),
}


def cost_model_card(name: str = "H200"):
    from step3_hf.cost_model import Card

    return Card(name=name, price_per_hour_usd=1.0, **CARDS[name])


def prediction(args, micro_batch_tokens: list[int], card: str = "H200", config: Step3Config | None = None) -> dict:
    """Cost-model roofline (bf16 weights and KV) of attention and FFN per micro-batch per layer on `card`."""
    from step3_hf.cost_model import Quantization
    from step3_hf.cost_model.planner import PlanAssumptions, plan_afd

    gpu = cost_model_card(card)
    config = (config or step3_config(args.layers)).to_dict()
    out = {}
    for tokens in micro_batch_tokens:
        # A loose TPOT keeps the planner at one attention and one FFN GPU; weights and KV in bf16.
        plan = plan_afd(config, gpu, gpu, args.context,
                        PlanAssumptions(micro_batch=tokens, gpus_per_instance=1, tpot_ms=1e5),
                        Quantization(weight_bytes=2.0, kv_bytes=2.0))
        out[tokens] = {"attention_us": plan.attention_time_us, "ffn_us": plan.ffn_time_us}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["colocated", "afd"])
    parser.add_argument("--result")
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--layers", type=int, help="MoE layers (default 11; inprocess: 61, or as many as fit)")
    parser.add_argument("--context", type=int, help="cached tokens per sequence (default 1024; inprocess: 4096)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+",
                        help="sequences (default 64 256 1024 2048 4096 8192; inprocess: 128 256 512)")
    parser.add_argument("--micro-batches", type=int, nargs="+", help="default 1 3; inprocess: one value, default 3")
    parser.add_argument("--transfer-tokens", type=int, nargs="+", help="default: every micro-batch size swept")
    parser.add_argument("--out", default="afd_results")
    parser.add_argument("--phase-timeout", type=float, default=150, help="seconds for each phase's workers")
    parser.add_argument("--attn-implementation", default=None,
                        help="attention backend of the attention side (default: Step-3's choice, mfa_decode on CUDA)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["smoke", "colocated", "replicas", "afd"])
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                        help="nccl: the KV cache of the attention side and the colocated model")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="nccl: replay the attention phases from CUDA graphs (needs --cache static)")
    parser.add_argument("--connector", choices=["nccl", "inprocess"], default="nccl",
                        help="nccl: the 2-GPU comparison above; inprocess: both halves on one device, timed apart")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="inprocess: cache, attention implementation, CUDA graphs and FFN experts of each run")
    parser.add_argument("--ffn-layers", type=int, default=1, help="inprocess: distinct FFN layers held (reused cyclically)")
    parser.add_argument("--device", default="cuda", help="inprocess: the device (cpu only with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="inprocess: toy widths, to check the script on CPU")
    parser.add_argument("--quick", action="store_true",
                        help=f"inprocess: {QUICK['batches']} sequences, {QUICK['variants']}, {QUICK['steps']} steps")
    parser.add_argument("--trace", help="inprocess: write one step's CUDA-event timeline (JSON) here")
    parser.add_argument("--trace-batch", type=int, help="inprocess: the batch whose step is traced (default: the first)")
    args = parser.parse_args(argv)
    inprocess = args.connector == "inprocess"
    defaults = dict(layers=(61, 11), context=(4096, 1024), batches=([128, 256, 512], [64, 256, 1024, 2048, 4096, 8192]),
                    micro_batches=([3], [1, 3]))
    for key, (ours, theirs) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, ours if inprocess else theirs)
    if args.cuda_graphs and args.cache != "static":
        parser.error("--cuda-graphs needs --cache static")
    if inprocess:
        if len(args.micro_batches) != 1:
            parser.error("--connector inprocess takes one --micro-batches value")
        args.micro_batches = args.micro_batches[0]
        for key in ("layers", "context", "steps", "ffn_layers", "micro_batches"):
            if getattr(args, key) < 1:
                parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
        if args.quick:
            for key, value in QUICK.items():
                setattr(args, key, value)
        if args.trace_batch is None:
            args.trace_batch = args.batches[0]
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--connector inprocess runs on CUDA (or --device cpu --tiny)")
        return run_inprocess(args)
    if not args.transfer_tokens:
        args.transfer_tokens = sorted({max(b // m, 1) for b in args.batches for m in args.micro_batches})
    if args.worker == "colocated":
        return run_colocated(args)
    if args.worker == "afd":
        return run_afd(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "afd_decode.log", "a")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    log(f"# afd_decode {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: {' '.join(sys.argv)}")
    log(f"torch {torch.__version__}, GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
    summary: dict = {"args": vars(args)}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1"}
    work = Path(tempfile.mkdtemp())  # worker results; only the log, the summary and the table go to --out
    workers_log = open(out / "workers.log", "a")
    phases = [p for p in ("afd", "colocated", "replicas", "smoke") if p not in args.skip]

    def start(cmd, extra_env=None):
        return subprocess.Popen(cmd, env={**env, **(extra_env or {})}, stdout=workers_log, stderr=subprocess.STDOUT)

    def finish_phase(name):
        summary["prediction"] = prediction(args, sorted({max(b // m, 1) for b in args.batches for m in args.micro_batches}))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log(f"-- {name} done at {time.strftime('%H:%M:%S')}")

    if "afd" in phases:
        procs = []
        for rank in (0, 1):
            renv = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": "29533"}
            procs.append(start(worker_command(
                args, "afd", str(work / "afd_rankRANK.json"), batches=args.batches,
                micro_batches=args.micro_batches, transfer_tokens=args.transfer_tokens), renv))
        log(f"AFD workers exit codes: {run_all(procs, args.phase_timeout, log)}")
        for rank in (0, 1):
            if (work / f"afd_rank{rank}.json").exists():
                summary[f"afd_rank{rank}"] = json.loads((work / f"afd_rank{rank}.json").read_text())
        finish_phase("afd")
    if "colocated" in phases:
        cmd = worker_command(args, "colocated", str(work / "colocated.json"), gpu=0, batches=args.batches)
        log(f"colocated worker exit code: {run_all([start(cmd)], args.phase_timeout, log)}")
        if (work / "colocated.json").exists():
            summary["colocated"] = json.loads((work / "colocated.json").read_text())
        finish_phase("colocated")
    if "replicas" in phases:
        fitting = [r["batch"] for r in summary.get("colocated", {}).get("rows", []) if not r.get("oom")]
        batches = fitting[-2:] or args.batches[:2]
        procs = [start(worker_command(args, "colocated", str(work / f"replica{g}.json"), gpu=g, batches=batches))
                 for g in (0, 1)]
        log(f"replica workers exit codes: {run_all(procs, args.phase_timeout, log)}")
        summary["replicas"] = [json.loads((work / f"replica{g}.json").read_text())
                               for g in (0, 1) if (work / f"replica{g}.json").exists()]
        finish_phase("replicas")
    if "smoke" in phases:
        try:
            summary["smoke"] = nccl_smoke(args, out, log)
        except Exception as err:  # the measurements above still stand: report the failure
            log(f"NCCL smoke failed: {err!r}")
        finish_phase("smoke")
    log(table(summary, args))


def table(summary: dict, args) -> str:
    config = step3_config(args.layers)
    layers = config.num_hidden_layers
    lines = [f"\nStep-3 widths, {layers} MoE layers, context {args.context}, bf16; decode tokens/s per GPU"]
    colocated = {r["batch"]: r for r in summary.get("colocated", {}).get("rows", [])}
    replicas = {}
    for rep in summary.get("replicas", []):
        for r in rep["rows"]:
            if not r.get("oom"):
                replicas.setdefault(r["batch"], []).append(r["tokens_per_s"])
    afd_rows = summary.get("afd_rank0", {}).get("rows", [])
    rounds = summary.get("afd_rank1", {}).get("rounds", [])
    trip = summary.get("afd_rank0", {}).get("round_trip_us", {})
    predicted = summary.get("prediction", {})
    lines.append(f"{'batch':>6} | {'1 GPU':>8} | {'2 replicas':>10} | {'AFD mb':>6} {'tok/s/GPU':>10} {'step ms':>8} | "
                 f"{'attn us':>8} {'FFN us':>8} {'xfer us':>8} | {'attn busy':>9} {'FFN busy':>8} | "
                 f"{'pred attn':>9} {'pred FFN':>8}")
    for row in afd_rows:
        batch = row["batch"]
        one = colocated.get(batch, {})
        one_s = "no fit" if one.get("oom") else (f"{one['tokens_per_s']:.0f}" if one else "-")
        rep_s = f"{sum(replicas[batch]) / 2:.0f}" if len(replicas.get(batch, [])) == 2 else "-"
        if row.get("oom"):
            lines.append(f"{batch:>6} | {one_s:>8} | {rep_s:>10} | {row['micro_batches']:>6} {'no fit':>10}")
            continue
        m = row["micro_batches"]
        mb_tokens = max(batch // m, 1)
        step_s = row["step_ms"] / 1e3
        t0, t1 = row["window"]
        ffn_s = sum(f for start, _, f in rounds if t0 <= start <= t1) / args.steps
        per_mb = 1e6 / (layers * m)
        attn_us, ffn_us = row["attention_ms"] * 1e-3 * per_mb, ffn_s * per_mb
        key = str(min((int(k) for k in trip), key=lambda k: abs(k - mb_tokens))) if trip else None
        pred = predicted.get(mb_tokens) or predicted.get(str(mb_tokens)) or {}
        lines.append(
            f"{batch:>6} | {one_s:>8} | {rep_s:>10} | {m:>6} {row['tokens_per_s'] / 2:>10.0f} {row['step_ms']:>8.1f} | "
            f"{attn_us:>8.0f} {ffn_us:>8.0f} {(trip[key] if key else float('nan')):>8.0f} | "
            f"{row['attention_ms'] / 1e3 / step_s:>9.0%} {ffn_s / step_s:>8.0%} | "
            f"{pred.get('attention_us', float('nan')):>9.0f} {pred.get('ffn_us', float('nan')):>8.0f}"
        )
    best_one = max((r["tokens_per_s"] for r in colocated.values() if not r.get("oom")), default=float("nan"))
    best_afd = max((r["tokens_per_s"] / 2 for r in afd_rows if not r.get("oom")), default=float("nan"))
    lines.append(f"best: 1 GPU {best_one:.0f} tok/s; AFD {best_afd:.0f} tok/s per GPU "
                 f"(target AFD >= 1 GPU: {'met' if best_afd >= best_one else 'not met'})")
    lines.append("attn/FFN us: per micro-batch per layer (CUDA events); xfer: NCCL round trip of that micro-batch's "
                 "FP8 dispatch + bf16 combine; busy: share of the step; pred: cost-model roofline on H200 (planner, "
                 "bf16, FFN at 50% of peak bandwidth); no fit: KV cache + logits (+25%) exceed free GPU memory, not run")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
