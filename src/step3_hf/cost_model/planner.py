"""Attention-FFN Disaggregation (AFD) planner (Step-3 report, sections 3, 5.3-5.4, 6 and 7.3).

The decode step is a 3-stage pipeline (attention -> network -> FFN) with as many micro-batches in
flight as stages, so each stage of each layer gets ``TPOT / stages / layers`` (50 ms, 3, 61 -> 273 us).
The FFN side is sized once, independent of context; attention instances are then added until the
attention of one micro-batch fits the same per-layer budget. Steps and assumptions:

1. FFN instances: the fewest that stream one FFN layer's weights within the budget at
   ``ffn_bandwidth_efficiency`` of peak bandwidth (50%, the report's section 6 assumption).
2. Tokens per micro-batch: as many as those FFN GPUs can compute within the budget and as the FFN
   server NICs can move within it (A->F plus F->A bytes, section 5.4). More tokens per weight read is
   what keeps the FFN efficient; it is efficient (compute-bound at full bandwidth) once the micro-batch
   reaches B_MoE = peak / (2 x sparsity x bandwidth) (section 5.3), which on a given card is the same
   test as "sparsity >= minimum sparsity" (section 5.4).
3. Attention instances: the fewest whose GPUs (local DP attention) run the micro-batch's attention at
   the card's roofline -- max(core FLOPs, KV bytes) + linear FLOPs per token, as in the cost model --
   within the budget, and whose NICs carry the traffic of step 4 within it. KV grows with context, so
   this count, and the A:F ratio, grows with context.
4. Per layer and token, A->F carries the FP8 hidden state, one fp32 scale per 128 values and the top-k
   expert ids (int32) and weights (fp32); F->A carries the BF16 result. Attention instances broadcast
   to every FFN instance and combine partial results from each.

Not modelled: memory capacity (the report's Table 4 lists none; ``kv_bytes_per_attention_gpu`` shows
the footprint), kernel efficiency below roofline on the attention side, expert imbalance, and
latency beyond bandwidth. Real deployments with sub-roofline kernels run smaller micro-batches at
the same ratio (the report's 2A2F ran 3 x 2048 tokens at 4K).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .accounting import ModelSpec, Quantization, check_context, model_spec
from .hardware import Card

__all__ = ["PlanAssumptions", "AFDPlan", "plan_afd"]


@dataclass(frozen=True)
class PlanAssumptions:
    tpot_ms: float = 50.0
    stages: int = 3  # attention / communication / FFN, one micro-batch each
    gpus_per_instance: int = 8  # one server per instance
    ffn_bandwidth_efficiency: float = 0.5  # fraction of peak bandwidth the FFN reaches (report section 6)
    scale_block: int = 128  # FP8 activation values per fp32 scale
    expert_id_bytes: int = 4
    expert_weight_bytes: int = 4
    dispatch_bytes: float = 1.0  # FP8 hidden state A->F
    combine_bytes: float = 2.0  # BF16 result F->A
    micro_batch: int | None = None  # fix the tokens per micro-batch instead of deriving them

    def __post_init__(self) -> None:
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"`{key}` must be {rule}, got {getattr(self, key)!r}")

        if not (isinstance(self.tpot_ms, (int, float)) and math.isfinite(self.tpot_ms) and self.tpot_ms > 0):
            raise bad("tpot_ms", "a positive number of milliseconds")
        if not 0 < self.ffn_bandwidth_efficiency <= 1:
            raise bad("ffn_bandwidth_efficiency", "in (0, 1]")
        for key in ("stages", "gpus_per_instance", "scale_block", "micro_batch"):
            value = getattr(self, key)
            if value is None and key == "micro_batch":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "an integer >= 1")
        for key in ("expert_id_bytes", "expert_weight_bytes", "dispatch_bytes", "combine_bytes"):
            if not getattr(self, key) > 0:
                raise bad(key, "positive")


@dataclass(frozen=True)
class AFDPlan:
    model: str
    context: int
    attention_card: str
    ffn_card: str
    stage_budget_us: float  # per layer, per stage
    micro_batch: int  # tokens per micro-batch
    total_batch: int  # tokens in flight (micro_batch x stages)
    min_efficient_micro_batch: int  # B_MoE: smallest micro-batch with a compute-bound FFN
    ffn_efficient: bool
    attention_instances: int
    ffn_instances: int
    attention_time_us: float  # one micro-batch, one layer
    ffn_time_us: float
    ffn_utilisation: float  # compute time / FFN stage time
    a2f_bytes_per_token_layer: float
    f2a_bytes_per_token_layer: float
    a2f_bytes_per_layer: float  # whole micro-batch, all FFN instances together
    f2a_bytes_per_layer: float
    ffn_server_bandwidth_needed: float  # bytes/s through one FFN server's NICs
    attention_server_bandwidth_needed: float
    network_time_us: float  # the busier side, at the servers' aggregate NIC bandwidth
    fits: bool  # every stage within budget and the FFN compute-bound
    tokens_per_s_per_gpu: float
    kv_bytes_per_attention_gpu: float  # KV of all in-flight sequences, per attention GPU
    kv_fits_memory: bool | None  # that KV within the attention card's memory (None: capacity unknown)

    @property
    def shape(self) -> str:
        return f"{self.attention_instances}A{self.ffn_instances}F"

    @property
    def ratio(self) -> float:
        return self.attention_instances / self.ffn_instances

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape"], out["ratio"] = self.shape, self.ratio
        return out


def plan_afd(model: Any, attention_card: Card, ffn_card: Card, context: int,
             assumptions: PlanAssumptions = PlanAssumptions(),
             quant: Quantization = Quantization()) -> AFDPlan:
    check_context(context)
    spec: ModelSpec = model_spec(model)
    p, g = assumptions, assumptions.gpus_per_instance
    budget = p.tpot_ms * 1e-3 / p.stages / spec.num_layers  # seconds per layer per stage

    # FFN: the largest FFN layer sets the pace (MoE layers for MoE models).
    ffn_weight_bytes = spec.max_ffn_layer_params * quant.weight_bytes
    ffn_flops_per_token = 2.0 * spec.max_ffn_layer_active_params
    f_peak = ffn_card.peak_flops(quant.eight_bit)
    stream_rate = p.ffn_bandwidth_efficiency * ffn_card.memory_bandwidth * g  # bytes/s per instance
    n_ffn = max(1, math.ceil(ffn_weight_bytes / (stream_rate * budget)))
    tokens_per_instance = g * f_peak * budget / ffn_flops_per_token  # compute capacity in one stage
    min_efficient = math.ceil(f_peak * ffn_weight_bytes / (ffn_flops_per_token * ffn_card.memory_bandwidth))

    h, k = spec.hidden_size, spec.ffn.top_k
    a2f = (h * p.dispatch_bytes + math.ceil(h / p.scale_block) * 4
           + k * (p.expert_id_bytes + p.expert_weight_bytes))
    f2a = h * p.combine_bytes
    per_tok_bytes = a2f + f2a
    network_limit = ffn_card.server_network * budget / per_tok_bytes

    if p.micro_batch is not None:
        batch = int(p.micro_batch)
        n_ffn = max(n_ffn, math.ceil(batch / tokens_per_instance))
    else:
        batch = int(min(network_limit, n_ffn * tokens_per_instance))
    if batch < 1:
        raise ValueError(f"no micro-batch fits: {ffn_card.name} NICs move {network_limit:.2f} tokens per stage")

    compute_t = batch * ffn_flops_per_token / (n_ffn * g * f_peak)
    ffn_t = max(compute_t, ffn_weight_bytes / (n_ffn * stream_rate))

    # Attention: per token per layer at the roofline, local DP over every attention GPU.
    a, a_peak = spec.attention, attention_card.peak_flops(quant.eight_bit)
    per_tok = (max(a.core_flops_per_layer * context / a_peak,
                   a.kv_elements_per_layer * context * quant.kv_bytes / attention_card.memory_bandwidth)
               + 2.0 * a.linear_params_per_layer / a_peak)
    # Enough attention GPUs for the compute/KV reads, and enough attention servers for their NICs
    # to carry the broadcast to (and partial results from) every FFN instance.
    n_att = max(1, math.ceil(batch * per_tok / (g * budget) - 1e-9),
                math.ceil(batch * per_tok_bytes * n_ffn / (attention_card.server_network * budget) - 1e-9))
    att_t = batch * per_tok / (n_att * g)

    ffn_bw = batch * per_tok_bytes / budget  # every FFN server sees every token (broadcast + partial sums)
    att_bw = batch / n_att * per_tok_bytes * n_ffn / budget
    net_t = max(batch * per_tok_bytes / ffn_card.server_network,
                batch / n_att * per_tok_bytes * n_ffn / attention_card.server_network)

    efficient = batch >= min_efficient
    kv_per_token = spec.num_layers * a.kv_elements_per_layer * quant.kv_bytes
    kv_per_gpu = batch * p.stages / (n_att * g) * context * kv_per_token
    return AFDPlan(
        model=spec.name,
        context=context,
        attention_card=attention_card.name,
        ffn_card=ffn_card.name,
        stage_budget_us=budget * 1e6,
        micro_batch=batch,
        total_batch=batch * p.stages,
        min_efficient_micro_batch=min_efficient,
        ffn_efficient=efficient,
        attention_instances=n_att,
        ffn_instances=n_ffn,
        attention_time_us=att_t * 1e6,
        ffn_time_us=ffn_t * 1e6,
        ffn_utilisation=compute_t / ffn_t,
        a2f_bytes_per_token_layer=a2f,
        f2a_bytes_per_token_layer=f2a,
        a2f_bytes_per_layer=batch * a2f,
        f2a_bytes_per_layer=batch * f2a,
        ffn_server_bandwidth_needed=ffn_bw,
        attention_server_bandwidth_needed=att_bw,
        network_time_us=net_t * 1e6,
        fits=efficient and max(att_t, ffn_t, net_t) <= budget * (1 + 1e-9),
        tokens_per_s_per_gpu=batch * p.stages / (p.tpot_ms * 1e-3 * g * (n_att + n_ffn)),
        kv_bytes_per_attention_gpu=kv_per_gpu,
        # KV alone (weights and activations come on top): a lower bound on what the attention GPU must hold.
        kv_fits_memory=None if attention_card.memory_bytes is None else kv_per_gpu <= attention_card.memory_bytes,
    )
