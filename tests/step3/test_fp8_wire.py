"""The one-launch encoding and decoding of the AFD FP8 wire against the eager functions of `afd/wire.py`, byte for
byte and tensor for tensor, and what the bytes mean: on CPU through Triton's interpreter, and on CUDA; and the wire
taking the kernels where they run.

The CPU cases run under Triton's interpreter in a subprocess (`test_triton_interpreter.py`).
"""

import pytest
import torch
from triton_cases import DEVICES, INTERPRETED

from step3_hf.afd import wire
from step3_hf.afd.wire import DispatchLayout, WireFormat
from step3_hf.kernels.fp8_wire import decode_fp8_dispatch, encode_fp8_dispatch

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def eager_encode(hidden, ids, weights):
    """`encode_dispatch`'s eager torch (the kernels off)."""
    fields = [] if ids is None else [ids.to(torch.int32), weights.to(torch.float32)]
    values, scale = wire.quantize_fp8(hidden)
    fields += [scale, values]
    return torch.cat([f.contiguous().view(torch.uint8).reshape(-1) for f in fields])


def dispatch(tokens, width, top_k, dtype, device, seed=0):
    """Rows from tiny to large magnitudes, one all-zero row, one row with NaN and one with inf; random routing."""
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.logspace(-6, 3, tokens, dtype=torch.float64)[torch.randperm(tokens, generator=generator)]
    hidden = (torch.randn(tokens, width, generator=generator, dtype=torch.float64) * magnitudes[:, None]).to(dtype)
    hidden[1] = 0
    hidden[2, 3] = float("nan")
    hidden[3, 5] = float("inf")
    ids = torch.randint(0, 48, (tokens, top_k), generator=generator) if top_k else None
    weights = torch.rand(tokens, top_k, generator=generator).to(dtype) if top_k else None
    to = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return to(hidden), to(ids), to(weights)


