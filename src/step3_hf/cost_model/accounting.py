"""Per-decoded-token work of a model, read from its config (Step-3 report, section 4.1).

A config can be a preset name, a path to a ``config.json`` (or its folder), a plain dict, or any
config object with attributes (e.g. a transformers ``PretrainedConfig``); nothing here imports
transformers or torch.

Counting conventions (they reproduce the report's Tables 2 and 3):

* a matmul costs 2 FLOPs per weight; embedding, LM head, norms and the MoE router are ignored;
* attention core per context token per layer: ``query_heads * 2 * (d_qk + d_v)`` FLOPs, where the
  absorbed MLA form attends over the ``kv_lora_rank + qk_rope_head_dim`` latent for both products;
* KV bytes per context token per layer: MFA ``2 * groups * head_dim``, GQA/MHA
  ``2 * kv_heads * head_dim``, MLA ``kv_lora_rank + qk_rope_head_dim`` (times the KV element size);
* MLA linear FLOPs use the absorbed weights (q down/up, kv down, W_UK, W_UV, o);
* FFN FLOPs are the activated weights: dense SwiGLU layers, top-k routed plus shared experts.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Mapping

__all__ = [
    "AttentionSpec",
    "FFNSpec",
    "ModelSpec",
    "PerToken",
    "Quantization",
    "UnsupportedConfigError",
    "PRESETS",
    "MAX_CONTEXT",
    "check_context",
    "load_config",
    "model_spec",
    "per_token",
]

PRESETS = ("step3", "deepseek-v3", "kimi-k2", "qwen3-235b-a22b", "qwen3-32b")
# Longest context the model accepts (2^40 tokens): far beyond any real model, small enough for exact floats.
MAX_CONTEXT = 2**40


class UnsupportedConfigError(ValueError):
    """The config does not describe an architecture the cost model can count."""


@dataclass(frozen=True)
class Quantization:
    """Storage sizes in bytes. The report assumes 8-bit weights and KV for every model."""

    weight_bytes: float = 1.0
    kv_bytes: float = 1.0

    def __post_init__(self) -> None:
        # 1 to 32 bits per element; anything else is a typo that would print nonsense (or negative) costs.
        for key in ("weight_bytes", "kv_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 / 8 <= value <= 4:
                raise ValueError(f"`{key}` must be between 1/8 and 4 bytes (1 to 32 bits), got {value!r}")

    @property
    def eight_bit(self) -> bool:
        # 8-bit (or smaller) weights let a card with FP8 units use its FP8 peak (report, Table 5).
        return self.weight_bytes <= 1.0


@dataclass(frozen=True)
class AttentionSpec:
    family: str  # "MFA", "MLA" or "GQA" (MHA is GQA with kv_heads == query_heads)
    query_heads: int
    kv_elements_per_layer: int  # cached values per context token per layer
    core_flops_per_layer: int  # attention-core FLOPs per context token per layer
    linear_params_per_layer: int  # projection weights around attention (absorbed for MLA; as many as stored)
    norm_params_per_layer: int = 0  # norms inside attention (MFA inter_norm, MLA q/kv latent norms)
    replicated_params_per_layer: int = 0  # projections tensor parallelism cannot split (see `_attention`)
    kv_heads: int = 0  # cached K/V heads (MFA groups, GQA KV heads); 0: one latent that is never split (MLA)


@dataclass(frozen=True)
class FFNSpec:
    dense_layers: int
    moe_layers: int
    dense_params: int  # weights of one dense FFN layer
    moe_active_params: int  # weights one token uses in a MoE layer (top-k + shared experts)
    moe_total_params: int  # all expert weights of a MoE layer (routed + shared)
    experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    shared_params: int = 0  # always-on shared-expert weights of a MoE layer (part of moe_total_params)
    router_params: int = 0  # router weights of a MoE layer (not in the FLOP counts)

    @property
    def sparsity(self) -> float | None:
        """Activated / total expert weights of a MoE layer (report section 5.3, shared expert included)."""
        return self.moe_active_params / self.moe_total_params if self.moe_layers else None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    attention: AttentionSpec
    ffn: FFNSpec
    vocab_size: int | None = None  # None: the config has none; embedding and LM head are then not counted
    tie_word_embeddings: bool = False

    @property
    def max_ffn_layer_active_params(self) -> int:
        return max(self.ffn.dense_params if self.ffn.dense_layers else 0,
                   self.ffn.moe_active_params if self.ffn.moe_layers else 0)

    @property
    def max_ffn_layer_params(self) -> int:
        return max(self.ffn.dense_params if self.ffn.dense_layers else 0,
                   self.ffn.moe_total_params if self.ffn.moe_layers else 0)


@dataclass(frozen=True)
class PerToken:
    """Work of one decoded token at a given context length, summed over all layers."""

    model: str
    context: int
    kv_bytes: float  # KV cache bytes read
    attention_flops: float  # attention core, no linear layers
    linear_flops: float  # projections before and after attention
    ffn_flops: float  # activated FFN
    activated_params: int  # attention projections + activated FFN weights
    arithmetic_intensity: float  # attention-core FLOPs per KV byte

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- config access


def load_config(source: Any) -> tuple[str, Any]:
    """(name, config) from a preset name, a config.json path or folder, a dict or a config object."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text in PRESETS:
            ref = resources.files("step3_hf.cost_model.presets").joinpath(f"{text}.json")
            return text, json.loads(ref.read_text())
        path = os.path.join(text, "config.json") if os.path.isdir(text) else text
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file or folder"
            )
        with open(path) as fh:
            try:
                raw = json.load(fh)
            except ValueError as err:  # JSON syntax or encoding
                raise ValueError(f"{path} is not a JSON config: {err}") from None
        return os.path.basename(os.path.dirname(os.path.abspath(path))) or path, raw
    return str(_get(source, "model_type") or type(source).__name__), source


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _need(cfg: Any, keys: tuple[str, ...], what: str, model_type: str) -> dict[str, Any]:
    values = {k: _get(cfg, k) for k in keys}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise UnsupportedConfigError(
            f"{what} config (model_type {model_type!r}) is missing {', '.join(missing)}"
        )
    return values


