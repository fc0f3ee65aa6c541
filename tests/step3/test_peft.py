"""peft LoRA on Step-3: default target modules, routed-expert LoRA through `target_parameters`, and adapters that
save, load (`PeftModel.from_pretrained`, `model.load_adapter`) and merge with unchanged outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import step3_hf  # noqa: E402,F401  registers the Auto classes and the LoRA defaults
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from step3_hf.peft_support import STEP3_EXPERT_PARAMETERS  # noqa: E402
from step3_hf.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("step3") / "ckpt", vl=False)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")


def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 256, (2, 9), generator=generator)


def randomise_lora(model: nn.Module) -> None:
    """Non-zero LoRA factors (B starts at zero), so that an adapter changes the outputs measurably."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("vl", [False, True], ids=["step3_text", "step3_vl"])
def test_default_lora_targets_every_block_linear_and_nothing_else(tmp_path, vl):
    path = write_tiny_checkpoint(tmp_path / "ckpt", vl=vl)
    model = load(path)
    # Independent expectation: every nn.Linear inside the decoder layers (not lm_head, not the router, which is a
    # bare Parameter, not the 3-D experts).
    expected = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.")
    }
    assert {n.rsplit(".", 1)[-1] for n in expected} == {
        "q_proj", "wq", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    peft_model = get_peft_model(model, LoraConfig(r=16))
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and isinstance(module.base_layer, nn.Linear)
    }
    assert adapted == expected
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_expert_lora_through_target_parameters_gets_gradients_and_learns(checkpoint):
    model = load(checkpoint)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=[], target_parameters=STEP3_EXPERT_PARAMETERS))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    # one A/B pair per expert tensor per MoE layer
    assert len(trainable) == 2 * len(STEP3_EXPERT_PARAMETERS) * len(model.config.moe_layer_indices)
    assert all(".mlp.experts." in n for n in trainable)

    ids = batch()
    peft_model.train()
    loss_before = peft_model(input_ids=ids, labels=ids).loss
    loss_before.backward()
    for name, param in trainable.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if "lora_A" not in name:  # A gets no gradient while B is still zero: d(loss)/dA = B^T (...) = 0
            assert param.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in peft_model.named_parameters() if not p.requires_grad)

    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    assert peft_model(input_ids=ids, labels=ids).loss < loss_before - 1e-3


@pytest.mark.parametrize("experts", [False, True], ids=["default_targets", "with_experts"])
def test_adapter_save_load_and_merge_keep_outputs(checkpoint, tmp_path, experts):
    config = LoraConfig(r=8, lora_alpha=16, target_parameters=STEP3_EXPERT_PARAMETERS if experts else None)
    ids = batch()
    base_logits = load(checkpoint)(ids).logits
    peft_model = get_peft_model(load(checkpoint), config)
    randomise_lora(peft_model)
    peft_model.eval()
    with torch.no_grad():
        adapted_logits = peft_model(ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapter does change the model

    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(load(checkpoint), adapter_dir).eval()
        torch.testing.assert_close(reloaded(ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)

        through_transformers = load(checkpoint)
        through_transformers.load_adapter(str(adapter_dir))
        torch.testing.assert_close(through_transformers(ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)

        merged = peft_model.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)

    # The merged model saves in the official layout and loads back as a plain Step-3 checkpoint.
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "merged")(ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)
