"""Fast decoding kernels for Step-3: split-KV decode attention (Triton) and its transformers integration."""

from .decode_attention import decode_attention, default_num_splits, interpreter_enabled, kernel_available

__all__ = ["decode_attention", "default_num_splits", "interpreter_enabled", "kernel_available"]
