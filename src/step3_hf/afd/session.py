"""Starting an AFD launch on each rank: process group, start-up checks, the rank's half of the model, the
end-of-run report. Both the `python -m step3_hf.afd` launcher and user code go through `start`:

    with afd.start(AFDSettings(model=path, attention_ranks=2, ffn_ranks=1)) as rank:
        if rank.role is Role.ATTENTION:
            model = rank.attention_model()
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
        else:
            rank.serve()

The environment is torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), so
multi-node launches use torchrun's own rendezvous. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .attention_model import Step3AFDAttentionForCausalLM
from .checkpoint import CheckpointReader
from .connector import AttentionConnector, FFNConnector
from .exchange import ExchangeGroups, P2PAttentionConnector, p2p_connector
from .ffn_server import Step3FFNShard, serve
from .placement import Placement, Role
from .timing import PhaseTimer
from .wire import WireFormat

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class AFDSettings:
    """Launch arguments; every rank must be started with the same ones (checked at start-up)."""

    model: str
    attention_ranks: int
    ffn_ranks: int
    micro_batches: int = 3
    wire: str = WireFormat.FP8.value
    dtype: str = "auto"  # bfloat16 on GPU, float32 on CPU
    timeout_s: float = 30.0  # a peer silent for this long is lost
    startup_timeout_s: float = 600.0  # loading weights and joining the process group
    attn_implementation: str | None = None  # Step-3's default: mfa_decode on CUDA, sdpa on CPU
    backend: str = "auto"  # nccl on GPU, gloo on CPU

    def __post_init__(self) -> None:
        WireFormat(self.wire)
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be auto or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.micro_batches < 1:
            raise ValueError(f"--micro-batches must be at least 1, got {self.micro_batches}")
        if not 0 < self.timeout_s:
            raise ValueError(f"--timeout must be positive, got {self.timeout_s}")
        if not 0 < self.startup_timeout_s:
            raise ValueError(f"--startup-timeout must be positive, got {self.startup_timeout_s}")


@dataclass
class AFDRank:
    """This process's place in a running AFD launch."""

    settings: AFDSettings
    rank: int
    placement: Placement
    device: torch.device
    dtype: torch.dtype
    reader: CheckpointReader
    groups: ExchangeGroups
    backend: str = "gloo"
    timer: PhaseTimer = field(init=False)
    connector: AttentionConnector | FFNConnector | None = None
    _model: torch.nn.Module | None = None

    def __post_init__(self) -> None:
        self.timer = PhaseTimer(self.device)

    @property
    def role(self) -> Role:
        return self.placement.role(self.rank)

    @property
    def name(self) -> str:
        return self.placement.describe(self.rank)

    def attention_model(self) -> Step3AFDAttentionForCausalLM:
        """This attention rank's model (only attention-side tensors read), connected to the FFN ranks."""
        if self.role is not Role.ATTENTION:
            raise RuntimeError(f"{self.name} is an FFN rank; only attention ranks build the attention model")
        if self._model is None:
            model = Step3AFDAttentionForCausalLM.from_checkpoint(
                self.reader, device=self.device, dtype=self.dtype,
                attn_implementation=self.settings.attn_implementation,
            )
            model.timer = self.timer
            config = self.reader.config
            self.connector = p2p_connector(self.backend, Role.ATTENTION)(
                self.placement, self.rank, self.groups, hidden_size=config.hidden_size, dtype=self.dtype, device=self.device,
                timeout_s=self.settings.timeout_s,
            )
            self.connector.timer = self.timer
            self._model = model.connect(
                self.connector, micro_batches=self.settings.micro_batches, wire=WireFormat(self.settings.wire)
            )
            self._ready()
        return self._model

    def ffn_shard(self) -> Step3FFNShard:
        if self.role is not Role.FFN:
            raise RuntimeError(f"{self.name} is an attention rank; only FFN ranks hold FFN weights")
        if self._model is None:
            self._model = Step3FFNShard.from_checkpoint(
                self.reader, self.placement, self.placement.index_in_role(self.rank),
                device=self.device, dtype=self.dtype,
            )
            config = self.reader.config
            self.connector = p2p_connector(self.backend, Role.FFN)(
                self.placement, self.rank, self.groups, hidden_size=config.hidden_size, top_k=config.moe_top_k,
                moe_layers=set(config.moe_layer_indices), dtype=self.dtype, device=self.device,
                timeout_s=self.settings.timeout_s,
            )
            self._ready()
        return self._model

    def serve(self) -> None:
        """FFN ranks: answer the attention ranks until all of them are done."""
        serve(self.ffn_shard(), self.connector, self.timer)

    def _ready(self) -> None:
        # Everyone has its weights before the first layer is sent, so the per-message timeout never has to
        # cover a slow load; gloo's monitored barrier names the ranks that did not arrive.
        timeout = timedelta(seconds=self.settings.startup_timeout_s)
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            dist.barrier()

    def report(self) -> list[dict] | None:
        """Collective: every rank's timing and wire counters, returned on rank 0 (None elsewhere). An attention
        rank tells the FFN ranks it is done first (they stop serving once every attention rank has)."""
        self.close()
        prefill = 1 if self.role is Role.ATTENTION else 0
        mine = {"rank": self.rank, "name": self.name, "role": self.role.value, **self.timer.summary(prefill)}
        if isinstance(self.connector, P2PAttentionConnector):
            c = self.connector.counters
            mine["bytes_to_ffn_per_token_layer"] = c.bytes_to_ffn / max(c.token_layers, 1)
            mine["bytes_from_ffn_per_token_layer"] = c.bytes_from_ffn / max(c.token_layers, 1)
        gathered = [None] * self.placement.world_size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        return gathered

    def close(self) -> None:
        if isinstance(self.connector, AttentionConnector):
            self.connector.close()

    def __enter__(self) -> "AFDRank":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            if dist.is_initialized():
                dist.destroy_process_group()


