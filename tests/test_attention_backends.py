"""The fused attention backends, on CPU: numbers and programs.

- "splash_interpret" runs TPU splash attention through the Pallas interpreter and must equal the "xla"
  reference in float32, forward and gradients: the decoder's causal case (right padding, packed rows,
  lengths) and the vision tower's (segment ids of windows and frames, budget padding -1, head dim 80).
- Lengths (unpacked, right-padded rows) give the same numbers on every backend, padding queries zero.
- The GPU and TPU programs are lowered here for "cuda" and "tpu" (`lowering_platforms`) and their custom
  calls read back: cuDNN's fused attention with no mask operand for unpacked rows (and, for packed rows,
  the `(B, 1, T, S)` bias and its discarded gradient, as the attention module documents), and Mosaic
  splash kernels with no dense attention matrix anywhere in the TPU program.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo

from qwenvl_jax.config import PRESETS
from qwenvl_jax.model import Qwen25VL, attention
from qwenvl_jax.model.attention import BACKENDS

FWD_ATOL, GRAD_ATOL = 1e-5, 2e-5  # float32; max |output| ~2 and max |gradient| ~8 on these inputs


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def _value_and_grads(backend, q, k, v, w, **kw):
    """The output and d(sum(out * w))/d(q, k, v): a random cotangent, so every output entry counts."""

    def loss(q, k, v):
        out = attention(q, k, v, backend=backend, **kw)
        return jnp.sum(out * w), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _assert_backends_agree(got, want, real_q=None):
    (out_got, grads_got), (out_want, grads_want) = got, want
    if real_q is not None:  # segment ids: padding rows are finite garbage, compared on real rows only
        out_got, out_want = out_got[real_q], out_want[real_q]
    assert np.isfinite(np.asarray(out_got)).all()
    assert maxdiff(out_got, out_want) < FWD_ATOL
    for g_got, g_want in zip(grads_got, grads_want, strict=True):
        assert np.isfinite(np.asarray(g_got)).all()
        assert maxdiff(g_got, g_want) < GRAD_ATOL


# ------------------------------------------------------------------------------- splash numerics


def _text_case(seed=0):
    """2 rows x 200 tokens (not a multiple of the kernel's 128-row blocks), 4 query heads on 2 kv heads,
    head dim 64 (padded to 128 inside): row 0 right-padded, row 1 three packed segments then padding."""
    rng = np.random.default_rng(seed)
    b, t, n, k, h = 2, 200, 4, 2, 64
    q, kk, v, w = (_normal(rng, s) for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)))
    seg = np.zeros((b, t), np.int32)
    seg[0, :150] = 1
    seg[1, :60], seg[1, 60:130], seg[1, 130:190] = 1, 2, 3
    return q, kk, v, w, seg


def test_splash_equals_reference_causal_text_segments():
    q, kk, v, w, seg = _text_case()
    kw = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), causal=True, scale=0.2)
    want = _value_and_grads("xla", q, kk, v, w, **kw)
    # The gradients flow through padding rows too (random cotangent): those rows must match as well.
    _assert_backends_agree(_value_and_grads("splash_interpret", q, kk, v, w, **kw), want)


def test_lengths_agree_on_every_backend_and_with_segment_ids():
    """Unpacked right-padded rows by their lengths: xla, splash and the cuDNN call's arguments (dpa_xla)
    agree everywhere (padding queries are zero on all three), and equal segment ids on the real rows.
    One row is all padding (length 0, a `collate` filler row): zeros, no NaN."""
    q, kk, v, w, _ = _text_case(seed=1)
    lengths = jnp.asarray([150, 0], jnp.int32)
    kw = dict(q_lengths=lengths, kv_lengths=lengths, causal=True, scale=0.2)
    want = _value_and_grads("xla", q, kk, v, w, **kw)
    real_q = np.arange(q.shape[1])[None, :] < np.asarray(lengths)[:, None]
    assert not np.asarray(want[0])[~real_q].any()
    for backend in ("splash_interpret", "dpa_xla"):
        _assert_backends_agree(_value_and_grads(backend, q, kk, v, w, **kw), want)
    seg = jnp.asarray(real_q.astype(np.int32))
    by_segments = attention(q, kk, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True, scale=0.2)
    assert maxdiff(np.asarray(by_segments)[real_q], np.asarray(want[0])[real_q]) < FWD_ATOL


def test_splash_equals_reference_vision_segments():
    """The vision tower's call: one row of P patches, full attention within segment ids (windows of at
    most 64 rows, frames, budget padding -1), 4 heads of dim 80 (the 3B tower's head dim)."""
    rng = np.random.default_rng(2)
    p, n, h = 300, 4, 80
    q, kk, v, w = (_normal(rng, (1, p, n, h)) for _ in range(4))
    seg = np.full((1, p), -1, np.int32)
    for i, (lo, hi) in enumerate(((0, 64), (64, 100), (100, 164), (164, 228), (228, 270))):
        seg[0, lo:hi] = i
    kw = dict(q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg), causal=False)
    _assert_backends_agree(
        _value_and_grads("splash_interpret", q, kk, v, w, **kw), _value_and_grads("xla", q, kk, v, w, **kw)
    )


