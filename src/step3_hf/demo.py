"""The main job on a small built-in example: build a tiny random Step-3 checkpoint in the official layout, load
it through transformers' Auto classes, generate for a left-padded batch, and save it back in the official layout.

    python -m step3_hf.demo [--out DIR] [--attn-implementation sdpa] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from .parameters import count_parameters, kv_cache_bytes_per_token
from .tiny_checkpoint import write_tiny_checkpoint


def run(out: Path, attn_implementation: str, max_new_tokens: int) -> None:
    checkpoint = write_tiny_checkpoint(out / "tiny-step3", vl=True)
    print(f"wrote a tiny official-layout step3_vl checkpoint to {checkpoint}")

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto", attn_implementation=attn_implementation)
    config = model.config.get_text_config()
    kv_bytes = kv_cache_bytes_per_token(config, model.dtype.itemsize)
    print(f"loaded {type(model).__name__} ({model.dtype}): {count_parameters(config)}, KV cache {kv_bytes} B/token")

    pad = config.pad_token_id
    prompts = [[1, 17, 33, 90, 4, 5], [1, 200]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = (input_ids != pad).long()
    generation_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=attention_mask, generation_config=generation_config)
    for prompt, row in zip(prompts, output):
        print(f"prompt {prompt} -> greedy {row[width:].tolist()}")

    model.save_pretrained(out / "saved")
    print(f"saved back in the official layout to {out / 'saved'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    parser.add_argument("--attn-implementation", default="sdpa", help="eager, sdpa, flex_attention, ...")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.out is not None:
        run(args.out, args.attn_implementation, args.max_new_tokens)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.attn_implementation, args.max_new_tokens)


if __name__ == "__main__":
    main()
