"""Step-3 with block-FP8 weights (the `stepfun-ai/step3-fp8` format) against bf16, each against its own roofline.

`Step3ForCausalLM` with 1 dense + 3 MoE layers at the released widths (7168 hidden, 64x256 MFA heads, 48 experts
top-3, the real vocab), random bf16 weights, then quantized in memory with `step3_hf.fp8.quantize_model` (128 x 128
tiles, e4m3, the release's format; embeddings, head, norms and router stay bf16). One model: the bf16 variants run
first, then the same weights quantized. Reported:

- weight memory, bf16 and FP8 (parameter bytes, scales included);
- a decode step (one new token per sequence against a static cache prefilled to the context, replayed as a CUDA
  graph) at each batch x context, in tokens/s, for
  - bf16: `mfa_decode` attention + `moe_decode` experts (the fastest bf16 path, `decode_step.py`);
  - fp8: the same kernels with FP8 weights, as a loaded FP8 checkpoint computes by default, the activations rounded
    to e4m3 per token and 128 columns and multiplied on float8 tensor cores (`moe_decode(...,
    quantize_activations=True)` on the float8 experts; the attention projections and the dense and shared MLPs
    through `step3_hf.kernels.fp8_linear`: up to 64 rows `fp8_decode_linear` (the k and v projections up to 256),
    above that cuBLAS's block-scaled GEMMs);
  - fp8, bf16 activations: the same weight-only where that is an option (`fp8_linear.DECODE_ACTIVATIONS_FP8` and
    `transformers_experts.EXPERTS_ACTIVATIONS_FP8` False: the float8 weights widened to bf16 in registers, the
    activations as they are; cuBLAS above 64 rows still rounds them);
  - fp8, cuBLAS above 64 rows: the fp8 column without `fp8_linear.MAX_NARROW_LINEAR_ROWS` (the narrow linears, the k
    and v projections, on cuBLAS beyond 64 rows as every linear was before);
  - bf16 and fp8, fused q/k/v: the same with each layer's q_proj, k_proj and v_proj as one GEMM over their stacked
    weights (`step3_hf.kernels.fused_qkv.fuse_qkv_projections(model)`, for models that only run);
  - fp8 + fp8 KV: the same with `Float8StaticCache`;
  - fp8, eager: the fp8 column timed eagerly instead of replayed as one CUDA graph of the step, as the next column is;
  - fp8, transformers' experts: transformers' own FP8 experts path (`grouped_mm`; its Triton kernel comes from the
    `kernels` hub package, absent offline, in which case the cell says why), eager. Offline, `--finegrained-fp8 DIR`
    gives transformers that kernel from a local copy of its source (the `finegrained_fp8` package of
    github.com/huggingface/kernels-community, `finegrained-fp8/torch-ext/finegrained_fp8`);
- each against its roofline = (weight bytes the step reads + KV bytes) / device-copy bandwidth measured in the same
  run (routed experts counted with the probability that at least one token of the batch picks them);
- prefill tokens/s (one forward over `--prefill` tokens, no cache), bf16 and FP8 (bf16 experts through
  `grouped_mm`, FP8 experts through `moe_decode` on the float8 weights; the path and launch are printed), FP8 also
  with bf16 activations in the experts.

    python benchmarks/fp8_decode.py [--batches 16 64 256] [--contexts 4096 16384] [--prefill 1x4096 4x4096]
    python benchmarks/fp8_decode.py --quick      # batch 16 and 64 at 4K, prefill 1x2048: under 3 minutes

The table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import time
import types
from pathlib import Path
from typing import NamedTuple

import torch
from decode_attention import machine_and_ceiling, timed_per_call
from decode_step import build_model, decode_step_fn, eager_seconds, step_bytes
from generate import parse_shape

from step3_hf.fp8 import quantize_model
import step3_hf.kernels.fp8_linear as fp8_linear
import step3_hf.kernels.transformers_experts as transformers_experts
from step3_hf.kernels.fp8_linear import fp8_linear_path
from step3_hf.kernels.fused_qkv import fuse_qkv_projections, unfuse_qkv_projections
from step3_hf.kernels.transformers_experts import fp8_experts_path

BLOCK_SIZE = (128, 128)


class Variant(NamedTuple):
    """One decode column: the cache, the experts path, how it is timed and what runs in float8."""

    float8_kv: bool = False
    experts: str = "moe_decode"
    graph: bool = True  # replayed as one CUDA graph of the step, else timed eagerly
    float8_linears: bool = True  # float8 activations in the decode linears (FP8 weights only)
    float8_experts: bool = True  # and in the experts
    fused_qkv: bool = False  # q_proj, k_proj and v_proj as one GEMM (`kernels.fused_qkv.fuse_qkv_projections`)
    narrow_kernel: bool = True  # narrow linears on `fp8_decode_linear` up to 256 rows (else cuBLAS above 64)


BF16_VARIANTS = {
    "bf16": Variant(float8_linears=False, float8_experts=False),
    "bf16, fused q/k/v": Variant(float8_linears=False, float8_experts=False, fused_qkv=True),
}
BF16_ACTIVATIONS = "fp8, bf16 activations"
FP8_VARIANTS = {
    "fp8": Variant(),
    BF16_ACTIVATIONS: Variant(float8_linears=False, float8_experts=False),
    "fp8, fused q/k/v": Variant(fused_qkv=True),
    "fp8, cuBLAS above 64 rows": Variant(narrow_kernel=False),
    "fp8 + fp8 KV": Variant(float8_kv=True),
    "fp8, eager": Variant(graph=False),  # like for like with the next, which runs eagerly
    "fp8, transformers' experts": Variant(experts="grouped_mm", graph=False),
}


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def kernel_switches(linears: bool, experts: bool, narrow_kernel: bool = True):
    """Whether the decode linears and the experts round their activations to float8, and whether narrow linears take
    `fp8_decode_linear` beyond 64 rows, for the duration."""
    settings = ((fp8_linear, "DECODE_ACTIVATIONS_FP8", linears),
                (transformers_experts, "EXPERTS_ACTIVATIONS_FP8", experts))
    if not narrow_kernel:
        settings += ((fp8_linear, "MAX_NARROW_LINEAR_ROWS", 0),)
    defaults = [(module, name, getattr(module, name)) for module, name, _ in settings]
    for module, name, value in settings:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in defaults:
            setattr(module, name, value)


def decode_seconds(model, batch: int, context: int, variant: Variant) -> float | str:
    model.set_attn_implementation("mfa_decode")
    model.set_experts_implementation(variant.experts)
    step = None
    try:
        if variant.fused_qkv:
            fuse_qkv_projections(model)
        with kernel_switches(variant.float8_linears, variant.float8_experts, variant.narrow_kernel):
            step = decode_step_fn(model, batch, context, variant.float8_kv, "cuda")
            with torch.no_grad():
                return timed_per_call(step, [()]) if variant.graph else eager_seconds(step, reps=3)
    except Exception as err:  # report it in the table, keep measuring the others
        return f"{type(err).__name__}: {str(err)[:90]}"
    finally:
        del step
        if variant.fused_qkv:
            unfuse_qkv_projections(model)
        torch.cuda.empty_cache()


def prefill_seconds(model, batch: int, length: int) -> float | str:
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation("moe_decode")  # bf16: grouped_mm beyond 512 tokens; FP8: the kernel throughout
    input_ids = torch.randint(3, model.config.vocab_size, (batch, length), device="cuda")
    try:
        with torch.no_grad():
            return eager_seconds(lambda: model(input_ids=input_ids, use_cache=False, logits_to_keep=1), reps=3)
    except Exception as err:
        return f"{type(err).__name__}: {str(err)[:90]}"
    finally:
        torch.cuda.empty_cache()


def use_local_finegrained_fp8(package: Path) -> str:
    """Hand transformers the `kernels-community/finegrained-fp8` kernel from a local copy of its Python package, as
    the `kernels` hub loader would from the Hub (which this offline machine cannot reach). Returns where it came from.

    The package imports `._ops`, which the kernel's build generates (its op namespace); a module standing in for it
    is registered first. transformers keeps the loaded kernel in `finegrained_fp8._FINEGRAINED_FP8` (private; listed
    in docs/compatibility.md) and loads nothing once it is set."""
    from transformers.integrations import finegrained_fp8

    if not hasattr(finegrained_fp8, "_FINEGRAINED_FP8") or not hasattr(finegrained_fp8, "FineGrainedFP8"):
        raise SystemExit("--finegrained-fp8: this transformers has no finegrained_fp8._FINEGRAINED_FP8 and "
                         "FineGrainedFP8 (5.17 and 5.25 have both)")
    init = package / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--finegrained-fp8: {package} is not a Python package (no __init__.py)")
    namespace = "_step3_bench_finegrained_fp8"
    ops = types.ModuleType("finegrained_fp8._ops")
    ops.ops = getattr(torch.ops, namespace)
    ops.add_op_namespace_prefix = lambda name: f"{namespace}::{name}"
    sys.modules[ops.__name__] = ops
    spec = importlib.util.spec_from_file_location("finegrained_fp8", init, submodule_search_locations=[str(package)])
    kernel = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kernel
    spec.loader.exec_module(kernel)
    finegrained_fp8._FINEGRAINED_FP8 = finegrained_fp8.FineGrainedFP8(
        matmul=kernel.matmul_2d, batched_matmul=kernel.matmul_batched, grouped_matmul=kernel.matmul_grouped
    )
    return str(package.resolve())


def measure(model, label: str, variants: dict, args, bandwidth: float, rows: dict, prefill: dict) -> None:
    for context in args.contexts:
        for batch in args.batches:
            row = rows.setdefault((batch, context), {})
            for name, variant in variants.items():
                seconds = decode_seconds(model, batch, context, variant)
                weights, kv = step_bytes(model, batch, context, variant.float8_kv)
                row[name] = (seconds, (weights + kv) / bandwidth)
                print(f"  B={batch} ctx={context} {name}: {seconds} (roofline {row[name][1] * 1e3:.2f} ms)", flush=True)
    for shape in args.prefill:
        prefill[(label, shape)] = prefill_seconds(model, *shape)
        print(f"  prefill {label} {shape}: {prefill[(label, shape)]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--prefill", type=parse_shape, nargs="+", default=[(1, 4096), (4, 4096)])
    parser.add_argument("--quick", action="store_true", help="batches 16 64, context 4096, prefill 1x2048")
    parser.add_argument("--finegrained-fp8", type=Path, metavar="DIR",
                        help="a local copy of the finegrained_fp8 package: transformers' FP8 experts kernel offline")
    args = parser.parse_args()
    if args.finegrained_fp8 is not None:
        print(f"transformers' FP8 kernel: finegrained_fp8 from {use_local_finegrained_fp8(args.finegrained_fp8)}")
    if args.quick:
        args.batches, args.contexts, args.prefill = [16, 64], [4096], [(1, 2048)]
    started = time.time()
    bandwidth = machine_and_ceiling("fp8_decode.py")
    model = build_model("cuda")
    memory = {"bf16": weight_bytes(model)}
    rows: dict = {}
    prefill: dict = {}
    measure(model, "bf16", BF16_VARIANTS, args, bandwidth, rows, prefill)

    quantize_model(model, BLOCK_SIZE)
    torch.cuda.empty_cache()
    memory["fp8"] = weight_bytes(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    print(f"FP8 linears: {type(q_proj).__name__}, {fp8_linear_path(q_proj.weight, q_proj.block_size)}", flush=True)
    experts = model.model.layers[-1].mlp.experts
    for batch, length in args.prefill:
        with torch.no_grad():
            hidden = torch.empty(batch * length, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
            path = fp8_experts_path(experts, hidden, model.config.moe_top_k)
        print(f"FP8 experts, prefill {batch}x{length}: {type(experts).__name__}, {path}", flush=True)
    print(f"weights: bf16 {memory['bf16'] / 1e9:.2f} GB, fp8 {memory['fp8'] / 1e9:.2f} GB "
          f"({memory['fp8'] / memory['bf16']:.3f}x)", flush=True)  # fmt: skip
    measure(model, "fp8", FP8_VARIANTS, args, bandwidth, rows, prefill)
    with kernel_switches(linears=False, experts=False):  # prefill linears run cuBLAS, which rounds them anyway
        for shape in args.prefill:
            prefill[(BF16_ACTIVATIONS, shape)] = prefill_seconds(model, *shape)
            print(f"  prefill {BF16_ACTIVATIONS} {shape}: {prefill[(BF16_ACTIVATIONS, shape)]}", flush=True)

    path = fp8_linear_path(q_proj.weight, q_proj.block_size)  # after the runs: a failure on first use shows here
    names = [*BF16_VARIANTS, *FP8_VARIANTS]
    print(f"\nStep-3 widths, 1 dense + 3 MoE layers; weights bf16 {memory['bf16'] / 1e9:.2f} GB, block-FP8 "
          f"{memory['fp8'] / 1e9:.2f} GB ({memory['fp8'] / memory['bf16']:.3f}x); ceiling {bandwidth / 1e12:.2f} TB/s; "
          f"FP8 linears: {path}; run took {time.time() - started:.0f} s\n")  # fmt: skip
    print("Decode tokens/s (step ms) and time / own roofline:\n")
    print("| context | batch | " + " | ".join(names) + " | fp8 / bf16 speed-up |")
    print("|---" * (3 + len(names)) + "|")
    for (batch, context), row in rows.items():
        cells = []
        for name in names:
            seconds, roof = row[name]
            if isinstance(seconds, str):
                cells.append(seconds)
            else:
                cells.append(f"{batch / seconds:,.0f} ({seconds * 1e3:.2f} ms, {seconds / roof:.2f}x)")
        bf16, fp8 = row["bf16"][0], row["fp8"][0]
        speedup = f"{bf16 / fp8:.2f}x" if not isinstance(bf16, str) and not isinstance(fp8, str) else "n/a"
        print(f"| {context} | {batch} | " + " | ".join(cells) + f" | {speedup} |")
    print("\nPrefill tokens/s (ms):\n")
    print(f"| shape | bf16 | fp8 | {BF16_ACTIVATIONS} |")
    print("|---|---|---|---|")
    for shape in args.prefill:
        cells = []
        for label in ("bf16", "fp8", BF16_ACTIVATIONS):
            value = prefill[(label, shape)]
            cells.append(value if isinstance(value, str) else f"{shape[0] * shape[1] / value:,.0f} ({value * 1e3:.1f})")
        print(f"| {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
