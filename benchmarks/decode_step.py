"""A full decode step of a Step-3 with the released layer widths but few layers: tokens/s vs the stock path.

`Step3ForCausalLM` with 1 dense + 3 MoE layers (7168 hidden, 64x256 MFA heads, 48 experts top-3, the real vocab),
bf16, random weights; one new token per sequence against a static cache prefilled to the context. Variants:

- stock: SDPA attention and the per-expert Python loop (`experts_implementation="eager"`);
- SDPA attention with `grouped_mm` experts (transformers' default experts path);
- ours: `mfa_decode` attention with `grouped_mm` experts, eager and replayed as a CUDA graph (only possible
  because the path has no host synchronisation);
- ours + moe_decode: `mfa_decode` attention with the `moe_decode` fused-MoE experts kernel, as a CUDA graph, with
  the bf16 and the float8 cache.

Roofline = (weights the step must read + KV cache bytes) / device-copy bandwidth measured in the same run; the
weights read count each routed expert with the probability that at least one of the batch's tokens picks it.

    python benchmarks/decode_step.py [--batches 16 64 256] [--contexts 4096 16384]
"""

from __future__ import annotations

import argparse

import torch
from decode_attention import machine_and_ceiling, timed_per_call
from transformers import StaticCache

from step3_hf import Step3Config, Step3ForCausalLM, kv_cache_bytes_per_token
from step3_hf.kernels import Float8StaticCache

LAYERS = dict(num_hidden_layers=4, moe_layers_enum="1,2,3")
VARIANTS = {
    "stock (sdpa + eager experts)": ("sdpa", "eager", False, False),
    "sdpa + grouped_mm": ("sdpa", "grouped_mm", False, False),
    "ours (mfa_decode + grouped_mm)": ("mfa_decode", "grouped_mm", False, False),
    "ours, CUDA graph": ("mfa_decode", "grouped_mm", False, True),
    "ours + moe_decode, CUDA graph": ("mfa_decode", "moe_decode", False, True),
    "ours, fp8 cache, CUDA graph": ("mfa_decode", "moe_decode", True, True),  # with the fastest experts path
}


def build_bf16(model_class, config, device: str):
    """`model_class(config)` with bf16 random weights created on `device`, in eval mode."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def build_model(device: str, **overrides) -> Step3ForCausalLM:
    return build_bf16(Step3ForCausalLM, Step3Config(**LAYERS, **overrides), device)


def step_bytes(model: Step3ForCausalLM, batch: int, context: int, float8: bool) -> tuple[float, float]:
    """(weight bytes one decode step reads, KV cache bytes) for `batch` sequences, from the parameters as they are
    stored (bf16, or float8 with their scales): each routed expert counts with the probability that at least one of
    the batch's tokens picks it, the embedding with the batch's rows only."""
    config = model.config
    experts = others = 0.0
    for name, param in model.named_parameters():
        nbytes = param.numel() * param.element_size()
        if ".experts." in name:
            experts += nbytes
        elif name.endswith("embed_tokens.weight"):
            others += batch * config.hidden_size * param.element_size()
        else:
            others += nbytes
    hit = 1 - (1 - config.moe_top_k / config.moe_num_experts) ** batch  # P(an expert serves >= 1 token)
    per_value = 1 + 4 / config.head_dim if float8 else 2  # e4m3 byte + a float32 scale per row, or bf16
    kv = batch * context * kv_cache_bytes_per_token(config, per_value)
    return others + hit * experts, kv


def decode_step_fn(model, batch: int, context: int, float8: bool, device: str):
    """A closure running one decode step against a cache holding `context` random tokens."""
    config = model.config
    cache_class = Float8StaticCache if float8 else StaticCache
    cache = cache_class(config=config, max_cache_len=context + 1)
    input_ids = torch.randint(3, config.vocab_size, (batch, 1), device=device)
    position_ids = torch.full((batch, 1), context, device=device)
    with torch.no_grad():
        model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)  # allocate
    for layer in cache.layers:
        if float8:  # the same N(0, 1) contents as the bf16 cache, stored as e4m3 with unit scales
            # (all-positive random bytes would make every token's hidden state alike, collapse the routing onto a
            # few experts and time a cheaper step than real data gives)
            for stored, scales in ((layer.keys, layer.key_scales), (layer.values, layer.value_scales)):
                stored.copy_(torch.randn(stored.shape, device=stored.device).to(stored.dtype))
                scales.fill_(1.0)
        else:
            layer.keys.normal_()
            layer.values.normal_()

    def step():
        for layer in cache.layers:
            layer.cumulative_length.fill_(context)
        return model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True).logits

    return step


def eager_seconds(fn, reps: int = 10) -> float:
    """Median of `reps` eager calls timed with CUDA events (host work and syncs included)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    bandwidth = machine_and_ceiling("decode_step.py")
    model = build_model("cuda")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {LAYERS}", flush=True)

    rows = []
    for context in args.contexts:
        for batch in args.batches:
            row = {"batch": batch, "context": context}
            for name in args.variants:
                attention, experts, float8, graph = VARIANTS[name]
                model.set_attn_implementation(attention)
                model.set_experts_implementation(experts)
                step = None
                try:
                    step = decode_step_fn(model, batch, context, float8, "cuda")
                    with torch.no_grad():
                        seconds = timed_per_call(step, [()]) if graph else eager_seconds(step)
                    row[name] = seconds
                except Exception as err:  # report, keep measuring the others
                    row[name] = f"{type(err).__name__}: {str(err)[:80]}"
                print(f"  B={batch} ctx={context} {name}: {row[name]}", flush=True)
                del step
                torch.cuda.empty_cache()
            weights, kv = step_bytes(model, batch, context, float8=False)
            row["roofline"] = (weights + kv) / bandwidth
            weights8, kv8 = step_bytes(model, batch, context, float8=True)
            row["roofline fp8"] = (weights8 + kv8) / bandwidth
            rows.append(row)
            print(row, flush=True)

    print(f"\nDecode step, Step-3 widths, {LAYERS}, bf16 weights; tokens/s (step ms); roofline = (weights read + KV "
          f"bytes) / {bandwidth / 1e12:.2f} TB/s\n")  # fmt: skip
    print("| context | batch | " + " | ".join(args.variants) + " | roofline (bf16 KV) | best ours / roofline |")
    print("|---" * (4 + len(args.variants)) + "|")
    for row in rows:
        cells, best = [], None
        for name in args.variants:
            value = row[name]
            if isinstance(value, str):
                cells.append(value)
                continue
            cells.append(f"{row['batch'] / value:,.0f} ({value * 1e3:.2f} ms)")
            if name.startswith("ours") and "fp8" not in name:
                best = value if best is None else min(best, value)
        ratio = f"{best / row['roofline']:.2f}x" if best is not None else "n/a"
        roof = f"{row['batch'] / row['roofline']:,.0f} ({row['roofline'] * 1e3:.2f} ms)"
        print(f"| {row['context']} | {row['batch']} | " + " | ".join(cells) + f" | {roof} | {ratio} |")


if __name__ == "__main__":
    main()
