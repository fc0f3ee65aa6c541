"""Reading one role's tensors from an official Step-3 safetensors checkpoint, and nothing else.

Each tensor is opened lazily through `safe_open(...).get_slice`, so an attention rank never reads an expert
and an FFN rank reads only its own expert range and MLP channels. The reader records what it read, which is
how the tests prove the split.

A rank copies what it reads into modules built from the config, and `Tensor.copy_` broadcasts: a `[1, H]` tensor
where `[256, H]` belongs would load silently. So the reader runs `from_pretrained`'s check of the files (index,
shards, truncation, every tensor's shape against the config) when it opens a checkpoint, and checks each tensor's
dtype when it reads it, naming the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from ..checkpoint_layout import (
    EXPERTS_DOWN,
    MODULE_EXPERTS_DOWN,
    MODULE_ROUTER,
    MODULE_SHARED_EXPERT,
    ROUTER,
    SHARED_EXPERT,
    is_routed_expert_tensor,
)
from ..configuration_step3 import Step3Config
from ..loading import BrokenCheckpointError, check_checkpoint_files
from .placement import Role


def role_of_tensor(name: str) -> Role:
    """Which side of the disaggregated model holds an official tensor: the MLPs, shared experts and routed
    experts go to the FFN side; everything else (including the MoE router) stays with attention."""
    if ".mlp." in name or f".{SHARED_EXPERT}" in name or is_routed_expert_tensor(name):
        return Role.FFN
    return Role.ATTENTION


def module_name(official_name: str) -> str:
    """Official tensor name -> the name `Step3ForCausalLM` gives that weight, which both halves of the split model
    keep (the experts' gate and up projections, fused into `gate_up_proj`, are the one pair this cannot name)."""
    for official, module in ((ROUTER, MODULE_ROUTER), (EXPERTS_DOWN, MODULE_EXPERTS_DOWN)):
        if official_name.endswith("." + official):
            return official_name.removesuffix(official) + module
    return official_name.replace("." + SHARED_EXPERT, "." + MODULE_SHARED_EXPERT)


class CheckpointReader:
    """Lazy, sliceable access to the tensors of a local official-layout checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a Step-3 checkpoint directory: it has no config.json")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", framework="pt") as handle:
                self.weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{self.path} has neither model.safetensors nor model.safetensors.index.json")
        check_checkpoint_files(self.path)
        self.full_config = AutoConfig.from_pretrained(self.path)  # step3_vl or step3_text, as written
        self.config: Step3Config = self.full_config.get_text_config()
        self.elements_read = 0
        self.names_read: list[str] = []

    def read(
        self,
        name: str,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        index: tuple[slice, ...] = (),
    ) -> torch.Tensor:
        """Tensor `name` (official name), only the part selected by `index`, cast to `dtype` on `device`."""
        if name not in self.weight_map:
            raise KeyError(f"{self.path} has no tensor {name!r}; `step3-inspect {self.path}` lists what is there")
        with safe_open(self.path / self.weight_map[name], framework="pt") as handle:
            sliced = handle.get_slice(name)
            self._check_dtype(name, sliced.get_dtype())
            tensor = sliced[index] if index else sliced[:]
        self.names_read.append(name)
        self.elements_read += tensor.numel()
        return tensor.to(device=device, dtype=dtype)

    def _check_dtype(self, name: str, dtype: str) -> None:
        if dtype not in _WEIGHT_DTYPES:
            raise BrokenCheckpointError(
                f"{self.path}: tensor {name} is stored as {dtype}; Step-3 weights are floating point "
                f"({', '.join(sorted(_WEIGHT_DTYPES))})"
            )


# safetensors dtype names a Step-3 weight may be stored in (float8 for the FP8 release's quantised weights).
_WEIGHT_DTYPES = frozenset({"F32", "F16", "BF16", "F8_E4M3", "F64"})
