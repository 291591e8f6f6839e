"""NF4 base weights (qwenvl_jax.quant) against bitsandbytes' CPU path, bit for bit.

bitsandbytes and torch are references only; the code under test never imports them. Our kernels are
`(..., in, out)`, the torch weights `(out, in)`: every comparison transposes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qwenvl_jax import quant


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes.functional; the parity tests skip without it."""
    pytest.importorskip("torch")
    return pytest.importorskip("bitsandbytes.functional")


def _normal(shape, dtype=np.float32, *, zero_block_and_outlier=False):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
    if zero_block_and_outlier:
        w[..., 64:128, 3] = 0.0  # one whole block of output 3
        w[..., 5, 7] = 1000.0  # its block codes to 7s and 15; its absmax dominates the offset
    return w.astype(dtype)


def _on_code_midpoints():
    """Blocks of values within 3 ulp of `absmax * midpoint` for every NF4 midpoint, for a few absmax.

    Dividing by the absmax instead of multiplying by its reciprocal, or giving a tie the upper code,
    changes some of these codes.
    """
    f32 = np.float32
    midpoints = np.array(quant._nf4_midpoints(), f32)
    blocks = []
    for absmax in map(f32, [1.0, 0.7, 0.0123, 3.3, 0.02718]):
        below = above = absmax * midpoints
        x = [below]
        for _ in range(3):
            below, above = np.nextafter(below, f32(-np.inf)), np.nextafter(above, f32(np.inf))
            x += [below, above]
        x = np.concatenate(x)
        x = np.resize(x[np.abs(x) < absmax], 2 * 63).reshape(2, 63)
        blocks.append(np.concatenate([np.full((2, 1), absmax, f32), x], axis=1))
    return np.concatenate(blocks).T  # (in=64, out=10)


def _torch(w_io, dtype):
    import torch

    return torch.from_numpy(np.array(np.asarray(w_io, np.float32).T, order="C")).to(dtype)


def _bits(x):
    """Bit patterns, so that a test also tells -0.0 from 0.0."""
    x = np.asarray(x)
    return x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize])


def _torch_bits(t):
    import torch

    t = t.contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else _bits(t.numpy())


def _bnb_state(bnb, q, shape_oi, dtype):
    """A bitsandbytes QuantState holding our quantized arrays (one unstacked NF4Weight)."""
    import torch

    absmax = torch.from_numpy(np.array(np.asarray(q.absmax).T, order="C").reshape(-1))
    state = dict(
        shape=shape_oi, dtype=dtype, blocksize=64, code=bnb.get_4bit_type("nf4", "cpu"), quant_type="nf4"
    )
    if not q.double_quant:
        return bnb.QuantState(absmax=absmax, **state)
    state2 = bnb.QuantState(
        absmax=torch.from_numpy(np.array(q.absmax2)),
        code=bnb.create_dynamic_map(signed=True),
        blocksize=256,
        dtype=torch.float32,
    )
    return bnb.QuantState(absmax=absmax, offset=torch.tensor(float(q.offset)), state2=state2, **state)


def test_code_tables_are_bitsandbytes(bnb):
    qwix_nf4 = np.asarray(quant.qwix_numerics.get_nf4_buckets(), np.float32)
    np.testing.assert_array_equal(_bits(qwix_nf4), _bits(bnb.get_4bit_type("nf4", "cpu").numpy()))
    np.testing.assert_array_equal(
        _bits(quant._dynamic_map()), _bits(bnb.create_dynamic_map(signed=True).numpy())
    )


