"""`model.generate()` as users call it, on a Step-3 with the released layer widths but few layers, against the roofline.

`Step3ForCausalLM` with 1 dense + 3 MoE layers (7168 hidden, 64x256 MFA heads, 48 experts top-3, the real vocab),
bf16, random weights, greedy. A decode step is `(time of 1 + N new tokens - time of 1 new token) / N`. Columns:

- default: `generate(input_ids, attention_mask, max_new_tokens=...)`, nothing else (the dynamic cache, and the
  kernels Step-3 picks on CUDA);
- static: the same with `cache_implementation="static"` (transformers compiles the decode step);
- default, eager layers: the default with the CUDA graphs around each layer's attention switched off
  (`step3_hf.kernels.decode_graphs.ENABLED = False`), every launch issued eagerly;
- default, stop check per step: the default with `generate()`'s stop check read at every step, as transformers does
  on CUDA (`step3_hf.deferred_stop_check.DEVICE_TYPES = ()`): the host waits for each step before issuing the next;
- default, transformers' DynamicCache: the default with `step3_hf.kv_cache.ENABLED = False`, the cache that appends
  with `torch.cat` in place of Step-3's in-place one;
- stock: what a user of a built-in MoE model gets, SDPA attention and `grouped_mm` experts, dynamic cache.

Before the table, once: the static cache's compile time (first `generate()` call from a cold compiler minus a warm
call), also printed under the table.

Roofline = (weights a step reads + KV bytes at the mean context of the run) / device-copy bandwidth measured in the
same run (see `decode_step.step_bytes`).

    python benchmarks/generate.py [--shapes 16x2048 64x1024 128x1024 64x2048] [--new-tokens 32]
    python benchmarks/generate.py --profile 128x1024     # GPU kernels and host time of a short default generate()

`--eager-norms` and `--eager-rope` put back the eager RMSNorm and RoPE in place of their one-launch kernels;
`--decode-graphs on|off` sets the CUDA graphs around each layer's attention (`step3_hf.kernels.decode_graphs`;
default: the library's default); `--stop-check deferred|per-step` the stop check (default: the library's, deferred on
CUDA).
"""

import argparse
import time
from typing import NamedTuple

import torch
from decode_attention import machine_and_ceiling
from decode_step import build_model, step_bytes

from step3_hf import deferred_stop_check, kv_cache, modeling_step3
from step3_hf.kernels import decode_graphs
from step3_hf.modeling_step3 import Step3RMSNorm


class Variant(NamedTuple):
    """One column: `generate()`'s arguments and the library switches it runs under."""

    generate_kwargs: dict
    attention: str | None = None  # None: Step-3's default
    experts: str | None = None  # None: Step-3's default
    decode_graphs: bool = True  # allowed (where the library's setting has them)
    deferred_stop_check: bool = True  # allowed (likewise)
    in_place_cache: bool = True  # allowed (likewise)


VARIANTS = {
    "default": Variant({}),
    "default, eager layers": Variant({}, decode_graphs=False),
    "default, stop check per step": Variant({}, deferred_stop_check=False),
    "default, transformers' DynamicCache": Variant({}, in_place_cache=False),
    "static": Variant({"cache_implementation": "static"}),
    "stock (sdpa + grouped_mm)": Variant({}, "sdpa", "grouped_mm"),
}


def parse_shape(text: str) -> tuple[int, int]:
    batch, prompt = text.lower().split("x")
    return int(batch), int(prompt)


def generate_seconds(model, input_ids, new_tokens: int, reps: int, **kwargs) -> float:
    """Median wall time of `generate` producing exactly `new_tokens` tokens."""
    attention_mask = torch.ones_like(input_ids)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                **kwargs,
            )
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def decode_step_seconds(model, batch: int, prompt: int, new_tokens: int, reps: int, **kwargs) -> float:
    input_ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
    generate_seconds(model, input_ids, new_tokens + 1, 1, **kwargs)  # warm up (and compile, for the static cache)
    one = generate_seconds(model, input_ids, 1, reps, **kwargs)
    many = generate_seconds(model, input_ids, new_tokens + 1, reps, **kwargs)
    return (many - one) / new_tokens


