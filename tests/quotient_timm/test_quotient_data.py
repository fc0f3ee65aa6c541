"""Dataset readers, split and augmentation."""
import builtins
import os
import pickle

import numpy as np
import pytest
import torch

from quotient_timm.data import DataFileError, DatasetNotFoundError, augment_batch, load_dataset, normalize_batch, \
    split_train_val

from quotient_datasets import write_cifar10, write_fashion_mnist


def test_cifar10_pixels_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    tr = rng.integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    te = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    write_cifar10(tmp_path, tr, list(range(10)), te, [3, 1, 4, 1])
    d = load_dataset('cifar10', str(tmp_path))
    assert d.train_x.shape == (10, 3, 32, 32) and d.train_x.dtype == torch.uint8
    np.testing.assert_array_equal(d.train_x.permute(0, 2, 3, 1).numpy(), tr)  # HWC on disk -> CHW
    np.testing.assert_array_equal(d.test_x.permute(0, 2, 3, 1).numpy(), te)
    assert d.train_y.tolist() == list(range(10)) and d.test_y.tolist() == [3, 1, 4, 1]
    assert d.num_classes == 10 and d.in_chans == 3
    # the folder itself may also be given
    assert load_dataset('cifar10', str(tmp_path / 'cifar-10-batches-py')).train_x.shape[0] == 10


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_cifar_pickles_of_every_protocol_round_trip(tmp_path, protocol):
    """Protocol 2 (the released files; bytes via _codecs.encode, sets via __builtin__), 4 and 5 (numpy's
    _frombuffer) all read back through the restricted unpickler."""
    rng = np.random.default_rng(protocol)
    write_cifar10(tmp_path, rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), list(range(10)),
                  rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), [0, 1])
    folder = tmp_path / 'cifar-10-batches-py'
    rows = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    batch = {'batch_label': b'testing batch 1 of 1', 'labels': [np.int64(7), 2], 'data': rows,
             'filenames': [b'a.png', 'b.png'], 'extra': ({1, 2}, frozenset([3]), bytearray(b'x'), 1.5, None, True)}
    (folder / 'test_batch').write_bytes(pickle.dumps(batch, protocol=protocol))
    d = load_dataset('cifar10', str(tmp_path))
    np.testing.assert_array_equal(d.test_x.reshape(2, -1).numpy(), rows)
    assert d.test_y.tolist() == [7, 2]