def test_splash_short_query_blocks_use_the_reference():
    """Fewer than 128 queries (a decode step against the cache): the reference einsum, bit for bit."""
    rng = np.random.default_rng(3)
    q, kk, v = _normal(rng, (2, 1, 4, 16)), _normal(rng, (2, 40, 2, 16)), _normal(rng, (2, 40, 2, 16))
    valid = jnp.asarray(np.arange(40)[None, :] < np.array([[25], [40]]), jnp.int32)
    kw = dict(q_segment_ids=jnp.ones((2, 1), jnp.int32), kv_segment_ids=valid)
    np.testing.assert_array_equal(
        attention(q, kk, v, backend="splash_interpret", **kw), attention(q, kk, v, backend="xla", **kw)
    )


def test_segment_ids_and_lengths_are_exclusive():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="not both"):
        attention(q, q, q, q_segment_ids=jnp.ones((1, 4)), kv_segment_ids=jnp.ones((1, 4)), q_lengths=[4])


def test_every_backend_is_a_config_choice():
    for backend in BACKENDS:
        assert PRESETS["tiny"].replace(attention_backend=backend).attention_backend == backend


# -------------------------------------------------------------------------- lowered programs


def custom_calls(hlo_text: str) -> list[dict]:
    """Every `stablehlo.custom_call` of a lowered module: target, operand and result types
    (`"2x256x16x128xbf16"`), and the attribute text (backend config, kernel name)."""
    calls = []
    for line in hlo_text.splitlines():
        found = re.search(r"stablehlo\.custom_call @(\S+?)\(", line)
        if not found:
            continue
        attrs, signature = line.rsplit(" : (", 1)
        operands, results = signature.split(") -> ", 1)
        calls.append(
            dict(
                target=found.group(1),
                operands=re.findall(r"tensor<([^>]*)>", operands),
                results=re.findall(r"tensor<([^>]*)>", results),
                attrs=attrs,
            )
        )
    return calls


def lower(fn, args, platform: str) -> str:
    """StableHLO of `jax.jit(fn)` lowered for `platform` on this CPU host (nothing is compiled or run)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _fwd_bwd(backend, array_kwargs=(), **static):
    """`(q, k, v, *arrays) -> gradients of q, k, v`: the training program, forward and backward kernels.
    `arrays` are passed to `attention` under the names `array_kwargs` (segment ids or lengths)."""

    def run(q, k, v, *arrays):
        def loss(q, k, v):
            out = attention(
                q, k, v, backend=backend, **dict(zip(array_kwargs, arrays, strict=True)), **static
            )
            return out.astype(jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return run


@pytest.fixture
def cudnn_lowering(monkeypatch):
    """Let jax build cuDNN attention on a host without cuDNN.

    jax's wrapper asks the local cuDNN library for its version before it builds the call
    (`fused_attention_stablehlo.check_cudnn_version`) and raises "cuDNN is not detected" with a CPU-only
    jaxlib. The version reaches only its support checks (compute capability 10.3 needs cuDNN 9.11, MLA
    needs 9.10), never the emitted program, so the fixture reports cuDNN 9.10; the compute-capability
    checks see no GPU and take the pre-Hopper limits (head dim <= 128), which our 128 and 80 meet. The
    program is jax's own lowering rule's output, unchanged.
    """
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


B, T, N, K, H = 2, 256, 16, 2, 128  # the 3B decoder's heads: 16 query heads on 2 kv heads of dim 128
QKV = (
    jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16),
    jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
    jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16),
)


SEGMENTS = ("q_segment_ids", "kv_segment_ids")


def _has_dims(type_str: str, *dims: int) -> bool:
    """True when a tensor type's trailing dims are `dims` (e.g. a `(..., T, S)` attention matrix)."""
    shape = type_str.split("x")[:-1]
    return [int(d) for d in shape[-len(dims) :]] == list(dims)


def test_cudnn_program_for_unpacked_rows_has_lengths_and_no_mask(cudnn_lowering):
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    program = lower(
        _fwd_bwd("cudnn", ("q_lengths", "kv_lengths"), causal=True), (*QKV, lengths, lengths), "cuda"
    )
    calls = [c for c in custom_calls(program) if c["target"].startswith("__cudnn$fmha")]
    assert [c["target"] for c in calls] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    for call in calls:
        assert "PADDING_CAUSAL" in call["attrs"]
        assert call["operands"].count(f"{B}xi32") == 2  # query and key/value lengths
        assert not any(_has_dims(t, T, T) for t in call["operands"] + call["results"])  # no (B, 1, T, S)
    # No dense attention anywhere: nothing in the whole program has (T, S) trailing dims.
    assert not re.search(rf"tensor<(\d+x)*{T}x{T}x\w+>", program)


