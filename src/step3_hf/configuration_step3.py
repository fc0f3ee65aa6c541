"""Step-3 configurations: the text model (`step3_text`) and the official multimodal wrapper (`step3_vl`).

Field names follow the official `config.json` of `stepfun-ai/step3` so that a saved config is read back by
the official loaders (vLLM, SGLang, the hub's remote code); `attribute_map` exposes the names transformers'
generic code looks for (`num_key_value_heads`, `max_position_embeddings`, `num_experts`, ...).
"""

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

# Layers 4..59 of the released 61-layer model are MoE; 0-3 and 60 are dense.
_RELEASED_MOE_LAYERS = ",".join(str(i) for i in range(4, 60))
# Our class -> the name the official loaders register for the same weights.
_OFFICIAL_ARCHITECTURES = {"Step3ForCausalLM": "Step3TextForCausalLM", "Step3VLForCausalLM": "Step3TextForCausalLM"}


def _parse_layer_indices(value: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """`moe_layers_enum` comes as a comma string in the official file and as a tuple in the official class."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        indices = [int(str(i).strip()) for i in items if str(i).strip()]
    except ValueError as err:
        raise ValueError(f"`moe_layers_enum` must be layer indices, got {value!r}") from err
    return tuple(sorted(set(indices)))


@strict
class Step3Config(PreTrainedConfig):
    r"""
    Configuration of the Step-3 language model (Multi-Matrix Factorization Attention + MoE). The defaults are
    those of the released 321B model (`stepfun-ai/step3`, 316.3B parameters in the language model).

    Args:
        num_attention_groups (`int`, defaults to 1):
            Number of key/value heads. MFA shares ONE key and ONE value head across all query heads.
        share_q_dim (`int`, defaults to 2048):
            Width of the low-rank query: `q = wq(inter_norm(q_proj(h)))`.
        moe_layers_enum (`str` or `list[int]`, defaults to `"4,5,...,59"`):
            Indices of the MoE layers; every other layer is a dense SwiGLU MLP. Stored as the comma string of
            the official file.
        moe_num_experts / moe_top_k / moe_intermediate_size:
            Routed experts, experts per token, and their SwiGLU width.
        share_expert_dim (`int`, defaults to 5120):
            Width of the always-on shared expert of every MoE layer.
        norm_expert_weight (`bool`, defaults to `False`):
            Renormalise the top-k router probabilities to sum to one (the release does not).
        max_position_embedding (`int`, defaults to 65536):
            The official (singular) spelling; `max_position_embeddings` reads the same value.
        output_router_logits (`bool`, defaults to `False`):
            Return every MoE layer's router logits and, when `labels` are given, add the load-balancing loss to the
            language-modelling loss. Off in the release; switch it on to fine-tune with router balancing.
        router_aux_loss_coef (`float`, defaults to 0.001):
            Weight of the load-balancing loss (used only with `output_router_logits`).
    """

    model_type = "step3_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    default_theta = 500000.0

    attribute_map = {
        "num_key_value_heads": "num_attention_groups",
        "max_position_embeddings": "max_position_embedding",
        "num_experts": "moe_num_experts",
        "num_local_experts": "moe_num_experts",
        "num_experts_per_tok": "moe_top_k",
    }

    # Tensor-parallel plan: one KV head cannot be split, so K/V stay replicated; the query is sharded after the
    # low-rank bottleneck (wq), and o_proj gathers. The routed experts are not in it (each rank holds them all, as
    # upstream MoE models since transformers 5.25 deprecated `moe_tp_experts`); the EP plan splits them by expert.
    base_model_tp_plan = {
        "layers.*.self_attn.wq": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 128815
    hidden_size: int = 7168
    intermediate_size: int = 18432
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_attention_groups: int = 1
    head_dim: int = 256
    share_q_dim: int = 2048
    hidden_act: str = "silu"
    max_position_embedding: int = 65536
    max_seq_len: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float | int = 0.0
    moe_layers_enum: str | list[int] | tuple[int, ...] | None = None
    moe_num_experts: int = 48
    moe_top_k: int = 3
    moe_intermediate_size: int = 5120
    share_expert_dim: int = 5120
    norm_expert_weight: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float | int = 0.001
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 128805

    def __post_init__(self, **kwargs):
        if self.moe_layers_enum is None:
            self.moe_layers_enum = _RELEASED_MOE_LAYERS
        self.moe_layers_enum = ",".join(str(i) for i in _parse_layer_indices(self.moe_layers_enum))
        # `rope_scaling: null` in the official file; Step-3 uses plain RoPE.
        if kwargs.get("rope_scaling", "absent") is None:
            kwargs.pop("rope_scaling")
        super().__post_init__(**kwargs)
        # Checked here too so that a bad field raises a plain `ValueError` at construction; `@strict` wraps the
        # errors of its own later `validate_*` pass in `StrictDataclassClassValidationError`.
        self.validate_architecture()
        self.validate_rope()

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        """Indices of the MoE layers, parsed from `moe_layers_enum`."""
        return _parse_layer_indices(self.moe_layers_enum)

    def validate_architecture(self):
        """Part of `@strict` validation: every cross-field rule, each error naming its field."""
        super().validate_architecture()
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_attention_groups", "head_dim", "share_q_dim", "moe_num_experts", "moe_top_k",
            "moe_intermediate_size", "share_expert_dim", "max_position_embedding",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_attention_groups != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_attention_groups` "
                f"({self.num_attention_groups}): each KV head serves the same number of query heads"
            )
        if self.moe_top_k > self.moe_num_experts:
            raise ValueError(
                f"`moe_top_k` ({self.moe_top_k}) cannot exceed `moe_num_experts` ({self.moe_num_experts})"
            )
        bad = [i for i in self.moe_layer_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"`moe_layers_enum` names layers {bad} outside the model's {self.num_hidden_layers} layers "
                f"(`num_hidden_layers`)"
            )
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"`router_aux_loss_coef` must be >= 0, got {self.router_aux_loss_coef}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"`rms_norm_eps` must be positive, got {self.rms_norm_eps}")
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout}")
        if self.hidden_act != "silu":
            raise ValueError(f"`hidden_act` must be 'silu' (Step-3 uses SwiGLU everywhere), got {self.hidden_act!r}")

    def validate_rope(self):
        """Part of `@strict` validation: transformers' RoPE checks, plus a base that gives finite frequencies
        (`rope_theta` <= 0 or NaN makes every inverse frequency NaN, and the model silently outputs NaN)."""
        parent = getattr(super(), "validate_rope", None)  # not in every transformers 5.x
        if parent is not None:
            parent()
        theta = (self.rope_parameters or {}).get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
            raise ValueError(f"`rope_theta` must be a positive, finite number, got {theta!r}")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # vLLM and SGLang pick their implementation by the official architecture name.
        if output.get("architectures"):
            output["architectures"] = [_OFFICIAL_ARCHITECTURES.get(a, a) for a in output["architectures"]]
        # The official loaders read `rope_theta` and `rope_scaling`, not `rope_parameters`.
        output["rope_theta"] = self.rope_parameters["rope_theta"]
        output.setdefault("rope_scaling", None)
        return output


@strict
class Step3VisionConfig(PreTrainedConfig):
    """The official `step3_vision_encoder` config: the ViT of `Step3VLForConditionalGeneration`.

    Args:
        hidden_size / intermediate_size / num_hidden_layers / num_attention_heads:
            Width, MLP width, depth and heads of the ViT (1792, 3072, 63, 16 in the release).
        output_hidden_size (`int`, defaults to 4096):
            Channels of the first downsampling convolution (`vit_downsampler`); the second one doubles them.
        image_size / patch_size:
            Side of the global view (728) and of a ViT patch (14): 52 x 52 patches, `(728 / 14) ** 2 + 1` learned
            positions (a class token first).
        hidden_act (`str`, defaults to `"quick_gelu"`), layer_norm_eps (`float`, defaults to 1e-5).
    """

    model_type = "step3_vision_encoder"
    base_config_key = "vision_config"

    hidden_size: int = 1792
    intermediate_size: int = 3072
    output_hidden_size: int = 4096
    num_hidden_layers: int = 63
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 728
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Part of `@strict` validation: each error names its field."""
        super().validate_architecture()
        for name in (
            "hidden_size", "intermediate_size", "output_hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_channels", "image_size", "patch_size",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"`vision_config.{name}` must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`vision_config.hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`vision_config.image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"`vision_config.layer_norm_eps` must be positive, got {self.layer_norm_eps}")


@strict
class Step3VLConfig(PreTrainedConfig):
    """The top-level `step3_vl` config of the official checkpoint: `text_config` + `vision_config` + token ids.

    `AutoModelForImageTextToText.from_pretrained` on an official checkpoint directory builds the whole model
    (`Step3VLForConditionalGeneration`); `AutoModelForCausalLM.from_pretrained` builds the text model alone
    (`Step3VLForCausalLM`) from `text_config`. `understand_projector_stride` is the stride of `vit_downsampler`
    and `projector_bias` the bias of `vit_large_projector`.
    """

    model_type = "step3_vl"
    sub_configs = {"text_config": Step3Config, "vision_config": Step3VisionConfig}

    text_config: dict | Step3Config | None = None
    vision_config: dict | Step3VisionConfig | None = None
    image_token_id: int = 128001
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 128805
    pad_token_id: int | None = None
    im_start_token: str = "<im_start>"
    im_end_token: str = "<im_end>"
    im_patch_token: str = "<im_patch>"
    image_token_len: int = 169
    patch_token_len: int = 81
    understand_projector_stride: int = 2
    projector_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.text_config is None:
            self.text_config = Step3Config()
        elif isinstance(self.text_config, dict):
            text_type = self.text_config.get("model_type", Step3Config.model_type)
            if text_type != Step3Config.model_type:
                raise ValueError(
                    f"`text_config.model_type` must be {Step3Config.model_type!r} in a step3_vl config, got {text_type!r}"
                )
            self.text_config = Step3Config(**{k: v for k, v in self.text_config.items() if k != "model_type"})
        if self.vision_config is None:
            self.vision_config = Step3VisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = Step3VisionConfig(
                **{k: v for k, v in self.vision_config.items() if k != "model_type"}
            )
        super().__post_init__(**kwargs)


__all__ = ["Step3Config", "Step3VisionConfig", "Step3VLConfig"]
