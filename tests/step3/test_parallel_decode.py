"""benchmarks/parallel_decode.py under torchrun on CPU (gloo, 2 ranks, tiny widths): every layout is checked against
one process before it is timed, and a layout with wrong logits is reported, never timed."""

import inspect
import json
import os
import subprocess
import sys

from afd_launch import REPO, free_port
from transformers import DistributedConfig

# transformers < 5.21 has no `ep_size` and no `ep_dispatch_experts` style, which the model's EP plan uses.
HAS_EP_DISPATCH = "ep_size" in inspect.signature(DistributedConfig).parameters


def test_two_ranks_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "benchmarks/parallel_decode.py", "--tiny", "--device", "cpu",
           "--batches", "4", "--steps", "3", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Step-3 decode over 2 x cpu" in proc.stdout
    result = json.loads(out.read_text())
    assert result["setup"]["world"] == 2
    rows = {r["layout"]: r for r in result["rows"]}
    assert set(rows) == {"device_map", "tp", "ep", "dp_ep"}
    assert rows["device_map"]["status"] == "ok (reference)" and rows["device_map"]["tokens_per_s"] > 0
    # Expert parallelism matches one process and splits the 6 experts 3 + 3.
    ep = rows["ep"]
    if HAS_EP_DISPATCH:
        assert ep["status"] == "ok" and ep["rel_err"] <= 1e-4 and ep["tokens_per_s"] > 0
        assert ep["experts_per_rank"] == 3
    else:  # reported as a failed layout, not a crash of the benchmark
        assert ep["status"].startswith("failed") and "ep_dispatch_experts" in ep["status"]
    # Attention data parallelism: each rank decodes half of the batch, with 3 of the 6 experts.
    dp_ep = rows["dp_ep"]
    if HAS_EP_DISPATCH:
        assert dp_ep["status"] == "ok" and dp_ep["rel_err"] <= 1e-4 and dp_ep["tokens_per_s"] > 0
        assert dp_ep["experts_per_rank"] == 3
    else:
        assert dp_ep["status"].startswith("failed") and "ep_size" in dp_ep["status"]
    # Tensor parallelism is timed only when its logits match one process.
    tp = rows["tp"]
    assert "rel_err" in tp
    if tp["rel_err"] > 1e-4:
        assert tp["status"].startswith("wrong logits") and "tokens_per_s" not in tp
    else:
        assert tp["status"] == "ok" and tp["tokens_per_s"] > 0