def _sizes(cfg: Any, keys: tuple[str, ...], model_type: str, *, zero_ok: bool = False) -> dict[str, Any]:
    """The fields ``keys`` (None where absent), each present one checked to be a positive (or, with
    ``zero_ok``, non-negative) integer: a negative head count would print negative FLOPs."""
    values = {k: _get(cfg, k) for k in keys}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = values[key] = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
            bound = "a non-negative" if zero_ok else "a positive"
            raise ValueError(f"config (model_type {model_type!r}): `{key}` must be {bound} integer, got {value!r}")
    return values


def _text_config(cfg: Any) -> Any:
    # Multimodal wrappers (step3_vl and most VLMs) keep the language model under text_config.
    inner = _get(cfg, "text_config")
    return inner if inner is not None else cfg


def _layer_indices(value: Any, key: str, layers: int, model_type: str) -> list[int]:
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        indices = [int(v) for v in items if str(v).strip()]
    except (TypeError, ValueError):
        indices = None
    if indices is None or not all(0 <= i < layers for i in indices):
        raise ValueError(
            f"config (model_type {model_type!r}): `{key}` must be layer indices from 0 to {layers - 1}, got {value!r}"
        )
    return indices


# ----------------------------------------------------------------------------- attention families

_MFA_KEYS = ("num_attention_heads", "num_attention_groups", "head_dim", "share_q_dim")
_MLA_KEYS = ("num_attention_heads", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
             "qk_nope_head_dim", "v_head_dim")
_NON_FULL_MARKERS = ("attn_type_list", "attention_chunk_size", "linear_attn_config", "state_size",
                     "ssm_cfg", "mamba_d_state", "full_attn_idxs")


