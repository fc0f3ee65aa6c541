"""Batches of image-text pairs for fine-tuning Step-3 with transformers' Trainer.

Each example is a dict with a `prompt` holding one `<im_patch>` per image, the `images` it refers to (a list, or a
single `image`), and the `response` to learn. The prompt (with its expanded image tokens) and the response are
tokenised separately and joined, so the boundary never moves with the tokenizer's merges; only the response and the
end-of-sequence token it is followed by carry labels, so image tokens, image markers, prompt text and padding are
all kept out of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.image_processing_utils import BatchFeature

from .processing_step3_vl import Step3VLProcessor

IGNORE_INDEX = -100


@dataclass
class Step3VLDataCollator:
    """Pads to the longest example (right side) and builds `labels`; `max_length` cuts responses, never prompts."""

    processor: Step3VLProcessor
    max_length: int | None = None
    prompt_key: str = "prompt"
    response_key: str = "response"

    def _images(self, example: dict[str, Any]) -> list:
        images = example.get("images", example.get("image"))
        if images is None:
            return []
        return list(images) if isinstance(images, (list, tuple)) else [images]

    def __call__(self, examples: Sequence[dict[str, Any]]) -> BatchFeature:
        processor, tokenizer = self.processor, self.processor.tokenizer
        for key in (self.prompt_key, self.response_key):
            if any(key not in example for example in examples):
                raise ValueError(f"every example needs a {key!r} field; got fields {sorted(examples[0])}")
        prompts = [example[self.prompt_key] for example in examples]
        images = [image for example in examples for image in self._images(example)]
        image_inputs = processor.image_processor(images) if images else None
        if image_inputs is not None:
            prompts = processor.expand_image_placeholders(prompts, image_inputs)
        elif any(processor.image_token in prompt for prompt in prompts):
            raise ValueError(f"a prompt holds an image placeholder ({processor.image_token!r}) but no image was given")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no `eos_token`: the collator ends every response with it")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        rows, labels = [], []
        for prompt, example in zip(prompts, examples):
            prompt_ids = tokenizer(prompt)["input_ids"]
            response_ids = tokenizer(example[self.response_key], add_special_tokens=False)["input_ids"]
            response_ids = response_ids + [tokenizer.eos_token_id]
            if self.max_length is not None:
                if len(prompt_ids) >= self.max_length:
                    raise ValueError(
                        f"a prompt of {len(prompt_ids)} tokens (image tokens included) leaves no room for its response "
                        f"in `max_length` {self.max_length}; raise `max_length` or use fewer / smaller images"
                    )
                response_ids = response_ids[: self.max_length - len(prompt_ids)]
            rows.append(prompt_ids + response_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + response_ids)

        width = max(len(row) for row in rows)
        batch = {
            "input_ids": torch.tensor([row + [pad_id] * (width - len(row)) for row in rows]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
            "labels": torch.tensor([label + [IGNORE_INDEX] * (width - len(label)) for label in labels]),
        }
        if image_inputs is not None:
            for name in ("pixel_values", "patch_pixel_values", "num_patches"):
                batch[name] = image_inputs[name]
        return BatchFeature(batch)


__all__ = ["IGNORE_INDEX", "Step3VLDataCollator"]
