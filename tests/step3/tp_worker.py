"""One rank of a tensor-, expert- or data-parallel test launch on CPU (gloo): load a checkpoint under one layout, run
it, and save what the ranks saw (everything saved is whole: DTensors are gathered with `full_tensor()`).

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python tp_worker.py MODEL OUT.pt [LAYOUT[,...]] [FP8_MODEL]

Several layouts run in turn in the same processes (one start-up); rank 0 saves {layout: result}. LAYOUT (N =
WORLD_SIZE ranks):
- `tp`: `tp_plan="auto"` over N ranks (the default).
- `ep`: experts split by expert over N ranks, the rest whole (`tp_size=N, ep_size=N, tp_plan={}`).
- `tp_ep`: both on the same N ranks (`tp_size=N, ep_size=N, tp_plan="auto"`).
- `tp2_ep`: separate TP and EP groups: TP groups of 2 ranks, each fed its own sequences (FSDP over the groups),
  experts over all N ranks (`tp_size=2, fsdp_size=N/2, ep_size=N`).
- `dp_ep`: attention data parallelism: each rank computes whole attention for its own sequences, experts split over
  the N ranks, tokens exchanged all-to-all (`fsdp_size=N, ep_size=N`); the dense weights are FSDP-sharded at load
  and kept whole once the first forward has gathered them (`step3_hf.parallel.attention_data_parallel_config`).
- `tp_odd_heads`: `tp_plan="auto"` on a model of 3 query heads (the checkpoint's config overridden, its weights
  then of the wrong shapes): what `from_pretrained` raises (it must refuse before a weight loads).
- `fp8_tp`, `fp8_ep`: `tp` and `ep` on the block-FP8 checkpoint FP8_MODEL, loaded in float32 (on CPU transformers
  dequantizes the float8 weights as it loads them).
- `fp8_tp_split_tiles`: `tp_plan="auto"` on FP8_MODEL with `share_expert_dim` overridden to 3 tiles, which 2 ranks
  would split inside a tile: what `from_pretrained` raises.
- `tp_train`, `tp_ep_train`, `dp_ep_train`: one training step (loss and gradients) under `tp`, `tp_ep`, or FSDP
  with EP (`fsdp_size=N, ep_size=N`, each rank on its own rows, the experts' tokens exchanged all-to-all).
- `fsdp_train`: `TRAIN_STEPS` SGD-with-momentum steps under FSDP2 (`fsdp_size=N`), each rank on its own rows of
  the batch: the mean loss of every step and the whole parameters after the last.

Inference layouts run the rows of `INPUT_IDS` that their data-parallel group owns (group g of G takes rows
g::G); rank 0 gathers every group's logits, hidden states and tokens back into batch order. With several groups,
each then also decodes row g alone with its own prompt length and number of new tokens (`ragged_tokens`), so that
the groups' forwards differ in length and count.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DistributedConfig

import step3_hf  # noqa: F401
from step3_hf.parallel import attention_data_parallel_config

INPUT_IDS = [[1, 17, 33, 90, 4, 5, 6], [1, 200, 8, 9, 10, 77, 3]]
NEW_TOKENS = 4
TRAIN_STEPS = 2
LEARNING_RATE = 0.1
# SGD with momentum, whose update is linear in the gradient: AdamW's first step divides each gradient element by its
# own size, so an element whose gradient is at float-noise level (1e-8) moves by an amount the noise sets (an AdamW
# run matched every loss but one q_proj element by 2e-6, 3e-4 relative).
MOMENTUM = 0.9
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
# What a layout that this transformers cannot express saves instead of a result (the launch goes on with the next).
UNEVEN_SHARDS_REFUSED = "this transformers refuses a vocabulary that the TP size does not divide (5.17 does)"
EP_UNSUPPORTED = "this transformers' DistributedConfig has no ep_size / ep_dispatch_experts (5.17): EP needs >= 5.21"
HAS_EP = "ep_size" in inspect.signature(DistributedConfig).parameters
EP_LAYOUTS = ("ep", "tp_ep", "tp2_ep", "dp_ep", "tp_ep_train", "dp_ep_train", "fp8_ep")
# Whole parameters that inference layouts save: split by heads, by rows, column-wise (a shared expert), by expert.
WEIGHT_NAMES = (
    "model.layers.0.self_attn.wq.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.1.mlp.shared_expert.up_proj.weight",
    "model.layers.1.mlp.shared_expert.down_proj.weight",
    "model.layers.1.mlp.experts.gate_up_proj",
)
# What `fp8_tp_split_tiles` overrides in the FP8 checkpoint's config: 3 tiles of 16 rows, 24 rows per rank of 2.
SPLIT_TILES = {"share_expert_dim": 48}


def distributed_config(layout: str, world: int) -> DistributedConfig:
    layout = layout.removeprefix("fp8_")
    if layout in ("tp", "tp_train"):
        return DistributedConfig(tp_plan="auto")
    if layout == "fsdp_train":
        return DistributedConfig(fsdp_size=world)
    if layout == "ep":
        return DistributedConfig(tp_size=world, ep_size=world, tp_plan={})
    if layout in ("tp_ep", "tp_ep_train"):
        return DistributedConfig(tp_size=world, ep_size=world, tp_plan="auto")
    if layout == "tp2_ep":
        return DistributedConfig(tp_size=2, fsdp_size=world // 2, ep_size=world, tp_plan="auto")
    if layout == "dp_ep":
        return attention_data_parallel_config(world)
    if layout == "dp_ep_train":
        return DistributedConfig(fsdp_size=world, ep_size=world)
    raise SystemExit(f"tp_worker.py: error: unknown layout {layout!r}")


def ragged_prompt_length(group: int) -> int:
    return len(INPUT_IDS[0]) - 3 * group


def ragged_new_tokens(group: int) -> int:
    return NEW_TOKENS + 2 * group


def ragged_generate(model, group: int) -> torch.Tensor:
    """Row `group` of `INPUT_IDS` alone, cut to `ragged_prompt_length(group)` tokens, decoded greedily for
    `ragged_new_tokens(group)` tokens: what data-parallel group `group` decodes apart from the others."""
    prompt = torch.tensor(INPUT_IDS)[group : group + 1, : ragged_prompt_length(group)]
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=ragged_new_tokens(group), do_sample=False)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def local_rows(tensor: torch.Tensor) -> int:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).shape[0]


def load(model_path: str, layout: str):
    """The model under `layout`, or the reason this transformers cannot express it. FP8 layouts load in float32."""
    if layout in EP_LAYOUTS and not HAS_EP:
        return EP_UNSUPPORTED
    config = distributed_config(layout, int(os.environ["WORLD_SIZE"]))
    dtype = {"dtype": torch.float32} if layout.startswith("fp8_") else {}  # FP8 loads in bf16 by default
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_path, attn_implementation="sdpa", distributed_config=config, **dtype
        )
    except ValueError as err:
        if "must be divisible by the tensor parallel size" in str(err):
            return UNEVEN_SHARDS_REFUSED
        raise


def refused(model_path: str, **overrides) -> dict:
    try:
        AutoModelForCausalLM.from_pretrained(
            model_path, **overrides, attn_implementation="sdpa", distributed_config=DistributedConfig(tp_plan="auto"),
        )
    except Exception as err:  # noqa: BLE001  the error is the result
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def data_group(model) -> tuple[int, int]:
    """(this rank's data-parallel group, the number of groups): the ranks of a TP group share one batch."""
    config = model.config.distributed_config
    groups = getattr(config, "dp_size", config.fsdp_size)
    return torch.distributed.get_rank() // config.tp_size, groups


def gather_rows(local: torch.Tensor, group: int, groups: int) -> torch.Tensor:
    """Every group's rows (group g holds rows g::groups) back in batch order, on every rank."""
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, (group, local))
    by_group = {g: part for g, part in parts}
    out = torch.empty((sum(by_group[g].shape[0] for g in range(groups)), *local.shape[1:]), dtype=local.dtype)
    for g in range(groups):
        out[g::groups] = by_group[g]
    return out


