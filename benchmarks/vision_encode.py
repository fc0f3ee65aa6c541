"""Step-3's vision side at the released widths: images/s through the ViT, the two downsamplers and the projector.

The vision tower of `Step3VLForConditionalGeneration` (63 layers, hidden 1792, 1.90B parameters with the
downsamplers and projector), bf16, random weights, on one GPU; the language model is built with one small layer,
as only `get_image_features` runs. Rows: 728 px global views only (169 tokens an image), and images whose aspect
gives crops (one 1456 x 1008 image: the global view plus its 504 px crops, 81 tokens each), through SDPA and eager
attention. Crop counts and tokens come from `Step3VLImageProcessor`, as a user's images would.

    python benchmarks/vision_encode.py [--batches 1 8 32]
"""

import argparse
import time

import torch
from decode_step import build_bf16
from PIL import Image

from step3_hf import Step3Config, Step3VLConfig, Step3VLForConditionalGeneration, Step3VLImageProcessor
from step3_hf.vision_layout import count_vision_parameters


def build(device: str) -> Step3VLForConditionalGeneration:
    text = Step3Config(
        hidden_size=7168, num_hidden_layers=1, moe_layers_enum="", intermediate_size=256, vocab_size=1024,
        num_attention_heads=8, share_q_dim=256, head_dim=64,
    )  # fmt: skip
    return build_bf16(Step3VLForConditionalGeneration, Step3VLConfig(text_config=text.to_dict()), device)


def seconds_per_call(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("vision_encode.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    model = build("cuda")
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision_model", "vit_")))
    print(f"vision parameters: {vision:,} (config arithmetic: {count_vision_parameters(model.config):,})")
    processor = Step3VLImageProcessor()
    wide = processor(images=[Image.new("RGB", (1456, 1008), (120, 60, 30))], return_tensors="pt")
    crops = int(wide["num_patches"][0])
    print(f"a 1456 x 1008 image: the global view + {crops} crops = {169 + 81 * crops} image tokens")

    rows = []
    for attention in ("sdpa", "eager"):
        model.set_attn_implementation(attention)
        for batch in args.batches:
            views = torch.randn(batch, 3, 728, 728, device="cuda", dtype=torch.bfloat16)
            patches = torch.randn(batch * crops, 3, 504, 504, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                global_only = seconds_per_call(lambda: model.get_image_features(views))
                with_crops = seconds_per_call(
                    lambda: model.get_image_features(views, patches, [crops] * batch)
                )
            rows.append((attention, batch, batch / global_only, batch / with_crops))
            print(rows[-1], flush=True)
            del views, patches
            torch.cuda.empty_cache()

    print(f"\nimages/s, Step-3 vision tower + downsamplers + projector, bf16 ({vision / 1e9:.2f}B parameters)\n")
    print(f"| attention | batch | 728 px global view (169 tokens) | 1456 x 1008 with {crops} crops ({169 + 81 * crops} tokens) |")
    print("|---|---|---|---|")
    for attention, batch, plain, cropped in rows:
        print(f"| {attention} | {batch} | {plain:,.1f} | {cropped:,.1f} |")


if __name__ == "__main__":
    main()
