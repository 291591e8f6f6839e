"""qwenvl_jax: Qwen2.5-VL in JAX/Flax.

The host pipeline (`qwenvl_jax.processing`) is numpy + PIL + tokenizers only and never imports jax.
"""

__version__ = "0.1.0"
