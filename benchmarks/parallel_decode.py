"""Decode tokens/s of Step-3 over N devices: tensor parallelism vs expert parallelism (alone, or with attention data
parallelism) vs `device_map` layer split.

Launched with torchrun, one process per GPU (or per CPU rank with gloo):

    torchrun --nproc-per-node 8 benchmarks/parallel_decode.py                    # Step-3 widths, layers that fit
    torchrun --nproc-per-node 2 benchmarks/parallel_decode.py --tiny --device cpu  # tiny widths, gloo (the test)

Steps, the same for every batch size:

1. Rank 0 writes a random checkpoint in the official layout (Step-3 widths; `--layers auto`: as many layers as
   the memory planner, `step3-cost fit`, says TP and EP both hold at the largest batch and as 80% of the free disk
   holds (11 GB a layer: point `--checkpoint` at a large disk); layer 0 dense, the rest MoE).
2. Reference, one process: rank 0 loads it with `device_map="auto"` over every GPU (on CPU: whole), prefills a
   random prompt and decodes greedily, keeping the logits of the prefill and the first decode steps and the tokens.
   This is also the `device_map` row: a single process walking the layers device by device.
3. TP (`DistributedConfig(tp_plan="auto")`), EP (`ep_size=N, tp_plan={}`, or `enable_expert_parallel` before
   transformers 5.21) and attention data parallelism with EP (`dp_ep`: `fsdp_size=N, ep_size=N`, rank r decoding
   sequences r::N of the batch; `step3_hf.parallel.attention_data_parallel_config`) load the same checkpoint on all
   ranks, feed the reference's tokens and compare their logits to the reference's (the largest error over ranks).
   A layout whose logits differ (beyond 1e-4 relative in fp32, 3e-2 in bf16) is reported as wrong and not timed:
   timing a wrong model says nothing.
4. Timing: `--steps` decode steps of the whole batch (one new token per sequence) after the prefill, eager, with a
   device synchronisation at the end; tokens/s = batch x steps / seconds.

Rank 0 prints a table and, with `--json`, writes the rows. Nothing here needs more than torch, transformers and
accelerate; multi-GPU results are not in the docs yet (no multi-GPU machine has run this).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import DistributedConfig

from step3_hf import Step3Config, Step3ForCausalLM
from step3_hf.checkpoint_layout import official_tensor_shapes
from step3_hf.cost_model import memory as planner
from step3_hf.fp8 import write_sharded
from step3_hf.parallel import attention_data_parallel_config
from step3_hf.tiny_checkpoint import TINY_CONFIG

LAYOUTS = ("device_map", "tp", "ep", "dp_ep")
CHECK_STEPS = 3  # decode steps whose logits are compared (after the prefill's last position)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (the CPU test), fp32")
    ap.add_argument("--layers", default="auto", help="decoder layers, or 'auto' (as many as TP and EP hold)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--context", type=int, default=None, help="prompt tokens (default 128; 8 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 32; 4 with --tiny)")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    ap.add_argument("--checkpoint", default=None, help="reuse (or keep) the random checkpoint in this folder")
    ap.add_argument("--json", default=None, help="write the rows here (rank 0)")
    args = ap.parse_args(argv)
    for key in ("context", "steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            ap.error(f"--{key} must be at least 1")
    if any(b < 1 for b in args.batches):
        ap.error("--batches must be positive")
    args.context = args.context or (8 if args.tiny else 128)
    args.steps = args.steps or (4 if args.tiny else 32)
    if args.steps < CHECK_STEPS:
        ap.error(f"--steps must be at least {CHECK_STEPS} (the compared decode steps)")
    return args


# ----------------------------------------------------------------------------- setup


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world, dev


def step3_widths(layers: int) -> dict:
    """Released widths, `layers` decoder layers: layer 0 dense, the rest MoE (the release's mix is 5 dense of 61)."""
    return dict(num_hidden_layers=layers, moe_layers_enum=",".join(str(i) for i in range(1, layers)) or "")


def layers_that_fit(world: int, memory: float, batch: int, context: int, disk: float = math.inf) -> int:
    """Most layers (1..61) for which the planner says TP=world and EP=world both fit in `memory` per card, and
    whose bf16 checkpoint fits in `disk` bytes."""
    best = 1
    for layers in range(2, 62):
        config = {**Step3Config().to_dict(), **step3_widths(layers)}
        fit = planner.fit_layouts(config, memory, world, weights="bf16", kv="bf16", batch=batch, context=context)
        wanted = {f"TP={world}", f"EP={world}"}
        if fit.weight_bytes > disk or not all(layout.fits for layout in fit.layouts if layout.layout in wanted):
            break
        best = layers
    return best


def write_random_checkpoint(path: Path, config: Step3Config, device: torch.device, dtype: torch.dtype) -> None:
    """Official-layout safetensors (shards as `fp8.write_sharded` cuts them), tensors drawn on `device` (fast) and
    written one by one."""
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(0)
    shapes = official_tensor_shapes(config)
    itemsize = dtype.itemsize

    def tensors():
        for name, shape in shapes.items():
            t = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            t = 1.0 + 0.1 * t if name.endswith("norm.weight") else t * (0.5 / math.sqrt(shape[-1]))
            yield name, t.to(dtype).cpu()

    sizes = [(name, math.prod(shape) * itemsize) for name, shape in shapes.items()]
    write_sharded(path, sizes, tensors(), description="random checkpoint")
    config_dict = config.to_dict()
    config_dict["architectures"] = ["Step3TextForCausalLM"]
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))


