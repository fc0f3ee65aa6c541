"""`mfa_decode_mask`: the mask the `mfa_decode` attention gets equals what SDPA's own builder materialises, for
decode steps with and without padding, dynamic and static cache sizes, and leaves prefills to `sdpa_mask`."""

import pytest
import torch
from transformers.masking_utils import sdpa_mask

from step3_hf.kernels.transformers_attention import mfa_decode_mask


def reference_mask(padding, q_length, kv_length, q_offset, kv_offset):
    """Causal + padding by loops: query at absolute position `q_offset + i` sees key `kv_offset + j` when
    `kv_offset + j <= q_offset + i` and that key is not padding (positions past the 2-D mask count as present)."""
    batch = 1 if padding is None else padding.shape[0]
    mask = torch.zeros(batch, 1, q_length, kv_length, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_length):
            for j in range(kv_length):
                position = kv_offset + j
                present = padding is None or position >= padding.shape[1] or bool(padding[b, position])
                mask[b, 0, i, j] = position <= q_offset + i and present
    return mask


# (q_length, kv_length, q_offset, kv_offset): dynamic-cache decode, a static cache longer than what is written,
# a few speculative tokens, and a sliding offset.
SIZES = [(1, 9, 8, 0), (1, 16, 8, 0), (3, 12, 9, 0), (2, 16, 5, 0), (1, 6, 10, 5)]


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("padded", [False, True])
def test_decode_masks_equal_the_materialised_sdpa_mask(sizes, padded):
    q_length, kv_length, q_offset, kv_offset = sizes
    generator = torch.Generator().manual_seed(q_length * 100 + kv_length)
    written = q_offset + q_length
    padding = None
    if padded:
        padding = torch.ones(3, written, dtype=torch.long)
        padding[1, :3] = 0  # left padding
        padding[2] = torch.rand(written, generator=generator) > 0.4  # holes anywhere
        padding[:, -q_length:] = 1
    batch = 3 if padded else 2
    ours = mfa_decode_mask(batch, q_length, kv_length, q_offset, kv_offset, attention_mask=padding)
    expected = reference_mask(padding, q_length, kv_length, q_offset, kv_offset).expand(batch, -1, -1, -1)
    if ours is None:  # allowed only when nothing is masked, known from the sizes
        assert not padded and bool(expected.all())
    else:
        assert ours.dtype == torch.bool and torch.equal(ours, expected)
    materialised = sdpa_mask(batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, attention_mask=padding, allow_is_causal_skip=False)  # fmt: skip
    assert torch.equal(materialised.expand(batch, -1, -1, -1), expected)


def test_a_static_cache_offset_given_as_a_tensor_builds_the_mask():
    ours = mfa_decode_mask(2, 1, 16, torch.tensor(7), 0)
    assert torch.equal(ours, reference_mask(None, 1, 16, 7, 0).expand(2, -1, -1, -1))


def test_prefill_is_left_to_sdpa_mask():
    padding = torch.ones(2, 10, dtype=torch.long)
    padding[0, :4] = 0
    for attention_mask in (None, padding):
        ours = mfa_decode_mask(2, 10, 10, 0, 0, attention_mask=attention_mask)
        theirs = sdpa_mask(batch_size=2, q_length=10, kv_length=10, attention_mask=attention_mask)
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)
