"""One rank of a tensor-parallel test launch on CPU (gloo): load a checkpoint with `tp_plan="auto"`, run a forward, and
save rank 0's logits, the final hidden states they came from, and the head's full and local weights.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python tp_worker.py MODEL OUT.pt
"""

import sys

import torch
from transformers import AutoModelForCausalLM

import step3_hf  # noqa: F401

INPUT_IDS = [[1, 17, 33, 90, 4, 5, 6], [1, 200, 8, 9, 10, 77, 3]]
# Older transformers refuse to shard a gathered output unevenly; the worker says so with this exit code.
UNEVEN_SHARDS_REFUSED = 3


def main(model_path: str, out: str) -> None:
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, tp_plan="auto", attn_implementation="sdpa").eval()
    except ValueError as err:
        if "must be divisible by the tensor parallel size" in str(err):
            print(err, file=sys.stderr)
            sys.exit(UNEVEN_SHARDS_REFUSED)
        raise
    weight = model.lm_head.weight
    with torch.no_grad():
        outputs = model(torch.tensor(INPUT_IDS), output_hidden_states=True)
        full_weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight.detach().clone()
    local_rows = weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0]
    if torch.distributed.get_rank() == 0:
        torch.save(
            {
                "logits": outputs.logits,
                "hidden": outputs.hidden_states[-1],
                "head_weight": full_weight,
                "local_rows": local_rows,
            },
            out,
        )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
