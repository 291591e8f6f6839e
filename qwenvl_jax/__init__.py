"""qwenvl_jax: Qwen2.5-VL in JAX/Flax.

The host pipeline (`qwenvl_jax.processing`) is numpy + PIL + tokenizers only and never imports jax.
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load an HF or Orbax Qwen2.5-VL checkpoint as a Flax model (see `qwenvl_jax.loading.load`).

    Imported lazily so that the host pipeline (`qwenvl_jax.processing`) never pulls in jax.
    """
    from qwenvl_jax.loading import load as _load

    return _load(path, **kwargs)


def generate(model, batch, **kwargs):
    """Complete left-padded prompts with `model` (see `qwenvl_jax.generation.generate`); imported lazily."""
    from qwenvl_jax.generation import generate as _generate

    return _generate(model, batch, **kwargs)
