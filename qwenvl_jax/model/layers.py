"""Building blocks shared by the vision tower and the decoder: RMSNorm, Dense, SwiGLU MLP, Embed, stacks.

Dtype policy (every layer): parameters are stored in `param_dtype` and cast to the compute `dtype` at
use; activations leave a layer in `dtype`. The exceptions are where transformers computes in float32
inside a bf16 model (spec 6), and each is stated at its site.

Parameters carry `logical_axes` metadata (one name per dimension) and nothing else: a rules table maps
the names to mesh axes later, so modules can be built without a mesh.

Stacks: a layer of a stack is built once per layer under `jax.vmap`, so every parameter gets a leading
"layers" axis whatever `scan_layers` says; `run_stack` then scans (or loops) over that axis, so compile
time does not grow with depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.quant import dequantize_nf4, is_nf4, map_arrays
from qwenvl_jax.sharding import constrain_weight_at_use

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    if len(axes) != value.ndim:
        raise ValueError(f"logical_axes {axes} do not match a parameter of shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """RMSNorm computed as transformers' `Qwen2_5_VLRMSNorm` does (spec 6.1).

    Normalise in float32, cast back to the INPUT dtype, and only then multiply by the weight (cast to the
    compute dtype). Multiplying before the cast, as gemma does, rounds differently in bf16.
    """

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any, axes: Axes = ("norm",)):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.ones((dim,), param_dtype), axes)

    def __call__(self, x_sd: jax.Array) -> jax.Array:
        x32 = x_sd.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(x_sd.dtype)


class LoraWeight(nnx.Variable):
    """A LoRA factor attached to a `Dense` (`train.lora.attach`): not a Param, so a model's params and its
    checkpoint never contain it."""


class Dense(nnx.Module):
    """`y = x @ kernel (+ bias)` with a 2-D `(in, out)` kernel (a transposed torch Linear weight).

    Computes in `dtype` with the kernel and bias cast from `param_dtype`; the output is `dtype`, like a
    torch Linear in a model of that dtype.

    With LoRA factors attached (`lora_a (in, r)`, `lora_b (r, out)`, `lora_scale`: `train.lora.attach`)
    it adds `lora_scale * (x A) B`, as PEFT's `Linear` does, instead of reading a merged `W + scale A B`.

    The kernel may be NF4 (`qwenvl_jax.quant.NF4Weight`, QLoRA's frozen base): it is dequantized in `dtype`
    at use, as bitsandbytes' `Linear4bit` does, and again in the backward pass (`_nf4_matmul`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: tuple[str, str],
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        std = in_features**-0.5
        self.kernel = param(
            jax.random.normal(rngs.params(), (in_features, out_features), param_dtype) * std, axes
        )
        self.bias = param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None

    def __call__(self, x_nd: jax.Array) -> jax.Array:
        x_nd = x_nd.astype(self.dtype)
        kernel, axes = self.kernel.get_value(), self.kernel.logical_axes
        if is_nf4(kernel):
            y_nf = _nf4_matmul(x_nd, kernel, tuple(axes), self.dtype)
        else:
            # Under FSDP the kernel is gathered whole along its FSDP dim here, once per use (see sharding).
            kernel_df = constrain_weight_at_use(kernel.astype(self.dtype), axes)
            y_nf = jnp.einsum("...d,df->...f", x_nd, kernel_df)
        if self.bias is not None:
            y_nf = y_nf + self.bias[...].astype(self.dtype)
        lora_a = getattr(self, "lora_a", None)
        if lora_a is not None:
            x_in = x_nd
            if getattr(self, "lora_key", None) is not None:  # PEFT's dropout on the adapter's input
                key = jax.random.wrap_key_data(self.lora_key[...])
                keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x_nd.shape)
                x_in = jnp.where(keep, x_nd / (1.0 - self.lora_dropout), 0).astype(x_nd.dtype)
            x_nr = jnp.einsum("...d,dr->...r", x_in, lora_a[...].astype(self.dtype))
            y_nf = y_nf + self.lora_scale * jnp.einsum(
                "...r,rf->...f", x_nr, self.lora_b[...].astype(self.dtype)
            )
        return y_nf


@functools.partial(jax.checkpoint, static_argnums=(2, 3), policy=jax.checkpoint_policies.nothing_saveable)
def _nf4_matmul(x_nd: jax.Array, kernel, axes: tuple, dtype) -> jax.Array:
    """`x @ dequantize(kernel)`: the 4-bit codes gathered along the FSDP dim (a quarter of a bf16 kernel's
    bytes), dequantized in `dtype`, multiplied. Rematerialized as one unit, so the backward pass
    dequantizes again instead of keeping every layer's dequantized kernel from the forward pass (which
    would hold the model at `dtype` again: XLA:CPU's buffer assignment of a scan of such layers saves the
    whole dequantized stack when only the dequantization is rematerialized)."""
    gathered = map_arrays(lambda a, a_axes: constrain_weight_at_use(a, a_axes) if a.ndim == kernel.codes.ndim
                          else a, kernel, axes)  # fmt: skip
    return jnp.einsum("...d,df->...f", x_nd, dequantize_nf4(gathered, dtype))


