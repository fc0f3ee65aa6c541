"""Per-step busy time of each side, measured without adding synchronisation inside a step.

On CUDA a phase is a pair of events on the current stream (resolved once per step); on CPU it is wall time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class StepTimes:
    wall_s: float
    phases_s: dict[str, float]


@dataclass
class PhaseTimer:
    device: torch.device
    steps: list[StepTimes] = field(default_factory=list)
    _open: list[tuple[str, object, object]] = field(default_factory=list)
    _step_start: float | None = None

    def start_step(self) -> None:
        self._step_start = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._open.append((name, start, end))

    def end_step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - (self._step_start or time.perf_counter())
        phases: dict[str, float] = {}
        for name, start, end in self._open:
            seconds = start.elapsed_time(end) / 1e3 if self.device.type == "cuda" else end - start
            phases[name] = phases.get(name, 0.0) + seconds
        self._open.clear()
        self._step_start = None
        self.steps.append(StepTimes(wall, phases))

    def summary(self, skip_first: int = 0) -> dict[str, float]:
        """Mean wall time and busy time per phase over the steps (decode steps: skip the prefill)."""
        steps = self.steps[skip_first:] or self.steps
        if not steps:
            return {"steps": 0}
        names = sorted({name for step in steps for name in step.phases_s})
        out = {"steps": len(steps), "wall_ms": 1e3 * sum(s.wall_s for s in steps) / len(steps)}
        for name in names:
            out[f"{name}_ms"] = 1e3 * sum(s.phases_s.get(name, 0.0) for s in steps) / len(steps)
        return out
