"""Attention of one new token per row against one layer's KV cache buffer: the decode step's attention.

The buffer is `(B, K, T, H)` (kv heads before time, `generation.cache`), so both matmuls are batched over
(row, kv head) and read the buffer as it lies: `q (B, K, G, H) x k (B, K, T, H) -> (B, K, G, T)` and
`p (B, K, G, T) x v (B, K, T, H) -> (B, K, G, H)`, with no transpose or copy of the cache. The numerics are
those of `attention.attention(..., backend="xla")` with the key-padding mask as segment ids: float32
logits and softmax, masked slots at a large finite negative (their probability is exactly 0), the
probabilities cast to the value dtype before the second matmul. A query needs no causal mask: the slots
after the one being written are still empty (mask 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenvl_jax.model.attention import masked_probs


def decode_attention(
    q_bnh: jax.Array, k_bkth: jax.Array, v_bkth: jax.Array, kv_mask_bt: jax.Array, *, scale: float
) -> jax.Array:
    """Softmax attention `(B, N, H)` of one query per row over the slots with `kv_mask_bt == 1`.

    `q_bnh (B, N, H)`, `k_bkth`/`v_bkth (B, K, T, H)` with N % K == 0 (GQA: query head `k * G + g` reads
    kv head `k`, HF's `repeat_kv` order), `kv_mask_bt (B, T)` int. The output has the dtype of `v`.
    """
    batch, heads, head_dim = q_bnh.shape
    kv_heads = k_bkth.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    q_bkgh = q_bnh.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    logits_bkgt = jnp.einsum("bkgh,bkth->bkgt", q_bkgh, k_bkth, preferred_element_type=jnp.float32)
    mask = (kv_mask_bt == 1)[:, None, None, :]
    probs_bkgt = masked_probs(logits_bkgt, mask, scale=scale, dtype=v_bkth.dtype)
    out_bkgh = jnp.einsum("bkgt,bkth->bkgh", probs_bkgt, v_bkth)
    return out_bkgh.reshape(batch, heads, head_dim)
