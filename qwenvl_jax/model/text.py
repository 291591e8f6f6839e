"""The Qwen2 decoder of Qwen2.5-VL (spec 3.4, 3.5): GQA with q/k/v biases, sectioned M-RoPE, SwiGLU.

Dtype policy: everything in the compute `dtype`, including the rotation (HF casts the rope tables to the
activation dtype and does not upcast, spec 6.2); RMSNorm normalises in float32 (`RMSNorm`); attention
logits and softmax are float32 (`attention`).

Three ways through the decoder: `__call__` (training/scoring, no cache), `prefill` (the same computation,
also returning every layer's rotated keys and values for the KV cache) and `decode` (one new token per
row against the KV cache: one `(B, K, T, H)` buffer per layer, slot validity `kv_mask_bt`, see
`generation.cache`). Cached keys are stored after the rotation, so a cached key never needs its position
again.

`decode` runs over the layers as L separate parameter states (`decode_layers`), in a Python loop, not a
scan over the stacked ones: XLA materialises a layer's slice of a stacked weight (or cache) as a copy
before the matmul that reads it, so a scanned or sliced decode step moves every weight three times, and
a decode step is bound by those reads. The cost is one copy of the decoder weights, made once per
generation, and a decode program whose size grows with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.attention import attention
from qwenvl_jax.model.decode_attention import decode_attention
from qwenvl_jax.model.layers import MLP, Dense, Embed, RMSNorm, run_stack, stacked
from qwenvl_jax.model.rope import apply_text_rope, mrope_cos_sin
from qwenvl_jax.sharding import constrain_activation

# Backends that take right-padding lengths without a mask (cuDNN's padding mask type, and its CPU twin).
LENGTH_BACKENDS = ("cudnn", "dpa_xla")


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

    def __call__(self, x_bsd, cos_bsh, sin_bsh, segment_ids_bs, *, lengths_b=None, return_kv: bool = False):
        """Causal self-attention; with `return_kv` also the rotated keys and values `(B, S, K, H)`.

        `lengths_b`: the rows are unpacked and right-padded, `lengths_b` real tokens each; the cuDNN
        backends then take the lengths and no mask at all (`attention`), the others the segment ids."""
        batch, seq, _ = x_bsd.shape
        q_bsnh, k_bskh, v_bskh = self._qkv(x_bsd, cos_bsh, sin_bsh)
        if lengths_b is not None and self.backend in LENGTH_BACKENDS:
            masking = {"q_lengths": lengths_b, "kv_lengths": lengths_b}
        else:
            masking = {"q_segment_ids": segment_ids_bs, "kv_segment_ids": segment_ids_bs}
        o_bsnh = attention(
            q_bsnh, k_bskh, v_bskh, causal=True, scale=self.head_dim**-0.5, backend=self.backend, **masking
        )
        out_bsd = self.o_proj(o_bsnh.reshape(batch, seq, -1))
        return (out_bsd, k_bskh, v_bskh) if return_kv else out_bsd

    def decode(self, x_b1d, cos_b1h, sin_b1h, k_bkth, v_bkth, kv_mask_bt, index):
        """One new token per row, written at slot `index` of this layer's cache buffers `(B, K, T, H)`,
        attending to every slot with `kv_mask_bt == 1` (the caller marks slot `index`).

        The new key and value go into the buffers with one `dynamic_update_slice` each, in place when the
        buffers are donated or carried, and the attention reads the updated buffers whole. Returns the
        output `(B, 1, D)` and the updated buffers.
        """
        batch, seq, _ = x_b1d.shape
        if seq != 1:
            raise ValueError(f"decode takes one new token per row, got {seq}")
        q_b1nh, k_b1kh, v_b1kh = self._qkv(x_b1d, cos_b1h, sin_b1h)
        k_bk1h = jnp.swapaxes(k_b1kh, 1, 2).astype(k_bkth.dtype)
        v_bk1h = jnp.swapaxes(v_b1kh, 1, 2).astype(v_bkth.dtype)
        k_bkth = jax.lax.dynamic_update_slice_in_dim(k_bkth, k_bk1h, index, 2)
        v_bkth = jax.lax.dynamic_update_slice_in_dim(v_bkth, v_bk1h, index, 2)
        o_bnh = decode_attention(q_b1nh[:, 0], k_bkth, v_bkth, kv_mask_bt, scale=self.head_dim**-0.5)
        return self.o_proj(o_bnh.reshape(batch, seq, -1)), k_bkth, v_bkth


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

    def __call__(self, x_bsd, cos_bsh, sin_bsh, segment_ids_bs, *, lengths_b=None, return_kv: bool = False):
        out = self.self_attn(
            self.input_layernorm(x_bsd),
            cos_bsh,
            sin_bsh,
            segment_ids_bs,
            lengths_b=lengths_b,
            return_kv=return_kv,
        )
        attn_bsd, kv = (out[0], out[1:]) if return_kv else (out, None)
        x_bsd = x_bsd + attn_bsd
        x_bsd = x_bsd + self.mlp(self.post_attention_layernorm(x_bsd))
        return (x_bsd, kv) if return_kv else x_bsd

    def decode(self, x_b1d, cos_b1h, sin_b1h, k_bkth, v_bkth, kv_mask_bt, index):
        attn_b1d, k_bkth, v_bkth = self.self_attn.decode(
            self.input_layernorm(x_b1d), cos_b1h, sin_b1h, k_bkth, v_bkth, kv_mask_bt, index
        )
        x_b1d = x_b1d + attn_b1d
        return x_b1d + self.mlp(self.post_attention_layernorm(x_b1d)), k_bkth, v_bkth


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
        self,
        embeds_bsd: jax.Array,
        attention_mask_bs: jax.Array,
        position_ids_3bs: jax.Array,
        seq_lengths_b: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states `(B, S, H)` in `dtype`.

        `attention_mask_bs` (1 real, 0 padding; or segment ids 1, 2, ... of packed rows) becomes the segment
        ids of a causal attention: real tokens never see padding or another segment. Padding rows see only
        padding, so they are finite garbage, as in HF; compare only real positions. `position_ids_3bs` is
        `(3, B, S)` (t, h, w) or `(B, S)`. `seq_lengths_b`: the rows are unpacked and right-padded (collate
        says so by emitting `seq_lengths`); the cuDNN backends then attend by lengths with no mask (padding
        positions give zeros there).
        """
        cfg = self.config
        cos_bsh, sin_bsh = self._rope(position_ids_3bs, embeds_bsd.dtype)
        segment_ids_bs = attention_mask_bs.astype(jnp.int32)

        def step(layer, x_bsd, _):
            x_bsd = constrain_activation(x_bsd, ("batch", "seq", None))
            return layer(x_bsd, cos_bsh, sin_bsh, segment_ids_bs, lengths_b=seq_lengths_b)

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

    def decode_layers(self) -> list[nnx.State]:
        """The decoder layers as L separate parameter states, the first argument of `decode`.

        Slices of the stacked parameters, so a copy of them: make it once per generation (outside the
        decode loop), never per step."""
        _, state = nnx.split(self.layers)
        return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(self.config.text.num_hidden_layers)]

    def decode(
        self,
        layer_states: list[nnx.State],
        embeds_b1d: jax.Array,
        position_ids_3b1: jax.Array,
        k_cache: tuple[jax.Array, ...],
        v_cache: tuple[jax.Array, ...],
        kv_mask_bt: jax.Array,
        index: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """One new token per row at cache slot `index` -> (hidden `(B, 1, D)`, updated k and v buffers).

        `layer_states` is `decode_layers()`; `k_cache`/`v_cache` are the L per-layer buffers `(B, K, T, H)`
        and `kv_mask_bt` must already mark slot `index` valid. Each layer writes its new key and value into
        its own buffers (in place when they are donated or carried) and attends over them; see the module
        docstring for why the layers run as separate states.
        """
        graphdef = nnx.graphdef(self.layers)
        cos_b1h, sin_b1h = self._rope(position_ids_3b1, embeds_b1d.dtype)
        x_b1d, new_k, new_v = embeds_b1d, [], []
        for state, k_bkth, v_bkth in zip(layer_states, k_cache, v_cache, strict=True):
            layer = nnx.merge(graphdef, state)
            x_b1d, k_bkth, v_bkth = layer.decode(x_b1d, cos_b1h, sin_b1h, k_bkth, v_bkth, kv_mask_bt, index)
            new_k.append(k_bkth)
            new_v.append(v_bkth)
        return self.norm(x_b1d), tuple(new_k), tuple(new_v)
