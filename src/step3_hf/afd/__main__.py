"""`torchrun --nproc-per-node A+F -m step3_hf.afd --model PATH --attention-ranks A --ffn-ranks F --prompts P.jsonl`

Attention ranks split the prompts between them (each serves its own share), run `generate()` on the
disaggregated model and send their completions to rank 0, which prints them in prompt order (one JSON line
each) followed by the timing of each side. Each line of the prompts file is `{"input_ids": [...]}` or
`{"prompt": "text"}` (the latter needs a tokenizer in the model directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import StoppingCriteria, StoppingCriteriaList

from .exchange import PeerLostError
from .placement import Role
from .session import AFDRank, AFDSettings, start
from .wire import WireFormat


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m step3_hf.afd", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local official-layout Step-3 checkpoint directory")
    parser.add_argument("--attention-ranks", type=int, required=True)
    parser.add_argument("--ffn-ranks", type=int, required=True)
    parser.add_argument("--prompts", required=True, help="JSON lines with input_ids or prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=3)
    parser.add_argument("--wire", choices=[w.value for w in WireFormat], default=WireFormat.FP8.value,
                        help="attention->FFN activations: fp8 (e4m3, per-token scales) or raw (the model dtype)")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a silent peer counts as lost")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument("--attn-implementation", default=None,
                        help="attention backend on attention ranks (default: Step-3's choice, mfa_decode on CUDA, else sdpa)")
    parser.add_argument("--cache-implementation", choices=["dynamic", "static"], default="dynamic",
                        help="attention ranks' KV cache: dynamic (grown per step) or static (preallocated, written in place)")
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the completions here (JSON lines) instead of stdout")
    parser.add_argument("--progress", action="store_true", help="print each decoding step to stderr")
    return parser.parse_args(argv)


def read_prompts(path: str, model_path: str) -> list[list[int]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    tokenizer = None
    prompts = []
    for number, row in enumerate(rows, 1):
        if "input_ids" in row:
            prompts.append([int(t) for t in row["input_ids"]])
        elif "prompt" in row:
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model_path)
            prompts.append(tokenizer(row["prompt"])["input_ids"])
        else:
            raise ValueError(f"{path}:{number}: each line needs `input_ids` or `prompt`, got keys {sorted(row)}")
    return prompts


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


class _Progress(StoppingCriteria):
    """Never stops anything: reports each decoding step (used to watch a run, e.g. in the fault tests)."""

    def __init__(self, name: str):
        self.name, self.step = name, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.step += 1
        print(f"[afd {self.name}] step {self.step}", file=sys.stderr, flush=True)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_share(rank: AFDRank, args: argparse.Namespace) -> list[dict]:
    model = rank.attention_model()
    prompts = read_prompts(args.prompts, args.model)
    start_row, stop_row = rank.placement.sequence_range(rank.placement.index_in_role(rank.rank), len(prompts))
    share = prompts[start_row:stop_row]
    if not share:
        return []
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids, mask = left_pad(share, pad)
    torch.manual_seed(args.seed + rank.rank)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if args.do_sample else {}
    stopping = StoppingCriteriaList([_Progress(rank.name)] if args.progress else [])
    with torch.no_grad():
        out = model.generate(
            ids.to(rank.device), attention_mask=mask.to(rank.device), max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample, pad_token_id=pad, stopping_criteria=stopping, **sampling,
            cache_implementation=None if args.cache_implementation == "dynamic" else args.cache_implementation,
        )
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    completions = []
    for offset, row in enumerate(out[:, ids.shape[1]:].tolist()):
        ends = [i for i, t in enumerate(row) if t in eos]
        tokens = row[: ends[0] + 1] if ends else row
        completions.append({"index": start_row + offset, "completion_ids": tokens, "finished_by_eos": bool(ends)})
    return completions


def timing_table(report: list[dict]) -> str:
    """Each rank's mean step (attention: one forward, prefill excluded; FFN: one round of messages) and the
    share of its run it was busy computing."""
    ranks = [r for r in report if "rank" in r]
    lines = [
        "AFD timing per rank (ms per step; busy = compute time / elapsed time of the run)",
        f"{'rank':<22}{'steps':>7}{'step ms':>10}{'attention':>11}{'wait FFN':>10}{'FFN':>9}{'busy':>7}",
    ]
    for r in ranks:
        busy = r["busy_s"] / r["elapsed_s"] if r.get("elapsed_s") else 0.0
        lines.append(
            f"{r['name']:<22}{r['steps']:>7}{r.get('wall_ms', 0.0):>10.2f}{r.get('attention_ms', 0.0):>11.2f}"
            f"{r.get('wait_ms', 0.0):>10.2f}{r.get('ffn_ms', 0.0):>9.2f}{busy:>7.0%}"
        )
    for r in ranks:
        if "bytes_to_ffn_per_token_layer" in r:
            lines.append(
                f"{r['name']}: wire bytes per token per layer (mean over layers, all FFN ranks): "
                f"{r['bytes_to_ffn_per_token_layer']:.0f} to FFN, {r['bytes_from_ffn_per_token_layer']:.0f} back"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = AFDSettings(
        model=args.model, attention_ranks=args.attention_ranks, ffn_ranks=args.ffn_ranks,
        micro_batches=args.micro_batches, wire=args.wire, dtype=args.dtype, timeout_s=args.timeout,
        startup_timeout_s=args.startup_timeout, backend=args.backend, attn_implementation=args.attn_implementation,
    )
    with start(settings) as rank:
        if rank.role is Role.ATTENTION:
            completions = generate_share(rank, args)
            rank.close()
        else:
            rank.serve()
            completions = []
        everyone = [None] * rank.placement.world_size if rank.rank == 0 else None
        dist.gather_object(completions, everyone, dst=0)
        report = rank.report()
        if rank.rank == 0:
            merged = sorted((c for part in everyone for c in part), key=lambda c: c["index"])
            text = "\n".join(json.dumps(c) for c in merged) + "\n"
            if args.output:
                Path(args.output).write_text(text)
            else:
                sys.stdout.write(text)
            print(timing_table(report), flush=True)
    return 0


# How long a failing rank waits for its process group to be destroyed before it leaves anyway.
TEARDOWN_TIMEOUT_S = 5.0


def tear_down_process_group(timeout_s: float = TEARDOWN_TIMEOUT_S) -> str:
    """Destroy the default process group, waiting at most `timeout_s`: with a lost peer the destruction can block on
    it, so it runs in a daemon thread that the process does not wait for past the timeout. Returns what happened."""
    import threading

    import torch.distributed as dist

    if not dist.is_initialized():
        return "no process group to tear down"
    destroyed = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        destroyed.set()

    threading.Thread(target=destroy, name="teardown", daemon=True).start()
    if destroyed.wait(timeout_s):
        return "process group torn down"
    return f"process group not torn down within {timeout_s:g} s (a peer is gone); leaving without it"


if __name__ == "__main__":
    try:
        code = main()
    except (PeerLostError, ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"step3_hf.afd: error: {err}", file=sys.stderr, flush=True)
        print(f"step3_hf.afd: {tear_down_process_group()}", file=sys.stderr, flush=True)
        os._exit(1)  # a lost peer can leave the process group's threads blocked: no further teardown
    sys.exit(code)
