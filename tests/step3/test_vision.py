"""The Step-3 vision side: a float64 reference of the ViT, downsamplers and projector, the official tensor layout,
load / save round trips, and the placement of image features at the image tokens."""

import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

import step3_hf  # noqa: F401
from step3_hf import Step3VisionConfig, Step3VLConfig, Step3VLForCausalLM, Step3VLForConditionalGeneration
from step3_hf.checkpoint_layout import official_tensor_shapes
from step3_hf.tiny_checkpoint import synthetic_corpus
from step3_hf.tiny_vl_checkpoint import write_tiny_vl_checkpoint
from step3_hf.vision_layout import count_vision_parameters, image_feature_tokens, official_vision_tensor_shapes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_vl_checkpoint(tmp_path_factory.mktemp("vl"), synthetic_corpus(100), seed=5)


def saved_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


# ---------------------------------------------------------------------------------------- float64 reference


def reference_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_conv(x, weight, bias, stride, padding=0):
    """Convolution as an explicit sum over kernel offsets: `x [B, C, H, W]`, `weight [O, C, k, k]`."""
    x = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    k = weight.shape[-1]
    out_h = (x.shape[2] - k) // stride + 1
    out_w = (x.shape[3] - k) // stride + 1
    out = torch.zeros(x.shape[0], weight.shape[0], out_h, out_w, dtype=x.dtype)
    for dy in range(k):
        for dx in range(k):
            window = x[:, :, dy : dy + stride * (out_h - 1) + 1 : stride, dx : dx + stride * (out_w - 1) + 1 : stride]
            out += torch.einsum("bchw,oc->bohw", window, weight[:, :, dy, dx])
    return out + bias.view(1, -1, 1, 1)


