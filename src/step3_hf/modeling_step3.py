"""Step-3 language model for transformers: Multi-Matrix Factorization Attention (MFA) + MoE.

Read top to bottom: rotary helpers, eager attention, RMSNorm, MFA attention, dense MLP, routed experts, router,
MoE block, decoder layer, pretrained base, model, causal-LM heads. The checkpoint's names and their conversion live
in `checkpoint_layout.py`, the checks that refuse a broken checkpoint in `loading.py`.

Each decoder layer exposes its two halves, `attention_block` (everything that touches the KV cache) and
`ffn_block` (dense MLP or MoE), so that Attention-FFN Disaggregation can run them in different processes.
"""

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
# The Switch-Transformer balancing loss as transformers' MoE models compute it (each model file carries a copy;
# this one is importable in every transformers >= 5.17).
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .checkpoint_layout import VISION_PREFIXES, VISION_TENSOR_PATTERNS, checkpoint_conversion_mapping
from .configuration_step3 import Step3Config, Step3VLConfig
from .loading import fp8_saving, from_pretrained_checked, save_pretrained_fp8
from .parallel import check_parallel_sizes

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`; 5.17 (still on
# many GPU images) uses the old name. Everything below speaks `cache` and converts at these boundaries.
_CACHE_NAME = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
if _CACHE_NAME == "cache":
    # As upstream models: the old name still works, with a FutureWarning, until transformers 5.40.
    cache_kwarg = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
else:
    # Before 5.24 `past_key_values` is the name transformers itself passes (generate, the Trainer), so it is taken
    # as `cache` silently: a deprecation dated at the running version renames without warning.
    cache_kwarg = deprecate_kwarg("past_key_values", transformers.__version__, new_name="cache")
# Before the rename, continuous batching handed its paged cache to the attention function, which updated it itself.
_ATTENTION_UPDATES_PAGED_CACHE = _CACHE_NAME == "past_key_values"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input (neox-style RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE over the full head dimension of queries `[B, Hq, S, D]` and keys `[B, Hkv, S, D]`."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]`; used by the eager path only, never stored in the cache."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class Step3RMSNorm(nn.Module):
    """RMSNorm with fp32 statistics and a plain (not 1 + w) weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class Step3RotaryEmbedding(nn.Module):
    def __init__(self, config: Step3Config):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: Step3Config, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE over all `head_dim` dimensions with base `rope_theta`."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class _SumGradOverTensorParallelRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tensor-parallel ranks. Under TP every rank holds the
    whole (replicated) K/V heads but only its own query heads, so each rank's gradient of K and V is the share of
    its heads: summed, it is the whole gradient (and so are the grads of `k_proj`, `v_proj` and their input)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _tensor_parallel_group(weight: torch.Tensor):
    """The process group a tensor-parallel weight (a DTensor) is split over, or None when it is not split."""
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None:
        return None
    return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")


class Step3Attention(nn.Module):
    """Multi-Matrix Factorization Attention.

    The query is factorised through a low-rank bottleneck, `q = wq(inter_norm(q_proj(h)))`, and all query heads
    share `num_attention_groups` key/value heads (one in the release). The cache stores only those shared heads;
    the attention interface (eager, sdpa, flex, flash, paged) broadcasts them over the query heads.
    """

    def __init__(self, config: Step3Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_attention_groups
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        self.q_proj = nn.Linear(config.hidden_size, config.share_q_dim, bias=False)
        self.inter_norm = Step3RMSNorm(config.share_q_dim, eps=config.rms_norm_eps)
        self.wq = nn.Linear(config.share_q_dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated query, key and value heads, `(batch, heads, seq, head_dim)`: everything before the cache."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states = self.wq(self.inter_norm(self.q_proj(hidden_states))).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if torch.is_grad_enabled() and (group := _tensor_parallel_group(self.wq.weight)) is not None:
            key_states = _SumGradOverTensorParallelRanks.apply(key_states, group)
            value_states = _SumGradOverTensorParallelRanks.apply(value_states, group)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        return query_states, key_states, value_states

    def attend(
        self,
        query_states: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cache update and the attention interface: `(batch, seq, heads * head_dim)` before `o_proj`."""
        batch, _, seq, _ = query_states.shape
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        # transformers < 5.24: the paged attention functions update their cache; an attention function that marks
        # itself `updates_paged_cache` does so on every version (it reads the cache in place, not a gathered copy).
        if isinstance(cache, PagedAttentionCache) and (
            _ATTENTION_UPDATES_PAGED_CACHE or getattr(attention_interface, "updates_paged_cache", False)
        ):
            kwargs["cache"] = cache
        elif cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return attn_output.reshape(batch, seq, -1).contiguous(), attn_weights

    @cache_kwarg
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query_states, key_states, value_states = self.project(hidden_states, position_embeddings)
        attn_output, attn_weights = self.attend(query_states, key_states, value_states, attention_mask, cache, **kwargs)
        return self.o_proj(attn_output), attn_weights


