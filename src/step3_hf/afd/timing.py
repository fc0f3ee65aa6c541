"""Per-step busy time of each side, measured without adding synchronisation inside a step.

On CUDA a phase is a pair of events on the current stream (resolved once per step, by waiting for the last
event only); on CPU it is wall time. With `keep_trace`, the last step's phases are also kept as a timeline
(`last_trace`: name, labels such as layer and micro-batch, start and end in µs from the step's first phase).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

IDLE_PHASES = ("wait",)  # waiting for the other side is not work


@dataclass
class StepTimes:
    wall_s: float
    phases_s: dict[str, float]
    started_at: float  # time.perf_counter() (CLOCK_MONOTONIC: comparable across processes of one host)
    host_s: dict[str, float] = field(default_factory=dict)  # host time issuing each phase (launch-bound if ~ phases_s)


@dataclass
class PhaseTimer:
    device: torch.device
    steps: list[StepTimes] = field(default_factory=list)
    keep_trace: bool = False
    labels: dict = field(default_factory=dict)  # attached to each phase as it opens (e.g. layer, micro-batch)
    last_trace: list[dict] = field(default_factory=list)
    _open: list[tuple[str, object, object, dict]] = field(default_factory=list)
    _host: dict[str, float] = field(default_factory=dict)
    _step_start: float | None = None
    first_start: float | None = None  # perf_counter of the first step, to measure the busy share of a run
    last_end: float | None = None

    def start_step(self) -> None:
        self._step_start = time.perf_counter()
        if self.first_start is None:
            self.first_start = self._step_start

    @contextmanager
    def phase(self, name: str):
        host_start = time.perf_counter()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = host_start
            yield
            end = time.perf_counter()
        self._host[name] = self._host.get(name, 0.0) + time.perf_counter() - host_start
        self._open.append((name, start, end, dict(self.labels) if self.keep_trace else {}))

    def end_step(self) -> None:
        if self.device.type == "cuda" and self._open:
            # Wait for this step's own work only: a device-wide synchronize would also wait for receives
            # already posted for the next step.
            self._open[-1][2].synchronize()
        self.last_end = time.perf_counter()
        wall = self.last_end - (self._step_start or self.last_end)
        phases: dict[str, float] = {}
        cuda = self.device.type == "cuda"
        for name, start, end, _ in self._open:
            seconds = start.elapsed_time(end) / 1e3 if cuda else end - start
            phases[name] = phases.get(name, 0.0) + seconds
        if self.keep_trace and self._open:
            origin = self._open[0][1]
            offset = (lambda event: 1e3 * origin.elapsed_time(event)) if cuda else (lambda t: 1e6 * (t - origin))
            self.last_trace = [
                {"name": name, **labels, "start_us": offset(start), "end_us": offset(end)}
                for name, start, end, labels in self._open
            ]
        self._open.clear()
        self._step_start = None
        self.steps.append(StepTimes(wall, phases, self.last_end - wall, self._host))
        self._host = {}

    def summary(self, skip_first: int = 0) -> dict[str, float]:
        """Mean wall and per-phase time of the steps after the first `skip_first` (the prefill), and over the
        whole run the busy time (all phases but waiting) and the elapsed time from the first step's start to the last's end."""
        if not self.steps:
            return {"steps": 0, "busy_s": 0.0, "elapsed_s": 0.0}
        busy = sum(t for s in self.steps for name, t in s.phases_s.items() if name not in IDLE_PHASES)
        steps = self.steps[skip_first:] or self.steps
        names = sorted({name for step in steps for name in step.phases_s})
        out = {
            "steps": len(steps), "wall_ms": 1e3 * sum(s.wall_s for s in steps) / len(steps),
            "busy_s": busy, "elapsed_s": self.last_end - self.first_start,
        }
        for name in names:
            out[f"{name}_ms"] = 1e3 * sum(s.phases_s.get(name, 0.0) for s in steps) / len(steps)
        return out