def test_cudnn_program_for_packed_rows_reads_a_bias_and_discards_its_gradient(cudnn_lowering):
    """Segment ids (packed or left-padded rows): jax's cuDNN wrapper turns the boolean mask into an
    additive `(B, 1, T, S)` bias read by every head, and its backward kernel returns that bias's gradient
    too, which nothing reads (the mask is bool: no gradient reaches it)."""
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    run = _fwd_bwd("cudnn", SEGMENTS, causal=True)
    calls = [
        c for c in custom_calls(lower(run, (*QKV, seg, seg), "cuda")) if c["target"].startswith("__cudnn")
    ]
    fwd, bwd = calls
    assert (fwd["target"], bwd["target"]) == (
        "__cudnn$fmhaScaleBiasSoftmax",
        "__cudnn$fmhaScaleBiasSoftmaxBackward",
    )
    bias = f"{B}x1x{T}x{T}xbf16"
    assert "\\22mask_type\\22: \\22CAUSAL\\22" in fwd["attrs"]
    assert bias in fwd["operands"] and bias in bwd["operands"]
    assert bias in bwd["results"]  # dbias: computed on every backward pass, then dropped


def _splash_kernels(program: str) -> list[str]:
    calls = [c for c in custom_calls(program) if c["target"] == "tpu_custom_call"]
    return sorted(re.search(r'kernel_name = "([^"]+)"', c["attrs"]).group(1) for c in calls)


def test_tpu_program_is_splash_with_no_dense_attention():
    """The decoder's training attention lowered for TPU: Mosaic splash kernels (forward, dq, dkv) fed
    segment ids, and no (T, S) array anywhere in the program (its only XLA dot is the backward's rowwise
    `sum(dO * O)`)."""
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    program = lower(_fwd_bwd("splash", SEGMENTS, causal=True), (*QKV, seg, seg), "tpu")
    assert _splash_kernels(program) == [
        "splash_mha_dkv_segmented_no_residuals",
        "splash_mha_dq_segmented_no_residuals",
        "splash_mha_fwd_segmented_residuals",
    ]
    assert not re.search(rf"tensor<(\d+x)*{T}x{T}x\w+>", program)


def test_tpu_program_for_vision_frames_is_splash_without_a_patch_mask():
    """The vision tower's full blocks: one row of P = 1024 patches (frames as segment ids), 16 heads of
    dim 80 padded to 128 lanes, no P x P mask or logits."""
    p, heads = 1024, 16
    x = jax.ShapeDtypeStruct((1, p, heads, 80), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, p), jnp.int32)
    program = lower(_fwd_bwd("splash", SEGMENTS), (x, x, x, seg, seg), "tpu")
    assert len(_splash_kernels(program)) == 3
    assert not re.search(rf"tensor<(\d+x)*{p}x{p}x\w+>", program)
    assert f"tensor<1x{heads}x{p}x128xbf16>" in program  # the lane-padded head dim reaches the kernel


@pytest.mark.parametrize(("backend", "platform", "lengths", "targets"), [
    ("cudnn", "cuda", True, {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}),
    ("cudnn", "cuda", False, {"__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"}),
    ("splash", "tpu", True, {"tpu_custom_call"}),
])  # fmt: skip
def test_tiny_model_training_program_uses_the_fused_kernel(
    backend, platform, lengths, targets, cudnn_lowering
):
    """The whole decoder (tiny, bf16, 128 tokens), forward and backward, lowered for each platform: its
    attention is the platform's kernel. Unpacked right-padded rows (`collate`'s `seq_lengths`) reach cuDNN
    as lengths with no mask: no bias call at all; packed rows (segment ids only) take the masked call."""
    config = PRESETS["tiny"].replace(attention_backend=backend, dtype="bfloat16")
    graphdef, params, rest = nnx.split(Qwen25VL(config, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def run(params, ids, mask, *seq_lengths):
        def loss(params):
            model = nnx.merge(graphdef, params, rest)
            kw = {"seq_lengths": seq_lengths[0]} if seq_lengths else {}
            return model.hidden_states(ids, mask, **kw).astype(jnp.float32).sum()

        return jax.grad(loss)(params)

    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    extra = (jax.ShapeDtypeStruct((2,), jnp.int32),) if lengths else ()
    program = lower(run, (params, ids, ids, *extra), platform)
    found = {c["target"] for c in custom_calls(program)}
    assert targets <= found
    if backend == "cudnn" and lengths:
        assert not any("Bias" in t for t in found), found


def test_decoder_by_lengths_equals_decoder_by_segments():
    """The decoder on unpacked right-padded rows: attending by `seq_lengths` (the cuDNN call's arguments,
    on XLA through "dpa_xla") gives the hidden states of the segment-id mask at every real position."""
    config = PRESETS["tiny"].replace(attention_backend="dpa_xla", dtype="float32", param_dtype="float32")
    model = Qwen25VL(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = np.array([40, 64, 17])
    ids = rng.integers(0, 300, size=(3, 64)).astype(np.int32)
    mask = (np.arange(64)[None, :] < lengths[:, None]).astype(np.int32)
    by_segments = np.asarray(model.hidden_states(jnp.asarray(ids), jnp.asarray(mask)))
    by_lengths = np.asarray(
        model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), seq_lengths=jnp.asarray(lengths, jnp.int32))
    )
    real = mask.astype(bool)
    assert maxdiff(by_lengths[real], by_segments[real]) < 1e-5