class Step3MLP(nn.Module):
    """SwiGLU MLP: the dense layers and the shared expert of MoE layers."""

    def __init__(self, config: Step3Config, intermediate_size: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class Step3Experts(nn.Module):
    """Routed SwiGLU experts as 3-D tensors; `config._experts_implementation` picks eager, batched_mm or grouped_mm."""

    def __init__(self, config: Step3Config):
        super().__init__()
        self.num_experts = config.moe_num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()

        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


class Step3TopKRouter(nn.Module):
    """Softmax router in fp32 over all experts, then top-k; renormalised only when `norm_expert_weight`."""

    def __init__(self, config: Step3Config):
        super().__init__()
        self.top_k = config.moe_top_k
        self.num_experts = config.moe_num_experts
        self.norm_expert_weight = config.norm_expert_weight
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)
        router_probs = F.softmax(router_logits, dtype=torch.float32, dim=-1)
        top_k_weights, top_k_index = self.select_experts(router_probs, hidden_states.dtype)
        return router_logits, top_k_weights, top_k_index

    def select_experts(self, router_probs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of the fp32 probabilities, renormalised when `norm_expert_weight`, the weights cast to `dtype`."""
        top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_expert_weight:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return top_k_weights.to(dtype), top_k_index


class Step3SparseMoeBlock(nn.Module):
    """Routed experts plus the always-on shared expert: `y = sum_j w_j E_{i_j}(h) + S(h)`."""

    def __init__(self, config: Step3Config):
        super().__init__()
        self.gate = Step3TopKRouter(config)
        self.experts = Step3Experts(config)
        self.shared_expert = Step3MLP(config, intermediate_size=config.share_expert_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        routed = self.experts(hidden_states, top_k_index, top_k_weights)
        return (routed + self.shared_expert(hidden_states)).reshape(shape)


class Step3DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer split into its two disaggregable halves, `attention_block` and `ffn_block`."""

    def __init__(self, config: Step3Config, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.is_moe_layer = layer_idx in config.moe_layer_indices
        self.self_attn = Step3Attention(config, layer_idx)
        if self.is_moe_layer:
            self.mlp = Step3SparseMoeBlock(config)
        else:
            self.mlp = Step3MLP(config, intermediate_size=config.intermediate_size)
        self.input_layernorm = Step3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Step3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def attention_block(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """`x + o_proj(MFA(input_layernorm(x)))`: the half that owns the KV cache."""
        attn_output, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        return hidden_states + attn_output

    def ffn_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`x + FFN(post_attention_layernorm(x))`, FFN being the dense MLP or the MoE block: stateless."""
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    @cache_kwarg
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        hidden_states = self.attention_block(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        return self.ffn_block(hidden_states)


class Step3PreTrainedModel(PreTrainedModel):
    config: Step3Config
    config_class = Step3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Step3DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # Static-cache decoding compiles whole with the default attention and experts implementations (sdpa and
    # grouped_mm, and the decode kernels' custom ops on CUDA); the `eager` experts loop is data-dependent.
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(Step3TopKRouter, index=0),
        "hidden_states": Step3DecoderLayer,
        "attentions": Step3Attention,
    }
    # The official VL checkpoint keeps the vision tower beside the text weights; the language model skips it.
    _keys_to_ignore_on_load_unexpected = VISION_TENSOR_PATTERNS
    # Implementations for a caller who names none (`None`: transformers' choice). `step3_hf` points these at its
    # decode kernels where they run (`step3_hf.kernels.defaults`).
    _default_attn_implementation: Callable[[], str | None] = staticmethod(lambda: None)
    _default_experts_implementation: Callable[[], str | None] = staticmethod(lambda: None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # transformers' loading, whose missing and unexpected weights are reported, not refused; a broken Step-3
        # checkpoint (files that contradict each other or the config) fails loudly, naming the tensor. A block-FP8
        # checkpoint goes through transformers' fine-grained FP8 support (`step3_hf.fp8`).
        return from_pretrained_checked(
            super().from_pretrained, pretrained_model_name_or_path, *args, config_class=cls.config_class, **kwargs
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`; a model loaded from a block-FP8 checkpoint is written back in that layout
        (unchanged weights byte for byte, also after a dequantizing load on CPU; changed ones quantized afresh)."""
        fp8 = fp8_saving(self)
        if fp8 is None or kwargs.get("state_dict") is not None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        return save_pretrained_fp8(self, super().save_pretrained, save_directory, fp8, *args, **kwargs)

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, *args, **kwargs):
        # transformers' sharding step, after the model is built and before a weight loads: refuse sizes that would
        # split a query head, an expert or a block-FP8 tile (they would fail later, in a reshape, or not at all).
        quantization = getattr(model.config, "quantization_config", None)
        check_parallel_sizes(model.config.get_text_config(), distributed_config, quantization)
        return super().maybe_distribute_model(model, distributed_config, *args, **kwargs)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention is None:
            requested_attention = type(self)._default_attn_implementation()
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        if requested_experts is None:
            requested_experts = type(self)._default_experts_implementation()
        return super().get_correct_experts_implementation(requested_experts)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.get_text_config().initializer_range
        if isinstance(module, Step3Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Step3TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)


def check_prompt_inputs(
    vocab_size: int,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
) -> None:
    """Refuse an empty prompt, a token id outside `[0, vocab_size)` or a 2-D `attention_mask` whose shape is not the
    ids' with a `ValueError` naming the problem, before the embedding lookup: on CUDA a bad id would be a
    device-side assert that ends the process's CUDA context.

    Checked once per prompt (empty cache; one host sync). Skipped while compiling; for a reused static cache on an
    accelerator, whose length lives on the device (reading it would stall every decode step); and for continuous
    batching's paged cache, whose packed steps mix prompts and decodes (its requests must be checked where they are
    queued)."""
    if torch.compiler.is_compiling() or (cache is not None and not hasattr(cache, "get_seq_length")):
        return
    if cache is not None:
        seen = cache.get_seq_length()
        if isinstance(seen, torch.Tensor) and seen.device.type != "cpu":
            return
        if int(seen) > 0:
            return
    shape = tuple(input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1])
    name = "input_ids" if input_ids is not None else "inputs_embeds"
    if len(shape) != 2:
        raise ValueError(f"`{name}` must be (batch, sequence), got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"empty prompt: `{name}` has shape {shape}; give at least one token per sequence")
    if input_ids is not None:
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"token id {low if low < 0 else high} in `input_ids` is outside the vocabulary [0, {vocab_size})"
            )
    if attention_mask is not None and attention_mask.dim() == 2 and tuple(attention_mask.shape) != shape:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)} but `{name}` has {shape}: at the start of a "
            "sequence they must match"
        )


