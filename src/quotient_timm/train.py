"""Train any timm model (quotient or not) on a small-image dataset with the Quotient Network paper's recipe.

Defaults are the official recipe: SGD lr 0.1, momentum 0.9, weight decay 1e-4 on all parameters,
batch 128, 182 epochs, lr x0.1 at epochs 92 and 136, random crop with 4-pixel zero padding + horizontal
flip, ImageNet mean/std, a seeded 10% validation split (CIFAR: 45k/5k), and the best-validation
checkpoint evaluated on the test set. Every part is a flag.

Writes to --output: metrics.json (config, per-epoch history, test result), metrics.csv (per epoch),
curves.png, best.safetensors (state dict of the best-validation epoch) and hf/ (timm's save_for_hf
layout, loadable with ``timm.create_model('local-dir:<output>/hf', pretrained=True)``).

A non-finite loss stops the run (exit 1) with the epoch and step; non-finite weights are never saved.
Bad arguments or data exit 2.

Example:
    quotient-train --model quotient_resnet56_cifar --dataset cifar10 --data-dir ~/data --output runs/q56
"""
import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import timm

from . import quotient_resnet  # noqa: F401  (registers the quotient models)
from .data import DATASETS, DEFAULT_ROOTS, DatasetNotFoundError, augment_batch, load_dataset, normalize_batch, \
    split_train_val

