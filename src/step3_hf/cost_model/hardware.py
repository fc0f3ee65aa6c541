"""Accelerator specs and unit costs (Step-3 report, Tables 4 and 5).

Built-in cards are the report's H800, H20, A800 and 910B; more come from JSON files with the same
fields (one card object, or a list of them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable

__all__ = ["Card", "builtin_cards", "load_cards", "card_from_dict"]

_REQUIRED = ("name", "price_per_hour_usd", "bf16_flops", "memory_bandwidth")


@dataclass(frozen=True)
class Card:
    name: str
    price_per_hour_usd: float
    bf16_flops: float  # dense peak, FLOP/s
    memory_bandwidth: float  # bytes/s
    fp8_flops: float | None = None  # None: no FP8 units (8-bit storage, BF16 compute)
    nics_per_server: int = 8
    nic_gbps: float = 400.0  # one NIC, gigabits/s
    gpus_per_server: int = 8
    memory_bytes: float | None = None  # HBM capacity; None: unknown, capacity is not checked
    description: str = ""

    def peak_flops(self, eight_bit: bool = True) -> float:
        return self.fp8_flops if (eight_bit and self.fp8_flops) else self.bf16_flops

    def usd_per_flop(self, eight_bit: bool = True) -> float:
        return self.price_per_hour_usd / 3600.0 / self.peak_flops(eight_bit)

    def usd_per_byte(self) -> float:
        return self.price_per_hour_usd / 3600.0 / self.memory_bandwidth

    def roofline(self, eight_bit: bool = True) -> float:
        """FLOPs per byte at which compute and memory time are equal."""
        return self.peak_flops(eight_bit) / self.memory_bandwidth

    @property
    def server_network(self) -> float:
        """Aggregate NIC bandwidth of one server in bytes/s (report section 5.4: 8 x 400 Gb/s = 400 GB/s)."""
        return self.nics_per_server * self.nic_gbps * 1e9 / 8.0


def card_from_dict(data: dict[str, Any]) -> Card:
    missing = [k for k in _REQUIRED if data.get(k) is None]
    if missing:
        raise ValueError(f"hardware entry {data.get('name', '?')!r} is missing {', '.join(missing)}")
    fields = Card.__dataclass_fields__
    return Card(**{k: v for k, v in data.items() if k in fields})


def builtin_cards() -> dict[str, Card]:
    folder = resources.files("step3_hf.cost_model.presets").joinpath("hardware")
    cards = [card_from_dict(json.loads(f.read_text())) for f in folder.iterdir() if f.name.endswith(".json")]
    order = {"H800": 0, "H20": 1, "A800": 2, "910B": 3}
    return {c.name: c for c in sorted(cards, key=lambda c: (order.get(c.name, 99), c.name))}


def load_cards(paths: Iterable[str | os.PathLike] = ()) -> dict[str, Card]:
    """Built-in cards plus those in ``paths`` (a later file overrides a card of the same name)."""
    cards = builtin_cards()
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        for entry in data if isinstance(data, list) else [data]:
            card = card_from_dict(entry)
            cards[card.name] = card
    return cards
