"""The Qwen2.5-VL vision tower (spec 2): patch embed, windowed/full blocks, merger, un-permutation.

Inputs are static-shape arrays from the host (`qwenvl_jax.processing.positions.vision_indices`, or the
`image_*` / `video_*` keys of `collate`): P pixel rows in merge-block order, of which the first N are
real; the rest are budget padding with segment id -1, isolated by the attention mask.

Dtype policy: pixels are cast to the compute dtype before the patch-embed matmul (HF casts them to the
conv weight dtype, spec 6.5); the rope tables and the q/k rotation are float32 (spec 6.3); norms follow
`RMSNorm`; everything else runs in `dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.attention import attention
from qwenvl_jax.model.layers import MLP, Dense, RMSNorm, run_stack, stacked
from qwenvl_jax.model.rope import apply_vision_rope, vision_cos_sin


class VisionAttention(nnx.Module):
    """Fused qkv (columns q | k | v, each heads x head_dim), 2-D rope, segment-masked attention, proj."""

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        vc = config.vision
        self.num_heads, self.head_dim = vc.num_heads, vc.head_dim
        self.backend = config.attention_backend
        kw = dict(use_bias=True, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.qkv = Dense(vc.hidden_size, 3 * vc.hidden_size, axes=("vision_embed", "vision_qkv"), **kw)
        self.proj = Dense(vc.hidden_size, vc.hidden_size, axes=("vision_qkv", "vision_embed"), **kw)

    def __call__(self, x_pd, cos_ph, sin_ph, seg_p):
        num_rows = x_pd.shape[0]
        qkv_p3nh = self.qkv(x_pd).reshape(num_rows, 3, self.num_heads, self.head_dim)
        q_pnh = apply_vision_rope(qkv_p3nh[:, 0], cos_ph, sin_ph)
        k_pnh = apply_vision_rope(qkv_p3nh[:, 1], cos_ph, sin_ph)
        # One "batch" row of P tokens: windows and frames are segments, never crossed (spec 2.3, 2.5).
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

    def __call__(self, x_pd, cos_ph, sin_ph, seg_p):
        x_pd = x_pd + self.attn(self.norm1(x_pd), cos_ph, sin_ph, seg_p)
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

    def __call__(
        self,
        pixel_values_pc: jax.Array,
        rope_pos_p2: jax.Array,
        patch_perm_p: jax.Array,
        window_seg_p: jax.Array,
        full_seg_p: jax.Array,
        unit_unperm_u: jax.Array,
    ) -> jax.Array:
        """Merged features `(P/U, out_hidden_size)` in raster order of merge units; the first N/U are real.

        `pixel_values_pc` is in merge-block order (as the processor writes it); `rope_pos_p2`,
        `window_seg_p` and `full_seg_p` are in window order; `patch_perm_p` gathers window order from
        merge-block order and `unit_unperm_u` undoes it on merged units (HF's `argsort(window_index)`).
        """
        vc, cfg = self.config.vision, self.config
        # The patch embed is the Conv3d as a matmul; HF casts the pixels to the weight dtype first.
        x_pd = self.patch_embed(pixel_values_pc.astype(cfg.dtype))[patch_perm_p]
        cos_ph, sin_ph = vision_cos_sin(rope_pos_p2, head_dim=vc.head_dim, theta=vc.rope_theta)
        is_full_l = jnp.asarray(np.isin(np.arange(vc.depth), vc.fullatt_block_indexes))

        def step(block, x_pd, is_full):
            # One traced block for all depths: the per-layer flag picks full (per frame) or window segments.
            seg_p = jnp.where(is_full, full_seg_p, window_seg_p)
            return block(x_pd, cos_ph, sin_ph, seg_p)

        x_pd = run_stack(self.blocks, step, x_pd, is_full_l, scan=cfg.scan_layers, remat=cfg.remat)
        return self.merger(x_pd)[unit_unperm_u]
