"""Decoding-cost model and AFD planner after the Step-3 report (arXiv 2507.19427, sections 4-7).

Pure Python: importing this package pulls in neither torch nor transformers. Configs are read by
field name from dicts, config.json files or any config object (duck typing).

    >>> from step3_hf.cost_model import cost_report, builtin_cards
    >>> round(cost_report("step3", 8192, builtin_cards()).afd, 3)
    0.055
"""

from .accounting import (
    MAX_CONTEXT,
    PRESETS,
    AttentionSpec,
    FFNSpec,
    ModelSpec,
    PerToken,
    Quantization,
    UnsupportedConfigError,
    check_context,
    model_spec,
    per_token,
)
from .cost import CostReport, attention_cost, cost_report, ffn_cost, min_active_experts, min_sparsity
from .hardware import Card, builtin_cards, load_cards
from .memory import LayoutFit, MemoryFit, WeightParams, fit_layouts, weight_params

__all__ = [
    "MAX_CONTEXT", "PRESETS", "AttentionSpec", "FFNSpec", "ModelSpec", "PerToken", "Quantization",
    "UnsupportedConfigError", "check_context", "model_spec", "per_token", "CostReport", "attention_cost",
    "cost_report", "ffn_cost", "min_active_experts", "min_sparsity", "Card", "builtin_cards", "load_cards",
    "LayoutFit", "MemoryFit", "WeightParams", "fit_layouts", "weight_params",
]
