"""The preallocated KV cache of generation, its size, and the memory check made before allocating it.

Layout (one array each for keys and values, every layer stacked, so the decoder's layer scan slices it):

    k, v : (L, B, T, K, H)   logical axes ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
    mask : (B, T) int32      1 where a slot holds a real token (prompt or generated), 0 for padding/empty
    index: () int32          the next slot to write, the same for every row (prompts are LEFT-padded)

Keys are stored after the M-RoPE rotation, in the model's compute dtype. Slot `s < S` (the prompt bucket)
holds prompt token `s` of the left-padded prompt; generated token `t` goes to slot `S + t`. Because every
row writes the same slot, a decode step is one `dynamic_update_slice` for the whole batch.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
MASK_AXES = ("batch", "cache_seq")


class CacheMemoryError(ValueError):
    """A generation request whose KV cache does not fit in the memory budget; says what would fit."""


class KVCache(NamedTuple):
    k: jax.Array  # (L, B, T, K, H)
    v: jax.Array  # (L, B, T, K, H)
    mask: jax.Array  # (B, T) int32
    index: jax.Array  # () int32


def cache_shape(config, batch: int, length: int) -> tuple[int, int, int, int, int]:
    tc = config.text
    return (tc.num_hidden_layers, batch, length, tc.num_key_value_heads, tc.head_dim)


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
) -> int:
    """Raise `CacheMemoryError` unless a `batch` x `length` cache (and the prefill's own `prefill_rows` x
    `prompt_len` keys/values, which live beside it while the cache is filled) fits in `budget` bytes.

    The message says what would fit: the most rows at this length, and the longest cache (and so the most
    new tokens after the `prompt_len`-slot prompt bucket) at this batch. Returns the bytes needed.
    """
    per_slot = slot_bytes(config)
    extra = (prefill_rows or 0) * prompt_len * per_slot
    need = cache_bytes(config, batch, length) + extra
    if need <= budget:
        return need
    rows_fit = max(0, (budget - extra) // (length * per_slot)) if budget > extra else 0
    slots_fit = max(0, (budget - extra) // (batch * per_slot)) if budget > extra else 0
    new_fit = max(0, slots_fit - prompt_len)
    raise CacheMemoryError(
        f"the KV cache for {batch} rows x {length} slots needs {_gib(need)} "
        f"({per_slot} bytes per row and slot), but only {_gib(budget)} is available ({source}). "
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
    and values are copied, not recomputed. `sharding` (a NamedSharding for `CACHE_AXES`) places k and v.
    """
    layers, batch, seq, kv_heads, head_dim = k_lbskh.shape
    rows = batch * n

    def grow(x_lbskh):
        x_lbskh = jnp.repeat(x_lbskh, n, axis=1) if n > 1 else x_lbskh
        full = jnp.zeros((layers, rows, length, kv_heads, head_dim), x_lbskh.dtype)
        if sharding is not None:
            full = jax.lax.with_sharding_constraint(full, sharding)
        return jax.lax.dynamic_update_slice_in_dim(full, x_lbskh, 0, 2)

    mask_bt = jnp.zeros((rows, length), jnp.int32)
    mask_rows = jnp.repeat(mask_bs.astype(jnp.int32), n, axis=0) if n > 1 else mask_bs.astype(jnp.int32)
    mask_bt = mask_bt.at[:, :seq].set(mask_rows)
    return KVCache(grow(k_lbskh), grow(v_lbskh), mask_bt, jnp.asarray(seq, jnp.int32))
