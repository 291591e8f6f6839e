"""4-bit NormalFloat (NF4) base weights for QLoRA, bit-compatible with bitsandbytes.

`quantize_nf4(w)` takes one kernel in our `(in, out)` layout (the transpose of PyTorch's
`nn.Linear.weight (out, in)`), or a stack `(..., in, out)` of them, each quantized as its own weight, and
produces what `bitsandbytes.functional.quantize_4bit(w_torch, blocksize=64, quant_type="nf4",
compress_statistics=True)` produces on bitsandbytes' CPU path (0.50.2):

- blocks of `block_size` consecutive elements of the row-major `(out, in)` weight, i.e. along `in` for
  each `out`; `absmax` per block in float32; every element multiplied by the float32 reciprocal
  `1 / absmax`, clipped to [-1, 1], and coded as the number of float32 midpoints `(t[i] + t[i+1]) / 2`
  of the NF4 table `t` strictly below it (`torch.bucketize`: a value on a midpoint takes the lower
  code); an all-zero block has absmax 0 and codes 7 (the 0.0 entry);
- double quantization of the absmax ("compress_statistics"): `offset = absmax.mean()` (float32), then
  `absmax - offset` quantized in blocks of `double_block_size` (256) with bitsandbytes' signed dynamic
  8-bit map (`create_dynamic_map(signed=True)`): float32 `absmax2` per block, and each value coded the
  way the CPU kernel (`quantize_cpu_impl`, csrc/cpu_ops.cpp) codes it, through a 65536-entry lookup
  table over [-1, 1] rather than to the nearest code (the two differ for about 0.1% of values, by one
  code). bitsandbytes' CUDA kernels round differently (nearest code for 8 bits, a threshold tree for
  NF4); the CPU path is the one a test can run.

Layout (`NF4Weight`): every array keeps the kernel's axes, so a sharding rule for the kernel applies to
its quantized form, and unpacking interleaves rows, never the minor (lane) axis.

    codes    (..., in // 2, out)          uint8: byte [i, o] = code[2i, o] << 4 | code[2i + 1, o]. Per
                                          weight, `codes.T` is bitsandbytes' packed weight reshaped to
                                          (out, in // 2): pairs along `in`, high nibble first.
    absmax   (..., in // block_size, out) float32, or (double_quant) uint8 codes of the dynamic map.
    absmax2  (..., n_blocks2)             float32; blocks of double_block_size over the absmax in PyTorch
                                          order, `absmax.swapaxes(-1, -2).reshape(..., -1)`.
    offset   (...,)                       float32.

Codes are packed two per uint8 rather than held as `jnp.uint4`: XLA's CPU backend stores uint4 one
element per byte (`on_device_size_in_bytes`), so only explicit packing gives 0.5 byte per parameter on
every backend, and uint8 goes into any checkpoint as it is.

A kernel whose `in` is not a multiple of `block_size` is refused: bitsandbytes blocks the flattened
weight, so such a block straddles two output rows and has no place in a per-(block, out) layout.
bitsandbytes itself gets these shapes wrong: its 0.50.2 CPU dequantizer (the AVX-512 path, taken when
`in % 16 == 0`) indexes the absmax per row with `in // 64` and returns wrong values, e.g. for
(out, in) = (64, 96). In Qwen2.5-VL the one such kernel is the vision MLP's down projection
(in = 3420), which stays unquantized.

Agreement with bitsandbytes (tests/test_quant.py): the 4-bit codes and the float32 absmax are
identical; given the same offset, so are the 8-bit absmax codes and absmax2; and `dequantize_nf4` of a
quantized weight is `dequantize_4bit` of it, bit for bit, in float32 and in bfloat16. The offset is a
float32 sum divided by n, and a float32 sum depends on its order: PyTorch's depends on the CPU's vector
width and, above 32768 blocks, on its thread count; ours is an explicit balanced tree of adds, whose
order XLA keeps. The two agree when the sum is exact (in practice always for bfloat16 weights, whose absmax
values have 8 significant bits) and otherwise in about half the float32 weights, differing by an ulp
or two when they do not; absmax2 then moves by an ulp and a rare 8-bit code on a rounding boundary
moves by one step (8 of 655360 for ten random 2048 x 2048 float32 weights, changing those blocks'
scales by up to 1%). bitsandbytes run with 1 and with 2 threads on the same weights differs from itself
in the same way (7 codes, 0.2%). Weights denormal in float32 are flushed to zero by XLA, the one input
whose codes are not reproduced.

What comes from qwix, and what is ours. From qwix (Google's JAX quantization library) we take the NF4
code table, `qwix._src.core.numerics.get_nf4_buckets` (QLoRA appendix E; bitwise the 16 float32 values
of bitsandbytes' `get_4bit_type("nf4")`), and the dequantization, `qwix.dequantize` of a
`qwix.QArray(codes, absmax, qtype="nf4")`: the table lookup times the absmax broadcast over its tile,
one float32 multiply per element, which is what bitsandbytes' CPU kernel computes, so the results are
bit-identical. The encoder is ours because `qwix.quantize(w, "nf4", channelwise_axes=[out],
tiled_axes={in: 64})` does not reproduce bitsandbytes' codes: it picks `argmin |t - x|`, the true
nearest code, where bitsandbytes compares with the float32-rounded midpoints, so they disagree on a value
equal to one of the 6 midpoints that rounded up (54 of 640 codes of the test's midpoint weight); it
keeps a bfloat16 weight's scale in bfloat16 and divides in bfloat16, rounding the scaled value before
coding it (0.19% of the codes of a random bfloat16 weight differ); it stores scale 1.0 for an all-zero
block where bitsandbytes stores 0, which enters the double-quantization mean; and it divides by the
scale where bitsandbytes multiplies by the reciprocal (XLA's CPU backend happens to compile a division
by a broadcast scale into the latter; we write the reciprocal rather than rely on it). Its codes are
also `jnp.uint4`, a byte each on CPU. qwix quantizes no scales and has no dynamic 8-bit map, so double
quantization is ours too.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.core import numerics as qwix_numerics

NF4_BLOCK_SIZE = 64
DOUBLE_BLOCK_SIZE = 256


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("codes", "absmax", "absmax2", "offset"),
    meta_fields=("block_size", "double_block_size"),
)
@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """One NF4 kernel `(..., in, out)` (layout in the module docstring).

    Shapes are read from the arrays, never stored, so slicing a stack along its leading axes (a scan
    over layers) yields the NF4Weight of each layer. `absmax2` and `offset` are None without double
    quantization, and `absmax` is then float32.
    """

    codes: jax.Array
    absmax: jax.Array
    absmax2: jax.Array | None
    offset: jax.Array | None
    block_size: int = NF4_BLOCK_SIZE
    double_block_size: int = DOUBLE_BLOCK_SIZE

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's shape `(..., in, out)`."""
        *lead, half_in, n_out = self.codes.shape
        return (*lead, 2 * half_in, n_out)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def quantize_nf4(
    w,
    *,
    block_size: int = NF4_BLOCK_SIZE,
    double_quant: bool = True,
    double_block_size: int = DOUBLE_BLOCK_SIZE,
) -> NF4Weight:
    """NF4-quantize a kernel `(..., in, out)` as bitsandbytes' `quantize_4bit` quantizes each `(out, in)`.

    Every leading index is its own weight (its own offset and absmax2). float32, bfloat16 and float16
    weights are quantized from their float32 values, as bitsandbytes does. Jittable (and
    `jax.eval_shape`-able, for the abstract state of a quantized model).
    """
    w = jnp.asarray(w)
    _check_shape(w.shape, block_size, double_block_size)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"NF4 quantizes floating weights, got {w.dtype}")
    return _quantize(w, block_size, double_quant, double_block_size)