def _attention(cfg: Any, model_type: str, hidden: int) -> AttentionSpec:
    if _get(cfg, "share_q_dim") is not None or _get(cfg, "num_attention_groups") is not None:
        _need(cfg, _MFA_KEYS, "MFA (Step-3 style)", model_type)
        v = _sizes(cfg, _MFA_KEYS, model_type)
        n, g, d, q = v["num_attention_heads"], v["num_attention_groups"], v["head_dim"], v["share_q_dim"]
        # q_proj (H->q), inter-norm, wq (q->n*d); one K and one V head per group; o_proj.
        linear = hidden * q + 2 * hidden * g * d + q * n * d + n * d * hidden
        # inter_norm normalises the whole low-rank query, so q_proj stays whole under tensor parallelism.
        return AttentionSpec("MFA", n, 2 * g * d, n * 2 * (d + d), linear, norm_params_per_layer=q,
                             replicated_params_per_layer=hidden * q, kv_heads=g)

    if _get(cfg, "kv_lora_rank") is not None:
        _need(cfg, _MLA_KEYS, "MLA (DeepSeek-V3 style)", model_type)
        v = {**_sizes(cfg, ("num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"), model_type),
             **_sizes(cfg, ("q_lora_rank", "qk_nope_head_dim"), model_type, zero_ok=True)}
        n, c, r = v["num_attention_heads"], v["kv_lora_rank"], v["qk_rope_head_dim"]
        nope, dv, ql = v["qk_nope_head_dim"], v["v_head_dim"], v["q_lora_rank"]
        latent = c + r
        if ql:
            q_params = hidden * ql + ql * n * (nope + r)
        else:
            q_params = hidden * n * (nope + r)
        # Absorbed form: W_UK folds into the query, W_UV into the output; both are n*d*c matmuls.
        linear = q_params + hidden * latent + n * nope * c + n * dv * c + n * dv * hidden
        # The down-projections feed latent norms over their whole width: they stay whole under TP.
        return AttentionSpec("MLA", n, latent, n * 2 * (latent + latent), linear, norm_params_per_layer=(ql or 0) + c,
                             replicated_params_per_layer=hidden * (ql or 0) + hidden * latent)

    layer_types = _get(cfg, "layer_types")
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise UnsupportedConfigError(
                f"model_type {model_type!r} has {', '.join(other)} layers; the cost model only counts "
                "full attention (MFA, MLA, GQA/MHA) and has no KV/state formula for them"
            )
    markers = [k for k in _NON_FULL_MARKERS if _get(cfg, k) is not None]
    if markers:
        raise UnsupportedConfigError(
            f"model_type {model_type!r} looks like a hybrid/linear/chunked-attention model ({', '.join(markers)}); "
            "the cost model only counts full attention (MFA, MLA, GQA/MHA)"
        )
    sizes = _sizes(cfg, ("num_attention_heads", "num_key_value_heads", "head_dim"), model_type)
    n = sizes["num_attention_heads"]
    if n is None:
        raise UnsupportedConfigError(
            f"cannot tell the attention family of model_type {model_type!r}: it has none of the MFA fields "
            f"({', '.join(_MFA_KEYS[1:])}), the MLA field kv_lora_rank, or the GQA/MHA field "
            "num_attention_heads; missing: num_attention_heads"
        )
    kv = sizes["num_key_value_heads"] or n  # MHA when absent
    d = sizes["head_dim"] or hidden // n
    if d < 1:
        raise ValueError(f"config (model_type {model_type!r}): hidden_size {hidden} is smaller than "
                         f"num_attention_heads {n} and no head_dim is given")
    linear = hidden * n * d + 2 * hidden * kv * d + n * d * hidden
    return AttentionSpec("GQA" if kv < n else "MHA", n, 2 * kv * d, n * 2 * (d + d), linear, kv_heads=kv)


# ----------------------------------------------------------------------------- FFN / MoE layouts


