"""`triton_support.kernel_op`: eager calls on plain tensors skip the dispatcher, everything that must see the op
(torch.compile, fake tensors, autograd) still goes through it. The launcher here is plain torch, so this runs on any
CPU without Triton's interpreter."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from step3_hf.kernels.triton_support import KernelOp, kernel_op

launches = []


@kernel_op("step3_hf_test::scaled_copy")
def scaled_copy(x: torch.Tensor, factor: float) -> torch.Tensor:
    launches.append(x.shape)
    return x * factor


@scaled_copy.register_fake
def _(x, factor):
    return torch.empty_like(x)


class OpLog(TorchDispatchMode):
    """The ops the dispatcher sees."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn, *args):
    # The mode is entered inside the test, after the arguments exist, so it logs only the call itself.
    with OpLog() as log:
        out = fn(*args)
    return out, [op for op in log.ops if "scaled_copy" in op]


def test_is_a_kernel_op_with_the_launchers_name():
    assert isinstance(scaled_copy, KernelOp) and scaled_copy.__name__ == "scaled_copy"


def test_plain_eager_call_runs_the_launcher_without_the_op():
    x = torch.arange(6.0).reshape(2, 3)
    launches.clear()
    out, ops = dispatched_ops(scaled_copy, x, 2.0)
    torch.testing.assert_close(out, x * 2)
    assert ops == [] and launches == [(2, 3)]


def test_module_weights_are_plain_tensors_under_no_grad():
    # A module's weight is an nn.Parameter that requires grad: at inference (no_grad) it needs no dispatcher.
    weight = torch.nn.Linear(3, 2).weight
    launches.clear()
    with torch.no_grad():
        out, ops = dispatched_ops(scaled_copy, weight, 2.0)
    torch.testing.assert_close(out, weight.detach() * 2)
    assert ops == [] and launches == [(2, 3)]
    assert dispatched_ops(scaled_copy, weight, 2.0)[1] == ["step3_hf_test.scaled_copy.default"]  # grad enabled


def test_tensor_subclasses_go_through_the_op():
    class Tagged(torch.Tensor):
        pass

    tagged = torch.arange(4.0).as_subclass(Tagged)
    launches.clear()
    assert dispatched_ops(scaled_copy, tagged, 2.0)[1] == ["step3_hf_test.scaled_copy.default"]


def test_call_that_needs_autograd_goes_through_the_op():
    x = torch.arange(6.0, requires_grad=True)
    out, ops = dispatched_ops(scaled_copy, x, 2.0)
    assert ops == ["step3_hf_test.scaled_copy.default"]
    with pytest.raises(RuntimeError, match="(?i)autograd"):  # the op has no backward: an error, not a silent zero
        out.sum().backward()
    with torch.no_grad():  # the same tensor without a gradient asked for is a plain call
        assert dispatched_ops(scaled_copy, x, 2.0)[1] == []


def test_fake_and_meta_tensors_reach_the_fake_implementation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches.clear()
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(4, 5))
        assert scaled_copy(fake, 3.0).shape == (4, 5)
    assert scaled_copy(torch.ones(2, device="meta"), 3.0).device.type == "meta"
    assert launches == []


def test_compiled_callers_keep_the_op_in_their_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x: scaled_copy(x, 2.0) + 1, backend=backend, fullgraph=True)
    x = torch.arange(4.0)
    torch.testing.assert_close(compiled(x), x * 2 + 1)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert any("scaled_copy" in target for target in targets), targets
