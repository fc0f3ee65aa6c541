"""The per-layer wire format between attention and FFN ranks.

Attention -> FFN ("dispatch"), one flat byte buffer per FFN rank and micro-batch, 4-byte fields first so every
field stays aligned: top-k expert ids (int32) and weights (fp32) for MoE layers, then the post-attention-norm
hidden states -- FP8 e4m3 with one fp32 scale per token (`fp8`, the default) or unquantised in the model's dtype
(`raw`: bf16 for a bf16 model, fp32 in the fp32 exactness tests).
FFN -> attention ("combine"): the FFN's (partial) result in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from ..kernels.fp8_wire import (
    decode_fp8_dispatch,
    encode_fp8_dispatch,
    fp8_wire_kernels_decode,
    fp8_wire_kernels_take,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


class WireFormat(str, Enum):
    FP8 = "fp8"
    RAW = "raw"

    @property
    def code(self) -> int:
        return list(WireFormat).index(self)

    @classmethod
    def from_code(cls, code: int) -> "WireFormat":
        formats = list(WireFormat)
        if not 0 <= code < len(formats):
            raise ValueError(f"AFD: unknown wire format code {code} in a message header (peer of another version?)")
        return formats[code]


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric e4m3: `x ~ q * scale` with `scale = amax(|x|) / 448` per row (fp32). The division by 448
    is written as the product with its fp32 reciprocal, which is what CUDA computes for it: CPU, CUDA and the
    one-launch kernel (`kernels/fp8_wire.py`) then give the same bytes."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) * (1 / FP8_MAX)
    return (x.float() / scale).to(FP8_DTYPE), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


@dataclass(frozen=True)
class DispatchLayout:
    """Sizes of one dispatch buffer; both sides derive it from the message header, so only bytes travel."""

    num_tokens: int
    hidden_size: int
    top_k: int  # 0 for a dense layer: no routing fields
    wire: WireFormat
    dtype: torch.dtype  # the model's compute dtype

    @property
    def _field_bytes(self) -> list[int]:
        n, h, k = self.num_tokens, self.hidden_size, self.top_k
        if self.wire is WireFormat.FP8:
            return [4 * n * k, 4 * n * k, 4 * n, n * h]  # ids, weights, scales, fp8 values
        return [4 * n * k, 4 * n * k, 0, n * h * self.dtype.itemsize]

    @property
    def nbytes(self) -> int:
        return sum(self._field_bytes)


def encode_dispatch(
    hidden: torch.Tensor, top_k_index: torch.Tensor | None, top_k_weights: torch.Tensor | None, wire: WireFormat
) -> torch.Tensor:
    """`[n, H]` normed hidden states (+ `[n, k]` routing) -> one uint8 buffer laid out as `DispatchLayout` says."""
    if wire is WireFormat.FP8 and fp8_wire_kernels_take(hidden, top_k_index):
        return encode_fp8_dispatch(hidden, top_k_index, top_k_weights)  # the same bytes in one launch
    fields = []
    if top_k_index is not None:
        fields += [top_k_index.to(torch.int32), top_k_weights.to(torch.float32)]
    if wire is WireFormat.FP8:
        values, scale = quantize_fp8(hidden)
        fields += [scale, values]
    else:
        fields.append(hidden)
    return torch.cat([f.contiguous().view(torch.uint8).reshape(-1) for f in fields])


def decode_dispatch(
    buffer: torch.Tensor, layout: DispatchLayout
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Inverse of `encode_dispatch`: hidden states in the model's dtype and the routing (ids int64, weights)."""
    n, h, k = layout.num_tokens, layout.hidden_size, layout.top_k
    if layout.wire is WireFormat.FP8 and fp8_wire_kernels_decode(buffer, layout.dtype):
        return decode_fp8_dispatch(buffer, n, h, k, layout.dtype)  # the same tensors in one launch
    ids_b, weights_b, scale_b, values_b = torch.split(buffer, layout._field_bytes)
    top_k_index = top_k_weights = None
    if k:
        top_k_index = ids_b.view(torch.int32).view(n, k).long()
        top_k_weights = weights_b.view(torch.float32).view(n, k).to(layout.dtype)
    if layout.wire is WireFormat.FP8:
        hidden = dequantize_fp8(values_b.view(FP8_DTYPE).view(n, h), scale_b.view(torch.float32).view(n, 1), layout.dtype)
    else:
        hidden = values_b.view(layout.dtype).view(n, h)
    return hidden, top_k_index, top_k_weights


def wire_bytes_per_token(
    hidden_size: int, top_k: int, wire: WireFormat, dtype: torch.dtype, ffn_ranks: int = 1
) -> tuple[int, int]:
    """(attention -> FFN, FFN -> attention) bytes one token moves for one layer, over all FFN ranks together."""
    to_ffn = DispatchLayout(1, hidden_size, top_k, wire, dtype).nbytes * ffn_ranks
    return to_ffn, hidden_size * dtype.itemsize * ffn_ranks
