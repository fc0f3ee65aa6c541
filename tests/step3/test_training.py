"""Fine-tuning Step-3 with transformers' Trainer: loss plumbing, gradient accumulation, router balancing loss,
gradient checkpointing, and a short Trainer run on a `datasets.Dataset` that lowers the loss."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

datasets = pytest.importorskip("datasets")

import step3_hf  # noqa: E402,F401  registers the Auto classes
from step3_hf import Step3Config, Step3ForCausalLM  # noqa: E402
from step3_hf.tiny_checkpoint import TINY_CONFIG, synthetic_corpus, write_tiny_tokenizer  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

SEQ = 10


def tiny_model(seed: int = 0, **overrides) -> Step3ForCausalLM:
    torch.manual_seed(seed)
    config = Step3Config(**{**TINY_CONFIG, **overrides})
    config._attn_implementation = "eager"
    return Step3ForCausalLM(config).float()


def reference_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
    """float64 cross-entropy of position t predicting label t+1, -100 ignored, summed / num_items (or the mean)."""
    logits, targets = logits[:, :-1].double(), labels[:, 1:]
    keep = targets != -100
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs[keep].gather(-1, targets[keep][:, None]).squeeze(-1)
    return -picked.sum() / (num_items if num_items is not None else keep.sum())


def reference_balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, mask=None):
    """Switch-Transformer balancing loss in float64 over all MoE layers' rows: E * sum_e f_e * P_e, where f_e is the
    number of top-k slots that chose expert e per row and P_e the mean router probability of e (padding left out)."""
    logits = torch.cat([layer.double() for layer in router_logits])
    weights = torch.ones(logits.shape[0], dtype=torch.float64)
    if mask is not None:
        weights = mask.reshape(-1).double().repeat(len(router_logits))
    probs = logits.softmax(-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).double()
    f = (chosen * weights[:, None]).sum(0) / weights.sum()
    p = (probs * weights[:, None]).sum(0) / weights.sum()
    return num_experts * (f * p).sum()


def padded_batch(rows: int, seed: int = 0):
    """Rows of equal length whose last tokens are padding (label -100, attention 0), each a different amount."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, TINY_CONFIG["vocab_size"], (rows, SEQ), generator=generator)
    attention_mask = torch.ones(rows, SEQ, dtype=torch.long)
    for row in range(1, rows):
        attention_mask[row, SEQ - 3 * row :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def test_loss_shifts_labels_once_ignores_padding_and_divides_by_num_items_in_batch():
    model = tiny_model()
    input_ids, attention_mask, labels = padded_batch(3)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(out.loss.double(), reference_causal_lm_loss(out.logits, labels), rtol=1e-5, atol=1e-6)

    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, num_items_in_batch=100)
    torch.testing.assert_close(
        out.loss.double(), reference_causal_lm_loss(out.logits, labels, num_items=100), rtol=1e-5, atol=1e-6
    )


def test_router_balance_loss_is_opt_in_and_matches_float64_reference():
    model = tiny_model(router_aux_loss_coef=0.3)
    input_ids, attention_mask, labels = padded_batch(3)
    plain = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert plain.aux_loss is None and plain.router_logits is None  # off by default, as in the release

    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    assert len(out.router_logits) == len(model.config.moe_layer_indices)
    expected_aux = reference_balance_loss(out.router_logits, 6, 2, attention_mask)
    torch.testing.assert_close(out.aux_loss.double(), expected_aux, rtol=1e-5, atol=1e-6)
    expected = reference_causal_lm_loss(out.logits, labels) + 0.3 * expected_aux
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        Step3Config(**{**TINY_CONFIG, "router_aux_loss_coef": -1.0})


def cpu_training_args(output_dir, **arguments) -> TrainingArguments:
    """TrainingArguments for a quiet, seeded CPU run that saves and reports nothing; `arguments` add the rest."""
    return TrainingArguments(
        output_dir=str(output_dir),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **arguments,
    )


def _one_sgd_step(
    model, dataset, *, batch_size: int, accumulation: int, tmp_path
) -> tuple[float, dict[str, torch.Tensor]]:
    """The Trainer's loss of one optimizer step with plain SGD (lr=1), and the parameter change: minus its gradient."""
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = cpu_training_args(
        tmp_path,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
    )
    step_loss = Trainer(model=model, args=args, train_dataset=dataset).train().training_loss
    return step_loss, {name: p.detach() - before[name] for name, p in model.named_parameters()}


def _dataset(rows: int, seed: int = 0):
    input_ids, attention_mask, labels = padded_batch(rows, seed)
    return datasets.Dataset.from_dict(
        {"input_ids": input_ids.tolist(), "attention_mask": attention_mask.tolist(), "labels": labels.tolist()}
    )


