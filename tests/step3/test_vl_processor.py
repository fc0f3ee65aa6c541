"""Step-3 image preprocessing and prompt expansion against an independent transcription of the public Step-3 logic
(vLLM / SGLang `step3_vl.py`): crop plans, token counts, pixel values, saving and loading."""

from math import ceil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from transformers import AutoImageProcessor, AutoProcessor

import step3_hf  # noqa: F401
from step3_hf import Step3VLImageProcessor, Step3VLImageProcessorPil, Step3VLProcessor
from step3_hf.image_processing_step3_vl import plan_views
from step3_hf.tiny_checkpoint import synthetic_corpus
from step3_hf.tiny_vl_checkpoint import write_tiny_vl_checkpoint

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# (width, height): square, small, wide, tall, very wide, thin strips, huge, just past the 0.2 snapping threshold.
SIZES = [
    (728, 728), (300, 200), (100, 160), (1000, 500), (800, 300), (500, 1200), (1200, 1000), (3000, 200),
    (2000, 2000), (4000, 3000), (20, 200), (300, 25), (6000, 100), (1109, 504), (1108, 504), (729, 729),
]  # fmt: skip


def official_plan(width, height):
    """The public Step-3 crop logic, transcribed: returns (padded, resized size, window, crop canvas, boxes, columns,
    newline flags)."""
    padded = False
    if min(width, height) < 32 and (width / height > 4 or width / height < 1 / 4):
        width = height = max(width, height)
        padded = True
    if max(width, height) > 3024:
        factor = 3024 / max(width, height)
        width, height = int(width * factor), int(height * factor)
    long, short = max(width, height), min(width, height)
    if long <= 728:
        window = short if long / short > 1.5 else 0
    else:
        window = min(short, 504) if long / short > 4 else 504
    if window == 0:
        return padded, (width, height), 0, (width, height), [], 1, []

    def snapped(side):
        if side / window < 1:
            return side
        decimal = side / window - side // window
        return window * (int(side / window) + 1 if decimal > 0.2 else int(side / window))

    canvas_w, canvas_h = snapped(width), snapped(height)
    x_num = 1 if canvas_w <= window else ceil((canvas_w - window) / window + 1)
    y_num = 1 if canvas_h <= window else ceil((canvas_h - window) / window + 1)
    xs = [window * i for i in range(x_num)]
    ys = [window * i for i in range(y_num)]
    if len(xs) > 1 and xs[-1] + window > canvas_w:
        xs[-1] = canvas_w - window
    if len(ys) > 1 and ys[-1] + window > canvas_h:
        ys[-1] = canvas_h - window
    boxes = [(x, y, x + window, y + window) for y in ys for x in xs]
    newlines = [i for i in range(len(boxes)) if (i + 1) % x_num == 0]
    if newlines and newlines[-1] == len(boxes) - 1:
        newlines.pop()
    flags = [i in newlines for i in range(len(boxes))]
    return padded, (width, height), window, (canvas_w, canvas_h), boxes, x_num, flags


def official_pixels(image: Image.Image):
    """The public pipeline: PIL pad / resize / crop, then torchvision ToTensor, Normalize, Resize (bilinear)."""
    padded, resized, window, canvas, boxes, _, _ = official_plan(*image.size)
    if padded:
        side = max(image.size)
        square = Image.new(image.mode, (side, side), 0)
        square.paste(image, (0, 0))
        image = square
    image = image.resize(resized, Image.Resampling.BILINEAR)

    def pipeline(size):
        return transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize(CLIP_MEAN, CLIP_STD),
                transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            ]
        )

    global_view = pipeline(728)(image)[None]
    crop_source = image.resize(canvas, Image.Resampling.BILINEAR) if canvas != image.size else image
    crops = [pipeline(504)(crop_source.crop(box)) for box in boxes]
    return global_view, torch.stack(crops) if crops else torch.zeros(0, 3, 504, 504)


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_crop_plan_matches_the_official_logic(size):
    padded, resized, window, canvas, boxes, columns, newlines = official_plan(*size)
    plan = plan_views(*size)
    assert (plan.square_pad, plan.resized, plan.window, plan.canvas) == (padded, resized, window, canvas)
    assert list(plan.boxes) == boxes and plan.columns == columns and plan.newline_mask == newlines


def test_the_sizes_cover_every_branch():
    plans = [official_plan(*size) for size in SIZES]
    assert any(p[0] for p in plans)  # square padding
    assert any(p[1] != size for p, size in zip(plans, SIZES))  # the 3024 cap
    assert {p[2] for p in plans} >= {0, 504} and any(0 < p[2] < 504 for p in plans)  # every kind of window
    assert any(p[3][1] < p[2] for p in plans)  # a crop past a short side (zero-filled)
    assert any(sum(p[6]) > 1 for p in plans)  # several rows


