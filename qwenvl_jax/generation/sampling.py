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

Top-k and top-p find their cut among the `NUCLEUS_CANDIDATES` largest logits (`lax.top_k`) and sort the
whole vocabulary only when a row's cut is not among them (`_candidate_cut` says why the kept set is the
sorted definition's).

Log-probs are those of the distribution the token was drawn from, `log_softmax(processed logits)` (steps
1-6), the "old log-probs" of GRPO/PPO at this temperature. Greedy decoding (temperature 0) takes the
argmax of the penalised, suppressed logits (steps 1-2; the repetition penalty is a logits processor, not
a warper, so HF applies it to greedy search too) and reports `log_softmax(raw logits)`, the model's own
log-prob of the token. The engine draws each row with its own key, folded per step (`fold_in(row key,
step)`), so the streaming and the looped paths draw identically.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    """Traced sampling state (a pytree): changing any value, the mode included, does not recompile."""

    greedy: jax.Array  # () bool, temperature == 0
    filtered: jax.Array  # () bool, top-k or top-p is on
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
    else:  # traced: one program serves every mode; only the taken branch runs (nothing is ranked when off)
        x_rv = jax.lax.cond(filtered, lambda x: _top_k_top_p(x, top_k, top_p), lambda x: x, x_rv)
    if isinstance(min_p, (int, float)):
        return _min_p(x_rv, min_p) if min_p > 0 else x_rv
    return jax.lax.cond(min_p > 0, lambda x: _min_p(x, min_p), lambda x: x, x_rv)


# How many of the largest logits the top-k/top-p cut is looked for in before the vocabulary is sorted:
# a nucleus is almost always that small, and a partial top-k of 256 out of 152k costs far less than the
# sort. When it is not (or top-k asks for more), the exact sort runs instead.
NUCLEUS_CANDIDATES = 256


def _top_k_top_p(x_rv, top_k, top_p):
    """`_top_k_top_p_sorted` without the sort of the vocabulary when the cut lies among the
    `NUCLEUS_CANDIDATES` largest logits of every row (`_candidate_cut`); otherwise, through `lax.cond`,
    the sort itself (for the whole batch; only the taken branch runs)."""
    vocab = x_rv.shape[-1]
    if vocab <= NUCLEUS_CANDIDATES:
        return _top_k_top_p_sorted(x_rv, top_k, top_p)
    cut_r1, found_r = _candidate_cut(x_rv, top_k, top_p, NUCLEUS_CANDIDATES)
    return jax.lax.cond(
        jnp.all(found_r),
        lambda x: jnp.where(x >= cut_r1, x, -jnp.inf),
        lambda x: _top_k_top_p_sorted(x, top_k, top_p),
        x_rv,
    )


def _candidate_cut(x_rv, top_k, top_p, candidates: int):
    """(cut `(R, 1)`, found `(R,)`): the smallest logit `_top_k_top_p_sorted` keeps, computed from the
    `candidates` largest logits of each row (`lax.top_k`, no sort), and whether they determine it.

    The candidates are the first `candidates` entries of the sorted row (tied values may come in another
    order, which changes no value below), so its top-k threshold, probabilities, mass before each entry
    and cut are those of the sorted computation wherever they fall among the candidates. The softmax
    normaliser is summed over the whole row, as there; only its summation order differs (a float32
    rounding of the normaliser). The candidates determine the cut when one of them is dropped by top-p
    (mass before only grows along the sorted row, so every later entry is dropped too) or is -inf (so is
    every later entry), and when top-k's k-th largest logit is among them (or top-k keeps everything)."""
    vocab = x_rv.shape[-1]
    top_rc = jax.lax.top_k(x_rv, candidates)[0]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_r = jax.lax.dynamic_index_in_dim(top_rc, jnp.minimum(k, candidates) - 1, axis=-1, keepdims=False)
    kth_r1 = jnp.where(k >= vocab, -jnp.inf, kth_r)[:, None]  # k = vocab: every logit is >= the k-th
    top_rc = jnp.where(top_rc >= kth_r1, top_rc, -jnp.inf)
    max_r1 = top_rc[:, :1]  # the largest logit always survives top-k
    z_r1 = jnp.sum(jnp.where(x_rv >= kth_r1, jnp.exp(x_rv - max_r1), 0.0), axis=-1, keepdims=True)
    probs_rc = jnp.exp(top_rc - max_r1) / z_r1
    mass_before_rc = jnp.cumsum(probs_rc, axis=-1) - probs_rc
    keep_rc = (mass_before_rc < top_p) | (jnp.arange(candidates) == 0)[None, :]
    finite_rc = jnp.isfinite(top_rc)
    cut_r1 = jnp.min(jnp.where(keep_rc & finite_rc, top_rc, jnp.inf), axis=-1, keepdims=True)
    found_r = jnp.any(~keep_rc | ~finite_rc, axis=-1) & ((k <= candidates) | (k >= vocab))
    return cut_r1, found_r


def _top_k_top_p_sorted(x_rv, top_k, top_p):
    """Top-k then top-p over the sorted vocabulary: the definition `_top_k_top_p` reproduces."""
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
    """(tokens `(R,)` int32, their log-probs `(R,)` float32) from float32 logits `(R, V)`, drawn with
    `key` (one key, or `(R,)` keys: one per row).

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
        if jnp.ndim(key) == 0:  # one key for the whole batch
            tokens_r = jax.random.categorical(key, x_rv, axis=-1)
        else:  # one key per row: a row's draw does not depend on the others
            tokens_r = jax.vmap(lambda k, x: jax.random.categorical(k, x, axis=-1))(key, x_rv)
        return tokens_r.astype(jnp.int32), jax.nn.log_softmax(x_rv, axis=-1)

    tokens_r, logp_rv = jax.lax.cond(params.greedy, greedy, sampled, None)
    return tokens_r, jnp.take_along_axis(logp_rv, tokens_r[:, None], axis=-1)[:, 0]
