"""Step-3's block-FP8 checkpoint format (the `stepfun-ai/step3-fp8` release): which tensors it quantizes, the tile
math, and writing it, tensor by tensor.

The format is DeepSeek-V3's, which transformers' fine-grained FP8 support reads: each quantized weight `X.weight`
(`[out, in]`, fused experts `[E, out, in]`) is stored as float8 e4m3 beside `X.weight_scale_inv`, float32 of shape
`[..., ceil(out/b0), ceil(in/b1)]`, and the weight is `weight * scale_inv` tile by tile (tiles at the right and bottom
edges may be partial). `config.json` carries `quantization_config = {"quant_method": "fp8", "activation_scheme":
"dynamic", "fmt": "e4m3", "weight_block_size": [b0, b1]}`. What stays in bf16 is the data in `UNQUANTIZED`.

`quantize_checkpoint(src, dst)` (command `step3-quantize-fp8`) turns a bf16 Step-3 checkpoint into that layout,
reading and writing one tensor at a time; `save_fp8_pretrained` writes a loaded model back in it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from transformers.utils import logging

from .checkpoint_layout import VISION_PREFIXES, is_vision_tensor, official_names, official_tensor_shapes
from .configuration_step3 import Step3Config

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "SCALE_SUFFIX",
    "UNQUANTIZED",
    "Fp8LayoutError",
    "dequantize_block_fp8",
    "fp8_block_size",
    "fp8_quantization_config",
    "fp8_tensor_shapes",
    "is_quantized_weight",
    "quantize_block_fp8",
    "quantize_checkpoint",
    "quantize_experts_into",
    "quantize_model",
    "quantize_state_dict",
    "save_fp8_weights",
]

logger = logging.get_logger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
DEFAULT_BLOCK_SIZE = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # `X.weight` -> `X.weight_scale_inv`
# Bytes per shard when the writer splits a checkpoint (transformers' default `max_shard_size` is 50GB in v5;
# the release's shards are ~5 GB).
DEFAULT_SHARD_BYTES = 5 * 10**9

# Official names (fnmatch) of the language-model tensors kept in bf16, and why. The public Step-3 loaders (vLLM
# `step3_text.py`, SGLang `step3_vl.py`) build the router without a quantization config and quantize every other
# linear of the decoder; embeddings, head and norms are not linears. The vision tower is not quantized (its loader
# passes no quantization config either). See docs/step3.md, "FP8", for what could and could not be verified.
# Patterns start with `*` so that they also match the base model's names (no `model.` prefix).
UNQUANTIZED: dict[str, str] = {
    "*embed_tokens.weight": "embedding table",
    "lm_head.weight": "LM head",
    "*norm.weight": "RMSNorm weights (input, post-attention, query inter_norm, final)",
    "*layers.*.moe.gate.weight": "MoE router",
}
# The same, as module names for transformers' `quantization_config.modules_to_not_convert` (vision tower included).
MODULES_NOT_CONVERTED = ["lm_head", "model.embed_tokens", *[p.rstrip(".") for p in VISION_PREFIXES]]


class Fp8LayoutError(ValueError):
    """A tensor, scale or option that the block-FP8 layout cannot hold; the message names it."""


def is_quantized_weight(name: str) -> bool:
    """Whether the official tensor `name` of the language model is stored as float8 in the FP8 layout."""
    if is_vision_tensor(name) or not name.endswith(".weight"):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in UNQUANTIZED)


def scale_shape(shape: tuple[int, ...], block_size: tuple[int, int]) -> tuple[int, ...]:
    """Shape of `weight_scale_inv` for a weight of `shape` (`[..., out, in]`)."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block_size[0]), math.ceil(cols / block_size[1]))