@pytest.mark.parametrize("size", [(300, 200), (1000, 500), (800, 300), (20, 200), (1200, 1000)])
def test_pil_backend_gives_the_official_pixels(size):
    image = random_image(*size)
    want_global, want_crops = official_pixels(image)
    out = Step3VLImageProcessorPil()(image)
    torch.testing.assert_close(out["pixel_values"], want_global, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["patch_pixel_values"], want_crops, rtol=0, atol=1e-5)
    # The torchvision backend rounds its uint8 resampling a little differently: a few pixels are two intensity
    # levels off, on average far less than one.
    fast = Step3VLImageProcessor()(image)
    level = 1 / 255 / min(CLIP_STD)
    for name, want in (("pixel_values", want_global), ("patch_pixel_values", want_crops)):
        assert fast[name].shape == want.shape
        error = (fast[name] - want).abs().flatten()
        assert error.numel() == 0 or (error.max() <= 2.5 * level and error.mean() <= 0.1 * level), name
    assert torch.equal(fast["num_patches"], out["num_patches"])


def test_normalisation_constants():
    value = np.array([10, 128, 250], dtype=np.uint8)
    image = Image.fromarray(np.broadcast_to(value, (728, 728, 3)).copy())
    for backend in (Step3VLImageProcessor(), Step3VLImageProcessorPil()):
        pixels = backend(image)["pixel_values"][0]
        want = (torch.tensor(value / 255.0) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        torch.testing.assert_close(pixels, want.float().view(3, 1, 1).expand(3, 728, 728), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    path = write_tiny_vl_checkpoint(tmp_path_factory.mktemp("proc"), synthetic_corpus(100), official_geometry=True)
    return AutoProcessor.from_pretrained(path)


def test_prompt_tokens_follow_the_official_format(processor):
    sizes = [(300, 200), (1000, 500), (500, 1200), (728, 728)]
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = ["a <im_patch> b <im_patch>", "<im_patch> c", "d <im_patch>"]
    out = processor(images=images, text=text)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(name) for name in
           ["<im_patch>", "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>"]}  # fmt: skip
    plans = [official_plan(w, h) for w, h in sizes]
    num_crops = [len(p[4]) for p in plans]
    assert out["num_patches"].tolist() == num_crops
    assert out["pixel_values"].shape == (4, 3, 728, 728)
    assert out["patch_pixel_values"].shape == (sum(num_crops), 3, 504, 504)
    per_prompt = [[0, 1], [2], [3]]
    for row, images_here in zip(out["input_ids"], per_prompt):
        count = lambda name: row.count(ids[name])  # noqa: E731
        crops = sum(num_crops[i] for i in images_here)
        assert count("<im_patch>") == 169 * len(images_here) + 81 * crops
        assert count("<im_start>") == count("<im_end>") == len(images_here)
        assert count("<patch_start>") == count("<patch_end>") == crops
        assert count("<patch_newline>") == sum(sum(plans[i][6]) for i in images_here)
    # The official token count formula (vLLM's `get_num_image_tokens`): crops * (81 + 2) + 169 + 2 + newlines.
    for (w, h), plan in zip(sizes, plans):
        assert processor.num_image_tokens(w, h) == len(plan[4]) * 83 + 171 + sum(plan[6])
    # Layout of one image with crops: each crop wrapped in patch markers, rows ended by newlines, global view last.
    one_image = processor(images=images[1:2], text="<im_patch>")["input_ids"][0]
    expansion = processor.tokenizer.convert_ids_to_tokens(one_image)
    joined = "".join(t for t in expansion if t.startswith("<") and t != "<im_patch>")
    want = "".join("<patch_start><patch_end>" + ("<patch_newline>" if nl else "") for nl in plans[1][6])
    assert joined.endswith(want + "<im_start><im_end>")


def test_chat_template_puts_one_placeholder_per_image(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "the cat"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<im_patch>") == 1
    out = processor(images=[random_image(300, 200)], text=text)
    assert out["input_ids"][0].count(processor.image_token_id) == 169 + 81 * len(official_plan(300, 200)[4])


def test_processor_errors_name_the_problem(processor):
    with pytest.raises(ValueError, match="2 image placeholder"):
        processor(images=[random_image(100, 100)], text="<im_patch><im_patch>")
    with pytest.raises(ValueError, match="no `images`"):
        processor(text="<im_patch>")
    with pytest.raises(ValueError, match="uint8"):
        processor.image_processor(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown arguments: colour"):
        processor.image_processor(random_image(10, 10), colour="red")


def test_processors_save_and_load_through_the_auto_classes(processor, tmp_path):
    processor.image_processor.patch_size = 448
    processor.save_pretrained(tmp_path)
    processor.image_processor.patch_size = 504
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is Step3VLProcessor and type(loaded.image_processor) is Step3VLImageProcessor
    assert loaded.image_processor.patch_size == 448 and loaded.num_image_feature_tokens == 169
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(pil) is Step3VLImageProcessorPil and pil.patch_size == 448
    assert pil(random_image(1000, 500))["patch_pixel_values"].shape[-1] == 448
