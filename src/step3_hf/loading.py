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
from pathlib import Path

from torch import nn

from .checkpoint_layout import (
    LM_HEAD,
    base_model_layout,
    is_vision_tensor,
    module_tensor_shapes,
    official_tensor_shapes,
)
from .inspect_checkpoint import (
    CONFIG_CLASSES,
    CONFIG_FILE,
    CheckpointError,
    checkpoint_files,
    index_problems,
    load_config,
    read_safetensors_header,
)

__all__ = ["BrokenCheckpointError", "check_checkpoint_files", "check_loaded_model", "from_pretrained_checked"]

_SHOWN = 20


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


def check_checkpoint_files(directory: str | os.PathLike, *, check_shapes: bool = True) -> None:
    """Raise `BrokenCheckpointError` if a local Step-3 checkpoint is broken, reading only its index and headers.

    The checkpoint is compared with the layout of its own config, in whichever of the four forms it was saved:
    official or module names (`save_original_format=False`), of the causal LM or of the base model. Missing head
    weights and unexpected tensors are not breakage: transformers initialises and reports the former and reports
    the latter. A file none of whose tensors is a Step-3 tensor is no Step-3 checkpoint and is not judged.
    """
    directory = Path(directory)
    try:
        config = load_config(directory).get_text_config()
        files, weight_map = checkpoint_files(directory)
        shards = [read_safetensors_header(file) for file in files]
    except CheckpointError as err:
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
    if problems:
        _raise_broken(directory, problems)


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


def from_pretrained_checked(load: Callable, pretrained_model_name_or_path, *args, **kwargs):
    """`load(pretrained_model_name_or_path, *args, **kwargs)` (transformers' `from_pretrained`) with the checks."""
    local = (
        isinstance(pretrained_model_name_or_path, (str, os.PathLike))
        and kwargs.get("gguf_file") is None
        and kwargs.get("use_safetensors") is not False
    )
    directory = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "") if local else None
    if directory is not None and directory.is_dir() and _is_step3_directory(directory):
        check_checkpoint_files(directory, check_shapes=not kwargs.get("ignore_mismatched_sizes", False))

    output_loading_info = kwargs.pop("output_loading_info", False)
    model, loading_info = load(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
    if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
        check_loaded_model(model, loading_info["missing_keys"], pretrained_model_name_or_path)
    return (model, loading_info) if output_loading_info else model
