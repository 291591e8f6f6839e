"""Rescale, normalise and patchify uint8 frames into Qwen2.5-VL's `(N, C*T*ps*ps)` merge-block rows.

Speed and exactness come from one observation: a uint8 channel has 256 values, so HF's per-pixel
`((v * (1/255) in float64 -> float32) - mean) / std` can be tabulated once per channel and applied with a
gather. The table is built with the reference's own operation order, so every element is bit-identical.
The block transpose is done on uint8 (a quarter of the bytes), the gather reads two pixels per lookup from
a 65,536-entry pair table, work proceeds one strip of merge blocks at a time so temporaries stay in cache,
and the temporal duplication of a single image is a broadcast, so the float32 output is written exactly
once (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import functools

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.lru_cache(maxsize=16)
def normalize_lut(
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
    rescale_factor: float = 1 / 255,
    mode: str = "pil",
) -> np.ndarray:
    """`(C, 256)` float32 table of the normalised value of every uint8 level, per channel.

    mode "pil": HF's numpy path (`Qwen2VLImageProcessorPil`): rescale in float64, cast to float32, then
        `(x - mean) / std` in float32.
    mode "torch": HF's torch path (the video processor and the torchvision image backend): rescale and
        normalise fused as `(x - mean * (1/rescale)) / (std * (1/rescale))`, all in float32.
    """
    levels = np.arange(256, dtype=np.float64)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    if mode == "pil":
        x = (levels * rescale_factor).astype(np.float32)[None, :]
        table = (x - mean32) / std32
    elif mode == "torch":
        # HF's `_fuse_mean_std_and_rescale_factor` scales float32 tensors: float32(mean) * float32(1/rescale)
        # in float32. Dividing in float64 first differs in the last bit for two of the three CLIP means.
        scale = np.float32(1.0 / rescale_factor)
        table = (levels.astype(np.float32)[None, :] - mean32 * scale) / (std32 * scale)
    else:
        raise ValueError(f"normalize mode must be 'pil' or 'torch', got {mode!r}")
    table = np.ascontiguousarray(table, dtype=np.float32)
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=16)
def _pair_tables(lut_bytes: bytes, channels: int) -> np.ndarray:
    """`(C, 65536)` 8-byte entries: entry `lo + 256*hi` holds the float32 pair `(lut[lo], lut[hi])`.

    A contiguous uint8 row viewed as little-endian uint16 yields exactly these indices, so one lookup
    produces two output values in memory order. 512 KiB per channel stays cache-resident.
    """
    lut = np.frombuffer(lut_bytes, dtype=np.float32).reshape(channels, 256)
    levels = np.arange(65536)
    pairs = np.empty((channels, 65536, 2), dtype=np.float32)
    lo, hi = (0, 1) if np.little_endian else (1, 0)
    pairs[:, :, lo] = lut[:, levels & 255]
    pairs[:, :, hi] = lut[:, levels >> 8]
    table = pairs.view(np.uint64).reshape(channels, 65536)
    table.setflags(write=False)
    return table


def _gather(planes: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 `(C, L)` -> float32 `(C, L)` with `out[c, i] = lut[c, planes[c, i]]`."""
    c, length = planes.shape
    out = np.empty((c, length), dtype=np.float32)
    if length % 2:
        for ci in range(c):
            np.take(lut[ci], planes[ci], out=out[ci], mode="clip")
        return out
    pairs = _pair_tables(np.ascontiguousarray(lut, dtype=np.float32).tobytes(), c)
    # mode="clip" (indices are always in range) lets take write into `out` without a bounce buffer.
    out64, idx16 = out.view(np.uint64), planes.view(np.uint16)
    for ci in range(c):
        np.take(pairs[ci], idx16[ci], out=out64[ci], mode="clip")
    return out


def patchify_uint8(
    frames: np.ndarray,
    lut: np.ndarray,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames `(T, H, W, C)` -> float32 patches `(gt*gh*gw, C*tps*ps*ps)` and `grid_thw`.

    Row order is (t, block_row, block_col, in_row, in_col) and the feature order (C, tps, ps, ps), as in
    HF's `patchify` for images and videos. T is padded to a multiple of `temporal_patch_size` by repeating
    the last frame, which for a single image is HF's temporal duplication.
    """
    if frames.ndim != 4 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, C), got {frames.dtype} {frames.shape}")
    t, h, w, c = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit or h == 0 or w == 0 or t == 0:
        raise ValueError(f"frame size {t}x{h}x{w} is not a positive multiple of {unit}")
    if lut.shape != (c, 256):
        raise ValueError(f"lookup table shape {lut.shape} does not match {c} channels")
    m, ps, tps = merge_size, patch_size, temporal_patch_size
    gt, gh, gw = -(-t // tps), h // ps, w // ps
    row_blocks, pp = gw * m, ps * ps
    out = np.empty((gt, gh // m, row_blocks, c, tps, pp), dtype=np.float32)
    # One strip of `unit` pixel rows (one row of merge blocks) at a time: the uint8 transpose, the index
    # conversion inside np.take and the float gather all stay in cache, and only `out` touches memory.
    for f in range(t):
        # Frame f fills temporal slot f; the last frame also fills the padding slots after it, which all
        # lie in the last temporal group because gt = ceil(t / tps).
        g, slot = divmod(f, tps)
        slots = slice(slot, slot + 1) if f < t - 1 else slice(slot, tps)
        for r in range(gh // m):
            strip = frames[f, r * unit : (r + 1) * unit].reshape(m, ps, gw // m, m, ps, c)
            planes = np.ascontiguousarray(strip.transpose(5, 2, 0, 3, 1, 4)).reshape(c, row_blocks * pp)
            y = _gather(planes, lut).reshape(c, row_blocks, 1, pp)
            out[g, r, :, :, slots] = y.transpose(1, 0, 2, 3)
    return out.reshape(gt * gh * gw, c * tps * pp), (gt, gh, gw)