def dequantize_nf4(q: NF4Weight, dtype) -> jax.Array:
    """The kernel `(..., in, out)` in `dtype`: the float32 product code value x absmax, then cast (RNE).

    That is bitsandbytes' `dequantize_4bit` (output dtype = `dtype`), transposed. Jittable.
    """
    *lead, half_in, n_out = q.codes.shape
    # Unpack along `in`: (..., in/2, 2, out) -> (..., in, out) interleaves whole rows.
    codes_ko = jnp.stack([q.codes >> 4, q.codes & 0xF], axis=-2).reshape(*lead, 2 * half_in, n_out)
    w_ko = qwix.dequantize(qwix.QArray(qvalue=codes_ko, scale=_absmax_f32(q), qtype="nf4"))
    return w_ko.astype(dtype)


def nf4_bytes(
    shape,
    *,
    block_size: int = NF4_BLOCK_SIZE,
    double_quant: bool = True,
    double_block_size: int = DOUBLE_BLOCK_SIZE,
) -> int:
    """Bytes of `quantize_nf4` of a kernel of `shape` (all arrays of the NF4Weight), for memory plans."""
    shape = tuple(shape)
    _check_shape(shape, block_size, double_block_size)
    *lead, n_in, n_out = shape
    n_absmax = n_in // block_size * n_out
    if double_quant:
        per_weight = n_in * n_out // 2 + n_absmax + 4 * math.ceil(n_absmax / double_block_size) + 4
    else:
        per_weight = n_in * n_out // 2 + 4 * n_absmax
    return math.prod(lead) * per_weight


