"""Step-3 under transformers' own parallelism: which `DistributedConfig` sizes its plans can split (checked before a
weight is loaded), and the configuration of attention data parallelism.

transformers splits a plan's matrices row- or column-wise without knowing what the rows mean. Step-3's query heads
(`wq`, `o_proj`) must go whole to the tensor-parallel ranks: a shard that ends inside a head fails later, in the
first forward, with a reshape error. The routed experts go whole to the expert-parallel ranks. The MLP widths and
the vocabulary need not divide (transformers >= 5.21 gives the last rank a shorter slice, and the slices of
`gate_proj`, `up_proj` and `down_proj` line up).

A block-FP8 checkpoint adds one more condition. transformers slices each `weight_scale_inv` by its own tile grid, in
the proportion its weight is sliced, so a shard that ends inside a tile gets the wrong scales (silently wrong
weights, or an error on some ranks only): every split dimension of a quantized weight must give each rank whole tiles.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from transformers import DistributedConfig

from .configuration_step3 import Step3Config

# FSDP2 rules (of `Step3ForCausalLM`) that keep the dense weights whole once the first forward has gathered them, so
# that decoding gathers nothing more; the routed experts stay split by expert.
KEEP_DENSE_WEIGHTS_WHOLE = {"model.embed_tokens": "keep_full_weight", "model.layers.*": "keep_full_weight"}


def _tp_split_size(distributed_config: Any) -> int:
    """The ranks the tensor-parallel plan splits the query heads over: `tp_size`, or 1 where no plan applies (a
    `tp_size` of one, or `tp_plan={}`, expert parallelism alone over the TP ranks)."""
    tp_size = getattr(distributed_config, "tp_size", None) or 1
    return tp_size if getattr(distributed_config, "tp_plan", None) != {} else 1


def check_parallel_sizes(config: Step3Config, distributed_config: Any, quantization_config: Any = None) -> None:
    """Raise a `ValueError` naming the field and the sizes when `distributed_config` (a transformers
    `DistributedConfig`, or None) cannot split `config`'s heads over its TP ranks or its experts over its EP ranks,
    or (with a block-FP8 `quantization_config`, dict or transformers config) would split an FP8 tile."""
    if distributed_config is None:
        return
    tp_size = _tp_split_size(distributed_config)
    if config.num_attention_heads % tp_size:
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
    check_fp8_tiles(config, distributed_config, quantization_config)


def _fp8_block(quantization_config: Any) -> tuple[tuple[int, int], bool] | None:
    """(weight_block_size, whether the weights are dequantized at load) of a block-FP8 quantization config."""
    if quantization_config is None:
        return None
    quantization = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
    block = quantization.get("weight_block_size")
    if quantization.get("quant_method") != "fp8" or not block:
        return None
    return (int(block[0]), int(block[1])), bool(quantization.get("dequantize", False))


def _fp8_split_weights(config: Step3Config) -> list[tuple[str, tuple[str, str], tuple[int, int], str]]:
    """(weight, (field of its rows, of its columns), shape, TP style) of each quantized weight that a plan may split.
    The routed experts are left out: EP and FSDP split them by expert, which never cuts a tile."""
    hidden, query = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_attention_groups * config.head_dim
    heads, groups = "num_attention_heads x head_dim", "num_attention_groups x head_dim"
    attention = "model.layers.*.self_attn"
    weights = [
        (f"{attention}.q_proj.weight", ("share_q_dim", "hidden_size"), (config.share_q_dim, hidden), "replicate"),
        (f"{attention}.k_proj.weight", (groups, "hidden_size"), (kv, hidden), "replicate"),
        (f"{attention}.v_proj.weight", (groups, "hidden_size"), (kv, hidden), "replicate"),
        (f"{attention}.wq.weight", (heads, "share_q_dim"), (query, config.share_q_dim), "colwise"),
        (f"{attention}.o_proj.weight", ("hidden_size", heads), (hidden, query), "rowwise"),
    ]
    mlps = []
    if len(config.moe_layer_indices) < config.num_hidden_layers:
        mlps.append(("mlp", "intermediate_size", config.intermediate_size))
    if config.moe_layer_indices:
        mlps.append(("mlp.shared_expert", "share_expert_dim", config.share_expert_dim))
    for module, field, width in mlps:
        prefix = f"model.layers.*.{module}"
        weights.append((f"{prefix}.gate_proj.weight", (field, "hidden_size"), (width, hidden), "colwise"))
        weights.append((f"{prefix}.up_proj.weight", (field, "hidden_size"), (width, hidden), "colwise"))
        weights.append((f"{prefix}.down_proj.weight", ("hidden_size", field), (hidden, width), "rowwise"))
    return weights


def check_fp8_tiles(config: Step3Config, distributed_config: Any, quantization_config: Any) -> None:
    """Raise a `ValueError` naming the weight, the field and the sizes when `distributed_config` would give a rank
    part of a block-FP8 tile. TP's column- and row-wise splits are checked always (a rank computes with its own slices
    of the weight and of its scales); FSDP's split of rows only where the weights are dequantized at load (on CPU),
    since FSDP otherwise shards the float8 weight and its scales each by its own shape and gathers both whole before
    use (not run on a GPU)."""
    fp8 = _fp8_block(quantization_config)
    if fp8 is None or distributed_config is None:
        return
    block, dequantized = fp8
    tp_size = _tp_split_size(distributed_config)
    fsdp_size = (getattr(distributed_config, "fsdp_size", None) or 1) if dequantized else 1
    for name, fields, shape, style in _fp8_split_weights(config):
        # FSDP shards rows (after TP, on the same dimension for a column-wise split).
        rows = [("tp_size", tp_size)] * (style == "colwise") + [("fsdp_size", fsdp_size)]
        columns = [("tp_size", tp_size)] * (style == "rowwise")
        for dim, splits in enumerate((rows, columns)):
            splits = [(what, size) for what, size in splits if size > 1]
            ranks = math.prod(size for _, size in splits)
            if ranks > 1 and shape[dim] % (ranks * block[dim]):
                sizes = " x ".join(f"{what} ({size})" for what, size in splits)
                raise ValueError(
                    f"{name} ({shape[0]} x {shape[1]}) is block-FP8 in {block[0]} x {block[1]} tiles: {sizes} would "
                    f"split its {('rows', 'columns')[dim]} ({fields[dim]} = {shape[dim]}) into {shape[dim] / ranks:g} "
                    f"per rank, not a whole number of {block[dim]}-wide tiles (transformers slices weight_scale_inv "
                    f"by its own tile grid, so the ranks' weights would get the wrong scales). Use sizes for which "
                    f"{fields[dim]} / ranks is a multiple of {block[dim]}."
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
