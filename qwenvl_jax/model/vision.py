"""The Qwen2.5-VL vision tower (spec 2): patch embed, windowed/full blocks, merger, un-permutation.

Inputs are static-shape arrays from the host (`qwenvl_jax.processing.positions.vision_indices`, or the
`image_*` / `video_*` keys of `collate`): P pixel rows in merge-block order, of which the first N are
real; the rest are budget padding with segment id -1, isolated by the attention mask.

Dtype policy: pixels are cast to the compute dtype before the patch-embed matmul (HF casts them to the
conv weight dtype, spec 6.5); the rope tables and the q/k rotation are float32 (spec 6.3); norms follow
`RMSNorm`; everything else runs in `dtype`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.attention import attention
from qwenvl_jax.model.layers import MLP, Dense, RMSNorm, run_stack, stacked
from qwenvl_jax.model.rope import apply_vision_rope, vision_cos_sin
from qwenvl_jax.sharding import constrain_activation


class VisionAttention(nnx.Module):
    """Fused qkv (columns q | k | v, each heads x head_dim), 2-D rope, segment-masked attention, proj.

    `band`: every segment is contiguous and at most `band` rows long (the windows, spec 2.3: 64 rows; the
    frames, when the host bounds them), so it is attended band by band (`banded_attention` below:
    3 x band keys per query, no P x P mask); None: a segment mask over all P rows.
    """

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        vc = config.vision
        self.num_heads, self.head_dim = vc.num_heads, vc.head_dim
        self.backend = config.attention_backend
        kw = dict(use_bias=True, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.qkv = Dense(vc.hidden_size, 3 * vc.hidden_size, axes=("vision_embed", "vision_qkv"), **kw)
        self.proj = Dense(vc.hidden_size, vc.hidden_size, axes=("vision_qkv", "vision_embed"), **kw)

    def __call__(self, x_pd, cos_ph, sin_ph, seg_p, band: int | None = None):
        num_rows = x_pd.shape[0]
        qkv_p3nh = self.qkv(x_pd).reshape(num_rows, 3, self.num_heads, self.head_dim)
        q_pnh = apply_vision_rope(qkv_p3nh[:, 0], cos_ph, sin_ph)
        k_pnh = apply_vision_rope(qkv_p3nh[:, 1], cos_ph, sin_ph)
        if band is not None:
            band_fn = functools.partial(
                banded_attention, block=band, scale=self.head_dim**-0.5, backend=self.backend
            )
            # Rematerialised: the backward recomputes the band from q, k, v instead of keeping its
            # probabilities, and XLA then lays out this forward as in a plain (undifferentiated) pass, so
            # DPO's policy and frozen reference agree to the bit at step 1.
            o_pnh = jax.checkpoint(band_fn)(q_pnh, k_pnh, qkv_p3nh[:, 2], seg_p)
            return self.proj(o_pnh.reshape(num_rows, -1))
        # One "batch" row of P tokens: frames are segments, never crossed (spec 2.5).
        o_1pnh = attention(
            q_pnh[None],
            k_pnh[None],
            qkv_p3nh[None, :, 2],
            q_segment_ids=seg_p[None],
            kv_segment_ids=seg_p[None],
            scale=self.head_dim**-0.5,
            backend=self.backend,
        )
        return self.proj(o_1pnh.reshape(num_rows, -1))


class VisionBlock(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        vc = config.vision
        norm = dict(eps=vc.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)
        self.norm1 = RMSNorm(vc.hidden_size, **norm)
        self.attn = VisionAttention(config, rngs=rngs)
        self.norm2 = RMSNorm(vc.hidden_size, **norm)
        self.mlp = MLP(
            vc.hidden_size,
            vc.intermediate_size,
            use_bias=True,  # the vision MLP has biases (Qwen2_5_VLMLP(bias=True)); the text one has none
            embed_axis="vision_embed",
            mlp_axis="vision_mlp",
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def __call__(self, x_pd, cos_ph, sin_ph, seg_p, band: int | None = None):
        x_pd = x_pd + self.attn(self.norm1(x_pd), cos_ph, sin_ph, seg_p, band)
        return x_pd + self.mlp(self.norm2(x_pd))


class PatchMerger(nnx.Module):
    """ln_q per patch row, concat the U rows of each merge unit, fc1, exact GELU, fc2 (spec 2.6)."""

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        vc = config.vision
        self.unit = vc.spatial_merge_size**2
        merged = vc.hidden_size * self.unit
        kw = dict(use_bias=True, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.ln_q = RMSNorm(
            vc.hidden_size, eps=vc.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype
        )
        self.fc1 = Dense(merged, merged, axes=("merger", "vision_mlp"), **kw)
        self.fc2 = Dense(merged, vc.out_hidden_size, axes=("vision_mlp", "embed"), **kw)

    def __call__(self, x_pd):
        y_um = self.ln_q(x_pd).reshape(x_pd.shape[0] // self.unit, -1)
        # nn.GELU() is the erf form; jax.nn.gelu defaults to the tanh approximation (spec 6).
        return self.fc2(jax.nn.gelu(self.fc1(y_um), approximate=False))


PIXEL_KEYS = {"image": "pixel_values", "video": "pixel_values_videos"}


@struct.dataclass
class VisionInputs:
    """One modality's vision inputs: a pytree of `collate`'s `pixel_values[_videos]` and
    `{image,video}_*` arrays (docs/processing.md).

    `pixels_pc (P, C)` in merge-block order, the first N rows real; `rope_pos_p2`, `window_seg_p` and
    `full_seg_p` in window order; `patch_perm_p` gathers window order from merge-block order and
    `unit_unperm_u` undoes it on merged units (HF's `argsort(window_index)`); the scatter slots
    `scatter_b`/`scatter_s` place features in the token rows (`s == S`: unused, dropped), and
    `scatter_u`, for rows that share their images (`collate(share=...)`), names the feature unit each slot
    reads. `full_block` (static) bounds one frame's rows (`BatchSpec.max_frame_patches`; the batch carries
    it as the shape of `{kind}_full_block`), None when unbounded.
    """

    pixels_pc: jax.Array
    rope_pos_p2: jax.Array
    patch_perm_p: jax.Array
    window_seg_p: jax.Array
    full_seg_p: jax.Array
    unit_unperm_u: jax.Array
    scatter_b: jax.Array
    scatter_s: jax.Array
    scatter_u: jax.Array | None = None
    full_block: int | None = struct.field(pytree_node=False, default=None)

    # The batch key of each array field, after the `{kind}_` prefix (pixels: `PIXEL_KEYS`).
    FIELDS = ("rope_pos", "patch_perm", "window_seg", "full_seg", "unit_unperm", "scatter_b", "scatter_s")

    @classmethod
    def batch_keys(cls, kind: str) -> tuple[str, ...]:
        """Every key of `kind` that `from_batch` reads."""
        return (PIXEL_KEYS[kind], *(f"{kind}_{f}" for f in (*cls.FIELDS, "scatter_u", "full_block")))

    @classmethod
    def from_batch(cls, batch: Mapping[str, jax.Array], kind: str) -> VisionInputs | None:
        """The `kind` ("image" or "video") inputs of a collated batch, or None when it holds none."""
        pixels = batch.get(PIXEL_KEYS[kind])
        if pixels is None:
            return None
        bound = batch.get(f"{kind}_full_block")
        return cls(
            pixels,
            *(batch[f"{kind}_{f}"] for f in cls.FIELDS),
            scatter_u=batch.get(f"{kind}_scatter_u"),
            full_block=None if bound is None else int(bound.shape[0]),
        )


class VisionTower(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        vc = config.vision
        self.config = config
        self.patch_embed = Dense(
            vc.patch_dim,
            vc.hidden_size,
            use_bias=False,
            axes=("vision_patch", "vision_embed"),
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )
        self.blocks = stacked(lambda r: VisionBlock(config, rngs=r), vc.depth, rngs)
        self.merger = PatchMerger(config, rngs=rngs)

    def __call__(self, inputs: VisionInputs) -> jax.Array:
        """Merged features `(P/U, out_hidden_size)` in raster order of merge units; the first N/U are real.

        The full blocks attend band by band over blocks of `inputs.full_block` rows; when unbounded, or
        bounded at P/3 or more (3 bounded blocks per query would cost more), over all P rows.
        """
        vc, cfg = self.config.vision, self.config
        full_block = inputs.full_block
        if full_block is not None and 3 * full_block >= inputs.pixels_pc.shape[0]:
            full_block = None
        # The patch embed is the Conv3d as a matmul; HF casts the pixels to the weight dtype first.
        x_pd = self.patch_embed(inputs.pixels_pc.astype(cfg.dtype))[inputs.patch_perm_p]
        # Under a mesh the patch rows are split over the batch axes: each device runs the blocks' matmuls
        # on its share (windows and bounded frames exchange only their neighbour bands at the edges).
        x_pd = constrain_activation(x_pd, ("patches", None))
        cos_ph, sin_ph = vision_cos_sin(inputs.rope_pos_p2, head_dim=vc.head_dim, theta=vc.rope_theta)
        window_len = (vc.window_size // vc.patch_size) ** 2  # 8 x 8 patches: a window's most rows

        # Runs of consecutive blocks of one kind (windowed, full), each one scan over its slice of the
        # stack: the windowed blocks attend band by band, the full ones per frame.
        for start, stop, full in block_runs(vc.depth, vc.fullatt_block_indexes):
            seg_p, band = (inputs.full_seg_p, full_block) if full else (inputs.window_seg_p, window_len)

            def step(block, x_pd, _, seg_p=seg_p, band=band):
                return block(constrain_activation(x_pd, ("patches", None)), cos_ph, sin_ph, seg_p, band)

            x_pd = run_stack(
                self.blocks, step, x_pd, scan=cfg.scan_layers, remat=cfg.remat, layers=(start, stop)
            )
        return self.merger(x_pd)[inputs.unit_unperm_u]


def block_runs(depth: int, full_indexes) -> list[tuple[int, int, bool]]:
    """`[(start, stop, is_full)]`: the maximal runs of consecutive windowed or full blocks."""
    full = np.isin(np.arange(depth), list(full_indexes))
    runs, start = [], 0
    for i in range(1, depth + 1):
        if i == depth or full[i] != full[start]:
            runs.append((start, i, bool(full[start])))
            start = i
    return runs


def banded_attention(
    q_pnh: jax.Array,
    k_pnh: jax.Array,
    v_pnh: jax.Array,
    segment_ids_p: jax.Array,
    *,
    block: int,
    scale: float | None = None,
    backend: str = "xla",
) -> jax.Array:
    """Attention of one row of P tokens within segments that are CONTIGUOUS and at most `block` long
    (the vision tower's windows, spec 2.5), without a P x P mask: the rows are cut into blocks of `block`,
    and the queries of block i attend to the keys of blocks i-1, i and i+1 (a segment of at most `block`
    contiguous rows lies within them), masked by segment equality. Cost 3 `block` P per head instead of
    P^2; the numbers are those of `attention` with the same segment ids (the same keys, the same masked
    softmax). `(P, N, H)` in and out."""
    num_rows, heads, head_dim = q_pnh.shape
    nb = -(-num_rows // block)
    pad = nb * block - num_rows
    if pad:  # a segment of its own (-2), discarded below
        q_pnh, k_pnh, v_pnh = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q_pnh, k_pnh, v_pnh))
        segment_ids_p = jnp.pad(segment_ids_p, (0, pad), constant_values=-2)

    def band(x_b):  # (nb, block, ...) -> (nb, 3 block, ...): the previous, own and next block
        zero = jnp.zeros_like(x_b[:1])
        prev = jnp.concatenate([zero, x_b[:-1]], axis=0)
        nxt = jnp.concatenate([x_b[1:], zero], axis=0)
        return jnp.concatenate([prev, x_b, nxt], axis=1)

    blocks = lambda x: x.reshape(nb, block, *x.shape[1:])  # noqa: E731
    seg_b = blocks(segment_ids_p)
    # The missing neighbours of the first and last block get an id no query has.
    seg_band = band(seg_b)
    edge = jnp.zeros((nb, 3 * block), bool).at[0, :block].set(True).at[-1, 2 * block :].set(True)
    seg_band = jnp.where(edge, jnp.iinfo(seg_band.dtype).min, seg_band)
    out = attention(blocks(q_pnh), band(blocks(k_pnh)), band(blocks(v_pnh)), q_segment_ids=seg_b,
                    kv_segment_ids=seg_band, scale=scale, backend=backend)  # fmt: skip
    return out.reshape(nb * block, heads, head_dim)[:num_rows]