def is_nf4(x) -> bool:
    return isinstance(x, NF4Weight)


def map_arrays(fn, q: NF4Weight, kernel_axes) -> NF4Weight:
    """`q` with each array `x` replaced by `fn(x, axes)`, `axes` its logical axes given the kernel's
    `(..., in_axis, out_axis)`: the codes are laid out like the kernel (pairs of `in` by `out`); the
    absmax like it along `out` and whole along its blocks of `in` (`in / 64` rows, which an FSDP split
    rarely divides: 3584 / 64 = 56 over 16 devices; whole, it costs 1/128 of a bf16 kernel); absmax2 and
    offset keep the kernel's leading (layer) axes only, their own axis whole. For the shardings of a
    quantized kernel, which thereby follow the kernel's rules."""
    axes = tuple(kernel_axes)
    lead = axes[:-2]
    return dataclasses.replace(
        q,
        codes=fn(q.codes, axes),
        absmax=fn(q.absmax, (*lead, None, axes[-1])),
        absmax2=None if q.absmax2 is None else fn(q.absmax2, (*lead, None)),
        offset=None if q.offset is None else fn(q.offset, lead),
    )


QUANTIZED_SCOPES = ("text/layers/",)
VISION_SCOPES = ("visual/",)
QUANTIZE_KINDS = ("nf4",)


def nf4_targets(shapes, *, vision: bool = False) -> list[str]:
    """The kernels QLoRA stores in NF4, of `{"a/b/kernel": shape}`: every kernel of the decoder layers
    (attention and MLP projections), and with `vision` the vision tower's and merger's kernels whose
    `in` is a multiple of the block size. That is all of them but the vision MLP's down projection
    (in = 3420), which stays at the param dtype (see `_check_shape`).

    Embeddings, norms, biases and the LM head stay unquantized, as transformers' `load_in_4bit` keeps
    `lm_head` and every non-Linear. The vision tower stays unquantized by default: it is 0.7 B
    parameters of 7 B, and its activations, not its weights, dominate a vision step's memory.
    """
    kernels = {path: shape for path, shape in shapes.items() if path.endswith("/kernel") and len(shape) >= 2}
    text = [path for path in kernels if path.startswith(QUANTIZED_SCOPES)]
    tower = [path for path, shape in kernels.items()  # the patch embedding is a convolution, not a Linear
             if vision and path.startswith(VISION_SCOPES) and not path.startswith("visual/patch_embed/")
             and shape[-2] % NF4_BLOCK_SIZE == 0]  # fmt: skip
    return sorted(text + tower)


