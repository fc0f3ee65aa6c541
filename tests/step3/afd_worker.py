"""One rank of an AFD test launch, through the Python API: several checks per launch (process start-up
dominates the tests' time). Attention ranks generate their share of PROMPTS under each scenario and run a
teacher-forced forward on given sequences; every rank saves what it computed and what it read to OUT/rank<r>.pt.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python afd_worker.py MODEL OUT A F [teacher.pt]

`AFD_WORKER_SCENARIOS` (comma-separated names; empty for none) limits the generate scenarios run.
"""

import os
import sys
from pathlib import Path

import torch

from step3_hf.afd import AFDSettings, Role, WireFormat, start

PROMPTS = [[1, 17, 33, 90, 4, 5, 6], [1, 200], [1, 8, 9, 10, 77], [1, 5, 6, 7], [1, 99, 3]]
PAD = 0
NEW_TOKENS = 10
# (name, wire, micro-batches, sampling)
SCENARIOS = [
    ("raw_mb1", "raw", 1, False),
    ("raw_mb2", "raw", 2, False),
    ("raw_mb3", "raw", 3, False),
    ("fp8_mb3", "fp8", 3, False),
    ("sample_mb3", "raw", 3, True),
]
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20)
SEED = 1234


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def share(placement, rank, rows):
    start, stop = placement.sequence_range(placement.index_in_role(rank), len(rows))
    return start, rows[start:stop]


def main() -> None:
    model_path, out, attention_ranks, ffn_ranks = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    teacher = torch.load(sys.argv[5]) if len(sys.argv) > 5 else None
    settings = AFDSettings(model=model_path, attention_ranks=attention_ranks, ffn_ranks=ffn_ranks, timeout_s=20)
    saved = {}
    with start(settings) as rank:
        if rank.role is Role.ATTENTION:
            model = rank.attention_model()
            first, prompts = share(rank.placement, rank.rank, PROMPTS)
            ids, mask = left_pad(prompts)
            chosen = os.environ.get("AFD_WORKER_SCENARIOS")
            chosen = None if chosen is None else set(filter(None, chosen.split(",")))
            for name, wire, micro_batches, sample in SCENARIOS:
                if chosen is not None and name not in chosen:
                    continue
                model.micro_batches, model.wire = micro_batches, WireFormat(wire)
                torch.manual_seed(SEED)
                with torch.no_grad():
                    out_ids = model.generate(
                        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD, eos_token_id=None,
                        **(SAMPLING if sample else {"do_sample": False}),
                    )
                saved[name] = {"first": first, "tokens": out_ids[:, ids.shape[1]:]}
            if teacher is not None:  # one forward over fixed sequences, for logits comparisons
                start_row, stop_row = rank.placement.sequence_range(
                    rank.placement.index_in_role(rank.rank), teacher["input_ids"].shape[0]
                )
                rows = slice(start_row, stop_row)
                for wire in ("raw", "fp8"):
                    model.micro_batches, model.wire = 3, WireFormat(wire)
                    with torch.no_grad():
                        logits = model(teacher["input_ids"][rows], attention_mask=teacher["attention_mask"][rows]).logits
                    saved[f"teacher_{wire}"] = {"first": start_row, "logits": logits}
            saved["parameters"] = sum(p.numel() for p in model.parameters())
        else:
            rank.serve()
            saved["parameters"] = sum(p.numel() for p in rank.ffn_shard().parameters())
        saved["names_read"] = rank.reader.names_read
        saved["elements_read"] = rank.reader.elements_read
        saved["report"] = rank.report()
        torch.save(saved, out / f"rank{rank.rank}.pt")


if __name__ == "__main__":
    main()
