"""Decode attention on Step-3 shapes: our split-KV kernel (bf16 and float8 cache) vs PyTorch SDPA vs flash-attn.

One new token per sequence, 64 query heads sharing 1 KV head of dim 256. Effective bandwidth = cache bytes read /
time (the bytes any kernel must read at least); the ceiling is a device-to-device copy measured in the same run
(bytes read + written / time). Every variant is first checked against a float64 reference on a small batch.

    python benchmarks/decode_attention.py                  # the table
    python benchmarks/decode_attention.py --sweep          # launch-parameter sweep first (block, warps, stages, splits)
    python benchmarks/decode_attention.py --json out.json  # also write every number
    python benchmarks/decode_attention.py --placements 1   # one allocation of the inputs per shape (default 3)
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import triton

from step3_hf.kernels import decode_attention, default_num_splits, quantize_float8

HEADS, KV_HEADS, HEAD_DIM = 64, 1, 256
BATCHES = (1, 8, 32, 128)
CONTEXTS = (1024, 4096, 16384, 65536)
ROTATE_BYTES = 512 << 20  # inputs rotated through this many bytes so that L2 (60 MB) cannot serve repeats
# Calls per CUDA-graph replay (at least): a decode step replays one graph holding every layer's call, so the graph's
# own launch (~3-8 us on the H200) is not part of one call's cost. Copies of at least 512 MiB repeat within a replay.
CALLS_PER_GRAPH = 4
SPACER_BYTES = (1 << 30) + (64 << 20)  # allocated ahead of each further placement of the inputs

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


def copy_bandwidth() -> float:
    """Device-to-device copy of 4 GiB: bytes read + written per second."""
    src = torch.empty(1 << 31, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * (1 << 32) / (ms * 1e-3)


def machine_and_ceiling(script: str) -> float:
    """Exit unless CUDA is present; print the machine line and the copy ceiling; return the ceiling (bytes/s)."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}")  # fmt: skip
    bandwidth = copy_bandwidth()
    print(f"ceiling: device copy {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    return bandwidth


def timed_per_call(fn, inputs: list, reps: int = 20) -> float:
    """Median seconds per call of `fn(*inputs[i])`, cycling through `inputs`, replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in inputs:  # warm up (compiles) outside the graph
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in inputs:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / len(inputs))
    del graph
    return sorted(times)[len(times) // 2]


def make_inputs(batch: int, context: int, copies: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    sets = []
    for _ in range(copies):
        query = torch.randn(batch, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        key = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        value = torch.randn_like(key)
        sets.append((query.transpose(1, 2), key, value))
    return sets


def reference(query, key, value, scale):
    key = key.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    value = value.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    probs = ((query.double() @ key.transpose(-1, -2)) * scale).softmax(-1)
    return (probs @ value).transpose(1, 2)


def variants(**launch):
    scale = HEAD_DIM**-0.5

    def ours(q, k, v):
        return decode_attention(q, k, v, scale=scale, **launch)

    def ours_fp8(q, k8, v8):
        return decode_attention(q, k8.data, v8.data, scale=scale, key_scale=k8.scale, value_scale=v8.scale, **launch)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).transpose(1, 2)

    found = {"ours bf16": (ours, False), "ours fp8": (ours_fp8, True), "SDPA enable_gqa": (sdpa, False)}
    if flash_attn_with_kvcache is not None:

        def flash(q, k, v):  # flash-attn wants [B, S, H, D]
            return flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)

        found["flash_attn_with_kvcache"] = (flash, False)
    return found


def quantize_cache(key, value):
    """The float8 cache as `Float8StaticCache` stores it: values in tiles."""
    return quantize_float8(key, layout="key_cache"), quantize_float8(value, layout="value_cache")


def check_correctness() -> None:
    (query, key, value), = make_inputs(3, 3000, 1, seed=1)
    ref = reference(query, key, value, HEAD_DIM**-0.5)
    for name, (fn, fp8) in variants().items():
        k, v = quantize_cache(key, value) if fp8 else (key, value)
        out = fn(query, k, v)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        limit = 6e-2 if fp8 else 1e-2
        print(f"check {name:26s} rel. error vs float64 {err:.2e} (limit {limit})")
        assert err < limit, name


def cache_bytes(batch: int, context: int, fp8: bool) -> float:
    """Bytes of K and V one decode call must read: bf16, or e4m3 plus one float32 scale per row."""
    return batch * KV_HEADS * context * 2 * (HEAD_DIM + 4 if fp8 else HEAD_DIM * 2)


def run_table(args) -> list[dict]:
    """Each shape on `args.placements` sets of inputs, the p-th allocated behind a p * SPACER_BYTES spacer so that it
    lands elsewhere in memory (the same kernel on the same data ran 10-15% apart with different placements, see
    docs/performance.md): per variant the median time and every placement's."""
    rows = []
    for batch, context in itertools.product(args.batches, args.contexts):
        kv_bytes = cache_bytes(batch, context, fp8=False)
        copies = max(1, min(32, math.ceil(ROTATE_BYTES / kv_bytes)))
        times = {name: [] for name in variants()}
        for placement in range(args.placements):
            spacer = torch.empty(placement * SPACER_BYTES, dtype=torch.uint8, device="cuda")
            inputs = make_inputs(batch, context, copies, seed=placement)
            for name, (fn, fp8) in variants().items():
                args_list = [(q, *quantize_cache(k, v)) if fp8 else (q, k, v) for q, k, v in inputs]
                args_list *= math.ceil(CALLS_PER_GRAPH / len(args_list))
                times[name].append(timed_per_call(fn, args_list))
                del args_list
            del inputs, spacer
            torch.cuda.empty_cache()
        row = {"batch": batch, "context": context, "kv_MiB": kv_bytes / 2**20}
        for name, (_, fp8) in variants().items():
            seconds = statistics.median(times[name])
            row[name] = {"us": seconds * 1e6, "TBps": cache_bytes(batch, context, fp8) / seconds / 1e12,
                         "us_per_placement": [t * 1e6 for t in times[name]]}  # fmt: skip
        row["fp8/bf16 per placement"] = [b / f for b, f in zip(times["ours bf16"], times["ours fp8"])]
        rows.append(row)
        cells = "  ".join(f"{n}: {row[n]['us']:8.1f} us {row[n]['TBps']:5.2f} TB/s" for n in variants())
        print(f"B={batch:4d} ctx={context:6d}  {cells}", flush=True)
    return rows


def time_launch(results: list, call_args: tuple, batch: int, context: int, fp8: bool, **launch) -> float:
    """Seconds per call of our kernel with these launch parameters (inf if they do not fit); appends a result row."""
    fn, _ = variants(**launch)["ours fp8" if fp8 else "ours bf16"]
    row = {"batch": batch, "context": context, "fp8": fp8, **launch}
    try:
        seconds = timed_per_call(fn, [call_args], reps=5)
    except Exception as err:  # e.g. out of shared memory for this block/stage combination
        results.append({**row, "error": str(err)[:200]})
        return float("inf")
    results.append({**row, "us": seconds * 1e6, "TBps": cache_bytes(batch, context, fp8) / seconds / 1e12})
    return seconds


def sweep(args) -> list[dict]:
    """Time launch parameters around the defaults on long-context shapes; print the best per shape and cache dtype:
    tiles at the default split count first, then split counts around it for the best tile."""
    results = []
    for batch, context in [(8, 65536), (32, 32768), (128, 16384)]:
        (query, key, value), = make_inputs(batch, context, 1)
        cases = {False: (query, key, value), True: (query, *quantize_cache(key, value))}
        del query, key, value
        for fp8, call_args in cases.items():
            default = default_num_splits(batch, KV_HEADS, context, "cuda", float8=fp8)
            blocks, stages = ((64, 128), (2, 3, 4)) if fp8 else ((64,), (3,))
            grid = itertools.product(blocks, (4, 8), stages)
            tiles = [dict(block_n=n, num_warps=w, num_stages=s) for n, w, s in grid]
            timings = {}
            for tile in tiles:
                timings[(tuple(tile.items()), default)] = time_launch(
                    results, call_args, batch, context, fp8, **tile, num_splits=default
                )
            best_tile = dict(min(timings, key=timings.get)[0])
            for splits in {max(1, default // 2), default * 2} - {default}:
                timings[(tuple(best_tile.items()), splits)] = time_launch(
                    results, call_args, batch, context, fp8, **best_tile, num_splits=splits
                )
            (tile, splits), seconds = min(timings.items(), key=lambda item: item[1])
            print(f"sweep B={batch} ctx={context} {'fp8' if fp8 else 'bf16'}: best {dict(tile)} splits {splits} "
                  f"{seconds * 1e6:.1f} us (default splits {default})", flush=True)  # fmt: skip
        del cases, call_args
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="sweep launch parameters before the table")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument("--placements", type=int, default=3, help="input allocations per shape (median reported)")
    parser.add_argument("--json", help="write all numbers to this file")
    args = parser.parse_args()
    bandwidth = machine_and_ceiling("decode_attention.py")
    print(f"flash_attn: {'yes' if flash_attn_with_kvcache is not None else 'not installed'}")
    check_correctness()
    sweep_rows = sweep(args) if args.sweep else []
    rows = run_table(args)

    names = list(variants())
    print(f"\nDecode attention, Step-3 shapes ({HEADS} q heads, {KV_HEADS} KV head, d={HEAD_DIM}), one new token;")
    print(f"effective TB/s = cache bytes / time; ceiling (copy) {bandwidth / 1e12:.2f} TB/s; median over "
          f"{args.placements} placements of the inputs, fp8/bf16 also per placement (min-max); "
          f"{CALLS_PER_GRAPH}+ calls per CUDA-graph replay\n")  # fmt: skip
    print("| batch | context | KV MiB | " + " | ".join(f"{n} us (TB/s)" for n in names) + " | ours/SDPA | fp8/bf16 |")
    print("|---" * (5 + len(names)) + "|")
    for row in rows:
        cells = " | ".join(f"{row[n]['us']:.1f} ({row[n]['TBps']:.2f})" for n in names)
        speedup = row["SDPA enable_gqa"]["us"] / row["ours bf16"]["us"]
        fp8_speedup = row["ours bf16"]["us"] / row["ours fp8"]["us"]
        per_placement = row["fp8/bf16 per placement"]
        shape = f"| {row['batch']} | {row['context']} | {row['kv_MiB']:.0f} |"
        spread = f"({min(per_placement):.2f}-{max(per_placement):.2f})"
        print(f"{shape} {cells} | {speedup:.2f}x | {fp8_speedup:.2f}x {spread} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "platform": platform.platform(), "torch": torch.__version__,
                       "triton": triton.__version__, "copy_TBps": bandwidth / 1e12, "rows": rows,
                       "sweep": sweep_rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
