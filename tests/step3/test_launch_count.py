"""benchmarks/launch_count.py on CPU (Triton's interpreter): one decode step of the tiny Step-3 launches four
kernels per MoE layer for its routed experts and one for its router's top-k, and the counter sees the torch ops
inside the custom ops (the torch alignment's, when it is asked for)."""

import json
import os
import subprocess
import sys

from afd_launch import REPO


def launch_counts(tmp_path, *flags):
    out = tmp_path / "counts.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/launch_count.py", "--json", str(out), *flags], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per MoE layer in its router and routed experts" in proc.stdout
    return json.loads(out.read_text())


def test_moe_layers_launch_four_expert_kernels_and_one_top_k(tmp_path):
    both = launch_counts(tmp_path, "--unfused-align")  # one process: the default step, then the torch alignment's
    counts = both["one-launch alignment"]
    moe_layers = 2  # the tiny config's
    kernels = ("_align_pairs", "_gate_up_swiglu", "_down_weighted", "_sum_choices")
    assert counts["model.layers.*.mlp.experts"] == {f"triton::{kernel}": moe_layers for kernel in kernels}
    router = counts["model.layers.*.mlp.gate"]
    assert router["triton::_top_k_experts"] == moe_layers and "aten::topk" not in router
    unfused = both["torch alignment"]["model.layers.*.mlp.experts"]
    assert "triton::_align_pairs" not in unfused and unfused["aten::cumsum"] == 2 * moe_layers
    assert sum(unfused.values()) > 3 * moe_layers + 10 * moe_layers