@pytest.mark.parametrize("router_loss", [False, True], ids=["lm_loss", "with_router_loss"])
def test_gradient_accumulation_step_equals_reference_step(tmp_path, router_loss):
    """GA=2 x batch 1 and GA=1 x batch 2 both report the loss and take exactly the step a float64 reference computes.

    Without the router loss that is the full-batch step (sum of token losses / tokens of the step). With it, the
    balancing term is each micro-batch's loss weighted by its share of the step's label tokens; both runs are
    checked against the reference computed from the model's own per-sequence forward passes.
    """
    hf_logging.set_verbosity_error()
    overrides = dict(output_router_logits=True, router_aux_loss_coef=0.5) if router_loss else {}
    dataset = _dataset(2)
    accumulated_loss, accumulated = _one_sgd_step(
        tiny_model(**overrides), dataset, batch_size=1, accumulation=2, tmp_path=tmp_path
    )

    # Reference gradient: CE summed over both sequences / all label tokens (+ share-weighted balancing losses).
    reference_model = tiny_model(**overrides).double()
    reference_model.config._experts_implementation = "eager"  # the fused expert kernels are not float64
    input_ids, attention_mask, labels = padded_batch(2)
    total_items = int(labels[:, 1:].ne(-100).sum())
    loss = 0.0
    for row in range(2):
        sl = slice(row, row + 1)
        out = reference_model(
            input_ids=input_ids[sl], attention_mask=attention_mask[sl], output_router_logits=router_loss
        )
        loss = loss + reference_causal_lm_loss(out.logits, labels[sl], num_items=total_items)
        if router_loss:
            share = int(labels[sl, 1:].ne(-100).sum()) / total_items
            loss = loss + 0.5 * share * reference_balance_loss(out.router_logits, 6, 2, attention_mask[sl])
    loss.backward()
    expected = {name: -p.grad.float() for name, p in reference_model.named_parameters()}

    assert accumulated_loss == pytest.approx(loss.item(), rel=1e-5)
    for name, delta in accumulated.items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    if not router_loss:  # the full batch in one micro-batch has the same loss and takes the same step
        full_loss, full = _one_sgd_step(
            tiny_model(**overrides), dataset, batch_size=2, accumulation=1, tmp_path=tmp_path
        )
        assert full_loss == pytest.approx(accumulated_loss, rel=1e-5)
        for name, delta in full.items():
            torch.testing.assert_close(delta, accumulated[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    input_ids, attention_mask, labels = padded_batch(3)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(output_router_logits=True, router_aux_loss_coef=0.5)
        model.train()
        if checkpointing:  # `activation_checkpointing_*` from transformers 5.2x, `gradient_checkpointing_*` before
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0]["model.layers.1.mlp.gate.weight"].abs().sum() > 0  # the router learns through the aux loss
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_trainer_on_a_datasets_dataset_lowers_the_loss(tmp_path, bf16):
    hf_logging.set_verbosity_error()
    tokenizer_dir = write_tiny_tokenizer(tmp_path / "tok", synthetic_corpus(400, seed=1))
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model(vocab_size=len(tokenizer))
    texts = datasets.Dataset.from_dict({"text": synthetic_corpus(64, seed=2)})
    train = texts.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    args = cpu_training_args(
        tmp_path / "run",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        bf16=bf16,  # autocast on the CPU too
        max_steps=12,
        learning_rate=3e-3,
        logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    seen_dtypes = set()
    model.lm_head.register_forward_hook(lambda module, inputs, output: seen_dtypes.add(output.dtype))
    trainer.train()
    assert seen_dtypes == {torch.bfloat16 if bf16 else torch.float32}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(len(tokenizer)) - 1.0  # starts near uniform
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses


@pytest.mark.parametrize("mode", [[], ["--lora", "--lora-experts", "--merge"]], ids=["full", "lora"])
def test_finetune_example_runs_end_to_end(tmp_path, mode):
    """examples/finetune_step3.py, shortened: trains, saves, reloads and generates without any download."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "finetune_step3.py"
    command = [sys.executable, str(example), "--output", str(tmp_path), "--steps", "6", "--batch-size", "4", *mode]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    perplexity = re.search(r"held-out perplexity: ([\d.]+) before -> ([\d.]+) after", done.stdout)
    assert perplexity and float(perplexity[2]) < float(perplexity[1]), done.stdout[-3000:]
    assert "greedy continuation of 'the cat'" in done.stdout
    assert (tmp_path / "final" / ("adapter_config.json" if mode else "config.json")).is_file()
    if mode:
        assert (tmp_path / "merged" / "config.json").is_file()
