"""Step-3 image preprocessing: one 728px global view per image plus 504px crops chosen from its size and aspect.

The plan (`plan_views`) follows the public Step-3 preprocessing (vLLM / SGLang `step3_vl.py`, the hub's processor):

1. an image thinner than 32 px with an aspect beyond 4:1 is zero-padded (bottom / right) to a square;
2. an image longer than 3024 px is scaled down (sides truncated to integers) so its long side is 3024;
3. the crop window: none when the long side fits the global view (<= 728) unless the aspect exceeds 1.5 (then the
   short side); the short side, at most 504, beyond 4:1; else 504;
4. each side of at least one window is snapped to a whole number of windows (one more when the remainder exceeds
   0.2 windows), the image is resized to that canvas, and the canvas is cut row by row into windows (a window past
   a shorter side is filled with zeros).

Every view is scaled to [0, 1], normalised with the CLIP mean and std, and resized (bilinear, antialiased) to 728 (the
global view, aspect not kept) or 504 (crops). `Step3VLImageProcessorPil` does steps 1-4 with PIL exactly as the
public code does; `Step3VLImageProcessor` (the default, torchvision) does them on tensors, equal up to resampling
rounding.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_image
from transformers.processing_utils import ImagesKwargs

IMAGE_SIZE = 728
PATCH_SIZE = 504
MAX_IMAGE_SIZE = 3024


@dataclass(frozen=True)
class ViewPlan:
    """Where an image's views come from (sizes are `(width, height)`)."""

    square_pad: bool
    """Zero-pad the image to a square (bottom / right) first."""
    resized: tuple[int, int]
    """Size after the padding and the `max_image_size` cap: the image the global view is made from."""
    window: int
    """Side of a crop window; 0 when the image gets no crops."""
    canvas: tuple[int, int]
    """Size the image is resized to before the crops are cut."""
    boxes: tuple[tuple[int, int, int, int], ...]
    """Crop windows on the canvas as `(left, top, right, bottom)`, row by row."""
    columns: int
    """Crops per row."""

    @property
    def num_crops(self) -> int:
        return len(self.boxes)

    @property
    def newline_mask(self) -> list[bool]:
        """True after the last crop of every row but the last: where the prompt puts `<patch_newline>`."""
        last = len(self.boxes) - 1
        return [(i + 1) % self.columns == 0 and i != last for i in range(len(self.boxes))]


def _window_size(long_side: int, short_side: int, image_size: int, patch_size: int) -> int:
    if long_side <= image_size:
        return short_side if long_side / short_side > 1.5 else 0
    return min(short_side, patch_size) if long_side / short_side > 4 else patch_size


