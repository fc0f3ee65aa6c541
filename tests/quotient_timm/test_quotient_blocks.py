"""The quotient activation and blocks against float64 re-computations written here from the paper's formulas."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import timm
from timm.layers import DropPath

from quotient_timm import CIFAR_DEPTH_TO_A, QuotientActivation, QuotientBasicBlock, QuotientBottleneck


def q_ref(z: np.ndarray, a: float) -> np.ndarray:
    # q_a(z) = a * sigmoid(z - ln(a - 1)) = a / (1 + (a - 1) * exp(-z))
    return a / (1.0 + (a - 1.0) * np.exp(-z))


def bn_ref(x: np.ndarray, bn: nn.BatchNorm2d) -> np.ndarray:
    m = bn.running_mean.double().numpy()[None, :, None, None]
    v = bn.running_var.double().numpy()[None, :, None, None]
    w = bn.weight.double().detach().numpy()[None, :, None, None]
    b = bn.bias.double().detach().numpy()[None, :, None, None]
    return (x - m) / np.sqrt(v + bn.eps) * w + b


def conv_ref(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    # Direct sum over kernel offsets (no im2col, no torch conv): groups=1, dilation=1.
    w = conv.weight.double().detach().numpy()
    s, p = conv.stride[0], conv.padding[0]
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    n, _, h, wd = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    out = np.zeros((n, w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + s * ho:s, j:j + s * wo:s]
            out += np.einsum('nchw,oc->nohw', patch, w[:, :, i, j])
    return out


def _randomize_bn(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=gen) * 0.5 + 1.0)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.5)


@pytest.mark.parametrize('a', [1.01, 1.5, 1.7, 2.0, 3.0, 10.0])
def test_activation_matches_formula_and_fixes_one(a):
    z = np.linspace(-30, 30, 601)
    q = QuotientActivation(a).double()(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(q, q_ref(z, a), rtol=1e-12, atol=1e-300)
    assert QuotientActivation(a)(torch.zeros(3)).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert QuotientActivation(a)(torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(1.0, abs=1e-14)
    assert (q > 0).all() and (q < a).all()


def test_activation_a2_is_twice_sigmoid_and_gradient():
    z = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    q = QuotientActivation(2.0)(z)
    torch.testing.assert_close(q, 2 * torch.sigmoid(z))
    a = 1.7
    z2 = z.detach().clone().requires_grad_(True)
    q2 = QuotientActivation(a)(z2)
    q2.sum().backward()
    # d/dz a*sigmoid(u) = a*s*(1-s) = q * (1 - q / a)
    torch.testing.assert_close(z2.grad, (q2 * (1 - q2 / a)).detach())


@pytest.mark.parametrize('bad', [1.0, 0.5, -2.0, 0.0, float('nan'), float('inf'), True, '2', None])
def test_activation_rejects_bad_a(bad):
    with pytest.raises(ValueError, match=r'\ba='):
        QuotientActivation(bad)


@pytest.mark.parametrize('name', ['quotient_resnet20_cifar', 'quotient_resnet18'])
def test_models_reject_bad_a(name):
    with pytest.raises(ValueError, match=r'\ba='):
        timm.create_model(name, a=1.0)


def test_cifar_a_per_depth():
    assert CIFAR_DEPTH_TO_A == {20: 2.0, 32: 2.0, 44: 1.8, 56: 1.7, 110: 1.5}
    for depth, a in CIFAR_DEPTH_TO_A.items():
        m = timm.create_model(f'quotient_resnet{depth}_cifar')
        acts = [x for x in m.modules() if isinstance(x, QuotientActivation)]
        n = (depth - 2) // 6
        assert len(acts) == 1 + 3 * n  # the stem + one per block
        assert {x.a for x in acts} == {a}
        assert isinstance(m.act1, QuotientActivation)
    base = timm.create_model('resnet56_cifar')
    assert not any(isinstance(x, QuotientActivation) for x in base.modules())


def _basic_block_ref(block: QuotientBasicBlock, x: np.ndarray, a: float) -> np.ndarray:
    h = np.maximum(bn_ref(conv_ref(x, block.conv1), block.bn1), 0.0)
    ratio = q_ref(bn_ref(conv_ref(h, block.conv2), block.bn2), a)
    if block.downsample is None:
        shortcut = x
    else:
        shortcut = q_ref(bn_ref(conv_ref(x, block.downsample[0]), block.downsample[1]), a)
    return shortcut * ratio


@pytest.mark.parametrize('stride,inplanes,planes', [(1, 8, 8), (2, 8, 16)])
def test_basic_block_float64_reference(stride, inplanes, planes):
    gen = torch.Generator().manual_seed(stride)
    a = 1.7
    down = None
    if stride != 1 or inplanes != planes:
        down = nn.Sequential(nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes))
    block = QuotientBasicBlock(inplanes, planes, stride, down, a=a)
    _randomize_bn(block, gen)
    block = block.double().eval()
    x = torch.rand(2, inplanes, 9, 9, generator=gen, dtype=torch.float64) + 0.1
    out = block(x).detach().numpy()
    ref = _basic_block_ref(block, x.numpy(), a)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert (out > 0).all()


def test_bottleneck_float64_reference():
    gen = torch.Generator().manual_seed(3)
    a = 2.5
    down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, 0, bias=False), nn.BatchNorm2d(16))
    block = QuotientBottleneck(8, 4, 2, down, a=a)
    _randomize_bn(block, gen)
    block = block.double().eval()
    x = torch.rand(2, 8, 8, 8, generator=gen, dtype=torch.float64) + 0.1
    h = np.maximum(bn_ref(conv_ref(x.numpy(), block.conv1), block.bn1), 0)
    h = np.maximum(bn_ref(conv_ref(h, block.conv2), block.bn2), 0)
    ratio = q_ref(bn_ref(conv_ref(h, block.conv3), block.bn3), a)
    shortcut = q_ref(bn_ref(conv_ref(x.numpy(), down[0]), down[1]), a)
    np.testing.assert_allclose(block(x).detach().numpy(), shortcut * ratio, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('block_cls,planes', [(QuotientBasicBlock, 8), (QuotientBottleneck, 2)])
def test_zero_last_bn_is_identity(block_cls, planes):
    block = block_cls(8, planes, a=1.5)
    block.zero_init_last()
    last_bn = block.bn2 if block_cls is QuotientBasicBlock else block.bn3
    nn.init.zeros_(last_bn.bias)
    x = torch.randn(4, 8, 6, 6)
    for mode in (True, False):  # batch statistics and running statistics alike
        block.train(mode)
        torch.testing.assert_close(block(x), x, rtol=0, atol=1e-6)
    # a non-zero branch output changes the input
    nn.init.ones_(last_bn.bias)
    assert not torch.allclose(block(x), x)


def test_dropped_path_is_identity_and_kept_ratio_unbiased():
    block = QuotientBasicBlock(4, 4, drop_path=DropPath(1.0)).train()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    # keep_prob 0.5: ratio is 1 (dropped) or 1 + 2 (q - 1) (kept)
    block = QuotientBasicBlock(4, 4, drop_path=DropPath(0.5)).train()
    torch.manual_seed(0)
    x = torch.rand(64, 4, 5, 5) + 0.5
    y = block(x)
    block.drop_path = None
    q = block(x) / x
    r = y / x
    dropped = torch.isclose(r, torch.ones_like(r), atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(r, 1 + 2 * (q - 1), atol=1e-4).flatten(1).all(1)
    assert (dropped | kept).all() and dropped.any() and kept.any()


def test_cifar_zero_init_makes_first_stage_identity():
    m = timm.create_model('quotient_resnet20_cifar', zero_init_last=True).eval()
    x = torch.randn(2, 3, 32, 32)
    stem, s1 = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    torch.testing.assert_close(s1, stem)
    assert (stem > 0).all() and (stem < 2).all()  # q_a stem with a = 2


@pytest.mark.parametrize('kwargs,word', [
    (dict(width_mult=0), 'width_mult'), (dict(width_mult=-1.0), 'width_mult'),
    (dict(layers=(3, 3)), 'layers'), (dict(layers=(3, 0, 3)), 'layers'),
])
def test_cifar_net_rejects_bad_shape_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        timm.create_model('quotient_resnet20_cifar', **kwargs)
