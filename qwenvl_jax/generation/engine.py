"""Generation: host planning, a jitted prefill, and a jitted decode loop over a preallocated KV cache.

    out = qwenvl_jax.generate(model, processor_output, max_new_tokens=64, temperature=1.0, n=4, seed=0)
    out.tokens[i, : out.lengths[i]], out.logprobs[i], out.finish_reasons[i], out.prompt_index[i]

Static shapes, so that a handful of compiled programs serve every request:
- the prompt is LEFT-padded further to a length bucket (`prompt_buckets`, default 32, 64, ..., 512, then
  multiples of 512); raw processor output also gets its vision patches padded to a power-of-two budget
  (collate output already has static budgets);
- the number of prompts is padded to a batch bucket (`default_batch_bucket`: 1, 2, 4, 8, then multiples
  of 8; on a mesh, a multiple of its data x fsdp devices too) with all-padding rows, which emit nothing
  and are dropped from the output;
- the cache holds `round_up(prompt bucket + max_new_tokens, cache_multiple)` slots in the end, reached
  through a few spans (`cache.cache_spans`: powers of two above the prompt bucket), each with its own
  decode program, so that a step attends over at most twice the filled slots; the decode loop's token
  buffer is the free part of the full cache, and `max_new_tokens` itself is traced;
- sampling values (greedy or not, temperature, top-k, top-p, min-p, repetition penalty, stop ids,
  suppressed ids) are traced, so one decode program serves every sampling mode; the number of completions
  `n` is static (it sets rows). The repetition penalty's state, which ids each row holds so far, is an
  `(R, V)` bool array in the decode state, set from the prompt's valid ids in prefill and updated with
  every emitted token (a scatter of R elements per step); the penalty's `(R, V)` arithmetic runs only when
  it is on.

Positions (spec 3.3): prefill uses the host's M-RoPE positions (`get_rope_index`); a generated token fed
back at cache slot `S + t` gets `seen[r] + rope_deltas[r]` on all three axes, where `seen` counts the
row's valid cache slots before it (that is `cumsum(mask)[n] - 1` at its index `n`). `rope_deltas`
(`max(prompt position) + 1 - n_valid`) is carried explicitly in the decode state, never cached on a module.

The vision tower runs once, in prefill. `n` completions per prompt share that prefill: its keys and
values are repeated `n` times into the cache (rows `i*n .. i*n+n-1` belong to prompt `i`).

Decode moves the least it can per step: the KV cache is one buffer per layer, `(B, K, T, H)`, donated to
each jitted call and carried by its `while_loop`, so a step writes its new keys and values in place and
its attention reads the buffers as they lie; the decoder runs over per-layer copies of its weights made
once per generation (`TextModel.decode_layers`), which XLA reads without slicing a stacked array. See
`cache` and `model/text.py` for why, and docs/benchmarks.md for the bytes a step moves.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.generation.cache import (
    LAYER_CACHE_AXES,
    KVCache,
    cache_from_prefill,
    cache_shape,
    cache_spans,
    check_cache_fits,
    grow,
    layer_copy_bytes,
    memory_budget,
)
from qwenvl_jax.generation.sampling import SamplingParams, sample
from qwenvl_jax.model.vision import PIXEL_KEYS

# Times each jitted function was traced (a Python side effect runs only while tracing): a cheap proof
# that requests in one bucket reuse the compiled programs.
TRACE_COUNTS: collections.Counter = collections.Counter()


def _input_error(message: str) -> Exception:
    # The host pipeline's error type; imported here because `qwenvl_jax.processing` pulls in PIL.
    from qwenvl_jax.processing.errors import InputError

    return InputError(message)


# ------------------------------------------------------------------------------------------ outputs


@dataclasses.dataclass
class GenerationOutput:
    """Completions, one row per (prompt, sample): rows `i*n .. i*n+n-1` belong to prompt `i`.

    `tokens (R, max_new_tokens)` int32, `pad_token_id` after `lengths[r]` (which counts the stop token);
    `logprobs (R, max_new_tokens)` float32 log-probs of the sampled tokens under the sampling distribution
    (0 after the end); `finish_reasons[r]` "stop" (a stop token was emitted), "length", or "empty" for
    an all-padding prompt row (a `collate` filler row, which emits nothing); timings in
    seconds (the first call of a shape includes compilation), `tokens_per_s` = generated tokens /
    (prefill + decode time).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finish_reasons: list[str]
    logprobs: np.ndarray
    prompt_index: np.ndarray
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    prompt_len: int  # the prompt bucket S
    cache_len: int  # T

    @property
    def timing(self) -> dict[str, float]:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s, "tokens_per_s": self.tokens_per_s}

    def completion(self, row: int) -> np.ndarray:
        return self.tokens[row, : self.lengths[row]]