class MLP(nnx.Module):
    """SwiGLU `down(silu(gate(x)) * up(x))`: `Qwen2MLP` (no biases) and the vision `Qwen2_5_VLMLP` (biases)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        use_bias: bool,
        embed_axis: str,
        mlp_axis: str,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(dim, hidden, axes=(embed_axis, mlp_axis), **kw)
        self.up_proj = Dense(dim, hidden, axes=(embed_axis, mlp_axis), **kw)
        self.down_proj = Dense(hidden, dim, axes=(mlp_axis, embed_axis), **kw)

    def __call__(self, x_nd: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_nd)) * self.up_proj(x_nd))


class Embed(nnx.Module):
    """Token embedding `(V, D)`; looked-up rows are cast to `dtype` (HF's table is in the model dtype)."""

    def __init__(self, vocab: int, dim: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(
            jax.random.normal(rngs.params(), (vocab, dim), param_dtype) * 0.02, ("vocab", "embed")
        )

    def __call__(self, ids_bs: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids_bs, axis=0).astype(self.dtype)

    def attend(self, h_bsd: jax.Array) -> jax.Array:
        """Tied lm_head: `h @ embedding.T`, accumulated and returned in float32 (see `Qwen25VL`)."""
        return jnp.einsum(
            "bsd,vd->bsv", h_bsd, self.embedding[...].astype(h_bsd.dtype), preferred_element_type=jnp.float32
        )


# ------------------------------------------------------------------------------------------- stacks


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num` independently initialised copies of `make(rngs)`, parameters stacked on a leading axis.

    Built with `jax.vmap` over the init (not `nnx.vmap`), so the result is a plain module whose Params
    have shape `(num, ...)`; "layers" is prepended to each Param's `logical_axes`.
    """
    keys = jax.random.split(rngs.params(), num)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(make(nnx.Rngs(params=key))))(keys)
    module = nnx.merge(graphdef, state)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var.set_metadata(logical_axes=("layers", *var.get_metadata()["logical_axes"]))
    return module


def remat_policy(remat: str):
    """`None` (no remat) or a `jax.checkpoint` wrapper for the config's `remat` knob."""
    if remat == "none":
        return None
    if remat == "full":  # save nothing inside a layer: recompute it all in the backward pass
        return lambda f: jax.checkpoint(f)
    if remat == "dots":  # save matmul outputs without batch dims (weights x activations), recompute the rest
        return lambda f: jax.checkpoint(f, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat must be 'none', 'full' or 'dots', got {remat!r}")


def run_stack(
    stack: nnx.Module,
    step: Callable[[nnx.Module, jax.Array, Any], Any],
    x: jax.Array,
    per_layer: Any = None,
    *,
    scan: bool = True,
    remat: str = "none",
    collect: bool = False,
    layers: tuple[int, int] | None = None,
) -> Any:
    """Apply `x = step(layer, x, per_layer[i])` for every layer i of a `stacked` module.

    `scan=True` runs one `jax.lax.scan` over the stacked state (one traced layer, whatever the depth);
    `scan=False` is a Python loop over slices of the same parameters, for debugging. `per_layer` is a
    pytree of arrays with a leading layer axis (e.g. the vision tower's `is_full` flags, or a layer's
    slice of the KV cache) or None.

    `collect=True`: `step` returns `(x, y)` and `run_stack` returns `(x, ys)`, the per-layer outputs `y`
    stacked on a leading layer axis (the keys and values that prefill and decode write to the cache).

    `layers=(start, stop)` runs only those layers of the stack (`per_layer` then covers just them).
    """
    graphdef, state = nnx.split(stack)
    if layers is not None:
        state = jax.tree.map(lambda a: a[layers[0] : layers[1]], state)

    def body(x_carry, xs):
        layer_state, layer_extra = xs
        out = step(nnx.merge(graphdef, layer_state), x_carry, layer_extra)
        return out if collect else (out, None)

    wrap = remat_policy(remat)
    if wrap is not None:
        body = wrap(body)
    if scan:
        out, ys = jax.lax.scan(body, x, (state, per_layer))
        return (out, ys) if collect else out
    num = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(num):
        x, y = body(x, jax.tree.map(lambda a, i=i: a[i], (state, per_layer)))
        ys.append(y)
    if not collect:
        return x
    return x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)
