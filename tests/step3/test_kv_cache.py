"""The in-place dynamic KV cache (`step3_hf.kv_cache`) against transformers' `DynamicCache`: the same keys and values
after every operation generation performs, and writes in place between reallocations. (`generate()` with it:
`test_generation.py`.)"""

import torch
from transformers.cache_utils import DynamicCache

import step3_hf  # noqa: F401
from step3_hf import Step3Config, kv_cache
from step3_hf.kv_cache import InPlaceDynamicCache, InPlaceDynamicLayer
from step3_hf.tiny_checkpoint import TINY_CONFIG

CONFIG = Step3Config(**TINY_CONFIG)


def states(batch, positions, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, positions, 8, generator=generator) for _ in range(2)]


def assert_same(ours: InPlaceDynamicCache, reference: DynamicCache):
    assert ours.get_seq_length() == reference.get_seq_length()
    for layer, expected in zip(ours.layers, reference.layers):
        assert torch.equal(layer.keys, expected.keys) and torch.equal(layer.values, expected.values)


def test_every_generation_operation_leaves_the_keys_and_values_of_dynamic_cache(monkeypatch):
    """Prefill, decode steps past a full buffer, crop (rolled-back steps), beam reordering, batch selection and
    repetition: after each, the same keys and values as `DynamicCache`."""
    monkeypatch.setattr(kv_cache, "SPARE_POSITIONS", 3)
    ours, reference = InPlaceDynamicCache(config=CONFIG), DynamicCache(config=CONFIG)
    assert all(type(layer) is InPlaceDynamicLayer for layer in ours.layers)
    seed = iter(range(1000))

    def step(positions, batch=4):
        for layer_idx in range(CONFIG.num_hidden_layers):
            key, value = states(batch, positions, next(seed))
            returned = ours.update(key, value, layer_idx)
            expected = reference.update(key, value, layer_idx)
            assert all(torch.equal(a, b) for a, b in zip(returned, expected))
        assert_same(ours, reference)

    step(5)
    for _ in range(5):  # the buffer holds 3 spare positions: refilled once on the way
        step(1)
    for cache in (ours, reference):
        cache.crop(-2)
    assert_same(ours, reference)
    step(1)
    beams = torch.tensor([1, 0, 3, 3])
    for cache in (ours, reference):
        cache.reorder_cache(beams)
    step(1)
    for cache in (ours, reference):
        cache.batch_select_indices(torch.tensor([0, 2]))
    step(2, batch=2)
    for cache in (ours, reference):
        cache.batch_repeat_interleave(2)
    step(1)


def test_decode_steps_write_in_place_until_the_buffer_is_full(monkeypatch):
    monkeypatch.setattr(kv_cache, "SPARE_POSITIONS", 2)
    layer = InPlaceDynamicLayer()
    keys, values = layer.update(*states(2, 4, 0))
    first = keys.data_ptr()
    for _ in range(2):
        keys, values = layer.update(*states(2, 1, 1))
        assert keys.data_ptr() == first and keys.shape[-2] <= 6
    keys, _ = layer.update(*states(2, 1, 2))  # a seventh position: a new buffer
    assert keys.data_ptr() != first and keys.shape[-2] == 7