class StreamStep(NamedTuple):
    """One decode step of `generate_stream`: the token sampled for every row at step `step`.

    `emitted[r]` is False for rows that had already finished (their token is padding); `done[r]` says the
    row is finished after this step.
    """

    step: int
    tokens: np.ndarray  # (R,) int32
    logprobs: np.ndarray  # (R,) float32
    emitted: np.ndarray  # (R,) bool
    done: np.ndarray  # (R,) bool


# ------------------------------------------------------------------------------------ decode state


class DecodeState(NamedTuple):
    cache: KVCache
    tokens: jax.Array  # (R, N) int32 sampled tokens, pad after the end
    logprobs: jax.Array  # (R, N) float32
    last: jax.Array  # (R,) int32 the token to feed next
    seen: jax.Array  # (R,) int32 valid cache slots so far (prompt + fed tokens)
    rope_deltas: jax.Array  # (R,) int32, M-RoPE offset of generated tokens (spec 3.3)
    lengths: jax.Array  # (R,) int32 tokens emitted, stop token included
    stopped: jax.Array  # (R,) bool a stop token was emitted
    done: jax.Array  # (R,) bool
    step: jax.Array  # () int32 tokens sampled so far
    presence: jax.Array  # (R, V) bool ids in the row so far (valid prompt ids + emitted tokens)


def row_keys(seed: int, rows: int, row_ids=None) -> jax.Array:
    """`(rows,)` keys: output row `r` draws with `fold_in(key(seed), row_ids[r])` (`generate`'s `seed` and
    `row_ids`, default `r`); rows past `row_ids` (the batch bucket's padding, which emits nothing) get
    the ids after them."""
    given = np.arange(0) if row_ids is None else np.asarray(row_ids)
    if (
        given.ndim != 1
        or given.size > rows
        or (given.size and (given.dtype.kind not in "iu" or given.min() < 0))
    ):
        raise ValueError(
            f"row_ids must be one integer >= 0 per completion row (at most {rows}), got {row_ids!r}"
        )
    start = int(given.max()) + 1 if given.size else 0
    ids = np.concatenate([given, start + np.arange(rows - given.size)]).astype(np.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.asarray(ids))


def _sample_into(state: DecodeState, logits_rv, key, params: SamplingParams):
    """Sample token `step` for every row from `logits_rv` and record it (pad for finished rows)."""
    keys_r = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, state.step)
    tokens_r, logp_r = sample(keys_r, logits_rv, params, state.presence)
    active_r = ~state.done
    rows, vocab = state.presence.shape
    # Finished rows point out of range and are dropped: their padding is not part of the row.
    ids_r = jnp.where(active_r, tokens_r, vocab)
    presence = state.presence.at[jnp.arange(rows), ids_r].set(True, mode="drop")
    tokens_r = jnp.where(active_r, tokens_r, params.pad_id)
    logp_r = jnp.where(active_r, logp_r, 0.0)
    hit_r = active_r & (tokens_r[:, None] == params.stop_ids[None, :]).any(-1)
    step = state.step + 1
    return state._replace(
        tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, tokens_r[:, None], state.step, 1),
        logprobs=jax.lax.dynamic_update_slice_in_dim(state.logprobs, logp_r[:, None], state.step, 1),
        last=tokens_r,
        lengths=state.lengths + active_r.astype(jnp.int32),
        stopped=state.stopped | hit_r,
        done=state.done | hit_r | (step >= params.max_new_tokens),
        step=step,
        presence=presence,
    )


