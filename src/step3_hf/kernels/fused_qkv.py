"""An MFA layer's three projections of the same hidden states, `q_proj` (into the low-rank query), `k_proj` and
`v_proj`, as one GEMM over their weights stacked, for models that are only run.

At decode each projection is a few rows against weights read once, and a GEMM of a few rows costs more than its
bytes: on the AFD attention side of the released widths (43-row micro-batches, H100), `q_proj` took 15.7 µs and
`k_proj` and `v_proj` 7 µs each, 29.7 µs for 36.7 MB that the copy bandwidth reads in 12 (docs/afd.md). One GEMM
reads the same bytes in one launch.

`fuse_qkv_projections(model)` stacks each attention layer's three weights into one `qkv_proj` linear of the same
kind (`nn.Linear` or `DecodeLinear`, or `Step3FP8Linear` with its block scales) and makes the three projections'
weights views of it: no memory is added, and the parameters and their names stay the checkpoint's (the stacked linear
is not registered as a submodule). `use_fused_qkv(Step3Attention)`, which `step3_hf` runs at import, makes the
attention's `project` run that one GEMM where a layer has a `qkv_proj` and no gradient is
needed, and the three projections everywhere else. The stacked weight shares its storage with the three views, so a
fused model is for inference, on the device it was fused on (moving it would move the views apart from the stacked
weight): the AFD attention side fuses its layers when it is built, in place.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .decode_linear import DecodeLinear
from .fp8_linear import Step3FP8Linear
from .triton_support import install_dispatch

__all__ = ["fuse_qkv_projections", "unfuse_qkv_projections", "use_fused_qkv"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _stack_linear(linears: list[nn.Linear]) -> nn.Linear:
    stacked = type(linears[0])(linears[0].in_features, sum(p.out_features for p in linears), bias=False, device="meta")
    stacked.weight = nn.Parameter(torch.cat([p.weight.detach() for p in linears]), requires_grad=False)
    return stacked


def _stack_fp8(linears: list[Step3FP8Linear]) -> Step3FP8Linear | None:
    block_rows = linears[0].block_size[0]
    if any(p.out_features % block_rows for p in linears[:-1]):
        return None  # a projection ending inside a scale tile: the scales could not be stacked
    with torch.device("meta"):
        stacked = Step3FP8Linear(linears[0].in_features, sum(p.out_features for p in linears),
                                 block_size=tuple(linears[0].block_size))  # fmt: skip
    stacked.weight = nn.Parameter(torch.cat([p.weight.detach() for p in linears]), requires_grad=False)
    stacked.weight_scale_inv = nn.Parameter(torch.cat([p.weight_scale_inv.detach() for p in linears]),
                                            requires_grad=False)  # fmt: skip
    return stacked


def _stack(linears: list[nn.Module]) -> nn.Module | None:
    """One linear computing the concatenated outputs of `linears` (same input), or None where they cannot stack."""
    kinds = {type(p) for p in linears}
    weights = [p.weight for p in linears]
    if len(kinds) != 1 or any(getattr(p, "bias", None) is not None for p in linears) or (
        len({(w.dtype, w.device, w.shape[1:]) for w in weights}) != 1 or weights[0].device.type == "meta"
    ):
        return None
    kind = kinds.pop()
    if kind in (nn.Linear, DecodeLinear):
        return _stack_linear(linears)
    if kind is Step3FP8Linear and len({tuple(p.block_size) for p in linears}) == 1 and (
        len({p.activation_scheme for p in linears}) == 1
    ):
        return _stack_fp8(linears)
    return None


def _share_storage(stacked: nn.Module, linears: list[nn.Module]) -> None:
    """Make each linear's weight (and scales) a view of its rows of `stacked`'s."""
    names = ["weight"] + (["weight_scale_inv"] if isinstance(stacked, Step3FP8Linear) else [])
    for name in names:
        whole, start = getattr(stacked, name), 0
        for linear in linears:
            part = getattr(linear, name)
            setattr(linear, name, nn.Parameter(whole[start : start + part.shape[0]], requires_grad=False))
            start += part.shape[0]


@torch.no_grad()
def fuse_qkv_projections(model: nn.Module) -> int:
    """Give every attention layer of `model` (a module with `q_proj`, `k_proj`, `v_proj` and `project`) a `qkv_proj`
    over their stacked weights, whose views the three become; returns how many layers were fused. Layers whose three
    projections differ in kind, dtype or device, or have biases, stay as they are. Inference only (module
    docstring)."""
    fused = 0
    for module in model.modules():
        if not all(isinstance(getattr(module, name, None), nn.Module) for name in PROJECTIONS) or hasattr(
            module, "qkv_proj"
        ):
            continue
        linears = [getattr(module, name) for name in PROJECTIONS]
        stacked = _stack(linears)
        if stacked is None:
            continue
        _share_storage(stacked, linears)
        # Not registered as a submodule: its weights are the three projections' parameters (views of them), which
        # `parameters()` counts once and `state_dict()` names as the checkpoint does.
        module.__dict__["qkv_proj"] = stacked
        module.qkv_sizes = [linear.out_features for linear in linears]
        fused += 1
    return fused


def unfuse_qkv_projections(model: nn.Module) -> int:
    """Undo `fuse_qkv_projections`: the three projections run again (their weights stay views of the stacked one's
    storage); returns how many layers were unfused."""
    unfused = 0
    for module in model.modules():
        if module.__dict__.pop("qkv_proj", None) is not None:
            del module.qkv_sizes
            unfused += 1
    return unfused


def use_fused_qkv(attention_class: type[nn.Module], module) -> None:
    """Make `attention_class.project` (the MFA projections before the cache; `module` is the modeling module whose
    `apply_rotary_pos_emb` it calls) run one stacked GEMM where `fuse_qkv_projections` gave the layer a `qkv_proj`
    and no gradient is needed (idempotent)."""

    def make(eager_project):
        @functools.wraps(eager_project)
        def project(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
            stacked = getattr(self, "qkv_proj", None)
            if stacked is None or torch.is_grad_enabled():
                return eager_project(self, hidden_states, position_embeddings)
            hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
            low_rank, key_states, value_states = stacked(hidden_states).split(self.qkv_sizes, dim=-1)
            query_states = self.wq(self.inter_norm(low_rank)).view(hidden_shape).transpose(1, 2)
            key_states = key_states.view(hidden_shape).transpose(1, 2)
            value_states = value_states.view(hidden_shape).transpose(1, 2)
            cos, sin = position_embeddings
            query_states, key_states = module.apply_rotary_pos_emb(query_states, key_states, cos, sin)
            return query_states, key_states, value_states

        return project

    install_dispatch(attention_class, "project", "_eager_project", make, "MFA projections.",
                     "one stacked GEMM for q_proj, k_proj and v_proj where `fuse_qkv_projections` ran")  # fmt: skip
