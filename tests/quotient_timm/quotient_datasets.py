"""Writers for tiny datasets in the on-disk formats torchvision uses (written here, byte by byte)."""
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, train_images: np.ndarray, train_labels, test_images: np.ndarray, test_labels) -> Path:
    """images: uint8 (N, 32, 32, 3) HWC; written as cifar-10-batches-py pickles (rows of R, G, B planes)."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, images, labels):
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(folder / name, 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': list(map(int, labels)), 'data': rows,
                         'filenames': [f'{i}.png' for i in range(len(images))]}, f)

    chunks = np.array_split(np.arange(len(train_images)), 5)
    for i, idx in enumerate(chunks, start=1):
        dump(f'data_batch_{i}', train_images[idx], np.asarray(train_labels)[idx])
    dump('test_batch', test_images, test_labels)
    return root


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack('>HBB', 0, 0x08, array.ndim) + struct.pack('>' + 'I' * array.ndim, *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + '.gz', 'wb') as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_fashion_mnist(folder: Path, train_x, train_y, test_x, test_y, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / 'train-images-idx3-ubyte', train_x, gz)
    write_idx(folder / 'train-labels-idx1-ubyte', np.asarray(train_y, dtype=np.uint8), gz)
    write_idx(folder / 't10k-images-idx3-ubyte', test_x, gz)
    write_idx(folder / 't10k-labels-idx1-ubyte', np.asarray(test_y, dtype=np.uint8), gz)
    return folder


def bright_dark_images(n: int, size: int, channels: int, seed: int):
    """Two easily separable classes: dark (0) and bright (1) noisy images, labels alternate."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    base = np.where(labels[:, None, None, None] == 1, 190, 50)
    images = np.clip(base + rng.integers(-40, 41, size=(n, size, size, channels)), 0, 255).astype(np.uint8)
    return images, labels
