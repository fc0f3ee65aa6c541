"""One Step-3 MoE layer's routed experts at decode: how close do the expert weights stream to the HBM bandwidth?

`Step3Experts` at the released widths (7168 hidden, 48 experts of 5120, top-3; 10.6 GB of bf16 weights), random
weights, a fresh softmax top-3 routing of random logits per timed call (4 routings cycled). Variants, each through
transformers' experts interface:

- eager: the per-expert Python loop (host-synchronising: timed eagerly);
- batched_mm: one gathered weight copy per (token, choice) pair (runs out of memory at large batches);
- grouped_mm: transformers' default experts path (`torch._grouped_mm`);
- ours: `experts_implementation="moe_decode"`, the Triton sorted-token-block kernel.

The last three are replayed as CUDA graphs. Bytes read = the weights of the experts the drawn routings hit
(averaged over the routings); ceiling = those bytes / the device-copy bandwidth measured in the same run.

    python benchmarks/moe_decode.py [--batches 1 16 64 256] [--sweep]
    python benchmarks/moe_decode.py --batches 2048 4096 8192 --sweep-fp8 --variants grouped_mm   # prefill sizes

`--sweep` first times the kernel's launch parameters (block sizes, warps, stages) at each batch; `--sweep-fp8` does
the same on the weights quantized to block FP8, and prints a last table per batch: ours on FP8 weights (default and
best launch, and the default launch with the activations rounded to float8 for float8 tensor-core products,
`quantize_activations`) beside bf16 `grouped_mm` (the experts path transformers uses), against the FP8 roofline: the
larger of the hit experts' float8 bytes / the copy bandwidth and the FLOPs / a bf16 cuBLAS GEMM's rate measured in
the same run (the weight-only kernel widens float8 to bf16 for the tensor cores). Batches of more than 32 rows per
expert on average (prefill, e.g. 2048 tokens and up) sweep the rows per block too (64 and 128).
`--sweep-float8-activations` sweeps the model's default FP8 path (float8 activations), rows per block included.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from decode_attention import machine_and_ceiling, timed_per_call
from decode_step import eager_seconds

from step3_hf import Step3Config
from step3_hf.fp8 import quantize_block_fp8
from step3_hf.kernels import MOE_DECODE_EXPERTS, moe_decode
from step3_hf.kernels.moe_decode import PREFILL_LAUNCH, default_launch
from step3_hf.modeling_step3 import Step3Experts

# name -> (experts_implementation, replayed as a CUDA graph)
VARIANTS = {
    "eager loop": ("eager", False),
    "batched_mm": ("batched_mm", True),
    "grouped_mm": ("grouped_mm", True),
    "ours (moe_decode)": (MOE_DECODE_EXPERTS, True),
}
ROUTINGS = 4


def build_experts(config: Step3Config) -> Step3Experts:
    experts = Step3Experts(config).to(device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=config.hidden_size**-0.5)
        experts.down_proj.normal_(std=config.moe_intermediate_size**-0.5)
    return experts


def draw_inputs(config: Step3Config, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(batch, config.hidden_size, device="cuda", generator=generator).bfloat16()
    logits = torch.randn(batch, config.moe_num_experts, device="cuda", generator=generator)
    weights, index = logits.softmax(-1).topk(config.moe_top_k, dim=-1)
    return hidden, index, weights.bfloat16()


def weight_bytes(experts: Step3Experts, index: torch.Tensor) -> float:
    """Bytes of the experts this routing hits (each read once at best)."""
    per_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * experts.gate_up_proj.element_size()
    return index.unique().numel() * per_expert


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def fp8_weights(experts: Step3Experts) -> dict:
    """`moe_decode` keyword arguments for the experts' weights quantized to block FP8 (128 x 128 tiles;
    `quantize_block_fp8` takes the experts one at a time, as the float32 temporaries of all 48 would not fit)."""
    quantized = {"block_size": (128, 128)}
    for name in ("gate_up_proj", "down_proj"):
        quantized[name], quantized[name.replace("_proj", "_scale")] = quantize_block_fp8(getattr(experts, name))
    return quantized


def matmul_rate(size: int = 8192) -> float:
    """bf16 cuBLAS GEMM of `size`^3: FLOPs per second (the compute ceiling of a bf16 tensor-core kernel)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    seconds = timed_per_call(torch.mm, [(a, b)])
    return 2 * size**3 / seconds


def expert_flops(config: Step3Config, batch: int) -> float:
    """Multiply-adds x 2 of the routed experts: every (token, choice) pair through gate, up and down."""
    return batch * config.moe_top_k * 2 * 3 * config.hidden_size * config.moe_intermediate_size


