"""The FFN side of a disaggregated Step-3: the dense MLPs, shared experts and (a range of) routed experts,
and the serve loop that runs them on whatever the attention ranks send.

Each layer's FFN half is the model's own module: `Step3MLP` for dense layers and `Step3SparseMoeBlock` without its
router (`Step3FFNMoE`) for MoE layers. With several FFN ranks, each owns a contiguous range of experts
(`Step3Experts` in transformers' expert-parallel mode: tokens routed elsewhere get the sentinel id and weight 0, and
grouped_mm skips them) and a slice of the intermediate channels of every dense MLP and shared expert; its output is
a partial sum.

From a block-FP8 checkpoint each FFN rank reads its experts' float8 weights and scales only. On CUDA they stay in
float8 (transformers' `FP8Experts`, computed through `moe_decode`'s FP8 path, which takes expert-parallel calls too);
elsewhere they are dequantized once at load. The dense MLPs and shared experts, split by channel (a cut that need
not fall on a tile edge), are dequantized at load on every device.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.utils import logging

from ..checkpoint_layout import BASE_MODEL_PREFIX, EXPERTS_DOWN, EXPERTS_GATE, EXPERTS_UP, SHARED_EXPERT
from ..configuration_step3 import Step3Config
from ..fp8 import SCALE_SUFFIX, quantize_experts_into
from ..loading import BrokenCheckpointError
from ..modeling_step3 import Step3MLP, Step3PreTrainedModel, Step3SparseMoeBlock
from .checkpoint import CheckpointReader
from .connector import FFNConnector
from .placement import Placement
from .timing import PhaseTimer

logger = logging.get_logger(__name__)


class Step3FFNMoE(Step3SparseMoeBlock):
    """The model's own MoE block without its router (the routing arrives with the hidden states), over this FFN
    rank's range of experts and of shared-expert channels; returns this rank's (partial) sum."""

    def __init__(self, config: Step3Config, experts: tuple[int, int], channels: tuple[int, int]):
        super().__init__(config)
        del self.gate  # the router runs on the attention side
        self.first_expert, last = experts
        local = last - self.first_expert
        self.split = local != config.moe_num_experts
        if self.split:
            self.experts.num_experts = local
            self.experts.gate_up_proj = nn.Parameter(torch.empty(local, 2 * config.moe_intermediate_size, config.hidden_size))
            self.experts.down_proj = nn.Parameter(torch.empty(local, config.hidden_size, config.moe_intermediate_size))
            self.experts._is_expert_parallel = True
        if channels[1] - channels[0] != config.share_expert_dim:
            self.shared_expert = Step3MLP(config, intermediate_size=channels[1] - channels[0])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.split:
            local = top_k_index - self.first_expert
            elsewhere = (local < 0) | (local >= self.experts.num_experts)
            top_k_index = local.masked_fill(elsewhere, self.experts.num_experts)
            top_k_weights = top_k_weights.masked_fill(elsewhere, 0.0)
        return self.experts(hidden_states, top_k_index, top_k_weights) + self.shared_expert(hidden_states)


def ffn_layer_shard(config: Step3Config, layer_idx: int, placement: Placement, ffn_index: int) -> nn.Module:
    """One layer's FFN half on one FFN rank: `Step3FFNMoE` or a channel slice of the dense `Step3MLP`."""
    if layer_idx in config.moe_layer_indices:
        return Step3FFNMoE(
            config,
            placement.expert_range(ffn_index, config.moe_num_experts),
            placement.channel_range(ffn_index, config.share_expert_dim),
        )
    c0, c1 = placement.channel_range(ffn_index, config.intermediate_size)
    return Step3MLP(config, intermediate_size=c1 - c0)


def _ffn_tensors(config: Step3Config, placement: Placement, ffn_index: int):
    """(module name, [(official name, slice index)], concat dim) of every tensor this FFN rank owns."""
    moe = set(config.moe_layer_indices)
    for layer in range(config.num_hidden_layers):
        src, dst = f"{BASE_MODEL_PREFIX}layers.{layer}.", f"layers.{layer}."
        if layer in moe:
            mlp_src, mlp_dst, width = src + SHARED_EXPERT, dst + "shared_expert.", config.share_expert_dim
        else:
            mlp_src, mlp_dst, width = src + "mlp.", dst, config.intermediate_size
        channels = slice(*placement.channel_range(ffn_index, width))
        yield mlp_dst + "gate_proj.weight", [(mlp_src + "gate_proj.weight", (channels,))]
        yield mlp_dst + "up_proj.weight", [(mlp_src + "up_proj.weight", (channels,))]
        yield mlp_dst + "down_proj.weight", [(mlp_src + "down_proj.weight", (slice(None), channels))]
        if layer in moe:
            experts = (slice(*placement.expert_range(ffn_index, config.moe_num_experts)),)
            yield dst + "experts.gate_up_proj", [(src + EXPERTS_GATE, experts), (src + EXPERTS_UP, experts)]
            yield dst + "experts.down_proj", [(src + EXPERTS_DOWN, experts)]


