"""Parameter and KV-cache accounting of a Step-3 config, without building the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .checkpoint_layout import is_routed_expert_tensor, official_tensor_shapes
from .configuration_step3 import Step3Config


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    """Every language-model parameter (embedding and LM head included)."""
    activated: int
    """Parameters a decoded token touches: all but the routed experts, plus `moe_top_k` of them per MoE layer;
    of the embedding table only the token's own row."""
    routed_experts: int
    """Parameters of all routed experts."""

    def __str__(self) -> str:
        return f"{human_count(self.total)} parameters, {human_count(self.activated)} activated per token"


def human_count(count: float, unit: str = "") -> str:
    """`316.3B` for parameters; with a unit, `794.5KB` / `1.2GB` (G, not B, for 1e9 of a unit)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}{unit}"
    return f"{count:g}{' ' + unit if unit else ''}"


def count_parameters(config: Step3Config) -> ParameterCounts:
    """Count total and per-token activated parameters of the language model described by `config`."""
    config = config.get_text_config()
    total = routed = 0
    for name, shape in official_tensor_shapes(config).items():
        numel = math.prod(shape)
        total += numel
        if is_routed_expert_tensor(name):
            routed += numel
    embedding = config.vocab_size * config.hidden_size
    activated = total - embedding + config.hidden_size - routed + routed * config.moe_top_k // config.moe_num_experts
    return ParameterCounts(total=total, activated=activated, routed_experts=routed)


def kv_cache_bytes_per_token(config: Step3Config, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token occupies over all layers: K and V for each shared KV head."""
    config = config.get_text_config()
    per_layer = 2 * config.num_attention_groups * config.head_dim * bytes_per_value
    return per_layer * config.num_hidden_layers
