"""PEFT defaults for Step-3: what `LoraConfig()` adapts when no `target_modules` are named.

peft looks the default LoRA targets up by `config.model_type`; it knows nothing of a plugin's model types until the
plugin adds them. `import step3_hf` calls `register_lora_defaults()` when peft is installed.

The defaults are every `nn.Linear` of the blocks: the MFA projections (`q_proj` down to the low-rank query, `wq` up
to the heads, the single shared `k_proj` / `v_proj`, `o_proj`) and the SwiGLU projections of the dense layers and
the shared experts (`gate_proj`, `up_proj`, `down_proj`). The routed experts are 3-D parameters, not modules:
adapt them with `LoraConfig(target_parameters=STEP3_EXPERT_PARAMETERS)`.
"""

from __future__ import annotations

from .configuration_step3 import Step3Config, Step3VLConfig

STEP3_LORA_TARGET_MODULES = ["q_proj", "wq", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEP3_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# `step3_vl` is the config of an official checkpoint directory; its language model has the same modules.
STEP3_MODEL_TYPES = (Step3Config.model_type, Step3VLConfig.model_type)


def register_lora_defaults() -> None:
    """Make Step-3's default LoRA targets known to peft (idempotent; an entry set before is kept)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    for model_type in STEP3_MODEL_TYPES:
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, list(STEP3_LORA_TARGET_MODULES))


__all__ = ["STEP3_LORA_TARGET_MODULES", "STEP3_EXPERT_PARAMETERS", "register_lora_defaults"]
