"""The one attention entry point, with interchangeable backends.

Masking is expressed the way fused kernels want it, not as a dense additive mask:
- `q_segment_ids (B, T)` / `kv_segment_ids (B, S)`: a query attends to a key only where the ids are
  equal. This covers the vision tower's windows and frames (host-computed segment ids, padding rows -1),
  packed rows (segment ids 1, 2, ...), left-padded prompts and the decode cache's slot validity.
- `q_lengths (B,)` / `kv_lengths (B,)`: row b's first `lengths[b]` tokens are real and the rest is right
  padding (unpacked training rows). Real queries see real keys only; padding queries output zeros
  (cuDNN's rule, which every backend follows here). Which of the two a call passes is a Python-level
  choice, hence static under jit: a caller that knows its rows are unpacked and right-padded passes
  `attention_mask.sum(-1)` as lengths, and cuDNN then needs no mask at all.
- `causal`: a query at index t attends to keys at index <= t.

A segment-equality mask always lets a row see itself (and a causal row its own diagonal), so no softmax
row is ever empty and padding rows stay finite; padding rows never see real rows, nor real rows them.

Backends:
- "xla": the reference einsum. Logits accumulate in float32 (`preferred_element_type`), softmax in
  float32, probabilities cast to the value dtype before the second einsum: HF's eager path, except
  that HF rounds the logits to bf16 before its fp32 softmax in a bf16 model (SDPA and flash, HF's
  defaults, keep them in fp32 as we do).
- "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")` (bf16/fp16 inputs only).
  Causality is `is_causal`. Lengths become `query_seq_lengths` / `key_value_seq_lengths` with no mask:
  cuDNN's PADDING_CAUSAL fused kernel. Segment ids become a boolean mask, which jax's cuDNN wrapper turns
  into an additive bias `(B, 1, T, S)` in the input dtype that every head reads, and whose gradient the
  backward kernel always computes (the wrapper exports dbias unconditionally) and nothing reads: the
  mask itself is bool, so no gradient reaches it, but the dbias work and its `(B, 1, T, S)` buffer are
  paid on every backward pass. Hence lengths wherever the rows allow them; packed or left-padded rows
  and the vision tower's segments keep the mask.
- "dpa_xla": the same `jax.nn.dot_product_attention` call with `implementation="xla"`, so CPU tests
  prove the arguments of the cuDNN call (only the implementation string differs).
- "splash": TPU splash attention (`qwenvl_jax.model.splash`), a Pallas/Mosaic kernel fed the segment
  ids (lengths become segment ids) and a causal or full block mask, never a dense mask. Its query blocks
  are 128 rows at least, so a call with fewer than 128 queries (a decode step, a 64-row window band)
  uses the reference einsum instead of padding 1 or 64 queries to 128.
- "splash_interpret": the same kernel run by the Pallas interpreter, on any platform (CPU tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenvl_jax.config import ATTENTION_BACKENDS as BACKENDS
from qwenvl_jax.model.splash import LANES, splash_on_mesh


def segment_mask(
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    q_len: int,
    kv_len: int,
) -> jax.Array | None:
    """`(B|1, T, S)` bool, True where a query may attend to a key; None when nothing is masked."""
    mask = None
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
        mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        tri = jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :]
        mask = tri[None] if mask is None else mask & tri[None]
    return mask


def masked_probs(logits_f32: jax.Array, mask: jax.Array | None, *, scale: float, dtype) -> jax.Array:
    """The softmax every XLA attention path shares (prefill, training, decode): of the float32 `logits
    x scale` over the last axis where `mask` (broadcast) holds, cast to `dtype` (the values') for the
    second matmul. Masked keys get a large finite negative (jax.nn's choice, -0.7 x finfo.max) rather
    than -inf: a fully masked row would then give NaN; segment masks never make one, but it stays finite
    if a caller does."""
    logits_f32 = logits_f32 * jnp.float32(scale)
    if mask is not None:
        logits_f32 = jnp.where(mask, logits_f32, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    return jax.nn.softmax(logits_f32, axis=-1).astype(dtype)


def _xla_reference(q_btnh, k_bskh, v_bskh, mask_bts, scale):
    batch, q_len, heads, head_dim = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    # GQA: query head h = k * G + g reads kv head k = h // G, the order of HF's `repeat_kv`.
    q_btkgh = q_btnh.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    mask = None if mask_bts is None else mask_bts[:, None, None]
    probs_bkgts = masked_probs(logits_bkgts, mask, scale=scale, dtype=v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(batch, q_len, heads, head_dim)


def length_segments(
    q_lengths: jax.Array | None, kv_lengths: jax.Array | None, *, batch: int, q_len: int, kv_len: int
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Right-padding lengths as segment ids (real 1, padding 0) `(B, T)`, `(B, S)`, plus the real-query
    mask `(B, T)` whose complement `attention` zeroes (None when every query is real)."""

    def real(lengths, n):
        if lengths is None:
            return jnp.ones((batch, n), bool)
        return jnp.arange(n)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]

    q_real, kv_real = real(q_lengths, q_len), real(kv_lengths, kv_len)
    return q_real.astype(jnp.int32), kv_real.astype(jnp.int32), None if q_lengths is None else q_real


def attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_lengths: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "xla",
) -> jax.Array:
    """Softmax attention `(B, T, N, H)` from q `(B, T, N, H)` and k, v `(B, S, K, H)` with N % K == 0.

    `scale` defaults to `H ** -0.5`. Either segment ids, int arrays `(B, T)` and `(B, S)`, or right-padding
    lengths `(B,)` (either or both sides), not both kinds; see the module docstring for the masking rules
    and the backends. The output has the dtype of `v`.
    """
    batch, q_len, heads, head_dim = q_btnh.shape
    kv_len, kv_heads = k_bskh.shape[1], k_bskh.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    has_lengths = q_lengths is not None or kv_lengths is not None
    if has_lengths and (q_segment_ids is not None or kv_segment_ids is not None):
        raise ValueError("pass segment ids or lengths, not both")
    scale = head_dim**-0.5 if scale is None else float(scale)
    if backend in ("cudnn", "dpa_xla"):
        # Causality goes through `is_causal` (cuDNN then skips the masked blocks). Lengths go through
        # cuDNN's padding mask type (no mask tensor); only segments are a mask.
        mask = segment_mask(q_segment_ids, kv_segment_ids, causal=False, q_len=q_len, kv_len=kv_len)
        return jax.nn.dot_product_attention(
            q_btnh,
            k_bskh,
            v_bskh,
            mask=None if mask is None else mask[:, None],  # (B, 1, T, S): broadcast over heads
            scale=scale,
            is_causal=causal,
            query_seq_lengths=None if q_lengths is None else jnp.asarray(q_lengths, jnp.int32),
            key_value_seq_lengths=None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32),
            implementation="cudnn" if backend == "cudnn" else "xla",
        )
    q_real = None
    if has_lengths:
        q_segment_ids, kv_segment_ids, q_real = length_segments(
            q_lengths, kv_lengths, batch=batch, q_len=q_len, kv_len=kv_len
        )
    if backend in ("splash", "splash_interpret") and q_len >= LANES:
        if (q_segment_ids is None) != (kv_segment_ids is None):
            raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
        out_btnh = splash_on_mesh(
            q_btnh,
            k_bskh,
            v_bskh,
            q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids,
            causal=causal,
            scale=scale,
            interpret=backend == "splash_interpret",
        )
    else:  # "xla", and splash's short query blocks
        mask = segment_mask(q_segment_ids, kv_segment_ids, causal=causal, q_len=q_len, kv_len=kv_len)
        out_btnh = _xla_reference(q_btnh, k_bskh, v_bskh, mask, scale)
    if q_real is not None:  # padding queries give zeros, as cuDNN's padding mask does
        out_btnh = jnp.where(q_real[:, :, None, None], out_btnh, jnp.zeros((), out_btnh.dtype))
    return out_btnh
