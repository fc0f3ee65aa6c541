"""timm conformance for the quotient models, mirroring the checks of timm's tests/test_models.py."""
import pytest
import torch
import timm
from timm.layers import DropPath
from timm.models import model_entrypoint

import quotient_timm  # noqa: F401
from quotient_timm import QuotientActivation

CIFAR_DEPTHS = (20, 32, 44, 56, 110)
CIFAR_QUOTIENT = [f'quotient_resnet{d}_cifar' for d in CIFAR_DEPTHS]
CIFAR_BASE = [f'resnet{d}_cifar' for d in CIFAR_DEPTHS]
IMAGENET = ['quotient_resnet18', 'quotient_resnet34', 'quotient_resnet50', 'quotient_resnet101']
ALL = CIFAR_QUOTIENT + CIFAR_BASE + IMAGENET
# Small models for the slower checks (scripting, tracing); the rest get forward/backward and cfg checks.
FAST = ['quotient_resnet20_cifar', 'resnet20_cifar', 'quotient_resnet18', 'quotient_resnet50']


def _size(name: str) -> int:
    # ImageNet nets at 64x64 keep the suite fast on CPU; all stages still run (64 / 32 = 2x2 at the end).
    return 32 if name.endswith('_cifar') else 64


def test_registry():
    assert timm.list_models('quotient_*') == sorted(CIFAR_QUOTIENT + IMAGENET, key=timm.models._registry._natural_key)
    assert set(timm.list_models('*_cifar')) == set(CIFAR_QUOTIENT + CIFAR_BASE)
    for name in ALL:
        # the name resolves to our entrypoint, not to one of timm's own models
        assert model_entrypoint(name).__module__ == 'quotient_timm.quotient_resnet'
        assert timm.get_pretrained_cfg(name) is not None


def _cifar_param_count(depth: int, in_chans: int = 3, num_classes: int = 10, width: int = 1) -> int:
    # conv3x3 stem + BN; per basic block two conv3x3 + two BN; 3x3 conv + BN shortcut on stride 2; linear.
    n = (depth - 2) // 6
    c = [16 * width, 32 * width, 64 * width]
    total = 9 * in_chans * c[0] + 2 * c[0]
    cin = c[0]
    for stage, cout in enumerate(c):
        for i in range(n):
            total += 9 * cin * cout + 9 * cout * cout + 4 * cout
            if stage > 0 and i == 0:
                total += 9 * cin * cout + 2 * cout
            cin = cout
    return total + c[2] * num_classes + num_classes


@pytest.mark.parametrize('depth', CIFAR_DEPTHS)
def test_param_counts_equal_baseline(depth):
    for kw in (dict(), dict(width_mult=2, num_classes=100, in_chans=1)):
        q = timm.create_model(f'quotient_resnet{depth}_cifar', **kw)
        r = timm.create_model(f'resnet{depth}_cifar', **kw)
        nq = sum(p.numel() for p in q.parameters())
        assert nq == sum(p.numel() for p in r.parameters())
        assert nq == _cifar_param_count(
            depth, kw.get('in_chans', 3), kw.get('num_classes', 10), kw.get('width_mult', 1))
        assert list(q.state_dict().keys()) == list(r.state_dict().keys())


@pytest.mark.parametrize('name', IMAGENET)
def test_imagenet_variants_match_timm_resnet_layout(name):
    q = timm.create_model(name)
    r = timm.create_model(name.replace('quotient_', ''))
    assert {k: v.shape for k, v in q.state_dict().items()} == {k: v.shape for k, v in r.state_dict().items()}
    assert isinstance(q, timm.models.ResNet)
    assert isinstance(q.act1, QuotientActivation)
    # one q_a per block plus the stem; branch-internal activations stay ReLU
    blocks = [m for n, m in q.named_modules() if n.count('.') == 1 and n.startswith('layer')]
    assert sum(isinstance(m, QuotientActivation) for m in q.modules()) == len(blocks) + 1


@pytest.mark.parametrize('name', ALL)
def test_forward_backward(name):
    s = _size(name)
    model = timm.create_model(name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    out = model(torch.randn(2, 3, s, s))
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f'no gradient for {n}'
    assert sum(p.grad.numel() for p in model.parameters()) == num_params
    assert out.shape == (2, 42)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('name', ALL)
def test_default_cfg(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    sd = model.state_dict()
    assert cfg['first_conv'] + '.weight' in sd and cfg['classifier'] + '.weight' in sd
    assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0] == 3
    if name.endswith('_cifar'):
        assert cfg['input_size'] == (3, 32, 32) and cfg['num_classes'] == 10 and cfg['pool_size'] == (8, 8)
    else:
        assert cfg['input_size'] == (3, 224, 224) and cfg['num_classes'] == 1000 and cfg['pool_size'] == (7, 7)
    assert model.fc.out_features == cfg['num_classes']
    if name in ('quotient_resnet101',):
        return  # same class and cfg as resnet50 below; skip the 224x224 forward to save time
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[-2:] == cfg['pool_size'] and feats.shape[1] == model.num_features
        model.reset_classifier(0)
        out = model(x)
        assert out.shape == (1, model.num_features)
        model.reset_classifier(0, '')
        out = model(x)
        assert out.ndim == 4 and out.shape[-2:] == cfg['pool_size']


@pytest.mark.parametrize('name', FAST)
def test_forward_head_and_reset_classifier(name):
    s = _size(name)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.fc(pre), model(x))
        assert model.get_classifier() is model.fc
        model.reset_classifier(5, 'catavgmax')
        assert model.head_hidden_size == 2 * model.num_features
        assert model(x).shape == (2, 5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 2 * model.num_features)


