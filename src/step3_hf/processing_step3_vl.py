"""Step-3 processor: the image processor and the tokenizer, with the prompt format of the official chat template.

The chat template writes one `<im_patch>` per image. The processor expands it, as the public Step-3 code does, to
the image's crops and then its global view:

    per crop:   <patch_start> <im_patch> x 81 <patch_end>     (+ <patch_newline> after the last crop of a row but
                                                               the last row)
    then:       <im_start> <im_patch> x 169 <im_end>

The model writes the image features over the `<im_patch>` tokens in that order.
"""

from __future__ import annotations

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

IMAGE_TOKEN = "<im_patch>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
PATCH_START_TOKEN = "<patch_start>"
PATCH_END_TOKEN = "<patch_end>"
PATCH_NEWLINE_TOKEN = "<patch_newline>"
SPECIAL_TOKENS = [
    IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, PATCH_START_TOKEN, PATCH_END_TOKEN, PATCH_NEWLINE_TOKEN
]  # fmt: skip

# Keys of `__call__` that go to the image processor; everything else goes to the tokenizer.
_IMAGE_KWARGS = ("patch_size", "max_image_size", "size", "do_normalize", "image_mean", "image_std", "do_rescale")


class Step3VLProcessor(ProcessorMixin):
    r"""
    Args:
        image_processor ([`Step3VLImageProcessor`]): plans and normalises the global view and the crops.
        tokenizer: the checkpoint's tokenizer; it must know the six image marker tokens as single tokens.
        chat_template (`str`, *optional*): the checkpoint's chat template (one `<im_patch>` per image).
        num_image_feature_tokens (`int`, defaults to 169): tokens of a global view (`image_token_len`).
        num_patch_feature_tokens (`int`, defaults to 81): tokens of a crop (`patch_token_len`).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_image_feature_tokens: int = 169,
        num_patch_feature_tokens: int = 81,
        **kwargs,
    ):
        self.image_token = IMAGE_TOKEN
        self.num_image_feature_tokens = num_image_feature_tokens
        self.num_patch_feature_tokens = num_patch_feature_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            missing = [token for token in SPECIAL_TOKENS if token not in vocab]
            if missing:
                raise ValueError(
                    f"the tokenizer lacks the Step-3 image tokens {missing}: add them as special tokens "
                    "(`tokenizer.add_special_tokens({'additional_special_tokens': [...]})`)"
                )

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def image_prompt(self, num_patches: int, newline_mask: list[bool]) -> str:
        """The expansion of one image's `<im_patch>` placeholder."""
        crop = PATCH_START_TOKEN + IMAGE_TOKEN * self.num_patch_feature_tokens + PATCH_END_TOKEN
        text = "".join(crop + (PATCH_NEWLINE_TOKEN if newline_mask[i] else "") for i in range(num_patches))
        return text + IMAGE_START_TOKEN + IMAGE_TOKEN * self.num_image_feature_tokens + IMAGE_END_TOKEN

    def num_image_tokens(self, width: int, height: int) -> int:
        """Prompt tokens (markers included) one `width x height` image costs."""
        plan = self.image_processor.plan(width, height)
        return plan.num_crops * (self.num_patch_feature_tokens + 2) + sum(plan.newline_mask) + (
            self.num_image_feature_tokens + 2
        )

    def expand_image_placeholders(self, text: list[str], image_inputs: BatchFeature | dict) -> list[str]:
        """Replace the `<im_patch>` placeholders of `text`, in order over the prompts, by the images' expansions."""
        num_patches = [int(n) for n in image_inputs["num_patches"]]
        newline_mask = [bool(m) for m in image_inputs["patch_newline_mask"]]
        found = sum(t.count(self.image_token) for t in text)
        if found != len(num_patches):
            raise ValueError(
                f"the prompts hold {found} image placeholder(s) ({self.image_token!r}) for {len(num_patches)} "
                "image(s): write one placeholder per image where it belongs (the chat template does this)"
            )
        expansions, start = [], 0
        for count in num_patches:
            expansions.append(self.image_prompt(count, newline_mask[start : start + count]))
            start += count
        expanded, index = [], 0
        for prompt in text:
            parts = prompt.split(self.image_token)
            pieces = [parts[0]]
            for part in parts[1:]:
                pieces += [expansions[index], part]
                index += 1
            expanded.append("".join(pieces))
        return expanded

    def __call__(self, images=None, text: str | list[str] | None = None, **kwargs) -> BatchFeature:
        """Tokenised prompts with expanded image placeholders, plus the image processor's outputs.

        `images` is a list over all prompts in order (or a list of lists, one per prompt); `text` a prompt or a list
        of prompts with one `<im_patch>` per image. Other keyword arguments (`padding`, `return_tensors`, ...) go to
        the tokenizer.
        """
        if text is None:
            raise ValueError("`text` is required: the prompt(s), with one <im_patch> per image")
        text = [text] if isinstance(text, str) else list(text)
        return_tensors = kwargs.pop("return_tensors", None)
        image_kwargs = {name: kwargs.pop(name) for name in _IMAGE_KWARGS if name in kwargs}
        for name in ("videos", "audio", "audios"):
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"Step-3 takes images and text only, got `{name}`")
        image_inputs = {}
        if images is not None and not (isinstance(images, (list, tuple)) and not images):
            image_inputs = self.image_processor(images, **image_kwargs)
            text = self.expand_image_placeholders(text, image_inputs)
        elif any(self.image_token in prompt for prompt in text):
            raise ValueError(f"the prompts hold image placeholders ({self.image_token!r}) but no `images` were given")
        text_inputs = self.tokenizer(text, **kwargs)
        return BatchFeature({**text_inputs, **image_inputs}, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)


__all__ = ["Step3VLProcessor", "SPECIAL_TOKENS"]
