"""Loading Step-3 as transformers loads every model, except that a broken checkpoint fails loudly.

transformers initialises whatever a checkpoint lacks and reports it: that is how a base-model checkpoint becomes a
causal LM (the head is new) and how a causal-LM checkpoint loads into the base model (the head is left over), and
Step-3 keeps that contract whole. What it must not do is hand back a model that is partly random because the files
are broken. Before loading, a local checkpoint is checked from its index and safetensors headers alone: an index
that promises a tensor its shard lacks, a missing shard file, a truncated file, a tensor of the wrong shape for the
checkpoint's own config, or a decoder stack with holes each raise `BrokenCheckpointError`, naming the tensor or
file. After loading (also for hub checkpoints, where no headers are read up front), a base model that the
checkpoint filled only in part is refused the same way.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

from .checkpoint_layout import (
    LM_HEAD,
    base_model_layout,
    is_vision_tensor,
    module_tensor_shapes,
    official_tensor_shapes,
)
from .configuration_step3 import Step3Config, Step3VLConfig
from .fp8 import (
    DEFAULT_SHARD_BYTES,
    MODULES_NOT_CONVERTED,
    SCALE_SUFFIX,
    Fp8LayoutError,
    fp8_block_size,
    fp8_quantization_config,
    fp8_tensor_shapes,
    is_quantized_weight,
    save_fp8_weights,
)
from .inspect_checkpoint import (
    CONFIG_CLASSES,
    CONFIG_FILE,
    INDEX_FILE,
    CheckpointError,
    ShardHeader,
    TensorHeader,
    checkpoint_files,
    index_problems,
    load_config,
    read_safetensors_header,
)

__all__ = [
    "BrokenCheckpointError",
    "CheckedCheckpoint",
    "check_checkpoint_files",
    "check_loaded_model",
    "fp8_saving",
    "from_pretrained_checked",
    "save_pretrained_fp8",
]

_SHOWN = 20
logger = logging.get_logger(__name__)


class BrokenCheckpointError(ValueError):
    """A Step-3 checkpoint whose files contradict each other or its config; the message names each tensor or file."""


def _raise_broken(path: Path, problems: list[str]) -> None:
    shown = "\n  ".join(problems[:_SHOWN])
    more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise BrokenCheckpointError(
        f"{path} is a broken Step-3 checkpoint ({len(problems)} problem(s)); `step3-inspect {path}` shows the full "
        f"report:\n  {shown}{more}"
    )


def _is_step3_directory(directory: Path) -> bool:
    """A local directory whose config.json names a Step-3 model type and which holds safetensors files."""
    try:
        model_type = json.loads((directory / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False  # not ours to judge: transformers reports an unreadable config itself
    return model_type in CONFIG_CLASSES and any(directory.glob("*.safetensors"))


@dataclass(frozen=True)
class CheckedCheckpoint:
    """What `check_checkpoint_files` read from a checkpoint that passed, so that its callers need not read it again."""

    config: Step3Config | Step3VLConfig
    """The config as written (`step3_vl` or `step3_text`), built by `inspect_checkpoint.load_config`."""
    block_size: tuple[int, int] | None
    """`weight_block_size` of a block-FP8 checkpoint, else None."""
    files: tuple[Path, ...]
    """The safetensors files `from_pretrained` reads."""
    weight_map: dict[str, str] | None
    """The index's weight map; None for a single `model.safetensors`."""
    shards: tuple[ShardHeader, ...]
    """The parsed header of each of `files`, in the same order."""

    @property
    def tensors(self) -> list[TensorHeader]:
        """Every tensor of every shard, vision tensors included."""
        return [t for shard in self.shards for t in shard.tensors]