def rank_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the ranks (a copy; `value` is left as it is)."""
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()


def train_step(model) -> dict:
    """One backward on this rank's rows: the mean loss over the ranks (each a mean over as many label tokens) and
    the whole gradients."""
    group, groups = data_group(model)
    input_ids = torch.tensor(INPUT_IDS)[group::groups]
    model.train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    params = dict(model.named_parameters())
    return {
        "loss": rank_mean(loss),
        "grads": {name: whole(params[name].grad) for name in GRAD_NAMES},
    }


def sgd_losses(model, input_ids: torch.Tensor) -> torch.Tensor:
    """`TRAIN_STEPS` steps of SGD with momentum on `input_ids` (the same fine-tuning under FSDP2 here and in one
    process in the test): the loss of each step, `[TRAIN_STEPS]`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def train_fsdp(model) -> dict:
    """Each rank's rows, the same number of label tokens per rank: FSDP's gradient mean over the ranks is then
    the gradient of the mean loss over the whole batch."""
    group, groups = data_group(model)
    input_ids = torch.tensor(INPUT_IDS)[group::groups]
    model.train()
    own_losses = sgd_losses(model, input_ids)
    first = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(first, own_losses[0])
    params = {name: whole(param) for name, param in model.named_parameters()}
    sharded = model.model.layers[0].self_attn.wq.weight
    return {
        "losses": rank_mean(own_losses),
        "first_rank_losses": torch.stack(first),  # each rank's first loss, on its own rows
        "params": params,
        "wq_local_rows": local_rows(sharded),
    }


