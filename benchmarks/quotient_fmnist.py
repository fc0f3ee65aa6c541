"""Reproduced comparison: quotient nets vs ResNet baselines on Fashion-MNIST, several depths and seeds.

Launches one `quotient-train` process per (depth, model, seed), all at once (they share one GPU; each is
small), waits, then writes a summary table (mean ± sample std of test accuracy over seeds, best epoch,
training images/s). The schedule is the paper's recipe shortened: --epochs with the lr drops at the
same fractions of training as 92/136 of 182 unless --milestones is given.

    python benchmarks/quotient_fmnist.py --data-dir /usr/share/datasets/fashion-mnist --out runs/fmnist \
        --epochs 15 --depths 20 56 --seeds 0 1

--summarize-only re-reads an existing --out folder.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _runs(args):
    for depth in args.depths:
        for kind in ('quotient', 'resnet'):
            for seed in args.seeds:
                name = f'{"quotient_" if kind == "quotient" else ""}resnet{depth}_cifar'
                yield depth, kind, seed, name, Path(args.out) / f'{kind}{depth}_seed{seed}'


def launch(args) -> int:
    milestones = args.milestones or [round(args.epochs * 92 / 182), round(args.epochs * 136 / 182)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / 'src') + os.pathsep + os.environ.get('PYTHONPATH', ''),
               OMP_NUM_THREADS=str(args.threads_per_run), PYTHONUNBUFFERED='1')
    procs = []
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for depth, kind, seed, name, out in _runs(args):
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, '-m', 'quotient_timm.train', '--model', name, '--dataset', 'fashion_mnist',
               '--epochs', str(args.epochs), '--milestones', *map(str, milestones), '--seed', str(seed),
               '--split-seed', '0', '--output', str(out), '--no-progress', *args.extra]
        if args.data_dir:
            cmd += ['--data-dir', args.data_dir]
        log = open(out / 'train.log', 'w')
        print(' '.join(cmd), flush=True)
        procs.append((out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    t0 = time.time()
    failed = 0
    for out, p, log in procs:
        rc = p.wait()
        log.close()
        if rc:
            failed += 1
            print(f'FAILED ({rc}): {out}; tail of its log:\n' + ''.join(open(out / 'train.log').readlines()[-15:]))
    print(f'all {len(procs)} runs finished in {time.time() - t0:.0f} s wall', flush=True)
    return failed


def summarize(args) -> str:
    rows, raw = [], []
    for depth in args.depths:
        for kind in ('quotient', 'resnet'):
            ms = []
            for d, k, seed, name, out in _runs(args):
                f = out / 'metrics.json'
                if d == depth and k == kind and f.is_file():
                    m = json.load(open(f))
                    if 'test_acc' in m:
                        ms.append(m)
                        raw.append(dict(model=name, seed=seed, test_acc=m['test_acc'], best_val_acc=m['best_val_acc'],
                                        best_epoch=m['best_epoch'], epochs=len(m['history']),
                                        train_images_per_s=m['train_images_per_s'], total_time_s=m['total_time_s']))
            if not ms:
                continue
            accs = [m['test_acc'] for m in ms]
            std = statistics.stdev(accs) if len(accs) > 1 else float('nan')
            rows.append(dict(depth=depth, model=ms[0]['config']['model'], n=len(ms), acc=statistics.mean(accs), std=std,
                             epochs=len(ms[0]['history']), best_epochs=[m['best_epoch'] for m in ms],
                             ips=statistics.mean(m['train_images_per_s'] for m in ms),
                             params=ms[0]['num_params'], device=ms[0]['device_name']))
    lines = ['| depth | model | params | seeds | test acc % (mean ± std) | epochs | best-val epochs | train img/s per run |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["depth"]} | {r["model"]} | {r["params"]:,} | {r["n"]} | {r["acc"]:.2f} ± {r["std"]:.2f} | '
                     f'{r["epochs"]} | {", ".join(map(str, r["best_epochs"]))} | {r["ips"]:.0f} |')
    table = '\n'.join(lines)
    with open(Path(args.out) / 'summary.json', 'w') as f:
        json.dump(dict(rows=rows, runs=raw), f, indent=2)
    with open(Path(args.out) / 'summary.md', 'w') as f:
        f.write(table + '\n')
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', default=None, help='Fashion-MNIST folder (default: the trainer\'s default)')
    p.add_argument('--out', default='runs/fmnist')
    p.add_argument('--epochs', type=int, default=15)
    p.add_argument('--milestones', type=int, nargs='*', default=None)
    p.add_argument('--depths', type=int, nargs='+', default=[20, 56])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--threads-per-run', type=int, default=2)
    p.add_argument('--summarize-only', action='store_true')
    p.add_argument('extra', nargs='*', help='extra quotient-train flags, after --')
    args = p.parse_args(argv)
    failed = 0 if args.summarize_only else launch(args)
    print(summarize(args))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
