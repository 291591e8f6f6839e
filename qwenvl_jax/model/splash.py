"""TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind `attention`.

The kernel takes one batch row at a time, heads first: q `(N, T, H)`, k and v `(K, S, H)`, query head h
reading kv head `h // (N / K)` (HF's `repeat_kv` order, which `attention` uses too), `SegmentIds(q, kv)`,
and a static mask (causal or full) whose all-masked tiles it skips. `jax.vmap` maps it over the batch.
Logits and the online softmax accumulate in float32 inside the kernel, and a masked logit takes the same
large finite negative as the reference (`-0.7 * finfo(float32).max`). What the kernel needs, and how it
gets it:
- Sequence lengths that are multiples of its blocks (blocks of 128 rows at least, because segment ids
  are read in 128-lane tiles): q and kv are padded at the end, the padded rows take a segment id that no
  real query has, and their outputs are sliced off. A padded query sees no key, or only padded keys; the
  kernel keeps such a row finite, and its zero cotangent adds nothing to any gradient.
- Lane-aligned heads: the head dim is zero-padded to a multiple of 128 (the vision tower's 80). Zero
  columns of q and k add nothing to a logit, zero columns of v give zero output columns, sliced off.
  TPU memory tiles the minor dimension by 128 lanes, so an 80-wide head occupies 128 lanes either way.
- No scale argument: q is multiplied by the scale in float32 and cast back before the kernel.

`interpret=True` runs the same kernel through the Pallas interpreter on any platform (the CPU tests);
`False` lowers it to a Mosaic `tpu_custom_call`, which only TPU can run. XLA does not partition that call
across a device mesh, so under a mesh (`splash_on_mesh`) a `shard_map` runs it on each device's rows and
heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec

LANES = 128  # TPU vector lanes: the kernel's smallest sequence block and the head-dim alignment
_BLOCKS = (512, 256, LANES)  # 512 is upstream's tuned block for long sequences; smaller ones pad less


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(padded_len: int) -> int:
    """The largest of 512, 256, 128 rows that tiles `padded_len` (a multiple of 128) exactly."""
    return next(b for b in _BLOCKS if padded_len % b == 0)


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """`x` zero-padded at the end of `axis` to `size`."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _segment_ids(q_segment_ids, kv_segment_ids, batch, q_len, kv_len, q_pad, kv_pad):
    """`SegmentIds` of the padded rows, or None when nothing is masked or padded."""
    if q_segment_ids is None and q_pad == q_len and kv_pad == kv_len:
        return None
    if q_segment_ids is None:  # padding only: real rows segment 0, padded rows -1 (below)
        q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
        kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
    q_ids, kv_ids = q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
    # An id no real query has, so no real query sees a padded key: one below the smallest (one above the
    # largest when the smallest is int32's minimum; only ids spanning both ends of int32 would defeat it).
    low, high = jnp.min(q_ids), jnp.max(q_ids)
    fill = jnp.where(low > jnp.iinfo(jnp.int32).min, low - 1, high + 1)
    q_ids = jnp.concatenate([q_ids, jnp.broadcast_to(fill, (batch, q_pad - q_len))], axis=1)
    kv_ids = jnp.concatenate([kv_ids, jnp.broadcast_to(fill, (batch, kv_pad - kv_len))], axis=1)
    return sa.SegmentIds(q=q_ids, kv=kv_ids)


def splash_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    causal: bool,
    scale: float,
    interpret: bool,
) -> jax.Array:
    """`attention`'s contract (`(B, T, N, H)` out, dtype of v) computed by the splash kernel.

    Segment ids `(B, T)` and `(B, S)` (both or neither) and `causal` mean what they mean to `attention`;
    the kernel is built for the padded static shapes at trace time (its block masks are numpy).
    """
    batch, q_len, heads, head_dim = q_btnh.shape
    kv_len = k_bskh.shape[1]
    q_pad, kv_pad, dim_pad = _round_up(q_len, LANES), _round_up(kv_len, LANES), _round_up(head_dim, LANES)
    block_q, block_kv = _block(q_pad), _block(kv_pad)
    blocks = sa.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    mask = sa.CausalMask((q_pad, kv_pad)) if causal else sa.FullMask((q_pad, kv_pad))
    kernel = sa.make_splash_mha(
        sa.MultiHeadMask([mask] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    def heads_first(x_bsnh, seq):  # (B, L, N, H) -> (B, N, L_pad, H_pad)
        x_bnsh = jnp.swapaxes(x_bsnh, 1, 2)
        return _pad_axis(_pad_axis(x_bnsh, 2, seq), 3, dim_pad)

    q_scaled = (q_btnh.astype(jnp.float32) * jnp.float32(scale)).astype(q_btnh.dtype)
    q_bntd, k_bksd, v_bksd = (
        heads_first(q_scaled, q_pad),
        heads_first(k_bskh, kv_pad),
        heads_first(v_bskh, kv_pad),
    )
    segments = _segment_ids(q_segment_ids, kv_segment_ids, batch, q_len, kv_len, q_pad, kv_pad)
    if segments is None:
        out_bntd = jax.vmap(kernel)(q_bntd, k_bksd, v_bksd)
    else:
        out_bntd = jax.vmap(kernel)(q_bntd, k_bksd, v_bksd, segments)
    return jnp.swapaxes(out_bntd[:, :, :q_len, :head_dim], 1, 2).astype(v_bskh.dtype)


def splash_on_mesh(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    causal: bool,
    scale: float,
    interpret: bool,
) -> jax.Array:
    """`splash_attention`, under the abstract mesh a sharded step traces in as a `shard_map`: each device
    runs the kernel on its rows (the batch over the activation rules' `batch` axes, when they divide B)
    and its heads (over `tensor`, when it divides the kv heads: a device's query heads then read its own kv
    heads, in `repeat_kv` order); a dim they do not divide is gathered. Outside any mesh, the kernel as
    it is."""
    from qwenvl_jax.sharding import ACTIVATION_RULES

    kernel = functools.partial(splash_attention, causal=causal, scale=scale, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q_btnh, k_bskh, v_bskh, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    rows = ACTIVATION_RULES.resolve(("batch",), (q_btnh.shape[0],), mesh).spec[0]
    heads = ACTIVATION_RULES.resolve(("kv_heads",), (k_bskh.shape[2],), mesh).spec[0]
    x_spec, seg_spec = PartitionSpec(rows, None, heads, None), PartitionSpec(rows, None)
    if q_segment_ids is None:
        body = functools.partial(kernel, q_segment_ids=None, kv_segment_ids=None)
        args, specs = (q_btnh, k_bskh, v_bskh), (x_spec,) * 3
    else:

        def body(q, k, v, q_seg, kv_seg):
            return kernel(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg)

        args = (q_btnh, k_bskh, v_bskh, q_segment_ids, kv_segment_ids)
        specs = (x_spec,) * 3 + (seg_spec,) * 2
    # check_vma off: the Pallas call carries no varying-axes annotations for the checker to follow.
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=x_spec, check_vma=False)(*args)
