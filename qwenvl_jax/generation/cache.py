"""The KV cache of generation, its size, and the memory check made before allocating it.

Layout: one buffer per layer for keys and one for values,

    k[l], v[l] : (B, K, T, H)    logical axes LAYER_CACHE_AXES ("batch", "kv_heads", "cache_seq", "head_dim")
    mask       : (B, T) int32    1 where a slot holds a real token (prompt or generated), 0 for padding/empty
    index      : () int32        the next slot to write, the same for every row (prompts are LEFT-padded)

The L buffers together are the `(L, B, K, T, H)` cache of `cache_shape`, logical axes `CACHE_AXES`
(sizes, shardings and memory plans use that view). Kv heads come before time because a decode step's
two attention matmuls are batched over (row, kv head) and contract or produce time: `(B, K, T, H)` is
the operand layout they want, so no transpose of the cache is ever made. Each layer is its own buffer
because XLA does not alias a slice of a larger array: a layer sliced out of a stacked `(L, ...)` cache
(or a prefix of slots sliced out of a longer buffer) is materialised as a copy before the matmul that
reads it, which triples the bytes a decode step moves for the cache. A decode step writes its new key
and value into each buffer with one `dynamic_update_slice`, in place (the buffers are donated to the
step or carried by the decode loop), and attends over the whole buffer.

T is the current span, not the final length: decode runs through `cache_spans` (powers of two above the
prompt bucket, then the full cache length), and `grow` pads every buffer to the next span when the
filled slots reach the end of the current one, so a step attends over at most twice the filled slots.

Keys are stored after the M-RoPE rotation, in the model's compute dtype. Slot `s < S` (the prompt bucket)
holds prompt token `s` of the left-padded prompt; generated token `t` goes to slot `S + t`. Because every
row writes the same slot, a decode step is one `dynamic_update_slice` per buffer for the whole batch.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
LAYER_CACHE_AXES = CACHE_AXES[1:]
MASK_AXES = ("batch", "cache_seq")
# The shortest span decode attends over: below it, the copies `grow` makes cost more than they save.
MIN_SPAN = 128


class CacheMemoryError(ValueError):
    """A generation request whose KV cache does not fit in the memory budget; says what would fit."""


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]  # L x (B, K, T, H)
    v: tuple[jax.Array, ...]  # L x (B, K, T, H)
    mask: jax.Array  # (B, T) int32
    index: jax.Array  # () int32

    @property
    def length(self) -> int:
        """T, the slots of the current span."""
        return self.mask.shape[1]


def cache_shape(config, batch: int, length: int) -> tuple[int, int, int, int, int]:
    """`(L, B, K, T, H)`: the L per-layer buffers of keys (or values) taken together."""
    tc = config.text
    return (tc.num_hidden_layers, batch, tc.num_key_value_heads, length, tc.head_dim)


def cache_spans(prompt_len: int, cache_len: int) -> tuple[int, ...]:
    """The cache lengths decode steps through: powers of two (at least `MIN_SPAN`) above the prompt bucket,
    then `cache_len`. The first span holds the prompt and at least one generated token."""
    spans = []
    span = max(MIN_SPAN, 1 << int(prompt_len).bit_length())  # the smallest power of two > prompt_len
    while span < cache_len:
        spans.append(span)
        span *= 2
    return (*spans, int(cache_len))


def slot_bytes(config) -> int:
    """Bytes of one (row, slot) of the cache: keys and values of every layer, plus the int32 mask."""
    tc = config.text
    itemsize = np.dtype(jnp.dtype(config.dtype)).itemsize
    return 2 * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim * itemsize + 4


def cache_bytes(config, batch: int, length: int) -> int:
    """Bytes of a cache of `batch` rows and `length` slots."""
    return int(batch) * int(length) * slot_bytes(config)


def memory_budget(max_cache_bytes: int | None = None, devices=None) -> tuple[int, str]:
    """(bytes available for the cache, where the figure comes from).

    `max_cache_bytes` wins when given. On an accelerator: free device memory (`bytes_limit - bytes_in_use`
    of `memory_stats()`), summed over `devices` (the mesh's, when the cache is sharded over one). On CPU:
    the host's available physical memory.
    """
    if max_cache_bytes is not None:
        return int(max_cache_bytes), "max_cache_bytes"
    devices = list(devices) if devices is not None else jax.devices()[:1]
    if devices[0].platform != "cpu":
        total = 0
        for dev in devices:
            stats = dev.memory_stats() or {}
            if "bytes_limit" not in stats:
                break
            total += int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        else:
            return total, f"free memory of {len(devices)} {devices[0].platform} device(s)"
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages) * int(os.sysconf("SC_PAGE_SIZE")), "available host memory"


def check_cache_fits(
    config,
    *,
    batch: int,
    length: int,
    prompt_len: int,
    budget: int,
    source: str,
    prefill_rows: int | None = None,
    resident_bytes: int = 0,
) -> int:
    """Raise `CacheMemoryError` unless a `batch` x `length` cache (and the prefill's own `prefill_rows` x
    `prompt_len` keys/values, which live beside it while the cache is filled, and `resident_bytes` held
    for the whole generation: the decoder's per-layer weight copies) fits in `budget` bytes.

    The message says what would fit: the most rows at this length, and the longest cache (and so the most
    new tokens after the `prompt_len`-slot prompt bucket) at this batch. Returns the bytes needed.
    """
    per_slot = slot_bytes(config)
    extra = (prefill_rows or 0) * prompt_len * per_slot + int(resident_bytes)
    need = cache_bytes(config, batch, length) + extra
    if need <= budget:
        return need
    rows_fit = max(0, (budget - extra) // (length * per_slot)) if budget > extra else 0
    slots_fit = max(0, (budget - extra) // (batch * per_slot)) if budget > extra else 0
    new_fit = max(0, slots_fit - prompt_len)
    raise CacheMemoryError(
        f"the KV cache for {batch} rows x {length} slots needs {_gib(need)} "
        f"({per_slot} bytes per row and slot{', beside ' + _gib(int(resident_bytes)) + ' of per-layer decoder weights' if resident_bytes else ''}), "
        f"but only {_gib(budget)} is available ({source}). "
        f"At {length} slots at most {rows_fit} rows fit; at {batch} rows at most {slots_fit} slots fit, "
        f"i.e. max_new_tokens <= {new_fit} after this {prompt_len}-token prompt bucket."
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**24 else f"{n} bytes"


def cache_from_prefill(
    k_lbskh: jax.Array, v_lbskh: jax.Array, mask_bs: jax.Array, *, n: int, length: int, sharding=None
) -> KVCache:
    """A `length`-slot cache holding the prompt in its first S slots, each prompt row repeated `n` times.

    Rows `i * n .. i * n + n - 1` continue prompt `i`: the `n` completions share one prefill, whose keys
    and values are copied, not recomputed. `sharding` (a NamedSharding for `LAYER_CACHE_AXES`) places
    every buffer.
    """
    layers, batch, seq, kv_heads, head_dim = k_lbskh.shape
    rows = batch * n

    def layer_buffer(x_bskh):
        x_bksh = jnp.swapaxes(x_bskh, 1, 2)  # once per prompt, so that no decode step transposes
        x_bksh = jnp.repeat(x_bksh, n, axis=0) if n > 1 else x_bksh
        full_bkth = jnp.zeros((rows, kv_heads, length, head_dim), x_bksh.dtype)
        if sharding is not None:
            full_bkth = jax.lax.with_sharding_constraint(full_bkth, sharding)
        return jax.lax.dynamic_update_slice_in_dim(full_bkth, x_bksh, 0, 2)

    mask_bt = jnp.zeros((rows, length), jnp.int32)
    mask_rows = jnp.repeat(mask_bs.astype(jnp.int32), n, axis=0) if n > 1 else mask_bs.astype(jnp.int32)
    mask_bt = mask_bt.at[:, :seq].set(mask_rows)
    k = tuple(layer_buffer(k_lbskh[i]) for i in range(layers))
    v = tuple(layer_buffer(v_lbskh[i]) for i in range(layers))
    return KVCache(k, v, mask_bt, jnp.asarray(seq, jnp.int32))


@functools.partial(jax.jit, static_argnames=("length", "sharding"))
def _pad_slots(x, *, length: int, sharding=None):
    """`x` ((B, K, T, H) buffer or (B, T) mask) with zero slots appended up to `length`."""
    axis = 2 if x.ndim == 4 else 1
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    out = jnp.pad(x, widths)
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def grow(cache: KVCache, length: int, *, sharding=None) -> KVCache:
    """`cache` with every buffer and the mask padded to `length` slots (the next span); empty slots are 0.

    Consumes `cache`: each old buffer is deleted as soon as its grown copy exists, so memory peaks at the
    grown cache plus one old buffer rather than at both caches. (Donation cannot do this: a donated
    buffer is only reused for an output of its own size.) `sharding` (for `LAYER_CACHE_AXES`) places
    the new buffers. Called on the host, between jitted decode loops."""
    if length < cache.length:
        raise ValueError(f"cannot shrink a {cache.length}-slot cache to {length} slots")
    if length == cache.length:
        return cache

    def pad(x, sharding=None):
        out = _pad_slots(x, length=length, sharding=sharding)
        x.delete()
        return out

    k = tuple(pad(x, sharding) for x in cache.k)
    v = tuple(pad(x, sharding) for x in cache.v)
    return KVCache(k, v, pad(cache.mask), cache.index)


def layer_copy_bytes(model) -> int:
    """Bytes of the decoder's per-layer weight copies that decode reads (`TextModel.decode_layers`, made
    once per generation beside the stacked weights): every variable of the stacked decoder layers (LoRA
    adapters included) at its stored dtype, summed over the devices that hold them (the copies are laid
    out as the layers are, so a layer replicated on every device of a mesh counts once per device), as the
    budget of `memory_budget(devices=...)` sums free memory over them."""
    from flax import nnx

    _, state = nnx.split(model.text.layers)
    total = 0
    for x in jax.tree.leaves(state):
        shards = getattr(x, "addressable_shards", None)
        if shards:
            total += sum(int(np.prod(sh.data.shape)) for sh in shards) * np.dtype(x.dtype).itemsize
        else:
            total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return total
