"""Starting the processes of an AFD test launch with torchrun's environment, never leaving one behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launch(argv_for_rank, world_size: int, *, extra_env: dict | None = None):
    """Start `world_size` processes (`argv_for_rank(rank)`), as torchrun would; kill any still running on exit."""
    port = free_port()
    procs = []
    try:
        for rank in range(world_size):
            env = dict(
                os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **(extra_env or {}),
            )
            procs.append(subprocess.Popen(
                argv_for_rank(rank), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait(timeout=30)


def finish(procs, timeout: float) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of every process, all within `timeout` seconds in total."""
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        results.append((proc.returncode, out, err))
    return results
