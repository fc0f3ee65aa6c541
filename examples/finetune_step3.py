"""Fine-tune Step-3 with transformers' Trainer on a `datasets.Dataset`, fully or with LoRA, then save, reload and
generate.

Offline by default (under 3 minutes on a laptop CPU): it builds a tiny random Step-3 checkpoint in the official
layout, trains a small BPE tokenizer with `tokenizers` on a generated corpus, and fine-tunes on that corpus, printing
the perplexity on held-out text before and after. Real runs point `--checkpoint` at a Step-3 checkpoint (its own
tokenizer is used) and `--corpus` at a text file, on a GPU:

    python examples/finetune_step3.py                                   # tiny, CPU, full fine-tuning
    python examples/finetune_step3.py --lora --lora-experts --merge     # LoRA, routed experts included
    python examples/finetune_step3.py --checkpoint /ckpt/step3 --corpus data.txt --lora --bf16 \\
        --gradient-checkpointing --batch-size 1 --grad-accum 16 --seq-len 2048 --steps 500

Options for real runs: `--router-aux-loss COEF` switches the router load-balancing loss on (off in the release),
`--device-map auto` spreads a large checkpoint over the visible GPUs.
"""

from __future__ import annotations

import argparse
import gc
import math
from itertools import chain
from pathlib import Path

import datasets
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)

import step3_hf  # noqa: F401  registers Step-3 with the Auto classes and its LoRA defaults with peft
from step3_hf.peft_support import STEP3_EXPERT_PARAMETERS
from step3_hf.tiny_checkpoint import synthetic_corpus, write_tiny_checkpoint, write_tiny_tokenizer


# transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing`; older 5.x knows only the first.
CHECKPOINTING_ARGUMENT = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", type=Path, help="a Step-3 checkpoint with its tokenizer (default: build a tiny one)"
    )
    parser.add_argument("--corpus", type=Path, help="a UTF-8 text file, one document per line (default: generated)")
    parser.add_argument("--output", type=Path, default=Path("step3-finetune-out"))
    parser.add_argument("--lora", action="store_true", help="LoRA on Step-3's default targets instead of full tuning")
    parser.add_argument("--lora-experts", action="store_true", help="with --lora: also adapt the routed experts")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--merge", action="store_true", help="with --lora: also save the merged model")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 full, 1e-2 LoRA (tiny model)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU, or CPU with bf16 support)")
    parser.add_argument("--router-aux-loss", type=float, default=None, metavar="COEF")
    parser.add_argument("--device-map", default=None, help="e.g. 'auto' for a checkpoint larger than one GPU")
    parser.add_argument("--prompt", default="the cat")
    args = parser.parse_args(argv)
    if (args.lora_experts or args.merge) and not args.lora:
        parser.error("--lora-experts and --merge need --lora")
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1 or args.seq_len < 2:
        parser.error("--steps, --batch-size, --grad-accum must be >= 1 and --seq-len >= 2")
    return args


