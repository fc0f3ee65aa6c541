"""Reading one role's tensors from an official Step-3 safetensors checkpoint, and nothing else.

Each tensor is opened lazily through `safe_open(...).get_slice`, so an attention rank never reads an expert
and an FFN rank reads only its own expert range and MLP channels. The reader records what it read, which is
how the tests prove the split.

A rank copies what it reads into modules built from the config, and `Tensor.copy_` broadcasts: a `[1, H]` tensor
where `[256, H]` belongs would load silently. So the reader runs `from_pretrained`'s check of the files (index,
shards, truncation, every tensor's shape against the config) when it opens a checkpoint, and checks each tensor's
dtype when it reads it, naming the tensor.

A block-FP8 checkpoint (the `stepfun-ai/step3-fp8` layout, `step3_hf.fp8`) is read the same way: `read` returns a
quantized weight dequantized (as transformers dequantizes it on CPU: float32 product, then the cast), reading only
the scale tiles that cover the slice asked for; `read_fp8` returns the float8 weight and its float32
`weight_scale_inv` as stored, for slices along the leading (expert) dimension, which cut no tile. Both check the
weight's and the scale's name, dtype and shape before anything is copied.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from ..checkpoint_layout import SHARED_EXPERT, is_routed_expert_tensor
from ..configuration_step3 import Step3Config
from ..fp8 import SCALE_SUFFIX, dequantize_block_fp8, is_quantized_weight
from ..loading import BrokenCheckpointError, check_checkpoint_files
from .placement import Role


def role_of_tensor(name: str) -> Role:
    """Which side of the disaggregated model holds an official tensor: the MLPs, shared experts and routed
    experts go to the FFN side; everything else (including the MoE router) stays with attention."""
    if ".mlp." in name or f".{SHARED_EXPERT}" in name or is_routed_expert_tensor(name):
        return Role.FFN
    return Role.ATTENTION


class CheckpointReader:
    """Lazy, sliceable access to the tensors of a local official-layout checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a Step-3 checkpoint directory: it has no config.json")
        if not any((self.path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            raise FileNotFoundError(f"{self.path} has neither model.safetensors nor model.safetensors.index.json")
        checked = check_checkpoint_files(self.path)
        # Where each tensor is: the index's map, or every tensor of the single file.
        self.weight_map: dict[str, str] = (
            checked.weight_map if checked.weight_map is not None else {t.name: t.file for t in checked.tensors}
        )
        self.full_config = AutoConfig.from_pretrained(self.path)  # step3_vl or step3_text, as written
        self.config: Step3Config = self.full_config.get_text_config()
        # `weight_block_size` of a block-FP8 checkpoint, else None
        self.block_size: tuple[int, int] | None = checked.block_size
        self.elements_read = 0
        self.names_read: list[str] = []

    def keeps_fp8(self, device: torch.device, requested: bool | None) -> bool:
        """Whether a rank loading onto `device` keeps this checkpoint's block-FP8 weights in float8: as `requested`,
        by default on CUDA; never for a checkpoint that is not block FP8."""
        return self.block_size is not None and (device.type == "cuda" if requested is None else requested)

    def is_quantized(self, name: str) -> bool:
        """Whether official tensor `name` is stored as block FP8 (float8 + `weight_scale_inv`) here."""
        return self.block_size is not None and is_quantized_weight(name)

    def read(
        self,
        name: str,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        index: tuple[slice, ...] = (),
    ) -> torch.Tensor:
        """Tensor `name` (official name), only the part selected by `index`, cast to `dtype` on `device`; a block-FP8
        weight is dequantized (float32 product, then the cast, as transformers computes it)."""
        if self.is_quantized(name):
            return self._read_dequantized(name, dtype, device, index)
        tensor = self._read(name, index, _WEIGHT_DTYPES)
        return tensor.to(device=device, dtype=dtype)

    def read_fp8(
        self, name: str, *, device: torch.device | str = "cpu", index: tuple[slice, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(float8 weight, float32 weight_scale_inv)` of a block-FP8 weight as stored, on `device`; `index` may
        select along the leading dimensions only (experts), which cut no tile."""
        if not self.is_quantized(name):
            raise ValueError(f"{self.path}: {name} is not a block-FP8 weight in this checkpoint")
        shape = self._shape(name)
        if len(index) > len(shape) - 2:
            raise ValueError(f"read_fp8({name}): index {index} slices a tiled dimension; use read() to dequantize")
        weight = self._read(name, index, _FP8_DTYPES)
        scale = self._read_scale(name, index)
        return weight.to(device), scale.to(device)

    def _read_dequantized(self, name, dtype, device, index) -> torch.Tensor:
        shape = self._shape(name)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        # Read the whole tiles that cover the slice of the last two (tiled) dimensions, dequantize, then crop.
        window, crop, tiles = list(index[:-2]), [slice(None)] * (len(shape) - 2), list(index[:-2])
        for part, size, block in zip(index[-2:], shape[-2:], self.block_size):
            start, stop, step = part.indices(size)
            if step != 1:
                raise ValueError(f"read({name}): strided index {part} of a block-FP8 weight")
            first, last = start // block, -(-stop // block)
            window.append(slice(first * block, min(last * block, size)))
            crop.append(slice(start - first * block, stop - first * block))
            tiles.append(slice(first, last))
        weight = self._read(name, tuple(window), _FP8_DTYPES)
        scale = self._read_scale(name, tuple(tiles))
        full = dequantize_block_fp8(weight, scale, self.block_size, dtype, compute_dtype=torch.float32)
        return full[tuple(crop)].contiguous().to(device)

    def _read_scale(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        # Its presence and shape were checked when the checkpoint was opened (`check_checkpoint_files`).
        return self._read(name + SCALE_SUFFIX, index, _SCALE_DTYPES)

    def _shape(self, name: str) -> tuple[int, ...]:
        self._check_present(name)
        with safe_open(self.path / self.weight_map[name], framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def _check_present(self, name: str) -> None:
        if name not in self.weight_map:
            raise KeyError(f"{self.path} has no tensor {name!r}; `step3-inspect {self.path}` lists what is there")

    def _read(self, name: str, index: tuple[slice, ...], dtypes: frozenset[str]) -> torch.Tensor:
        self._check_present(name)
        with safe_open(self.path / self.weight_map[name], framework="pt") as handle:
            sliced = handle.get_slice(name)
            self._check_dtype(name, sliced.get_dtype(), dtypes)
            tensor = sliced[index] if index else sliced[:]
        self.names_read.append(name)
        self.elements_read += tensor.numel()
        return tensor

    def _check_dtype(self, name: str, dtype: str, allowed: frozenset[str]) -> None:
        if dtype not in allowed:
            what = "Step-3 weights are floating point" if allowed is _WEIGHT_DTYPES else "expected"
            raise BrokenCheckpointError(
                f"{self.path}: tensor {name} is stored as {dtype}; {what} ({', '.join(sorted(allowed))})"
            )


# safetensors dtype names a Step-3 weight may be stored in; float8 only with a scale (`read_fp8`, `_read_dequantized`).
_WEIGHT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
_FP8_DTYPES = frozenset({"F8_E4M3"})
_SCALE_DTYPES = frozenset({"F32"})
