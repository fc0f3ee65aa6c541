"""Small-image datasets for the quotient trainer, read from local files into memory.

Supported (all offline; nothing is downloaded):
* ``cifar10`` / ``cifar100``: torchvision's on-disk layout (``cifar-10-batches-py/``, ``cifar-100-python/``).
* ``svhn``: torchvision's layout (``train_32x32.mat``, ``test_32x32.mat``; reading them needs scipy).
* ``fashion_mnist``: the four idx files (``.gz`` or not), either directly in the folder (Debian's
  ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist) or in torchvision's
  ``FashionMNIST/raw/``.
* ``imagefolder``: ``train/<class>/*`` and ``test/<class>/*`` image files, resized to ``image_size``.

Whole datasets are held as uint8 tensors (N, C, H, W), so batches are cut and augmented on the training
device with no loader processes: at 32x32 the GPU would otherwise wait on the CPU.
"""
import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    'DATASETS', 'DEFAULT_ROOTS', 'DatasetNotFoundError', 'DataFileError', 'ImageSplits', 'load_dataset',
    'split_train_val', 'augment_batch', 'normalize_batch',
]

DATASETS = ('cifar10', 'cifar100', 'svhn', 'fashion_mnist', 'imagefolder')
DEFAULT_ROOTS: Dict[str, str] = {'fashion_mnist': '/usr/share/datasets/fashion-mnist'}

_HOW_TO_GET = {
    'cifar10': 'download and extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into the folder '
               '(or torchvision.datasets.CIFAR10(root, download=True) on a machine with internet access)',
    'cifar100': 'download and extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into the folder '
                '(or torchvision.datasets.CIFAR100(root, download=True))',
    'svhn': 'put train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ into the folder '
            '(or torchvision.datasets.SVHN(root, split=..., download=True))',
    'fashion_mnist': 'install Debian\'s package (`apt-get install dataset-fashion-mnist`, files land in '
                     '/usr/share/datasets/fashion-mnist) or torchvision.datasets.FashionMNIST(root, download=True)',
    'imagefolder': 'create <root>/train/<class_name>/<image> and <root>/test/<class_name>/<image>',
}


class DataFileError(ValueError):
    """A dataset file is there but is not what its format promises (corrupt, truncated or crafted)."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where they were looked for."""

    def __init__(self, name: str, looked_in: Sequence[Path], expected: str) -> None:
        places = ', '.join(str(p) for p in looked_in)
        super().__init__(
            f'{name}: could not find {expected} (looked in: {places}). To get it: {_HOW_TO_GET[name]}.')


@dataclass
class ImageSplits:
    """uint8 images (N, C, H, W) and int64 labels (N,) for each split."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> Tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])


def _first_existing(candidates: Sequence[Path], predicate) -> Optional[Path]:
    for c in candidates:
        if predicate(c):
            return c
    return None


def _latin1_encode(text: str, encoding: str = 'utf-8') -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, 'latin1'); admit that and nothing else.
    if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
        raise pickle.UnpicklingError(f'_codecs.encode with encoding {encoding!r}')
    return text.encode('latin1')


def _safe_pickle_globals() -> Dict[Tuple[str, str], object]:
    # The numpy callables are taken from numpy's own pickling, so numpy 1 (numpy.core) and numpy 2 (numpy._core)
    # pickles both resolve to whatever this numpy uses.
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: Dict[Tuple[str, str], object] = {('_codecs', 'encode'): _latin1_encode}
    for core in ('numpy.core', 'numpy._core'):
        allowed[(f'{core}.multiarray', '_reconstruct')] = reconstruct
        allowed[(f'{core}.multiarray', 'scalar')] = scalar
        allowed[(f'{core}.numeric', '_frombuffer')] = frombuffer
    allowed[('numpy', 'ndarray')] = np.ndarray
    allowed[('numpy', 'dtype')] = np.dtype
    for builtins in ('builtins', '__builtin__'):  # Python 2 pickles name the module __builtin__
        for container in (set, frozenset, bytearray):
            allowed[(builtins, container.__name__)] = container
    return allowed


class _DataUnpickler(pickle.Unpickler):
    """Builds builtin containers, strings, bytes, numbers and numpy arrays; refuses every other global.

    A pickle can call any importable function while it loads (``os.system`` included). A CIFAR batch needs
    only numpy's array reconstruction, so that is all this unpickler will resolve."""

    _allowed = _safe_pickle_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f'it references {module}.{name}') from None


