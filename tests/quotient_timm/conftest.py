"""Fixtures: tiny datasets written in torchvision's on-disk formats."""
import pytest

from quotient_datasets import bright_dark_images, write_cifar10, write_fashion_mnist


@pytest.fixture
def tiny_cifar10(tmp_path):
    tr_x, tr_y = bright_dark_images(200, 32, 3, 0)
    te_x, te_y = bright_dark_images(60, 32, 3, 1)
    return write_cifar10(tmp_path / 'cifar', tr_x, tr_y, te_x, te_y)


@pytest.fixture
def tiny_fashion_mnist(tmp_path):
    tr_x, tr_y = bright_dark_images(120, 28, 1, 2)
    te_x, te_y = bright_dark_images(40, 28, 1, 3)
    return write_fashion_mnist(tmp_path / 'fmnist', tr_x[..., 0], tr_y, te_x[..., 0], te_y)