def _snap(side: int, window: int) -> int:
    """A side of at least one window becomes a whole number of windows, rounded up past 0.2 of a window."""
    ratio = side / window
    if ratio < 1:
        return side
    whole = int(ratio)
    return window * (whole + 1 if ratio - side // window > 0.2 else whole)


def _starts(side: int, window: int) -> list[int]:
    count = 1 if side <= window else math.ceil((side - window) / window + 1)
    starts = [window * i for i in range(count)]
    if len(starts) > 1 and starts[-1] + window > side:
        starts[-1] = side - window
    return starts


def plan_views(
    width: int,
    height: int,
    *,
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    max_image_size: int = MAX_IMAGE_SIZE,
) -> ViewPlan:
    """The views of a `width x height` image (see the module docstring)."""
    if width < 1 or height < 1:
        raise ValueError(f"an image must have positive width and height, got {width}x{height}")
    square_pad = min(width, height) < 32 and (width / height > 4 or width / height < 1 / 4)
    if square_pad:
        width = height = max(width, height)
    if max(width, height) > max_image_size:
        scale = max_image_size / max(width, height)
        width, height = int(width * scale), int(height * scale)
    if min(width, height) < 1:
        raise ValueError(f"an image of {width}x{height} after scaling to at most {max_image_size} px is empty")
    window = _window_size(max(width, height), min(width, height), image_size, patch_size)
    if window == 0:
        return ViewPlan(square_pad, (width, height), 0, (width, height), (), 1)
    canvas = (_snap(width, window), _snap(height, window))
    xs, ys = _starts(canvas[0], window), _starts(canvas[1], window)
    boxes = tuple((x, y, x + window, y + window) for y in ys for x in xs)
    return ViewPlan(square_pad, (width, height), window, canvas, boxes, len(xs))


class Step3VLImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    patch_size (`int`, *optional*, defaults to 504):
        Side of the crops given to the model.
    max_image_size (`int`, *optional*, defaults to 3024):
        Longer images are scaled down to this long side before the crops are planned.
    """

    patch_size: int
    max_image_size: int


class _Step3VLImageProcessorMixin:
    """What both backends share: defaults, kwargs, the plan, normalisation and the output."""

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    patch_size: int = PATCH_SIZE
    max_image_size: int = MAX_IMAGE_SIZE
    resample = 2  # PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_convert_rgb = True
    valid_kwargs = Step3VLImageProcessorKwargs
    model_input_names = ["pixel_values", "patch_pixel_values", "num_patches", "patch_newline_mask"]

    @property
    def image_size(self) -> int:
        size = self.size
        height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        if height != width:
            raise ValueError(f"`size` must be square (Step-3's global view is {IMAGE_SIZE} x {IMAGE_SIZE}), got {size}")
        return int(height)

    def plan(self, width: int, height: int) -> ViewPlan:
        return plan_views(
            width, height, image_size=self.image_size, patch_size=self.patch_size, max_image_size=self.max_image_size
        )

    def _finish_view(self, views: torch.Tensor, side: int) -> torch.Tensor:
        """uint8 `[N, 3, h, w]` -> normalised float32 `[N, 3, side, side]` (normalise, then resize, as the public
        code does; both are linear, so the order only moves rounding)."""
        views = views.to(torch.float32)
        if self.do_rescale:
            views = views * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(1, -1, 1, 1)
            views = (views - mean) / std
        if views.shape[-2:] != (side, side):
            views = F.interpolate(views, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        return views

    def _check_kwargs(self, kwargs: dict) -> None:
        unknown = set(kwargs) - set(self.valid_kwargs.__annotations__) - {"return_tensors", "device"}
        if unknown:
            raise ValueError(f"{type(self).__name__} got unknown arguments: {', '.join(sorted(unknown))}")

    def preprocess(self, images, **kwargs) -> BatchFeature:
        """Views of a list of images: `pixel_values [N, 3, 728, 728]`, `patch_pixel_values [M, 3, 504, 504]` (all
        crops, image by image), `num_patches [N]` and `patch_newline_mask [M]`."""
        self._check_kwargs(kwargs)
        kwargs.pop("return_tensors", None)
        kwargs.pop("device", None)
        processor = copy.copy(self)  # per-call overrides leave the processor itself unchanged
        for name, value in kwargs.items():
            setattr(processor, name, value)
        if images is None:
            raise ValueError("`images` must be an image or a list of images, got None")
        if not isinstance(images, (list, tuple)):
            images = [images]
        flat = [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
        if not flat:
            raise ValueError("`images` is empty")
        global_views, crop_views, num_patches, newline_mask = [], [], [], []
        for image in flat:
            uint8 = processor._to_uint8_tensor(image)
            plan = processor.plan(uint8.shape[-1], uint8.shape[-2])
            view, crops = processor._cut_views(uint8, plan)
            global_views.append(processor._finish_view(view[None], processor.image_size))
            if plan.num_crops:
                crop_views.append(processor._finish_view(crops, processor.patch_size))
            num_patches.append(plan.num_crops)
            newline_mask += plan.newline_mask
        side = processor.patch_size
        return BatchFeature(
            {
                "pixel_values": torch.cat(global_views),
                "patch_pixel_values": torch.cat(crop_views) if crop_views else torch.zeros(0, 3, side, side),
                "num_patches": torch.tensor(num_patches, dtype=torch.long),
                "patch_newline_mask": torch.tensor(newline_mask, dtype=torch.bool),
            }
        )

    def _to_uint8_tensor(self, image) -> torch.Tensor:
        """A PIL image, a URL, path or base64 string (read as transformers' `load_image` reads it, as other image
        processors do), or an RGB uint8 array / tensor (`HWC` or `CHW`), as a uint8 `[3, H, W]` tensor."""
        if isinstance(image, str):
            image = load_image(image)
        if isinstance(image, Image.Image):
            image = image.convert("RGB") if self.do_convert_rgb else image
            return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        tensor = torch.as_tensor(np.asarray(image)) if not torch.is_tensor(image) else image.cpu()
        if tensor.dtype != torch.uint8:
            raise ValueError(
                "images must be PIL images or uint8 arrays / tensors (0-255), "
                f"got a {tensor.dtype} {type(image).__name__}"
            )
        if tensor.ndim == 2:
            tensor = tensor[None].expand(3, -1, -1)
        if tensor.ndim != 3 or (tensor.shape[0] not in (1, 3) and tensor.shape[-1] not in (1, 3)):
            raise ValueError(f"an image array must be HWC or CHW with 1 or 3 channels, got shape {tuple(tensor.shape)}")
        if tensor.shape[0] not in (1, 3):
            tensor = tensor.permute(2, 0, 1)
        return tensor.expand(3, -1, -1).contiguous()


class Step3VLImageProcessor(_Step3VLImageProcessorMixin, TorchvisionBackend):
    """Step-3 image processor, torchvision backend (the default): padding, resizing and cropping on tensors."""

    def _resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvF

        width, height = size
        if image.shape[-2:] == (height, width):
            return image
        return tvF.resize(image, [height, width], interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)

    def _cut_views(self, image: torch.Tensor, plan: ViewPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        if plan.square_pad:
            side = max(image.shape[-2:])
            image = F.pad(image, (0, side - image.shape[-1], 0, side - image.shape[-2]))
        image = self._resize(image, plan.resized)
        if not plan.num_crops:
            return image, None
        canvas = self._resize(image, plan.canvas)
        right = max(box[2] for box in plan.boxes)
        bottom = max(box[3] for box in plan.boxes)
        canvas = F.pad(canvas, (0, max(0, right - canvas.shape[-1]), 0, max(0, bottom - canvas.shape[-2])))
        crops = torch.stack([canvas[:, top:bottom, left:right] for left, top, right, bottom in plan.boxes])
        return image, crops


class Step3VLImageProcessorPil(_Step3VLImageProcessorMixin, PilBackend):
    """Step-3 image processor, PIL backend: padding, resizing and cropping with PIL, as the public code does."""

    def _cut_views(self, image: torch.Tensor, plan: ViewPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        if plan.square_pad:
            side = max(pil.size)
            padded = Image.new(pil.mode, (side, side), 0)
            padded.paste(pil, (0, 0))
            pil = padded
        pil = pil.resize(plan.resized, Image.Resampling.BILINEAR)
        view = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        if not plan.num_crops:
            return view, None
        canvas = pil if pil.size == plan.canvas else pil.resize(plan.canvas, Image.Resampling.BILINEAR)
        crops = [torch.from_numpy(np.array(canvas.crop(box))).permute(2, 0, 1) for box in plan.boxes]
        return view, torch.stack(crops)


__all__ = ["ViewPlan", "plan_views", "Step3VLImageProcessor", "Step3VLImageProcessorPil"]