def _fp8_experts_module(experts: nn.Module, config: Step3Config, block_size: tuple[int, int]) -> nn.Module:
    """transformers' `FP8Experts` (with the experts-implementation dispatch) in place of `experts`, for the same
    (local) number of experts, its float8 weights and scales still to be loaded."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    experts_class = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS)
    with torch.device("meta"):
        fp8 = experts_class(config=config, block_size=block_size)
    fp8.num_experts = experts.num_experts
    fp8._is_expert_parallel = getattr(experts, "_is_expert_parallel", False)
    return fp8


def _load_fp8_experts(shard, reader: CheckpointReader, module_name: str, sources, device) -> set[str]:
    """Read one fused experts weight (`experts.gate_up_proj`, gate then up rows, or `experts.down_proj`) of this
    rank's experts as float8 with its scales into an `FP8Experts`; returns the parameter names it set."""
    block_name, param = module_name.rsplit(".experts.", 1)
    block = shard.get_submodule(block_name)
    if not getattr(block.experts, "block_size", None):
        block.experts = _fp8_experts_module(block.experts, shard.config, reader.block_size)
    parts = [reader.read_fp8(name, device=device, index=index) for name, index in sources]
    if len(parts) > 1 and any(weight.shape[1] % reader.block_size[0] for weight, _ in parts):
        # gate and up rows are fused: their scale rows concatenate only if neither ends inside a tile
        raise ValueError(f"{sources[0][0]}: FP8 experts need whole {list(reader.block_size)} tiles to fuse gate and up")
    weight = torch.cat([w for w, _ in parts], dim=1)
    scale = torch.cat([s for _, s in parts], dim=1)
    experts = block.experts
    local, hidden, inter = experts.num_experts, experts.hidden_dim, experts.intermediate_dim
    expected = (local, 2 * inter, hidden) if param == "gate_up_proj" else (local, hidden, inter)
    if tuple(weight.shape) != expected:  # the open-time check saw the full tensors; this is the slice taken
        raise BrokenCheckpointError(
            f"{reader.path}: {sources[0][0]} gave {tuple(weight.shape)} for this FFN rank's experts, "
            f"expected {expected}"
        )
    setattr(experts, param, nn.Parameter(weight, requires_grad=False))
    setattr(experts, param + SCALE_SUFFIX, nn.Parameter(scale, requires_grad=False))
    return {f"{block_name}.experts.{param}", f"{block_name}.experts.{param}{SCALE_SUFFIX}"}