def _ffn(cfg: Any, model_type: str, hidden: int, layers: int) -> FFNSpec:
    sizes = _sizes(cfg, ("intermediate_size", "moe_num_experts", "moe_top_k", "moe_intermediate_size",
                         "n_routed_experts", "num_experts_per_tok", "moe_layer_freq", "decoder_sparse_step"),
                   model_type)
    sizes.update(_sizes(cfg, ("share_expert_dim", "first_k_dense_replace", "n_shared_experts", "num_experts",
                              "num_local_experts", "shared_expert_intermediate_size"), model_type, zero_ok=True))
    dense_width = sizes["intermediate_size"]

    if sizes["moe_num_experts"] is not None or _get(cfg, "moe_layers_enum") is not None:  # Step-3
        v = _need(cfg, ("moe_layers_enum", "moe_num_experts", "moe_top_k", "moe_intermediate_size",
                        "intermediate_size"), "Step-3 MoE", model_type)
        moe = set(_layer_indices(v["moe_layers_enum"], "moe_layers_enum", layers, model_type))
        experts, k, width = sizes["moe_num_experts"], sizes["moe_top_k"], sizes["moe_intermediate_size"]
        shared_width = sizes["share_expert_dim"] or 0
        shared = 1 if shared_width else 0
    elif sizes["n_routed_experts"] is not None:  # DeepSeek-V3 / Kimi K2
        _need(cfg, ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "intermediate_size"), "DeepSeek MoE", model_type)
        first_dense = sizes["first_k_dense_replace"] or 0
        freq = sizes["moe_layer_freq"] or 1
        moe = {i for i in range(layers) if i >= first_dense and i % freq == 0}
        experts, k, width = sizes["n_routed_experts"], sizes["num_experts_per_tok"], sizes["moe_intermediate_size"]
        shared = sizes["n_shared_experts"] or 0
        shared_width = shared * width
    elif (sizes["num_experts"] or sizes["num_local_experts"] or 0) > 0:  # Qwen-MoE, Mixtral
        experts = sizes["num_experts"] or sizes["num_local_experts"]
        _need(cfg, ("num_experts_per_tok",), "MoE", model_type)
        k = sizes["num_experts_per_tok"]
        width = sizes["moe_intermediate_size"] or dense_width
        if width is None:
            raise UnsupportedConfigError(f"MoE config (model_type {model_type!r}) is missing moe_intermediate_size")
        step = sizes["decoder_sparse_step"] or 1
        dense_only = set(_layer_indices(_get(cfg, "mlp_only_layers") or [], "mlp_only_layers", layers, model_type))
        moe = {i for i in range(layers) if i not in dense_only and (i + 1) % step == 0}
        shared_width = sizes["shared_expert_intermediate_size"] or 0
        shared = 1 if shared_width else 0
    else:  # dense model
        if dense_width is None:
            raise UnsupportedConfigError(f"dense FFN config (model_type {model_type!r}) is missing intermediate_size")
        return FFNSpec(layers, 0, 3 * hidden * dense_width, 0, 0)

    if k > experts:
        raise ValueError(f"config (model_type {model_type!r}): {k} experts per token but only {experts} experts")
    n_dense = layers - len(moe)
    if n_dense and dense_width is None:
        raise UnsupportedConfigError(
            f"model_type {model_type!r} has {n_dense} dense FFN layers but no intermediate_size"
        )
    per_expert = 3 * hidden * width  # SwiGLU: gate, up, down
    return FFNSpec(
        dense_layers=n_dense,
        moe_layers=len(moe),
        dense_params=3 * hidden * dense_width if n_dense else 0,
        moe_active_params=k * per_expert + 3 * hidden * shared_width,
        moe_total_params=experts * per_expert + 3 * hidden * shared_width,
        experts=experts,
        top_k=k,
        shared_experts=shared,
        shared_params=3 * hidden * shared_width,
        router_params=experts * hidden,
    )


def model_spec(source: Any, name: str | None = None) -> ModelSpec:
    """Parse a preset name, config.json path, dict or config object into a :class:`ModelSpec`."""
    if isinstance(source, ModelSpec):
        return source
    label, raw = load_config(source)
    cfg = _text_config(raw)
    model_type = str(_get(cfg, "model_type") or _get(raw, "model_type") or "unknown")
    _need(cfg, ("hidden_size", "num_hidden_layers"), "model", model_type)
    v = _sizes(cfg, ("hidden_size", "num_hidden_layers"), model_type)
    hidden, layers = v["hidden_size"], v["num_hidden_layers"]
    vocab = _sizes(cfg, ("vocab_size",), model_type)["vocab_size"]
    return ModelSpec(
        name=name or label,
        model_type=model_type,
        hidden_size=hidden,
        num_layers=layers,
        attention=_attention(cfg, model_type, hidden),
        ffn=_ffn(cfg, model_type, hidden, layers),
        vocab_size=vocab,
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings") or _get(raw, "tie_word_embeddings")),
    )


def check_context(context: Any) -> None:
    """A context is a whole number of tokens from 1 to :data:`MAX_CONTEXT`; else ``ValueError``."""
    if isinstance(context, bool) or not isinstance(context, numbers.Integral) or not 1 <= context <= MAX_CONTEXT:
        raise ValueError(f"context must be at least 1 token and at most 2**40 tokens, got {context!r}")


def per_token(model: Any, context: int, quant: Quantization = Quantization()) -> PerToken:
    """Per-decoded-token figures at ``context`` tokens of context (report Tables 2 and 3)."""
    check_context(context)
    spec = model_spec(model)
    a, f, L = spec.attention, spec.ffn, spec.num_layers
    kv = L * context * a.kv_elements_per_layer * quant.kv_bytes
    core = float(L * context * a.core_flops_per_layer)
    ffn_params = f.dense_layers * f.dense_params + f.moe_layers * f.moe_active_params
    return PerToken(
        model=spec.name,
        context=context,
        kv_bytes=float(kv),
        attention_flops=core,
        linear_flops=2.0 * L * a.linear_params_per_layer,
        ffn_flops=2.0 * ffn_params,
        activated_params=L * a.linear_params_per_layer + ffn_params,
        arithmetic_intensity=core / kv,
    )