def prepare_decoder_inputs(
    config: Step3Config,
    embed_tokens: nn.Embedding,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    cache: Cache | None,
    use_cache: bool | None,
) -> tuple[torch.Tensor, Cache | None, torch.LongTensor, torch.Tensor | None]:
    """Embeddings, cache, position ids and causal mask before the first decoder layer.

    Shared by `Step3Model` and the AFD attention ranks (`step3_hf.afd`), which run the same decoder stack split.
    """
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    check_prompt_inputs(embed_tokens.num_embeddings, input_ids, inputs_embeds, attention_mask, cache)

    if use_cache and cache is None:
        cache = DynamicCache(config=config)

    if inputs_embeds is None:
        inputs_embeds = embed_tokens(input_ids)

    if position_ids is None:
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
        position_ids = position_ids.unsqueeze(0)

    causal_mask = create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{_CACHE_NAME: cache},
    )
    return inputs_embeds, cache, position_ids, causal_mask


class Step3Model(Step3PreTrainedModel):
    def __init__(self, config: Step3Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [Step3DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = Step3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Step3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @cache_kwarg
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        inputs_embeds, cache, position_ids, causal_mask = prepare_decoder_inputs(
            self.config, self.embed_tokens, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_NAME: cache})


def _share_of_step_tokens(
    labels: torch.Tensor, shift_labels: torch.Tensor | None, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor | float:
    """This micro-batch's share of the label tokens of the optimizer step, the weight of its load-balancing loss.

    Under gradient accumulation the Trainer sums micro-batch losses without averaging them when the model takes
    `num_items_in_batch`. The cross-entropy is already a sum over tokens divided by the step's token count, but the
    load-balancing loss is a mean over the micro-batch; weighting it by `n_micro / num_items_in_batch` makes the
    step's sum a token-weighted mean of the micro-batch balancing losses instead of `accumulation_steps` times one.
    """
    if num_items_in_batch is None:
        return 1.0
    targets = shift_labels if shift_labels is not None else labels[..., 1:]
    return targets.ne(-100).sum() / num_items_in_batch


class Step3VocabProjection(nn.Linear):
    """The LM head. Step-3's vocabulary (128815) is odd, and cuBLAS has no fast kernel for a product of that width
    (on the H200 it fell back to a Turing-era kernel: 4.9 ms of a 15.7 ms decode step at batch 256). Inference
    multiplies the rows up to a multiple of 8 and the last few separately, then joins the two logit blocks. The row
    count is the weight's own: under tensor parallelism each rank splits its shard, and the gather joins the ranks."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = self.weight.shape[0]
        aligned = rows // 8 * 8
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or self.weight.requires_grad)
        plain = type(self.weight) in (nn.Parameter, torch.Tensor) and self.bias is None  # not a DTensor, quantised
        if aligned in (0, rows) or needs_grad or not plain:
            return super().forward(hidden_states)
        head = F.linear(hidden_states, self.weight[:aligned])
        tail = F.linear(hidden_states, self.weight[aligned:])
        return torch.cat((head, tail), dim=-1)


# Shortest static cache `generate` allocates by default (positions): one compiled decode graph serves all shorter runs.
STATIC_CACHE_MIN_LENGTH = 256
# Prompt tokens (batch x length) that a default `generate` prefills in one forward; beyond it the prompt
# runs in chunks of about this many tokens (transformers' `prefill_chunk_size`). Each layer's activations grow with
# the tokens at once: at Step-3's widths 262,144 of them asked for one 9 GiB block, 1,048,576 for 32 GiB (H100).
PREFILL_TOKENS_PER_CHUNK = 65536


def _default_prefill_chunk_size(prompt: torch.Tensor | None, config: GenerationConfig, kwargs: dict) -> int | None:
    """`generate`'s chunk size for the prefill of `prompt` into a dynamic or static cache: about
    `PREFILL_TOKENS_PER_CHUNK` tokens of the rows the prefill runs (beams and returned sequences included), or None
    where the prompt fits in one, the caller chose (also None), another cache is asked for or passed in, the prefill
    is not `_prefill`'s (assisted decoding), or transformers cannot split the inputs (`inputs_embeds`, raw images).
    Compiled static-cache generation compiles the chunks' shape once more (all chunks but the last have one)."""
    def value(name: str):
        return kwargs.get(name, getattr(config, name, None))

    if prompt is None or "prefill_chunk_size" in kwargs or config.prefill_chunk_size is not None:
        return None
    rows = prompt.shape[0] * max(value("num_beams") or 1, value("num_return_sequences") or 1)
    elsewhere = ("inputs_embeds", "pixel_values", "patch_pixel_values", "past_key_values", "cache", "assistant_model")
    if rows * prompt.shape[1] <= PREFILL_TOKENS_PER_CHUNK:
        return None
    if value("cache_implementation") not in (None, "dynamic", "static"):
        return None
    if value("use_cache") is False or value("prompt_lookup_num_tokens") is not None:
        return None
    if any(kwargs.get(name) is not None for name in elsewhere):
        return None
    return max(1, PREFILL_TOKENS_PER_CHUNK // rows)


class Step3ForCausalLM(Step3PreTrainedModel, GenerationMixin):
    """Step-3 language model with its (untied) LM head, loading the official text-only layout."""

    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: Step3Config | Step3VLConfig):
        super().__init__(config)
        text_config = config.get_text_config()
        self.model = Step3Model(text_config)
        self.vocab_size = text_config.vocab_size
        self.lm_head = Step3VocabProjection(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.post_init()

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None, **kwargs):
        """`GenerationMixin.generate`, with two defaults where the caller set none:

        - a static cache without a set `max_cache_len` is sized to the next power of two of prompt plus new tokens
          (at least `STATIC_CACHE_MIN_LENGTH`), so that compiled decoding keeps its graph while only the prompt
          length or `max_new_tokens` change (transformers reuses a cache at least as long);
        - a prompt of more than `PREFILL_TOKENS_PER_CHUNK` tokens (rows x length) is prefilled in
          chunks of about that many (`prefill_chunk_size`), so that its activations stay bounded
          (`_default_prefill_chunk_size` says where)."""
        config = generation_config if generation_config is not None else self.generation_config
        static = kwargs.get("cache_implementation", config.cache_implementation) == "static"
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if static and kwargs.get("max_cache_len", config.max_cache_len) is None:
            new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
            if prompt is not None and new_tokens is not None:
                needed = prompt.shape[1] + new_tokens
                kwargs["max_cache_len"] = max(STATIC_CACHE_MIN_LENGTH, 1 << (needed - 1).bit_length())
        chunk = _default_prefill_chunk_size(prompt, config, kwargs)
        if chunk is not None:
            kwargs["prefill_chunk_size"] = chunk
        return super().generate(inputs, generation_config, **kwargs)

    @can_return_tuple
    @cache_kwarg
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        text_config = self.config.get_text_config()
        if output_router_logits is None:
            output_router_logits = text_config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            # `ForCausalLMLoss` shifts the labels itself and, given `num_items_in_batch` (the Trainer passes it),
            # divides by the label tokens of the whole optimizer step, so gradient accumulation sums exactly.
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        aux_loss = None
        if output_router_logits and outputs.router_logits:
            padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, text_config.moe_num_experts, text_config.moe_top_k, padding_mask
            )
            if loss is not None:
                share = _share_of_step_tokens(labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"))
                loss = loss + text_config.router_aux_loss_coef * share * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **{_CACHE_NAME: getattr(outputs, _CACHE_NAME, None)},
        )


class Step3VLForCausalLM(Step3ForCausalLM):
    """The language model of an official `step3_vl` checkpoint; its vision tensors are skipped at load time."""

    config: Step3VLConfig
    config_class = Step3VLConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        logger.warning(
            "Loading the Step-3 language model of a `step3_vl` checkpoint: the vision tower's tensors (%s) are "
            "skipped.",
            ", ".join(prefix + "*" for prefix in VISION_PREFIXES),
        )
        return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Only the language model was loaded, so a `step3_vl` file would promise a vision tower that is not there:
        # write the official text-only layout (`step3_text`, `Step3TextForCausalLM`) that vLLM and SGLang load.
        logger.warning(
            "Saving the Step-3 language model in the official text-only layout (`step3_text` config); the vision "
            "tower was not loaded and is not written."
        )
        vl_config = self.config
        self.config = vl_config.get_text_config()
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config = vl_config


# The official layout's tensor names (`checkpoint_layout`) -> this file's modules; `save_pretrained` reverses it.
register_checkpoint_conversion_mapping(Step3Config.model_type, checkpoint_conversion_mapping(), overwrite=True)


__all__ = ["Step3PreTrainedModel", "Step3Model", "Step3ForCausalLM", "Step3VLForCausalLM"]
