"""The attention side of a disaggregated Step-3: a `GenerationMixin` model whose decoder layers are the model's
own `Step3DecoderLayer`s with one module swapped: their `mlp` is a `RemoteFFN`, which keeps the MoE router and
hands the FFN to the FFN side through a connector. So the parameter names are the single-process model's.

`generate()` runs on it unchanged -- sampling, logits processors, stopping criteria, left padding -- because
only the decoder-layer loop differs from `Step3ForCausalLM`: it is `pipeline.run_layers`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..checkpoint_layout import module_name, official_tensor_shapes
from ..kernels.decode_linear import use_decode_linears
from ..kernels.fused_qkv import fuse_qkv_projections
from ..configuration_step3 import Step3Config
from ..modeling_step3 import (
    _CACHE_NAME,
    Step3DecoderLayer,
    Step3PreTrainedModel,
    Step3RMSNorm,
    Step3RotaryEmbedding,
    Step3VocabProjection,
    prepare_decoder_inputs,
)
from .checkpoint import CheckpointReader, role_of_tensor
from .connector import AttentionConnector
from .graphs import AttentionGraphs
from .pipeline import run_layers
from .placement import Role
from .remote_ffn import NOT_CONNECTED, RemoteFFN
from .timing import PhaseTimer
from .wire import WireFormat


def _attention_half(config: Step3Config, layer_idx: int) -> Step3DecoderLayer:
    # The FFN half is built on the meta device only to be swapped out: no expert memory is ever allocated here.
    with torch.device("meta"):
        layer = Step3DecoderLayer(config, layer_idx)
    layer.mlp = RemoteFFN(config, layer_idx)
    return layer


def _use_decode_kernels(model: nn.Module, fuse_qkv: bool, decode_linears: bool) -> None:
    """The attention side's decode linears: where `decode_linears`, the layers' plain linears through the
    weight-streaming kernel (before the fusion, so that the stacked q/k/v linear is one too); where `fuse_qkv`, q, k
    and v stacked."""
    if decode_linears:
        use_decode_linears(model.model.layers)
    if fuse_qkv:
        fuse_qkv_projections(model)


def _set_fp8_linear(model: nn.Module, name: str, weight: torch.Tensor, scale: torch.Tensor, block_size) -> None:
    """Replace the `nn.Linear` `name` by a `Step3FP8Linear` holding `weight` (float8) and its `scale`, as
    transformers' FP8 loading and `use_fp8_kernels` leave one process's linears."""
    from ..kernels.fp8_linear import Step3FP8Linear

    linear = model.get_submodule(name)
    if tuple(weight.shape) != (linear.out_features, linear.in_features) or linear.bias is not None:
        raise ValueError(f"{name}.weight {tuple(weight.shape)} does not fit {linear}")
    with torch.device("meta"):
        fp8 = Step3FP8Linear(linear.in_features, linear.out_features, block_size=tuple(block_size))
    fp8.weight = nn.Parameter(weight, requires_grad=False)
    fp8.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
    model.set_submodule(name, fp8)


class Step3AFDAttentionForCausalLM(Step3PreTrainedModel, GenerationMixin):
    """Embedding, attention layers, norms, routers and LM head of Step-3; build with `from_checkpoint` (reads
    only these tensors) or `from_random`, then `connect` it to the FFN ranks."""

    _keys_to_ignore_on_load_unexpected = None
    # Each step exchanges with the FFN side (and may replay its own CUDA graphs): generate() must not compile it whole.
    _can_compile_fullgraph = False

    def __init__(self, config: Step3Config):
        super().__init__(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.model.layers = nn.ModuleList(_attention_half(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = Step3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.model.rotary_emb = Step3RotaryEmbedding(config)
        self.lm_head = Step3VocabProjection(config.hidden_size, config.vocab_size, bias=False)
        self.micro_batches = 3
        self.attention_graphs: AttentionGraphs | None = None
        self.timer = PhaseTimer(torch.device("cpu"))
        self.post_init()

    # ----- construction -------------------------------------------------------------------------------------
    @classmethod
    def _empty(cls, config: Step3Config, device: torch.device, dtype: torch.dtype, attn_implementation: str | None):
        with torch.device("meta"):
            model = cls(config)
        model.to(dtype).to_empty(device=device)  # cast while on meta: memory is allocated once, in `dtype`
        model.model.rotary_emb = Step3RotaryEmbedding(config).to(device)  # its buffers were on meta
        if attn_implementation is not None:  # None keeps Step-3's default: the decode kernel on CUDA, else sdpa
            model.set_attn_implementation(attn_implementation)
        model.timer = PhaseTimer(torch.device(device))
        return model.eval()

    @classmethod
    def from_checkpoint(
        cls, reader: CheckpointReader, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        attn_implementation: str | None = None, fp8_weights: bool | None = None, fuse_qkv: bool = True,
        decode_linears: bool = False,
    ) -> "Step3AFDAttentionForCausalLM":
        """Read exactly the attention-side tensors of an official checkpoint.

        From a block-FP8 checkpoint the quantized linears load as one process loads them: `fp8_weights` keeps them
        in float8 with their scales (`Step3FP8Linear`; default: on CUDA), else they are dequantized to `dtype`.
        `fuse_qkv`: each layer's q, k and v projections run as one GEMM (`kernels.fused_qkv`; the model only runs).
        `decode_linears`: the layers' plain linears compute decode-sized calls through the weight-streaming kernel
        (`kernels.decode_linear.DecodeLinear`; opt-in: not yet timed on a GPU against cuBLAS)."""
        config = reader.config
        device = torch.device(device)
        model = cls._empty(config, device, dtype, attn_implementation)
        params = dict(model.named_parameters())
        expected = {module_name(n) for n in official_tensor_shapes(config) if role_of_tensor(n) is Role.ATTENTION}
        if expected != set(params):
            raise RuntimeError(f"attention-side parameters do not match the checkpoint layout: "
                               f"{sorted(expected ^ set(params))[:8]}")
        keep_fp8 = reader.keeps_fp8(device, fp8_weights)
        with torch.no_grad():
            for name in official_tensor_shapes(config):
                if role_of_tensor(name) is not Role.ATTENTION:
                    continue
                if keep_fp8 and reader.is_quantized(name):
                    _set_fp8_linear(model, name.removesuffix(".weight"), *reader.read_fp8(name, device=device),
                                    reader.block_size)  # fmt: skip
                else:
                    params[module_name(name)].copy_(reader.read(name, dtype=dtype, device=device))
        _use_decode_kernels(model, fuse_qkv, decode_linears)
        try:
            model.generation_config = GenerationConfig.from_pretrained(reader.path)
        except OSError:  # no generation_config.json: derive it from the top-level (possibly step3_vl) config
            model.generation_config = GenerationConfig.from_model_config(reader.full_config)
        return model

    @classmethod
    def from_random(
        cls, config: Step3Config, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
        std: float = 0.02, attn_implementation: str | None = None, seed: int = 0, fuse_qkv: bool = True,
        decode_linears: bool = False,
    ) -> "Step3AFDAttentionForCausalLM":
        """Random weights (for benchmarks of real layer widths without a checkpoint); `fuse_qkv` and `decode_linears`
        as in `from_checkpoint`."""
        model = cls._empty(config, torch.device(device), dtype, attn_implementation)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=generator)
        _use_decode_kernels(model, fuse_qkv, decode_linears)
        return model

    def connect(self, connector: AttentionConnector, *, micro_batches: int = 3, wire: WireFormat = WireFormat.FP8):
        """Send every layer's FFN half through `connector`, `micro_batches` micro-batches in flight."""
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        for layer in self.model.layers:
            layer.mlp.connector = connector
        self.micro_batches, self.wire = micro_batches, wire
        return self

    def use_cuda_graphs(self, enabled: bool = True) -> "Step3AFDAttentionForCausalLM":
        """Replay each layer's and micro-batch's attention phase from a CUDA graph on decode steps with a static
        cache (`generate(..., cache_implementation="static")`); prefill and other caches run eagerly."""
        if enabled and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the attention side on a CUDA device; this model is on {self.device}")
        self.attention_graphs = AttentionGraphs() if enabled else None
        return self

    @property
    def connector(self) -> AttentionConnector | None:
        """What every layer's `RemoteFFN` sends through (set by `connect`)."""
        return self.model.layers[0].mlp.connector

    @property
    def wire(self) -> WireFormat:
        """How the hidden states travel to the FFN side (`fp8` or `raw`)."""
        return self.model.layers[0].mlp.wire

    @wire.setter
    def wire(self, wire: WireFormat | str) -> None:
        for layer in self.model.layers:
            layer.mlp.wire = WireFormat(wire)

    # ----- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if self.connector is None:
            raise RuntimeError(NOT_CONNECTED)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        inputs_embeds, cache, position_ids, causal_mask = prepare_decoder_inputs(
            self.config, self.model.embed_tokens, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache
        )
        self.timer.start_step()
        hidden_states = run_layers(
            self.model.layers,
            inputs_embeds,
            position_embeddings=self.model.rotary_emb(inputs_embeds, position_ids=position_ids),
            attention_mask=causal_mask,
            cache=cache,
            micro_batches=self.micro_batches,
            timer=self.timer,
            graphs=self.attention_graphs,
            position_ids=position_ids,
        )
        hidden_states = self.model.norm(hidden_states)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        self.timer.end_step()
        return CausalLMOutputWithPast(logits=logits, **{_CACHE_NAME: cache})
