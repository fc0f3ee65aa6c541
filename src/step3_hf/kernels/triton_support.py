"""What the package's Triton kernels share: the optional Triton import, `triton.jit`, where they can run, and their
common input checks. With `TRITON_INTERPRET=1` set before Triton is imported, they run on CPU tensors through
Triton's interpreter (the tests do this)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; only its kernels need it
    triton = None
    tl = None

__all__ = [
    "MIN_FP8_DOT_K",
    "SUPPORTED_DTYPES",
    "check_kernel_inputs",
    "compute_capability",
    "float8_kernel_available",
    "install_dispatch",
    "interpreter_enabled",
    "kernel_available",
    "kernel_op",
    "launches_on_input_device",
    "round_to",
    "round_to_bfloat16",
    "sm_count",
    "tl",
    "triton",
    "triton_jit",
]

_Launcher = TypeVar("_Launcher", bound=Callable)

# The floating-point dtypes the kernels compute on.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The shallowest reduction step of a float8 x float8 tensor-core product (Hopper's FP8 MMA is 32 deep).
MIN_FP8_DOT_K = 32


# Triton reads TRITON_INTERPRET when a kernel is defined, so the kernels of this package, defined when it is imported,
# run as this says whatever the variable becomes later. Read once: the gates ask on every call.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreter_enabled() -> bool:
    """Whether Triton runs this package's kernels through its CPU interpreter (`TRITON_INTERPRET=1` when they were
    defined, at import)."""
    return _INTERPRETED


def triton_jit(fn):
    """`triton.jit`, or the plain function where Triton is absent (the package imports without it)."""
    return fn if triton is None else triton.jit(fn)


@triton_jit
def round_to_bfloat16(x):
    """`x` (fp32) rounded to the nearest bfloat16, ties to even, back in fp32 (NaNs stay NaNs). By integer
    arithmetic, exact on GPU and in the interpreter, which truncates fp32 -> bf16 casts: the carry into the upper 16
    bits is the rounding."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton_jit
def round_to(x, DTYPE: tl.constexpr):
    """`x` (fp32) rounded to nearest-even `DTYPE`, back in fp32 (bf16 by hand: the interpreter truncates the cast)."""
    if DTYPE == tl.bfloat16:
        return round_to_bfloat16(x)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


def kernel_available(device: torch.device | str) -> bool:
    """Whether this package's Triton kernels can run on tensors of `device`: Triton on CUDA, or its interpreter on
    CPU."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return not interpreter_enabled()
    return device.type == "cpu" and interpreter_enabled()


@functools.lru_cache(maxsize=None)
def _compute_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def compute_capability(device: torch.device | str) -> tuple[int, int]:
    """A CUDA `device`'s compute capability, queried once per GPU (callers ask on every decode step)."""
    device = torch.device(device)
    return _compute_capability(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA `device` (queried once per GPU); 8 elsewhere (the interpreter on CPU, where
    any modest count gives the same arithmetic)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 8
    return _multiprocessor_count(torch.cuda.current_device() if device.index is None else device.index)


def float8_kernel_available(device: torch.device | str) -> bool:
    """`kernel_available`, with float8 in Triton there: a GPU of compute capability 8.9+, or the interpreter. The
    capability is queried once per GPU (callers ask on every decode step)."""
    device = torch.device(device)
    if not kernel_available(device):
        return False
    if device.type != "cuda":
        return True
    return compute_capability(device) >= (8, 9)


def check_kernel_inputs(op: str, name: str, tensor: torch.Tensor, others: dict[str, torch.Tensor | None]) -> None:
    """Clear errors before `op`'s kernels launch: Triton missing, a device they do not run on, or one of `others`
    (None: absent) on another device than `tensor` (`name`), whose memory the kernels would read as their own."""
    if triton is None:
        raise RuntimeError(f"{op} needs Triton (`pip install triton`)")
    if not kernel_available(tensor.device):
        raise RuntimeError(
            f"{op} runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; got {tensor.device}"
        )
    for other_name, other in others.items():
        if other is not None and other.device != tensor.device:
            raise ValueError(f"`{other_name}` is on {other.device} but `{name}` is on {tensor.device}")


def launches_on_input_device(launcher: _Launcher) -> _Launcher:
    """Run `launcher` (a function whose first argument is a tensor and which launches Triton kernels) with that
    tensor's CUDA device current. Triton launches on the current device, and a model spread over several GPUs
    (`device_map="auto"`) calls the kernels with tensors on each of them; on one GPU and on CPU nothing changes."""

    @functools.wraps(launcher)
    def on_input_device(first: torch.Tensor, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    return on_input_device


class KernelOp:
    """A Triton launcher registered as the custom op `qualname` (see `kernel_op`)."""

    def __init__(self, qualname: str, launcher: Callable):
        functools.update_wrapper(self, launcher)
        self.launch = launches_on_input_device(launcher)
        self.op = torch.library.custom_op(qualname, mutates_args=())(self.launch)
        namespace, name = qualname.split("::")
        self._dispatched = getattr(getattr(torch.ops, namespace), name)

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def __call__(self, *args):
        if torch.compiler.is_compiling() or not _plain_eager_call(args):
            return self._dispatched(*args)
        return self.launch(*args)


# Tensor types the dispatcher has nothing to do for. A module's weight is an `nn.Parameter` of a plain tensor (a
# parameter of a subclass, a DTensor say, keeps the subclass's type).
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager_call(args: tuple) -> bool:
    """Plain tensors on a device, with no gradient asked for: nothing the dispatcher would have to see."""
    grad = torch.is_grad_enabled()
    for arg in args:
        if isinstance(arg, torch.Tensor) and (
            type(arg) not in _PLAIN_TENSOR_TYPES or arg.device.type == "meta" or (grad and arg.requires_grad)
        ):
            return False
    return True


def kernel_op(qualname: str) -> Callable[[Callable], KernelOp]:
    """Register a launcher (a function that launches Triton kernels on its first tensor's device and returns new
    tensors) as the custom op `qualname`, so that torch.compile and torch.export keep it in their graphs, and return
    a callable `KernelOp`. In eager mode, for plain tensors with no gradient asked for, the callable runs the launcher
    itself: the dispatcher's Python layers around a custom op (autograd, redispatch, aliasing checks) cost more host
    time than a decode kernel takes on the GPU. Tracing, tensor subclasses (fake, functional), meta tensors and
    calls that need autograd (which the ops refuse at backward) go through the op."""

    def register(launcher: Callable) -> KernelOp:
        return KernelOp(qualname, launcher)

    return register


def install_dispatch(
    owner: object, name: str, eager_attr: str, make: Callable[[Callable], Callable], summary: str, note: str
) -> None:
    """Replace `owner.<name>` (a class's method or a module's function) by `make(eager)`, which takes a kernel where
    it runs and calls `eager` elsewhere; `eager` stays reachable as `owner.<name>.<eager_attr>`. The new docstring:
    the eager one (`summary` where it has none) and `note` in parentheses. Idempotent."""
    eager = getattr(owner, name)
    if getattr(eager, eager_attr, None) is not None:
        return
    dispatch = make(eager)
    setattr(dispatch, eager_attr, eager)
    dispatch.__doc__ = f"{eager.__doc__ or summary} ({note})"
    setattr(owner, name, dispatch)