def _unpickle(path: Path) -> dict:
    """Read a CIFAR batch without running code from it: anything but data is refused, naming the file."""
    try:
        with open(path, 'rb') as f:
            data = _DataUnpickler(f, encoding='latin1').load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataFileError(
            f'{path}: refused to read this pickle ({e}); a CIFAR batch holds only dicts, lists, strings, numbers '
            'and numpy arrays, so the file is corrupt or was crafted') from None
    if not isinstance(data, dict):
        raise DataFileError(f'{path}: a CIFAR batch is a dict, this pickle holds a {type(data).__name__}')
    return data


def _from_cifar_rows(data: np.ndarray) -> torch.Tensor:
    # CIFAR pickles hold rows of 3072 bytes: the R, G, then B planes of a 32x32 image.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)))


def _load_cifar(root: Path, hundred: bool) -> ImageSplits:
    name = 'cifar100' if hundred else 'cifar10'
    sub = 'cifar-100-python' if hundred else 'cifar-10-batches-py'
    train_files = ['train'] if hundred else [f'data_batch_{i}' for i in range(1, 6)]
    test_file = 'test' if hundred else 'test_batch'
    label_key = 'fine_labels' if hundred else 'labels'
    folder = _first_existing([root / sub, root], lambda p: all((p / f).is_file() for f in train_files + [test_file]))
    if folder is None:
        raise DatasetNotFoundError(name, [root / sub, root], f'{", ".join(train_files)} and {test_file}')

    def read(files: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for f in files:
            d = _unpickle(folder / f)
            missing = [k for k in ('data', label_key) if k not in d]
            if missing:
                raise DataFileError(f'{folder / f}: the CIFAR batch has no {" or ".join(missing)} entry')
            try:
                x = _from_cifar_rows(d['data'])
                y = torch.as_tensor(d[label_key], dtype=torch.int64).reshape(-1)
            except (ValueError, TypeError, RuntimeError) as e:
                raise DataFileError(f'{folder / f}: unusable CIFAR batch ({e})') from None
            if x.shape[0] != y.shape[0]:
                raise DataFileError(f'{folder / f}: {x.shape[0]} images but {y.shape[0]} labels')
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = read(train_files)
    test_x, test_y = read([test_file])
    return ImageSplits(train_x, train_y, test_x, test_y, num_classes=100 if hundred else 10)


def _load_svhn(root: Path) -> ImageSplits:
    files = ['train_32x32.mat', 'test_32x32.mat']
    folder = _first_existing([root, root / 'svhn'], lambda p: all((p / f).is_file() for f in files))
    if folder is None:
        raise DatasetNotFoundError('svhn', [root, root / 'svhn'], ' and '.join(files))
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError('reading SVHN .mat files needs scipy: pip install "step3-hf[svhn]"') from e

    def read(f: str) -> Tuple[torch.Tensor, torch.Tensor]:
        m = loadmat(str(folder / f))
        x = torch.from_numpy(np.ascontiguousarray(np.transpose(m['X'], (3, 2, 0, 1)).astype(np.uint8)))
        y = torch.from_numpy(m['y'].astype(np.int64).reshape(-1))
        y[y == 10] = 0  # SVHN stores digit 0 as label 10
        return x, y

    train_x, train_y = read(files[0])
    test_x, test_y = read(files[1])
    return ImageSplits(train_x, train_y, test_x, test_y, num_classes=10)


_FMNIST_FILES = {
    'train_x': 'train-images-idx3-ubyte', 'train_y': 'train-labels-idx1-ubyte',
    'test_x': 't10k-images-idx3-ubyte', 'test_y': 't10k-labels-idx1-ubyte',
}


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f'{path} is not an idx file of unsigned bytes')
    shape = struct.unpack('>' + 'I' * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f'{path}: header says shape {shape}, file holds {data.size} values')
    return data.reshape(shape)