def _feed(model, layers, state: DecodeState) -> tuple[DecodeState, jax.Array]:
    """Run the last sampled tokens through the decoder at slot `cache.index`; next logits `(R, V)`."""
    cache = state.cache
    rows = state.last.shape[0]
    mask_rt = jax.lax.dynamic_update_slice_in_dim(cache.mask, jnp.ones((rows, 1), jnp.int32), cache.index, 1)
    pos_r = state.seen + state.rope_deltas  # = cumsum(mask)[slot] - 1 + rope_deltas
    logits_rv, k, v = model.decode_step(
        layers, state.last, jnp.broadcast_to(pos_r[None], (3, rows)), cache.k, cache.v, mask_rt, cache.index
    )
    cache = KVCache(k, v, mask_rt, cache.index + 1)
    return state._replace(cache=cache, seen=state.seen + 1), logits_rv


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "cache_len", "cache_sharding"))
def _prefill(graphdef, params, inputs, *, n, cache_len, cache_sharding=None):
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, params)
    logits_bv, k_lbskh, v_lbskh = model.prefill(**inputs)
    cache = cache_from_prefill(
        k_lbskh, v_lbskh, inputs["attention_mask"], n=n, length=cache_len, sharding=cache_sharding
    )
    # The repetition penalty's state: the prompt's valid ids (padding slots point out of range, dropped).
    ids_bs, mask_bs = inputs["input_ids"], inputs["attention_mask"].astype(bool)
    batch, vocab = logits_bv.shape
    presence_bv = (
        jnp.zeros((batch, vocab), bool)
        .at[jnp.arange(batch)[:, None], jnp.where(mask_bs, ids_bs, vocab)]
        .set(True, mode="drop")
    )
    if n > 1:
        logits_bv, presence_bv = jnp.repeat(logits_bv, n, axis=0), jnp.repeat(presence_bv, n, axis=0)
    return logits_bv, cache, presence_bv


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decoder_layers(graphdef, params):
    """The decoder's per-layer weights for decode (a copy, made once per generation)."""
    TRACE_COUNTS["decoder_layers"] += 1
    return nnx.merge(graphdef, params).text.decode_layers()


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _decode_loop(graphdef, params, layers, state, key, sampling):
    """Decode until every row is done (early exit) or the cache's current span is full."""
    TRACE_COUNTS["decode_loop"] += 1
    model = nnx.merge(graphdef, params)
    span = state.cache.length

    def body(s):
        s, logits = _feed(model, layers, s)
        return _sample_into(s, logits, key, sampling)

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.cache.index < span), body, state)


@functools.partial(jax.jit, donate_argnames=("state",))
def _first_step(state, logits_rv, key, sampling):
    TRACE_COUNTS["first_step"] += 1
    return _sample_into(state, logits_rv, key, sampling)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _next_step(graphdef, params, layers, state, key, sampling):
    TRACE_COUNTS["next_step"] += 1
    state, logits_rv = _feed(nnx.merge(graphdef, params), layers, state)
    return _sample_into(state, logits_rv, key, sampling)


# ------------------------------------------------------------------------------------ host planning


