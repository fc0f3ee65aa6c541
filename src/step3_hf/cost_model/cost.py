"""Decoding cost in USD per 1M tokens and the MoE-sparsity limit (Step-3 report, sections 4.2 and 5.4).

Both sides are assumed to run at the card's roofline (the AFD assumption of the report):
attention = max(core FLOPs x U_flop, KV bytes x U_byte) + linear FLOPs x U_flop, FFN = FLOPs x U_flop.
Communication is assumed hidden by the pipeline, so it costs nothing here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from .accounting import ModelSpec, PerToken, Quantization, model_spec, per_token
from .hardware import Card

__all__ = ["CostReport", "attention_cost", "ffn_cost", "cost_report", "min_sparsity", "min_active_experts", "STAGE_MS"]

PER_MILLION = 1e6
# Section 5.4: with a 3-stage pipeline and 50 ms TPOT the network gets 16.6 ms; substituting the
# FFN batch B_MoE turns that into 16.6 ms x 2/3 = 11.1 ms, the constant printed in the report.
STAGE_MS = 11.1


def attention_cost(tok: PerToken, card: Card, quant: Quantization = Quantization()) -> float:
    """USD per 1M decoded tokens for attention (core + linear) on ``card``."""
    u_flop = card.usd_per_flop(quant.eight_bit)
    core = max(tok.attention_flops * u_flop, tok.kv_bytes * card.usd_per_byte())
    return (core + tok.linear_flops * u_flop) * PER_MILLION


def ffn_cost(tok: PerToken, card: Card, quant: Quantization = Quantization()) -> float:
    """USD per 1M decoded tokens for the activated FFN on ``card`` (compute-bound under AFD)."""
    return tok.ffn_flops * card.usd_per_flop(quant.eight_bit) * PER_MILLION


@dataclass(frozen=True)
class CostReport:
    """Costs of one model at one context on a set of cards."""

    per_token: PerToken
    attention: dict[str, float]  # card -> USD / 1M tokens
    ffn: dict[str, float]
    single: dict[str, float] = field(default_factory=dict)  # attention + FFN on the same card
    afd_attention_card: str = ""
    afd_ffn_card: str = ""
    afd: float = 0.0  # cheapest attention card + cheapest FFN card

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["afd_pair"] = f"{self.afd_attention_card}+{self.afd_ffn_card}"
        return out


def cost_report(model: Any, context: int, cards: Mapping[str, Card] | Sequence[Card],
                quant: Quantization = Quantization()) -> CostReport:
    cards = dict(cards) if isinstance(cards, Mapping) else {c.name: c for c in cards}
    if not cards:
        raise ValueError("no hardware cards given")
    tok = per_token(model, context, quant)
    att = {n: attention_cost(tok, c, quant) for n, c in cards.items()}
    ffn = {n: ffn_cost(tok, c, quant) for n, c in cards.items()}
    a_best = min(att, key=att.get)
    f_best = min(ffn, key=ffn.get)
    return CostReport(
        per_token=tok,
        attention=att,
        ffn=ffn,
        single={n: att[n] + ffn[n] for n in cards},
        afd_attention_card=a_best,
        afd_ffn_card=f_best,
        afd=att[a_best] + ffn[f_best],
    )


def min_sparsity(card: Card, hidden_size: int, num_layers: int, stage_ms: float = STAGE_MS,
                 eight_bit: bool = True) -> float:
    """Sparsest MoE the card can run at full MFU while the network hides in a 3-stage pipeline.

    S >= H * FLOPs * L / (Net * Bandwidth * 11.1 ms), FLOPs/Bandwidth per GPU, Net per server."""
    return (hidden_size * card.peak_flops(eight_bit) * num_layers
            / (card.server_network * card.memory_bandwidth * stage_ms * 1e-3))


def min_active_experts(spec: ModelSpec | Any, card: Card, stage_ms: float = STAGE_MS) -> float:
    """Experts (shared included) a token must use to reach :func:`min_sparsity` with the model's
    expert count, e.g. DeepSeek-V3 on H800: (256 + 1) x 0.058 - 1 = 14 routed experts."""
    spec = model_spec(spec)
    s = min_sparsity(card, spec.hidden_size, spec.num_layers, stage_ms)
    f = spec.ffn
    return max(0.0, (f.experts + f.shared_experts) * s - f.shared_experts)
