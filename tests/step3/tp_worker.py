"""One rank of a tensor- or expert-parallel test launch on CPU (gloo): load a checkpoint under one layout, run it, and
save what rank 0 saw (everything it saves is whole: DTensors are gathered with `full_tensor()`).

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python tp_worker.py MODEL OUT.pt [LAYOUT]

LAYOUT: `tp` (`tp_plan="auto"`, the default), `ep` (experts split by expert, the rest whole), `tp_ep` (both), or
`tp_train` (one training step under `tp_plan="auto"`: loss and gradients).
"""

import inspect
import sys

import torch
from transformers import AutoModelForCausalLM, DistributedConfig

import step3_hf  # noqa: F401

INPUT_IDS = [[1, 17, 33, 90, 4, 5, 6], [1, 200, 8, 9, 10, 77, 3]]
NEW_TOKENS = 4
# Parameters whose gradients the training layout saves: split by heads, by rows, column-wise, by vocabulary, whole.
GRAD_NAMES = (
    "model.layers.0.self_attn.wq.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.mlp.shared_expert.gate_proj.weight",
    "model.layers.1.mlp.experts.gate_up_proj",
    "model.embed_tokens.weight",
    "lm_head.weight",
)
# Older transformers refuse to shard a gathered output unevenly; the worker says so with this exit code.
UNEVEN_SHARDS_REFUSED = 3
# transformers without `ep_size` (and the `ep_dispatch_experts` style of the model's EP plan) cannot run EP.
EP_UNSUPPORTED = 4
HAS_EP = "ep_size" in inspect.signature(DistributedConfig).parameters


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def load(model_path: str, layout: str):
    kwargs = {"attn_implementation": "sdpa"}
    if layout in ("tp", "tp_train"):
        kwargs["tp_plan"] = "auto"
    elif not HAS_EP:
        print("this transformers' DistributedConfig has no ep_size", file=sys.stderr)
        sys.exit(EP_UNSUPPORTED)
    elif layout == "ep":
        kwargs["distributed_config"] = DistributedConfig(tp_size=2, ep_size=2, tp_plan={})
    elif layout == "tp_ep":
        kwargs["distributed_config"] = DistributedConfig(tp_size=2, ep_size=2, tp_plan="auto")
    else:
        raise SystemExit(f"tp_worker.py: error: unknown layout {layout!r}")
    try:
        return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except ValueError as err:
        if "must be divisible by the tensor parallel size" in str(err):
            print(err, file=sys.stderr)
            sys.exit(UNEVEN_SHARDS_REFUSED)
        raise


def run(model, layout: str) -> dict:
    input_ids = torch.tensor(INPUT_IDS)
    if layout == "tp_train":
        model.train()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        params = dict(model.named_parameters())
        return {"loss": loss.detach(), "grads": {name: whole(params[name].grad) for name in GRAD_NAMES}}
    model.eval()
    weight = model.lm_head.weight
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True)
        tokens = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return {
        "logits": outputs.logits,
        "hidden": outputs.hidden_states[-1],
        "tokens": tokens,
        "head_weight": whole(weight),
        "local_rows": weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0],
    }


def main(model_path: str, out: str, layout: str = "tp") -> None:
    result = run(load(model_path, layout), layout)
    if torch.distributed.get_rank() == 0:
        torch.save(result, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