def check_checkpoint_files(directory: str | os.PathLike, *, check_shapes: bool = True) -> CheckedCheckpoint:
    """Raise `BrokenCheckpointError` if a local Step-3 checkpoint is broken, reading only its index and headers;
    else return what was read.

    The checkpoint is compared with the layout of its own config, in whichever of the four forms it was saved:
    official or module names (`save_original_format=False`), of the causal LM or of the base model. Missing head
    weights and unexpected tensors are not breakage: transformers initialises and reports the former and reports
    the latter. A file none of whose tensors is a Step-3 tensor is no Step-3 checkpoint and is not judged.
    """
    directory = Path(directory)
    try:
        full_config = load_config(directory)
        config = full_config.get_text_config()
        block_size = fp8_block_size(full_config)
        files, weight_map = checkpoint_files(directory)
        shards = [read_safetensors_header(file) for file in files]
    except (CheckpointError, Fp8LayoutError) as err:
        raise BrokenCheckpointError(f"{directory} is not a usable Step-3 checkpoint: {err}") from err

    tensors = [t for shard in shards for t in shard.tensors if not is_vision_tensor(t.name)]
    problems = [problem for shard in shards if (problem := shard.truncation)]
    if weight_map is not None:
        problems += index_problems([t for shard in shards for t in shard.tensors], weight_map)
    on_disk: dict[str, tuple[int, ...]] = {}
    for t in tensors:
        if t.name in on_disk:
            problems.append(f"{t.name} is stored twice")
        on_disk[t.name] = t.shape

    if block_size is not None:  # block FP8: the official names only, each quantized weight with its scale
        full = [fp8_tensor_shapes(config, block_size)]
        problems += fp8_problems(tensors, block_size)
    else:
        full = [official_tensor_shapes(config), module_tensor_shapes(config)]
    layouts = full + [base_model_layout(shapes) for shapes in full]
    expected = max(layouts, key=lambda layout: len(layout.keys() & on_disk.keys()))
    if expected.keys() & on_disk.keys():
        problems += [f"missing {name} {_shape(shape)}" for name, shape in expected.items()
                     if name not in on_disk and name != LM_HEAD]  # fmt: skip
        if check_shapes:
            problems += [
                f"wrong shape {name}: expected {_shape(expected[name])}, found {_shape(shape)}"
                for name, shape in on_disk.items()
                if name in expected and shape != expected[name]
            ]
    if block_size is None:
        problems += [f"{t.name} is a block-FP8 scale, but {CONFIG_FILE} has no fp8 quantization_config"
                     for t in tensors if t.name.endswith(SCALE_SUFFIX)]  # fmt: skip
    else:
        problems += [f"unexpected {t.name} {_shape(t.shape)}" for t in tensors
                     if t.name.endswith(SCALE_SUFFIX) and t.name not in expected]  # fmt: skip
    if problems:
        _raise_broken(directory, problems)
    return CheckedCheckpoint(full_config, block_size, tuple(files), weight_map, tuple(shards))


def fp8_problems(tensors: list[TensorHeader], block_size: tuple[int, int]) -> list[str]:
    """What transformers' FP8 loading cannot take from headers that otherwise fit the layout: a quantized weight or
    scale of the wrong dtype, and a quantized dimension that is not a whole number of blocks (transformers derives
    the block from the scale grid, and the fused gate/up experts need whole tiles; the release's are all whole)."""
    problems = []
    for t in tensors:
        base = t.name.removesuffix(SCALE_SUFFIX)
        if not is_quantized_weight(base):
            continue
        if t.name.endswith(SCALE_SUFFIX):
            if t.dtype != "F32":
                problems.append(f"wrong dtype {t.name}: expected F32, found {t.dtype}")
            continue
        if t.dtype != "F8_E4M3":
            problems.append(f"wrong dtype {t.name}: expected F8_E4M3, found {t.dtype}")
        rows, cols = t.shape[-2:] if len(t.shape) >= 2 else (0, 0)
        if rows % block_size[0] or cols % block_size[1]:
            problems.append(
                f"partial FP8 tiles in {t.name} {_shape(t.shape)}: transformers' FP8 loading needs each quantized "
                f"dimension to be a multiple of weight_block_size {list(block_size)}"
            )
    return problems


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def check_loaded_model(model: nn.Module, missing_keys: set[str] | list[str], source: object) -> None:
    """Refuse a base model that the checkpoint filled only in part (a missing head is initialised, as upstream).

    A checkpoint that filled none of it is not a Step-3 checkpoint at all; transformers' report says so.
    """
    prefix = getattr(model, "base_model_prefix", "")
    in_body = (lambda name: name.startswith(prefix + ".")) if hasattr(model, prefix) and prefix else (lambda _: True)
    body = [name for name in model.state_dict() if in_body(name)]
    missing = sorted(name for name in missing_keys if in_body(name))
    if missing and len(missing) < len(body):
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise BrokenCheckpointError(
            f"{source} filled only part of {type(model).__name__}: {len(missing)} tensor(s) missing: {shown}. "
            f"Refusing to return a partly random model; `step3-inspect <checkpoint>` lists every tensor by its "
            "official name."
        )


@dataclass(frozen=True)
class Fp8Saving:
    """How a model loaded from a block-FP8 checkpoint is saved: its block size, and the checkpoint it came from
    (whose bytes are reused for every weight still equal to them)."""

    block_size: tuple[int, int]
    source: Path | None


