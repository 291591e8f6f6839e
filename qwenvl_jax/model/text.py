"""The Qwen2 decoder of Qwen2.5-VL (spec 3.4, 3.5): GQA with q/k/v biases, sectioned M-RoPE, SwiGLU.

Dtype policy: everything in the compute `dtype`, including the rotation (HF casts the rope tables to the
activation dtype and does not upcast, spec 6.2); RMSNorm normalises in float32 (`RMSNorm`); attention
logits and softmax are float32 (`attention`).
"""

from __future__ import annotations

import jax
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.attention import attention
from qwenvl_jax.model.layers import MLP, Dense, Embed, RMSNorm, run_stack, stacked
from qwenvl_jax.model.rope import apply_text_rope, mrope_cos_sin


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

    def __call__(self, x_bsd, cos_bsh, sin_bsh, segment_ids_bs):
        batch, seq, _ = x_bsd.shape
        q_bsnh = self.q_proj(x_bsd).reshape(batch, seq, self.num_heads, self.head_dim)
        k_bskh = self.k_proj(x_bsd).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v_bskh = self.v_proj(x_bsd).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        q_bsnh = apply_text_rope(q_bsnh, cos_bsh, sin_bsh)
        k_bskh = apply_text_rope(k_bskh, cos_bsh, sin_bsh)
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
        return self.o_proj(o_bsnh.reshape(batch, seq, -1))


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

    def __call__(self, x_bsd, cos_bsh, sin_bsh, segment_ids_bs):
        x_bsd = x_bsd + self.self_attn(self.input_layernorm(x_bsd), cos_bsh, sin_bsh, segment_ids_bs)
        return x_bsd + self.mlp(self.post_attention_layernorm(x_bsd))


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

    def __call__(
        self, embeds_bsd: jax.Array, attention_mask_bs: jax.Array, position_ids_3bs: jax.Array
    ) -> jax.Array:
        """Final hidden states `(B, S, H)` in `dtype`.

        `attention_mask_bs` (1 real, 0 padding) becomes the segment ids of a causal attention: real
        tokens never see padding. Padding rows see only padding, so they are finite garbage, as in HF;
        compare only real positions. `position_ids_3bs` is `(3, B, S)` (t, h, w) or `(B, S)`.
        """
        tc, cfg = self.config.text, self.config
        cos_bsh, sin_bsh = mrope_cos_sin(
            position_ids_3bs,
            head_dim=tc.head_dim,
            theta=tc.rope_theta,
            mrope_section=tc.mrope_section,
            dtype=embeds_bsd.dtype,
        )
        segment_ids_bs = attention_mask_bs.astype(jax.numpy.int32)

        def step(layer, x_bsd, _):
            return layer(x_bsd, cos_bsh, sin_bsh, segment_ids_bs)

        x_bsd = run_stack(self.layers, step, embeds_bsd, None, scan=cfg.scan_layers, remat=cfg.remat)
        return self.norm(x_bsd)
