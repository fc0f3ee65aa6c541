"""Training throughput of quotient nets vs their ResNet baselines of the same depth.

One training step = forward, cross-entropy, backward and an SGD step (momentum, weight decay) on a random
batch, as in quotient-train (bf16 autocast + channels_last on CUDA unless turned off). For each input
shape and depth, the quotient net and the baseline are timed in alternation (repeats x steps each) and
the medians are compared: ratio = quotient time per step / baseline time per step (1.15 = 15% slower).

    python benchmarks/quotient_throughput.py --device cpu --depths 20 56 --json out.json

Prints a table last; --json writes all the repeats.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'src'))
import timm  # noqa: E402
import quotient_timm  # noqa: E402,F401


def _shape(text: str):
    try:
        c, h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'shape must look like 3x32x32, got {text!r}')
    return c, h, w


def _make_step(model, opt, x, y, amp: bool, device_type: str):
    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _time(step, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` consecutive steps."""
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--depths', type=int, nargs='+', default=[20, 56])
    p.add_argument('--shapes', type=_shape, nargs='+', default=[(1, 28, 28), (3, 32, 32)],
                   help='input C x H x W (default: Fashion-MNIST 1x28x28 and CIFAR 3x32x32)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--steps', type=int, default=20, help='steps per timed repeat')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--amp', choices=('auto', 'bf16', 'off'), default='auto')
    p.add_argument('--channels-last', choices=('auto', 'on', 'off'), default='auto')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    amp = args.amp == 'bf16' or (args.amp == 'auto' and cuda)
    cl = args.channels_last == 'on' or (args.channels_last == 'auto' and cuda)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    machine = torch.cuda.get_device_name(device) if cuda else f'{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'
    torch.manual_seed(0)

    results = []
    for shape in args.shapes:
        for depth in args.depths:
            names = (f'resnet{depth}_cifar', f'quotient_resnet{depth}_cifar')
            steps = {}
            for name in names:
                model = timm.create_model(name, in_chans=shape[0], num_classes=10).to(device)
                if cl:
                    model = model.to(memory_format=torch.channels_last)
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
                x = torch.randn(args.batch_size, *shape, device=device)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = torch.randint(0, 10, (args.batch_size,), device=device)
                steps[name] = _make_step(model, opt, x, y, amp, device.type)
                _time(steps[name], args.warmup, device)
            per_step = {n: [] for n in names}
            for _ in range(args.repeats):  # alternate so clock/thermal drift hits both alike
                for n in names:
                    per_step[n].append(_time(steps[n], args.steps, device))
            base, quot = (statistics.median(per_step[n]) for n in names)
            spread = {n: (max(v) - min(v)) / statistics.median(v) for n, v in per_step.items()}
            row = dict(
                shape='x'.join(map(str, shape)), depth=depth, batch_size=args.batch_size,
                baseline_images_per_s=args.batch_size / base, quotient_images_per_s=args.batch_size / quot,
                time_ratio=quot / base, baseline_spread=spread[names[0]], quotient_spread=spread[names[1]],
                per_step_s=per_step)
            results.append(row)
            print(f'{row["shape"]} depth {depth}: resnet {row["baseline_images_per_s"]:.0f} img/s, quotient '
                  f'{row["quotient_images_per_s"]:.0f} img/s, time ratio {row["time_ratio"]:.3f}', flush=True)

    meta = dict(device=str(device), machine=machine, torch=torch.__version__, timm=timm.__version__,
                bf16_autocast=amp, channels_last=cl, steps=args.steps, repeats=args.repeats,
                date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), hostname_cpus=os.cpu_count())
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)
    print(f'\n{machine}; torch {torch.__version__}; bf16={amp} channels_last={cl}; batch {args.batch_size}; '
          f'median of {args.repeats} x {args.steps} steps')
    print('| input | depth | ResNet img/s | quotient img/s | quotient/ResNet time per step | spread (R/Q) |')
    print('|---|---|---|---|---|---|')
    for r in results:
        print(f'| {r["shape"]} | {r["depth"]} | {r["baseline_images_per_s"]:.0f} | {r["quotient_images_per_s"]:.0f} | '
              f'{r["time_ratio"]:.3f} | {100 * r["baseline_spread"]:.1f}% / {100 * r["quotient_spread"]:.1f}% |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
