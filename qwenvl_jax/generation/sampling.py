"""The sampler: one pure function from float32 logits to (token, log-prob), jittable.

Processing order is transformers' (`SuppressTokensLogitsProcessor`, then `TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`):
1. suppressed tokens (by default the image/video placeholders, TRL's `suppress_tokens=[image_token_id]`)
   get -inf, so the policy can never emit them;
2. logits / temperature;
3. top-k: keep the k largest (k = 0: off);
4. top-p (nucleus): in descending order keep a token while the probability mass strictly before it is
   < top_p (HF's `cumsum(ascending) <= 1 - top_p` removal, the top token always kept); top_p = 1: off.

Log-probs are those of the distribution the token was drawn from, `log_softmax(processed logits)`, the
"old log-probs" of GRPO/PPO at this temperature. Greedy decoding (temperature 0) takes the argmax of the
suppressed logits, as HF does, and reports `log_softmax(raw logits)`, the model's own log-prob of the
token. Keys are per step (`fold_in(key, step)`), so the streaming and the looped paths draw identically.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    """Traced sampling state (a pytree): changing any value, the mode included, does not recompile."""

    greedy: jax.Array  # () bool, temperature == 0
    filtered: jax.Array  # () bool, top-k or top-p is on (sorts the vocabulary)
    temperature: jax.Array  # () float32, > 0 when sampling
    top_k: jax.Array  # () int32, 0 = off
    top_p: jax.Array  # () float32 in (0, 1], 1 = off
    suppress_v: jax.Array  # (V,) bool, True for tokens never emitted
    stop_ids: jax.Array  # (S,) int32, -1 = unused slot
    pad_id: jax.Array  # () int32, written after a row has finished
    max_new_tokens: jax.Array  # () int32


def filter_logits(logits_rv: jax.Array, temperature, top_k, top_p, suppress_v, *, filtered=True):
    """Processed float32 logits: suppression, temperature, then (when `filtered`, a Python or traced
    bool) top-k and top-p; -inf marks removed tokens."""
    x_rv = jnp.where(suppress_v[None, :], -jnp.inf, logits_rv.astype(jnp.float32))
    x_rv = x_rv / jnp.asarray(temperature, jnp.float32)
    if isinstance(filtered, bool):
        return _top_k_top_p(x_rv, top_k, top_p) if filtered else x_rv
    # Traced: one program serves every mode; only the taken branch runs (the sort is skipped when off).
    return jax.lax.cond(filtered, lambda x: _top_k_top_p(x, top_k, top_p), lambda x: x, x_rv)


def _top_k_top_p(x_rv, top_k, top_p):
    vocab = x_rv.shape[-1]
    sorted_rv = -jnp.sort(-x_rv, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_r = jax.lax.dynamic_index_in_dim(sorted_rv, k - 1, axis=-1, keepdims=True)
    sorted_rv = jnp.where(sorted_rv >= kth_r, sorted_rv, -jnp.inf)
    probs_rv = jax.nn.softmax(sorted_rv, axis=-1)
    mass_before_rv = jnp.cumsum(probs_rv, axis=-1) - probs_rv
    keep_rv = (mass_before_rv < top_p) | (jnp.arange(vocab) == 0)[None, :]
    # The smallest kept logit is the cut: every token at or above it stays (ties at the cut stay too).
    cut_r = jnp.min(jnp.where(keep_rv & jnp.isfinite(sorted_rv), sorted_rv, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x_rv >= cut_r, x_rv, -jnp.inf)


def sample(key: jax.Array, logits_rv: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(tokens `(R,)` int32, their log-probs `(R,)` float32) from float32 logits `(R, V)`."""
    raw_rv = logits_rv.astype(jnp.float32)

    def greedy(_):
        tokens_r = jnp.argmax(jnp.where(params.suppress_v[None, :], -jnp.inf, raw_rv), axis=-1)
        return tokens_r.astype(jnp.int32), jax.nn.log_softmax(raw_rv, axis=-1)

    def sampled(_):
        x_rv = filter_logits(
            raw_rv,
            params.temperature,
            params.top_k,
            params.top_p,
            params.suppress_v,
            filtered=params.filtered,
        )
        return jax.random.categorical(key, x_rv, axis=-1).astype(jnp.int32), jax.nn.log_softmax(x_rv, axis=-1)

    tokens_r, logp_rv = jax.lax.cond(params.greedy, greedy, sampled, None)
    return tokens_r, jnp.take_along_axis(logp_rv, tokens_r[:, None], axis=-1)[:, 0]
