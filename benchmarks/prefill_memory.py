"""Peak GPU memory of a long prefill through `generate()`, with the experts' grouped_mm run whole or in slices.

Same 4-layer Step-3 at the released widths as `decode_step.py` (bf16, random weights). `moe_decode`'s experts
function runs an inference prefill through grouped_mm in slices of `MAX_GROUPED_MM_TOKENS` tokens; here that is
compared with one call over all tokens (the limit raised past the prompt), on the same prompts: peak memory above
the weights, and whether the greedy tokens agree. Both run the prompt in one forward (`prefill_chunk_size=None`).
Then with transformers' `prefill_chunk_size`, which runs the prompt through the whole model a chunk of positions at
a time: as `generate()` chooses it by default (`PREFILL_TOKENS_PER_CHUNK` tokens' worth of positions, for prompts
above that many tokens), and at `--chunk` positions.

    python benchmarks/prefill_memory.py [--shapes 64x2048 128x1024] [--new-tokens 4]
"""

import argparse
import time

import torch
from decode_step import build_model

from step3_hf.kernels import transformers_experts
from step3_hf.modeling_step3 import PREFILL_TOKENS_PER_CHUNK


def peak_generate(model, input_ids, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, **kwargs,
        )  # fmt: skip
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30, out[:, input_ids.shape[1] :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["64x2048", "128x1024"])
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=256, help="transformers' prefill_chunk_size for the last column")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    model = build_model("cuda")
    model.generation_config.pad_token_id = 0
    sliced_limit = transformers_experts.MAX_GROUPED_MM_TOKENS
    rows = []
    for shape in args.shapes:
        batch, prompt = (int(v) for v in shape.split("x"))
        input_ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device="cuda")
        results = {}
        variants = (("whole", 10**12, {"prefill_chunk_size": None}),
                    ("sliced", sliced_limit, {"prefill_chunk_size": None}),
                    ("default (chunked by generate)", sliced_limit, {}),
                    ("sliced, prefill_chunk_size", sliced_limit, {"prefill_chunk_size": args.chunk}))  # fmt: skip
        for name, limit, kwargs in variants:
            transformers_experts.MAX_GROUPED_MM_TOKENS = limit
            try:
                results[name] = peak_generate(model, input_ids, args.new_tokens, **kwargs)
            except torch.OutOfMemoryError as err:
                results[name] = (f"out of memory ({str(err)[:60]})", None)
            torch.cuda.empty_cache()
        transformers_experts.MAX_GROUPED_MM_TOKENS = sliced_limit
        tokens = [out for _, out in results.values()]
        same = None if any(t is None for t in tokens) else all(torch.equal(tokens[0], t) for t in tokens[1:])
        rows.append((shape, *(peak for peak, _ in results.values()), same))
        print(rows[-1], flush=True)
    print(f"\nPeak memory of generate() above the weights (GiB), experts' grouped_mm whole vs in slices of "
          f"{sliced_limit} tokens\n")  # fmt: skip
    print(f"| batch x prompt | whole | sliced | default (sliced, chunked above {PREFILL_TOKENS_PER_CHUNK} tokens) | "
          f"sliced + prefill_chunk_size={args.chunk} | same greedy tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for shape, *peaks, same in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else v for v in peaks]
        print(f"| {shape} | " + " | ".join(cells) + f" | {same} |")


if __name__ == "__main__":
    main()
