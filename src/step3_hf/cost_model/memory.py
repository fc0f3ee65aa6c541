"""Memory planner: which multi-GPU layouts hold a model's weights, KV cache and decode activations.

Sizes come from the cost model's accounting (:func:`~step3_hf.cost_model.accounting.model_spec`); this module only
decides which card holds which share. Per card, for every layout:

    weights share + KV cache of the sequences it serves + decode working set + reserve  <=  card memory

Layouts over ``N`` cards (``t`` x ``e`` = ``N`` for the mixed one):

* ``TP=N``: tensor parallelism with the routed experts split by expert over the same ``N`` cards. Query heads,
  ``o_proj``, dense and shared-expert MLPs split ``N`` ways; the LM head by vocabulary. (transformers'
  ``tp_plan="auto"`` alone keeps every routed expert on every card; the split by expert is its EP plan, so this row
  is ``tp_size=N`` with ``ep_size=N``, run on 2 and 4 CPU ranks.) Replicated: the embedding, norms, router,
  the low-rank query projection (``inter_norm`` needs all of it), and the K/V heads when there are fewer than ``N``
  (Step-3 has one, so every card holds the whole KV cache of every sequence). Query heads must divide by ``N``.
* ``EP=N``: expert parallelism as transformers runs it today (``DistributedConfig(tp_size=N, ep_size=N,
  tp_plan={})``): only the routed experts are split; every card runs the whole batch, so holds all of its KV.
* ``DP-attn+EP=N``: attention data parallelism (the deployment guides' advice for one KV head): experts split
  as in EP, but each card serves ``batch / N`` sequences and holds only their KV. transformers expresses it as FSDP
  with EP (``step3_hf.parallel.attention_data_parallel_config``), which keeps the FSDP shard of the dense weights
  (``1 / N`` of them) beside the whole ones: not counted here.
* ``TP=t x EP=e``: ``e`` attention groups of ``t`` tensor-parallel cards, each serving ``batch / e`` sequences;
  routed experts split over all ``N`` cards (transformers: ``tp_size=t, fsdp_size=e, ep_size=N``, whose FSDP
  shards the dense weights further; counted here at ``1 / t``).
* ``AFD xA+yF``: ``x`` attention and ``y`` FFN instances of ``gpus_per_instance`` cards. Attention cards hold the
  whole attention stack, embedding, LM head, norms and router (local DP attention, ``batch / attention cards``
  sequences each); FFN cards share the dense, shared and routed expert weights (TP/EP inside).

Assumptions, stated once: FP8 weights are the block-FP8 release (linear and expert weights 1 byte plus one fp32 scale
per 128 x 128 block; embedding, LM head, norms and router stay bf16); the decode working set per token is
``2 x (6 H + 3 attention width + 2 widest FFN width)`` bytes of bf16 activations plus ``6 V`` bytes of bf16 and
fp32 logits (prefill is assumed chunked to at most ``batch`` tokens); ``reserve_bytes`` covers the CUDA context,
allocator slack and communication buffers. Experts that do not divide over the cards round up (the busiest card
counts).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .accounting import ModelSpec, check_context, model_spec

__all__ = ["WEIGHT_FORMATS", "CardLoad", "LayoutFit", "MemoryFit", "WeightParams", "fit_layouts", "weight_params"]

# Bytes per stored value of the quantisable weights; the block-FP8 format adds one fp32 scale per 128 x 128 block.
WEIGHT_FORMATS = {"bf16": 2.0, "fp8": 1.0 + 4.0 / (128 * 128)}
KV_FORMATS = {"bf16": 2.0, "fp8": 1.0}
UNQUANTISED_BYTES = 2.0  # embedding, LM head, norms and router stay bf16 in FP8 releases
ACTIVATION_BYTES = 2.0


@dataclass(frozen=True)
class WeightParams:
    """Stored parameters of a model by how a parallel layout treats them (whole-model totals)."""

    embedding: int
    lm_head: int  # 0 when tied to the embedding
    norms: int
    router: int
    attention_replicated: int  # projections TP cannot split (MFA q_proj, MLA down-projections)
    attention_kv: int  # K/V projections, split by KV head
    attention_split: int  # the rest: query heads, o_proj
    dense: int
    shared_experts: int
    routed_experts: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    @property
    def attention(self) -> int:
        return self.attention_replicated + self.attention_kv + self.attention_split

    @property
    def ffn(self) -> int:
        return self.dense + self.shared_experts + self.routed_experts


def weight_params(model: Any) -> WeightParams:
    """Every stored parameter of ``model`` (a preset, config path, dict or :class:`ModelSpec`), by category."""
    spec = model_spec(model)
    if spec.vocab_size is None:
        raise ValueError(f"config of {spec.name!r} has no `vocab_size`: the embedding and LM head cannot be counted")
    a, f, h, L = spec.attention, spec.ffn, spec.hidden_size, spec.num_layers
    kv_proj = h * a.kv_elements_per_layer if a.kv_heads else 0
    return WeightParams(
        embedding=spec.vocab_size * h,
        lm_head=0 if spec.tie_word_embeddings else spec.vocab_size * h,
        norms=L * (2 * h + a.norm_params_per_layer) + h,
        router=f.moe_layers * f.router_params,
        attention_replicated=L * a.replicated_params_per_layer,
        attention_kv=L * kv_proj,
        attention_split=L * (a.linear_params_per_layer - a.replicated_params_per_layer - kv_proj),
        dense=f.dense_layers * f.dense_params,
        shared_experts=f.moe_layers * f.shared_params,
        routed_experts=f.moe_layers * (f.moe_total_params - f.shared_params),
    )


@dataclass(frozen=True)
class CardLoad:
    """What one card of a role holds, in bytes."""

    role: str
    cards: int
    weight_bytes: float
    kv_bytes: float
    activation_bytes: float
    reserve_bytes: float
    memory_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def headroom_bytes(self) -> float:
        return self.memory_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "headroom_bytes": self.headroom_bytes,
                "fits": self.fits}


@dataclass(frozen=True)
class LayoutFit:
    layout: str
    loads: tuple[CardLoad, ...] = ()
    impossible: str = ""  # why the layout cannot be built at all (then `loads` is empty)

    @property
    def fits(self) -> bool:
        return not self.impossible and all(load.fits for load in self.loads)

    @property
    def headroom_bytes(self) -> float | None:
        return min(load.headroom_bytes for load in self.loads) if self.loads else None

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout, "fits": self.fits, "headroom_bytes": self.headroom_bytes,
                "impossible": self.impossible or None, "cards": [load.to_dict() for load in self.loads]}


@dataclass(frozen=True)
class MemoryFit:
    model: str
    cards: int
    memory_bytes: float
    weights: str
    kv: str
    batch: int
    context: int
    reserve_bytes: float
    weight_bytes: float  # whole model
    kv_bytes_per_sequence: float
    layouts: list[LayoutFit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layouts"] = [layout.to_dict() for layout in self.layouts]
        return out


def _weight_bytes(p: WeightParams, fmt: float, *, embedding: float = 1, lm_head: float = 1, norms: float = 1,
                  router: float = 1, attention_replicated: float = 1, attention_kv: float = 1,
                  attention_split: float = 1, dense: float = 1, shared_experts: float = 1,
                  routed_experts: float = 1) -> float:
    """Bytes of the given share of each category on one card."""
    plain = (p.embedding * embedding + p.lm_head * lm_head + p.norms * norms + p.router * router)
    quantised = (p.attention_replicated * attention_replicated + p.attention_kv * attention_kv
                 + p.attention_split * attention_split + p.dense * dense + p.shared_experts * shared_experts
                 + p.routed_experts * routed_experts)
    return plain * UNQUANTISED_BYTES + quantised * fmt


def _expert_share(spec: ModelSpec, ranks: int) -> float:
    """Share of the routed experts on the busiest of ``ranks`` cards: whole experts, rounded up; below one expert
    per card the experts are split inside (TP), evenly."""
    experts = spec.ffn.experts
    if not experts:
        return 1 / ranks
    return math.ceil(experts / ranks) / experts if ranks <= experts else 1 / ranks


def _kv_head_share(spec: ModelSpec, ranks: int) -> float:
    """Share of the K/V heads (projections and cache) a tensor-parallel rank holds: heads are never split, so fewer
    heads than ranks are replicated; a latent (MLA) is held whole."""
    heads = spec.attention.kv_heads
    return math.ceil(heads / ranks) / heads if heads else 1.0


def _activation_bytes(spec: ModelSpec, tokens: int, logits: bool = True) -> float:
    f, h = spec.ffn, spec.hidden_size
    attention_width = spec.attention.core_flops_per_layer // 4  # heads x head dim (MFA/GQA); absorbed MLA width
    ffn_width = max(f.dense_params if f.dense_layers else 0, f.moe_active_params if f.moe_layers else 0) // (3 * h)
    per_token = ACTIVATION_BYTES * (6 * h + 3 * attention_width + 2 * ffn_width)
    if logits:
        per_token += 6 * (spec.vocab_size or 0)  # bf16 logits and their fp32 copy for sampling
    return tokens * per_token


def fit_layouts(model: Any, memory_bytes: float, cards: int, *, weights: str = "bf16", kv: str = "fp8",
                batch: int = 64, context: int = 8192, gpus_per_instance: int | None = None,
                reserve_bytes: float = 2e9) -> MemoryFit:
    """Per-card memory of every layout of ``model`` over ``cards`` cards of ``memory_bytes`` each, serving ``batch``
    sequences of ``context`` tokens. ``gpus_per_instance`` sizes AFD instances (default: 8 where the count allows
    two instances of 8, else half the cards)."""
    check_context(context)
    for key, value in (("cards", cards), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{key}` must be a positive integer, got {value!r}")
    if not (isinstance(memory_bytes, (int, float)) and math.isfinite(memory_bytes) and memory_bytes > 0):
        raise ValueError(f"`memory_bytes` must be a positive number, got {memory_bytes!r}")
    if not (isinstance(reserve_bytes, (int, float)) and math.isfinite(reserve_bytes) and reserve_bytes >= 0):
        raise ValueError(f"`reserve_bytes` must be a non-negative number, got {reserve_bytes!r}")
    for key, value, formats in (("weights", weights, WEIGHT_FORMATS), ("kv", kv, KV_FORMATS)):
        if value not in formats:
            raise ValueError(f"`{key}` must be one of {', '.join(formats)}, got {value!r}")
    if gpus_per_instance is not None and (isinstance(gpus_per_instance, bool) or not isinstance(gpus_per_instance, int)
                                          or gpus_per_instance < 1):
        raise ValueError(f"`gpus_per_instance` must be a positive integer, got {gpus_per_instance!r}")

    spec = model_spec(model)
    p = weight_params(spec)
    fmt = WEIGHT_FORMATS[weights]
    kv_seq = spec.num_layers * spec.attention.kv_elements_per_layer * KV_FORMATS[kv] * context
    n_heads = spec.attention.query_heads

    def load(role: str, n: int, weight: float, sequences: float, tokens: int, logits: bool = True) -> CardLoad:
        return CardLoad(role, n, weight, sequences * kv_seq, _activation_bytes(spec, tokens, logits), reserve_bytes,
                        memory_bytes)

    def tensor_parallel(t: int, groups: int, label: str) -> LayoutFit:
        if n_heads % t:
            return LayoutFit(label, impossible=f"{n_heads} query heads do not divide over {t} ranks")
        kv_share = _kv_head_share(spec, t)
        vocab_share = math.ceil((spec.vocab_size or 0) / t) / spec.vocab_size if spec.vocab_size else 1 / t
        w = _weight_bytes(p, fmt, lm_head=vocab_share, attention_kv=kv_share, attention_split=1 / t, dense=1 / t,
                          shared_experts=1 / t, routed_experts=_expert_share(spec, t * groups))
        sequences = math.ceil(batch / groups)
        return LayoutFit(label, (load("every card", t * groups, w, sequences * kv_share, sequences),))

    layouts = [tensor_parallel(cards, 1, f"TP={cards}")]
    if spec.ffn.moe_layers:
        ep_weights = _weight_bytes(p, fmt, routed_experts=_expert_share(spec, cards))
        if spec.ffn.experts < cards:
            reason = f"{spec.ffn.experts} experts cannot be split over {cards} ranks by expert"
            layouts += [LayoutFit(f"EP={cards}", impossible=reason), LayoutFit(f"DP-attn+EP={cards}", impossible=reason)]
        else:
            layouts.append(LayoutFit(f"EP={cards}", (load("every card", cards, ep_weights, batch, batch),)))
            per_card = math.ceil(batch / cards)
            layouts.append(LayoutFit(f"DP-attn+EP={cards}", (load("every card", cards, ep_weights, per_card, per_card),)))
        for t in range(2, cards):
            if cards % t == 0:
                layouts.append(tensor_parallel(t, cards // t, f"TP={t} x EP={cards // t}"))

    g = gpus_per_instance or (8 if cards % 8 == 0 and cards >= 16 else max(1, cards // 2))
    if cards % g == 0 and cards // g >= 2:
        instances = cards // g
        for x in range(1, instances):
            a, f = x * g, (instances - x) * g
            attention = load("attention card", a,
                             _weight_bytes(p, fmt, dense=0, shared_experts=0, routed_experts=0),
                             math.ceil(batch / a), math.ceil(batch / a))
            ffn = load("FFN card", f,
                       _weight_bytes(p, fmt, embedding=0, lm_head=0, norms=0, router=0, attention_replicated=0,
                                     attention_kv=0, attention_split=0, dense=1 / f, shared_experts=1 / f,
                                     routed_experts=_expert_share(spec, f)),
                       0, batch, logits=False)
            layouts.append(LayoutFit(f"AFD {x}A+{instances - x}F", (attention, ffn)))
    else:
        layouts.append(LayoutFit(f"AFD (instances of {g})",
                                 impossible=f"{cards} cards do not make two or more instances of {g}"))

    return MemoryFit(model=spec.name, cards=cards, memory_bytes=float(memory_bytes), weights=weights, kv=kv,
                     batch=batch, context=context, reserve_bytes=float(reserve_bytes),
                     weight_bytes=_weight_bytes(p, fmt), kv_bytes_per_sequence=kv_seq, layouts=layouts)