def static_compile_seconds(model, batch: int, prompt: int, new_tokens: int) -> tuple[float, float]:
    """(first static-cache `generate()` call minus a warm one, the warm one): the compile time, measured once from a
    cold compiler. A dynamic-cache call first builds the Triton kernels, so that only the compile is counted."""
    input_ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
    generate_seconds(model, input_ids, new_tokens, 1)
    torch._dynamo.reset()
    first = generate_seconds(model, input_ids, new_tokens, 1, cache_implementation="static")
    warm = generate_seconds(model, input_ids, new_tokens, 1, cache_implementation="static")
    return first - warm, warm


def profile(model, batch: int, prompt: int, new_tokens: int) -> None:
    """Per-op GPU and host time of `new_tokens - 1` decode steps (a profile of `generate` for `new_tokens` tokens
    minus one for a single token, the prefill), then cProfile's Python functions of one such `generate`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    input_ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
    generate_seconds(model, input_ids, new_tokens, 1)
    per_op, wall = [], []
    for tokens in (1, new_tokens):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            wall.append(generate_seconds(model, input_ids, tokens, 1))
        per_op.append({e.key: (e.self_device_time_total, e.count, e.self_cpu_time_total) for e in prof.key_averages()})
    steps = new_tokens - 1
    decode = {
        key: ((t - per_op[0].get(key, (0, 0, 0))[0]) / steps / 1e3, (n - per_op[0].get(key, (0, 0, 0))[1]) / steps)
        for key, (t, n, _) in per_op[1].items()
    }
    host = {key: (c - per_op[0].get(key, (0, 0, 0))[2]) / steps / 1e3 for key, (_, _, c) in per_op[1].items()}
    # Operator rows (aten::mm, step3_hf::moe_decode) repeat the time of the kernels they launch.
    busy = sum(ms for key, (ms, _) in decode.items() if "::" not in key)
    print(f"\nprofile {batch}x{prompt}: per decode step wall {(wall[1] - wall[0]) / steps * 1e3:.2f} ms, "
          f"GPU kernels {busy:.2f} ms")
    for key, (ms, count) in sorted(decode.items(), key=lambda item: -item[1][0])[:12]:
        print(f"  {ms:8.3f} ms  {count:6.1f} calls  {key[:110]}")
    print(f"host time per decode step (self CPU), {sum(host.values()):.2f} ms in all:")
    for key, ms in sorted(host.items(), key=lambda item: -item[1])[:25]:
        print(f"  {ms:8.3f} ms  {decode.get(key, (0, 0))[1]:6.1f} calls  {key[:110]}")

    # Python functions of the host side (cProfile inflates Python time; the ranking is what matters).
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    generate_seconds(model, input_ids, new_tokens, 1)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats("step3_hf|transformers", 40)  # which wrappers the time sits under


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["16x2048", "64x1024", "128x1024", "64x2048"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--profile", nargs="*", default=None, help="shapes to profile instead of timing")
    parser.add_argument("--eager-norms", action="store_true",
                        help="RMSNorm in eager torch (eight launches each) instead of the one-launch kernel")
    parser.add_argument("--eager-rope", action="store_true",
                        help="RoPE in eager torch (about ten launches per layer) instead of the one-launch kernel")
    parser.add_argument("--decode-graphs", choices=["on", "off"],
                        help="replay each layer's work around its attention from CUDA graphs (default: the library's)")
    parser.add_argument("--stop-check", choices=["deferred", "per-step"],
                        help="generate()'s stop check read a step late or at every step (default: the library's)")
    args = parser.parse_args()
    if args.eager_norms:
        Step3RMSNorm.forward = Step3RMSNorm.forward._eager_forward
    if args.eager_rope:
        modeling_step3.apply_rotary_pos_emb = modeling_step3.apply_rotary_pos_emb._eager_function
    if args.decode_graphs is not None:
        decode_graphs.ENABLED = args.decode_graphs == "on"
    if args.stop_check is not None:
        deferred_stop_check.DEVICE_TYPES = ("cuda",) if args.stop_check == "deferred" else ()
    bandwidth = machine_and_ceiling("generate.py")
    model = build_model("cuda")
    model.generation_config.pad_token_id = 0
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, RMSNorm "
          f"{'eager (--eager-norms)' if args.eager_norms else 'one launch'}, "
          f"RoPE {'eager (--eager-rope)' if args.eager_rope else 'one launch'}, "
          f"decode layers {'from CUDA graphs around the attention' if decode_graphs.ENABLED else 'eager'}, "
          f"stop check {'deferred' if 'cuda' in deferred_stop_check.DEVICE_TYPES else 'per step'}", flush=True)
    print(f"default kernels: attention {model.config._attn_implementation}, "
          f"experts {model.config._experts_implementation}", flush=True)  # fmt: skip
    default_attention, default_experts = model.config._attn_implementation, model.config._experts_implementation

    if args.profile is not None:
        for shape in args.profile or args.shapes:
            profile(model, *parse_shape(shape), new_tokens=9)
        return

    compile_line = None
    if "static" in args.variants:  # once, at the first shape (issue 21: no recompiles across shapes after this)
        batch, prompt = parse_shape(args.shapes[0])
        try:
            compile_time, warm = static_compile_seconds(model, batch, prompt, args.new_tokens)
            compile_line = (f"static-cache generate() compile time: {compile_time:.1f} s (first call minus a warm call "
                            f"of {warm:.2f} s; {args.shapes[0]}, {args.new_tokens} new tokens)")  # fmt: skip
        except Exception as err:  # report, keep measuring the table
            compile_line = f"static-cache generate() compile time: {type(err).__name__}: {str(err)[:80]}"
        print(compile_line, flush=True)

    rows, graphs, deferring, in_place = [], decode_graphs.ENABLED, deferred_stop_check.DEVICE_TYPES, kv_cache.ENABLED
    for shape in args.shapes:
        batch, prompt = parse_shape(shape)
        row = {"shape": shape}
        for name in args.variants:
            variant = VARIANTS[name]
            decode_graphs.ENABLED = graphs and variant.decode_graphs
            deferred_stop_check.DEVICE_TYPES = deferring if variant.deferred_stop_check else ()
            kv_cache.ENABLED = in_place and variant.in_place_cache
            model.set_attn_implementation(variant.attention or default_attention)
            model.set_experts_implementation(variant.experts or default_experts)
            try:
                row[name] = decode_step_seconds(
                    model, batch, prompt, args.new_tokens, args.reps, **variant.generate_kwargs
                )
            except Exception as err:  # report, keep measuring the others
                row[name] = f"{type(err).__name__}: {str(err)[:80]}"
            print(f"  {shape} {name}: {row[name]}", flush=True)
            torch.cuda.empty_cache()
        weights, kv = step_bytes(model, batch, prompt + args.new_tokens // 2, float8=False)
        row["roofline"] = (weights + kv) / bandwidth
        rows.append(row)

    print(f"\ngenerate() decode step, Step-3 widths (1 dense + 3 MoE layers), bf16, greedy, {args.new_tokens} new "
          f"tokens; ms per step (x roofline); roofline at {bandwidth / 1e12:.2f} TB/s\n")  # fmt: skip
    print("| batch x prompt | " + " | ".join(args.variants) + " | roofline |")
    print("|---" * (2 + len(args.variants)) + "|")
    for row in rows:
        cells = [
            value if isinstance(value, str) else f"{value * 1e3:.1f} ms ({value / row['roofline']:.2f}x)"
            for value in (row[name] for name in args.variants)
        ]
        print(f"| {row['shape']} | " + " | ".join(cells) + f" | {row['roofline'] * 1e3:.1f} ms |")
    if compile_line is not None:
        print(f"\n{compile_line}")


if __name__ == "__main__":
    main()
