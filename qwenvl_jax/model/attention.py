"""The one attention entry point, with interchangeable backends.

Masking is expressed the way fused kernels want it, not as a dense additive mask:
- `q_segment_ids (B, T)` / `kv_segment_ids (B, S)`: a query attends to a key only where the ids are
  equal. This covers the vision tower's windows and frames (host-computed segment ids, padding rows -1)
  and the decoder's key padding (segment id = `attention_mask`, so padding is segment 0).
- `causal`: a query at index t attends to keys at index <= t.
These are exactly the inputs of TPU splash attention (`SegmentIds(q, kv)` plus a `CausalMask`) and of
other segment-aware flash kernels, so a Pallas backend can be added here without touching callers.

A segment-equality mask always lets a row see itself (and a causal row its own diagonal), so no softmax
row is ever empty and padding rows stay finite; padding rows never see real rows, nor real rows them.

Backends:
- "xla": the reference einsum. Logits accumulate in float32 (`preferred_element_type`), softmax in
  float32, probabilities cast to the value dtype before the second einsum: HF's eager path, except
  that HF rounds the logits to bf16 before its fp32 softmax in a bf16 model (SDPA and flash, HF's
  defaults, keep them in fp32 as we do).
- "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")` with the boolean mask built from
  the segment ids and `is_causal`. cuDNN needs bf16/fp16 inputs, and turns a mask into a dense
  `(B, 1, T, S)` bias, so for the vision tower's long full-attention frames a packed-offsets kernel
  would be leaner; that is a later optimisation, not a numerical difference.
- "dpa_xla": the same `jax.nn.dot_product_attention` call with `implementation="xla"`, so CPU tests
  prove the arguments of the cuDNN call (only the implementation string differs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "cudnn", "dpa_xla")


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


def _xla_reference(q_btnh, k_bskh, v_bskh, mask_bts, scale):
    batch, q_len, heads, head_dim = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    # GQA: query head h = k * G + g reads kv head k = h // G, the order of HF's `repeat_kv`.
    q_btkgh = q_btnh.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    logits_bkgts = logits_bkgts * jnp.float32(scale)
    if mask_bts is not None:
        # A large finite negative (jax.nn's choice, -0.7 * finfo.max) rather than -inf: fully masked rows
        # would then give NaN; they cannot occur with segment masks, but stay finite if a caller makes one.
        big_neg = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)
        logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts, big_neg)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(batch, q_len, heads, head_dim)


def attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "xla",
) -> jax.Array:
    """Softmax attention `(B, T, N, H)` from q `(B, T, N, H)` and k, v `(B, S, K, H)` with N % K == 0.

    `scale` defaults to `H ** -0.5`. Segment ids are int arrays `(B, T)` and `(B, S)`; see the module
    docstring for the masking rules and the backends. The output has the dtype of `v`.
    """
    _, q_len, heads, head_dim = q_btnh.shape
    kv_len, kv_heads = k_bskh.shape[1], k_bskh.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    scale = head_dim**-0.5 if scale is None else float(scale)
    if backend == "xla":
        mask = segment_mask(q_segment_ids, kv_segment_ids, causal=causal, q_len=q_len, kv_len=kv_len)
        return _xla_reference(q_btnh, k_bskh, v_bskh, mask, scale)
    if backend in ("cudnn", "dpa_xla"):
        # Causality goes through `is_causal` (cuDNN then skips the masked blocks); only segments are a mask.
        mask = segment_mask(q_segment_ids, kv_segment_ids, causal=False, q_len=q_len, kv_len=kv_len)
        return jax.nn.dot_product_attention(
            q_btnh,
            k_bskh,
            v_bskh,
            mask=None if mask is None else mask[:, None],  # (B, 1, T, S): broadcast over heads
            scale=scale,
            is_causal=causal,
            implementation="cudnn" if backend == "cudnn" else "xla",
        )
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
