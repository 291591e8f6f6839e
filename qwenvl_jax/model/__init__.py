"""Device-side model: Flax NNX modules, pure jax (never PIL, files or torch).

`Qwen25VL(config, rngs=...)` is the whole model; `attention` is the one attention entry point; the rest
are its parts, exported for module-level parity tests and for the weight loader.
"""

from qwenvl_jax.model.attention import attention
from qwenvl_jax.model.layers import MLP, Dense, Embed, RMSNorm, run_stack, stacked
from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS, Qwen25VL, host_inputs, is_collated
from qwenvl_jax.model.rope import mrope_cos_sin, vision_cos_sin
from qwenvl_jax.model.text import DecoderLayer, TextAttention, TextModel
from qwenvl_jax.model.vision import PatchMerger, VisionAttention, VisionBlock, VisionInputs, VisionTower

__all__ = [
    "CORE_KEYS",
    "MLP",
    "DecoderLayer",
    "Dense",
    "Embed",
    "PatchMerger",
    "Qwen25VL",
    "RMSNorm",
    "TextAttention",
    "TextModel",
    "VisionAttention",
    "VisionBlock",
    "VisionInputs",
    "VisionTower",
    "attention",
    "host_inputs",
    "is_collated",
    "mrope_cos_sin",
    "run_stack",
    "stacked",
    "vision_cos_sin",
]