@pytest.mark.parametrize('name', FAST)
def test_constructor_kwargs(name):
    s = _size(name)
    model = timm.create_model(name, num_classes=7, in_chans=1, global_pool='max', drop_rate=0.25, drop_path_rate=0.1)
    assert model.num_classes == 7 and model.drop_rate == 0.25 and model.global_pool.pool_type == 'max'
    assert model.conv1.in_channels == 1
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.1) and rates == sorted(rates)
    model.eval()
    x = torch.randn(3, 1, s, s)
    assert model(x).shape == (3, 7)
    model.train()
    torch.manual_seed(0)
    y1 = model(x)
    assert not torch.allclose(y1, model(x))  # dropout / drop path are active in training


@pytest.mark.parametrize('name', ALL)
def test_features_only(name):
    s = _size(name)
    model = timm.create_model(name, features_only=True).eval()
    chans = model.feature_info.channels()
    reds = model.feature_info.reduction()
    assert len(chans) == (4 if name.endswith('_cifar') else 5)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, s, s))
    assert len(outs) == len(chans)
    for o, c, r in zip(outs, chans, reds):
        assert o.shape == (1, c, s // r, s // r)
        assert torch.isfinite(o).all()
    sub = timm.create_model(name, features_only=True, out_indices=(1, 2))
    assert len(sub(torch.randn(1, 3, s, s))) == 2


@pytest.mark.parametrize('name', FAST)
def test_forward_intermediates(name):
    s = _size(name)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        info = model.feature_info
        assert [t.shape[1] for t in inter] == [f['num_chs'] for f in info]
        assert [s // t.shape[-1] for t in inter] == [f['reduction'] for f in info]
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2
        for a_, b_ in zip(only, inter[-2:]):
            torch.testing.assert_close(a_, b_)
        # the feature extractor built on the same weights gives the same maps
        feat_model = timm.create_model(name, features_only=True).eval()
        feat_model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('fc.')})
        for a_, b_ in zip(feat_model(x), inter):
            torch.testing.assert_close(a_, b_)
        # pruning keeps the requested taps and drops the head
        kept = model.prune_intermediate_layers(indices=2)
        assert len(kept) == 2 and model.num_classes == 0


@pytest.mark.parametrize('name', FAST)
def test_grad_checkpointing_same_output(name):
    s = _size(name)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, s, s)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize('name', FAST)
def test_torchscript(name):
    s = _size(name)
    with timm.layers.set_scriptable(True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, 3, s, s)
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', FAST)
def test_fx(name):
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    s = _size(name)
    model = timm.create_model(name).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    x = torch.randn(1, 3, s, s)
    assert train_nodes[-1] == eval_nodes[-1] == 'fc'
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]]).eval()
    out = fx_model(x)
    torch.testing.assert_close(out[eval_nodes[-1]], model(x))
    fx_feats = timm.create_model(name, features_only=True, feature_cls='fx').eval()
    assert len(fx_feats(x)) == len(fx_feats.feature_info.channels())


@pytest.mark.parametrize('kwargs', [
    dict(stem_type='deep', avg_down=True), dict(down_kernel_size=3), dict(block_args=dict(attn_layer='se')),
    dict(output_stride=16), dict(a=1.5, drop_block_rate=0.1),
])
@pytest.mark.parametrize('name', ['quotient_resnet18', 'quotient_resnet50'])
def test_timm_resnet_options_inherited(name, kwargs):
    q = timm.create_model(name, **kwargs)
    r = timm.create_model(name.replace('quotient_', ''), **{k: v for k, v in kwargs.items() if k != 'a'})
    assert sum(p.numel() for p in q.parameters()) == sum(p.numel() for p in r.parameters())
    assert {m.a for m in q.modules() if isinstance(m, QuotientActivation)} == {kwargs.get('a', 2.0)}
    out = q(torch.randn(2, 3, 64, 64))
    out.mean().backward()
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    if 'output_stride' in kwargs:
        assert q.forward_features(torch.randn(1, 3, 64, 64)).shape[-1] == 4  # 64 / 16
