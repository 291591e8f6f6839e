"""Rotary tables: sectioned M-RoPE for the decoder and the 2-D axial rope of the vision tower.

Angles follow spec 6 exactly: `inv_freq = 1 / base ** (arange(0, d, 2, f32) / d)` and `pos * inv_freq`
both in float32, as torch computes them. A float64 formula rounds differently in up to 24 of 64
entries and moves cos by 2e-3 at position 1e5.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def inv_freq(dim: int, base: float) -> jax.Array:
    """`(dim // 2,)` float32 inverse frequencies, torch's formula in float32."""
    return 1.0 / (jnp.float32(base) ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / jnp.float32(dim)))


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def mrope_axis_of_freq(mrope_section: tuple[int, ...]) -> np.ndarray:
    """`(sum(section),)` which position row (0 t, 1 h, 2 w) drives each frequency: chunk i uses row i % 3."""
    return np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(mrope_section)])


def mrope_cos_sin(
    position_ids_3bs: jax.Array, *, head_dim: int, theta: float, mrope_section: tuple[int, ...], dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Text M-RoPE `cos, sin` of shape `(B, S, head_dim)` in the activation `dtype` (spec 3.4, 6.2).

    Sectioned and NOT interleaved: frequency j takes its position from row `mrope_axis_of_freq[j]`, and
    the table is `cat([f, f])`, so dims [0,16)+[64,80) follow t, [16,40)+[80,104) h, [40,64)+[104,128) w
    for the published [16, 24, 24]. Picking the row per frequency before multiplying gives exactly HF's
    `pos * inv_freq` products (it multiplies all rows and then selects).
    """
    if position_ids_3bs.ndim == 2:  # (B, S): same position on all three rows, as HF broadcasts
        position_ids_3bs = jnp.broadcast_to(position_ids_3bs[None], (3, *position_ids_3bs.shape))
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(f"sum(mrope_section)={sum(mrope_section)} must equal head_dim/2={head_dim // 2}")
    pos_fbs = position_ids_3bs[mrope_axis_of_freq(mrope_section)]  # (F, B, S)
    angle_bsf = jnp.moveaxis(pos_fbs, 0, -1).astype(jnp.float32) * inv_freq(head_dim, theta)
    emb_bsh = jnp.concatenate([angle_bsf, angle_bsf], axis=-1)
    # HF casts the tables to the activation dtype: the text rotation runs in bf16 in a bf16 model.
    return jnp.cos(emb_bsh).astype(dtype), jnp.sin(emb_bsh).astype(dtype)


def apply_text_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """`x*cos + rotate_half(x)*sin` in the activation dtype (the text path does not upcast, spec 6.2)."""
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return x_btnh * cos + rotate_half(x_btnh) * sin


def vision_cos_sin(
    rope_pos_p2: jax.Array, *, head_dim: int, theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """Vision 2-D rope `cos, sin` `(P, head_dim)`, float32 and never cast (spec 2.2, 6.3).

    `F = head_dim // 4` frequencies over `head_dim // 2` (exponent 2j / (head_dim/2)); in each half of the
    head dim, the first F dims rotate with the row (h) id and the next F with the column (w) id.
    """
    freq_f = inv_freq(head_dim // 2, theta)
    angle_p2f = rope_pos_p2.astype(jnp.float32)[..., None] * freq_f
    emb_ph = jnp.concatenate([angle_p2f[:, 0], angle_p2f[:, 1]], axis=-1)
    emb_ph = jnp.concatenate([emb_ph, emb_ph], axis=-1)
    return jnp.cos(emb_ph), jnp.sin(emb_ph)


def apply_vision_rope(x_pnh: jax.Array, cos_ph: jax.Array, sin_ph: jax.Array) -> jax.Array:
    """Rotate in float32 and cast back to the input dtype, as `apply_rotary_pos_emb_vision` (spec 6.3)."""
    x32 = x_pnh.astype(jnp.float32)
    cos, sin = cos_ph[:, None, :], sin_ph[:, None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x_pnh.dtype)