class _Payload:
    """Unpickling this calls `fn(arg)`: the shape of every pickle exploit."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize('how', ['os.system', 'builtins.exec', 'in_the_data'])
def test_crafted_cifar_pickle_is_refused_and_its_payload_never_runs(tiny_cifar10, how):
    marker = tiny_cifar10 / 'payload-ran'
    folder = tiny_cifar10 / 'cifar-10-batches-py'
    if how == 'os.system':
        payload = _Payload(os.system, f'touch {marker}')
    elif how == 'builtins.exec':
        payload = _Payload(builtins.exec, f'open({str(marker)!r}, "w").close()')
    else:  # hidden inside an otherwise valid batch
        payload = {'data': np.zeros((1, 3072), np.uint8), 'labels': [0], 'x': _Payload(os.system, f'touch {marker}')}
    (folder / 'data_batch_1').write_bytes(pickle.dumps(payload, protocol=2))
    # The payload does run under plain pickle: the test would notice if it ran under the reader.
    with pytest.raises(DataFileError) as e:
        load_dataset('cifar10', str(tiny_cifar10))
    assert not marker.exists()
    message = str(e.value)
    assert str(folder / 'data_batch_1') in message and 'refused' in message
    assert ('posix.system' in message or 'os.system' in message) if how != 'builtins.exec' else 'exec' in message
    pickle.loads((folder / 'data_batch_1').read_bytes())
    assert marker.exists()


@pytest.mark.parametrize('content, named', [
    (b'not a pickle at all', 'refused'),
    (pickle.dumps([1, 2, 3]), 'holds a list'),
    (pickle.dumps({'data': np.zeros((1, 3072), np.uint8)}), 'no labels'),
    (pickle.dumps({'data': np.zeros((1, 100), np.uint8), 'labels': [0]}), 'unusable CIFAR batch'),
    (pickle.dumps({'data': np.zeros((2, 3072), np.uint8), 'labels': [0]}), '2 images but 1 labels'),
], ids=['garbage', 'not_a_dict', 'no_labels', 'wrong_row_size', 'count_mismatch'])
def test_corrupt_cifar_batch_is_named(tiny_cifar10, content, named):
    folder = tiny_cifar10 / 'cifar-10-batches-py'
    (folder / 'data_batch_3').write_bytes(content)
    with pytest.raises(DataFileError, match=named) as e:
        load_dataset('cifar10', str(tiny_cifar10))
    assert str(folder / 'data_batch_3') in str(e.value)


@pytest.mark.parametrize('layout,gz', [('flat', True), ('torchvision', True), ('torchvision', False)])
def test_fashion_mnist_layouts(tmp_path, layout, gz):
    rng = np.random.default_rng(1)
    tr = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    te = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    folder = tmp_path if layout == 'flat' else tmp_path / 'FashionMNIST' / 'raw'
    write_fashion_mnist(folder, tr, [0, 1, 2, 3, 4, 5, 9], te, [9, 8, 7], gz=gz)
    d = load_dataset('fashion_mnist', str(tmp_path))
    np.testing.assert_array_equal(d.train_x[:, 0].numpy(), tr)
    np.testing.assert_array_equal(d.test_x[:, 0].numpy(), te)
    assert d.train_y.tolist() == [0, 1, 2, 3, 4, 5, 9] and d.test_y.tolist() == [9, 8, 7]
    assert d.in_chans == 1 and d.image_size == (28, 28)


def test_svhn_reads_mat_files(tmp_path):
    import scipy.io as scipy_io  # in the test extra
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)  # SVHN stores H, W, C, N
    y = np.array([[10], [1], [2], [3], [10]], dtype=np.uint8)
    for split in ('train', 'test'):
        scipy_io.savemat(str(tmp_path / f'{split}_32x32.mat'), {'X': x, 'y': y})
    d = load_dataset('svhn', str(tmp_path))
    np.testing.assert_array_equal(d.train_x.numpy(), x.transpose(3, 2, 0, 1))
    assert d.train_y.tolist() == [0, 1, 2, 3, 0]


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'svhn', 'fashion_mnist', 'imagefolder'])
def test_missing_data_says_where_and_how(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, str(tmp_path / 'nowhere'))
    msg = str(e.value)
    assert str(tmp_path / 'nowhere') in msg and 'To get it' in msg


def test_unknown_dataset_and_missing_root():
    with pytest.raises(ValueError, match='unknown dataset'):
        load_dataset('mnist3d', '/tmp')
    with pytest.raises(ValueError, match='--data-dir'):
        load_dataset('cifar10', None)


def test_split_is_seeded_disjoint_and_proportional():
    n = 50000
    x = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1)  # image i holds its own index
    from quotient_timm.data import ImageSplits
    d = ImageSplits(x, torch.arange(n), x[:10], torch.arange(10), num_classes=10)
    s = split_train_val(d, 0.1, seed=0)
    assert s.train_x.shape[0] == 45000 and s.val_x.shape[0] == 5000
    ids_train, ids_val = set(s.train_x.flatten().tolist()), set(s.val_x.flatten().tolist())
    assert not ids_train & ids_val and len(ids_train | ids_val) == n
    assert torch.equal(s.train_y, s.train_x.flatten())  # labels moved with their images
    assert torch.equal(split_train_val(d, 0.1, seed=0).val_x, s.val_x)
    assert not torch.equal(split_train_val(d, 0.1, seed=1).val_x, s.val_x)
    assert split_train_val(d, 0.0).val_x is None
    with pytest.raises(ValueError, match='val_fraction'):
        split_train_val(d, 1.0)


def test_augment_crops_and_flips():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 2, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment_batch(x, padding=0, flip=False), x)
    y = augment_batch(x, padding=2, flip=True, generator=gen)
    assert y.shape == x.shape
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    n_flipped = n_shifted = 0
    for i in range(x.shape[0]):
        found = None
        for flip in (False, True):
            src = xp[i].flip(2) if flip else xp[i]
            for r in range(5):
                for c in range(5):
                    if torch.equal(src[:, r:r + 8, c:c + 8], y[i]):
                        found = (flip, r, c)
        assert found is not None, f'sample {i} is not a crop of the padded image'
        n_flipped += found[0]
        n_shifted += found[1:] != (2, 2)
    assert 10 < n_flipped < 54 and n_shifted > 32


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = normalize_batch(x, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert y[0, :, 0, 0].tolist() == pytest.approx([1.0, 3.0, 1.0])
    one = normalize_batch(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), (0.3, 0.6, 0.9), (0.1, 0.2, 0.3))
    assert one.flatten().tolist() == pytest.approx([-0.6 / 0.2] * 4)
