"""Where `from_pretrained(..., device_map="auto", max_memory=...)` would put each layer, without loading a weight.

The model is built on the meta device (accelerate's `init_empty_weights`) and placed by the two steps
`from_pretrained` runs for `device_map="auto"`: `get_balanced_memory`, then `infer_auto_device_map`, with the model's
own `_no_split_modules` (a decoder layer is never split, so its residual stream stays on one device). Both are
transformers' copies in `transformers.integrations.accelerate`, not accelerate's: accelerate's balancing sizes its
slack from the first decoder layer, a dense one in Step-3, ten times smaller than a MoE layer, and on 16 x 80 GB it
leaves six layers on disk where `from_pretrained` places them all. `max_memory` keys may be integer GPU ids, "cpu"
or "disk"; the devices need not exist here.

FP8 weights are a size figure: linear and expert weights at one byte, embedding, LM head, norms and router at bf16
(as in the block-FP8 release), the fp32 block scales (0.02% more) not counted.

    >>> placement = layer_placement("step3", {i: 80e9 for i in range(8)})
    >>> print(placement.table())
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .configuration_step3 import Step3Config, Step3VLConfig
from .modeling_step3 import Step3ForCausalLM

__all__ = ["LayerPlacement", "layer_placement", "step3_config"]

_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
_UNQUANTISED = ("embed_tokens", "lm_head", "norm", "layernorm", "mlp.gate.weight")  # kept bf16 in the FP8 release


def step3_config(source: Any) -> Step3Config:
    """A Step-3 text config from a config object, a preset name of the cost model, or a config.json path/folder."""
    if isinstance(source, Step3VLConfig):
        return source.get_text_config()
    if isinstance(source, Step3Config):
        return source
    from .cost_model.accounting import load_config

    _, raw = load_config(source)
    raw = dict(raw) if isinstance(raw, Mapping) else raw
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == Step3VLConfig.model_type:
        return Step3VLConfig.from_dict(raw).get_text_config()
    if model_type != Step3Config.model_type:
        raise ValueError(f"device-map placement builds Step-3 models only (model_type step3_text or step3_vl), "
                         f"got model_type {model_type!r}")
    return Step3Config.from_dict({k: v for k, v in raw.items() if not k.startswith("_")})


@dataclass(frozen=True)
class LayerPlacement:
    """The device map and the bytes behind it."""

    device_map: dict[str, int | str]  # module name -> device, as `from_pretrained` would receive it
    module_bytes: dict[str, int]  # bytes of every placed module
    max_memory: dict[int | str, float]  # per device, after balancing (what the placement had to respect)
    weights: str

    def layer_devices(self) -> list[int | str]:
        """Device of each decoder layer, by index."""
        layers = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in self.device_map.items()
                        if k.startswith("model.layers."))
        return [device for _, device in layers]

    def used_bytes(self) -> dict[int | str, int]:
        used: dict[int | str, int] = {}
        for name, device in self.device_map.items():
            used[device] = used.get(device, 0) + self.module_bytes[name]
        return used

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "device_map": {k: v for k, v in self.device_map.items()},
                "layer_devices": self.layer_devices(), "used_bytes": {str(k): v for k, v in self.used_bytes().items()},
                "max_memory": {str(k): v for k, v in self.max_memory.items()}}

    def table(self) -> str:
        """One line per device: its layers (as ranges), other modules, and bytes used of the allowed memory."""
        by_device: dict[int | str, list[str]] = {}
        layers: dict[int | str, list[int]] = {}
        for name, device in self.device_map.items():
            if name.startswith("model.layers."):
                layers.setdefault(device, []).append(int(name.rsplit(".", 1)[1]))
            else:
                by_device.setdefault(device, []).append(name.removeprefix("model."))
        used = self.used_bytes()
        lines = [f"device_map='auto' placement ({self.weights} weights, no weight loaded)"]
        for device in dict.fromkeys(self.device_map.values()):
            parts = [_ranges(layers[device])] if device in layers else []
            parts += by_device.get(device, [])
            cap = self.max_memory.get(device)
            limit = f" of {cap / 1e9:.1f}" if isinstance(cap, (int, float)) else ""
            label = f"GPU {device}" if isinstance(device, int) else device
            lines.append(f"  {label:<6} {used[device] / 1e9:6.1f}{limit} GB  {', '.join(parts)}")
        return "\n".join(lines) + "\n"


def _ranges(indices: list[int]) -> str:
    indices = sorted(indices)
    runs, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("layer " if len(indices) == 1 else "layers ") + ", ".join(runs)


def layer_placement(model: Any, max_memory: Mapping[int | str, float | int | str], weights: str = "bf16",
                    device_map: str = "auto") -> LayerPlacement:
    """Place a Step-3 model (config, preset or config path) over ``max_memory`` as ``device_map`` ("auto",
    "balanced", "balanced_low_0" or "sequential") would, on the meta device."""
    from accelerate import init_empty_weights
    from transformers.integrations.accelerate import (
        compute_module_sizes,
        get_balanced_memory,
        get_max_memory,
        infer_auto_device_map,
    )

    if weights not in _DTYPES:
        raise ValueError(f"`weights` must be one of {', '.join(_DTYPES)}, got {weights!r}")
    if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"`device_map` must be 'auto', 'balanced', 'balanced_low_0' or 'sequential', got {device_map!r}")
    if not max_memory:
        raise ValueError("`max_memory` must name at least one device")
    config = step3_config(model)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with init_empty_weights():
            meta = Step3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)

    if weights == "fp8":  # sizes come from the element size: the quantised weights become float8 (still on meta)
        for name, param in meta.named_parameters():
            if not any(k in name for k in _UNQUANTISED):
                param.data = param.data.to(_DTYPES[weights])
    no_split = meta._no_split_modules
    # accelerate warns once per device id that is not present on this machine: planning for absent GPUs is the point.
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        if device_map == "sequential":
            memory = get_max_memory(dict(max_memory))
        else:
            memory = get_balanced_memory(meta, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        placed = infer_auto_device_map(meta, max_memory=memory, no_split_module_classes=no_split,
                                       no_placement_params=getattr(meta, "_no_placement_params", None))
    finally:
        log.setLevel(level)
    sizes, _ = compute_module_sizes(meta)
    return LayerPlacement(dict(placed), {name: sizes[name] for name in placed}, dict(memory), weights)
