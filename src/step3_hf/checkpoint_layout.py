"""The official Step-3 checkpoint layout: every text tensor's name and shape, derived from a config alone.

This is the reference the inspection CLI checks a checkpoint against and the source of the parameter counts;
it is written independently of the modules in `modeling_step3.py` (which store experts fused as `gate_up_proj`).
"""

from __future__ import annotations

from .configuration_step3 import Step3Config

# Tensors of the vision tower that sit beside the text weights in the official `step3_vl` checkpoint.
VISION_PREFIXES = ("vision_model.", "vit_downsampler.", "vit_downsampler2.", "vit_large_projector.")


def is_vision_tensor(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def official_tensor_shapes(config: Step3Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape (`[out, in]`, experts `[E, out, in]`) of every language-model tensor, official names."""
    h, v = config.hidden_size, config.vocab_size
    kv = config.num_attention_groups * config.head_dim
    q = config.num_attention_heads * config.head_dim
    e, ie, s = config.moe_num_experts, config.moe_intermediate_size, config.share_expert_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    moe_layers = set(config.moe_layer_indices)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (config.share_q_dim, h)
        shapes[p + "self_attn.inter_norm.weight"] = (config.share_q_dim,)
        shapes[p + "self_attn.wq.weight"] = (q, config.share_q_dim)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if layer in moe_layers:
            shapes[p + "moe.gate.weight"] = (e, h)
            shapes[p + "moe.gate_proj.weight"] = (e, ie, h)
            shapes[p + "moe.up_proj.weight"] = (e, ie, h)
            shapes[p + "moe.down_proj.weight"] = (e, h, ie)
            shapes[p + "share_expert.gate_proj.weight"] = (s, h)
            shapes[p + "share_expert.up_proj.weight"] = (s, h)
            shapes[p + "share_expert.down_proj.weight"] = (h, s)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, h)
            shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, config.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def is_routed_expert_tensor(name: str) -> bool:
    return ".moe." in name and not name.endswith(".moe.gate.weight")