def test_dynamic_rounding_is_the_cpu_kernels(bnb):
    """Values on each code threshold, one ulp either side, and uniform ones: the CPU kernel's 8-bit codes."""
    import torch

    thresholds, _ = quant._dynamic_thresholds()
    x = np.concatenate(
        [
            thresholds,
            np.nextafter(thresholds, np.float32(-2)),
            np.nextafter(thresholds, np.float32(2)),
            np.random.default_rng(0).uniform(-1, 1, 20_000).astype(np.float32),
        ]
    )
    x = x[np.abs(x) < 1][: len(x) // 255 * 255].reshape(-1, 255)
    x = np.concatenate([np.ones((len(x), 1), np.float32), x], axis=1).reshape(-1)  # absmax 1 per block
    ref, state = bnb.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    assert np.all(state.absmax.numpy() == 1)
    np.testing.assert_array_equal(np.asarray(quant._dynamic_code(jnp.asarray(x))), ref.numpy())


CASES = {  # kernels (..., in, out)
    "f32-128x64": lambda: _normal((128, 64)),
    "f32-256x192": lambda: _normal((256, 192)),
    "bf16-256x192": lambda: _normal((256, 192), ml_dtypes.bfloat16),
    "f32-stacked-2x128x64": lambda: _normal((2, 128, 64)),
    "f32-zero-block-outlier-256x192": lambda: _normal((256, 192), zero_block_and_outlier=True),
    "f32-on-code-midpoints-64x10": _on_code_midpoints,
}


@pytest.mark.parametrize("double_quant", [True, False], ids=["double", "single"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_bitsandbytes(bnb, case, double_quant):
    import torch

    w = CASES[case]()
    shape, dtype = w.shape, w.dtype
    torch_dtype = torch.bfloat16 if dtype == ml_dtypes.bfloat16 else torch.float32
    q = quant.quantize_nf4(w, double_quant=double_quant)
    assert q.shape == shape and q.double_quant == double_quant
    assert q.nbytes == quant.nf4_bytes(shape, double_quant=double_quant)
    dequantize = jax.jit(quant.dequantize_nf4, static_argnums=1)

    for layer in np.ndindex(shape[:-2]):  # each leading index is its own torch weight
        q_l = jax.tree.map(lambda x, layer=layer: x[layer], q)
        w_t = _torch(w[layer], torch_dtype)
        packed, state = bnb.quantize_4bit(
            w_t, blocksize=64, quant_type="nf4", compress_statistics=double_quant
        )
        np.testing.assert_array_equal(np.asarray(q_l.codes).T.reshape(-1), packed.numpy().reshape(-1))
        _, single = bnb.quantize_4bit(w_t, blocksize=64, quant_type="nf4", compress_statistics=False)
        absmax_ref = single.absmax.numpy()
        if double_quant:
            # Two float32 means summed in different orders (PyTorch's own order depends on the CPU's
            # vector width and thread count).
            offset, offset_ref = np.float32(q_l.offset), state.offset.numpy()
            assert abs(offset - offset_ref) <= 2 * np.spacing(offset_ref)
            # Given our offset, bitsandbytes' own double quantization is ours, bit for bit.
            qabsmax_ref, state2_ref = bnb.quantize_blockwise(
                torch.from_numpy(absmax_ref - offset), blocksize=256
            )
            np.testing.assert_array_equal(np.asarray(q_l.absmax).T.reshape(-1), qabsmax_ref.numpy())
            np.testing.assert_array_equal(_bits(q_l.absmax2), _bits(state2_ref.absmax.numpy()))
        else:
            np.testing.assert_array_equal(_bits(np.asarray(q_l.absmax).T.reshape(-1)), _bits(absmax_ref))

        # Dequantization (jitted) is bitsandbytes' dequantize_4bit of the same quantized weight, in
        # float32 and in bfloat16, bit for bit.
        ours = _bnb_state(bnb, q_l, w_t.shape, torch.float32)
        for jnp_dtype, out_dtype in [(jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)]:
            ours.dtype = out_dtype
            ref = bnb.dequantize_4bit(torch.from_numpy(np.array(np.asarray(q_l.codes).T, order="C")), ours)
            got = dequantize(q_l, jnp_dtype)
            np.testing.assert_array_equal(_bits(got), _torch_bits(ref.T))
            np.testing.assert_array_equal(_bits(dequantize(q, jnp_dtype)[layer]), _bits(got))

        # End to end: bitsandbytes' quantize_4bit then dequantize_4bit, against ours. Without double
        # quantization there is no mean, and bfloat16 absmax values sum exactly in float32, so the
        # offsets agree too: bit for bit.
        if not double_quant or dtype == ml_dtypes.bfloat16:
            assert not double_quant or np.float32(q_l.offset) == state.offset.numpy()
            ref = bnb.dequantize_4bit(packed, state).T
            np.testing.assert_array_equal(_bits(dequantize(q_l, jnp.dtype(dtype))), _torch_bits(ref))


def test_offset_is_pytorchs_mean_when_the_sum_is_exact(bnb):
    """bfloat16 weights have bfloat16 absmax values, whose float32 sums are exact in any order; the
    offset is then PyTorch's float32 mean bit for bit (a true division by n, where XLA's own mean
    multiplies by 1/n), for each of 64 stacked weights."""
    import torch

    w = _normal((64, 64, 192), ml_dtypes.bfloat16)
    absmax = np.asarray(quant.quantize_nf4(w, double_quant=False).absmax)
    ref = torch.from_numpy(np.array(absmax.swapaxes(-1, -2).reshape(64, -1))).mean(-1).numpy()
    np.testing.assert_array_equal(_bits(quant.quantize_nf4(w).offset), _bits(ref))


@pytest.mark.parametrize("shape", [(96, 64), (2, 100, 64), (64,)])
def test_refuses_in_not_a_multiple_of_the_block(shape):
    for call in (lambda: quant.quantize_nf4(np.zeros(shape, np.float32)), lambda: quant.nf4_bytes(shape)):
        with pytest.raises(ValueError, match=r"block_size=64") as e:
            call()
        assert str(shape) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 3), (640, 96), (28, 3584, 18944), (36, 11008, 2048)])
def test_nf4_bytes_is_what_quantize_returns(shape, double_quant):
    """Qwen2.5-VL 7B and 3B stacks included, through eval_shape (nothing is allocated)."""
    q = jax.eval_shape(
        lambda w: quant.quantize_nf4(w, double_quant=double_quant), jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    )
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(q))
    assert nbytes == quant.nf4_bytes(shape, double_quant=double_quant)
    if np.prod(shape) < 1e6:
        return
    # Half a byte per parameter, plus 8 bits (double) or 32 bits (single) per block of 64.
    per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
    assert nbytes == pytest.approx(per_param * np.prod(shape), rel=1e-3)
