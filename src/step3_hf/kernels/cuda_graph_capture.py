"""One CUDA graph capture, shared by the decode graphs (`decode_graphs.py`) and AFD's attention graphs.

A call runs once eagerly on a side stream (Triton compiles, cuBLAS picks its kernels, the allocator settles), then is
captured on that stream into a given memory pool.

cuBLAS keeps one workspace per handle and stream, which a captured matmul bakes in by address. One made by an eager
call lives outside the graph's pool, and `torch._C._cuda_clearCublasWorkspaces` frees it: torch.compile's CUDA graph
trees call that around every recording (`cache_implementation="static"` in `generate()`). A graph replayed after that
wrote into freed memory: an illegal memory access on an H100, once the memory went back to the driver. Clearing the
workspaces right before the capture, as the graph trees do, makes the capture allocate its workspace inside the pool,
which lives as long as its graphs. Clearing them again afterwards keeps eager calls out of the pool.

The clear is process-wide, as the graph trees' is: a graph captured elsewhere (a user's own `torch.cuda.graph`) that
baked in an eager call's workspace would replay into freed memory after any capture here, as it would after a
compiled `generate()`.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["CudaGraphCaptureError", "capture_cuda_graph"]


class CudaGraphCaptureError(RuntimeError):
    """The eager run succeeded but its capture failed (e.g. a kernel that synchronises with the host)."""


def _clear_cublas_workspaces() -> None:
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private; docs/compatibility.md lists it
    if clear is not None:
        clear()


def capture_cuda_graph(
    fn: Callable[[], object], device: torch.device, pool=None
) -> tuple[torch.cuda.CUDAGraph, object]:
    """`(graph, outputs)`: `fn()` warmed up eagerly on a side stream of `device`, then captured there into `pool`
    (a `torch.cuda.graph_pool_handle()`, or None for a new pool). `fn`'s own errors propagate from the eager run as
    they are; a failure of the capture alone is a `CudaGraphCaptureError`."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # The workspace an eager call leaves in the map is not the pool's: the capture must allocate its own.
    _clear_cublas_workspaces()
    try:
        # On `device`: torch's default capture stream belongs to whichever device captured first.
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool, stream=side):
            outputs = fn()
    except RuntimeError as err:
        raise CudaGraphCaptureError(str(err)) from err
    finally:
        _clear_cublas_workspaces()
    return graph, outputs