def per_array(fn, x, kernel_axes):
    """`fn(x, kernel_axes)` for a plain parameter; for a quantized kernel, `map_arrays(fn, x, ...)`: the
    one way the project lays out, sizes or casts a parameter leaf that may be quantized."""
    return map_arrays(fn, x, kernel_axes) if is_nf4(x) else fn(x, tuple(kernel_axes))


def quantize_stream(w, dtype=None, **options) -> NF4Weight:
    """`quantize_nf4` of a host kernel `(..., in, out)` one weight at a time: each leading index is cast
    to `dtype` (the weight's precision as loaded; None keeps it), moved to the device and quantized alone,
    so a stack of layers never stands on the device in full precision (only one layer does, beside the
    quantized ones), nor is copied whole on the host."""
    w = np.asarray(w) if not isinstance(w, jax.Array) else w

    def one(x):
        return quantize_nf4(x if dtype is None else x.astype(dtype), **options)

    if w.ndim == 2:
        return one(w)
    *lead, n_in, n_out = w.shape
    flat = w.reshape(-1, n_in, n_out)
    parts = [one(flat[i]) for i in range(flat.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*lead, *xs[0].shape), *parts)


def _check_shape(shape, block_size: int, double_block_size: int) -> None:
    if block_size <= 0 or block_size % 2 or double_block_size <= 0:
        raise ValueError(
            f"NF4 needs an even block_size > 0 and a double_block_size > 0, got {block_size} and "
            f"{double_block_size}"
        )
    if len(shape) < 2 or shape[-2] % block_size or 0 in shape:
        raise ValueError(
            f"NF4 needs a kernel (..., in, out) with `in` a multiple of block_size={block_size}, got shape "
            f"{tuple(shape)} (bitsandbytes' blocks would straddle output rows)"
        )


