"""Kernel times of AFD's in-process benchmark, grouped by input shape: where the attention phase's time goes.

Runs `afd_decode.py --connector inprocess` at batch 128 (three 43-token micro-batches), the static cache with
`mfa_decode` and no CUDA graphs (so that torch.profiler sees each kernel), 6 layers, 3 steps after 1 warm-up, under
`torch.profiler.profile(record_shapes=True)`, and prints the 70 largest rows of GPU time (op or kernel, input shapes).

    cd benchmarks && PYTHONPATH=$PWD/../src:$PWD python3 profile_afd_inprocess.py
"""

import tempfile

from torch.profiler import ProfilerActivity, profile

import afd_decode

ARGS = ["--connector", "inprocess", "--batches", "128", "--variants", "static+mfa_decode", "--steps", "3",
        "--warmup", "1", "--layers", "6"]  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            afd_decode.main([*ARGS, "--out", out])
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    print("self device us total | calls | us per call | name | input shapes")
    for e in rows[:70]:
        per_call = e.self_device_time_total / max(e.count, 1)
        shapes = str(e.input_shapes)[:150]
        print(f"{e.self_device_time_total:12.0f} | {e.count:6d} | {per_call:9.1f} | {e.key[:60]} | {shapes}")


if __name__ == "__main__":
    main()