def distributed_config(layout: str, world: int) -> DistributedConfig:
    if layout == "tp":
        return DistributedConfig(tp_plan="auto", tp_size=world)
    if layout == "dp_ep":
        return attention_data_parallel_config(world)
    if "ep_size" in inspect.signature(DistributedConfig).parameters:
        return DistributedConfig(tp_size=world, ep_size=world, tp_plan={})
    return DistributedConfig(tp_size=world, enable_expert_parallel=True)  # transformers < 5.21


# ----------------------------------------------------------------------------- decode


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(model, prompt: torch.Tensor, steps: int, device: torch.device, tokens: torch.Tensor | None = None):
    """Prefill `prompt`, then `steps` one-token steps (greedy, or teacher-forced with `tokens` [B, steps]).
    Returns (logits of the prefill's last position and the first CHECK_STEPS steps, tokens fed, seconds of the
    decode steps)."""
    out = model(input_ids=prompt.to(device), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    checked = [out.logits[:, -1].float().cpu()]
    fed = []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True) if tokens is None else tokens[:, :1].to(device)
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        fed.append(nxt.cpu())
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        if step < CHECK_STEPS:
            checked.append(out.logits[:, -1].float().cpu())
        if step + 1 < steps:
            nxt = out.logits[:, -1].argmax(-1, keepdim=True) if tokens is None else tokens[:, step + 1 : step + 2].to(device)
    sync(device)
    return torch.stack(checked), torch.cat(fed, dim=1), time.perf_counter() - start