def from_pretrained_checked(load: Callable, pretrained_model_name_or_path, *args, config_class=None, **kwargs):
    """`load(pretrained_model_name_or_path, *args, **kwargs)` (transformers' `from_pretrained`) with the checks.

    A local block-FP8 checkpoint whose `quantization_config` names no `modules_to_not_convert` gets Step-3's list
    (`fp8.MODULES_NOT_CONVERTED`), so that transformers' FP8 linears replace only what the checkpoint quantized."""
    local = (
        isinstance(pretrained_model_name_or_path, (str, os.PathLike))
        and kwargs.get("gguf_file") is None
        and kwargs.get("use_safetensors") is not False
    )
    directory = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "") if local else None
    block_size = None
    if directory is not None and directory.is_dir() and _is_step3_directory(directory):
        check_checkpoint_files(directory, check_shapes=not kwargs.get("ignore_mismatched_sizes", False))
        block_size = fp8_block_size(load_config(directory))
        if block_size is not None and kwargs.get("config") is None and config_class is not None:
            config = config_class.from_pretrained(directory)
            quantization = config.quantization_config
            quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
            if not quantization.get("modules_to_not_convert"):
                config.quantization_config = {**quantization, "modules_to_not_convert": list(MODULES_NOT_CONVERTED)}
                kwargs["config"] = config

    output_loading_info = kwargs.pop("output_loading_info", False)
    model, loading_info = load(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
    if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
        check_loaded_model(model, loading_info["missing_keys"], pretrained_model_name_or_path)
    if block_size is not None:
        model._step3_fp8_saving = Fp8Saving(block_size, directory.resolve())
        _cast_unquantized(model, kwargs.get("dtype", kwargs.get("torch_dtype")))
        from .kernels.fp8_linear import use_fp8_kernels

        if use_fp8_kernels(model):
            logger.info("Step-3 FP8: float8 weights kept; linears compute through step3_hf.kernels.fp8_linear")
    return (model, loading_info) if output_loading_info else model


def _cast_unquantized(model: nn.Module, dtype) -> None:
    """Give the checkpoint's bf16 tensors the dtype asked for. transformers 5.17 passes the tensors that its FP8
    dequantizing converter matches without a scale (the router) through in their stored dtype."""
    if not isinstance(dtype, torch.dtype):
        return
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.element_size() > 1 and param.dtype != dtype:
            if not name.endswith(SCALE_SUFFIX):
                param.data = param.data.to(dtype)


def fp8_saving(model: nn.Module) -> Fp8Saving | None:
    """The FP8 saving plan of a model loaded from a block-FP8 checkpoint (dequantized or not), else None."""
    plan = getattr(model, "_step3_fp8_saving", None)
    if plan is not None:
        return plan
    try:
        block_size = fp8_block_size(model.config)
    except Fp8LayoutError:
        return None  # another quantization method: transformers saves it
    return Fp8Saving(block_size, None) if block_size is not None else None


def save_pretrained_fp8(model: nn.Module, save: Callable, save_directory, plan: Fp8Saving, *args, **kwargs):
    """transformers' `save` for everything but the weights (config, generation config, hub upload is not done:
    `push_to_hub` is refused), then the weights in the official block-FP8 layout (`fp8.save_fp8_weights`)."""
    if kwargs.get("push_to_hub"):
        raise ValueError("push_to_hub is not supported when saving a Step-3 FP8 model; save, then upload the folder")
    directory = Path(save_directory)
    source = plan.source
    if source is not None and directory.exists() and directory.resolve() == source:
        source = None  # overwriting the source itself: nothing left to compare with
    max_shard = kwargs.pop("max_shard_size", None)
    save(save_directory, *args, state_dict={}, **kwargs)
    for written in [*directory.glob("*.safetensors"), directory / INDEX_FILE]:
        written.unlink(missing_ok=True)
    save_fp8_weights(model, directory, plan.block_size, source=source, max_shard_bytes=_shard_bytes(max_shard))
    config_path = directory / CONFIG_FILE
    raw = json.loads(config_path.read_text())
    raw["quantization_config"] = fp8_quantization_config(plan.block_size)
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _shard_bytes(max_shard_size) -> int:
    """transformers' `max_shard_size` (an int of bytes or a string such as "5GB") in bytes."""
    if max_shard_size is None:
        return DEFAULT_SHARD_BYTES
    if isinstance(max_shard_size, int):
        return max_shard_size
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(max_shard_size)
