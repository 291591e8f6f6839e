"""The sampler: one pure function from float32 logits to (token, log-prob), jittable.

Processing order is transformers' (`_get_logits_processor`: `RepetitionPenaltyLogitsProcessor`,
`SuppressTokensLogitsProcessor`, then the sampling warpers `TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`, `MinPLogitsWarper`):
1. repetition penalty: every token id present in the row so far (the prompt's valid ids and the tokens
   generated so far) gets `logit / penalty` if `logit >= 0` else `logit * penalty`, on the raw logits,
   so before temperature (penalty = 1: off);
2. suppressed tokens (by default the image/video placeholders, TRL's `suppress_tokens=[image_token_id]`)
   get -inf, so the policy can never emit them;
3. logits / temperature;
4. top-k: keep the k largest (k = 0: off);
5. top-p (nucleus): in descending order keep a token while the probability mass strictly before it is
   < top_p (HF's `cumsum(ascending) <= 1 - top_p` removal, the top token always kept); top_p = 1: off;
6. min-p: remove tokens whose probability (softmax of the logits processed so far) is < min_p x the
   largest one, the top token always kept; min_p = 0: off.

Log-probs are those of the distribution the token was drawn from, `log_softmax(processed logits)` (steps
1-6), the "old log-probs" of GRPO/PPO at this temperature. Greedy decoding (temperature 0) takes the
argmax of the penalised, suppressed logits (steps 1-2; the repetition penalty is a logits processor, not
a warper, so HF applies it to greedy search too) and reports `log_softmax(raw logits)`, the model's own
log-prob of the token. Keys are per step (`fold_in(key, step)`), so the streaming and the looped paths
draw identically.
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
    min_p: jax.Array  # () float32 in [0, 1), 0 = off
    repetition_penalty: jax.Array  # () float32 > 0, 1 = off


def repetition_penalty_logits(logits_rv: jax.Array, presence_rv: jax.Array, penalty) -> jax.Array:
    """HF `RepetitionPenaltyLogitsProcessor`: tokens present in the row (`presence_rv`, (R, V) bool) get
    `logit / penalty` when `logit >= 0`, else `logit * penalty` (penalty > 1 makes them less likely)."""
    x_rv = logits_rv.astype(jnp.float32)
    penalty = jnp.asarray(penalty, jnp.float32)
    return jnp.where(presence_rv, jnp.where(x_rv < 0, x_rv * penalty, x_rv / penalty), x_rv)


def filter_logits(logits_rv: jax.Array, temperature, top_k, top_p, suppress_v, *, filtered=True, min_p=0.0):
    """Processed float32 logits: suppression, temperature, then (when `filtered`, a Python or traced
    bool) top-k and top-p, then min-p (when `min_p` > 0); -inf marks removed tokens. The repetition penalty,
    which comes first, is `repetition_penalty_logits`."""
    x_rv = jnp.where(suppress_v[None, :], -jnp.inf, logits_rv.astype(jnp.float32))
    x_rv = x_rv / jnp.asarray(temperature, jnp.float32)
    if isinstance(filtered, bool):
        x_rv = _top_k_top_p(x_rv, top_k, top_p) if filtered else x_rv
    else:  # traced: one program serves every mode; only the taken branch runs (the sort is skipped when off)
        x_rv = jax.lax.cond(filtered, lambda x: _top_k_top_p(x, top_k, top_p), lambda x: x, x_rv)
    if isinstance(min_p, (int, float)):
        return _min_p(x_rv, min_p) if min_p > 0 else x_rv
    return jax.lax.cond(min_p > 0, lambda x: _min_p(x, min_p), lambda x: x, x_rv)


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


def _min_p(x_rv, min_p):
    # HF `MinPLogitsWarper` compares probabilities, not logit differences, so the cut falls where its does.
    probs_rv = jax.nn.softmax(x_rv, axis=-1)
    top_r = jnp.max(probs_rv, axis=-1, keepdims=True)
    argmax_rv = x_rv == jnp.max(x_rv, axis=-1, keepdims=True)  # at least one token stays
    keep_rv = (probs_rv >= jnp.asarray(min_p, jnp.float32) * top_r) | argmax_rv
    return jnp.where(keep_rv, x_rv, -jnp.inf)


def sample(
    key: jax.Array, logits_rv: jax.Array, params: SamplingParams, presence_rv: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(tokens `(R,)` int32, their log-probs `(R,)` float32) from float32 logits `(R, V)`.

    `presence_rv` ((R, V) bool, the ids in each row so far) is needed for the repetition penalty; without
    it the penalty is not applied."""
    raw_rv = logits_rv.astype(jnp.float32)
    if presence_rv is None:
        penalised_rv = raw_rv
    else:  # the (R, V) work runs only when the penalty is on
        penalised_rv = jax.lax.cond(
            params.repetition_penalty != 1,
            lambda x: repetition_penalty_logits(x, presence_rv, params.repetition_penalty),
            lambda x: x,
            raw_rv,
        )

    def greedy(_):
        tokens_r = jnp.argmax(jnp.where(params.suppress_v[None, :], -jnp.inf, penalised_rv), axis=-1)
        return tokens_r.astype(jnp.int32), jax.nn.log_softmax(raw_rv, axis=-1)

    def sampled(_):
        x_rv = filter_logits(
            penalised_rv,
            params.temperature,
            params.top_k,
            params.top_p,
            params.suppress_v,
            filtered=params.filtered,
            min_p=params.min_p,
        )
        return jax.random.categorical(key, x_rv, axis=-1).astype(jnp.int32), jax.nn.log_softmax(x_rv, axis=-1)

    tokens_r, logp_rv = jax.lax.cond(params.greedy, greedy, sampled, None)
    return tokens_r, jnp.take_along_axis(logp_rv, tokens_r[:, None], axis=-1)[:, 0]
