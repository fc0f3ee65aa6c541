"""Where a decode step's GPU time goes: every kernel of one Step-3 decode step, and each linear shape alone.

The model is `decode_step.py`'s (1 dense + 3 MoE layers at the released widths, `mfa_decode` attention, `moe_decode`
experts), bf16 and then quantized to block FP8 in memory. For each precision and batch:

- the step's kernels (torch.profiler over eager steps, so GPU times per kernel without the CUDA graph's help), µs per
  step, grouped into experts / attention kernel / GEMMs / the rest, each group against the bytes it must read;
- a prefill of one `--prefill`-token prompt, profiled the same way;
- each linear shape of a layer on its own (replayed as a CUDA graph): bf16 `F.linear`, the FP8 linear through
  cuBLAS's block-scaled GEMM (activations quantized in one launch, `quantize_fp8_activations`, as `fp8_linear` runs
  it; and beside it with the eager quantization's ten-odd kernels, for comparison), and the Triton
  `fp8_decode_linear` with its default launch, the same with float8 activations (`quantize_activations`, its
  quantization launch included) and the best launch of a sweep, against weight bytes / copy bandwidth.

    python benchmarks/kernel_breakdown.py [--batches 16 64 256] [--context 4096]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import re
from collections import defaultdict

import torch
import torch.nn.functional as F
from decode_attention import machine_and_ceiling, timed_per_call
from decode_step import build_model, decode_step_fn, step_bytes
from moe_decode import relative_error

from step3_hf.fp8 import dequantize_block_fp8, quantize_block_fp8, quantize_model
from step3_hf.kernels.fp8_decode_linear import DecodeLinearLaunch, decode_linear_launch, fp8_decode_linear
from step3_hf.kernels.fp8_activation_quant import quantize_fp8_activations, quantize_fp8_activations_eager
from step3_hf.kernels.fp8_linear import _scaled_mm_linear

GROUPS = {
    "experts (moe_decode)": r"_align_pairs|_gate_up_swiglu|_down_weighted|_sum_choices",
    "attention kernel": r"mfa|decode_attention|_attention|flash",
    "GEMMs": r"gemm|sm90|nvjet|cutlass|xmma|gemv|scaled_mm|cublas",
}


def group_of(kernel: str) -> str:
    for group, pattern in GROUPS.items():
        if re.search(pattern, kernel, re.IGNORECASE):
            return group
    return "other (norms, RoPE, routing, casts, quantisation)"


def kernel_times(step, steps: int = 3) -> dict[str, tuple[float, float]]:
    """kernel name -> (launches per step, µs per step) over `steps` eager steps."""
    with torch.no_grad():
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    table = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or 0
        if device_us > 0:
            table[event.key] = (event.count / steps, device_us / steps)
    return table


def print_breakdown(label: str, table: dict, weights: float, kv: float, bandwidth: float) -> None:
    total = sum(us for _, us in table.values())
    roofline = f"; roofline {(weights + kv) / bandwidth * 1e6:,.0f} µs (weights {weights / 1e9:.2f} GB + KV " \
               f"{kv / 1e9:.2f} GB)" if weights else ""  # fmt: skip
    print(f"\n### {label}: {total:,.0f} µs of kernels per step{roofline}")
    groups = defaultdict(float)
    for name, (_, us) in table.items():
        groups[group_of(name)] += us
    for group, us in sorted(groups.items(), key=lambda g: -g[1]):
        print(f"  {group:55s} {us:9,.0f} µs ({us / total:5.1%})")
    print("  top kernels (launches/step, µs/step):")
    for name, (count, us) in sorted(table.items(), key=lambda kv_: -kv_[1][1])[:25]:
        print(f"    {us:9,.1f} µs {count:5.0f}x  {name[:110]}")


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of each linear of a Step-3 layer."""
    hidden, heads, head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
    return {
        "q_proj (low rank)": (config.share_q_dim, hidden),
        "wq": (heads * head_dim, config.share_q_dim),
        "k_proj / v_proj": (head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "dense gate": (config.intermediate_size, hidden),  # gate_proj and up_proj: two linears of this shape
        "dense down": (hidden, config.intermediate_size),
        "shared gate": (config.share_expert_dim, hidden),  # likewise
        "shared down": (hidden, config.share_expert_dim),
    }


def fp8_kernel_launches(rows: int, out: int, inp: int) -> list[DecodeLinearLaunch]:
    """The launches the sweep tries: the default, and rows x columns x splits x pipeline depth around it."""
    default = decode_linear_launch(rows, out, inp, 128, "cuda")
    launches = [default]
    steps = -(-inp // 128)
    for block_m, block_n, split, stages in itertools.product((16, 32, 64), (32, 64, 128), (1, 2, 4, 8, 16), (3, 4)):
        if block_m <= max(16, 2 * rows) and split <= steps // 2:
            split = -(-steps // -(-steps // split))  # as the op runs it: no empty splits
            launches.append(DecodeLinearLaunch(block_m, block_n, 128, split, 4, stages))
    return list(dict.fromkeys(launches))


def linear_table(config, batches: list[int], bandwidth: float) -> None:
    """Each linear shape alone: bf16, the FP8 linear through cuBLAS (activations quantized in one launch, then with
    the eager quantization), and `fp8_decode_linear` with its default launch, with float8 activations, and the best
    of a sweep."""
    print("\n### linears alone (µs; x = time / (weight bytes / copy bandwidth)), CUDA graph replay")
    print(f"  {'shape':18s} {'out x in':>13s} {'M':>5s} | {'bf16':>14s} | {'fp8 cuBLAS':>14s} | {'eager quant':>14s} | "
          f"{'fp8_decode_linear':>17s} | {'float8 activations':>18s} | the sweep's best 3 launches (block_m, block_n, "
          "block_k, split_k, warps, stages)")  # fmt: skip
    for name, (out, inp) in linear_shapes(config).items():
        weight = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16) * inp**-0.5
        w8, s8 = quantize_block_fp8(weight)
        for m in batches:
            x = [(torch.randn(m, inp, device="cuda", dtype=torch.bfloat16),) for _ in range(2)]
            ref = F.linear(x[0][0].double(), dequantize_block_fp8(w8, s8, (128, 128), torch.float64))

            def timed(fn, nbytes):
                try:
                    seconds = timed_per_call(fn, x)
                    return seconds, f"{seconds * 1e6:7.1f} ({seconds / (nbytes / bandwidth):4.2f}x)"
                except Exception as err:
                    return float("inf"), type(err).__name__

            cells = [timed(lambda a: F.linear(a, weight), weight.numel() * 2)[1]]
            for quantize in (quantize_fp8_activations, quantize_fp8_activations_eager):
                cells.append(timed(lambda a, q=quantize: _scaled_mm_linear(a, w8, s8, q), weight.numel())[1])
            sweep = []
            for launch in fp8_kernel_launches(m, out, inp):
                seconds, text = timed(lambda a, launch=launch: fp8_decode_linear(a, w8, s8, (128, 128), launch),
                                      weight.numel())  # fmt: skip
                sweep.append((seconds, text, launch))
            error = relative_error(fp8_decode_linear(x[0][0], w8, s8, (128, 128)), ref)
            cells.append(sweep[0][1] + f" err {error:.0e}")
            float8 = functools.partial(fp8_decode_linear, weight=w8, scale_inv=s8, block_size=(128, 128),
                                       quantize_activations=True)  # fmt: skip
            error = relative_error(float8(x[0][0]), ref)
            cells.append(timed(float8, weight.numel())[1] + f" err {error:.0e}")
            for seconds, text, launch in sorted(sweep, key=lambda r: r[0])[:3]:
                cells.append(f"{text} {tuple(launch)}")
            print(f"  {name:18s} {out:6d}x{inp:<6d} {m:5d} | " + " | ".join(cells), flush=True)


def prefill_breakdown(model, length: int) -> None:
    model.set_attn_implementation("sdpa")
    ids = torch.randint(3, model.config.vocab_size, (1, length), device="cuda")
    table = kernel_times(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), steps=1)
    print_breakdown(f"prefill 1x{length}", table, 0.0, 0.0, 1.0)
    model.set_attn_implementation("mfa_decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--prefill", type=int, default=2048, help="prompt length of a profiled prefill (0: none)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--skip-linears", action="store_true")
    parser.add_argument("--linear-rows", type=int, nargs="+", help="rows of the linears alone (default: --batches)")
    args = parser.parse_args()
    bandwidth = machine_and_ceiling("kernel_breakdown.py")
    model = build_model("cuda")
    model.set_attn_implementation("mfa_decode")
    model.set_experts_implementation("moe_decode")
    for precision in args.precisions:
        if precision == "fp8":
            quantize_model(model, (128, 128))
            torch.cuda.empty_cache()
        if args.prefill:
            prefill_breakdown(model, args.prefill)
        for batch in args.batches:
            step = decode_step_fn(model, batch, args.context, False, "cuda")
            weights, kv = step_bytes(model, batch, args.context, False)
            print_breakdown(f"{precision} B={batch} ctx={args.context}", kernel_times(step), weights, kv, bandwidth)
            del step
            torch.cuda.empty_cache()
    if not args.skip_linears:
        linear_table(model.config, args.linear_rows or args.batches, bandwidth)


if __name__ == "__main__":
    main()
