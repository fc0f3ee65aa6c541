"""One decode step of one attention layer, projections included: Step-3 MFA vs DeepSeek-V3 MLA vs Qwen3-MoE GQA.

The analogue of the Step-3 report's Table 9 (MFA 281 us, MLA 372 us, GQA 382 us at 8K on an H800): each model's own
transformers attention module at its real widths, bf16, batch 64, one new token against a static cache prefilled
to the context length, the whole layer replayed as a CUDA graph. Step-3 runs with `attn_implementation="mfa_decode"`
(ours) and with stock SDPA; the others with SDPA. The floor per row is (attention weights + cache bytes) / the
device-copy bandwidth measured in the same run; for MLA the floor counts the compressed latent cache (576 values per
token) that an absorbed-MLA kernel would read, while transformers' module expands it to per-head K/V every step.

    python benchmarks/attention_layer.py [--batch 64] [--contexts 8192 32768]
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from decode_attention import copy_bandwidth, timed_per_call
from transformers import StaticCache
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding

from step3_hf import Step3Config
from step3_hf.modeling_step3 import Step3Attention, Step3RotaryEmbedding


def step3_config(attention: str) -> Step3Config:
    config = Step3Config(num_hidden_layers=1, moe_layers_enum="")  # released widths: 7168 hidden, 64 x 256 heads
    config._attn_implementation = attention
    return config


def deepseek_v3_config() -> DeepseekV3Config:
    config = DeepseekV3Config(
        hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, num_hidden_layers=1, first_k_dense_replace=1,
        max_position_embeddings=163840,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


def qwen3_moe_config() -> Qwen3MoeConfig:  # Qwen3-235B-A22B
    config = Qwen3MoeConfig(
        hidden_size=4096, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_hidden_layers=1,
        max_position_embeddings=131072,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return config


MODELS = {
    "Step-3 MFA, mfa_decode (ours)": (lambda: step3_config("mfa_decode"), Step3Attention, Step3RotaryEmbedding),
    "Step-3 MFA, sdpa": (lambda: step3_config("sdpa"), Step3Attention, Step3RotaryEmbedding),
    "DeepSeek-V3 MLA, sdpa": (deepseek_v3_config, DeepseekV3Attention, DeepseekV3RotaryEmbedding),
    "Qwen3-235B GQA, sdpa": (qwen3_moe_config, Qwen3MoeAttention, Qwen3MoeRotaryEmbedding),
}


def cache_values_per_token(config) -> int:
    """Values the cache holds per token and layer (the MLA latent for DeepSeek-V3)."""
    if isinstance(config, DeepseekV3Config):
        return config.kv_lora_rank + config.qk_rope_head_dim
    return 2 * config.num_key_value_heads * config.head_dim


def measure(name: str, batch: int, context: int, device: str) -> dict:
    make_config, attention_class, rotary_class = MODELS[name]
    config = make_config()
    attention = attention_class(config, layer_idx=0).to(device=device, dtype=torch.bfloat16).eval()
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    rotary = rotary_class(config).to(device)
    # transformers 5.24 names the cache argument `cache`; 5.17 (the GPU image) `past_key_values`.
    cache_name = "cache" if "cache" in inspect.signature(attention.forward).parameters else "past_key_values"
    weight_bytes = sum(p.numel() * p.element_size() for p in attention.parameters())

    # A static cache holding `context` random tokens; every timed call writes token `context` and reads all.
    cache = StaticCache(config=config, max_cache_len=context + 1)
    layer = cache.layers[0]
    hidden = torch.randn(batch, 1, config.hidden_size, device=device, dtype=torch.bfloat16)
    position_ids = torch.full((batch, 1), context, device=device)
    position_embeddings = rotary(hidden, position_ids)
    with torch.no_grad():
        attention(hidden, position_embeddings, None, **{cache_name: cache})  # allocates the cache at its real shapes
    for tensor in (layer.keys, layer.values):
        tensor.normal_()
    mask = torch.ones(batch, 1, 1, context + 1, dtype=torch.bool, device=device)

    def step():
        layer.cumulative_length.fill_(context)
        return attention(hidden, position_embeddings, mask, **{cache_name: cache})[0]

    cache_bytes = batch * context * cache_values_per_token(config) * 2
    with torch.no_grad():
        seconds = timed_per_call(step, [()]) if device == "cuda" else _cpu_time(step)
    return {"model": name, "batch": batch, "context": context, "us": seconds * 1e6, "weight_MB": weight_bytes / 1e6,
            "cache_MB": cache_bytes / 1e6, "floor_bytes": weight_bytes + cache_bytes}  # fmt: skip


def _cpu_time(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    bandwidth = copy_bandwidth() if device == "cuda" else float("nan")
    print(f"ceiling: device copy {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)

    rows = []
    for context in args.contexts:
        for model in args.models:
            try:
                row = measure(model, args.batch, context, device)
            except torch.OutOfMemoryError as err:
                row = {"model": model, "batch": args.batch, "context": context, "error": f"out of memory ({err})"[:60]}
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
            print(row, flush=True)

    print(f"\nOne attention layer, one decode step (projections + cache write + attention), batch {args.batch}, bf16;")
    print(f"floor = (attention weights + cache bytes) / {bandwidth / 1e12:.2f} TB/s (device copy, same run)\n")
    print("| context | model | time us | weights MB | cache MB | floor us | time / floor |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['context']} | {row['model']} | {row['error']} | | | | |")
            continue
        floor = row["floor_bytes"] / bandwidth * 1e6
        print(f"| {row['context']} | {row['model']} | {row['us']:.1f} | {row['weight_MB']:.0f} | {row['cache_MB']:.0f} "
              f"| {floor:.1f} | {row['us'] / floor:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