def infer(model) -> dict:
    group, groups = data_group(model)
    input_ids = torch.tensor(INPUT_IDS)[group::groups]
    model.eval()
    attention = model.model.layers[0].self_attn
    wq_rows_before = local_rows(attention.wq.weight)
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True)
        tokens = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    experts = model.model.layers[1].mlp.experts.gate_up_proj
    params = dict(model.named_parameters())
    extra = {}
    if groups > 1:  # data-parallel groups decode independently: another prompt length and more steps per group
        ragged = ragged_generate(model, group)
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (group, ragged))
        extra["ragged_tokens"] = [dict(parts)[g] for g in range(groups)]
    return {
        **extra,
        "logits": gather_rows(outputs.logits, group, groups),
        "hidden": gather_rows(outputs.hidden_states[-1], group, groups),
        "tokens": gather_rows(tokens, group, groups),
        "head_weight": whole(model.lm_head.weight),
        "weights": {name: whole(params[name]) for name in WEIGHT_NAMES},
        "local_rows": local_rows(model.lm_head.weight),
        "local_experts": local_rows(experts),
        "wq_local_rows": (wq_rows_before, local_rows(attention.wq.weight)),  # before and after the first forward
        "groups": groups,
    }


def main(model_path: str, out: str, layouts: str = "tp", fp8_model_path: str | None = None) -> None:
    """Run each of the comma-separated `layouts` in turn (one launch, one process start-up) and save
    {layout: result} on rank 0. `fp8_*` layouts load `fp8_model_path`."""
    results = {}
    for layout in layouts.split(","):
        path = fp8_model_path if layout.startswith("fp8_") else model_path
        if layout in ("tp_odd_heads", "fp8_tp_split_tiles"):
            results[layout] = refused(path, **({"num_attention_heads": 3} if layout == "tp_odd_heads" else SPLIT_TILES))
            torch.distributed.barrier()
            continue
        model = load(path, layout)
        if isinstance(model, str):
            results[layout] = {"unsupported": model}
        else:
            run = train_fsdp if layout == "fsdp_train" else train_step if layout.endswith("_train") else infer
            results[layout] = run(model)
        del model
        torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_layouts(
    model_path: Path, out_dir: Path, layouts: list[str], world: int = 2, fp8_model_path: Path | None = None
) -> dict[str, dict]:
    """{layout: what rank 0 saved} of one `world`-rank CPU (gloo) launch of this worker running `layouts` in turn
    (`fp8_*` layouts on the block-FP8 checkpoint `fp8_model_path`)."""
    from afd_launch import PYTHON, REPO, finish, launch

    out = out_dir / f"{'-'.join(layouts)}-{world}.pt"
    argv = [PYTHON, __file__, str(model_path), str(out), ",".join(layouts)]
    argv += [str(fp8_model_path)] if fp8_model_path is not None else []
    with launch(lambda rank: argv, world, extra_env={"PYTHONPATH": str(REPO / "src")}) as procs:
        results = finish(procs, timeout=300)
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
    return torch.load(out)


def layout_result(results: dict[str, dict], layout: str) -> dict:
    """`results[layout]`; skips (pytest) where this transformers could not express the layout."""
    import pytest

    if "unsupported" in results[layout]:
        pytest.skip(results[layout]["unsupported"])
    return results[layout]


if __name__ == "__main__":
    main(*sys.argv[1:])
