"""Step-3 vision-language model for transformers: the official `Step3VLForConditionalGeneration`.

Read top to bottom: vision embeddings, eager attention, ViT attention / MLP / layer / encoder, the ViT, the VL model.

The module tree mirrors the official checkpoint, so its tensors load under their own names: `vision_model.*` (the ViT),
`vit_downsampler` and `vit_downsampler2` (two convolutions, 52x52 ViT patches -> 13x13 tokens for the 728px global
view), `vit_large_projector` (into the language model's width), and the language model of `modeling_step3.py`
unchanged at `model.*` / `lm_head.*` (its MoE tensors go through the `step3_text` conversion mapping, so the model also
saves back in the official layout).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, MoeCausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .configuration_step3 import Step3VisionConfig, Step3VLConfig
from .modeling_step3 import Step3ForCausalLM, Step3PreTrainedModel, cache_kwarg
from .vision_layout import image_feature_tokens

# The official ViT prepends three copies of the class token to the sequence (a padding the authors added for tensor
# parallelism: "pad_tp_size = 4" in the public loaders). They take part in attention, so they change the result and
# are kept; the vision features are the patch tokens after these four leading class tokens.
NUM_CLASS_TOKENS = 4

# Inputs the processor gives the model for images; `generate()` passes them to the prefill step only.
IMAGE_INPUT_NAMES = ("pixel_values", "patch_pixel_values", "num_patches", "patch_newline_mask")


class Step3VisionEmbeddings(nn.Module):
    """Patch embedding + class token + learned positions (bicubically resized for views other than 728px)."""

    def __init__(self, config: Step3VisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.empty(1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=True
        )
        self.position_embedding = nn.Embedding(self.grid * self.grid + 1, self.embed_dim)

    def patch_positions(self, grid: int) -> torch.Tensor:
        """`[grid * grid, D]` position embeddings of a `grid x grid` patch view: the learned 52x52 table, resized
        (bicubic, antialiased, in at least float32 as the public implementations do) when the view differs."""
        table = self.position_embedding.weight[1:]
        if grid == self.grid:
            return table
        dtype = table.dtype
        table = table.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        table = table.to(torch.promote_types(dtype, torch.float32))
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
        return table.to(dtype).permute(0, 2, 3, 1).reshape(grid * grid, -1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        if height != width or height % self.patch_size != 0:
            raise ValueError(
                f"`pixel_values` must be square views whose side is a multiple of {self.patch_size}, "
                f"got {height}x{width}"
            )
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=target_dtype)).flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding + self.position_embedding.weight[:1]
        patch_embeds = patch_embeds + self.patch_positions(height // self.patch_size)
        class_embeds = class_embeds.expand(batch, NUM_CLASS_TOKENS, -1)
        return torch.cat([class_embeds, patch_embeds], dim=1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    # At least float32 for the softmax (float64 stays float64).
    softmax_dtype = torch.promote_types(attn_weights.dtype, torch.float32)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=softmax_dtype).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class Step3VisionAttention(nn.Module):
    """Bidirectional multi-head attention with one fused, biased `qkv_proj` (rows: q, then k, then v)."""

    def __init__(self, config: Step3VisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=True)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=True)

    def forward(
        self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        query = query.reshape(hidden_shape).transpose(1, 2)
        key = key.reshape(hidden_shape).transpose(1, 2)
        value = value.reshape(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, None, scaling=self.scaling, dropout=0.0, is_causal=False, **kwargs
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class Step3VisionMLP(nn.Module):
    def __init__(self, config: Step3VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class Step3VisionEncoderLayer(GradientCheckpointingLayer):
    """`h = h + LN1(attn(h)); h = h + LN2(mlp(h))`: each norm sits after its sub-layer, inside the residual."""

    def __init__(self, config: Step3VisionConfig):
        super().__init__()
        self.self_attn = Step3VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Step3VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attn_output, _ = self.self_attn(hidden_states, **kwargs)
        hidden_states = hidden_states + self.layer_norm1(attn_output)
        return hidden_states + self.layer_norm2(self.mlp(hidden_states))


class Step3VisionEncoder(nn.Module):
    def __init__(self, config: Step3VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Step3VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        return hidden_states


class Step3VisionPreTrainedModel(PreTrainedModel):
    config: Step3VisionConfig
    config_class = Step3VisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Step3VisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Step3VisionEmbeddings):
            init.normal_(module.class_embedding, mean=0.0, std=self.config.initializer_range)


class Step3VisionModel(Step3VisionPreTrainedModel):
    """The ViT (`vision_model.*`): no pre- or post-norm; returns the four class tokens followed by the patches."""

    def __init__(self, config: Step3VisionConfig):
        super().__init__(config)
        self.embeddings = Step3VisionEmbeddings(config)
        self.transformer = Step3VisionEncoder(config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutput:
        hidden_states = self.transformer(self.embeddings(pixel_values), **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)


class Step3VLPreTrainedModel(Step3PreTrainedModel):
    config: Step3VLConfig
    config_class = Step3VLConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["Step3DecoderLayer", "Step3VisionEncoderLayer"]
    # Every tensor of the official VL checkpoint has a home here: nothing is skipped.
    _keys_to_ignore_on_load_unexpected = None


class Step3VLForConditionalGeneration(Step3VLPreTrainedModel, Step3ForCausalLM):
    """Step-3 with its vision encoder: images become language-model embeddings at their image-patch tokens.

    Per image the processor gives one 728px global view (`pixel_values`) and `num_patches` 504px crops
    (`patch_pixel_values`, all images' crops in order); the prompt holds, per image, the crops' feature tokens
    (81 each) and then the global view's (169), all `image_token_id`, wrapped in the marker tokens of the chat format.
    """

    def __init__(self, config: Step3VLConfig):
        super().__init__(config)  # the language model and its head, from `config.text_config`
        vision_config = config.vision_config
        text_hidden = config.get_text_config().hidden_size
        self.vision_model = Step3VisionModel(vision_config)
        self.vit_downsampler = nn.Conv2d(
            vision_config.hidden_size,
            vision_config.output_hidden_size,
            kernel_size=2,
            stride=config.understand_projector_stride,
        )
        self.vit_downsampler2 = nn.Conv2d(
            vision_config.output_hidden_size, 2 * vision_config.output_hidden_size, kernel_size=3, stride=2, padding=1
        )
        self.vit_large_projector = nn.Linear(
            2 * vision_config.output_hidden_size, text_hidden, bias=config.projector_bias
        )
        self.post_init()
        # The language model's own list would hide unexpected vision tensors; here every one must match.
        self._keys_to_ignore_on_load_unexpected = set()

    def project_views(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """`[N, 3, S, S]` square views -> `[N, tokens, hidden]` language-model embeddings (169 tokens at S=728)."""
        patches = self.vision_model(pixel_values, **kwargs).last_hidden_state[:, NUM_CLASS_TOKENS:]
        batch, count, channels = patches.shape
        side = int(round(count**0.5))
        grid = patches.transpose(1, 2).reshape(batch, channels, side, side)
        grid = self.vit_downsampler2(self.vit_downsampler(grid))
        return self.vit_large_projector(grid.flatten(2).transpose(1, 2))

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        patch_pixel_values: torch.Tensor | None = None,
        num_patches: torch.Tensor | list[int] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> list[torch.Tensor]:
        """One `[tokens, hidden]` tensor per image: its crops' features in order, then the global view's."""
        num_images = pixel_values.shape[0]
        if num_patches is None:
            num_patches = [0] * num_images
        num_patches = [int(n) for n in (num_patches.tolist() if torch.is_tensor(num_patches) else num_patches)]
        num_crops = 0 if patch_pixel_values is None else patch_pixel_values.shape[0]
        if len(num_patches) != num_images:
            raise ValueError(
                f"`num_patches` has {len(num_patches)} entries for {num_images} images in `pixel_values`"
            )
        if sum(num_patches) != num_crops or min(num_patches, default=0) < 0:
            raise ValueError(
                f"`num_patches` {num_patches} does not add up to the {num_crops} crops in `patch_pixel_values`"
            )
        global_features = self.project_views(pixel_values, **kwargs)
        crop_features = self.project_views(patch_pixel_values, **kwargs) if num_crops else None
        features, start = [], 0
        for index, count in enumerate(num_patches):
            parts = [global_features[index]]
            if count:
                parts.insert(0, crop_features[start : start + count].flatten(0, 1))
            start += count
            features.append(torch.cat(parts))
        return features

    def get_placeholder_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`[B, S]` True at the image-patch tokens (found in `input_ids`, else by their embedding)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def merge_image_features(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: list[torch.Tensor]
    ) -> torch.Tensor:
        """Write the images' features, in order, over the embeddings of the image-patch tokens."""
        mask = self.get_placeholder_mask(input_ids, inputs_embeds)
        features = torch.cat(image_features).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(
                f"The prompt holds {int(mask.sum())} image-patch tokens (id {self.config.image_token_id}) but the "
                f"images give {features.shape[0]} feature vectors: build the prompt with the Step-3 processor, which "
                "expands each image placeholder to its crops and global view"
            )
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    @can_return_tuple
    @cache_kwarg
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        patch_pixel_values: torch.Tensor | None = None,
        num_patches: torch.Tensor | list[int] | None = None,
        patch_newline_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        # `patch_newline_mask` is accepted and unused: the prompt's `<patch_newline>` tokens already mark the rows.
        if pixel_values is None and patch_pixel_values is not None:
            raise ValueError("`patch_pixel_values` were given without `pixel_values` (the global view of each image)")
        if pixel_values is not None:
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
            if inputs_embeds is None:
                inputs_embeds = self.get_input_embeddings()(input_ids)
            image_features = self.get_image_features(pixel_values, patch_pixel_values, num_patches)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            input_ids = None
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # Beam search and `num_return_sequences` repeat every prompt; the image inputs are listed per image and per
        # crop, not per prompt, so each prompt's images are repeated with it instead of row by row.
        images = {name: model_kwargs.pop(name) for name in IMAGE_INPUT_NAMES if model_kwargs.get(name) is not None}
        if expand_size > 1 and "pixel_values" in images:
            images = self._repeat_images_per_prompt(input_ids, images, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        model_kwargs.update(images)
        return input_ids, model_kwargs

    def _repeat_images_per_prompt(self, input_ids: torch.LongTensor | None, images: dict, times: int) -> dict:
        """The image inputs of `input_ids`' prompts, each prompt's images repeated `times` times in place."""
        if input_ids is None:
            raise ValueError("generating several sequences per prompt with images needs `input_ids`")
        pixel_values = images["pixel_values"]
        num_patches = images.get("num_patches")
        num_patches = [0] * pixel_values.shape[0] if num_patches is None else [int(n) for n in num_patches]
        per_view = image_feature_tokens(self.config, pixel_values.shape[-1])
        per_crop = image_feature_tokens(self.config, images["patch_pixel_values"].shape[-1]) if sum(num_patches) else 0
        crop_starts = [sum(num_patches[:i]) for i in range(len(num_patches))]
        image_index, crop_index, next_image = [], [], 0
        for row_tokens in (input_ids == self.config.image_token_id).sum(-1).tolist():
            row_images = []
            while row_tokens > 0 and next_image < len(num_patches):
                row_tokens -= per_view + per_crop * num_patches[next_image]
                row_images.append(next_image)
                next_image += 1
            if row_tokens != 0:
                raise ValueError("the prompts' image-patch tokens do not match the images given (`num_patches`)")
            for _ in range(times):
                image_index += row_images
                for i in row_images:
                    crop_index += range(crop_starts[i], crop_starts[i] + num_patches[i])
        repeated = dict(images)
        repeated["pixel_values"] = pixel_values[image_index]
        repeated["num_patches"] = torch.tensor([num_patches[i] for i in image_index], dtype=torch.long)
        for name in ("patch_pixel_values", "patch_newline_mask"):
            if name in images:
                repeated[name] = images[name][crop_index]
        return repeated

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # The images are encoded once, in the prefill; later steps read them from the cache.
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in IMAGE_INPUT_NAMES:
                model_inputs.pop(name, None)
        return model_inputs


__all__ = [
    "Step3VisionPreTrainedModel",
    "Step3VisionModel",
    "Step3VLPreTrainedModel",
    "Step3VLForConditionalGeneration",
]
