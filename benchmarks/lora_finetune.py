"""LoRA fine-tuning throughput and memory: Step-3 vs transformers' built-in Qwen3-MoE of the same size, one GPU.

Question: what does a user pay to LoRA-fine-tune a Step-3 model with Trainer + peft, against the MoE they would
otherwise fine-tune the same way? Both models are random mid-size configs of matched size, trained the same way in
one process: bf16 weights, LoRA r=16 on the same targets for both (`--lora-targets attention`: every projection
of the attention block; `attention+experts`: also the routed experts through `target_parameters`), SDPA attention,
the default (grouped_mm) experts kernel, Trainer with bf16 autocast, AdamW, a fixed number of steps on the same
token stream. The targets are spelled out rather than `"all-linear"`: peft resolves `"all-linear"` differently for
the two (for qwen3_moe it adds the routed experts, as the v4 `nn.Linear` experts were; for Step-3 it takes the
linear layers only), which makes unequal runs.

Size matching: Step-3's shared expert has the routed experts' width, so Qwen3-MoE gets one more expert and one
more expert per token (E+1, k+1): the same FFN parameters in total and per token. Dense layers sit at the same
indices (`mlp_only_layers`). Attention differs by design (Step-3: MFA, low-rank query and ONE K/V head; Qwen3:
GQA with 4 K/V heads); the table prints both models' counted parameters.

The ceiling is a bf16 8192^3 matmul measured in the same run; "model TFLOP/s" counts 4 FLOPs per activated
weight per token (forward 2, backward to the inputs 2: frozen weights get no weight gradient) plus causal
attention, so it is an estimate of useful work, not a hardware counter.

    python benchmarks/lora_finetune.py --out results.json            # H200: 3.2B-parameter models, 200 steps
    python benchmarks/lora_finetune.py --preset tiny --steps 6       # CPU smoke run of the same code

The table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runnable from a plain checkout
from step3_hf import Step3Config, Step3ForCausalLM  # noqa: E402
from step3_hf.peft_support import STEP3_EXPERT_PARAMETERS  # noqa: E402
from step3_hf.tiny_checkpoint import synthetic_corpus  # noqa: E402

PRESETS = {
    # 3.2B parameters (0.6B activated), 6.4 GB in bf16: 16 layers (first and last dense), 32 routed experts of
    # width 1024, top-3.
    "mid": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
        head_dim=128, share_q_dim=512, moe_num_experts=32, moe_top_k=3, moe_intermediate_size=1024,
        share_expert_dim=1024, moe_layers_enum=",".join(str(i) for i in range(1, 15)),
        max_position_embedding=4096, max_seq_len=4096,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        head_dim=16, share_q_dim=32, moe_num_experts=6, moe_top_k=2, moe_intermediate_size=32,
        share_expert_dim=32, moe_layers_enum="1,2", max_position_embedding=512, max_seq_len=512,
    ),
}  # fmt: skip


def step3_config(preset: dict) -> Step3Config:
    return Step3Config(**preset, num_attention_groups=1, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def matched_qwen3_moe_config(step3: Step3Config) -> Qwen3MoeConfig:
    """Qwen3-MoE with Step-3's sizes; the shared expert becomes one more routed expert, always one more chosen."""
    assert step3.share_expert_dim == step3.moe_intermediate_size, "the matching needs shared width == expert width"
    moe_layers = set(step3.moe_layer_indices)
    return Qwen3MoeConfig(
        vocab_size=step3.vocab_size,
        hidden_size=step3.hidden_size,
        intermediate_size=step3.intermediate_size,
        num_hidden_layers=step3.num_hidden_layers,
        num_attention_heads=step3.num_attention_heads,
        num_key_value_heads=min(4, step3.num_attention_heads),
        head_dim=step3.head_dim,
        num_experts=step3.moe_num_experts + 1,
        num_experts_per_tok=step3.moe_top_k + 1,
        moe_intermediate_size=step3.moe_intermediate_size,
        mlp_only_layers=[i for i in range(step3.num_hidden_layers) if i not in moe_layers],
        decoder_sparse_step=1,
        norm_topk_prob=False,
        max_position_embeddings=step3.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@dataclass
class Parameters:
    total: int
    activated: int  # matmul weights one token goes through (lm_head included, embedding lookup excluded)
    trainable: int = 0


def count_model_parameters(model: torch.nn.Module, num_experts: int, top_k: int) -> Parameters:
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embedding = model.get_input_embeddings().weight.numel()
    return Parameters(total=total, activated=total - embedding - experts + experts * top_k // num_experts)


@dataclass
class RunResult:
    model: str
    parameters: Parameters
    experts_implementation: str
    attention_implementation: str
    weights_gib: float
    steps_timed: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_gib: float = 0.0
    model_tflops: float = 0.0
    first_loss: float = math.nan
    last_loss: float = math.nan
    losses: list[float] = field(default_factory=list)


class TokenBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks of one token stream; labels are the inputs (the model shifts them)."""

    def __init__(self, stream: torch.Tensor, seq_len: int):
        self.blocks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def token_stream(vocab_size: int, num_tokens: int) -> torch.Tensor:
    """The generated corpus's words mapped onto token ids: learnable text, the same stream for both models.

    A word-level code keeps the benchmark free of tokenizer training and of the `datasets` package."""
    words: dict[str, int] = {}
    ids: list[int] = []
    sentence = 0
    while len(ids) < num_tokens:
        for text in synthetic_corpus(256, seed=sentence):
            for word in text.split():
                ids.append(3 + words.setdefault(word, len(words)) % (vocab_size - 3))
            ids.append(2)  # eos
        sentence += 1
    return torch.tensor(ids[:num_tokens], dtype=torch.long)


class StepTimer(TrainerCallback):
    """Times optimizer steps after `warmup` of them (device-synchronised) and stops after `max_seconds`."""

    def __init__(self, warmup: int, max_seconds: float):
        self.warmup, self.max_seconds = warmup, max_seconds
        self.start: float | None = None
        self.steps_timed, self.seconds = 0, 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        elif self.start is not None:
            self._sync()
            self.seconds = time.perf_counter() - self.start
            self.steps_timed = state.global_step - self.warmup
            if self.seconds > self.max_seconds:
                control.should_training_stop = True


def train_flops_per_token(config, params: Parameters, seq_len: int, num_heads: int, head_dim: int) -> float:
    attention = 2 * seq_len * num_heads * head_dim * config.num_hidden_layers  # causal QK^T + AV, forward
    return 4 * params.activated + 3 * attention  # backward of attention ~2x its forward


# A regex over full module names: it names the attention projections of both models (Step-3's `wq` included) and
# nothing peft would remap to experts.
ATTENTION_PROJECTIONS = r".*\.self_attn\.(q_proj|wq|k_proj|v_proj|o_proj)"
EXPERT_PARAMETERS = STEP3_EXPERT_PARAMETERS  # Qwen3-MoE's fused experts carry the same parameter names


def lora_config(targets: str) -> LoraConfig:
    experts = EXPERT_PARAMETERS if targets == "attention+experts" else None
    return LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION_PROJECTIONS, target_parameters=experts)


def run(name: str, model: torch.nn.Module, args, dataset, num_experts: int, top_k: int, heads, head_dim) -> RunResult:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = count_model_parameters(model, num_experts, top_k)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    peft_model = get_peft_model(model, lora_config(args.lora_targets))
    params.trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    result = RunResult(
        model=name,
        parameters=params,
        experts_implementation=getattr(model.config, "_experts_implementation", "eager"),
        attention_implementation=model.config._attn_implementation,
        weights_gib=weights_gib,
    )
    timer = StepTimer(args.warmup, args.max_seconds)
    training_args = TrainingArguments(
        output_dir=str(Path(args.work_dir) / name),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        bf16=device == "cuda",
        logging_steps=max(1, args.steps // 20),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        seed=0,
    )
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=dataset, callbacks=[timer])
    trainer.train()
    result.losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result.first_loss, result.last_loss = result.losses[0], result.losses[-1]
    result.steps_timed, result.seconds = timer.steps_timed, timer.seconds
    tokens = timer.steps_timed * args.batch_size * args.seq_len
    result.tokens_per_s = tokens / timer.seconds if timer.seconds else 0.0
    flops_per_token = train_flops_per_token(model.config, params, args.seq_len, heads, head_dim)
    result.model_tflops = result.tokens_per_s * flops_per_token / 1e12
    if device == "cuda":
        result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    print(f"[{name}] {json.dumps(result.__dict__, default=lambda o: o.__dict__)}", flush=True)
    return result  # main() frees the model (and this trainer with it) once it drops its own reference


def matmul_ceiling_tflops() -> float:
    """bf16 8192^3 matmul rate on random data: mean of 10 after 3 warm-ups."""
    if not torch.cuda.is_available():
        return math.nan
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def build(model_class, config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the run's peak: weights, LoRA state, activations, optimizer
    with torch.device(device):
        return model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mid")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lora-targets", choices=["attention", "attention+experts"], default="attention")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="per model: stop timing (and training) after")
    parser.add_argument("--work-dir", default="/tmp/lora_finetune_bench")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")
    hf_logging.set_verbosity_error()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    step3 = step3_config(PRESETS[args.preset])
    qwen = matched_qwen3_moe_config(step3)
    stream = token_stream(step3.vocab_size, (args.steps + 1) * args.batch_size * args.seq_len)
    dataset = TokenBlocks(stream, args.seq_len)
    ceiling = matmul_ceiling_tflops()

    results = []
    for name, model_class, config, experts, top_k in (
        ("step3", Step3ForCausalLM, step3, step3.moe_num_experts, step3.moe_top_k),
        ("qwen3_moe", Qwen3MoeForCausalLM, qwen, qwen.num_experts, qwen.num_experts_per_tok),
    ):
        try:  # one model failing (e.g. out of memory) still leaves the other's numbers
            model = build(model_class, config, device, dtype)
            results.append(run(name, model, args, dataset, experts, top_k, config.num_attention_heads, config.head_dim))
        except Exception:
            traceback.print_exc()
            results.append(RunResult(name, Parameters(0, 0), "failed", "failed", 0.0))
        model = None  # free this model before the next is built: each run's memory is its own
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            print(f"memory still allocated after {name}: {torch.cuda.memory_allocated() / 2**30:.2f} GiB", flush=True)

    import transformers

    environment = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": __import__("peft").__version__,
        "command": " ".join(sys.argv),
        "preset": args.preset,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "lora_targets": args.lora_targets,
        "bf16_matmul_tflops": ceiling,
    }
    if args.out:
        payload = {"environment": environment, "results": [r.__dict__ for r in results]}
        args.out.write_text(json.dumps(payload, indent=2, default=lambda o: o.__dict__))

    print(f"\n{environment['device']}, torch {environment['torch']}, transformers {environment['transformers']}, "
          f"peft {environment['peft']}; batch {args.batch_size} x {args.seq_len} tokens, "
          f"LoRA r=16 on {args.lora_targets}, bf16; bf16 matmul ceiling {ceiling:.0f} TFLOP/s")  # fmt: skip
    header = (
        "| model | params total / activated | LoRA trainable | steps timed | tokens/s | model TFLOP/s (est.) "
        "| weights GiB | peak GiB | loss first -> last | experts / attention |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results:
        p = r.parameters
        print(
            f"| {r.model} | {p.total / 1e9:.2f}B / {p.activated / 1e9:.2f}B | {p.trainable / 1e6:.1f}M | "
            f"{r.steps_timed} | {r.tokens_per_s:,.0f} | {r.model_tflops:.1f} | {r.weights_gib:.2f} | "
            f"{r.peak_gib:.2f} | {r.first_loss:.2f} -> {r.last_loss:.2f} | "
            f"{r.experts_implementation} / {r.attention_implementation} |"
        )
    if results[0].tokens_per_s and results[1].tokens_per_s:
        print(f"Step-3 / Qwen3-MoE tokens/s: {results[0].tokens_per_s / results[1].tokens_per_s:.2f}x")


if __name__ == "__main__":
    main()
