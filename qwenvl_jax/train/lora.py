"""LoRA (Hu et al. 2021, arXiv 2106.09685) as a separate parameter tree, applied to the model's layers.

The adapters live outside the model: `{"text/layers/self_attn/q_proj/kernel": {"a": A, "b": B}}` with
`A (..., in, r)`, `B (..., r, out)` and the same leading axes as the kernel (the scanned `layers` axis of
a stack). The train step and the rollout's sampler view attach them to the frozen base (`attach`): each
adapted `Dense` computes

    y = x W + (alpha / r) · (x A) B

as PEFT's `Linear` does, so the base kernels are read as they are: no merged `W + A B` is materialised,
no gradient of a frozen kernel is computed (only `dx`, `dA`, `dB`), and a bf16 base loses nothing of a
small delta to rounding. "LoRA disabled" is simply the base (the DPO/GRPO reference needs no second copy).
`apply_lora` / `merge_lora` fold the adapters in, for export and serving only.

Initialisation as PEFT: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5)), B = 0, so the
initial adapted model equals the base model exactly.

Dropout as PEFT: `dropout > 0` drops the adapter's INPUT per element, `B(A(dropout(x)))`, with a key per
adapted layer (and per layer of a stack) derived from the step's key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.quant import dequantize_nf4, is_nf4
from qwenvl_jax.train.optim import map_with_path

# The project's one flat <-> nested param conversion, under the short names this package uses.
from qwenvl_jax.weights import flatten_params as flatten
from qwenvl_jax.weights import unflatten_params as unflatten  # noqa: F401  (used as lora.unflatten)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names (fnmatch patterns) whose `kernel` gets an adapter, e.g. "q_proj" or "*_proj".
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # Path prefixes searched for targets: the decoder only by default (the vision tower has its own
    # `*_proj` MLPs; add "visual/" to adapt them too).
    scopes: tuple[str, ...] = ("text/",)
    # QLoRA: the frozen base's kernels stored in NF4 (`quant.nf4_targets`), dequantized at use; None keeps
    # them at the param dtype. `quantize_vision` quantizes the vision tower's kernels too.
    quantize: str | None = None
    quantize_vision: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_paths(base_params: Mapping[str, Any], cfg: LoraConfig) -> list[str]:
    """The kernel paths of `base_params` (nested pure dict) that get an adapter, sorted."""
    paths = []
    for path in flatten(base_params):
        parts = path.split("/")
        if len(parts) < 2 or parts[-1] != "kernel" or not path.startswith(cfg.scopes):
            continue
        if any(fnmatch.fnmatchcase(parts[-2], pat) for pat in cfg.targets):
            paths.append(path)
    if not paths:
        raise ValueError(f"no LoRA targets match {cfg.targets} under {cfg.scopes}")
    return sorted(paths)


def init_lora(base_params: Mapping[str, Any], cfg: LoraConfig, key: jax.Array) -> dict[str, dict[str, Any]]:
    """Adapters for every target: A uniform (PEFT's kaiming_uniform(a=sqrt(5))), B zero; float32 whatever the
    base's dtype (they are the trained master weights, and their AdamW moments follow their dtype)."""
    flat = flatten(base_params)
    out = {}
    for i, path in enumerate(target_paths(base_params, cfg)):
        w = flat[path]
        *lead, fan_in, fan_out = w.shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(
            jax.random.fold_in(key, i), (*lead, fan_in, cfg.rank), jnp.float32, -bound, bound
        )
        out[path] = {"a": a, "b": jnp.zeros((*lead, cfg.rank, fan_out), jnp.float32)}
    return out


def lora_logical_axes(kernel_axes: tuple[str | None, ...]) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of A and B from the kernel's: the rank dim is replicated (None)."""
    return {"a": (*kernel_axes[:-1], None), "b": (*kernel_axes[:-2], None, kernel_axes[-1])}


def leaf_logical_axes(
    path: str, logical_axes: Mapping[str, tuple[str | None, ...]], *, lora: bool
) -> tuple[str | None, ...]:
    """The logical axes of a trainable leaf: a Param's own (`logical_axes[path]`), or for a LoRA leaf
    `"<kernel path>/a"` / `".../b"` those `lora_logical_axes` derives from its kernel's."""
    if not lora:
        return logical_axes[path]
    kernel_path, which = path.rsplit("/", 1)
    return lora_logical_axes(logical_axes[kernel_path])[which]


def delta(lora_ab: Mapping[str, jax.Array], cfg: LoraConfig) -> jax.Array:
    """`(alpha / r) · A @ B` over the leading (layer) axes, in float32."""
    a, b = lora_ab["a"].astype(jnp.float32), lora_ab["b"].astype(jnp.float32)
    return cfg.scale * jnp.einsum("...ir,...ro->...io", a, b)


def apply_lora(
    base_params: Mapping[str, Any], lora_params: Mapping[str, Mapping[str, jax.Array]], cfg: LoraConfig
) -> dict[str, Any]:
    """The merged nested params, `W + delta` at every adapted kernel (traceable, pure): for export and
    serving (`merge_lora`); training and decoding attach the adapters instead (`attach`).

    A quantized kernel (QLoRA's NF4 base) is dequantized, as the step computes with it, and comes out in
    float32, adapted or not."""
    return map_with_path(lambda path, w: merged_kernel(w, lora_params.get(path), cfg), dict(base_params))


def merged_kernel(w, lora_ab: Mapping[str, jax.Array] | None, cfg: LoraConfig, dtype=None) -> jax.Array:
    """One leaf of `apply_lora`: `W + delta` summed in float32 and rounded once to `dtype` (default: W's
    dtype; float32 for a quantized kernel, which is dequantized first). Without adapters, W (dequantized)."""
    if is_nf4(w):
        w = dequantize_nf4(w, jnp.float32)
        dtype = dtype or jnp.float32
    dtype = dtype or w.dtype
    if lora_ab is None:
        return w.astype(dtype)
    return (w.astype(jnp.float32) + delta(lora_ab, cfg)).astype(dtype)


def attach(
    model,
    lora_params: Mapping[str, Mapping[str, Any]],
    cfg: LoraConfig,
    *,
    dropout_key: jax.Array | None = None,
):
    """Attach the adapters to `model` in place (traceable): the `Dense` owning each adapted kernel gets
    `lora_a`, `lora_b` (as `LoraWeight`s, with the kernel's leading layer axis) and `lora_scale`, and then
    computes `x W + scale (x A) B` (`model.layers.Dense`), PEFT's `Linear`. With `cfg.dropout > 0` and a
    `dropout_key`, each adapted layer also gets its own key (`lora_key`, one per layer of a stack) and
    drops the adapter's input per element, PEFT's `B(A(dropout(x)))`. Returns `model`."""
    from qwenvl_jax.model.layers import Dense, LoraWeight

    for i, (path, ab) in enumerate(sorted(lora_params.items())):
        *owner, leaf = path.split("/")
        module = model
        for name in owner:
            module = getattr(module, name)
        if leaf != "kernel" or not isinstance(module, Dense):
            raise ValueError(f"LoRA adapter {path!r} does not name the kernel of a Dense layer")
        module.lora_a = LoraWeight(ab["a"])
        module.lora_b = LoraWeight(ab["b"])
        module.lora_scale = cfg.scale
        if cfg.dropout > 0 and dropout_key is not None:
            lead = tuple(ab["a"].shape[:-2])
            keys = jax.random.split(jax.random.fold_in(dropout_key, i), max(1, math.prod(lead)))
            module.lora_key = LoraWeight(jax.random.key_data(keys).reshape(*lead, -1))
            module.lora_dropout = cfg.dropout
    return model


def merge_lora(
    base_params: Mapping[str, Any],
    lora_params: Mapping[str, Mapping[str, Any]],
    cfg: LoraConfig,
    *,
    dequantized_dtype: Any = jnp.float32,
) -> dict[str, np.ndarray]:
    """Flat `{"a/b/c": np.ndarray}` params with the adapters folded in (no dropout), for
    `qwenvl_jax.weights.write_hf_checkpoint` or `loading.model_from_params`: each adapted kernel `W + delta`
    at W's dtype, as `apply_lora`, and each quantized kernel (QLoRA) dequantized, adapted or not, in
    `dequantized_dtype`: summed in float32 and rounded once, where PEFT's merge into a dequantized bf16
    weight rounds twice.

    Host arrays, made one layer at a time: a stacked kernel's merge never stands on the device whole (a
    7B decoder's MLP kernels in float32 are 7.6 GB each), so a model that trained on a small device can
    be merged on it."""
    flat = (
        flatten(base_params)
        if any(isinstance(v, Mapping) for v in base_params.values())
        else dict(base_params)
    )
    out = {}
    for path, w in flat.items():
        ab = lora_params.get(path)
        if ab is None and not is_nf4(w):
            out[path] = np.asarray(w)
            continue
        dtype = jnp.dtype(dequantized_dtype) if is_nf4(w) else jnp.dtype(w.dtype)
        lead = w.shape[:-2]
        host = np.empty(w.shape, dtype)
        for index in np.ndindex(*lead):
            w_i = jax.tree.map(lambda x, index=index: x[index], w)
            ab_i = None if ab is None else {k: v[index] for k, v in ab.items()}
            host[index] = np.asarray(_merge_jit(w_i, ab_i, cfg, dtype))
        out[path] = host
    return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _merge_jit(w, lora_ab, cfg: LoraConfig, dtype):
    return merged_kernel(w, lora_ab, cfg, dtype)
