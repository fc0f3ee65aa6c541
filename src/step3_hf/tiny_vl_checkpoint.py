"""Small random Step-3 vision-language checkpoints in the official layout, for tests, examples and smoke runs.

A directory written here holds what an official `step3_vl` release holds: sharded safetensors under the official
names (language model and vision tower), the `step3_vl` config, a tokenizer that knows the image marker tokens, and
the processor files, so `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained(path)` go through the real
loading paths. The vision tower is tiny and sees small views (168 px global, 84 px crops) so that it runs on a CPU in
milliseconds; `official_geometry=True` keeps the released 728 / 504 / 3024 pixel geometry instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .configuration_step3 import Step3Config, Step3VisionConfig, Step3VLConfig
from .image_processing_step3_vl import Step3VLImageProcessor
from .processing_step3_vl import IMAGE_TOKEN, SPECIAL_TOKENS, Step3VLProcessor
from .tiny_checkpoint import (
    TINY_CONFIG,
    TINY_VISION_CONFIG,
    random_official_state_dict,
    random_vision_state_dict,
    write_official_checkpoint,
    write_tiny_tokenizer,
)
from .vision_layout import image_feature_tokens

# Global view, crop and size cap of the tiny processor: the released 728 / 504 / 3024 scaled by about 1 / 4.3.
TINY_GEOMETRY = dict(image_size=168, patch_size=84, max_image_size=504)

# The official template's handling of content: text items as they are, each image item as one `<im_patch>`.
TINY_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}" + IMAGE_TOKEN + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_vl_config(image_token_id: int, vocab_size: int, **text_overrides) -> Step3VLConfig:
    """The `step3_vl` config of the tiny checkpoints: `TINY_CONFIG` text model, `TINY_VISION_CONFIG` vision tower."""
    text = {**TINY_CONFIG, "vocab_size": vocab_size, "max_position_embedding": 4096, "max_seq_len": 4096}
    return Step3VLConfig(
        text_config=Step3Config(**{**text, **text_overrides}),
        vision_config=Step3VisionConfig(**TINY_VISION_CONFIG),
        image_token_id=image_token_id,
    )


def write_tiny_vl_checkpoint(
    path: str | Path,
    texts: Iterable[str],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    official_geometry: bool = False,
    **text_overrides,
) -> Path:
    """Write a tiny random VL checkpoint, its tokenizer (BPE trained on `texts`, plus the image marker tokens) and
    its processor to `path`."""
    from transformers import AutoTokenizer

    path = Path(path)
    write_tiny_tokenizer(path, texts, vocab_size=text_overrides.pop("tokenizer_vocab_size", 256))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tokenizer.save_pretrained(path)

    config = tiny_vl_config(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), len(tokenizer), **text_overrides)
    state = random_official_state_dict(config.text_config, seed=seed, dtype=dtype)
    state.update(random_vision_state_dict(config, seed=seed + 1, dtype=dtype))
    write_official_checkpoint(path, state, config, with_vision=False)

    geometry = dict(image_size=728, patch_size=504, max_image_size=3024) if official_geometry else TINY_GEOMETRY
    image_processor = Step3VLImageProcessor(
        size={"height": geometry["image_size"], "width": geometry["image_size"]},
        patch_size=geometry["patch_size"],
        max_image_size=geometry["max_image_size"],
    )
    processor = Step3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=TINY_VL_CHAT_TEMPLATE,
        num_image_feature_tokens=image_feature_tokens(config, geometry["image_size"]),
        num_patch_feature_tokens=image_feature_tokens(config, geometry["patch_size"]),
    )
    processor.save_pretrained(path)
    return path


__all__ = [
    "TINY_VISION_CONFIG",
    "TINY_GEOMETRY",
    "TINY_VL_CHAT_TEMPLATE",
    "random_vision_state_dict",
    "tiny_vl_config",
    "write_tiny_vl_checkpoint",
]
