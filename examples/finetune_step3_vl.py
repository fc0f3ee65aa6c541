"""Fine-tune Step-3 on image-text pairs with transformers' Trainer: LoRA on the language model, the vision tower frozen,
then save the adapter, reload it and answer about a new image.

Offline by default (one to two minutes on two CPU cores): it builds a tiny random Step-3 VL checkpoint in the official
layout with its tokenizer and processor, and a `datasets.Dataset` (an `Image` feature, a prompt and a response) of
pictures of one coloured square each, asked "what colour is the square?". It prints the held-out loss before and
after. Real runs point `--checkpoint` at a Step-3 checkpoint (its own processor is used) on GPUs:

    python examples/finetune_step3_vl.py                                  # tiny, CPU
    python examples/finetune_step3_vl.py --train-projector                # also fully train vit_large_projector
    python examples/finetune_step3_vl.py --checkpoint /ckpt/step3 --bf16 --device-map auto \\
        --gradient-checkpointing --batch-size 1 --grad-accum 16 --steps 500

Vision stays frozen unless `--train-vision` (then the ViT, downsamplers and projector are trained in full beside the
LoRA adapters).
"""

from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

import datasets
import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments, set_seed

import step3_hf  # noqa: F401  registers Step-3 with the Auto classes and its LoRA defaults with peft
from step3_hf.data_collator_step3_vl import Step3VLDataCollator
from step3_hf.processing_step3_vl import IMAGE_TOKEN
from step3_hf.tiny_vl_checkpoint import write_tiny_vl_checkpoint

# transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing`; older 5.x knows only the first.
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}
QUESTION = "what colour is the square?"
VISION_MODULES = ["vision_model", "vit_downsampler", "vit_downsampler2", "vit_large_projector"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a Step-3 VL checkpoint with its processor (default: tiny)")
    parser.add_argument("--output", type=Path, default=Path("step3-vl-finetune-out"))
    parser.add_argument("--examples", type=int, default=192, help="synthetic image-text pairs (5%% held out)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--train-projector", action="store_true", help="also train vit_large_projector in full")
    parser.add_argument("--train-vision", action="store_true", help="also train the whole vision side in full")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0, help="for the adapters' initialisation and the Trainer")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device-map", default=None, help="e.g. 'auto' for a checkpoint larger than one GPU")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch_size, args.grad_accum, args.lora_rank) < 1 or args.examples < 20:
        parser.error("--steps, --batch-size, --grad-accum, --lora-rank must be >= 1 and --examples >= 20")
    return args


def square_picture(colour: str, rng: np.random.Generator) -> Image.Image:
    """A grey picture of random size (some wide or tall enough to be cropped) with one big square of `colour`."""
    width, height = int(rng.integers(64, 280)), int(rng.integers(64, 200))
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    side = int(rng.integers(min(width, height) // 2, min(width, height)))
    left, top = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    pixels[top : top + side, left : left + side] = COLOURS[colour]
    return Image.fromarray(pixels)


def colour_dataset(count: int, seed: int = 0) -> datasets.DatasetDict:
    rng = np.random.default_rng(seed)
    colours = [list(COLOURS)[int(i)] for i in rng.integers(0, len(COLOURS), count)]
    features = datasets.Features(
        {"image": datasets.Image(), "prompt": datasets.Value("string"), "response": datasets.Value("string")}
    )
    data = datasets.Dataset.from_dict(
        {
            "image": [square_picture(colour, rng) for colour in colours],
            "prompt": [f"<|user|>{IMAGE_TOKEN}{QUESTION}<|assistant|>"] * count,
            "response": colours,
        },
        features=features,
    )
    return data.train_test_split(test_size=0.05, seed=seed)


def base_checkpoint(args: argparse.Namespace) -> Path:
    if args.checkpoint is not None:
        return args.checkpoint
    path = args.output / "tiny-base"
    write_tiny_vl_checkpoint(path, [QUESTION, *COLOURS] * 20)
    print(f"built a tiny random Step-3 VL checkpoint with its tokenizer and processor in {path}")
    return path


def with_adapters(model, args: argparse.Namespace):
    """LoRA on the language model's linear layers (Step-3's defaults; the vision tower has none of those names)."""
    modules_to_save = None
    if args.train_vision or args.train_projector:
        modules_to_save = VISION_MODULES if args.train_vision else ["vit_large_projector"]
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, modules_to_save=modules_to_save)
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    return model


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    checkpoint = base_checkpoint(args)
    processor = AutoProcessor.from_pretrained(checkpoint)
    data = colour_dataset(args.examples)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    set_seed(args.seed)  # before the adapters: LoRA's initialisation draws from the global generator
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype, device_map=args.device_map)
    model = with_adapters(model, args)
    vision_frozen = not any(p.requires_grad for n, p in model.named_parameters() if ".vision_model." in n)
    trainable_outside_lora = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    lora_modules = sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n})
    print(f"vision tower frozen: {vision_frozen}")

    use_cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(args.output / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        bf16=args.bf16,
        logging_steps=max(1, args.steps // 6),
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the collator needs the image, prompt and response columns
        use_cpu=not use_cuda,
        seed=args.seed,
        **{CHECKPOINTING_ARGUMENT: args.gradient_checkpointing},
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=Step3VLDataCollator(processor),
    )
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    print(f"held-out loss: {loss_before:.3f} before -> {loss_after:.3f} after fine-tuning")

    final = args.output / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    del trainer, model
    gc.collect()
    base = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype, device_map=args.device_map)
    reloaded = PeftModel.from_pretrained(base, final).eval()
    example = data["test"][0]
    inputs = processor(images=[example["image"]], text=example["prompt"], return_tensors="pt").to(reloaded.device)
    generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"adapter saved to {final}; the reloaded model answers {answer!r} (expected {example['response']!r})")
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "perplexity_after": math.exp(loss_after),
        "vision_frozen": vision_frozen,
        "trainable_outside_lora": trainable_outside_lora,
        "lora_modules": lora_modules,
        "answer": answer,
    }


if __name__ == "__main__":
    main()
