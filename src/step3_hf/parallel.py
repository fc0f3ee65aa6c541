"""Step-3 under transformers' own parallelism: which `DistributedConfig` sizes its plans can split (checked before a
weight is loaded), and the configuration of attention data parallelism.

transformers splits a plan's matrices row- or column-wise without knowing what the rows mean. Step-3's query heads
(`wq`, `o_proj`) must go whole to the tensor-parallel ranks: a shard that ends inside a head fails later, in the
first forward, with a reshape error. The routed experts go whole to the expert-parallel ranks. The MLP widths and
the vocabulary need not divide (transformers >= 5.21 gives the last rank a shorter slice, and the slices of
`gate_proj`, `up_proj` and `down_proj` line up).
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import DistributedConfig

from .configuration_step3 import Step3Config

# FSDP2 rules (of `Step3ForCausalLM`) that keep the dense weights whole once the first forward has gathered them, so
# that decoding gathers nothing more; the routed experts stay split by expert.
KEEP_DENSE_WEIGHTS_WHOLE = {"model.embed_tokens": "keep_full_weight", "model.layers.*": "keep_full_weight"}


def _splits_query_heads(distributed_config: Any) -> bool:
    """Whether `distributed_config` applies the tensor-parallel plan (which splits the query heads): a `tp_size`
    above one, unless `tp_plan={}` asks for no TP rule (expert parallelism alone over the TP ranks)."""
    tp_size = getattr(distributed_config, "tp_size", None) or 1
    return tp_size > 1 and getattr(distributed_config, "tp_plan", None) != {}


def check_parallel_sizes(config: Step3Config, distributed_config: Any) -> None:
    """Raise a `ValueError` naming the field and the sizes when `distributed_config` (a transformers
    `DistributedConfig`, or None) cannot split `config`'s heads over its TP ranks or its experts over its EP ranks."""
    if distributed_config is None:
        return
    tp_size = getattr(distributed_config, "tp_size", None) or 1
    if _splits_query_heads(distributed_config) and config.num_attention_heads % tp_size:
        raise ValueError(
            f"num_attention_heads ({config.num_attention_heads}) does not divide over tp_size ({tp_size}) ranks: "
            "tensor parallelism gives each rank whole query heads (wq, o_proj). Use a tp_size that divides "
            f"{config.num_attention_heads}, or tp_plan={{}} with ep_size for expert parallelism alone."
        )
    ep_size = getattr(distributed_config, "ep_size", None) or 1
    if ep_size > 1 and config.moe_layer_indices and config.moe_num_experts % ep_size:
        raise ValueError(
            f"moe_num_experts ({config.moe_num_experts}) does not divide over ep_size ({ep_size}) ranks: "
            f"expert parallelism gives each rank the same number of whole experts. Use an ep_size that divides "
            f"{config.moe_num_experts}."
        )


def attention_data_parallel_config(ranks: int) -> DistributedConfig:
    """Attention data parallelism with expert parallelism over `ranks` processes: each rank feeds its own sequences
    and computes their attention whole (so it holds their KV cache only), the routed experts are split by expert and
    the ranks exchange tokens all-to-all. transformers expresses it as FSDP with EP (`ep_size` must divide
    `fsdp_size * tp_size`): the dense weights load sharded and stay whole after the first forward
    (`KEEP_DENSE_WEIGHTS_WHOLE`). Needs transformers >= 5.21 (`ep_size`)."""
    if "ep_size" not in inspect.signature(DistributedConfig).parameters:
        raise ValueError("attention data parallelism needs transformers >= 5.21: this DistributedConfig has no ep_size")
    return DistributedConfig(fsdp_size=ranks, ep_size=ranks, fsdp_plan=dict(KEEP_DENSE_WEIGHTS_WHOLE))