def corpus_lines(args: argparse.Namespace) -> list[str]:
    if args.corpus is None:
        return synthetic_corpus(6000, seed=0)
    lines = [line.strip() for line in args.corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < 10:
        raise SystemExit(f"{args.corpus} holds {len(lines)} non-empty lines; a corpus needs at least 10")
    return lines


def base_checkpoint(args: argparse.Namespace, lines: list[str]) -> Path:
    """The user's checkpoint, or a tiny random one with a BPE tokenizer trained on the corpus."""
    if args.checkpoint is not None:
        return args.checkpoint
    path = args.output / "tiny-base"
    write_tiny_tokenizer(path, lines, vocab_size=512)
    vocab_size = len(AutoTokenizer.from_pretrained(path))
    write_tiny_checkpoint(path, vl=False, vocab_size=vocab_size, max_position_embedding=1024, max_seq_len=1024)
    print(f"built a tiny random Step-3 checkpoint and a {vocab_size}-token BPE tokenizer in {path}")
    return path


def lm_datasets(lines: list[str], tokenizer, seq_len: int) -> datasets.DatasetDict:
    """Tokenise, join and cut into `seq_len` blocks (the usual causal-LM recipe); 5% held out."""
    raw = datasets.Dataset.from_dict({"text": lines}).train_test_split(test_size=0.05, seed=0)
    eos = tokenizer.eos_token or ""
    tokenized = raw.map(lambda b: tokenizer([t + eos for t in b["text"]]), batched=True, remove_columns=["text"])

    def group(batch):
        joined = list(chain.from_iterable(batch["input_ids"]))
        usable = len(joined) // seq_len * seq_len
        blocks = [joined[i : i + seq_len] for i in range(0, usable, seq_len)]
        return {"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks]}

    return tokenized.map(group, batched=True, remove_columns=tokenized["train"].column_names)


def held_out_perplexity(trainer: Trainer) -> float:
    """exp of the held-out cross-entropy. The router balancing loss, if switched on, is left out: it is a training
    regulariser, and `eval_loss` would otherwise include `coef * aux_loss`."""
    text_config = trainer.model.config.get_text_config()
    routing = text_config.output_router_logits
    text_config.output_router_logits = False
    try:
        return math.exp(trainer.evaluate()["eval_loss"])
    finally:
        text_config.output_router_logits = routing


def main(argv=None) -> None:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines(args)
    checkpoint = base_checkpoint(args, lines)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = lm_datasets(lines, tokenizer, args.seq_len)
    print(f"dataset: {len(data['train'])} train / {len(data['test'])} held-out blocks of {args.seq_len} tokens")

    use_cuda = torch.cuda.is_available()
    # LoRA: frozen bf16 base weights, float32 adapters (peft upcasts them). Full tuning: float32 master weights,
    # bf16 autocast through `TrainingArguments(bf16=True)`.
    dtype = torch.bfloat16 if args.bf16 and args.lora else torch.float32
    set_seed(0)  # the Trainer's seed, before the adapters: LoRA's initialisation draws from the global generator
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, device_map=args.device_map)
    if args.router_aux_loss is not None:
        model.config.get_text_config().output_router_logits = True
        model.config.get_text_config().router_aux_loss_coef = args.router_aux_loss
    if args.lora:
        lora = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            task_type="CAUSAL_LM",
            target_parameters=STEP3_EXPERT_PARAMETERS if args.lora_experts else None,
        )
        model = get_peft_model(model, lora)  # no target_modules: Step-3's defaults, registered by `import step3_hf`
        model.print_trainable_parameters()

    training_args = TrainingArguments(
        output_dir=str(args.output / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        **{CHECKPOINTING_ARGUMENT: args.gradient_checkpointing},
        learning_rate=args.lr if args.lr is not None else (1e-2 if args.lora else 3e-3),
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        bf16=args.bf16,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=not use_cuda,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["test"],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    perplexity_before = held_out_perplexity(trainer)
    trainer.train()
    perplexity_after = held_out_perplexity(trainer)
    print(f"held-out perplexity: {perplexity_before:.2f} before -> {perplexity_after:.2f} after fine-tuning")

    # Save (LoRA: the adapter alone; full: the model, in the official Step-3 layout), free, reload as a new process
    # would, and generate.
    final = args.output / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    del trainer, model
    gc.collect()
    if use_cuda:
        torch.cuda.empty_cache()
    if args.lora:
        base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, device_map=args.device_map)
        reloaded = PeftModel.from_pretrained(base, final)
        if args.merge:
            reloaded = reloaded.merge_and_unload()
            reloaded.save_pretrained(args.output / "merged")
            tokenizer.save_pretrained(args.output / "merged")
            print(f"merged model saved to {args.output / 'merged'}")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(final, device_map=args.device_map)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(reloaded.device)
    generated = reloaded.generate(**inputs, max_new_tokens=24, do_sample=False)
    print(f"saved to {final}; greedy continuation of {args.prompt!r} by the reloaded {type(reloaded).__name__}:")
    print("  " + tokenizer.decode(generated[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
