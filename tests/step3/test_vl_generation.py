"""Image-text generation and fine-tuning with the Step-3 VL model: batched generation equals one-by-one generation,
the collator keeps image and prompt tokens out of the loss, and Trainer + LoRA train the language model only."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import step3_hf  # noqa: F401
from step3_hf.data_collator_step3_vl import IGNORE_INDEX, Step3VLDataCollator
from step3_hf.tiny_checkpoint import synthetic_corpus
from step3_hf.tiny_vl_checkpoint import write_tiny_vl_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_vl_checkpoint(tmp_path_factory.mktemp("vlgen"), synthetic_corpus(200), seed=7)


def picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Prompts with 2, 0 and 1 images; the images have 0 to several crops.
PROMPTS = [
    ("<|user|><im_patch>the cat sees<im_patch>", [picture(300, 120, 0), picture(168, 168, 1)]),
    ("<|user|>a dog likes the red box", []),
    ("<|user|>my sister <im_patch> paints", [picture(120, 400, 2)]),
]


def test_batched_generation_equals_one_by_one(checkpoint):
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    images = [image for _, prompt_images in PROMPTS for image in prompt_images]
    batch = processor(images=images, text=[text for text, _ in PROMPTS], padding=True, return_tensors="pt")
    assert batch["attention_mask"].eq(0).any()  # the prompts really are padded
    generated = model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for row, (text, prompt_images) in enumerate(PROMPTS):
        single = processor(images=prompt_images or None, text=text, return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=8, do_sample=False)[0, single["input_ids"].shape[1] :]
        assert generated[row].tolist() == alone.tolist(), f"prompt {row}"
    # Beam search repeats every prompt with its own images (they are listed per image and per crop, not per prompt):
    # each repeated row sees exactly what its prompt saw.
    ids, kwargs = model._expand_inputs_for_generation(expand_size=2, **batch)
    with torch.no_grad():
        expanded, original = model(input_ids=ids, **kwargs).logits, model(**batch).logits
    torch.testing.assert_close(expanded, original.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-5)
    beams = dict(max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2)
    generated = model.generate(**batch, **beams)[:, batch["input_ids"].shape[1] :]
    for row, (text, prompt_images) in enumerate(PROMPTS):
        single = processor(images=prompt_images or None, text=text, return_tensors="pt")
        alone = model.generate(**single, **beams)[:, single["input_ids"].shape[1] :]
        assert generated[2 * row : 2 * row + 2].tolist() == alone.tolist(), f"prompt {row} with beams"
    # The images matter: another picture changes what the model says after the first prompt.
    other = processor(images=[picture(300, 120, 9), picture(168, 168, 1)], text=PROMPTS[0][0], return_tensors="pt")
    logits = model(**other).logits[0, -1]
    first = processor(images=PROMPTS[0][1], text=PROMPTS[0][0], return_tensors="pt")
    assert not torch.allclose(logits, model(**first).logits[0, -1])


def test_collator_keeps_image_and_prompt_tokens_out_of_the_loss(checkpoint):
    processor = AutoProcessor.from_pretrained(checkpoint)
    tokenizer = processor.tokenizer
    examples = [
        {"prompt": "<|user|><im_patch>which colour?<|assistant|>", "images": [picture(300, 120, 3)], "response": "red"},
        {"prompt": "<|user|>no picture here<|assistant|>", "response": "a long answer about the cat"},
        {"prompt": "<|user|><im_patch>and this?<|assistant|>", "image": picture(100, 100, 4), "response": "blue"},
    ]
    batch = Step3VLDataCollator(processor)(examples)
    assert batch["num_patches"].shape == (2,) and batch["pixel_values"].shape[0] == 2
    for row, example in enumerate(examples):
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        want = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[labels != IGNORE_INDEX].tolist() == want
        labelled = (labels != IGNORE_INDEX).nonzero().flatten()
        # The labelled tokens are the last real tokens of the row: the response follows the prompt.
        assert labelled.tolist() == list(range(int(mask.sum()) - len(want), int(mask.sum())))
        assert ids[labelled].tolist() == want
        assert not (labels == processor.image_token_id).any()
    # The image tokens of the batch are exactly what the images produce.
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="leaves no room"):
        Step3VLDataCollator(processor, max_length=10)(examples[:1])


def test_trainer_with_lora_trains_the_language_model_only(checkpoint, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "finetune_step3_vl.py"
    spec = importlib.util.spec_from_file_location("finetune_step3_vl", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path), "--steps", "12", "--examples", "40",
            "--batch-size", "4", "--lr", "1e-2"]  # fmt: skip
    result = example.main(argv)
    assert result["loss_after"] < result["loss_before"]
    assert result["vision_frozen"] and result["trainable_outside_lora"] == []
    assert result["lora_modules"] and all(".model.layers." in name for name in result["lora_modules"])
