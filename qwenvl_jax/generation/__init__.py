"""Generation: a jitted prefill and decode loop over a preallocated, bucketed KV cache.

`generate(model, batch, ...)` returns completion ids, lengths, finish reasons, per-token log-probs of the
sampled tokens (the GRPO/PPO old log-probs) and timings; `generate_stream` yields one step at a time.
`sample` is the pure sampler; `cache` computes and checks the KV cache size before allocating it.
"""

from qwenvl_jax.generation.cache import (
    CACHE_AXES,
    LAYER_CACHE_AXES,
    CacheMemoryError,
    KVCache,
    cache_bytes,
    cache_spans,
    check_cache_fits,
    memory_budget,
)
from qwenvl_jax.generation.engine import (
    TRACE_COUNTS,
    GenerationOutput,
    StreamStep,
    default_batch_bucket,
    default_bucket,
    generate,
    generate_stream,
    prepare_prompts,
)
from qwenvl_jax.generation.sampling import SamplingParams, filter_logits, sample

__all__ = [
    "CACHE_AXES",
    "LAYER_CACHE_AXES",
    "TRACE_COUNTS",
    "CacheMemoryError",
    "GenerationOutput",
    "KVCache",
    "SamplingParams",
    "StreamStep",
    "cache_bytes",
    "cache_spans",
    "check_cache_fits",
    "default_batch_bucket",
    "default_bucket",
    "filter_logits",
    "generate",
    "generate_stream",
    "memory_budget",
    "prepare_prompts",
    "sample",
]
