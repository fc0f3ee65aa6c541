"""Quotient Networks (ResNet-like networks that learn quotients) for timm

A quotient block multiplies its input by a learned, bounded, positive ratio instead of adding a learned
residual:

    y = shortcut * q_a(branch(x)),    q_a(z) = a * sigmoid(z - ln(a - 1)),  a > 1

q_a(0) = 1, so a branch whose last BN outputs zero is an exact identity (ResNet's zero residual).
Following the official code, the stem ends in q_a (not ReLU), a shortcut that changes the shape is
conv + BN passed through q_a, and nothing is applied after the product.

Contents:
* `QuotientActivation`, `QuotientBasicBlock`, `QuotientBottleneck`
* `CifarResNet`: the paper's 3-stage CIFAR networks (16/32/64 x width_mult channels, 3x3 stride-2
  conv + BN shortcuts), quotient or the paper's ResNet baseline (timm's `BasicBlock`)
* `QuotientResNet`: ImageNet-style networks, timm's own `ResNet` with quotient blocks and a q_a stem

Paper: `Quotient Network: A Network Similar to ResNet but Learning Quotients`,
Algorithms 2024, 17(11), 521 / arXiv:2506.00992.
"""
import math
import numbers
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_aa, create_attn, create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # timm exports it from no public module (docs/compatibility.md)
from timm.models.resnet import BasicBlock, ResNet

__all__ = [
    'QuotientActivation', 'QuotientBasicBlock', 'QuotientBottleneck', 'CifarResNet', 'QuotientResNet',
    'CIFAR_DEPTH_TO_A',
]

# a by depth, from the official code (44/56/110); 20 and 32 use a = 2 (range (0, 2)), the best of
# the paper's 20-layer ablation of sigmoid forms.
CIFAR_DEPTH_TO_A: Dict[int, float] = {20: 2.0, 32: 2.0, 44: 1.8, 56: 1.7, 110: 1.5}


def _check_a(a: Any) -> float:
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(float(a)) or a <= 1:
        raise ValueError(f'quotient activation needs a finite real a > 1 (q_a has range (0, a) and q_a(0) = 1), got a={a!r}')
    return float(a)


class QuotientActivation(nn.Module):
    """q_a(z) = a * sigmoid(z - ln(a - 1)): bounded in (0, a), positive, q_a(0) = 1."""

    def __init__(self, a: float = 2.0, inplace: bool = False) -> None:
        # `inplace` is accepted (and ignored) so the class can stand in for timm's act_layer.
        super().__init__()
        self.a = _check_a(a)
        self.shift = math.log(self.a - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x - self.shift) * self.a

    def extra_repr(self) -> str:
        return f'a={self.a}'