def reference_views(state: dict, config: Step3VLConfig, pixels: torch.Tensor, class_tokens: int = 4) -> torch.Tensor:
    """Step-3's vision path in float64, from the official tensors: ViT (4 class tokens, post-sub-layer LayerNorms
    inside the residual, quick_gelu), the two downsampling convolutions and the projector. `class_tokens` copies of
    the class token lead the sequence (4 in the official model)."""
    vision = config.vision_config
    s = {k: v.double() for k, v in state.items()}
    heads, eps, p = vision.num_attention_heads, vision.layer_norm_eps, vision.patch_size
    batch, side = pixels.shape[0], pixels.shape[-1] // p
    # Non-overlapping patches flattened in (channel, dy, dx) order: the patch embedding is a matrix product.
    patches = pixels.reshape(batch, 3, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(batch, side * side, -1)
    w = s["vision_model.embeddings.patch_embedding.weight"].reshape(vision.hidden_size, -1)
    x = patches @ w.T + s["vision_model.embeddings.patch_embedding.bias"]
    table = s["vision_model.embeddings.position_embedding.weight"]
    grid = vision.image_size // p
    positions = table[1:]
    if side != grid:  # the learned grid, bicubically resized (antialiased) to this view
        positions = positions.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        positions = torch.nn.functional.interpolate(positions, size=(side, side), mode="bicubic", antialias=True)
        positions = positions.permute(0, 2, 3, 1).reshape(side * side, -1)
    x = x + positions
    cls = s["vision_model.embeddings.class_embedding"].reshape(1, 1, -1) + table[0]
    x = torch.cat([cls.expand(batch, class_tokens, -1), x], dim=1)
    d = vision.hidden_size // heads
    for i in range(vision.num_hidden_layers):
        q_ = f"vision_model.transformer.layers.{i}."
        qkv = x @ s[q_ + "self_attn.qkv_proj.weight"].T + s[q_ + "self_attn.qkv_proj.bias"]
        q, k, v = (t.reshape(batch, -1, heads, d).transpose(1, 2) for t in qkv.split(vision.hidden_size, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        attn = torch.exp(scores - scores.amax(-1, keepdim=True))
        attn = attn / attn.sum(-1, keepdim=True)
        a = (attn @ v).transpose(1, 2).reshape(batch, -1, vision.hidden_size)
        a = a @ s[q_ + "self_attn.out_proj.weight"].T + s[q_ + "self_attn.out_proj.bias"]
        x = x + reference_layer_norm(a, s[q_ + "layer_norm1.weight"], s[q_ + "layer_norm1.bias"], eps)
        h = x @ s[q_ + "mlp.fc1.weight"].T + s[q_ + "mlp.fc1.bias"]
        h = h * torch.sigmoid(1.702 * h)
        h = h @ s[q_ + "mlp.fc2.weight"].T + s[q_ + "mlp.fc2.bias"]
        x = x + reference_layer_norm(h, s[q_ + "layer_norm2.weight"], s[q_ + "layer_norm2.bias"], eps)
    x = x[:, class_tokens:].transpose(1, 2).reshape(batch, vision.hidden_size, side, side)
    x = reference_conv(x, s["vit_downsampler.weight"], s["vit_downsampler.bias"], config.understand_projector_stride)
    x = reference_conv(x, s["vit_downsampler2.weight"], s["vit_downsampler2.bias"], 2, padding=1)
    x = x.flatten(2).transpose(1, 2)
    return x @ s["vit_large_projector.weight"].T


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("view", [168, 84], ids=["global-view", "crop"])
def test_vision_path_matches_float64_reference(checkpoint, attn_implementation, view):
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, dtype=torch.float64, attn_implementation=attn_implementation
    ).eval()
    assert model.config.vision_config._attn_implementation == attn_implementation
    config = model.config
    pixels = torch.randn(3, 3, view, view, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.project_views(pixels)
    want = reference_views(saved_tensors(checkpoint), config, pixels)
    assert got.shape == (3, image_feature_tokens(config, view), config.text_config.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # The three padding copies of the class token take part in attention: dropping them changes the result.
    assert not torch.allclose(want, reference_views(saved_tensors(checkpoint), config, pixels, class_tokens=1))


# ---------------------------------------------------------------------------------------- layout and sizes


def test_release_vision_size_and_token_counts():
    config = Step3VLConfig()
    v = config.vision_config
    d, i, layers = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (i * d + i) + (d * i + d) + 4 * d
    embeddings = d + (3 * 14 * 14 * d + d) + (52 * 52 + 1) * d
    convs = (4096 * d * 4 + 4096) + (8192 * 4096 * 9 + 8192) + 8192 * 7168
    assert count_vision_parameters(config) == layers * per_layer + embeddings + convs == 1_900_068_352
    assert image_feature_tokens(config, 728) == config.image_token_len == 169
    assert image_feature_tokens(config, 504) == config.patch_token_len == 81


def test_model_tensors_are_the_official_vision_layout(checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    assert type(model) is Step3VLForConditionalGeneration
    vision = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(("model.", "lm_head."))}
    assert vision == official_vision_tensor_shapes(model.config)
    assert sum(p.numel() for n, p in model.named_parameters() if n in vision) == count_vision_parameters(model.config)


def test_loads_every_official_tensor_and_saves_them_back(checkpoint, tmp_path):
    model, info = AutoModelForImageTextToText.from_pretrained(checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    original, saved = saved_tensors(checkpoint), saved_tensors(tmp_path)
    expected = {**official_tensor_shapes(model.config.text_config), **official_vision_tensor_shapes(model.config)}
    assert {k: tuple(v.shape) for k, v in saved.items()} == expected
    assert all(torch.equal(saved[name], original[name]) for name in original)
    written = AutoConfig.from_pretrained(tmp_path)
    assert written.architectures == ["Step3VLForConditionalGeneration"] and written.model_type == "step3_vl"
    assert written.vision_config.to_dict() == model.config.vision_config.to_dict()
    _, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_missing_or_extra_vision_tensor_is_reported(checkpoint, tmp_path):
    # transformers' loading contract (tests/step3/test_model_common.py): a tensor the checkpoint lacks is initialised
    # and reported, one the model lacks is reported, by their official names.
    import shutil

    from step3_hf.tiny_checkpoint import write_official_checkpoint

    state = saved_tensors(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    for name, change in [("missing", lambda s: s.pop("vit_downsampler2.bias")), ("extra", None)]:
        broken = dict(state)
        if change:
            change(broken)
        else:
            broken["vision_model.embeddings.extra_token"] = torch.zeros(1, 32)
        write_official_checkpoint(tmp_path / name, broken, config, with_vision=False)
        shutil.copy(checkpoint / "tokenizer.json", tmp_path / name)
        _, info = AutoModelForImageTextToText.from_pretrained(tmp_path / name, output_loading_info=True)
        if change:
            assert set(info["missing_keys"]) == {"vit_downsampler2.bias"}
            assert not info["unexpected_keys"]
        else:
            assert set(info["unexpected_keys"]) == {"vision_model.embeddings.extra_token"}
            assert not info["missing_keys"]


def test_vision_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_attention_heads"):
        Step3VisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        Step3VisionConfig(image_size=100, patch_size=14)
    with pytest.raises(ValueError, match="hidden_size"):
        Step3VisionConfig(hidden_size=0)


# ---------------------------------------------------------------------------------------- image features in the prompt


def test_image_features_replace_the_image_tokens_in_order(checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(
        checkpoint, dtype=torch.float64, experts_implementation="eager"
    ).eval()
    config = model.config
    image_id = config.image_token_id
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 168, 168, dtype=torch.float64, generator=generator)
    patch_pixel_values = torch.randn(3, 3, 84, 84, dtype=torch.float64, generator=generator)
    num_patches = torch.tensor([3, 0])
    n_global, n_crop = image_feature_tokens(config, 168), image_feature_tokens(config, 84)
    total = 3 * n_crop + 2 * n_global
    ids = torch.tensor([[5, 6] + [image_id] * total + [7, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values, patch_pixel_values=patch_pixel_values,
                       num_patches=num_patches).logits  # fmt: skip
        # By hand: image 0's three crops, then its global view, then image 1's global view.
        crops = model.project_views(patch_pixel_values).reshape(-1, config.text_config.hidden_size)
        globals_ = model.project_views(pixel_values)
        features = torch.cat([crops, globals_[0], globals_[1]])
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[0, 2 : 2 + total] = features
        want = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-12)

    with pytest.raises(ValueError, match="image-patch tokens"):
        model(input_ids=ids[:, :-3], pixel_values=pixel_values, patch_pixel_values=patch_pixel_values,
              num_patches=num_patches)  # fmt: skip
    with pytest.raises(ValueError, match="num_patches"):
        model(input_ids=ids, pixel_values=pixel_values, patch_pixel_values=patch_pixel_values, num_patches=[2, 0])


def test_text_only_prompts_match_the_language_model(checkpoint):
    vl = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    text = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert type(text) is Step3VLForCausalLM
    ids = torch.tensor([[1, 5, 9, 20, 31, 7]])
    with torch.no_grad():
        torch.testing.assert_close(vl(input_ids=ids).logits, text(input_ids=ids).logits, rtol=0, atol=0)


def test_vision_trains_with_and_without_gradient_checkpointing(checkpoint):
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, experts_implementation="eager")
    model.train()
    generator = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(1, 3, 168, 168, generator=generator)
    ids = torch.tensor([[5] + [model.config.image_token_id] * image_feature_tokens(model.config, 168) + [7, 8]])
    labels = ids.clone()
    labels[ids == model.config.image_token_id] = -100

    def vision_grads():
        model.zero_grad()
        model(input_ids=ids, pixel_values=pixel_values, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(("vision_model.", "vit_"))}

    plain = vision_grads()
    model.gradient_checkpointing_enable()
    assert model.vision_model.transformer.layers[0].gradient_checkpointing
    checkpointed = vision_grads()
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_inspect_counts_the_vision_parameters(checkpoint):
    # step3-inspect reads the vision tensors' headers: their parameters equal the config's arithmetic.
    from step3_hf.inspect_checkpoint import format_report, inspect_checkpoint
    from step3_hf.vision_layout import count_vision_parameters

    report = inspect_checkpoint(checkpoint)
    expected = count_vision_parameters(AutoConfig.from_pretrained(checkpoint))
    assert report.ok and report.vision_parameters == report.vision_parameters_expected == expected > 0
    assert f"holding {expected:,} parameters" in format_report(report)
