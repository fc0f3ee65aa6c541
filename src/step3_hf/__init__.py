"""Step-3 (StepFun, arXiv 2507.19427) as a native transformers model.

Importing this package registers `step3_text` and `step3_vl` with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained(path)` loads the language model of an official Step-3 checkpoint,
`AutoModelForImageTextToText.from_pretrained(path)` the whole vision-language model (the official architecture
`Step3VLForConditionalGeneration`) and `AutoProcessor.from_pretrained(path)` its processor; and, when peft is
installed, Step-3's default LoRA target modules, so that `get_peft_model(model, LoraConfig(r=16))` needs no
`target_modules` (they name language-model layers only, so the vision tower is never adapted by default).
"""

import importlib.util

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from . import kernels  # noqa: F401  registers attn_implementation="mfa_decode"
from . import modeling_step3
from .configuration_step3 import Step3Config, Step3VisionConfig, Step3VLConfig
from .deferred_stop_check import use_deferred_stop_check
from .image_processing_step3_vl import Step3VLImageProcessor, Step3VLImageProcessorPil
from .kv_cache import use_in_place_kv_cache
from .kernels.defaults import default_attn_implementation, default_experts_implementation
from .kernels.decode_graphs import use_decode_graphs
from .kernels.fused_qkv import use_fused_qkv
from .kernels.moe_router import use_fused_top_k
from .kernels.rms_norm import use_fused_rms_norm
from .kernels.rotary import use_fused_rotary
from .kernels.transformers_paged_attention import init_continuous_batching
from .modeling_step3 import (
    Step3Attention,
    Step3DecoderLayer,
    Step3ForCausalLM,
    Step3Model,
    Step3PreTrainedModel,
    Step3RMSNorm,
    Step3TopKRouter,
    Step3VLForCausalLM,
)
from .modeling_step3_vl import Step3VisionModel, Step3VLForConditionalGeneration
from .parameters import ParameterCounts, count_parameters, kv_cache_bytes_per_token
from .processing_step3_vl import Step3VLProcessor
from .vision_layout import count_vision_parameters

# Unless the caller names one, Step-3 decodes through the CUDA decode kernels where they run.
Step3PreTrainedModel._default_attn_implementation = staticmethod(default_attn_implementation)
Step3PreTrainedModel._default_experts_implementation = staticmethod(default_experts_implementation)
# ... with its RMSNorms in one kernel each at inference there (eight eager launches otherwise) ...
use_fused_rms_norm(Step3RMSNorm)
# ... its routers' top-k selection in one kernel (two to four eager launches otherwise) ...
use_fused_top_k(Step3TopKRouter)
# ... its rotary embedding of queries and keys in one kernel (about ten eager launches per layer) ...
use_fused_rotary(modeling_step3)
# ... its q, k and v projections in one GEMM where a model that only runs was fused (`fuse_qkv_projections`) ...
use_fused_qkv(Step3Attention, modeling_step3)
# ... replays each layer's work around its attention from CUDA graphs in eager decoding (decode_graphs) ...
use_decode_graphs(Step3DecoderLayer)
# ... lets `generate()` issue each step before the last one ends (the stop flag read a step late) ...
use_deferred_stop_check(Step3ForCausalLM)
# ... appends each step's keys and values in place in `generate()`'s dynamic cache (no copy of the cache per step) ...
use_in_place_kv_cache(Step3ForCausalLM)
# ... and runs continuous batching (`generate_batch`, `step3-serve`) on the same kernel when its attention is mfa_decode.
Step3PreTrainedModel.init_continuous_batching = init_continuous_batching

AutoConfig.register(Step3Config.model_type, Step3Config, exist_ok=True)
AutoConfig.register(Step3VisionConfig.model_type, Step3VisionConfig, exist_ok=True)
AutoConfig.register(Step3VLConfig.model_type, Step3VLConfig, exist_ok=True)
AutoModel.register(Step3Config, Step3Model, exist_ok=True)
AutoModelForCausalLM.register(Step3Config, Step3ForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(Step3VLConfig, Step3VLForCausalLM, exist_ok=True)
AutoModel.register(Step3VisionConfig, Step3VisionModel, exist_ok=True)
AutoModelForImageTextToText.register(Step3VLConfig, Step3VLForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    Step3VLConfig,
    image_processor_classes={"torchvision": Step3VLImageProcessor, "pil": Step3VLImageProcessorPil},
    exist_ok=True,
)
AutoProcessor.register(Step3VLConfig, Step3VLProcessor, exist_ok=True)

if importlib.util.find_spec("peft") is not None:
    from .peft_support import register_lora_defaults

    register_lora_defaults()

__all__ = [
    "Step3Config",
    "Step3VisionConfig",
    "Step3VLConfig",
    "Step3PreTrainedModel",
    "Step3Model",
    "Step3ForCausalLM",
    "Step3VLForCausalLM",
    "Step3VisionModel",
    "Step3VLForConditionalGeneration",
    "Step3VLImageProcessor",
    "Step3VLImageProcessorPil",
    "Step3VLProcessor",
    "count_vision_parameters",
    "ParameterCounts",
    "count_parameters",
    "kv_cache_bytes_per_token",
]
