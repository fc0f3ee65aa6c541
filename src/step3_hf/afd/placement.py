"""Roles and placement of an AFD launch: which rank attends, which rank runs the FFN, and which FFN slice it owns.

Ranks `0 .. A-1` are attention ranks (embedding, attention, norms, routers, LM head and KV cache; each serves
its own share of the sequences), ranks `A .. A+F-1` are FFN ranks. FFN ranks split the routed experts by
expert (contiguous ranges) and the dense MLPs and shared experts by intermediate channel, so every FFN rank
returns a partial sum and the attention rank adds the partials up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..configuration_step3 import Step3Config


class Role(str, Enum):
    ATTENTION = "attention"
    FFN = "ffn"


def even_split(size: int, parts: int, index: int) -> tuple[int, int]:
    """`[start, stop)` of part `index` when `size` items are cut into `parts` contiguous, near-equal pieces."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class Placement:
    attention_ranks: int
    ffn_ranks: int

    def __post_init__(self) -> None:
        for name in ("attention_ranks", "ffn_ranks"):
            if getattr(self, name) < 1:
                raise ValueError(f"AFD needs at least one rank of each role, got --{name.replace('_', '-')} "
                                 f"{getattr(self, name)}")

    @classmethod
    def for_world(cls, attention_ranks: int, ffn_ranks: int, world_size: int) -> "Placement":
        """The placement of a launch, refusing one whose ranks do not add up to the world size."""
        placement = cls(attention_ranks, ffn_ranks)
        if placement.world_size != world_size:
            raise ValueError(
                f"--attention-ranks {attention_ranks} + --ffn-ranks {ffn_ranks} = {placement.world_size} ranks, but "
                f"the launch started {world_size} processes (WORLD_SIZE); start exactly "
                f"{placement.world_size}, e.g. `torchrun --nproc-per-node {placement.world_size} -m step3_hf.afd ...`"
            )
        return placement

    @property
    def world_size(self) -> int:
        return self.attention_ranks + self.ffn_ranks

    @property
    def attention_rank_ids(self) -> list[int]:
        return list(range(self.attention_ranks))

    @property
    def ffn_rank_ids(self) -> list[int]:
        return list(range(self.attention_ranks, self.world_size))

    def role(self, rank: int) -> Role:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside this {self.world_size}-rank AFD launch")
        return Role.ATTENTION if rank < self.attention_ranks else Role.FFN

    def index_in_role(self, rank: int) -> int:
        return rank if self.role(rank) is Role.ATTENTION else rank - self.attention_ranks

    def describe(self, rank: int) -> str:
        """`rank 2 (ffn 0)`: how errors and logs name a peer."""
        return f"rank {rank} ({self.role(rank).value} {self.index_in_role(rank)})"

    def expert_range(self, ffn_index: int, num_experts: int) -> tuple[int, int]:
        return even_split(num_experts, self.ffn_ranks, ffn_index)

    def channel_range(self, ffn_index: int, intermediate_size: int) -> tuple[int, int]:
        return even_split(intermediate_size, self.ffn_ranks, ffn_index)

    def sequence_range(self, attention_index: int, num_sequences: int) -> tuple[int, int]:
        """The contiguous share of the prompts that attention rank `attention_index` serves."""
        return even_split(num_sequences, self.attention_ranks, attention_index)

    def check_model(self, config: Step3Config) -> None:
        """Every FFN rank must own at least one expert and one channel of every MLP."""
        smallest = min(
            ("moe_num_experts", config.moe_num_experts),
            ("share_expert_dim", config.share_expert_dim),
            ("intermediate_size", config.intermediate_size),
            key=lambda item: item[1],
        )
        if self.ffn_ranks > smallest[1]:
            raise ValueError(
                f"--ffn-ranks {self.ffn_ranks} exceeds the model's {smallest[0]} ({smallest[1]}): every FFN rank "
                "needs at least one expert and one channel of each MLP"
            )