def _load_fashion_mnist(root: Path) -> ImageSplits:
    candidates = [root, root / 'FashionMNIST' / 'raw', root / 'raw']

    def find(folder: Path, stem: str) -> Optional[Path]:
        for f in (folder / stem, folder / f'{stem}.gz'):
            if f.is_file():
                return f
        return None

    folder = _first_existing(candidates, lambda p: all(find(p, s) for s in _FMNIST_FILES.values()))
    if folder is None:
        raise DatasetNotFoundError(
            'fashion_mnist', candidates, ', '.join(f'{s}[.gz]' for s in _FMNIST_FILES.values()))
    arrays = {k: _read_idx(find(folder, s)) for k, s in _FMNIST_FILES.items()}
    x = {k: torch.from_numpy(arrays[k].copy()).unsqueeze(1) for k in ('train_x', 'test_x')}
    y = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ('train_y', 'test_y')}
    return ImageSplits(x['train_x'], y['train_y'], x['test_x'], y['test_y'], num_classes=10)


def _load_imagefolder(root: Path, image_size: int) -> ImageSplits:
    from PIL import Image

    if not ((root / 'train').is_dir() and (root / 'test').is_dir()):
        raise DatasetNotFoundError('imagefolder', [root / 'train', root / 'test'], 'train/ and test/ class folders')
    classes = sorted(d.name for d in (root / 'train').iterdir() if d.is_dir())
    if not classes:
        raise DatasetNotFoundError('imagefolder', [root / 'train'], 'class sub-folders with images')
    index = {c: i for i, c in enumerate(classes)}

    def read(split: str) -> Tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for c in classes:
            folder = root / split / c
            for f in sorted(folder.iterdir()) if folder.is_dir() else []:
                if f.suffix.lower() not in ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff'):
                    continue
                img = Image.open(f).convert('RGB').resize((image_size, image_size), Image.BILINEAR)
                xs.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
                ys.append(index[c])
        if not xs:
            raise DatasetNotFoundError('imagefolder', [root / split], 'image files')
        return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)

    train_x, train_y = read('train')
    test_x, test_y = read('test')
    return ImageSplits(train_x, train_y, test_x, test_y, num_classes=len(classes))


def load_dataset(name: str, root: Optional[str] = None, image_size: int = 32) -> ImageSplits:
    """Read a dataset's train and test splits from `root` (see the module docstring for layouts)."""
    if name not in DATASETS:
        raise ValueError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
    if root is None:
        root = DEFAULT_ROOTS.get(name)
        if root is None:
            raise ValueError(f'{name} needs a data folder (--data-dir); to get the data: {_HOW_TO_GET[name]}')
    path = Path(os.path.expanduser(root))
    if name in ('cifar10', 'cifar100'):
        return _load_cifar(path, hundred=name == 'cifar100')
    if name == 'svhn':
        return _load_svhn(path)
    if name == 'fashion_mnist':
        return _load_fashion_mnist(path)
    return _load_imagefolder(path, image_size)


def split_train_val(data: ImageSplits, val_fraction: float = 0.1, seed: int = 0) -> ImageSplits:
    """Hold out a seeded random `val_fraction` of the training set (CIFAR: 50k -> 45k/5k)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f'val_fraction must be in [0, 1), got val_fraction={val_fraction}')
    n = data.train_x.shape[0]
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and not 0 < n_val < n:
        raise ValueError(f'val_fraction={val_fraction} of {n} training images leaves an empty split')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return ImageSplits(
        data.train_x[train_idx], data.train_y[train_idx], data.test_x, data.test_y, data.num_classes,
        val_x=data.train_x[val_idx] if n_val else None, val_y=data.train_y[val_idx] if n_val else None)


def augment_batch(
        x: torch.Tensor,
        padding: int = 4,
        flip: bool = True,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random crop of the original size from a zero-padded image, and random horizontal flip, per sample."""
    n, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        off = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device='cpu').to(dev)
        rows = (off[0, :, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (off[1, :, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
               rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator, device='cpu') < 0.5).to(dev)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1] -> (x - mean) / std per channel."""
    c = x.shape[1]
    if len(mean) != c:
        # One-channel data with a 3-channel config: use the channel average (as timm does for in_chans=1).
        mean, std = [sum(mean) / len(mean)] * c, [sum(std) / len(std)] * c
    m = torch.as_tensor(mean, device=x.device, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=torch.float32).view(1, c, 1, 1)
    return (x.float().div_(255.0) - m) / s