def default_bucket(length: int) -> int:
    """32, 64, ..., 512, then multiples of 512: at most 2x padding for short prompts, < 512 for long."""
    if length <= 512:
        return max(32, 1 << (max(length, 1) - 1).bit_length())
    return -(-length // 512) * 512


def default_batch_bucket(prompts: int) -> int:
    """1, 2, 4, 8, then multiples of 8: the number of prompt rows a request of `prompts` runs with."""
    if prompts <= 8:
        return 1 << (max(prompts, 1) - 1).bit_length()
    return _round_up(prompts, 8)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_rows(inputs: dict[str, np.ndarray], deltas_b: np.ndarray, rows: int):
    """`prepare_prompts` output with all-padding prompt rows appended up to `rows` (a batch bucket): mask
    0 everywhere, so they attend to nothing real, emit nothing, and no vision scatter slot points at them."""
    extra = rows - inputs["input_ids"].shape[0]
    if extra == 0:
        return inputs, deltas_b
    out = dict(inputs)
    for key in ("input_ids", "attention_mask"):
        out[key] = np.concatenate([inputs[key], np.zeros((extra, inputs[key].shape[1]), inputs[key].dtype)])
    pos_3bs = inputs["position_ids"]
    out["position_ids"] = np.concatenate([pos_3bs, np.zeros((3, extra, pos_3bs.shape[2]), pos_3bs.dtype)], 1)
    return out, np.concatenate([deltas_b, np.zeros(extra, deltas_b.dtype)])


def _left_pad(x: np.ndarray, extra: int, axis: int) -> np.ndarray:
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (extra, 0)
    return np.pad(x, widths)


def _pad_vision(out: dict, kind: str, budget: int, unit: int, seq: int) -> None:
    """Pad `host_inputs`' exact-size vision arrays to `budget` patch rows, the `VisionIndices` convention:
    padding rows sit at the end, map to themselves, rotary position 0, segment -1 (they never attend to a
    real row nor are attended by one); extra scatter slots point at `seq`, out of range, and are dropped."""
    pixels = out[PIXEL_KEYS[kind]]
    n = pixels.shape[0]
    if budget == n:
        return
    tail_p, tail_u = np.arange(n, budget), np.arange(n // unit, budget // unit)
    out[PIXEL_KEYS[kind]] = np.concatenate([pixels, np.zeros((budget - n, pixels.shape[1]), pixels.dtype)])
    out[f"{kind}_rope_pos"] = np.concatenate([out[f"{kind}_rope_pos"], np.zeros((budget - n, 2), np.int32)])
    out[f"{kind}_patch_perm"] = np.concatenate([out[f"{kind}_patch_perm"], tail_p]).astype(np.int32)
    for seg in ("window_seg", "full_seg"):
        out[f"{kind}_{seg}"] = np.concatenate([out[f"{kind}_{seg}"], np.full(budget - n, -1, np.int32)])
    out[f"{kind}_unit_unperm"] = np.concatenate([out[f"{kind}_unit_unperm"], tail_u]).astype(np.int32)
    extra_units = budget // unit - out[f"{kind}_scatter_b"].size
    out[f"{kind}_scatter_b"] = np.concatenate([out[f"{kind}_scatter_b"], np.zeros(extra_units, np.int32)])
    out[f"{kind}_scatter_s"] = np.concatenate([out[f"{kind}_scatter_s"], np.full(extra_units, seq, np.int32)])


def prepare_prompts(
    config, batch: Mapping[str, Any], prompt_len: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Host side: a left-padded batch (processor or `collate` output) -> the prefill arrays at `prompt_len`
    tokens (more left padding), and `rope_deltas (B,)`."""
    from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS, host_inputs, is_collated
    from qwenvl_jax.processing.positions import get_rope_index

    ids_bs = np.asarray(batch["input_ids"])
    mask_bs = np.asarray(batch.get("attention_mask", np.ones_like(ids_bs))).astype(np.int32)
    extra = prompt_len - ids_bs.shape[1]
    if is_collated(batch):
        out = {k: np.asarray(batch[k]) for k in CORE_KEYS if batch.get(k) is not None}
        pos = out["position_ids"]
        pos = pos[1:] if pos.ndim == 3 and pos.shape[0] == 4 else pos
        pos = np.broadcast_to(pos[None], (3, *pos.shape)) if pos.ndim == 2 else pos
        out["position_ids"] = _left_pad(pos.astype(np.int32), extra, 2)
        out["input_ids"] = _left_pad(ids_bs.astype(np.int32), extra, 1)
        out["attention_mask"] = _left_pad(mask_bs, extra, 1)
        for kind in ("image", "video"):
            if f"{kind}_scatter_s" in out:  # unused slots point at the old length, now prompt_len
                out[f"{kind}_scatter_s"] = (out[f"{kind}_scatter_s"] + extra).astype(np.int32)
    else:
        vc = config.vision
        raw = {k: v for k, v in batch.items() if v is not None}
        raw["input_ids"] = _left_pad(ids_bs, extra, 1)
        raw["attention_mask"] = _left_pad(mask_bs, extra, 1)
        if "mm_token_type_ids" in raw:
            raw["mm_token_type_ids"] = _left_pad(np.asarray(raw["mm_token_type_ids"]), extra, 1)
        has = {
            k: raw.get(PIXEL_KEYS[k]) is not None and raw.get(f"{k}_grid_thw") is not None for k in PIXEL_KEYS
        }
        pos, _ = get_rope_index(
            raw["input_ids"],
            raw.get("mm_token_type_ids"),
            raw["image_grid_thw"] if has["image"] else None,
            raw["video_grid_thw"] if has["video"] else None,
            raw.get("second_per_grid_ts") if has["video"] else None,
            raw["attention_mask"],
            spatial_merge_size=vc.spatial_merge_size,
            tokens_per_second=vc.tokens_per_second,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
        )
        raw["position_ids"] = pos
        out = host_inputs(config, **raw)
        unit = vc.spatial_merge_size**2
        for kind in PIXEL_KEYS:
            if PIXEL_KEYS[kind] in out:
                n = out[PIXEL_KEYS[kind]].shape[0]
                _pad_vision(out, kind, _round_up(max(64, 1 << (n - 1).bit_length()), unit), unit, prompt_len)
    # rope_deltas = max(position) + 1 - n_valid per row (spec 3.2); 0 for a row with no valid token.
    mask_bs = out["attention_mask"].astype(bool)
    n_valid = mask_bs.sum(-1)
    top = np.where(mask_bs[None], out["position_ids"], np.iinfo(np.int32).min).max(axis=(0, 2))
    deltas = np.where(n_valid > 0, top.astype(np.int64) + 1 - n_valid, 0).astype(np.int32)
    return out, deltas


@dataclasses.dataclass
class _Plan:
    inputs: dict[str, np.ndarray]
    prompt_len: int
    cache_len: int
    spans: tuple[int, ...]  # the cache lengths decode steps through, the last = cache_len
    prompts: int  # prompts of the request
    batch: int  # prompt rows run: `prompts` padded to a batch bucket
    n: int
    max_new_tokens: int
    sampling: SamplingParams
    key: jax.Array  # (R,) one key per output row (`row_keys`)
    rope_deltas: np.ndarray  # (B,)
    empty_rows: np.ndarray  # (B,) bool: all-padding rows (collate filler), which emit nothing
    cache_sharding: Any
    mesh: Any
    rules: Any


def _as_int_tuple(ids, name: str) -> tuple[int, ...]:
    if ids is None:
        return ()
    ids = [ids] if isinstance(ids, (int, np.integer)) else list(ids)
    if not all(isinstance(i, (int, np.integer)) for i in ids):
        raise ValueError(f"{name} must be integers, got {ids!r}")
    return tuple(int(i) for i in ids)


def _plan(
    model,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    n: int,
    seed: int,
    stop_token_ids,
    suppress_token_ids,
    pad_token_id,
    max_length,
    prompt_buckets,
    cache_multiple: int,
    mesh,
    rules,
    max_cache_bytes,
    min_p: float,
    repetition_penalty: float,
    row_ids,
) -> _Plan:
    config = model.config
    vocab = config.text.vocab_size
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (completions per prompt) must be an integer >= 1, got {n!r}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1) (0 = off), got {min_p!r}")
    if not (np.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be finite and > 0 (1 = off), got {repetition_penalty!r}")
    if cache_multiple < 1:
        raise ValueError(f"cache_multiple must be >= 1, got {cache_multiple}")
    stop = _as_int_tuple(config.eos_token_id if stop_token_ids is None else stop_token_ids, "stop_token_ids")
    suppress = _as_int_tuple(
        (config.image_token_id, config.video_token_id) if suppress_token_ids is None else suppress_token_ids,
        "suppress_token_ids",
    )
    bad = [i for i in (*stop, *suppress) if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary [0, {vocab})")
    pad_id = config.bos_token_id if pad_token_id is None else int(pad_token_id)  # Qwen: <|endoftext|>

    if "input_ids" not in batch:
        raise _input_error("the batch has no input_ids")
    ids_bs = np.asarray(batch["input_ids"])
    if ids_bs.ndim == 1:
        batch = {**batch, "input_ids": ids_bs[None]}
        if batch.get("attention_mask") is not None:
            batch["attention_mask"] = np.asarray(batch["attention_mask"]).reshape(1, -1)
        ids_bs = ids_bs[None]
    if ids_bs.ndim != 2 or 0 in ids_bs.shape:
        raise _input_error(f"input_ids must be (batch, seq) with batch, seq >= 1, got shape {ids_bs.shape}")
    rows_b, seq = ids_bs.shape
    mask_bs = np.asarray(batch.get("attention_mask", np.ones_like(ids_bs))).astype(bool)
    n_valid = mask_bs.sum(-1)
    left = np.arange(seq)[None, :] >= (seq - n_valid)[:, None]
    if (mask_bs != left).any():
        rows = np.flatnonzero((mask_bs != left).any(-1)).tolist()
        raise _input_error(
            f"generation needs LEFT-padded prompts (padding_side='left'); rows {rows} are padded on the right "
            "or have holes"
        )
    max_length = int(config.text.max_position_embeddings if max_length is None else max_length)
    longest = int(n_valid.max())
    if longest >= max_length:
        raise _input_error(f"a prompt of {longest} tokens does not fit max_length={max_length}")
    if longest + max_new_tokens > max_length:
        raise _input_error(
            f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds max_length={max_length}; "
            f"at most {max_length - longest} new tokens fit"
        )
    if prompt_buckets is None:
        prompt_len = default_bucket(seq)
    else:
        fits = [b for b in sorted(prompt_buckets) if b >= seq]
        if not fits:
            raise _input_error(
                f"a prompt batch of {seq} tokens exceeds the largest prompt bucket {max(prompt_buckets)}"
            )
        prompt_len = fits[0]
    cache_len = _round_up(prompt_len + max_new_tokens, cache_multiple)
    batch_rows = default_batch_bucket(rows_b)
    if mesh is not None:  # the prompt rows split over the batch axes: pad to a multiple of them
        batch_rows = _round_up(batch_rows, mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
    rows = batch_rows * n

    devices = None if mesh is None else mesh.devices.flat
    budget, source = memory_budget(max_cache_bytes, devices)
    check_cache_fits(
        config,
        batch=rows,
        length=cache_len,
        prompt_len=prompt_len,
        budget=budget,
        source=source,
        prefill_rows=batch_rows,
        resident_bytes=layer_copy_bytes(model),
    )

    inputs, deltas_b = _pad_rows(*prepare_prompts(config, batch, prompt_len), batch_rows)
    cache_sharding = None
    if mesh is not None:
        from qwenvl_jax import sharding as shd  # imported only for a mesh: single-device use needs none of it

        rules = shd.as_rules(shd.DEFAULT_RULES if rules is None else rules)
        # The cache's "kv_heads" dim counts heads (2 in 3B), while the parameters' counts head columns
        # (nkv * head_dim), so a tensor axis that splits the weights may not divide the cache's heads. Then
        # that dim is replicated across the axis (recorded and logged by the rules), never dropped silently.
        cache_rules = dataclasses.replace(rules, indivisible="replicate")
        cache_sharding = shd.named_sharding(
            mesh, cache_rules, LAYER_CACHE_AXES, cache_shape(config, rows, cache_len)[1:]
        )
    greedy = temperature == 0
    sampling = SamplingParams(
        greedy=jnp.asarray(greedy),
        filtered=jnp.asarray(not greedy and (top_k > 0 or top_p < 1)),
        temperature=jnp.float32(temperature if not greedy else 1.0),
        top_k=jnp.int32(top_k),
        top_p=jnp.float32(top_p),
        suppress_v=jnp.zeros(vocab, bool).at[jnp.asarray(suppress, jnp.int32)].set(True)
        if suppress
        else jnp.zeros(vocab, bool),
        # Padded to a multiple of 8 slots (-1 never matches) so that the count does not select a program.
        stop_ids=jnp.asarray(list(stop) + [-1] * (_round_up(max(len(stop), 1), 8) - len(stop)), jnp.int32),
        pad_id=jnp.int32(pad_id),
        max_new_tokens=jnp.int32(max_new_tokens),
        min_p=jnp.float32(min_p),
        repetition_penalty=jnp.float32(repetition_penalty),
    )
    return _Plan(
        inputs=inputs,
        prompt_len=prompt_len,
        cache_len=cache_len,
        spans=cache_spans(prompt_len, cache_len),
        prompts=rows_b,
        batch=batch_rows,
        n=n,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        key=row_keys(seed, rows, row_ids),
        rope_deltas=deltas_b,
        empty_rows=inputs["attention_mask"].sum(-1) == 0,
        cache_sharding=cache_sharding,
        mesh=mesh,
        rules=rules,
    )


def _start(model, plan: _Plan) -> tuple[Any, Any, jax.Array, DecodeState, float]:
    """Prefill, then the initial decode state. Returns (graphdef, params, logits, state, prefill seconds)."""
    graphdef, params = nnx.split(model)
    if plan.mesh is None:
        inputs = {k: jnp.asarray(v) for k, v in plan.inputs.items()}
    else:  # batch axis on the "batch" rule, vision inputs replicated
        from qwenvl_jax import sharding as shd

        inputs = shd.shard_batch(plan.inputs, plan.mesh, plan.rules)
    start = time.perf_counter()
    logits_rv, cache, presence_rv = _prefill(
        graphdef, params, inputs, n=plan.n, cache_len=plan.spans[0], cache_sharding=plan.cache_sharding
    )
    jax.block_until_ready(logits_rv)
    prefill_s = time.perf_counter() - start
    rows, free = plan.batch * plan.n, plan.cache_len - plan.prompt_len
    n_valid = plan.inputs["attention_mask"].astype(bool).sum(-1)
    state = DecodeState(
        cache=cache,
        tokens=jnp.full((rows, free), plan.sampling.pad_id, jnp.int32),
        logprobs=jnp.zeros((rows, free), jnp.float32),
        last=jnp.zeros(rows, jnp.int32),
        seen=jnp.asarray(np.repeat(n_valid, plan.n), jnp.int32),
        rope_deltas=jnp.asarray(np.repeat(plan.rope_deltas, plan.n), jnp.int32),
        lengths=jnp.zeros(rows, jnp.int32),
        stopped=jnp.zeros(rows, bool),
        done=jnp.asarray(np.repeat(plan.empty_rows, plan.n)),  # filler and padding rows emit nothing
        step=jnp.int32(0),
        presence=presence_rv,
    )
    return graphdef, params, logits_rv, state, prefill_s


def _next_span(plan: _Plan, state: DecodeState) -> DecodeState:
    """`state` with its cache grown to the span after its current one (called when that one is full)."""
    span = next(s for s in plan.spans if s > state.cache.length)
    return state._replace(cache=grow(state.cache, span, sharding=plan.cache_sharding))


def _finish(plan: _Plan, state: DecodeState, prefill_s: float, decode_s: float) -> GenerationOutput:
    rows, m = plan.prompts * plan.n, plan.max_new_tokens  # the batch bucket's padding rows are dropped
    tokens, logprobs, lengths, stopped = jax.device_get(
        (state.tokens[:rows, :m], state.logprobs[:rows, :m], state.lengths[:rows], state.stopped[:rows])
    )
    total = float(np.sum(lengths))
    return GenerationOutput(
        tokens=np.asarray(tokens, np.int32),
        lengths=np.asarray(lengths, np.int32),
        finish_reasons=[
            "stop" if s else ("empty" if e else "length")
            for s, e in zip(
                np.asarray(stopped).tolist(), np.repeat(plan.empty_rows, plan.n)[:rows].tolist(), strict=True
            )
        ],
        logprobs=np.asarray(logprobs, np.float32),
        prompt_index=np.repeat(np.arange(plan.prompts, dtype=np.int32), plan.n),
        prefill_s=prefill_s,
        decode_s=decode_s,
        tokens_per_s=total / max(prefill_s + decode_s, 1e-9),
        prompt_len=plan.prompt_len,
        cache_len=plan.cache_len,
    )


_GENERATE_DOC = """
    `batch`: LEFT-padded processor output (`processor(text=..., images=..., padding=True,
    padding_side="left")`, `processor.encode_chat(..., add_generation_prompt=True, padding_side="left")`)
    or `collate` output with `padding_side="left"`.

    Sampling (transformers' order: repetition penalty, suppression, temperature, top-k, top-p, min-p):
    `temperature` 0 is greedy; `top_k` 0, `top_p` 1 and `min_p` 0 are off. `repetition_penalty` (1 =
    off; greedy decoding applies it too) divides the positive logits and multiplies the negative ones of
    every id already in the row (the prompt's valid ids and the tokens generated so far). `n` completions
    per prompt share one prefill. `seed` fixes the draws: output row `r` (completion `r % n` of prompt
    `r // n`) draws with its own key, `fold_in(key(seed), row_ids[r])` (default `r`), folded with the
    step, so a row's tokens do not depend on the batch bucket or on the other rows, and a request cut
    into parts (one per host, each passing its rows' ids in the whole) draws what the whole would.

    A row stops after emitting any of `stop_token_ids` (default: every id of `model.config.eos_token_id`,
    which `load` takes from config.json and generation_config.json; a given list replaces it, `()`
    disables stopping) or after `max_new_tokens`; later positions hold `pad_token_id` (default: the
    config's `<|endoftext|>`, Qwen's pad). `suppress_token_ids` are never emitted (default: the image and
    video placeholders; `()`: none).

    Shapes: prompts are left-padded to a bucket (`prompt_buckets`, default `default_bucket`), their number
    to a batch bucket (`default_batch_bucket`; the padding rows are not returned), and the cache holds
    `round_up(bucket + max_new_tokens, cache_multiple)` slots in the end; the prompt (valid tokens) plus
    `max_new_tokens` must fit `max_length` (default `max_position_embeddings`). The cache size is checked
    before allocation against `max_cache_bytes` (default: free device memory, or available host memory
    on CPU); a request that does not fit raises `CacheMemoryError` saying what would. Decode also holds
    one copy of the decoder's weights (`TextModel.decode_layers`) while it runs.

    `mesh`, `rules` (default `sharding.DEFAULT_RULES`): place the prompt arrays and the KV cache (each
    layer's buffers on logical axes `LAYER_CACHE_AXES`) on the mesh; the model itself must already be
    sharded (`sharding.shard_model`).
"""


def generate(
    model,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    stop_token_ids: Sequence[int] | int | None = None,
    suppress_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    max_length: int | None = None,
    prompt_buckets: Sequence[int] | None = None,
    cache_multiple: int = 128,
    mesh=None,
    rules=None,
    max_cache_bytes: int | None = None,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    row_ids: Sequence[int] | None = None,
) -> GenerationOutput:
    plan = _plan(model, batch, **_options(locals()))
    graphdef, params, logits_rv, state, prefill_s = _start(model, plan)
    start = time.perf_counter()
    layers = _decoder_layers(graphdef, params)
    state = _first_step(state, logits_rv, plan.key, plan.sampling)
    while True:  # one jitted while_loop per span, until every row is done
        state = _decode_loop(graphdef, params, layers, state, plan.key, plan.sampling)
        if state.cache.length == plan.cache_len or bool(np.all(jax.device_get(state.done))):
            break
        state = _next_span(plan, state)
    jax.block_until_ready(state.tokens)
    return _finish(plan, state, prefill_s, time.perf_counter() - start)


def generate_stream(
    model,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    stop_token_ids: Sequence[int] | int | None = None,
    suppress_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    max_length: int | None = None,
    prompt_buckets: Sequence[int] | None = None,
    cache_multiple: int = 128,
    mesh=None,
    rules=None,
    max_cache_bytes: int | None = None,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    row_ids: Sequence[int] | None = None,
) -> Iterator[StreamStep]:
    plan = _plan(model, batch, **_options(locals()))
    graphdef, params, logits_rv, state, prefill_s = _start(model, plan)
    start = time.perf_counter()
    layers = _decoder_layers(graphdef, params)
    state = _first_step(state, logits_rv, plan.key, plan.sampling)
    rows = plan.prompts * plan.n  # the batch bucket's padding rows are not streamed
    lengths = np.zeros(rows, np.int32)
    while True:
        step = int(state.step) - 1
        tokens, logprobs, new_lengths, done, index = jax.device_get(
            (state.tokens[:, step], state.logprobs[:, step], state.lengths, state.done, state.cache.index)
        )
        yield StreamStep(step, tokens[:rows], logprobs[:rows], new_lengths[:rows] > lengths, done[:rows])
        lengths = new_lengths[:rows]
        if done.all():
            break
        if index == state.cache.length:
            state = _next_span(plan, state)
        state = _next_step(graphdef, params, layers, state, plan.key, plan.sampling)
    return _finish(plan, state, prefill_s, time.perf_counter() - start)


def _options(scope: dict) -> dict:
    return {k: v for k, v in scope.items() if k not in ("model", "batch")}


generate.__doc__ = (
    "Complete every prompt of `batch` with a jitted prefill and a jitted `while_loop` decode (early exit\n"
    "    once every row has finished); returns a `GenerationOutput`.\n" + _GENERATE_DOC
)
generate_stream.__doc__ = (
    "`generate`, one `StreamStep` per decode step (a Python loop over a jitted step), for streaming\n"
    "    text. The same seed draws the same tokens as `generate`. The generator's return value (`out = yield\n"
    "    from generate_stream(...)`) is the `GenerationOutput`.\n" + _GENERATE_DOC
)