def sweep(
    experts: Step3Experts, config: Step3Config, batches: list[int], bandwidth: float, fp8: bool,
    sweep_float8_activations: bool = False,
) -> dict:
    """Times the kernel's launch parameters at each batch (decode sizes: the default rows per block; prefill sizes:
    64 and 128 rows); prints the fastest few. With `fp8`, on the weights quantized to block FP8 (bytes read: one per
    weight), and also times the default launch and bf16 `grouped_mm`. Returns, per batch, the FP8 rows of the last
    table. With `sweep_float8_activations` (FP8 weights), the launches of the model's default FP8 path are swept
    instead, the rows per block (half, once and twice the default) and the launch order included."""
    weights_kwargs = {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}
    if fp8:
        with torch.no_grad():  # the parameters require grad
            weights_kwargs = fp8_weights(experts)
    if sweep_float8_activations:
        weights_kwargs["quantize_activations"] = True
    label = "sweep float8 activations" if sweep_float8_activations else "sweep fp8" if fp8 else "sweep"
    table = {}
    for batch in batches:
        inputs = [draw_inputs(config, batch, seed) for seed in range(ROUTINGS)]
        read = sum(weight_bytes(experts, index) for _, index, _ in inputs) / ROUTINGS / (2 if fp8 else 1)
        num_pairs = batch * config.moe_top_k
        launch = default_launch(num_pairs, config.moe_num_experts)
        if launch == PREFILL_LAUNCH:  # prefill: compute-bound
            grid = ((64, 128), (64, 128), (64, 128), (4, 8), (3,))
        elif sweep_float8_activations:
            block_ms = tuple(sorted({max(16, launch["block_m"] // 2), launch["block_m"], 2 * launch["block_m"]}))
            grid = (block_ms, (64, 128), (128,), (4,), (3, 4), (False, True))
        else:
            block_m = launch["block_m"]
            grid = ((block_m,), *(((64, 128, 256), (128,), (4, 8), (3, 4, 5, 6)) if fp8 else
                                  ((32, 64, 128), (128, 256), (4, 8), (3, 4))))  # fmt: skip
        results, default, ours = [], None, None
        launches = [dict(zip(("block_m", "block_n", "block_k", "num_warps", "num_stages", "expert_blocks_first"), p))
                    for p in itertools.product(*grid)]  # fmt: skip
        for params in [{}, *launches]:  # {}: moe_decode's default launch

            def call(hidden, index, weights, params=params):
                return moe_decode(hidden, index, weights, **weights_kwargs, **params)

            try:
                with torch.no_grad():
                    seconds = timed_per_call(call, inputs)
            except Exception as err:  # e.g. out of shared memory: skip that point
                print(f"  {label} B={batch} {params or 'default'}: {type(err).__name__}", flush=True)
                continue
            if params:
                results.append((seconds, params))
            else:
                default = seconds
                with torch.no_grad():
                    ours = call(*inputs[0])
        results.sort(key=lambda r: r[0])
        for seconds, params in results[:5]:
            print(f"  {label} B={batch}: {seconds * 1e6:8.1f} us, {read / seconds / 1e12:.2f} TB/s, {params}")
        default_us = "failed" if default is None else f"{default * 1e6:.1f} us"
        print(f"  {label} B={batch}: default launch {launch} {default_us}; "
              f"ceiling {read / bandwidth * 1e6:.1f} us", flush=True)  # fmt: skip
        if fp8 and not sweep_float8_activations:

            def float8_activations(hidden, index, weights):
                return moe_decode(hidden, index, weights, **weights_kwargs, quantize_activations=True)

            with torch.no_grad():
                try:
                    float8 = timed_per_call(float8_activations, inputs)
                    float8_out = float8_activations(*inputs[0])
                except Exception as err:  # report it in the table
                    float8, float8_out = f"{type(err).__name__}: {str(err)[:60]}", None
                config._experts_implementation = "grouped_mm"
                bf16 = experts(*inputs[0])
                grouped = timed_per_call(experts, inputs)
                # FP8 rounding of the weights (and of the activations), against bf16
                error = float("nan") if ours is None else relative_error(ours, bf16)
                float8_error = float("nan") if float8_out is None else relative_error(float8_out, bf16)
            print(f"  {label} B={batch}: float8 activations, default launch: {float8}", flush=True)
            table[batch] = dict(read=read, default=default, best=results[0] if results else None, grouped=grouped,
                                error=error, float8=float8, float8_error=float8_error)  # fmt: skip
            torch.cuda.empty_cache()
    return table


def print_fp8_table(config: Step3Config, table: dict, bandwidth: float, flop_rate: float) -> None:
    print(f"\nRouted experts of one Step-3 MoE layer, block-FP8 weights (ours) and bf16 (grouped_mm); us per call; "
          f"roofline = max(float8 bytes of the hit experts / {bandwidth / 1e12:.2f} TB/s copy, FLOPs / "
          f"{flop_rate / 1e12:.0f} TFLOP/s bf16 cuBLAS GEMM)\n")  # fmt: skip
    print("| tokens | float8 read (GB) | TFLOP | ours FP8 weight-only, default launch | ours FP8 weight-only, best "
          "launch | ours FP8, float8 activations (the model's default) | bf16 grouped_mm | roofline (bytes / compute) "
          "| best / roofline | float8 activations / roofline | FP8 vs bf16 error | float8 activations vs bf16 error |")
    print("|---" * 12 + "|")
    for batch, row in table.items():
        flops = expert_flops(config, batch)
        roofline = max(row["read"] / bandwidth, flops / flop_rate)
        default = "failed" if row["default"] is None else f"{row['default'] * 1e6:,.0f}"
        best = "n/a" if row["best"] is None else f"{row['best'][0] * 1e6:,.0f} ({row['best'][1]})"
        ratio = "n/a" if row["best"] is None else f"{row['best'][0] / roofline:.2f}x"
        float8, float8_ratio = row["float8"], "n/a"
        if not isinstance(float8, str):
            float8, float8_ratio = f"{float8 * 1e6:,.0f}", f"{float8 / roofline:.2f}x"
        print(f"| {batch} | {row['read'] / 1e9:.2f} | {flops / 1e12:.2f} | {default} | {best} | {float8} | "
              f"{row['grouped'] * 1e6:,.0f} | {roofline * 1e6:,.0f} ({row['read'] / bandwidth * 1e6:,.0f} / "
              f"{flops / flop_rate * 1e6:,.0f}) | {ratio} | {float8_ratio} | {row['error']:.1e} | "
              f"{row['float8_error']:.1e} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sweep", action="store_true", help="time the kernel's launch parameters first")
    parser.add_argument("--sweep-fp8", action="store_true", help="... also on block-FP8 weights")
    parser.add_argument("--sweep-float8-activations", action="store_true",
                        help="... on block-FP8 weights with float8 activations (the model's default), rows per block "
                             "included")  # fmt: skip
    args = parser.parse_args()
    bandwidth = machine_and_ceiling("moe_decode.py")
    config = Step3Config()
    experts = build_experts(config)
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    widths = f"2 x {inter} x {hidden} + {hidden} x {inter}"
    print(f"experts: {config.moe_num_experts} x ({widths}), top-{config.moe_top_k}, bf16", flush=True)
    if args.sweep:
        sweep(experts, config, args.batches, bandwidth, fp8=False)
    fp8_table = {}
    if args.sweep_fp8:
        flop_rate = matmul_rate()
        print(f"compute ceiling: bf16 cuBLAS GEMM {flop_rate / 1e12:.0f} TFLOP/s", flush=True)
        fp8_table = sweep(experts, config, args.batches, bandwidth, fp8=True)
    if args.sweep_float8_activations:
        sweep(experts, config, args.batches, bandwidth, fp8=True, sweep_float8_activations=True)

    rows = []
    for batch in args.batches:
        inputs = [draw_inputs(config, batch, seed) for seed in range(ROUTINGS)]
        read = sum(weight_bytes(experts, index) for _, index, _ in inputs) / ROUTINGS
        row = {"batch": batch, "bytes": read}
        with torch.no_grad():
            config._experts_implementation = "grouped_mm"
            reference = experts(*inputs[0])
            for name in args.variants:
                implementation, graph = VARIANTS[name]
                config._experts_implementation = implementation
                try:
                    error = relative_error(experts(*inputs[0]), reference)
                    if graph:
                        seconds = timed_per_call(experts, inputs)
                    else:
                        seconds = sum(eager_seconds(lambda args=args: experts(*args)) for args in inputs) / ROUTINGS
                    row[name] = (seconds, error)
                except Exception as err:  # e.g. batched_mm out of memory: report, keep measuring the others
                    row[name] = f"{type(err).__name__}: {str(err)[:60]}"
                print(f"  B={batch} {name}: {row[name]}", flush=True)
                torch.cuda.empty_cache()
        rows.append(row)

    print(f"\nRouted experts of one Step-3 MoE layer at decode, bf16; us per call (effective TB/s of the hit experts' "
          f"weights); ceiling = bytes / {bandwidth / 1e12:.2f} TB/s device copy\n")  # fmt: skip
    print("| batch | weights read (GB) | " + " | ".join(args.variants) + " | ceiling | ours / ceiling |")
    print("|---" * (4 + len(args.variants)) + "|")
    for row in rows:
        cells = []
        for name in args.variants:
            value = row[name]
            if isinstance(value, str):
                cells.append(value)
            else:
                cells.append(f"{value[0] * 1e6:,.0f} ({row['bytes'] / value[0] / 1e12:.2f})")
        ceiling = row["bytes"] / bandwidth
        ours = row.get("ours (moe_decode)")
        ratio = f"{ours[0] / ceiling:.2f}x" if isinstance(ours, tuple) else "n/a"
        print(f"| {row['batch']} | {row['bytes'] / 1e9:.2f} | " + " | ".join(cells)
              + f" | {ceiling * 1e6:,.0f} | {ratio} |")  # fmt: skip
    print("\nrelative error vs grouped_mm (routing 0): " + "; ".join(
        f"B={row['batch']} " + ", ".join(f"{n} {row[n][1]:.1e}" for n in args.variants if isinstance(row[n], tuple))
        for row in rows))  # fmt: skip
    if fp8_table:
        print_fp8_table(config, fp8_table, bandwidth, flop_rate)


if __name__ == "__main__":
    main()
