"""What a decode step moves, from the optimized HLO: the KV cache updated in place (its buffers aliased
to the outputs, no copy or transpose of them) and, per layer, XLA's bytes accessed within 1.3x of the
layer's weights plus its cache at 3B widths; the decode attention equals the reference attention; the
cache grows between spans without losing a slot."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.generation.cache import cache_from_prefill, cache_shape, cache_spans, grow
from qwenvl_jax.loading import abstract_model
from qwenvl_jax.model.attention import attention
from qwenvl_jax.model.decode_attention import decode_attention

ROWS, SLOTS = 64, 1024  # the decode step: batch 64, 1,024 cached tokens


def _compiled_step(layers: int):
    """The jitted decode step of the 3B widths at `layers` decoder layers (float32, abstract: nothing is
    allocated), the per-layer cache buffers donated as the engine donates them."""
    cfg = Qwen25VLConfig.preset("3B", dtype="float32", param_dtype="float32")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=layers))
    graphdef, params = nnx.split(abstract_model(cfg))
    states = jax.eval_shape(lambda p: nnx.merge(graphdef, p).text.decode_layers(), params)
    buffer = jax.ShapeDtypeStruct(cache_shape(cfg, ROWS, SLOTS)[1:], jnp.float32)
    kv = (buffer,) * layers
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

    def step(params, states, ids, pos, k, v, mask, index):
        return nnx.merge(graphdef, params).decode_step(states, ids, pos, k, v, mask, index)

    lowered = jax.jit(step, donate_argnums=(4, 5)).lower(
        params, states, i32(ROWS), i32(3, ROWS), kv, kv, i32(ROWS, SLOTS), i32()
    )
    compiled = lowered.compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    layer_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(states[0]))
    return compiled.as_text(), float(cost["bytes accessed"]), layer_bytes, buffer


def test_decode_step_writes_the_cache_in_place_and_reads_it_once():
    hlo2, bytes2, layer_weights, buffer = _compiled_step(2)
    _, bytes1, _, _ = _compiled_step(1)
    buffer_elems = int(np.prod(buffer.shape))
    # No copy or transpose of cache data anywhere (fused or not): each is smaller than one buffer.
    for dims, op in re.findall(r"= \w+\[([\d,]*)\]\S* (copy|transpose)\(", hlo2):
        assert np.prod([int(d) for d in dims.split(",") if d]) < buffer_elems, (op, dims)
    # In place: each of the 2 x 2 cache buffers aliases an output of the step.
    header = hlo2.splitlines()[0]
    aliased = {int(p) for p in re.findall(r"\{\d+\}: \((\d+), \{\}, may-alias\)", header)}
    cache_params = _cache_parameters(hlo2, buffer)
    assert len(cache_params) == 4 and set(cache_params) <= aliased, (cache_params, header[:400])
    # Per layer (the depth-2 minus the depth-1 step: exactly one more, identical layer), XLA's bytes
    # accessed are within 1.3x of what a layer must read: its weights and its keys and values.
    per_layer = bytes2 - bytes1
    need = layer_weights + 2 * buffer_elems * 4
    assert need <= per_layer <= 1.3 * need, (per_layer / 2**20, need / 2**20)


def _cache_parameters(hlo: str, buffer) -> list[int]:
    """Entry parameter numbers whose shape is a cache buffer's."""
    dims = ",".join(str(d) for d in buffer.shape)
    entry = hlo[hlo.index("\nENTRY") :]
    return [int(p) for p in re.findall(rf"= f32\[{dims}\]\S* parameter\((\d+)\)", entry)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_equals_the_reference_attention(dtype):
    """`decode_attention` over `(B, K, T, H)` buffers = `attention(..., backend="xla")` over `(B, T, K, H)`
    with the slot mask as kv segment ids (GQA, masked slots, a left-padded row)."""
    batch, heads, kv_heads, slots, head_dim = 3, 8, 2, 40, 16
    keys = jax.random.split(jax.random.key(0), 3)
    q_bnh = jax.random.normal(keys[0], (batch, heads, head_dim)).astype(dtype)
    k_bkth = jax.random.normal(keys[1], (batch, kv_heads, slots, head_dim)).astype(dtype)
    v_bkth = jax.random.normal(keys[2], (batch, kv_heads, slots, head_dim)).astype(dtype)
    mask_bt = np.ones((batch, slots), np.int32)
    mask_bt[0, :7] = 0  # left padding
    mask_bt[:, 30:] = 0  # empty slots
    mask_bt[2, 12] = 0
    with jax.default_matmul_precision("highest"):
        got = decode_attention(q_bnh, k_bkth, v_bkth, jnp.asarray(mask_bt), scale=head_dim**-0.5)
        ref = attention(
            q_bnh[:, None],
            jnp.swapaxes(k_bkth, 1, 2),
            jnp.swapaxes(v_bkth, 1, 2),
            q_segment_ids=jnp.ones((batch, 1), jnp.int32),
            kv_segment_ids=jnp.asarray(mask_bt),
            scale=head_dim**-0.5,
            backend="xla",
        )[:, 0]
    assert got.dtype == dtype and got.shape == (batch, heads, head_dim)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=tol)
    # Masked slots do not count: changing them changes nothing.
    noisy = jnp.where(jnp.asarray(mask_bt)[:, None, :, None] == 1, k_bkth, 1e3)
    again = decode_attention(q_bnh, noisy, v_bkth, jnp.asarray(mask_bt), scale=head_dim**-0.5)
    np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(got, np.float32))


def test_spans_and_grow():
    assert cache_spans(32, 128) == (128,)  # at least MIN_SPAN
    assert cache_spans(64, 1152) == (128, 256, 512, 1024, 1152)
    assert cache_spans(128, 256) == (256,)  # the first span holds the prompt and one token more
    assert cache_spans(512, 1536) == (1024, 1536)
    layers, batch, seq, kv_heads, head_dim, n = 2, 2, 5, 2, 4, 3
    k = jax.random.normal(jax.random.key(1), (layers, batch, seq, kv_heads, head_dim))
    v = k + 1
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = jax.jit(lambda k, v, m: cache_from_prefill(k, v, m, n=n, length=8))(k, v, mask)
    assert len(cache.k) == layers and cache.k[0].shape == (batch * n, kv_heads, 8, head_dim)
    # Row r continues prompt r // n; slot s < seq holds the prompt's key s, kv heads before time.
    np.testing.assert_array_equal(cache.k[1][4, :, :seq], np.swapaxes(np.asarray(k[1, 1]), 0, 1))
    old = cache.k[0]
    grown = grow(cache, 16)
    assert old.is_deleted()  # consumed buffer by buffer
    assert grown.length == 16 and grown.v[1].shape == (batch * n, kv_heads, 16, head_dim)
    np.testing.assert_array_equal(
        grown.v[1][:, :, :seq], np.repeat(np.swapaxes(np.asarray(v[1]), 1, 2), n, 0)
    )
    assert not np.asarray(grown.v[1][:, :, seq:]).any() and not np.asarray(grown.mask[:, 8:]).any()
    np.testing.assert_array_equal(grown.mask[:, :seq], np.repeat(np.asarray(mask), n, 0))
    assert int(grown.index) == seq
    with pytest.raises(ValueError, match="shrink"):
        grow(grown, 8)