@functools.cache
def _nf4_midpoints() -> tuple[float, ...]:
    """The 15 float32 midpoints between consecutive NF4 codes, rounded as PyTorch rounds them."""
    with jax.ensure_compile_time_eval():  # a concrete array even when first called under jit
        table = np.asarray(qwix_numerics.get_nf4_buckets(), np.float32)
    return tuple(float(m) for m in (table[:-1] + table[1:]) / np.float32(2))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(w, block_size: int, double_quant: bool, double_block_size: int) -> NF4Weight:
    *lead, n_in, n_out = w.shape
    w_kbo = w.astype(jnp.float32).reshape(*lead, n_in // block_size, block_size, n_out)
    absmax_ko = jnp.max(jnp.abs(w_kbo), axis=-2)
    # bitsandbytes takes 1 / max(absmax, 1e-38); 1e-38 is denormal, which XLA flushes to zero. Both
    # clamps only matter for an all-zero block, whose values then scale to 0 (code 7) either way.
    inv_ko = 1 / jnp.maximum(absmax_ko, jnp.finfo(jnp.float32).tiny)
    x_kbo = jnp.clip(w_kbo * inv_ko[..., None, :], -1, 1)
    # torch.bucketize(x, midpoints): the number of midpoints strictly below x (ties take the lower code).
    codes = sum((x_kbo > m).astype(jnp.uint8) for m in _nf4_midpoints()).reshape(*lead, n_in // 2, 2, n_out)
    codes = codes[..., 0, :] << 4 | codes[..., 1, :]
    if not double_quant:
        return NF4Weight(codes, absmax_ko, None, None, block_size, double_block_size)
    qabsmax, absmax2, offset = _double_quantize(absmax_ko, double_block_size)
    return NF4Weight(codes, qabsmax, absmax2, offset, block_size, double_block_size)


def _double_quantize(absmax_ko, double_block_size: int):
    """bitsandbytes' `quantize_blockwise(absmax - absmax.mean(), blocksize=256)` on CPU, per weight."""
    *lead, n_k, n_out = absmax_ko.shape
    absmax_n = jnp.swapaxes(absmax_ko, -1, -2).reshape(*lead, n_k * n_out)  # PyTorch order
    # PyTorch's mean: a float32 sum, then a true division by n. XLA rewrites a division by a constant
    # into a multiplication by its reciprocal, which rounds differently, so n is counted from the data.
    n = jnp.sum(absmax_n >= 0, axis=-1, dtype=jnp.int32).astype(jnp.float32)
    offset = _pairwise_sum(absmax_n) / n
    v_cb = _blocks(absmax_n - offset[..., None], double_block_size)
    absmax2 = jnp.max(jnp.abs(v_cb), axis=-1)
    nonzero = absmax2 > 0
    q_cb = _dynamic_code(v_cb * (1 / jnp.where(nonzero, absmax2, 1))[..., None])
    # The CPU kernel writes code 0 (not the 0.0 code) for a block whose values are all zero.
    q_cb = jnp.where(nonzero[..., None], q_cb, jnp.uint8(0))
    q_ko = jnp.swapaxes(_unblocks(q_cb, n_k * n_out).reshape(*lead, n_out, n_k), -1, -2)
    return q_ko, absmax2, offset


def _pairwise_sum(x_n):
    """The float32 sum over the last axis as a balanced tree of adds (zero-padded to a power of two).

    Its rounding error grows with log n where a running sum's grows with n (an outlier absmax among
    small ones cost XLA's reduction 2 ulp of the offset), and XLA does not reorder explicit adds, so
    the order does not depend on the backend.
    """
    n = x_n.shape[-1]
    x_n = jnp.pad(x_n, [(0, 0)] * (x_n.ndim - 1) + [(0, (1 << (n - 1).bit_length()) - n)])
    while x_n.shape[-1] > 1:
        x_n = x_n[..., 0::2] + x_n[..., 1::2]
    return x_n[..., 0]


def _absmax_f32(q: NF4Weight) -> jax.Array:
    """The float32 absmax `(..., in // block_size, out)`: bitsandbytes' `code[q] * absmax2 + offset`."""
    if not q.double_quant:
        return q.absmax
    *lead, n_k, n_out = q.absmax.shape
    q_cb = _blocks(jnp.swapaxes(q.absmax, -1, -2).reshape(*lead, n_k * n_out), q.double_block_size)
    absmax_cb = jnp.asarray(_dynamic_map())[q_cb] * q.absmax2[..., None]
    # bitsandbytes rounds the product, then adds the offset. XLA's CPU backend fuses a multiply that
    # feeds an add into one multiply-add (one rounding: an absmax, and the 64 weights it scales, move by
    # an ulp). A select the compiler cannot prove to be the identity (the product is NaN-free only at
    # run time) keeps the two roundings. optimization_barrier and reduce_precision are compiled away,
    # and a select on the per-block absmax2 did not survive for a weight of one block.
    absmax_cb = jnp.where(absmax_cb == absmax_cb, absmax_cb, 0)
    absmax_n = _unblocks(absmax_cb, n_k * n_out) + q.offset[..., None]
    return jnp.swapaxes(absmax_n.reshape(*lead, n_out, n_k), -1, -2)


def _blocks(x_n, block: int):
    """`(..., n)` -> `(..., ceil(n / block), block)`, the last block zero-padded."""
    n = x_n.shape[-1]
    pad = -n % block
    x_n = jnp.pad(x_n, [(0, 0)] * (x_n.ndim - 1) + [(0, pad)])
    return x_n.reshape(*x_n.shape[:-1], (n + pad) // block, block)


def _unblocks(x_cb, n: int):
    return x_cb.reshape(*x_cb.shape[:-2], -1)[..., :n]


@functools.cache
def _dynamic_map() -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted float32 codes in [-1, 1], bit for bit.

    Seven exponent levels 10^-6..10^0, each holding the float32 midpoints of `torch.linspace(0.1, 1,
    2^i + 1)` scaled by the level and mirrored, plus 0 and 1. PyTorch's CPU linspace computes
    `start + step * i` below the halfway index and `end - step * (n - 1 - i)` above it, each as one
    fused multiply-add in float32 (float64 is exact for the product, so one rounding to float32 matches).
    """
    f32 = np.float32
    start, end = f32(0.1), f32(1.0)
    data = [f32(0.0), f32(1.0)]
    for level in range(7):
        n = 2**level + 1
        step = f32((end - start) / f32(n - 1))
        i = np.arange(n)
        below = (np.float64(start) + np.float64(step) * i).astype(f32)
        above = (np.float64(end) - np.float64(step) * (n - 1 - i)).astype(f32)
        bounds = np.where(i < n // 2, below, above)
        means = (bounds[:-1] + bounds[1:]) / f32(2)
        scaled = f32(10.0 ** (level - 6)) * means
        data += [*scaled, *-scaled]
    return np.sort(np.array(data, f32))


@functools.cache
def _dynamic_thresholds() -> tuple[np.ndarray, np.ndarray]:
    """The CPU kernel's rounding of a scaled value x in [-1, 1] to a dynamic-map code, as thresholds.

    The kernel reads `lut[uint16((x + 1) * 0.5 * 65535 + 0.5)]`, where `lut[i]` is the first code
    whose midpoint with the next is not below the grid point `-1 + 2i / 65535`. That map is monotone in
    x, so it is `codes[searchsorted(thresholds, x, side="right")]` with `thresholds` the smallest float32
    x at which the code steps up: found once here by bisection over the float32 values in [-1, 1].
    """
    f32 = np.float32
    table = _dynamic_map()
    midpoints = f32(0.5) * (table[:-1] + table[1:])
    grid = f32(-1) + (f32(2) * np.arange(65536, dtype=f32)) / f32(65535)
    lut = np.searchsorted(midpoints, grid, side="left")  # midpoints strictly below each grid point
    steps = np.flatnonzero(np.diff(lut)) + 1  # LUT indices where the code steps up

    def lut_index(key):  # key: float32 bit patterns ordered as integers (negative floats below zero)
        bits = np.where(key < 0, (-key) | np.int64(0x80000000), key).astype(np.uint32)
        half = (bits.view(f32) + f32(1)) * f32(0.5)
        # One rounding of the exact half * 65535 + 0.5 (float64 holds it exactly), as the fused
        # multiply-add of the -mfma build; rounding the product first gives the same codes.
        return np.trunc((half.astype(np.float64) * 65535 + 0.5).astype(f32)).astype(np.int64)

    lo = np.full(steps.shape, -int(f32(1).view(np.int32)), np.int64)  # key of -1.0
    hi = np.full(steps.shape, int(f32(1).view(np.int32)), np.int64)  # key of 1.0
    while np.any(lo < hi):  # smallest key with lut_index(key) >= step
        mid = (lo + hi) // 2
        up = lut_index(mid) >= steps
        hi = np.where(up, mid, hi)
        lo = np.where(up, lo, mid + 1)
    thresholds = np.where(lo < 0, (-lo) | np.int64(0x80000000), lo).astype(np.uint32).view(f32)
    codes = np.concatenate([lut[:1], lut[steps]]).astype(np.uint8)
    return thresholds, codes


def _dynamic_code(x):
    """The CPU kernel's dynamic-map code of x (float32), clipped to [-1, 1] as the kernel clips it."""
    thresholds, codes = _dynamic_thresholds()
    x = jnp.clip(x, -1, 1)
    return jnp.asarray(codes)[jnp.searchsorted(jnp.asarray(thresholds), x, side="right")]