class _QuotientBlock(nn.Module):
    """What both quotient blocks do after their branch: y = shortcut * q_a(branch)."""

    def _init_merge(
            self, a: float, downsample: Optional[nn.Module], stride: int, dilation: int,
            drop_path: Optional[nn.Module],
    ) -> None:
        # Registered after the branch layers, in timm's order, so module order and state-dict keys match timm.
        self.quot = QuotientActivation(a)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path

    def merge(self, shortcut: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.quot(x)
        if self.drop_path is not None:
            # A dropped sample gets ratio 1 (identity), the multiplicative analogue of a dropped
            # residual; kept samples get 1 + (q - 1) / keep_prob, so the expected ratio is unchanged.
            x = self.drop_path(x - 1.0) + 1.0
        if self.downsample is not None:
            shortcut = self.quot(self.downsample(shortcut))
        return shortcut * x


class QuotientBasicBlock(_QuotientBlock):
    """Basic quotient block: y = shortcut * q_a(BN2(conv3x3(ReLU(BN1(conv3x3(x)))))).

    The shortcut is x, or q_a(downsample(x)) where the shape changes. Layer names match timm's
    `BasicBlock`, so the two have the same parameters and state-dict keys.
    """
    expansion = 1

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            attn_layer: Optional[Type[nn.Module]] = None,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Type[nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            a: float = 2.0,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError('QuotientBasicBlock supports only cardinality=1 and base_width=64')
        first_planes = planes // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        self.conv1 = nn.Conv2d(
            inplanes, first_planes, kernel_size=3, stride=1 if use_aa else stride,
            padding=first_dilation, dilation=first_dilation, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act1 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=first_planes, stride=stride, enable=use_aa, **dd)

        self.conv2 = nn.Conv2d(
            first_planes, outplanes, kernel_size=3, padding=dilation, dilation=dilation, bias=False, **dd)
        self.bn2 = norm_layer(outplanes, **dd)

        self.se = create_attn(attn_layer, outplanes, **dd)

        self._init_merge(a, downsample, stride, dilation, drop_path)

    def zero_init_last(self) -> None:
        """Zero the last BN weight: the branch then outputs q_a(0) = 1 and the block starts as identity."""
        if getattr(self.bn2, 'weight', None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)

        x = self.conv2(x)
        x = self.bn2(x)

        if self.se is not None:
            x = self.se(x)

        return self.merge(shortcut, x)


class QuotientBottleneck(_QuotientBlock):
    """Bottleneck quotient block: y = shortcut * q_a(BN3(conv1x1(ReLU(BN2(conv3x3(ReLU(BN1(conv1x1(x))))))))).

    Layer names match timm's `Bottleneck`.
    """
    expansion = 4

    def __init__(
            self,
            inplanes: int,
            planes: int,
            stride: int = 1,
            downsample: Optional[nn.Module] = None,
            cardinality: int = 1,
            base_width: int = 64,
            reduce_first: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            attn_layer: Optional[Type[nn.Module]] = None,
            aa_layer: Optional[Type[nn.Module]] = None,
            drop_block: Optional[Type[nn.Module]] = None,
            drop_path: Optional[nn.Module] = None,
            a: float = 2.0,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)

        self.conv2 = nn.Conv2d(
            first_planes, width, kernel_size=3, stride=1 if use_aa else stride,
            padding=first_dilation, dilation=first_dilation, groups=cardinality, bias=False, **dd)
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=width, stride=stride, enable=use_aa, **dd)

        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)

        self.se = create_attn(attn_layer, outplanes, **dd)

        self._init_merge(a, downsample, stride, dilation, drop_path)

    def zero_init_last(self) -> None:
        """Zero the last BN weight: the branch then outputs q_a(0) = 1 and the block starts as identity."""
        if getattr(self.bn3, 'weight', None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        x = self.bn3(x)

        if self.se is not None:
            x = self.se(x)

        return self.merge(shortcut, x)


BlockType = Union[Type[BasicBlock], Type[QuotientBasicBlock]]


class CifarResNet(nn.Module):
    """The paper's CIFAR-style network: 3x3 stem, three stages of 3x3 basic blocks, avg pool, linear.

    Depth 6n + 2 with n blocks per stage, stage widths (16, 32, 64) x width_mult, strides (1, 2, 2);
    the shape-changing shortcut is a 3x3 stride-2 conv + BN in both the quotient net and its ResNet
    baseline (so both have identical parameters). `quotient=True` uses `QuotientBasicBlock` and a q_a
    stem, `quotient=False` timm's `BasicBlock` (ReLU after the sum) and a ReLU stem.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 3, 3),
            quotient: bool = True,
            a: float = 2.0,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            width_mult: float = 1.0,
            channels: Tuple[int, ...] = (16, 32, 64),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            layers: Number of blocks in each stage.
            quotient: Quotient blocks and q_a stem (True) or the ResNet baseline (False).
            a: Range of the quotient activation, a > 1 (unused by the baseline, still validated).
            num_classes: Number of classes; 0 leaves no classifier.
            in_chans: Number of input channels.
            global_pool: Global pooling type ('avg', 'max', 'avgmax', 'catavgmax', '' for none).
            width_mult: Multiplier of the stage widths (the paper's CIFAR-100 nets use 2).
            channels: Stage widths before width_mult.
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth rate, linearly increasing over blocks.
            zero_init_last: Zero-init the last BN of each branch (off in the paper).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        a = _check_a(a)
        if not (isinstance(width_mult, numbers.Real) and width_mult > 0):
            raise ValueError(f'width_mult must be a positive number, got width_mult={width_mult!r}')
        if len(channels) != 3 or len(layers) != 3 or any(int(n) < 1 for n in layers):
            raise ValueError(
                f'CifarResNet has 3 stages: layers and channels need 3 entries each (layers >= 1), '
                f'got layers={layers!r}, channels={channels!r}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.quotient = quotient
        self.a = a
        self.grad_checkpointing = False
        block: BlockType = QuotientBasicBlock if quotient else BasicBlock
        block_kwargs: Dict[str, Any] = dict(a=a) if quotient else {}
        widths = [max(1, int(round(c * width_mult))) for c in channels]

        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        # The stem feeds the multiplicative trunk, so it must be positive and bounded: q_a, not ReLU.
        self.act1 = QuotientActivation(a) if quotient else nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='act1')]

        num_blocks = sum(layers)
        block_idx = 0
        inplanes = widths[0]
        reduction = 1
        self.stage_names = []
        for stage_idx, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                downsample = None
                if s != 1 or inplanes != planes:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes, kernel_size=3, stride=s, padding=1, bias=False, **dd),
                        nn.BatchNorm2d(planes, **dd),
                    )
                dpr = drop_path_rate * block_idx / max(num_blocks - 1, 1)
                blocks.append(block(
                    inplanes, planes, s, downsample,
                    drop_path=DropPath(dpr) if dpr > 0. else None, **block_kwargs, **dd))
                inplanes = planes
                block_idx += 1
            name = f'layer{stage_idx + 1}'
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.feature_info.append(dict(num_chs=planes, reduction=reduction, module=name))

        self.num_features = self.head_hidden_size = inplanes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the stem and stage outputs (indices 0..3) selected by `indices`."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)

        x = self._stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        names = self.stage_names[:max_index] if stop_early else self.stage_names
        for feat_idx, n in enumerate(names, start=1):
            layer = getattr(self, n)
            x = checkpoint_seq(layer, x) if self.grad_checkpointing else layer(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last requested intermediate (and the head)."""
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        for n in self.stage_names[max_index:]:
            setattr(self, n, nn.Sequential())
        prune_end = max_index < len(self.stage_names)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


class QuotientResNet(ResNet):
    """timm's `ResNet` with quotient blocks and a q_a stem activation.

    Everything else (stem/downsample variants, output_stride, drop_path, features, intermediates,
    grad checkpointing) is timm's. The ReLUs inside the branches (and inside a deep stem) stay ReLU;
    only the activation that feeds the multiplicative trunk becomes q_a. Shortcut convs follow timm's
    layout (1x1 unless `down_kernel_size`/`avg_down` say otherwise), so parameter counts and
    state-dict keys equal timm's ResNet of the same depth.
    """

    def __init__(
            self,
            block: Union[Type[QuotientBasicBlock], Type[QuotientBottleneck]],
            layers: Tuple[int, ...],
            a: float = 2.0,
            block_args: Optional[Dict[str, Any]] = None,
            **kwargs: Any,
    ) -> None:
        a = _check_a(a)
        super().__init__(block, layers, block_args=dict(block_args or {}, a=a), **kwargs)
        self.a = a
        self.act1 = QuotientActivation(a)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is None:  # keep the current pooling (timm < 1.0.31 would reset it to 'avg')
            global_pool = self.global_pool.pool_type
        super().reset_classifier(num_classes, global_pool)
        # timm < 1.0.31 keeps the old pooling's width here (e.g. after switching to 'catavgmax').
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def _create_quotient_resnet(variant: str, pretrained: bool = False, **kwargs) -> QuotientResNet:
    return build_model_with_cfg(QuotientResNet, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:2506.00992', 'paper_name': 'Quotient Network: A Network Similar to ResNet but Learning Quotients',
        **kwargs
    }


def _cifar_cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    # The official recipe normalises CIFAR/SVHN with ImageNet mean/std.
    return _cfg(url=url, **dict(dict(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0), **kwargs))


default_cfgs = generate_default_cfgs({
    'quotient_resnet20_cifar': _cifar_cfg(),
    'quotient_resnet32_cifar': _cifar_cfg(),
    'quotient_resnet44_cifar': _cifar_cfg(),
    'quotient_resnet56_cifar': _cifar_cfg(),
    'quotient_resnet110_cifar': _cifar_cfg(),
    'resnet20_cifar': _cifar_cfg(),
    'resnet32_cifar': _cifar_cfg(),
    'resnet44_cifar': _cifar_cfg(),
    'resnet56_cifar': _cifar_cfg(),
    'resnet110_cifar': _cifar_cfg(),
    'quotient_resnet18': _cfg(),
    'quotient_resnet34': _cfg(),
    'quotient_resnet50': _cfg(),
    'quotient_resnet101': _cfg(),
})


def _cifar_args(depth: int, quotient: bool, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    n = (depth - 2) // 6
    args = dict(layers=(n, n, n), quotient=quotient)
    if quotient:
        args['a'] = CIFAR_DEPTH_TO_A[depth]
    return dict(args, **kwargs)


@register_model
def quotient_resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Quotient ResNet-20 for 32x32 images, a = 2."""
    return _create_cifar_resnet('quotient_resnet20_cifar', pretrained, **_cifar_args(20, True, kwargs))


@register_model
def quotient_resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Quotient ResNet-32 for 32x32 images, a = 2."""
    return _create_cifar_resnet('quotient_resnet32_cifar', pretrained, **_cifar_args(32, True, kwargs))


@register_model
def quotient_resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Quotient ResNet-44 for 32x32 images, a = 1.8."""
    return _create_cifar_resnet('quotient_resnet44_cifar', pretrained, **_cifar_args(44, True, kwargs))


@register_model
def quotient_resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Quotient ResNet-56 for 32x32 images, a = 1.7."""
    return _create_cifar_resnet('quotient_resnet56_cifar', pretrained, **_cifar_args(56, True, kwargs))


@register_model
def quotient_resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Quotient ResNet-110 for 32x32 images, a = 1.5."""
    return _create_cifar_resnet('quotient_resnet110_cifar', pretrained, **_cifar_args(110, True, kwargs))


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 baseline of the quotient paper (3x3 stride-2 conv + BN shortcuts)."""
    return _create_cifar_resnet('resnet20_cifar', pretrained, **_cifar_args(20, False, kwargs))


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 baseline of the quotient paper (3x3 stride-2 conv + BN shortcuts)."""
    return _create_cifar_resnet('resnet32_cifar', pretrained, **_cifar_args(32, False, kwargs))


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 baseline of the quotient paper (3x3 stride-2 conv + BN shortcuts)."""
    return _create_cifar_resnet('resnet44_cifar', pretrained, **_cifar_args(44, False, kwargs))


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 baseline of the quotient paper (3x3 stride-2 conv + BN shortcuts)."""
    return _create_cifar_resnet('resnet56_cifar', pretrained, **_cifar_args(56, False, kwargs))


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 baseline of the quotient paper (3x3 stride-2 conv + BN shortcuts)."""
    return _create_cifar_resnet('resnet110_cifar', pretrained, **_cifar_args(110, False, kwargs))


@register_model
def quotient_resnet18(pretrained: bool = False, **kwargs) -> QuotientResNet:
    """Quotient ResNet-18 (timm ResNet layout), a = 2."""
    model_args = dict(block=QuotientBasicBlock, layers=(2, 2, 2, 2))
    return _create_quotient_resnet('quotient_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def quotient_resnet34(pretrained: bool = False, **kwargs) -> QuotientResNet:
    """Quotient ResNet-34 (timm ResNet layout), a = 2."""
    model_args = dict(block=QuotientBasicBlock, layers=(3, 4, 6, 3))
    return _create_quotient_resnet('quotient_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def quotient_resnet50(pretrained: bool = False, **kwargs) -> QuotientResNet:
    """Quotient ResNet-50 (timm ResNet layout), a = 2."""
    model_args = dict(block=QuotientBottleneck, layers=(3, 4, 6, 3))
    return _create_quotient_resnet('quotient_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def quotient_resnet101(pretrained: bool = False, **kwargs) -> QuotientResNet:
    """Quotient ResNet-101 (timm ResNet layout), a = 2."""
    model_args = dict(block=QuotientBottleneck, layers=(3, 4, 23, 3))
    return _create_quotient_resnet('quotient_resnet101', pretrained, **dict(model_args, **kwargs))
