"""The official Step-3 checkpoint layout, the one place that spells its tensor names.

Every text tensor's name and shape derive from a config alone (`official_tensor_shapes`); so do the names the
modules of `modeling_step3.py` give the same weights (`module_tensor_shapes`: the MoE router, experts and shared
expert live under `mlp`, gate and up projections of the experts fused into `gate_up_proj`), the conversion between
the two that transformers runs at load and, reversed, at save (`checkpoint_conversion_mapping`), and the vision-tower
tensors that the language model skips.
"""

import re

from transformers.core_model_loading import Concatenate, WeightConverter, WeightRenaming

from .configuration_step3 import Step3Config

# Tensors of the vision tower that sit beside the text weights in the official `step3_vl` checkpoint.
VISION_PREFIXES = ("vision_model.", "vit_downsampler.", "vit_downsampler2.", "vit_large_projector.")
# Where the base model sits in a causal-LM checkpoint, and the head tensor beside it.
BASE_MODEL_PREFIX = "model."
LM_HEAD = "lm_head.weight"

# An MoE layer's tensors, relative to `model.layers.{i}.`: official name -> the modules' name.
ROUTER, MODULE_ROUTER = "moe.gate.weight", "mlp.gate.weight"
EXPERTS_GATE, EXPERTS_UP = "moe.gate_proj.weight", "moe.up_proj.weight"
MODULE_EXPERTS_GATE_UP = "mlp.experts.gate_up_proj"  # [E, 2I, H]: gate rows, then up rows, per expert
EXPERTS_DOWN, MODULE_EXPERTS_DOWN = "moe.down_proj.weight", "mlp.experts.down_proj"
SHARED_EXPERT, MODULE_SHARED_EXPERT = "share_expert.", "mlp.shared_expert."  # + {gate,up,down}_proj.weight

# The checkpoint's own names for the vision tensors, as patterns for `_keys_to_ignore_on_load_unexpected`.
VISION_TENSOR_PATTERNS = [f"^{re.escape(prefix)}" for prefix in VISION_PREFIXES]


def is_vision_tensor(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def is_routed_expert_tensor(name: str) -> bool:
    """An official name of the routed experts' weights (the router is not one)."""
    return name.endswith(("." + EXPERTS_GATE, "." + EXPERTS_UP, "." + EXPERTS_DOWN))


# The one-to-one renamings, official -> the modules' name (the experts' gate and up projections are fused instead).
_RENAMED = ((ROUTER, MODULE_ROUTER), (EXPERTS_DOWN, MODULE_EXPERTS_DOWN))


def module_name(official_name: str) -> str:
    """Official tensor name -> the name `Step3ForCausalLM` gives that weight (the experts' gate and up projections,
    fused into `gate_up_proj`, are the one pair this cannot name)."""
    for official, module in _RENAMED:
        if official_name.endswith("." + official):
            return official_name.removesuffix(official) + module
    return official_name.replace("." + SHARED_EXPERT, "." + MODULE_SHARED_EXPERT)


def official_names(module_name: str) -> tuple[str, ...]:
    """The reverse of `module_name`: the official name(s) of a weight of the modules; the experts' fused
    `gate_up_proj` holds two, the gate rows then the up rows (along dim 1)."""
    if module_name.endswith("." + MODULE_EXPERTS_GATE_UP):
        prefix = module_name.removesuffix(MODULE_EXPERTS_GATE_UP)
        return prefix + EXPERTS_GATE, prefix + EXPERTS_UP
    for official, module in _RENAMED:
        if module_name.endswith("." + module):
            return (module_name.removesuffix(module) + official,)
    return (module_name.replace("." + MODULE_SHARED_EXPERT, "." + SHARED_EXPERT),)


def official_tensor_shapes(config: Step3Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape (`[out, in]`, experts `[E, out, in]`) of every language-model tensor, official names."""
    h, v = config.hidden_size, config.vocab_size
    kv = config.num_attention_groups * config.head_dim
    q = config.num_attention_heads * config.head_dim
    e, ie, s = config.moe_num_experts, config.moe_intermediate_size, config.share_expert_dim
    shapes: dict[str, tuple[int, ...]] = {BASE_MODEL_PREFIX + "embed_tokens.weight": (v, h)}
    moe_layers = set(config.moe_layer_indices)
    for layer in range(config.num_hidden_layers):
        p = f"{BASE_MODEL_PREFIX}layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (config.share_q_dim, h)
        shapes[p + "self_attn.inter_norm.weight"] = (config.share_q_dim,)
        shapes[p + "self_attn.wq.weight"] = (q, config.share_q_dim)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if layer in moe_layers:
            shapes[p + ROUTER] = (e, h)
            shapes[p + EXPERTS_GATE] = (e, ie, h)
            shapes[p + EXPERTS_UP] = (e, ie, h)
            shapes[p + EXPERTS_DOWN] = (e, h, ie)
            shapes[p + SHARED_EXPERT + "gate_proj.weight"] = (s, h)
            shapes[p + SHARED_EXPERT + "up_proj.weight"] = (s, h)
            shapes[p + SHARED_EXPERT + "down_proj.weight"] = (h, s)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, h)
            shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, config.intermediate_size)
    shapes[BASE_MODEL_PREFIX + "norm.weight"] = (h,)
    shapes[LM_HEAD] = (v, h)
    return shapes


def module_tensor_shapes(config: Step3Config) -> dict[str, tuple[int, ...]]:
    """The same weights under the names `Step3ForCausalLM.state_dict()` gives them (what
    `save_pretrained(..., save_original_format=False)` writes)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in official_tensor_shapes(config).items():
        if name.endswith(EXPERTS_UP):
            continue  # fused into gate_up_proj with the gate rows
        if name.endswith(EXPERTS_GATE):
            e, ie, h = shape
            shapes[name.removesuffix(EXPERTS_GATE) + MODULE_EXPERTS_GATE_UP] = (e, 2 * ie, h)
            continue
        shapes[module_name(name)] = shape
    return shapes


def base_model_layout(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """A causal-LM layout as the base model (`Step3Model`) saves it: no head, no `model.` prefix."""
    return {name.removeprefix(BASE_MODEL_PREFIX): shape for name, shape in shapes.items() if name != LM_HEAD}


def checkpoint_conversion_mapping() -> list[WeightRenaming | WeightConverter]:
    """Official layout -> module layout, for `register_checkpoint_conversion_mapping`; `save_pretrained` runs it in
    reverse, so checkpoints are written back in the official layout."""
    return [
        WeightRenaming(source_patterns=re.escape("." + ROUTER), target_patterns="." + MODULE_ROUTER),
        WeightRenaming(source_patterns=re.escape("." + SHARED_EXPERT), target_patterns="." + MODULE_SHARED_EXPERT),
        WeightConverter(
            source_patterns=[EXPERTS_GATE, EXPERTS_UP],
            target_patterns=MODULE_EXPERTS_GATE_UP,
            operations=[Concatenate(dim=1)],
        ),
        # A converter (one source, a no-op concatenation), not a renaming: transformers' FP8 support attaches the
        # weight's `weight_scale_inv` (and, dequantizing, its dequantization) to converters only.
        WeightConverter(
            source_patterns=[EXPERTS_DOWN], target_patterns=MODULE_EXPERTS_DOWN, operations=[Concatenate(dim=0)]
        ),
    ]