# Every dtype at toy widths (a partial block, a dense layer's dispatch); the released width in the model's bf16.
CASES = [(7, 200, 3, dtype) for dtype in DTYPES] + [(5, 64, 0, torch.float32), (4, 7168, 3, torch.bfloat16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens, width, top_k, dtype", CASES, ids=str)
def test_encode_and_decode_equal_the_eager_wire(device, dtype, tokens, width, top_k):
    hidden, ids, weights = dispatch(tokens, width, top_k, dtype, device)
    buffer = encode_fp8_dispatch(hidden, ids, weights)
    cpu = (lambda t: None if t is None else t.cpu())  # noqa: E731
    reference = eager_encode(cpu(hidden), cpu(ids), cpu(weights))
    layout = DispatchLayout(tokens, width, top_k, WireFormat.FP8, dtype)
    assert_same_dispatch(buffer, reference, layout)
    back, back_ids, back_weights = decode_fp8_dispatch(buffer, tokens, width, top_k, dtype)
    eager_back = wire.dequantize_fp8(*_values_and_scales(reference, layout), dtype)
    assert back.dtype == dtype
    torch.testing.assert_close(back.cpu(), eager_back, rtol=0, atol=0, equal_nan=True)
    if top_k:
        assert back_ids.dtype == torch.int64 and torch.equal(back_ids.cpu(), ids.cpu())
        assert back_weights.dtype == dtype and torch.equal(back_weights.cpu(), weights.cpu())
    else:
        assert back_ids is None and back_weights is None
    # what the bytes mean: finite rows within e4m3's half step of x (3 mantissa bits) or its subnormal step
    finite = torch.isfinite(hidden.cpu()).all(-1)
    x, y = hidden.cpu()[finite].double(), back.cpu()[finite].double()
    scale = x.abs().amax(-1, keepdim=True) / 448
    finfo = torch.finfo(dtype)  # the decoded values' own rounding to `dtype`, subnormals included
    rounding = 2**-4 * x.abs() + 2**-10 * scale + finfo.eps * (x.abs() + finfo.smallest_normal)
    assert ((y - x).abs() <= rounding).all()
    assert torch.isnan(back.cpu()[2]).all() and torch.isnan(back.cpu()[3, 5])  # as the eager wire gives them


def assert_same_dispatch(buffer, reference, layout):
    """Byte for byte, but NaNs compare as NaNs whatever their sign and payload: the platform's invalid operations
    leave them (an x86 CPU's `inf / inf` is -NaN, e4m3 0xFF; a CUDA GPU's is +NaN, 0x7F)."""
    assert buffer.dtype == torch.uint8 and buffer.shape == reference.shape
    fields = zip(torch.split(buffer.cpu(), layout._field_bytes), torch.split(reference, layout._field_bytes))
    for number, (got, want) in enumerate(fields):
        if number == 2:  # the scales
            torch.testing.assert_close(got.view(torch.float32), want.view(torch.float32), rtol=0, atol=0,
                                       equal_nan=True)  # fmt: skip
        elif number == 3:  # the e4m3 values: NaN is 0x7F or 0xFF
            nan_got, nan_want = (got & 0x7F) == 0x7F, (want & 0x7F) == 0x7F
            assert torch.equal(nan_got, nan_want) and torch.equal(got[~nan_got], want[~nan_want]), number
        else:
            assert torch.equal(got, want), number


def _values_and_scales(buffer, layout):
    n, h = layout.num_tokens, layout.hidden_size
    _, _, scale, values = torch.split(buffer, layout._field_bytes)
    return values.view(torch.float8_e4m3fn).view(n, h), scale.view(torch.float32).view(n, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_hidden_states_and_empty_dispatches(device):
    hidden, ids, weights = dispatch(6, 256, 2, torch.bfloat16, device)
    strided = hidden[:, ::2]  # columns 2 elements apart
    assert_same_dispatch(encode_fp8_dispatch(strided, ids, weights), eager_encode(strided.cpu(), ids.cpu(),
                         weights.cpu()), DispatchLayout(6, 128, 2, WireFormat.FP8, torch.bfloat16))  # fmt: skip
    empty = encode_fp8_dispatch(hidden[:0], ids[:0], weights[:0])
    assert empty.numel() == 0
    back, back_ids, _ = decode_fp8_dispatch(empty, 0, 256, 2, torch.bfloat16)
    assert back.shape == (0, 256) and back_ids.shape == (0, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_the_wire_takes_the_kernels_where_they_run(device, monkeypatch):
    calls = []
    for name in ("encode_fp8_dispatch", "decode_fp8_dispatch"):
        original = getattr(wire, name)
        monkeypatch.setattr(wire, name, lambda *args, original=original, name=name: calls.append(name)
                            or original(*args))  # fmt: skip
    hidden, ids, weights = dispatch(4, 128, 3, torch.float32, device)
    for kind in WireFormat:
        buffer = wire.encode_dispatch(hidden, ids, weights, kind)
        wire.decode_dispatch(buffer, DispatchLayout(4, 128, 3, kind, torch.float32))
    assert calls == ["encode_fp8_dispatch", "decode_fp8_dispatch"]  # the raw wire stays a plain copy


@pytest.mark.skipif(INTERPRETED, reason="the eager wire on CPU without the interpreter")
def test_cpu_without_the_interpreter_keeps_the_eager_wire(monkeypatch):
    calls = []
    monkeypatch.setattr(wire, "encode_fp8_dispatch", lambda *args: calls.append(1))
    hidden, ids, weights = dispatch(4, 128, 3, torch.float32, "cpu")
    buffer = wire.encode_dispatch(hidden, ids, weights, WireFormat.FP8)
    assert not calls and torch.equal(buffer, eager_encode(hidden, ids, weights))


@pytest.mark.parametrize("device", DEVICES)
def test_the_ops_pass_torch_library_checks(device):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 128, generator=generator).bfloat16().to(device)
    ids = torch.randint(0, 48, (4, 3), generator=generator).to(device)
    weights = torch.rand(4, 3, generator=generator).bfloat16().to(device)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.step3_hf.encode_fp8_dispatch, (hidden, ids, weights), test_utils=checks)
    buffer = encode_fp8_dispatch(hidden, ids, weights)
    torch.library.opcheck(torch.ops.step3_hf.decode_fp8_dispatch, (buffer, 4, 128, 3, torch.bfloat16),
                          test_utils=checks)  # fmt: skip