def _resolve(settings: AFDSettings) -> tuple[str, torch.device, torch.dtype]:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = settings.backend == "nccl" or (settings.backend == "auto" and torch.cuda.is_available())
    backend = settings.backend if settings.backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if use_cuda else torch.float32
    else:
        dtype = _DTYPES[settings.dtype]
    return backend, device, dtype


def _check_same_settings(settings: AFDSettings, rank: int, world_size: int) -> None:
    everyone = [None] * world_size
    dist.all_gather_object(everyone, asdict(settings))
    mine = asdict(settings)
    for other_rank, theirs in enumerate(everyone):
        diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs.get(k)}
        if diff:
            shown = ", ".join(f"{k}: {a!r} here vs {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"AFD rank {rank}: rank {other_rank} was started with different arguments ({shown}); start every "
                "rank with the same arguments"
            )


def start(settings: AFDSettings) -> AFDRank:
    """Join the launch described by torchrun's environment, check it, and return this rank's context."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"AFD ranks are started by torchrun (or with its environment); {', '.join(missing)} not set. "
            f"Run `torchrun --nproc-per-node {settings.attention_ranks + settings.ffn_ranks} -m step3_hf.afd ...`"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    placement = Placement.for_world(settings.attention_ranks, settings.ffn_ranks, world_size)  # fails fast
    backend, device, dtype = _resolve(settings)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=settings.startup_timeout_s),
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    _check_same_settings(settings, rank, world_size)
    reader = CheckpointReader(settings.model)
    placement.check_model(reader.config)
    # On NCCL the groups' timeout is what bounds a wait on a lost peer (the watchdog ends the process).
    groups = ExchangeGroups.create(timedelta(seconds=settings.timeout_s))
    return AFDRank(settings, rank, placement, device, dtype, reader, groups, backend)