class Step3FFNShard(nn.Module):
    """All layers' FFN halves owned by one FFN rank; `layers.{i}` holds what `Step3ForCausalLM` holds as
    `model.layers.{i}.mlp` (its share of it, with several FFN ranks), under the same names, less the router."""

    def __init__(self, config: Step3Config, placement: Placement, ffn_index: int):
        super().__init__()
        config = copy.deepcopy(config)
        # Step-3's default (the moe_decode kernel for decode-sized calls on CUDA, which hands expert-parallel calls
        # to grouped_mm), else grouped_mm: the implementation that skips EP sentinels.
        config._experts_implementation = Step3PreTrainedModel._default_experts_implementation() or "grouped_mm"
        self.config = config
        self.placement = placement
        self.ffn_index = ffn_index
        self.layers = nn.ModuleList(
            ffn_layer_shard(config, i, placement, ffn_index) for i in range(config.num_hidden_layers)
        )

    @classmethod
    def _empty(cls, config, placement, ffn_index, device, dtype) -> "Step3FFNShard":
        with torch.device("meta"):
            shard = cls(config, placement, ffn_index)
        return shard.to(dtype).to_empty(device=device).eval()  # cast on meta: allocated once, in `dtype`

    @classmethod
    def from_checkpoint(
        cls, reader: CheckpointReader, placement: Placement, ffn_index: int, *,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, fp8_experts: bool | None = None,
    ) -> "Step3FFNShard":
        """Read exactly this rank's FFN tensors (its experts, its MLP channels) from an official checkpoint.

        From a block-FP8 checkpoint, `fp8_experts` keeps the routed experts in float8 with their scales (default: on
        CUDA, where `moe_decode` computes them; elsewhere they are dequantized to `dtype` once, here)."""
        device = torch.device(device)
        shard = cls._empty(reader.config, placement, ffn_index, device, dtype)
        keep_fp8 = reader.keeps_fp8(device, fp8_experts)
        if reader.block_size is not None:
            rank = placement.describe(placement.attention_ranks + ffn_index)
            if keep_fp8:
                logger.info(f"AFD {rank}: routed experts kept in float8 with their block scales")
            else:
                logger.warning(f"AFD {rank}: FP8 expert weights dequantized to {dtype} at load ({device.type} has no "
                               "FP8 expert kernel here)")  # fmt: skip
        params = dict(shard.named_parameters())
        loaded = set()
        with torch.no_grad():
            for module_name, sources in _ffn_tensors(reader.config, placement, ffn_index):
                if keep_fp8 and ".experts." in module_name:
                    loaded |= _load_fp8_experts(shard, reader, module_name, sources, device)
                    continue
                parts = [reader.read(name, dtype=dtype, device=device, index=index) for name, index in sources]
                params[module_name].copy_(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
                loaded.add(module_name)
        params = dict(shard.named_parameters())
        if keep_fp8:  # `moe_decode` computes FP8Experts: the kernel where it runs, else one expert at a time
            shard.config._experts_implementation = "moe_decode"
        if loaded != set(params):
            raise RuntimeError(f"FFN shard parameters not loaded: {sorted(set(params) ^ loaded)[:8]}")
        return shard

    @classmethod
    def from_random(
        cls, config: Step3Config, placement: Placement, ffn_index: int, *, device="cpu", dtype=torch.bfloat16,
        std: float = 0.02, seed: int = 1, fp8_block_size: tuple[int, int] | None = None,
    ) -> "Step3FFNShard":
        """Random weights (benchmarks, tests). With `fp8_block_size` the routed experts are quantized to block FP8
        afterwards, as `from_checkpoint` keeps them from an FP8 checkpoint (the rest stays in `dtype`)."""
        shard = cls._empty(config, placement, ffn_index, device, dtype)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for param in shard.parameters():
                param.normal_(0.0, std, generator=generator)
        if fp8_block_size is not None:
            block_size = tuple(fp8_block_size)
            for block in shard.layers:
                if isinstance(block, Step3FFNMoE):
                    experts = _fp8_experts_module(block.experts, shard.config, block_size)
                    quantize_experts_into(experts, block.experts, block_size)
                    block.experts = experts
            shard.config._experts_implementation = "moe_decode"
        return shard

    def set_experts_implementation(self, implementation: str) -> None:
        """The routed experts' implementation (`moe_decode`, `grouped_mm`, ...), as `PreTrainedModel` sets it."""
        known = {"eager", *ALL_EXPERTS_FUNCTIONS.keys()}
        if implementation not in known:
            raise ValueError(f"unknown experts implementation {implementation!r}; known: {sorted(known)}")
        self.config._experts_implementation = implementation  # every layer's experts share this config

    def forward(self, layer: int, hidden, top_k_index=None, top_k_weights=None) -> torch.Tensor:
        """This rank's (partial) `FFN(hidden)` of layer `layer`, no residual; MoE layers take the routing."""
        block = self.layers[layer]
        if isinstance(block, Step3FFNMoE):
            if top_k_index is None:
                raise ValueError(f"layer {layer} is an MoE layer: its FFN needs the routing (top_k_index, top_k_weights)")
            return block(hidden, top_k_index, top_k_weights)
        return block(hidden)


@torch.no_grad()
def serve(shard: Step3FFNShard, connector: FFNConnector, timer: PhaseTimer) -> None:
    """Answer the attention ranks until every one of them has said it is done.

    Each round takes what has arrived; messages for the same layer (attention ranks run the same schedule, so
    usually those of every rank) are concatenated and computed as one batch.
    """
    while not connector.finished:
        arrivals = connector.receive_round()
        if not arrivals:
            continue
        timer.start_step()
        by_layer = defaultdict(list)
        for position, arrival in enumerate(arrivals):
            by_layer[arrival.layer].append(position)
        results: list[torch.Tensor | None] = [None] * len(arrivals)
        for layer, positions in by_layer.items():
            group = [arrivals[p] for p in positions]
            with timer.phase("ffn"):
                hidden = torch.cat([a.hidden for a in group])
                routed = group[0].top_k_index is not None
                top_k_index = torch.cat([a.top_k_index for a in group]) if routed else None
                top_k_weights = torch.cat([a.top_k_weights for a in group]) if routed else None
                out = shard(layer, hidden, top_k_index, top_k_weights)
            for position, part in zip(positions, out.split([a.hidden.shape[0] for a in group])):
                results[position] = part
        # Answer in arrival order: each attention rank matches its answers to its dispatches by order alone.
        for arrival, result in zip(arrivals, results):
            connector.respond(arrival, result)
        timer.end_step()
    connector.close()