def fp8_tensor_shapes(config: Step3Config, block_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every language-model tensor of the FP8 layout (weights, then their scales interleaved)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in official_tensor_shapes(config).items():
        shapes[name] = shape
        if is_quantized_weight(name):
            shapes[name + SCALE_SUFFIX] = scale_shape(shape, block_size)
    return shapes


def fp8_block_size(config) -> tuple[int, int] | None:
    """The `weight_block_size` of a config's FP8 `quantization_config`, or None for an unquantized config.

    Raises `Fp8LayoutError` for a quantization config this package cannot read (another method, no block size)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    quantization = getattr(config, "quantization_config", None) or getattr(text, "quantization_config", None)
    if quantization is None:
        return None
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    method = quantization.get("quant_method")
    if method != "fp8":
        raise Fp8LayoutError(f"quantization_config.quant_method is {method!r}; Step-3 reads only 'fp8' (block FP8)")
    if quantization.get("fmt", "e4m3") != "e4m3":
        raise Fp8LayoutError(f"quantization_config.fmt is {quantization.get('fmt')!r}; the release uses 'e4m3'")
    block = quantization.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise Fp8LayoutError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
    return tuple(block)


def fp8_quantization_config(block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE) -> dict:
    """The `quantization_config` written into `config.json` (the release's keys, plus the bf16 module list)."""
    return {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block_size),
        "modules_to_not_convert": list(MODULES_NOT_CONVERTED),
    }


# ------------------------------------------------------------------------------------------------ tile math


def _tiles(tensor: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """`[..., R, C]` zero-padded to whole tiles and viewed as `[..., R/b0, b0, C/b1, b1]`."""
    *lead, rows, cols = tensor.shape
    b0, b1 = block_size
    pad_rows, pad_cols = -rows % b0, -cols % b1
    if pad_rows or pad_cols:
        tensor = torch.nn.functional.pad(tensor, (0, pad_cols, 0, pad_rows))
    return tensor.reshape(*lead, (rows + pad_rows) // b0, b0, (cols + pad_cols) // b1, b1)


def _expand(scale: torch.Tensor, shape: tuple[int, ...], block_size: tuple[int, int]) -> torch.Tensor:
    """Per-tile `scale` repeated over each tile's elements and cropped to `shape` (partial edge tiles)."""
    rows, cols = shape[-2:]
    expanded = scale.repeat_interleave(block_size[0], dim=-2).repeat_interleave(block_size[1], dim=-1)
    return expanded[..., :rows, :cols]


def quantize_block_fp8(
    weight: torch.Tensor, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(float8_e4m3fn weight, float32 weight_scale_inv)` of a `[..., out, in]` weight, one scale per tile.

    Each tile's largest magnitude maps to the largest e4m3 value (448); an all-zero tile gets scale 1. Raises
    `Fp8LayoutError` for a non-finite weight: no scale represents it."""
    if weight.dim() < 2:
        raise Fp8LayoutError(f"a weight to quantize needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    if weight.dim() > 2 and weight.shape[0] > 1:  # stacked experts: float32 temporaries of one matrix at a time
        pairs = [quantize_block_fp8(matrix, block_size) for matrix in weight]
        return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])
    weight = weight.to(torch.float32)
    if not bool(torch.isfinite(weight).all()):
        raise Fp8LayoutError("the weight holds NaN or Inf; block FP8 cannot represent it")
    amax = _tiles(weight.abs(), block_size).amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (weight / _expand(scale, weight.shape, block_size)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized, scale


def quantize_experts_into(
    fp8_experts: torch.nn.Module, experts: torch.nn.Module, block_size: tuple[int, int]
) -> None:
    """Set `fp8_experts` (an `FP8Experts`) to `experts`' fused `gate_up_proj` and `down_proj` in block FP8: float8
    weights and float32 scales, frozen."""
    for param in ("gate_up_proj", "down_proj"):
        weight, scale = quantize_block_fp8(getattr(experts, param).detach(), block_size)
        setattr(fp8_experts, param, torch.nn.Parameter(weight, requires_grad=False))
        setattr(fp8_experts, param + SCALE_SUFFIX, torch.nn.Parameter(scale, requires_grad=False))


def dequantize_block_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """`weight * scale_inv` tile by tile, cast to `dtype` (computed in float64 by default: exact for float8 x
    float32, so the only rounding is the cast)."""
    expected = scale_shape(tuple(weight.shape), block_size)
    if tuple(scale_inv.shape) != expected:
        raise Fp8LayoutError(
            f"scale of shape {tuple(scale_inv.shape)} does not fit a weight of shape {tuple(weight.shape)} "
            f"with blocks {list(block_size)}: expected {expected}"
        )
    product = weight.to(compute_dtype) * _expand(scale_inv.to(compute_dtype), weight.shape, block_size)
    return product.to(dtype)


def quantize_state_dict(
    tensors: Iterable[tuple[str, torch.Tensor]],
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    reference: Callable[[str], tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Official-name tensors -> the FP8 layout's tensors, one at a time (scales right after their weight).

    A float8 weight passes through with its scale (which must follow it in `tensors`, as `save_fp8_pretrained`
    yields them). `reference(name)` may return the `(float8 weight, scale)` a weight was loaded from: when they
    dequantize to exactly the weight given, they are written back unchanged, so a load-save round trip is
    byte-identical even through a dequantized (CPU) model; a weight changed since loading is quantized afresh."""
    for name, tensor in tensors:
        if name.endswith(SCALE_SUFFIX):
            yield name, tensor.to(torch.float32)
            continue
        if not is_quantized_weight(name) or tensor.dtype == FP8_DTYPE:
            yield name, tensor
            continue
        stored = reference(name) if reference is not None else None
        if stored is not None:
            weight, scale = stored
            try:
                # transformers dequantizes in float32 before casting; float64 is exact. Either may have made `tensor`.
                same = any(
                    torch.equal(dequantize_block_fp8(weight, scale, block_size, tensor.dtype, compute), tensor.cpu())
                    for compute in (torch.float32, torch.float64)
                )
            except Fp8LayoutError:
                same = False
            if same:
                yield name, weight
                yield name + SCALE_SUFFIX, scale
                continue
        try:
            weight, scale = quantize_block_fp8(tensor.cpu(), block_size)
        except Fp8LayoutError as err:
            raise Fp8LayoutError(f"{name}: {err}") from err
        yield name, weight
        yield name + SCALE_SUFFIX, scale


# ------------------------------------------------------------------------------------------------ writing


def shard_names(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return [shard for shard in shards if shard]


def write_sharded(
    directory: Path,
    sizes: list[tuple[str, int]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool | None = None,
    description: str = "writing",
) -> None:
    """Write `tensors` (yielded in the order of `sizes`) as `model-0000i-of-0000n.safetensors` + the index json,
    as transformers names them; only one shard's tensors are in memory at a time."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards = shard_names(sizes, max_shard_bytes)
    expected_bytes = dict(sizes)
    weight_map: dict[str, str] = {}
    total = 0
    single = len(shards) == 1
    with tqdm(total=sum(expected_bytes.values()), unit="B", unit_scale=True, desc=description,
              disable=None if progress is None else not progress, file=sys.stderr) as bar:  # fmt: skip
        for index, names in enumerate(shards):
            filename = "model.safetensors" if single else f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            buffer: dict[str, torch.Tensor] = {}
            for expected in names:
                name, tensor = next(tensors)
                if name != expected:
                    raise RuntimeError(f"writer out of order: expected {expected}, got {name}")  # a bug, not input
                buffer[name] = tensor.contiguous()
                nbytes = tensor.numel() * tensor.element_size()
                if nbytes != expected_bytes[name]:
                    raise Fp8LayoutError(f"{name}: {nbytes} bytes to write, {expected_bytes[name]} planned")
                total += nbytes
                weight_map[name] = filename
                bar.update(nbytes)
            save_file(buffer, directory / filename, metadata={"format": "pt"})
            del buffer
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _fp8_nbytes(name: str, shape: tuple[int, ...], itemsize: int, block_size: tuple[int, int]) -> list[tuple[str, int]]:
    """The (name, bytes) entries one source tensor becomes in the FP8 layout."""
    if is_quantized_weight(name):
        return [(name, math.prod(shape)), (name + SCALE_SUFFIX, 4 * math.prod(scale_shape(shape, block_size)))]
    return [(name, math.prod(shape) * itemsize)]


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool | None = None,
) -> Path:
    """Quantize the bf16 Step-3 checkpoint directory `src` into the official block-FP8 layout at `dst`.

    `src` is first checked from its headers (`step3_hf.loading.check_checkpoint_files`), must not be quantized
    already, and must be in the official layout (what `save_pretrained` writes by default). Tensors are read,
    quantized and written one at a time; shards of at most `max_shard_bytes` plus the index json; other files
    (tokenizer, processor, generation config, ...) are copied; `config.json` gains `quantization_config`.
    Raises `Fp8LayoutError` (bad option, `dst` not empty, unquantizable tensor) or `BrokenCheckpointError`."""
    from safetensors import safe_open

    from .inspect_checkpoint import CONFIG_FILE, INDEX_FILE
    from .loading import check_checkpoint_files

    src, dst = Path(src), Path(dst)
    block_size = tuple(block_size)
    if len(block_size) != 2 or not all(isinstance(b, int) and b > 0 for b in block_size):
        raise Fp8LayoutError(f"block size must be two positive ints, got {list(block_size)}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise Fp8LayoutError(f"{dst} exists and is not an empty directory")
    if src.resolve() == dst.resolve():
        raise Fp8LayoutError("source and destination are the same directory")
    checked = check_checkpoint_files(src)
    if checked.block_size is not None:
        raise Fp8LayoutError(f"{src} is already quantized (its config has a quantization_config)")
    official = official_tensor_shapes(checked.config.get_text_config())
    files, headers = checked.files, checked.tensors
    module_named = [t.name for t in headers if not is_vision_tensor(t.name) and t.name not in official]
    if module_named:
        raise Fp8LayoutError(
            f"{src} is not in the official layout ({module_named[0]} is not an official tensor name); save it with "
            "`save_pretrained(...)` (official layout, the default) first"
        )
    from .inspect_checkpoint import DTYPE_BYTES

    sizes = [entry for t in headers for entry in _fp8_nbytes(t.name, t.shape, DTYPE_BYTES[t.dtype], block_size)]

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)

    dst.mkdir(parents=True, exist_ok=True)
    try:
        write_sharded(dst, sizes, quantize_state_dict(read(), block_size), max_shard_bytes=max_shard_bytes,
                      progress=progress, description="quantizing")  # fmt: skip
        for extra in src.iterdir():  # tokenizer, processor, generation config, ...
            written_here = extra.name.endswith(".safetensors") or extra.name in (CONFIG_FILE, INDEX_FILE)
            if extra.is_file() and not written_here:
                shutil.copy2(extra, dst / extra.name)
        raw = json.loads((src / CONFIG_FILE).read_text())
        raw["quantization_config"] = fp8_quantization_config(block_size)
        (dst / CONFIG_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)  # it was empty: no half-written checkpoint is left behind
        raise
    return dst


# ------------------------------------------------------------------------------------------------ saving a model


def official_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A loaded Step-3 model's tensors under their official names, each float8 weight followed by its scale.

    Inverts the conversion of `checkpoint_layout.checkpoint_conversion_mapping` (`checkpoint_layout.official_names`;
    fused gate/up experts are split, their scales too) for the modules as loaded: bf16 (a dequantized model) or
    transformers' FP8 modules."""
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(SCALE_SUFFIX) or name.endswith("activation_scale"):
            continue  # written right after their weight
        officials = official_names(name)
        parts = tensor.chunk(len(officials), dim=1) if len(officials) > 1 else (tensor,)
        if tensor.dtype != FP8_DTYPE:
            yield from zip(officials, parts)
            continue
        scale = state.get(name + SCALE_SUFFIX)
        if scale is None:
            raise Fp8LayoutError(f"{officials[0]} is float8 but the model holds no scale for it")
        # Whole tiles (checked at load), so the gate rows' scales come first in the scales too.
        scales = scale.chunk(len(officials), dim=1) if len(officials) > 1 else (scale,)
        for official, part, part_scale in zip(officials, parts, scales):
            yield official, part
            yield official + SCALE_SUFFIX, part_scale


def _reference_reader(directory: Path | None, block_size: tuple[int, int]):
    """`reference(name)` for `quantize_state_dict`: the `(weight, scale)` a checkpoint directory holds, or None."""
    if directory is None:
        return None
    from safetensors import safe_open

    from .inspect_checkpoint import CheckpointError, checkpoint_files

    try:
        files, _ = checkpoint_files(directory)
    except CheckpointError:
        return None  # the source is gone: every weight is quantized afresh
    where = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            where.update({name: file for name in handle.keys()})

    def reference(name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if name not in where or name + SCALE_SUFFIX not in where:
            return None
        with safe_open(where[name], framework="pt") as handle:
            weight = handle.get_tensor(name)
        with safe_open(where[name + SCALE_SUFFIX], framework="pt") as handle:
            scale = handle.get_tensor(name + SCALE_SUFFIX)
        if weight.dtype != FP8_DTYPE or tuple(scale.shape) != scale_shape(tuple(weight.shape), block_size):
            return None
        return weight, scale

    return reference


def save_fp8_weights(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    block_size: tuple[int, int],
    *,
    source: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool | None = False,
) -> None:
    """Write `model`'s weights in the official block-FP8 layout into `directory` (weights only).

    `source`: the FP8 checkpoint the model was loaded from; weights unchanged since then are written with their
    original bytes (see `quantize_state_dict`)."""
    directory = Path(directory)
    sizes = []
    for name, tensor in official_items(model):
        if name.endswith(SCALE_SUFFIX):
            sizes.append((name, 4 * tensor.numel()))
        elif tensor.dtype == FP8_DTYPE:
            sizes.append((name, tensor.numel()))
        else:
            sizes += _fp8_nbytes(name, tuple(tensor.shape), tensor.element_size(), block_size)
    reference = _reference_reader(Path(source) if source is not None else None, block_size)
    tensors = quantize_state_dict(
        ((name, t.detach().cpu()) for name, t in official_items(model)), block_size, reference
    )
    write_sharded(directory, sizes, tensors, max_shard_bytes=max_shard_bytes, progress=progress,
                  description="saving fp8")  # fmt: skip


# ------------------------------------------------------------------------------------------------ in memory


def quantize_model(model: torch.nn.Module, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE) -> torch.nn.Module:
    """Quantize a loaded (bf16) Step-3 model in place into transformers' FP8 modules, as if it had been loaded from
    the FP8 layout: every linear `is_quantized_weight` names becomes an `FP8Linear` and every routed-experts module
    an `FP8Experts`, holding float8 weights and float32 scales (`quantize_block_fp8`, which takes the experts one
    at a time so that the float32 temporaries stay small). Norms, router, embeddings, head and vision tower are left
    as they are; `config.quantization_config` is set, so `save_pretrained` writes the FP8 layout. On a CPU the FP8
    experts compute through `moe_decode` (transformers' FP8 experts kernel needs a GPU). Returns `model`."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts, FP8Linear
    from transformers.integrations.moe import use_experts_implementation

    from .kernels.fp8_linear import use_fp8_kernels
    from .modeling_step3 import Step3Experts

    block_size = tuple(block_size)
    if fp8_block_size(model.config) is not None:
        raise Fp8LayoutError("the model is already quantized (its config has a quantization_config)")
    experts_class = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)
    text_config = model.config.get_text_config()
    for name in [name for name, _ in model.named_modules()]:  # names only: each replaced module is freed at once
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # a child of a module already replaced
        if type(module) is torch.nn.Linear and module.bias is None and is_quantized_weight(name + ".weight"):
            with torch.device("meta"):
                new = FP8Linear(module.in_features, module.out_features, block_size=block_size)
            weight, scale = quantize_block_fp8(module.weight.detach(), block_size)
            new.weight = torch.nn.Parameter(weight, requires_grad=False)
            new.weight_scale_inv = torch.nn.Parameter(scale, requires_grad=False)
        elif isinstance(module, Step3Experts):
            hidden, inter = module.hidden_dim, module.intermediate_dim
            if inter % block_size[0] or hidden % block_size[0] or hidden % block_size[1] or inter % block_size[1]:
                raise Fp8LayoutError(f"{name}: FP8 experts need whole tiles ({list(block_size)}) in every dimension")
            with torch.device("meta"):
                new = experts_class(config=text_config, block_size=block_size)
            quantize_experts_into(new, module, block_size)
        else:
            continue
        model.set_submodule(name, new)
        del module, new
    model.config.quantization_config = fp8_quantization_config(block_size)
    use_fp8_kernels(model)
    _compute_fp8_experts_off_the_gpu(model)
    return model


def _compute_fp8_experts_off_the_gpu(model: torch.nn.Module) -> None:
    """transformers' own FP8 experts functions call its Hub kernel, which runs on a GPU only (and on a CPU tries to
    download it). A model quantized with FP8 experts on the CPU, whose experts implementation is one of those,
    computes them through `moe_decode`'s FP8 path instead (on a CPU, block-FP8 GEMMs per hit expert), as a
    dequantizing load would: one log line says so."""
    from transformers.integrations.finegrained_fp8 import FP8Experts

    from .kernels import MOE_DECODE_EXPERTS

    devices = {next(module.parameters()).device for module in model.modules() if isinstance(module, FP8Experts)}
    implementation = getattr(model.config.get_text_config(), "_experts_implementation", None)
    if implementation == MOE_DECODE_EXPERTS or not any(device.type == "cpu" for device in devices):
        return
    model.set_experts_implementation(MOE_DECODE_EXPERTS)
    logger.warning(f"quantize_model: FP8 experts on the CPU: the model's experts compute through "
                   f"`{MOE_DECODE_EXPERTS}` instead of `{implementation}`, whose FP8 kernel needs a GPU")  # fmt: skip


# ------------------------------------------------------------------------------------------------ command


def _shard_size_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _block_size_arg(text: str) -> tuple[int, int]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWS,COLS (e.g. 128,128), got {text!r}") from None
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected two positive ints ROWS,COLS, got {text!r}")
    return parts


def main(argv: list[str] | None = None) -> int:
    from .inspect_checkpoint import CheckpointError
    from .loading import BrokenCheckpointError

    parser = argparse.ArgumentParser(
        prog="step3-quantize-fp8",
        description="Quantize a bf16 Step-3 checkpoint directory into the official block-FP8 layout (float8 e4m3 "
        "weights with float32 weight_scale_inv per tile), one tensor at a time.",
    )
    parser.add_argument("src", type=Path, help="bf16 checkpoint directory (official layout)")
    parser.add_argument("dst", type=Path, help="new directory for the FP8 checkpoint")
    parser.add_argument("--block-size", type=_block_size_arg, default=DEFAULT_BLOCK_SIZE, metavar="ROWS,COLS",
                        help="weight_block_size (default 128,128, the release's)")  # fmt: skip
    parser.add_argument("--max-shard-size", type=_shard_size_arg, default=DEFAULT_SHARD_BYTES / 1e9, metavar="GB",
                        help="largest shard in GB (default %(default)g)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        quantize_checkpoint(args.src, args.dst, block_size=args.block_size,
                            max_shard_bytes=int(args.max_shard_size * 1e9))  # fmt: skip
    except (Fp8LayoutError, BrokenCheckpointError, CheckpointError) as err:
        message = " ".join(line.strip() for line in str(err).splitlines())
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
