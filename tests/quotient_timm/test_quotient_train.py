"""The quotient-train CLI end to end on tiny synthetic datasets written in torchvision's formats."""
import csv
import json
import subprocess
import sys

import pytest
import torch
import timm
from safetensors.torch import load_file

from quotient_timm.data import load_dataset, normalize_batch
from quotient_timm.train import build_parser, main


def test_defaults_are_the_paper_recipe():
    a = build_parser().parse_args(['--output', 'x'])
    assert (a.lr, a.momentum, a.weight_decay, a.batch_size, a.epochs) == (0.1, 0.9, 1e-4, 128, 182)
    assert a.milestones == [92, 136] and a.lr_gamma == 0.1
    assert a.crop_padding == 4 and not a.no_flip and a.val_fraction == 0.1


def test_one_epoch_cifar10_smoke_and_weights_load(tiny_cifar10, tmp_path):
    out = tmp_path / 'run'
    rc = main(['--model', 'quotient_resnet20_cifar', '--dataset', 'cifar10', '--data-dir', str(tiny_cifar10),
               '--epochs', '1', '--batch-size', '32', '--output', str(out), '--no-progress'])
    assert rc == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert m['n_train'] == 180 and m['n_val'] == 20 and m['n_test'] == 60  # seeded 10% validation split
    assert len(m['history']) == 1 and m['best_epoch'] == 1
    assert 0 <= m['test_acc'] <= 100 and m['train_images_per_s'] > 0
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert len(rows) == 1 and float(rows[0]['lr']) == 0.1
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # the saved weights load through timm's pretrained path and reproduce the reported test accuracy
    sd = load_file(str(out / 'best.safetensors'))
    model = timm.create_model('quotient_resnet20_cifar', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / 'best.safetensors'))).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    data = load_dataset('cifar10', str(tiny_cifar10))
    cfg = model.pretrained_cfg
    with torch.no_grad():
        pred = model(normalize_batch(data.test_x, cfg['mean'], cfg['std'])).argmax(1)
    assert 100.0 * (pred == data.test_y).float().mean().item() == pytest.approx(m['test_acc'])
    hf = timm.create_model(f'local-dir:{out / "hf"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(hf(x), model(x), rtol=0, atol=0)


def test_fashion_mnist_learns_with_schedule_and_baseline(tiny_fashion_mnist, tmp_path):
    out = tmp_path / 'run'
    rc = main(['--model', 'resnet20_cifar', '--dataset', 'fashion_mnist', '--data-dir', str(tiny_fashion_mnist),
               '--epochs', '3', '--milestones', '2', '--batch-size', '16', '--lr', '0.05', '--output', str(out),
               '--no-progress', '--width-mult', '0.5'])
    assert rc == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert [h['lr'] for h in m['history']] == pytest.approx([0.05, 0.05, 0.005])
    assert m['config']['model_kwargs'] == dict(width_mult=0.5, num_classes=10, in_chans=1)
    # bright vs dark images: anything that trains gets these right
    assert m['test_acc'] >= 90.0
    model = timm.create_model('resnet20_cifar', pretrained=True, in_chans=1, width_mult=0.5,
                              pretrained_cfg_overlay=dict(file=str(out / 'best.safetensors')))
    assert model.conv1.weight.shape == (8, 1, 3, 3)


def test_missing_data_and_bad_flags_give_clear_errors(tmp_path, capsys):
    assert main(['--dataset', 'cifar10', '--data-dir', str(tmp_path / 'none'), '--output', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert 'cifar-10-batches-py' in err and str(tmp_path / 'none') in err and 'To get it' in err
    assert main(['--model', 'no_such_net', '--dataset', 'cifar10', '--data-dir', '.', '--output', str(tmp_path)]) == 2
    assert 'unknown model' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--dataset', 'imagenet', '--output', str(tmp_path)])


def test_model_arg_the_model_does_not_take_is_a_clear_error(tiny_cifar10, tmp_path, capsys):
    rc = main(['--model', 'quotient_resnet20_cifar', '--model-arg', 'no_such_arg=1', '--dataset', 'cifar10',
               '--data-dir', str(tiny_cifar10), '--epochs', '1', '--output', str(tmp_path / 'o'), '--no-progress'])
    assert rc == 2
    assert 'no_such_arg' in capsys.readouterr().err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, '-m', 'quotient_timm.train', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and '--milestones' in r.stdout and 'fashion_mnist' in r.stdout


def test_console_script_when_installed(tiny_fashion_mnist, tmp_path):
    from pathlib import Path
    script = Path(sys.executable).parent / 'quotient-train'
    if not script.exists():
        pytest.skip('package not installed with its console scripts')
    out = tmp_path / 'run'
    r = subprocess.run([str(script), '--model', 'quotient_resnet20_cifar', '--dataset', 'fashion_mnist',
                        '--data-dir', str(tiny_fashion_mnist), '--epochs', '1', '--batch-size', '64',
                        '--output', str(out), '--no-progress'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'test' in r.stdout and (out / 'best.safetensors').is_file()


def test_diverging_run_stops_naming_epoch_and_step_and_saves_nothing_non_finite(tiny_cifar10, tmp_path, capsys):
    out = tmp_path / 'run'
    rc = main(['--model', 'resnet20_cifar', '--dataset', 'cifar10', '--data-dir', str(tiny_cifar10), '--epochs', '3',
               '--batch-size', '32', '--lr', '1e10', '--output', str(out), '--no-progress'])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('quotient-train: error: epoch ')
    assert 'step ' in err and 'not finite' in err and 'lower --lr' in err
    assert not (out / 'hf').exists()
    if (out / 'best.safetensors').exists():  # an earlier, still finite epoch may have been kept
        assert all(torch.isfinite(v).all() for v in load_file(str(out / 'best.safetensors')).values())


def test_non_finite_weights_are_never_saved_as_best(tiny_cifar10, tmp_path, capsys, monkeypatch):
    """Even with a finite loss, weights that hold NaN (here: a BN running mean) are refused before saving."""
    import quotient_timm.train as train_module
    real = train_module._state_dict_for_saving

    def poisoned(model):
        state = real(model)
        state['bn1.running_mean'][0] = float('nan')
        return state

    monkeypatch.setattr(train_module, '_state_dict_for_saving', poisoned)
    out = tmp_path / 'run'
    rc = main(['--model', 'resnet20_cifar', '--dataset', 'cifar10', '--data-dir', str(tiny_cifar10), '--epochs', '1',
               '--batch-size', '64', '--output', str(out), '--no-progress'])
    assert rc == 1
    err = capsys.readouterr().err
    assert 'epoch 1' in err and 'bn1.running_mean' in err and 'lower --lr' in err
    assert not (out / 'best.safetensors').exists() and not (out / 'hf').exists()


def test_existing_file_as_output_exits_2_with_one_line(tiny_cifar10, tmp_path, capsys):
    target = tmp_path / 'taken.txt'
    target.write_text('keep me')
    for output in (target, target / 'sub'):
        assert main(['--dataset', 'cifar10', '--data-dir', str(tiny_cifar10), '--output', str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith('quotient-train: error: --output') and str(target) in err
    assert target.read_text() == 'keep me'
    assert main(['--dataset', 'cifar10', '--data-dir', str(tiny_cifar10), '--lr', 'nan',
                 '--output', str(tmp_path / 'o')]) == 2
    assert '--lr must be a positive number' in capsys.readouterr().err
