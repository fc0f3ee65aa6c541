"""Small random checkpoints in the official Step-3 layout, for tests, examples and smoke runs.

They are written exactly as the released model is (sharded safetensors with an index, official tensor names,
fused 3-D expert tensors, the `step3_vl` config with `text_config` and vision tensors beside the text ones, or a
bare `step3_text` config), so everything that loads them exercises the real loading path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_layout import official_tensor_shapes
from .configuration_step3 import Step3Config, Step3VisionConfig, Step3VLConfig
from .vision_layout import official_vision_tensor_shapes

TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_attention_groups=1,
    head_dim=16,
    share_q_dim=32,
    moe_layers_enum="1,2",
    moe_num_experts=6,
    moe_top_k=2,
    moe_intermediate_size=24,
    share_expert_dim=24,
    max_position_embedding=512,
    max_seq_len=512,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# The vision tower of the tiny `step3_vl` checkpoints: the released architecture at toy widths.
TINY_VISION_CONFIG = dict(
    hidden_size=32,
    intermediate_size=48,
    output_hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=168,
    patch_size=14,
)


def random_tensors(
    shapes: dict[str, tuple[int, ...]], *, std: float = 0.05, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random tensors of `shapes`: normal with `std`, and norm weights around 1 so that they matter in the math."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if re.search(r"norm\d*\.weight$", name):  # RMSNorm / LayerNorm scales (`layer_norm1.weight`, ...)
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = std * torch.randn(shape, generator=generator)
        state[name] = tensor.to(dtype)
    return state


def random_official_state_dict(
    config: Step3Config, *, std: float = 0.05, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random language-model tensors under their official names."""
    return random_tensors(official_tensor_shapes(config), std=std, seed=seed, dtype=dtype)


def random_vision_state_dict(
    config: Step3VLConfig, *, std: float = 0.05, seed: int = 1, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random vision tensors under their official names, shaped by `config`."""
    return random_tensors(official_vision_tensor_shapes(config), std=std, seed=seed, dtype=dtype)


def write_official_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    config: Step3Config | Step3VLConfig,
    *,
    num_shards: int = 3,
    with_vision: bool | None = None,
) -> Path:
    """Write `state_dict` as sharded safetensors + `model.safetensors.index.json` + `config.json`, in the layout
    of the official release. `with_vision` (default: True for a `step3_vl` config) adds random vision tensors of the
    config's shapes for any that `state_dict` lacks."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = dict(state_dict)
    if with_vision if with_vision is not None else isinstance(config, Step3VLConfig):
        dtype = next(iter(state.values())).dtype
        for name, tensor in random_vision_state_dict(config, dtype=dtype).items():
            state.setdefault(name, tensor)

    names = list(state)
    shard_names = [names[i::num_shards] for i in range(num_shards)]
    weight_map, total_size = {}, 0
    for index, shard in enumerate(shard_names):
        filename = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors = {name: state[name].contiguous() for name in shard}
        save_file(tensors, path / filename, metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = filename
            total_size += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config_dict = config.to_dict()
    if isinstance(config, Step3VLConfig):
        config_dict["architectures"] = ["Step3VLForConditionalGeneration"]
        config_dict["text_config"]["architectures"] = ["Step3TextForCausalLM"]
    else:
        config_dict["architectures"] = ["Step3TextForCausalLM"]
    (path / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    return path


def tiny_vl_wrapper(text_config: Step3Config) -> Step3VLConfig:
    """The `step3_vl` config of the tiny checkpoints around `text_config`: the tiny vision tower, image token 3."""
    return Step3VLConfig(text_config=text_config, vision_config=Step3VisionConfig(**TINY_VISION_CONFIG), image_token_id=3)


def write_tiny_checkpoint(
    path: str | Path, *, vl: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> Path:
    """A tiny random Step-3 checkpoint in the official layout (`vl=True`: the `step3_vl` wrapper)."""
    text_config = Step3Config(**{**TINY_CONFIG, **overrides})
    config = tiny_vl_wrapper(text_config) if vl else text_config
    state = random_official_state_dict(text_config, seed=seed, dtype=dtype)
    return write_official_checkpoint(path, state, config)


# A minimal chat format for the tiny tokenizer, so that chat endpoints (`transformers serve`) work on tiny checkpoints.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# Printable ASCII, space, newline and tab as the byte-level pre-tokenizer spells them: every token of the tiny
# tokenizer decodes to readable text, and any other byte becomes `<unk>` (never silently dropped).
_TINY_ALPHABET = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a", "\u0109"]


def write_tiny_tokenizer(path: str | Path, texts: Iterable[str], *, vocab_size: int = 256) -> Path:
    """Train a small BPE tokenizer on `texts` with `tokenizers` and save it (with a chat template) to `path`.

    Ids 0, 1, 2 are `<pad>`, `<bos>`, `<eos>`, matching the token ids of `TINY_CONFIG`; the alphabet is printable
    ASCII. Real runs use the checkpoint's own tokenizer; this one exists so that examples and tests run offline.
    Size a checkpoint for it with `vocab_size=len(tokenizer)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=_TINY_ALPHABET,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
    )
    path = Path(path)
    wrapped.save_pretrained(path)
    return path


_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the robot", "a small bird", "the teacher", "our team"]
_VERBS = ["sees", "likes", "carries", "paints", "finds", "follows", "builds", "reads"]
_OBJECTS = ["a red box", "the green door", "a long letter", "the blue river", "an empty cup", "the tall tree"]
_PLACES = ["in the park", "at home", "near the sea", "on the hill", "after lunch", "every morning"]


def synthetic_corpus(num_sentences: int, *, seed: int = 0) -> list[str]:
    """Sentences of a small fixed grammar: offline text that a tiny model learns in seconds (perplexity drops)."""
    generator = torch.Generator().manual_seed(seed)

    def pick(words: list[str]) -> str:
        return words[int(torch.randint(len(words), (1,), generator=generator))]

    return [f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_PLACES)}." for _ in range(num_sentences)]


# Tiny FP8 checkpoints use 16x16 tiles (the release: 128x128); `TINY_FP8_CONFIG` makes every quantized dimension a
# whole number of tiles, as transformers' FP8 loading needs (the release's are too).
TINY_FP8_BLOCK_SIZE = (16, 16)
TINY_FP8_CONFIG = dict(moe_intermediate_size=32, share_expert_dim=32)


def write_tiny_fp8_checkpoint(
    path: str | Path,
    *,
    vl: bool = True,
    seed: int = 0,
    block_size: tuple[int, int] = TINY_FP8_BLOCK_SIZE,
    state_dict: dict[str, torch.Tensor] | None = None,
    **overrides,
) -> Path:
    """A tiny random Step-3 checkpoint in the official block-FP8 layout: float8 e4m3 weights with float32
    `weight_scale_inv` per `block_size` tile (partial tiles at the edges where a dimension is not a multiple),
    bf16 for the tensors `fp8.UNQUANTIZED` lists, `quantization_config` in `config.json`.

    `state_dict`: official-name float tensors to quantize (default: `random_official_state_dict`, in bf16)."""
    from .fp8 import fp8_quantization_config, quantize_state_dict

    text_config = Step3Config(**{**TINY_CONFIG, **TINY_FP8_CONFIG, **overrides})
    config = tiny_vl_wrapper(text_config) if vl else text_config
    if state_dict is None:
        state_dict = random_official_state_dict(text_config, seed=seed, dtype=torch.bfloat16)
    state = dict(quantize_state_dict(state_dict.items(), block_size))
    config.quantization_config = fp8_quantization_config(block_size)
    return write_official_checkpoint(path, state, config)
