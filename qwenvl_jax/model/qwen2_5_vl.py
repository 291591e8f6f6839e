"""`Qwen25VL`: vision tower + decoder + lm_head, with a jittable core and a processor-output convenience path.

Two ways in:
- `model.forward(input_ids=..., attention_mask=..., position_ids=..., pixel_values=..., image_rope_pos=...,
  ...)`: static-shape arrays only (the keys of `qwenvl_jax.processing.collate`), jittable; logits
  `(B, S, V)` float32.
- `model(**inputs)`: accepts either `collate` output or the HF processor's raw output (`input_ids,
  attention_mask, mm_token_type_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
  second_per_grid_ts`). Raw input goes through `host_inputs` (numpy, outside jit: positions, window
  indices, scatter slots) first. Unknown keys (labels, example_mask, ...) are ignored.

Generation uses `prefill` (the prompt pass, returning the last logits and the per-layer keys and values)
and `decode_step` (one token per row against a preallocated cache); `qwenvl_jax.generation` drives them.

Logits are float32 in every policy: the lm_head matmul accumulates in float32 and is not rounded to the
compute dtype. HF returns bf16 logits from a bf16 model (spec 6.6), so upcast HF's before comparing and
expect our bf16 logits to be slightly closer to an fp32 reference than HF's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.layers import Dense
from qwenvl_jax.model.text import TextModel
from qwenvl_jax.model.vision import PIXEL_KEYS, VisionInputs, VisionTower

CORE_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "seq_lengths",
    *(key for kind in ("image", "video") for key in VisionInputs.batch_keys(kind)),
)


class Qwen25VL(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.visual = VisionTower(config, rngs=rngs)
        self.text = TextModel(config, rngs=rngs)
        if not config.text.tie_word_embeddings:  # tied (3B): logits = h @ embed_tokens.embedding.T
            self.lm_head = Dense(
                config.text.hidden_size,
                config.text.vocab_size,
                use_bias=False,
                axes=("embed", "vocab"),
                dtype=config.dtype,
                param_dtype=config.param_dtype,
                rngs=rngs,
            )

    # ------------------------------------------------------------------------------------ core
    def forward(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        **vision: jax.Array,
    ) -> jax.Array:
        """Logits `(B, S, V)` float32 from static-shape arrays (jittable).

        `input_ids (B, S)`; `attention_mask (B, S)` 1 real / 0 padding (default all real), or the segment
        ids 1, 2, ... of packed rows (`processing.packing`; those always come with their position ids);
        `position_ids (3, B, S)` M-RoPE positions (default: text-only `cumsum(mask) - 1`). For each
        modality present, `pixel_values[_videos] (P, 1176)` and `{image,video}_{rope_pos, patch_perm,
        window_seg, full_seg, unit_unperm, scatter_b, scatter_s}` as `collate` documents them (and, for
        rows that share their images, `{image,video}_scatter_u`: the feature unit each slot reads).
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, **vision))

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        vision_features: dict[str, jax.Array] | None = None,
        seq_lengths: jax.Array | None = None,
        **vision: jax.Array,
    ) -> jax.Array:
        """`forward` without the lm_head: the final-norm hidden states `(B, S, D)` in the compute dtype.

        Training feeds these to the chunked `losses.token_logprobs` with `lm_head_matrix()`, so the
        `(B, S, V)` logits are never materialised. Same arguments as `forward`, plus `vision_features`:
        `vision_features(**vision)` computed once already (a reference pass on the same frozen tower), and
        `seq_lengths (B,)` (`collate`'s, for unpacked right-padded rows: the cuDNN backends attend by
        lengths, with no mask).
        """
        batch, seq = input_ids.shape
        mask_bs = (
            jnp.ones((batch, seq), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        )
        if position_ids is None:
            real_bs = (mask_bs > 0).astype(jnp.int32)
            pos_bs = jnp.maximum(jnp.cumsum(real_bs, axis=-1) - 1, 0) * real_bs
            position_ids = jnp.broadcast_to(pos_bs[None], (3, batch, seq))
        return self.text(self.embed(input_ids, vision_features, **vision), mask_bs, position_ids, seq_lengths)

    def lm_head_matrix(self) -> jax.Array:
        """The lm_head as a `(D, V)` matrix in the compute dtype (the embedding transposed when tied)."""
        if self.config.text.tie_word_embeddings:
            w_dv = self.text.embed_tokens.embedding[...].T
        else:
            w_dv = self.lm_head.kernel[...]
        return w_dv.astype(self.config.dtype)

    def vision_features(self, **vision: jax.Array) -> dict[str, jax.Array]:
        """The vision tower's merged features per modality present, `{"image": (P/U, D), ...}`, as the
        scatter slots read them (`{kind}_scatter_u` applied), in the tower's compute dtype."""
        out = {}
        for kind in ("image", "video"):
            inputs = VisionInputs.from_batch(vision, kind)
            if inputs is None:
                continue
            feats_ud = self.visual(inputs)
            # Rows sharing images (`collate(share=...)`): each slot reads its unit, so an image encoded
            # once fills several rows.
            out[kind] = feats_ud if inputs.scatter_u is None else feats_ud[inputs.scatter_u]
        return out

    def embed(
        self, input_ids: jax.Array, vision_features: dict[str, jax.Array] | None = None, **vision: jax.Array
    ) -> jax.Array:
        """Token embeddings `(B, S, D)` with the vision features scattered into the placeholder slots
        (`vision_features` when given, else computed from `vision`)."""
        embeds_bsd = self.text.embed_tokens(input_ids)
        feats = self.vision_features(**vision) if vision_features is None else vision_features
        for kind, feats_ud in feats.items():
            # HF casts the features to the embedding dtype, then masked_scatter fills placeholder tokens in
            # row-major order; the host computed those slots, and unused ones (s == S) are dropped.
            embeds_bsd = embeds_bsd.at[vision[f"{kind}_scatter_b"], vision[f"{kind}_scatter_s"]].set(
                feats_ud.astype(embeds_bsd.dtype), mode="drop"
            )
        return embeds_bsd

    def logits(self, h_bsd: jax.Array) -> jax.Array:
        """The lm_head (tied or not): float32 logits `(B, S, V)`."""
        if self.config.text.tie_word_embeddings:
            return self.text.embed_tokens.attend(h_bsd)
        kernel_dv = self.lm_head.kernel[...].astype(h_bsd.dtype)
        return jnp.einsum("bsd,dv->bsv", h_bsd, kernel_dv, preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------------------- generation
    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array, **vision: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The prompt pass of generation (jittable): `forward` on a LEFT-padded batch, keeping the cache.

        Returns the float32 logits of the last position `(B, V)` (real in every row under left padding)
        and every layer's rotated keys and values `(L, B, S, K, H)` in the compute dtype. The vision
        tower runs here and only here.
        """
        mask_bs = attention_mask.astype(jnp.int32)
        vision.pop("seq_lengths", None)  # right-padding lengths do not describe a left-padded prompt
        h_bsd, k_lbskh, v_lbskh = self.text.prefill(self.embed(input_ids, **vision), mask_bs, position_ids)
        return self.logits(h_bsd[:, -1:])[:, 0], k_lbskh, v_lbskh

    def decode_step(
        self,
        layer_states: list[nnx.State],
        token_ids_b: jax.Array,
        position_ids_3b: jax.Array,
        k_cache: tuple[jax.Array, ...],
        v_cache: tuple[jax.Array, ...],
        kv_mask_bt: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """One generated token per row (jittable): logits `(B, V)` float32 and the updated k, v caches.

        `layer_states` is `self.text.decode_layers()` (made once per generation, not per step);
        `k_cache`/`v_cache` are the per-layer buffers `(B, K, T, H)` of `generation.cache`, updated in
        place when donated or carried. `position_ids_3b` are the token's M-RoPE positions `(3, B)` (spec
        3.3: the same value on all three axes, `cumsum(mask) - 1 + rope_deltas`); the token is written at
        cache slot `index`, which `kv_mask_bt (B, T)` must already mark valid.
        """
        embeds_b1d = self.text.embed_tokens(token_ids_b[:, None])
        h_b1d, k_cache, v_cache = self.text.decode(
            layer_states, embeds_b1d, position_ids_3b[:, :, None], k_cache, v_cache, kv_mask_bt, index
        )
        return self.logits(h_b1d)[:, 0], k_cache, v_cache

    # ------------------------------------------------------------------------------- convenience
    def __call__(self, **inputs: Any) -> jax.Array:
        """Logits `(B, S, V)` float32 from `collate` output or the HF processor's raw output."""
        if not is_collated(inputs):
            inputs = host_inputs(self.config, **inputs)
        batch = {k: jnp.asarray(v) for k, v in inputs.items() if k in CORE_KEYS and v is not None}
        return _forward_jit(self, batch)


@nnx.jit
def _forward_jit(model: Qwen25VL, batch: dict[str, jax.Array]) -> jax.Array:
    return model.forward(**batch)


def is_collated(inputs: Mapping[str, Any]) -> bool:
    """True when the host indices are already there (collate output, or text with explicit positions)."""
    if any(f"{kind}_rope_pos" in inputs for kind in ("image", "video")):
        return True
    has_grids = any(inputs.get(k) is not None for k in ("image_grid_thw", "video_grid_thw"))
    return "position_ids" in inputs and not has_grids


def host_inputs(
    config: Qwen25VLConfig,
    input_ids,
    attention_mask=None,
    mm_token_type_ids=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    position_ids=None,
    **_ignored: Any,
) -> dict[str, np.ndarray]:
    """The host-side integer bookkeeping for raw processor output, in numpy (never inside jit).

    M-RoPE positions from `get_rope_index` (transformers 5.24 rule), vision indices with no padding budget
    (P = N), and the scatter slots of the placeholder tokens. Returns the `CORE_KEYS` of `forward`.
    """
    # Imported here: `qwenvl_jax.processing` pulls in PIL at package import, and the device modules must
    # not. Only this host function needs the numpy bookkeeping.
    from qwenvl_jax.processing.positions import (
        check_placeholder_count,
        get_rope_index,
        scatter_positions,
        vision_indices,
    )

    vc = config.vision
    ids_bs = np.asarray(input_ids)
    if ids_bs.ndim == 1:
        ids_bs = ids_bs[None]
    mask_bs = (
        np.ones(ids_bs.shape, np.int32)
        if attention_mask is None
        else np.asarray(attention_mask).reshape(ids_bs.shape)
    )
    grids = {
        "image": None if pixel_values is None or image_grid_thw is None else np.asarray(image_grid_thw),
        "video": None
        if pixel_values_videos is None or video_grid_thw is None
        else np.asarray(video_grid_thw),
    }
    if position_ids is None:
        pos_3bs, _ = get_rope_index(
            ids_bs,
            None if mm_token_type_ids is None else np.asarray(mm_token_type_ids),
            grids["image"],
            grids["video"],
            None if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float32),
            mask_bs,
            spatial_merge_size=vc.spatial_merge_size,
            tokens_per_second=vc.tokens_per_second,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
        )
    else:
        pos_3bs = np.asarray(position_ids)
        pos_3bs = pos_3bs[1:] if pos_3bs.ndim == 3 and pos_3bs.shape[0] == 4 else pos_3bs  # HF's packed form
    out = {
        "input_ids": ids_bs.astype(np.int32),
        "attention_mask": mask_bs.astype(np.int32),
        "position_ids": pos_3bs.astype(np.int32),
    }
    real_ids_bs = np.where(mask_bs.astype(bool), ids_bs, -1)  # placeholders in padding are not slots
    unit = vc.spatial_merge_size**2
    for kind, pixels in (("image", pixel_values), ("video", pixel_values_videos)):
        if grids[kind] is None:
            continue
        pixels = np.asarray(pixels, np.float32)
        idx = vision_indices(
            grids[kind],
            merge_size=vc.spatial_merge_size,
            window_size=vc.window_size,
            patch_size=vc.patch_size,
        )
        if pixels.shape[0] != idx.num_patches:
            raise ValueError(f"{pixels.shape[0]} {kind} pixel rows for grids needing {idx.num_patches}")
        token = config.image_token_id if kind == "image" else config.video_token_id
        check_placeholder_count(real_ids_bs, token, idx.num_patches // unit, kind)
        b_idx, s_idx = scatter_positions(real_ids_bs, token)
        out[PIXEL_KEYS[kind]] = pixels
        for field in ("rope_pos", "patch_perm", "window_seg", "full_seg", "unit_unperm"):
            out[f"{kind}_{field}"] = getattr(idx, field).astype(np.int32)
        out[f"{kind}_scatter_b"], out[f"{kind}_scatter_s"] = b_idx, s_idx
    return out
