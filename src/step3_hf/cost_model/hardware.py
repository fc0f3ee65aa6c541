"""Accelerator specs and unit costs (Step-3 report, Tables 4 and 5).

Built-in cards are the report's H800, H20, A800 and 910B; more come from JSON files with the same
fields (one card object, or a list of them)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, Iterable

__all__ = ["Card", "builtin_cards", "load_cards", "card_from_dict"]

_REQUIRED = ("name", "price_per_hour_usd", "bf16_flops", "memory_bandwidth")
# Every figure a cost is divided by or multiplied with must be a positive, finite number: a zero bandwidth
# divides by zero and a negative price prints a negative cost.
_POSITIVE = ("price_per_hour_usd", "bf16_flops", "memory_bandwidth", "fp8_flops", "nic_gbps", "memory_bytes")
_POSITIVE_INT = ("nics_per_server", "gpus_per_server")
_OPTIONAL = ("fp8_flops", "memory_bytes")


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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"hardware entry: `name` must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"hardware entry {self.name!r}: `description` must be a string, got {self.description!r}")
        for key in _POSITIVE + _POSITIVE_INT:
            value = getattr(self, key)
            if value is None and key in _OPTIONAL:
                continue
            integral = key in _POSITIVE_INT
            kind = int if integral else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or not (math.isfinite(value) and value > 0):
                what = "a positive integer" if integral else "a positive number"
                raise ValueError(f"hardware entry {self.name!r}: `{key}` must be {what}, got {value!r}")

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
    """A :class:`Card` from one JSON object; every missing or invalid field is a ``ValueError`` naming it."""
    if not isinstance(data, dict):
        raise ValueError(f"a hardware entry must be a JSON object with {', '.join(_REQUIRED)}, got {data!r:.80}")
    missing = [k for k in _REQUIRED if data.get(k) is None]
    if missing:
        raise ValueError(f"hardware entry {data.get('name', '?')!r} is missing {', '.join(missing)}")
    names = {f.name for f in fields(Card)}
    return Card(**{k: v for k, v in data.items() if k in names})


def builtin_cards() -> dict[str, Card]:
    folder = resources.files("step3_hf.cost_model.presets").joinpath("hardware")
    cards = [card_from_dict(json.loads(f.read_text())) for f in folder.iterdir() if f.name.endswith(".json")]
    order = {"H800": 0, "H20": 1, "A800": 2, "910B": 3}
    return {c.name: c for c in sorted(cards, key=lambda c: (order.get(c.name, 99), c.name))}


def load_cards(paths: Iterable[str | os.PathLike] = ()) -> dict[str, Card]:
    """Built-in cards plus those in ``paths`` (a later file overrides a card of the same name)."""
    cards = builtin_cards()
    for path in paths:
        try:
            with open(path) as fh:
                data = json.load(fh)
            entries = data if isinstance(data, list) else [data]
            loaded = [card_from_dict(entry) for entry in entries]
        except ValueError as err:  # JSON syntax, encoding, or a field
            raise ValueError(f"{os.fspath(path)}: {err}") from None
        cards.update((card.name, card) for card in loaded)
    return cards
