"""The Qwen2 decoder of Qwen2.5-VL (spec 3.4, 3.5): GQA with q/k/v biases, sectioned M-RoPE, SwiGLU.

Dtype policy: everything in the compute `dtype`, including the rotation (HF casts the rope tables to the
activation dtype and does not upcast, spec 6.2); RMSNorm normalises in float32 (`RMSNorm`); attention
logits and softmax are float32 (`attention`).

Three ways through the decoder: `__call__` (training/scoring, no cache), `prefill` (the same computation,
also returning every layer's rotated keys and values for the KV cache) and `decode` (new tokens against a
preallocated cache `(L, B, T, K, H)` whose slot validity is `kv_mask_bt`). Cached keys are stored after
the rotation, so a cached key never needs its position again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.attention import attention
from qwenvl_jax.model.layers import MLP, Dense, Embed, RMSNorm, run_stack, stacked
from qwenvl_jax.model.rope import apply_text_rope, mrope_cos_sin
from qwenvl_jax.sharding import constrain_activation


class TextAttention(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        tc = config.text
        self.num_heads, self.num_kv_heads, self.head_dim = (
            tc.num_attention_heads,
            tc.num_key_value_heads,
            tc.head_dim,
        )
        self.backend = config.attention_backend
        kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Dense(tc.hidden_size, q_dim, use_bias=tc.attention_bias, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(
            tc.hidden_size, kv_dim, use_bias=tc.attention_bias, axes=("embed", "kv_heads"), **kw
        )
        self.v_proj = Dense(
            tc.hidden_size, kv_dim, use_bias=tc.attention_bias, axes=("embed", "kv_heads"), **kw
        )
        self.o_proj = Dense(q_dim, tc.hidden_size, use_bias=False, axes=("heads", "embed"), **kw)

    def _qkv(self, x_bsd, cos_bsh, sin_bsh):
        batch, seq, _ = x_bsd.shape
        q_bsnh = self.q_proj(x_bsd).reshape(batch, seq, self.num_heads, self.head_dim)
        k_bskh = self.k_proj(x_bsd).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v_bskh = self.v_proj(x_bsd).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        return apply_text_rope(q_bsnh, cos_bsh, sin_bsh), apply_text_rope(k_bskh, cos_bsh, sin_bsh), v_bskh

    def __call__(self, x_bsd, cos_bsh, sin_bsh, segment_ids_bs, *, return_kv: bool = False):
        """Causal self-attention; with `return_kv` also the rotated keys and values `(B, S, K, H)`."""
        batch, seq, _ = x_bsd.shape
        q_bsnh, k_bskh, v_bskh = self._qkv(x_bsd, cos_bsh, sin_bsh)
        o_bsnh = attention(
            q_bsnh,
            k_bskh,
            v_bskh,
            q_segment_ids=segment_ids_bs,
            kv_segment_ids=segment_ids_bs,
            causal=True,
            scale=self.head_dim**-0.5,
            backend=self.backend,
        )
        out_bsd = self.o_proj(o_bsnh.reshape(batch, seq, -1))
        return (out_bsd, k_bskh, v_bskh) if return_kv else out_bsd

    def decode(self, x_bsd, cos_bsh, sin_bsh, k_cache_btkh, v_cache_btkh, kv_mask_bt, index):
        """One new token per row, at cache slot `index`, attending to every slot with `kv_mask_bt == 1`.

        The caller marks slot `index` valid; later slots are still 0, so no causal mask is needed.
        Returns the output `(B, 1, D)` and the new rotated key and value `(B, 1, K, H)`.
        """
        batch, seq, _ = x_bsd.shape
        if seq != 1:
            raise ValueError(f"decode takes one new token per row, got {seq}")
        q_bsnh, k_bskh, v_bskh = self._qkv(x_bsd, cos_bsh, sin_bsh)
        # A per-layer copy of the cache with the new entries, for this layer's attention only; the stack
        # writes the new entries into the cache itself once, after the scan over layers.
        k_all = jax.lax.dynamic_update_slice_in_dim(k_cache_btkh, k_bskh.astype(k_cache_btkh.dtype), index, 1)
        v_all = jax.lax.dynamic_update_slice_in_dim(v_cache_btkh, v_bskh.astype(v_cache_btkh.dtype), index, 1)
        o_bsnh = attention(
            q_bsnh,
            k_all,
            v_all,
            q_segment_ids=jnp.ones((batch, 1), jnp.int32),
            kv_segment_ids=kv_mask_bt.astype(jnp.int32),
            causal=False,
            scale=self.head_dim**-0.5,
            backend=self.backend,
        )
        return self.o_proj(o_bsnh.reshape(batch, seq, -1)), k_bskh, v_bskh


class DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        tc = config.text
        norm = dict(eps=tc.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)
        self.input_layernorm = RMSNorm(tc.hidden_size, **norm)
        self.self_attn = TextAttention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(tc.hidden_size, **norm)
        self.mlp = MLP(
            tc.hidden_size,
            tc.intermediate_size,
            use_bias=False,
            embed_axis="embed",
            mlp_axis="mlp",
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def __call__(self, x_bsd, cos_bsh, sin_bsh, segment_ids_bs, *, return_kv: bool = False):
        out = self.self_attn(
            self.input_layernorm(x_bsd), cos_bsh, sin_bsh, segment_ids_bs, return_kv=return_kv
        )
        attn_bsd, kv = (out[0], out[1:]) if return_kv else (out, None)
        x_bsd = x_bsd + attn_bsd
        x_bsd = x_bsd + self.mlp(self.post_attention_layernorm(x_bsd))
        return (x_bsd, kv) if return_kv else x_bsd

    def decode(self, x_bsd, cos_bsh, sin_bsh, k_cache_btkh, v_cache_btkh, kv_mask_bt, index):
        attn_bsd, k_bskh, v_bskh = self.self_attn.decode(
            self.input_layernorm(x_bsd), cos_bsh, sin_bsh, k_cache_btkh, v_cache_btkh, kv_mask_bt, index
        )
        x_bsd = x_bsd + attn_bsd
        return x_bsd + self.mlp(self.post_attention_layernorm(x_bsd)), (k_bskh, v_bskh)


class TextModel(nnx.Module):
    """Embedding, stacked decoder layers and the final norm (`Qwen2_5_VLTextModel`); no lm_head."""

    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
        tc = config.text
        self.config = config
        self.embed_tokens = Embed(
            tc.vocab_size, tc.hidden_size, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
        )
        self.layers = stacked(lambda r: DecoderLayer(config, rngs=r), tc.num_hidden_layers, rngs)
        self.norm = RMSNorm(
            tc.hidden_size, eps=tc.rms_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype
        )

    def _rope(self, position_ids_3bs: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        tc = self.config.text
        return mrope_cos_sin(
            position_ids_3bs,
            head_dim=tc.head_dim,
            theta=tc.rope_theta,
            mrope_section=tc.mrope_section,
            dtype=dtype,
        )

    def __call__(
        self, embeds_bsd: jax.Array, attention_mask_bs: jax.Array, position_ids_3bs: jax.Array
    ) -> jax.Array:
        """Final hidden states `(B, S, H)` in `dtype`.

        `attention_mask_bs` (1 real, 0 padding; or segment ids 1, 2, ... of packed rows) becomes the segment
        ids of a causal attention: real tokens never see padding or another segment. Padding rows see only padding, so they are finite garbage, as in HF;
        compare only real positions. `position_ids_3bs` is `(3, B, S)` (t, h, w) or `(B, S)`.
        """
        cfg = self.config
        cos_bsh, sin_bsh = self._rope(position_ids_3bs, embeds_bsd.dtype)
        segment_ids_bs = attention_mask_bs.astype(jnp.int32)

        def step(layer, x_bsd, _):
            x_bsd = constrain_activation(x_bsd, ("batch", "seq", None))
            return layer(x_bsd, cos_bsh, sin_bsh, segment_ids_bs)

        x_bsd = run_stack(self.layers, step, embeds_bsd, None, scan=cfg.scan_layers, remat=cfg.remat)
        return self.norm(x_bsd)

    def prefill(
        self, embeds_bsd: jax.Array, attention_mask_bs: jax.Array, position_ids_3bs: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`__call__` plus every layer's rotated keys and values `(L, B, S, K, H)` for the KV cache."""
        cfg = self.config
        cos_bsh, sin_bsh = self._rope(position_ids_3bs, embeds_bsd.dtype)
        segment_ids_bs = attention_mask_bs.astype(jnp.int32)

        def step(layer, x_bsd, _):
            x_bsd = constrain_activation(x_bsd, ("batch", "seq", None))
            return layer(x_bsd, cos_bsh, sin_bsh, segment_ids_bs, return_kv=True)

        x_bsd, (k_lbskh, v_lbskh) = run_stack(
            self.layers, step, embeds_bsd, None, scan=cfg.scan_layers, remat="none", collect=True
        )
        return self.norm(x_bsd), k_lbskh, v_lbskh

    def decode(
        self,
        embeds_bsd: jax.Array,
        position_ids_3bs: jax.Array,
        k_cache_lbtkh: jax.Array,
        v_cache_lbtkh: jax.Array,
        kv_mask_bt: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """New tokens `(B, 1, D)` at cache slot `index` -> (hidden `(B, 1, D)`, updated k and v caches).

        `kv_mask_bt` must already mark slot `index` valid. The layer scan reads each layer's cache slice
        and returns only the new entries; they are written into the cache once, after the scan.
        """
        cfg = self.config
        cos_bsh, sin_bsh = self._rope(position_ids_3bs, embeds_bsd.dtype)

        def step(layer, x_bsd, kv):
            return layer.decode(x_bsd, cos_bsh, sin_bsh, kv[0], kv[1], kv_mask_bt, index)

        x_bsd, (k_new, v_new) = run_stack(
            self.layers,
            step,
            embeds_bsd,
            (k_cache_lbtkh, v_cache_lbtkh),
            scan=cfg.scan_layers,
            remat="none",
            collect=True,
        )
        k_cache_lbtkh = jax.lax.dynamic_update_slice_in_dim(
            k_cache_lbtkh, k_new.astype(k_cache_lbtkh.dtype), index, 2
        )
        v_cache_lbtkh = jax.lax.dynamic_update_slice_in_dim(
            v_cache_lbtkh, v_new.astype(v_cache_lbtkh.dtype), index, 2
        )
        return self.norm(x_bsd), k_cache_lbtkh, v_cache_lbtkh