def local_experts(model) -> int | None:
    """Routed experts this rank holds in its first MoE layer (all of them unless the layout splits experts)."""
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            weight = experts.gate_up_proj
            return (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]
    return None


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if args.tiny:
        layers = int(args.layers) if args.layers != "auto" else TINY_CONFIG["num_hidden_layers"]
        config = Step3Config(**{**TINY_CONFIG, "num_hidden_layers": layers,
                                "moe_layers_enum": ",".join(str(i) for i in range(1, layers))})
    else:
        if args.layers == "auto":
            memory = 0.9 * (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 64e9)
            folder = Path(args.checkpoint or tempfile.gettempdir())
            disk = 0.8 * shutil.disk_usage(folder if folder.exists() else folder.parent).free
            layers = layers_that_fit(world, memory, max(args.batches), args.context + args.steps, disk)
        else:
            layers = int(args.layers)
        config = Step3Config(**step3_widths(layers))

    own_dir = args.checkpoint is None
    ckpt = Path(args.checkpoint or (tempfile.mkdtemp(prefix="parallel_decode_") if rank == 0 else ""))
    names = [str(ckpt)]
    dist.broadcast_object_list(names, src=0)
    ckpt = Path(names[0])
    if rank == 0 and not (ckpt / "config.json").is_file():
        write_random_checkpoint(ckpt, config, device, dtype)
    dist.barrier()

    rows = []
    try:
        for batch in args.batches:
            generator = torch.Generator().manual_seed(batch)
            prompt = torch.randint(3, config.vocab_size, (batch, args.context), generator=generator)
            # Reference (and the device_map row): one process.
            ref = [None]
            if rank == 0:
                kwargs = {"device_map": "auto"} if device.type == "cuda" else {}
                model = Step3ForCausalLM.from_pretrained(ckpt, dtype=dtype, **kwargs).eval()
                first = next(model.parameters()).device
                logits, tokens, seconds = decode(model, prompt, args.steps, first)
                ref = [(logits, tokens)]
                if "device_map" in args.layouts:
                    rows.append(dict(layout="device_map", batch=batch, status="ok (reference)", rel_err=0.0,
                                     experts_per_rank=local_experts(model),
                                     tokens_per_s=batch * args.steps / seconds, ms_per_step=1e3 * seconds / args.steps))
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            dist.broadcast_object_list(ref, src=0)
            ref_logits, ref_tokens = ref[0]
            for layout in (x for x in args.layouts if x != "device_map"):
                row = dict(layout=layout, batch=batch)
                # Attention data parallelism: rank r decodes sequences r::world of the batch; the others, all of it.
                rows_here = slice(rank, None, world) if layout == "dp_ep" else slice(None)
                try:
                    if layout == "dp_ep" and batch < world:
                        raise ValueError(f"batch {batch} has fewer sequences than the {world} ranks")
                    model = Step3ForCausalLM.from_pretrained(
                        ckpt, dtype=dtype, distributed_config=distributed_config(layout, world)).eval()
                    first = next(model.parameters()).device
                    mine, my_tokens = prompt[rows_here], ref_tokens[rows_here]
                    logits, _, _ = decode(model, mine, CHECK_STEPS, first, my_tokens)
                    errors = [None] * world
                    dist.all_gather_object(errors, relative_error(logits, ref_logits[: CHECK_STEPS + 1, rows_here]))
                    err = max(errors)  # every rank takes the same decision below
                    row.update(rel_err=err, experts_per_rank=local_experts(model))
                    if err > tolerance:
                        row["status"] = f"wrong logits (rel. err {err:.1e} > {tolerance:.0e}), not timed"
                    else:
                        _, _, seconds = decode(model, mine, args.steps, first, my_tokens)
                        times = [None] * world
                        dist.all_gather_object(times, seconds)
                        seconds = max(times)  # the step ends when the slowest rank has its tokens
                        row.update(status="ok", tokens_per_s=batch * args.steps / seconds,
                                   ms_per_step=1e3 * seconds / args.steps)
                    del model
                except Exception as err:  # a layout that cannot load or run is a result, not a crash
                    row["status"] = f"failed: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                dist.barrier()
                rows.append(row)
    finally:
        dist.barrier()
        if rank == 0 and own_dir:
            shutil.rmtree(ckpt, ignore_errors=True)

    if rank == 0:
        print(f"Step-3 decode over {world} x {device.type}: {'tiny' if args.tiny else 'released'} widths, "
              f"{config.num_hidden_layers} layers, {str(dtype).removeprefix('torch.')}, prompt {args.context}, "
              f"{args.steps} steps")
        print(f"  {'layout':<11}{'batch':>6}{'experts/rank':>13}{'tokens/s':>11}{'ms/step':>9}{'rel. err':>10}  status")
        for r in rows:
            tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
            ms = f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else "-"
            err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
            print(f"  {r['layout']:<11}{r['batch']:>6}{r.get('experts_per_rank') or '-':>13}{tps:>11}{ms:>9}{err:>10}  {r['status']}")
        if args.json:
            meta = dict(world=world, device=device.type, layers=config.num_hidden_layers, dtype=str(dtype),
                        context=args.context, steps=args.steps, tiny=args.tiny)
            Path(args.json).write_text(json.dumps({"setup": meta, "rows": rows}, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
