"""Quotient Networks for timm. Importing this package registers the models in timm's registry."""
from .quotient_resnet import (
    CIFAR_DEPTH_TO_A,
    CifarResNet,
    QuotientActivation,
    QuotientBasicBlock,
    QuotientBottleneck,
    QuotientResNet,
)

__all__ = [
    'CIFAR_DEPTH_TO_A', 'CifarResNet', 'QuotientActivation', 'QuotientBasicBlock', 'QuotientBottleneck',
    'QuotientResNet',
]
