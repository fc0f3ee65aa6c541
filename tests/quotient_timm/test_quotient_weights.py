"""Offline weight round trips: save_for_hf + local-dir:, and pretrained_cfg_overlay=dict(file=...)."""
import pytest
import torch
import timm
from safetensors.torch import save_file
from timm.models import save_for_hf

import quotient_timm  # noqa: F401


def _perturb(model):
    # Random BN statistics/affines so a fresh init could not match by accident.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.mark.parametrize('name,kwargs,size', [
    ('quotient_resnet20_cifar', dict(num_classes=5, in_chans=1, width_mult=2, a=1.6), 28),
    ('resnet32_cifar', dict(num_classes=3), 32),
    ('quotient_resnet18', dict(num_classes=4), 64),
])
def test_save_for_hf_local_dir_round_trip(tmp_path, name, kwargs, size):
    model = _perturb(timm.create_model(name, **kwargs)).eval()
    save_for_hf(model, str(tmp_path / 'hf'), model_args=kwargs, safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    assert type(loaded) is type(model)
    x = torch.randn(2, kwargs.get('in_chans', 3), size, size)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    if 'a' in kwargs:
        assert loaded.a == kwargs['a']
    fresh = timm.create_model(name, **kwargs).eval()
    assert not torch.allclose(fresh(x), model(x))


@pytest.mark.parametrize('name,kwargs,size', [
    ('quotient_resnet56_cifar', dict(), 32),
    ('quotient_resnet50', dict(num_classes=6), 64),
])
def test_pretrained_cfg_overlay_file(tmp_path, name, kwargs, size):
    model = _perturb(timm.create_model(name, **kwargs)).eval()
    path = tmp_path / 'w.safetensors'
    save_file(model.state_dict(), str(path))
    overlay = dict(file=str(path), num_classes=kwargs.get('num_classes', model.pretrained_cfg['num_classes']))
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # features_only models load the same file (classifier dropped)
    feats = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True, **kwargs).eval()
    torch.testing.assert_close(feats(x)[-1], model.forward_features(x), rtol=0, atol=0)
