"""Served tokens/s of continuous batching (`generate_batch`, what `step3-serve` runs) against `generate()`.

A Step-3 with the released layer widths and 1 dense + 3 MoE layers (`decode_step.build_model`), bf16, random weights,
greedy, every request generating exactly `--new-tokens` tokens. For each load (`N x P`: N prompts of P random tokens,
all submitted at once) three variants serve the same prompts:

- `generate_batch (mfa_paged)`: continuous batching on the paged cache with Step-3's attention for it (the MFA
  split-KV kernel for decode tokens, SDPA per sequence for prefill chunks); what a model on `mfa_decode` (the CUDA
  default) gets;
- `generate_batch (paged sdpa)`: transformers' own paged SDPA path (the model on `sdpa`);
- `generate()`: one padded batch of all N prompts with the default dynamic cache and kernels (if that batch runs out
  of memory, halves of it one after another; the cell says so).

Columns: end-to-end generated tokens/s (prefill included: wall time of the whole call); the decode step,
`(time of K new tokens - time of 1) / (K - 1)`, in ms and against the roofline; decode tokens/s = N / step. The
roofline of a decode step is (weights it reads + KV bytes at the mean context) / device-copy bandwidth measured in
the same run (`decode_step.step_bytes`), the same as `generate.py`'s.

    python benchmarks/serve_throughput.py --quick            # 64x1024 and 256x1024, 128 new tokens, < 3 min on an H100
    python benchmarks/serve_throughput.py --loads 64x1024 256x1024 64x4096 --new-tokens 128 --reps 3
"""

import argparse
import math
import time

import torch
from decode_attention import machine_and_ceiling
from decode_step import build_model, step_bytes
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from step3_hf.kernels import MFA_DECODE_ATTENTION, PAGED_MFA_ATTENTION, decode_kernel_preferred

CB_MFA = f"generate_batch ({PAGED_MFA_ATTENTION})"
CB_SDPA = "generate_batch (paged sdpa)"
GENERATE = "generate()"
VARIANTS = [CB_MFA, CB_SDPA, GENERATE]


def parse_load(text: str) -> tuple[int, int]:
    count, prompt = text.lower().split("x")
    return int(count), int(prompt)


def greedy_config(new_tokens: int) -> GenerationConfig:
    # No end-of-sequence token: every request generates exactly `new_tokens` tokens.
    return GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None
    )


def paged_config(count: int, prompt: int, new_tokens: int, max_batch_tokens: int) -> ContinuousBatchingConfig:
    """A paged cache that holds every request at once (sized explicitly: the default reads free memory)."""
    block_size = 256
    blocks = count * math.ceil((prompt + new_tokens) / block_size) + 4
    return ContinuousBatchingConfig(
        block_size=block_size, num_blocks=blocks, max_batch_tokens=max_batch_tokens, max_requests_per_batch=count
    )


def run_generate_batch(model, prompts: list[list[int]], new_tokens: int, max_batch_tokens: int) -> float:
    count, prompt = len(prompts), len(prompts[0])
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = model.generate_batch(
        inputs=prompts,
        generation_config=greedy_config(new_tokens),
        continuous_batching_config=paged_config(count, prompt, new_tokens, max_batch_tokens),
        progress_bar=False,
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    lengths = {len(out.generated_tokens) for out in outputs.values()}
    if len(outputs) != count or lengths != {new_tokens}:
        raise RuntimeError(f"{len(outputs)} of {count} requests came back, with {sorted(lengths)} tokens")
    return seconds


def run_generate(model, prompts: torch.Tensor, new_tokens: int, state: dict) -> float:
    """`generate()` over all prompts as one batch, or in the largest halves that fit (remembered in `state`)."""
    while True:
        size = state.setdefault("batch", prompts.shape[0])
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for lo in range(0, prompts.shape[0], size):
                ids = prompts[lo : lo + size]
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   generation_config=greedy_config(new_tokens))  # fmt: skip
            torch.cuda.synchronize()
            return time.perf_counter() - start
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if size == 1:
                raise
            state["batch"] = size // 2


def measure(model, variant: str, count: int, prompt: int, new_tokens: int, reps: int, max_batch_tokens: int) -> dict:
    """End-to-end seconds for `new_tokens` and the decode step, medians of `reps`."""
    generator = torch.Generator().manual_seed(count * 100003 + prompt)
    prompts = torch.randint(3, model.config.vocab_size, (count, prompt), generator=generator)
    state = {}
    if variant == GENERATE:
        model.set_attn_implementation(MFA_DECODE_ATTENTION if decode_kernel_preferred() else "sdpa")
        prompts = prompts.cuda()

        def run(tokens):
            return run_generate(model, prompts, tokens, state)
    else:
        model.set_attn_implementation(MFA_DECODE_ATTENTION if variant == CB_MFA else "sdpa")
        as_lists = prompts.tolist()

        def run(tokens):
            return run_generate_batch(model, as_lists, tokens, max_batch_tokens)

    run(2)  # warm up: kernels compiled, memory allocated
    one = sorted(run(1) for _ in range(reps))[reps // 2]
    full = sorted(run(new_tokens) for _ in range(reps))[reps // 2]
    result = {"end_to_end": full, "step": (full - one) / (new_tokens - 1)}
    if state.get("batch", count) != count:
        result["note"] = f"batches of {state['batch']}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", nargs="+", default=["64x1024", "256x1024"], help="N prompts x P tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="continuous batching's tokens per step")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--quick", action="store_true", help="the default loads, 128 new tokens, one repetition")
    args = parser.parse_args()
    if args.quick:
        args.loads, args.new_tokens, args.reps = ["64x1024", "256x1024"], 128, 1
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode step is measured between 1 and that many)")
    bandwidth = machine_and_ceiling("serve_throughput.py")
    model = build_model("cuda")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, experts "
          f"{model.config._experts_implementation}", flush=True)  # fmt: skip

    rows = []
    for load in args.loads:
        count, prompt = parse_load(load)
        weights, kv = step_bytes(model, count, prompt + args.new_tokens // 2, float8=False)
        roofline = (weights + kv) / bandwidth
        for variant in args.variants:
            try:
                result = measure(model, variant, count, prompt, args.new_tokens, args.reps, args.max_batch_tokens)
            except Exception as err:  # report, keep measuring the others
                result = {"error": f"{type(err).__name__}: {str(err)[:70]}"}
            torch.cuda.empty_cache()
            print(f"  {load} {variant}: {result}", flush=True)
            rows.append((load, count, variant, result, roofline))

    print(f"\nServed tokens/s, Step-3 widths (1 dense + 3 MoE layers), bf16, greedy, {args.new_tokens} new tokens per "
          f"request, all requests at once; roofline at {bandwidth / 1e12:.2f} TB/s\n")  # fmt: skip
    print("| load | variant | end-to-end tok/s | decode step (x roofline) | decode tok/s | roofline step |")
    print("|---|---|---|---|---|---|")
    for load, count, variant, result, roofline in rows:
        label = variant + (f" ({result['note']})" if "note" in result else "")
        if "error" in result:
            print(f"| {load} | {label} | {result['error']} | | | {roofline * 1e3:.1f} ms |")
            continue
        step = result["step"]
        print(f"| {load} | {label} | {count * args.new_tokens / result['end_to_end']:.0f} | {step * 1e3:.1f} ms "
              f"({step / roofline:.2f}x) | {count / step:.0f} | {roofline * 1e3:.1f} ms |")  # fmt: skip


if __name__ == "__main__":
    main()