__all__ = ['TrainingDivergedError', 'build_parser', 'main', 'train']


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became non-finite; nothing non-finite is saved as a result."""


def _model_arg(text: str) -> Tuple[str, Any]:
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'--model-arg needs KEY=VALUE, got {text!r}')
    key, value = text.split('=', 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='quotient-train', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', default='quotient_resnet56_cifar', help='any timm model name (default: %(default)s)')
    g.add_argument('--a', type=float, default=None, help='quotient activation range a > 1 (default: per-depth value)')
    g.add_argument('--width-mult', type=float, default=None, help='CIFAR nets: stage width multiplier (CIFAR-100 in the paper: 2)')
    g.add_argument('--model-arg', type=_model_arg, action='append', default=[], metavar='KEY=VALUE',
                   help='extra keyword for timm.create_model, VALUE parsed as JSON if it can be (repeatable)')
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=DATASETS, default='cifar10')
    g.add_argument('--data-dir', default=None,
                   help='dataset folder (fashion_mnist default: %s)' % DEFAULT_ROOTS['fashion_mnist'])
    g.add_argument('--image-size', type=int, default=32, help='imagefolder only: resize to this square size')
    g.add_argument('--val-fraction', type=float, default=0.1, help='held-out share of the training set (CIFAR: 5k of 50k)')
    g.add_argument('--split-seed', type=int, default=0)
    g.add_argument('--crop-padding', type=int, default=4, help='random-crop zero padding; 0 disables the crop')
    g.add_argument('--no-flip', action='store_true', help='disable random horizontal flips')
    g.add_argument('--limit-train', type=int, default=0, help='use only the first N training images (debugging)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=182)
    g.add_argument('--batch-size', type=int, default=128)
    g.add_argument('--eval-batch-size', type=int, default=1000)
    g.add_argument('--lr', type=float, default=0.1)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=1e-4)
    g.add_argument('--milestones', type=int, nargs='*', default=[92, 136], help='epochs at which lr is multiplied by --lr-gamma')
    g.add_argument('--lr-gamma', type=float, default=0.1)
    g.add_argument('--seed', type=int, default=0)
    g = p.add_argument_group('runtime')
    g.add_argument('--output', required=True, help='folder for metrics, weights and plot')
    g.add_argument('--device', default='auto', help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument('--amp', choices=('auto', 'bf16', 'off'), default='auto', help='auto: bf16 autocast on CUDA only')
    g.add_argument('--channels-last', choices=('auto', 'on', 'off'), default='auto', help='auto: on for CUDA only')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--no-progress', action='store_true', help='no tqdm bars (one line per epoch is still printed)')
    return p


def _resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dev = torch.device(name)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: CUDA is not available here')
    return dev


@torch.no_grad()
def _evaluate(
        model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, batch_size: int, mean, std,
        device: torch.device, amp: bool, channels_last: bool) -> Tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, x_all.shape[0], batch_size):
        x = normalize_batch(x_all[i:i + batch_size].to(device, non_blocking=True), mean, std)
        y = y_all[i:i + batch_size].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss_sum += F.cross_entropy(out.float(), y, reduction='sum').item()
        correct += (out.argmax(1) == y).sum().item()
    n = x_all.shape[0]
    return loss_sum / n, 100.0 * correct / n


def _plot(history: List[Dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    ep = [h['epoch'] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [h['train_loss'] for h in history], label='train')
    if history and history[0].get('val_loss') is not None:
        ax1.plot(ep, [h['val_loss'] for h in history], label='validation')
    ax1.set_xlabel('epoch'), ax1.set_ylabel('cross-entropy'), ax1.legend()
    ax2.plot(ep, [h['train_acc'] for h in history], label='train')
    if history and history[0].get('val_acc') is not None:
        ax2.plot(ep, [h['val_acc'] for h in history], label='validation')
    ax2.set_xlabel('epoch'), ax2.set_ylabel('accuracy (%)'), ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _state_dict_for_saving(model: nn.Module) -> Dict[str, torch.Tensor]:
    # channels_last parameters are not contiguous; safetensors needs contiguous CPU tensors.
    return {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}


def _check_finite_weights(state: Dict[str, torch.Tensor], epoch: int, lr: float) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingDivergedError(
            f'epoch {epoch}: {len(bad)} weight tensor(s) hold non-finite values (first: {bad[0]}); nothing of this '
            f'epoch was saved. Training diverged: try a lower --lr than {lr:g}')


def _prepare_output(path: Path) -> None:
    # Refuse before any data is read: a run that cannot write its results should not start.
    if path.exists() and not path.is_dir():
        raise ValueError(f'--output {path} exists and is not a folder')
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f'--output {path}: cannot create the folder ({e.strerror or e})') from None


def _write_metrics(out_dir: Path, metrics: Dict[str, Any]) -> None:
    # Rewritten after every epoch so an interrupted run still leaves its curves.
    with open(out_dir / 'metrics.json', 'w') as f:
        json.dump(metrics, f, indent=2)
    history = metrics['history']
    with open(out_dir / 'metrics.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(history[0].keys()))
        w.writeheader()
        w.writerows(history)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one training as configured by `args` (see `build_parser`); returns the metrics dict."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    for name in ('epochs', 'batch_size', 'eval_batch_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.crop_padding < 0:
        raise ValueError(f'--crop-padding must be >= 0, got {args.crop_padding}')
    if not timm.is_model(args.model):
        raise ValueError(f'unknown model {args.model!r}; see timm.list_models() (quotient nets: quotient_*)')
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f'--lr must be a positive number, got {args.lr}')
    out_dir = Path(args.output)
    _prepare_output(out_dir)
    device = _resolve_device(args.device)
    on_cuda = device.type == 'cuda'
    amp = args.amp == 'bf16' or (args.amp == 'auto' and on_cuda)
    channels_last = args.channels_last == 'on' or (args.channels_last == 'auto' and on_cuda)
    torch.manual_seed(args.seed)
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels

    data = load_dataset(args.dataset, args.data_dir, image_size=args.image_size)
    data = split_train_val(data, args.val_fraction, args.split_seed)
    if args.limit_train:
        data.train_x, data.train_y = data.train_x[:args.limit_train], data.train_y[:args.limit_train]

    model_kwargs: Dict[str, Any] = dict(args.model_arg)
    if args.a is not None:
        model_kwargs['a'] = args.a
    if args.width_mult is not None:
        model_kwargs['width_mult'] = args.width_mult
    model_kwargs.update(num_classes=data.num_classes, in_chans=data.in_chans)
    try:
        model = timm.create_model(args.model, **model_kwargs)
    except TypeError as e:  # a --model-arg the model's constructor does not take
        raise ValueError(f'--model {args.model} does not accept {sorted(model_kwargs)}: {e}') from e
    cfg = model.pretrained_cfg
    mean, std = list(cfg.get('mean')), list(cfg.get('std'))
    if len(mean) != data.in_chans:
        # e.g. Fashion-MNIST (1 channel) with an RGB config: the channel average, as timm does.
        mean, std = [sum(mean) / len(mean)] * data.in_chans, [sum(std) / len(std)] * data.in_chans
    num_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    fmodel = torch.compile(model) if args.compile else model

    # The paper applies weight decay to all parameters (BN included).
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(args.milestones), gamma=args.lr_gamma)

    best_path = out_dir / 'best.safetensors'
    train_x = data.train_x.to(device)
    train_y = data.train_y.to(device)
    n_train = train_x.shape[0]
    steps = math.ceil(n_train / args.batch_size)
    aug_gen = torch.Generator().manual_seed(args.seed + 1)
    shuffle_gen = torch.Generator().manual_seed(args.seed + 2)

    config = {k: v for k, v in vars(args).items() if k != 'model_arg'}
    config['model_kwargs'] = model_kwargs
    metrics: Dict[str, Any] = dict(
        config=config, num_params=num_params, device=str(device),
        device_name=torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine(),
        torch=torch.__version__, timm=timm.__version__, amp_bf16=amp, channels_last=channels_last,
        n_train=n_train, n_val=0 if data.val_x is None else int(data.val_x.shape[0]), n_test=int(data.test_x.shape[0]),
        history=[])
    history: List[Dict[str, Any]] = metrics['history']
    best_val, best_epoch = -1.0, 0
    t_start = time.perf_counter()

    print(f'{args.model}: {num_params:,} params; {args.dataset} {n_train}/{metrics["n_val"]}/{metrics["n_test"]} '
          f'train/val/test, {data.in_chans}x{data.image_size[0]}x{data.image_size[1]}; device {device}, '
          f'bf16={amp}, channels_last={channels_last}', flush=True)
    for epoch in range(1, args.epochs + 1):
        fmodel.train()
        lr = optimizer.param_groups[0]['lr']
        perm = torch.randperm(n_train, generator=shuffle_gen).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        # First step with a non-finite loss (-1: none), kept on the device so CUDA steps never wait for the host.
        first_bad = torch.full((), -1, device=device, dtype=torch.int64)
        if on_cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=f'epoch {epoch}/{args.epochs}', leave=False, disable=args.no_progress,
                   dynamic_ncols=True)
        for step in bar:
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            x = train_x[idx]
            y = train_y[idx]
            x = augment_batch(x, padding=args.crop_padding, flip=not args.no_flip, generator=aug_gen)
            x = normalize_batch(x, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = fmodel(x)
                loss = F.cross_entropy(out.float(), y)
            first_bad = torch.where(~torch.isfinite(loss.detach()) & (first_bad < 0), step, first_bad)
            if not on_cuda and first_bad >= 0:  # reading it is free on the CPU: stop at the step itself
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (out.detach().argmax(1) == y).sum()
        if on_cuda:
            torch.cuda.synchronize(device)
        if first_bad.item() >= 0:
            bar.close()
            raise TrainingDivergedError(
                f'epoch {epoch}, step {first_bad.item() + 1}/{steps}: the training loss is not finite; stopped, '
                f'nothing of this epoch was saved. Training diverged: try a lower --lr than {lr:g}')
        train_time = time.perf_counter() - t0
        scheduler.step()

        row: Dict[str, Any] = dict(
            epoch=epoch, lr=lr, train_loss=loss_sum.item() / n_train, train_acc=100.0 * correct.item() / n_train,
            train_time_s=train_time, train_images_per_s=n_train / train_time, val_loss=None, val_acc=None)
        if data.val_x is not None:
            row['val_loss'], row['val_acc'] = _evaluate(
                fmodel, data.val_x, data.val_y, args.eval_batch_size, mean, std, device, amp, channels_last)
        # Without a validation split the last epoch is kept.
        score = row['val_acc'] if row['val_acc'] is not None else float(epoch)
        if row['val_loss'] is not None and not math.isfinite(row['val_loss']):
            raise TrainingDivergedError(
                f'epoch {epoch}: the validation loss is {row["val_loss"]}; nothing of this epoch was saved. Training '
                f'diverged: try a lower --lr than {lr:g}')
        if score > best_val:
            state = _state_dict_for_saving(model)
            _check_finite_weights(state, epoch, lr)
            best_val, best_epoch = score, epoch
            save_file(state, str(best_path))
        history.append(row)
        _write_metrics(out_dir, metrics)
        val_txt = f' val {row["val_loss"]:.4f} / {row["val_acc"]:.2f}%' if row['val_acc'] is not None else ''
        print(f'epoch {epoch:3d} lr {lr:.4g} train {row["train_loss"]:.4f} / {row["train_acc"]:.2f}%{val_txt} '
              f'{row["train_images_per_s"]:.0f} img/s', flush=True)

    model.load_state_dict(load_file(str(best_path)))
    test_loss, test_acc = _evaluate(
        fmodel, data.test_x, data.test_y, args.eval_batch_size, mean, std, device, amp, channels_last)
    # Throughput excludes epoch 1 (warm-up: allocator, cuDNN autotuning, compilation) when there are more.
    timed = history[1:] if len(history) > 1 else history
    metrics.update(
        best_epoch=best_epoch, best_val_acc=history[best_epoch - 1]['val_acc'], test_loss=test_loss, test_acc=test_acc,
        train_images_per_s=sum(h['train_images_per_s'] for h in timed) / len(timed),
        total_time_s=time.perf_counter() - t_start)

    _write_metrics(out_dir, metrics)
    _plot(history, out_dir / 'curves.png', f'{args.model} on {args.dataset}')

    # timm's own layout too: config.json (with model args) + weights, for create_model('local-dir:...').
    from timm.models import save_for_hf
    cpu_model = timm.create_model(args.model, **model_kwargs)
    cpu_model.load_state_dict(load_file(str(best_path)))
    data_cfg = dict(input_size=(data.in_chans, *data.image_size), mean=mean, std=std, crop_pct=1.0)
    cpu_model.pretrained_cfg = dict(cpu_model.pretrained_cfg, num_classes=data.num_classes, **data_cfg)
    save_for_hf(cpu_model, str(out_dir / 'hf'), model_args=model_kwargs, safe_serialization=True)

    print(f'best validation {metrics["best_val_acc"]}% at epoch {best_epoch}; test {test_acc:.2f}% '
          f'(loss {test_loss:.4f}); weights: {best_path}', flush=True)
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit 0 on success, 2 on bad arguments or data, 1 when training diverged (non-finite loss or weights)."""
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (DatasetNotFoundError, ValueError, ImportError) as e:
        print(f'quotient-train: error: {e}', file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f'quotient-train: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
