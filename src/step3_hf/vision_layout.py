"""The vision side of the official `step3_vl` checkpoint: every tensor's name and shape, and the token counts of an
image, derived from a config alone.

Written independently of the modules in `modeling_step3_vl.py`, so that tests and the inspection CLI can check a
model or a checkpoint against it. Layout (as loaded by vLLM's and SGLang's `step3_vl.py`):

    vision_model.embeddings.{class_embedding [1, D], patch_embedding (Conv2d 3->D, k=p, s=p, bias),
                             position_embedding [(S/p)^2 + 1, D]}
    vision_model.transformer.layers.{i}.{self_attn.qkv_proj [3D, D], self_attn.out_proj [D, D],
                                         layer_norm1, mlp.fc1 [I, D], mlp.fc2 [D, I], layer_norm2}   (all biased)
    vit_downsampler   Conv2d D -> O,   kernel 2, stride `understand_projector_stride`
    vit_downsampler2  Conv2d O -> 2O,  kernel 3, stride 2, padding 1
    vit_large_projector  Linear 2O -> text hidden size (bias only with `projector_bias`)
"""

from __future__ import annotations

import math

from .configuration_step3 import Step3VLConfig

VISION_TENSOR_PREFIXES = ("vision_model.", "vit_downsampler.", "vit_downsampler2.", "vit_large_projector.")


def official_vision_tensor_shapes(config: Step3VLConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every vision tensor of a `step3_vl` checkpoint (official names)."""
    vision = config.vision_config
    d, i, o = vision.hidden_size, vision.intermediate_size, vision.output_hidden_size
    grid = vision.image_size // vision.patch_size
    p = "vision_model.embeddings."
    shapes: dict[str, tuple[int, ...]] = {
        p + "class_embedding": (1, d),
        p + "patch_embedding.weight": (d, vision.num_channels, vision.patch_size, vision.patch_size),
        p + "patch_embedding.bias": (d,),
        p + "position_embedding.weight": (grid * grid + 1, d),
    }
    for layer in range(vision.num_hidden_layers):
        p = f"vision_model.transformer.layers.{layer}."
        for name, (out_features, in_features) in {
            "self_attn.qkv_proj": (3 * d, d),
            "self_attn.out_proj": (d, d),
            "mlp.fc1": (i, d),
            "mlp.fc2": (d, i),
        }.items():
            shapes[f"{p}{name}.weight"] = (out_features, in_features)
            shapes[f"{p}{name}.bias"] = (out_features,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = (d,)
            shapes[f"{p}{norm}.bias"] = (d,)
    shapes["vit_downsampler.weight"] = (o, d, 2, 2)
    shapes["vit_downsampler.bias"] = (o,)
    shapes["vit_downsampler2.weight"] = (2 * o, o, 3, 3)
    shapes["vit_downsampler2.bias"] = (2 * o,)
    shapes["vit_large_projector.weight"] = (config.text_config.hidden_size, 2 * o)
    if config.projector_bias:
        shapes["vit_large_projector.bias"] = (config.text_config.hidden_size,)
    return shapes


def count_vision_parameters(config: Step3VLConfig) -> int:
    """Parameters of the vision tower, both downsamplers and the projector (1.90B for the release)."""
    return sum(math.prod(shape) for shape in official_vision_tensor_shapes(config).values())


def image_feature_tokens(config: Step3VLConfig, image_size: int) -> int:
    """Language-model tokens one square view of `image_size` pixels becomes: 169 for the 728 global view, 81 for a
    504 crop. The ViT makes `image_size / patch` patches a side, `vit_downsampler` (k=2) and `vit_downsampler2`
    (k=3, p=1, s=2) shrink that grid by their strides."""
    vision = config.vision_config
    side = image_size // vision.patch_size
    side = (side - 2) // config.understand_projector_stride + 1
    side = (side + 2 - 3) // 2 + 1
    return side * side


__all__ = ["VISION_TENSOR_PREFIXES", "official_vision_tensor_shapes", "count_vision_parameters", "image_feature_tokens"]
