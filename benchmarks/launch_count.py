"""How many kernels one decode step launches, per module, counted on CPU (no GPU needed).

A decode step at small batch is bound by the host issuing launches (issue 21), so their number is the quantity to
cut. This script runs one decode step of a tiny Step-3 (the test widths, 1 dense + MoE layers) through the decode
kernels under Triton's interpreter, and counts what would be launches on a GPU:

- each Triton kernel launch (the package's kernels), and
- each "leaf" aten op that computes (an aten op calling no other aten op, less those that launch nothing on a GPU:
  views, reshapes, allocations), outside the Triton launches. This is close to the CUDA kernel count but not equal
  (`sort` or `index_put` take a few kernels on CUDA, a copy between dtypes one).

Each launch is attributed to the innermost module whose forward runs it; the table groups modules by their path with
the layer index dropped, so a row holds all layers of that kind.

    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/launch_count.py [--batch 4] [--unfused-align] [--json PATH]

`--unfused-align` also counts a step with the MoE alignment in torch ops (the path before issue 21), side by side.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from collections import Counter

# Triton reads TRITON_INTERPRET when it is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton.runtime.interpreter as triton_interpreter  # noqa: E402
from torch.autograd.profiler import record_function  # noqa: E402

from step3_hf import Step3Config, Step3ForCausalLM  # noqa: E402
from step3_hf.kernels import MFA_DECODE_ATTENTION, MOE_DECODE_EXPERTS, interpreter_enabled  # noqa: E402
from step3_hf.tiny_checkpoint import TINY_CONFIG  # noqa: E402

# aten ops that launch nothing on a GPU: views, metadata and allocations.
NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "_reshape_alias", "as_strided", "t", "transpose", "expand", "expand_as", "permute", "select", "slice",
    "unsqueeze", "squeeze", "detach", "alias", "lift_fresh", "resolve_conj", "resolve_neg", "split",
    "split_with_sizes", "chunk", "unbind", "narrow", "view_as", "unflatten", "flatten", "contiguous", "to",
    "set_", "resize_", "result_type", "promote_types", "is_nonzero", "size", "stride", "numel", "dim",
}  # fmt: skip
MODULE = "module::"
TRITON = "triton::"


def count_triton_launches() -> None:
    """Each interpreted Triton launch as one profiler range, named after its kernel."""
    run = triton_interpreter.InterpretedFunction.run

    def recorded_run(self, *args, **kwargs):
        with record_function(TRITON + self.fn.__name__):
            return run(self, *args, **kwargs)

    triton_interpreter.InterpretedFunction.run = recorded_run


def record_module_ranges(model: torch.nn.Module) -> None:
    """A profiler range around each module's forward, named after its path with layer indices dropped."""
    for name, module in model.named_modules():
        label = MODULE + (re.sub(r"\.\d+(?=\.|$)", ".*", name) or "(model)")

        def enter(module, args, label=label):
            module._launch_count_range = record_function(label)
            module._launch_count_range.__enter__()

        def leave(module, args, output):
            module._launch_count_range.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def launches(events) -> Counter:
    """(module, launch name) -> count over the profiled events."""
    memo = {}

    def is_launch(event) -> bool:
        # A Triton launch, or a computing aten op that calls no launch (its callees are counted instead).
        if event.name.startswith(TRITON):
            return True
        computes = event.name.startswith("aten::") and event.name[len("aten::") :] not in NO_KERNEL
        return computes and not any(launches_within(child) for child in event.cpu_children)

    def launches_within(event) -> bool:
        if id(event) not in memo:
            memo[id(event)] = is_launch(event) or any(launches_within(child) for child in event.cpu_children)
        return memo[id(event)]

    counts = Counter()
    for event in events:
        if not is_launch(event):
            continue
        module, parent, inside_triton = "(outside modules)", event.cpu_parent, False
        while parent is not None:
            inside_triton |= parent.name.startswith(TRITON)  # the interpreter's own tensor copies
            if parent.name.startswith(MODULE) and module == "(outside modules)":
                module = parent.name[len(MODULE) :]
            parent = parent.cpu_parent
        if not inside_triton:
            counts[module, event.name] += 1
    return counts


def print_counts(counts: Counter, title: str, num_moe: int, by_op: bool) -> None:
    per_module = Counter()
    for (module, _), n in counts.items():
        per_module[module] += n
    print(title)
    print(f"{'launches':>9}  module (all layers of that kind)")
    for module in sorted(per_module):
        print(f"{per_module[module]:9d}  {module}")
        if by_op:
            for (owner, name), n in sorted(counts.items()):
                if owner == module:
                    print(f"{'':9}    {n:4d}  {name}")
    total = sum(per_module.values())
    triton = sum(n for (_, name), n in counts.items() if name.startswith(TRITON))
    moe = sum(n for module, n in per_module.items() if ".mlp" in module and module.endswith(("gate", "experts")))
    print(f"{total:9d}  in all ({triton} Triton launches)")
    print(f"{moe / num_moe:9.1f}  per MoE layer in its router and routed experts\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences decoded together (default 4)")
    parser.add_argument("--prompt", type=int, default=5, help="prompt tokens before the counted step (default 5)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="(default bfloat16)")
    parser.add_argument("--unfused-align", action="store_true",
                        help="also count a step with the MoE alignment in torch ops, side by side")  # fmt: skip
    parser.add_argument("--by-op", action="store_true", help="also list each module's launches by name")
    parser.add_argument("--json", help="also write {alignment: {module: {launch: count}}} to this file")
    args = parser.parse_args(argv)
    if not interpreter_enabled():
        parser.error("Triton was imported before TRITON_INTERPRET=1 took effect; set it in the environment")

    torch.manual_seed(0)
    config = Step3Config(**TINY_CONFIG)
    config._attn_implementation = MFA_DECODE_ATTENTION
    config._experts_implementation = MOE_DECODE_EXPERTS
    model = Step3ForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    ids = torch.randint(1, config.vocab_size, (args.batch, args.prompt))
    moe_decode = importlib.import_module("step3_hf.kernels.moe_decode")
    alignments = {"one-launch alignment": moe_decode.MAX_FUSED_ALIGN_PAIRS}
    if args.unfused_align:
        alignments["torch alignment"] = 0  # no call takes the one-launch alignment
    with torch.no_grad():
        prefill = model(input_ids=ids, use_cache=True)
        next_ids = prefill.logits[:, -1:].argmax(-1)
        cache = prefill.past_key_values if hasattr(prefill, "past_key_values") else prefill.cache
        count_triton_launches()
        record_module_ranges(model)
        tables = {}
        for alignment, max_fused_pairs in alignments.items():  # one decode step each, one token further
            moe_decode.MAX_FUSED_ALIGN_PAIRS = max_fused_pairs
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            counts = launches(profile.events())
            num_moe = len(config.moe_layer_indices)
            title = (f"one decode step, {args.dtype}, batch {args.batch}, {config.num_hidden_layers} layers "
                     f"({num_moe} MoE), {alignment}")  # fmt: skip
            print_counts(counts, title, num_moe, args.by_op)
            tables[alignment] = {}
            for (module, name), n in sorted(counts.items()):
                tables[alignment].setdefault(module, {})[name] = n
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
