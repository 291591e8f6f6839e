"""Video frame sampling and the per-frame pixel budget, as qwen-vl-utils and transformers compute them.

Both references compute frame indices with float32 torch kernels; for long videos float32 rounding
changes which frame is picked, so the kernels are reproduced here bit for bit (`_torch_linspace_round`,
`_torch_arange_int`): float64 numpy would pick a different frame in about half of all videos over 100k
frames. numpy only; imported by `video.py`, which decodes and patchifies.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.patchify import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
IMAGE_MIN_TOKENS = 4
IMAGE_MAX_TOKENS = 16384
MODEL_SEQ_LEN = 128000
# Frame rate of frames given without one (frame lists, directories, arrays): qwen-vl-utils' `sample_fps`
# default. HF's own fallback, `fps or 24` with no metadata, gives second_per_grid_ts = 2/24 (spec 4.6).
DEFAULT_FRAME_LIST_FPS = 2.0
# torch's AVX2 `Vectorized<float>` width, which shapes `torch.arange`'s float32 rounding (see below).
_TORCH_VEC = 8


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """Video preprocessing settings; the defaults are qwen-vl-utils' and HF `Qwen2VLVideoProcessor`'s.

    total_pixels: pixel budget of the whole video; None is qwen-vl-utils' `MODEL_SEQ_LEN * factor**2 * 0.9`.
    sampling: "qwen_vl_utils" or "hf" (module docstring).
    resize_rule: the `smart_resize` variant, "hf" or "qwen_vl_utils" (spec 4.3).
    normalize: "torch" (HF's video processor, fused) or "pil" (HF's numpy image path).
    """

    min_pixels: int = VIDEO_MIN_TOKENS * 28 * 28
    max_pixels: int = VIDEO_MAX_TOKENS * 28 * 28
    total_pixels: float | None = None
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    sampling: str = "qwen_vl_utils"
    resize_rule: str = "hf"
    normalize: str = "torch"

    def __post_init__(self) -> None:
        if self.sampling not in ("qwen_vl_utils", "hf"):
            raise ValueError(f"sampling must be 'qwen_vl_utils' or 'hf', got {self.sampling!r}")
        if self.resize_rule not in ("hf", "qwen_vl_utils"):
            raise ValueError(f"resize_rule must be 'hf' or 'qwen_vl_utils', got {self.resize_rule!r}")
        if self.normalize not in ("torch", "pil"):
            raise ValueError(f"normalize must be 'torch' or 'pil', got {self.normalize!r}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def budget_pixels(self) -> float:
        """The whole video's pixel budget (qwen-vl-utils `total_pixels`, HF `max_video_tokens`-derived)."""
        if self.total_pixels is not None:
            return self.total_pixels
        return MODEL_SEQ_LEN * self.factor * self.factor * 0.9

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> VideoConfig:
        """Reads an HF `video_preprocessor_config.json` (or `preprocessor_config.json`) dict.

        `size` (`shortest_edge`/`longest_edge`) is read first and flat `min_pixels`/`max_pixels` win, as in
        `Qwen2VLVideoProcessor.__init__`. `max_video_tokens` sets the total budget. Unknown keys are ignored.
        """
        size = cfg.get("size") or {}
        kw: dict = {}
        min_pixels = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if min_pixels is not None:
            kw["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kw["max_pixels"] = int(max_pixels)
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames"):
            if cfg.get(key) is not None:
                kw[key] = int(cfg[key])
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                kw[key] = tuple(float(v) for v in cfg[key])
        for key in ("rescale_factor", "fps"):
            if cfg.get(key) is not None:
                kw[key] = float(cfg[key])
        if cfg.get("max_video_tokens") is not None:
            factor = kw.get("patch_size", cls.patch_size) * kw.get("merge_size", cls.merge_size)
            kw["total_pixels"] = int(cfg["max_video_tokens"]) * factor * factor * 0.9
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------------
# Frame counts and indices


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float = 2.0,
    nframes: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
    factor: int = 2,
) -> int:
    """qwen-vl-utils `smart_nframes`: frames to sample, a multiple of `factor` in `[factor, total_frames]`.

    `nframes` (rounded to `factor`) wins over `fps`. Raises InputError when no such count exists.
    """
    if total_frames <= 0:
        raise InputError(f"video has {total_frames} frames")
    if nframes is not None:
        n = round(nframes / factor) * factor
    else:
        if video_fps <= 0:
            raise InputError(f"video frame rate {video_fps} is not positive")
        lo = math.ceil(min_frames / factor) * factor
        hi = math.floor(min(max_frames, total_frames) / factor) * factor
        n = total_frames / video_fps * fps
        n = math.floor(min(max(n, lo), hi, total_frames) / factor) * factor
    if not factor <= n <= total_frames:
        raise InputError(
            f"cannot sample {n} frames from a video of {total_frames} frames "
            f"(need {factor} <= frames <= {total_frames})"
        )
    return int(n)


def hf_num_frames(
    total_frames: int,
    video_fps: float,
    *,
    fps: float = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
    temporal_patch_size: int = 2,
) -> int:
    """HF `Qwen2VLVideoProcessor.sample_frames` frame count.

    Unlike qwen-vl-utils, `min_frames` is not rounded up to the temporal patch. Raises InputError where HF
    raises (more frames than the video has) and where HF would build an empty or broken index (< 2 frames).
    """
    tps = temporal_patch_size
    if total_frames <= 0:
        raise InputError(f"video has {total_frames} frames")
    if num_frames is not None:
        n = round(num_frames / tps) * tps
    else:
        if video_fps <= 0:
            raise InputError(f"video frame rate {video_fps} is not positive")
        hi = math.floor(min(max_frames, total_frames) / tps) * tps
        n = total_frames / video_fps * fps
        n = math.floor(min(max(n, min_frames), hi, total_frames) / tps) * tps
    if n > total_frames or n < 2:
        raise InputError(f"cannot sample {n} frames from a video of {total_frames} frames")
    return int(n)


def calculate_video_frame_range(
    total_frames: int,
    video_fps: float,
    video_start: float | None = None,
    video_end: float | None = None,
) -> tuple[int, int, int]:
    """qwen-vl-utils `calculate_video_frame_range`: `(start, end, count)` frames of a time range in seconds."""
    if video_fps <= 0:
        raise InputError(f"video frame rate {video_fps} is not positive")
    if total_frames <= 0:
        raise InputError(f"video has {total_frames} frames")
    if video_start is None and video_end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    start = 0
    if video_start is not None:
        start = math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise InputError(
            f"time range video_start={video_start} video_end={video_end} selects frames {start}..{end} "
            f"of a {duration:.2f} s video ({total_frames} frames at {video_fps} fps)"
        )
    return start, end, end - start + 1


def _torch_linspace_round(start: int, end: int, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n).round().long()` (float32), bit-exact with torch's CPU kernel.

    The kernel computes `start + step * i` for the first half and `end - step * (n - 1 - i)` for the second,
    each as one fused multiply-add rounded to float32, with `step = float32(end - start) / (n - 1)`. The
    products and sums are exact in float64 for any frame count below 2**24, so float64 then one rounding to
    float32 is the fused result. `round` is half-to-even in both.
    """
    if n == 1:
        return np.asarray([start], dtype=np.int64)
    s, e = np.float32(start), np.float32(end)
    step = float((e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    values = np.where(i < n // 2, float(s) + step * i, float(e) - step * (n - 1 - i))
    return np.round(values.astype(np.float32)).astype(np.int64)


def _torch_arange_int(total: int, n: int) -> np.ndarray:
    """`torch.arange(0, total, total / n).int()` (float32), bit-exact with torch's AVX2 CPU kernel.

    The length is `ceil(total / step)` in float64. The kernel fills pairs of 8-wide vectors: each vector's
    first value `step * k` is computed in float64 and rounded to float32, and lane j is then
    `float32(that + j * step)`; a tail shorter than 16 takes `float32(step * k)`. (An AVX-512 build would use
    16-wide vectors and can differ in the last bit, which moves a truncated index only in rare cases.)
    """
    step = total / n
    size = math.ceil(total / step)
    k = np.arange(size, dtype=np.int64)
    vec_end = (size // (2 * _TORCH_VEC)) * (2 * _TORCH_VEC)
    base = (k // _TORCH_VEC) * _TORCH_VEC
    base_value = (step * base).astype(np.float32).astype(np.float64)
    vec = base_value + (k - base) * step
    values = np.where(k < vec_end, vec, step * k).astype(np.float32)
    return np.trunc(values).astype(np.int64)


def sample_indices(
    total: int,
    video_fps: float,
    cfg: VideoConfig = VideoConfig(),
    video_start: float | None = None,
    video_end: float | None = None,
    nframes: int | None = None,
) -> tuple[np.ndarray, float]:
    """Frame indices to decode and the resulting frame rate, by `cfg.sampling`.

    qwen_vl_utils: `linspace(start, end, n).round()` over the `video_start`/`video_end` range, and
    `sampled_fps = n / count * video_fps`. hf: `arange(0, count, count / n).int()` (offset by the range's
    start, an extension: HF has no time range) and `sampled_fps = len(indices) / count * video_fps`.
    """
    start, end, count = calculate_video_frame_range(total, video_fps, video_start, video_end)
    if cfg.sampling == "qwen_vl_utils":
        n = smart_nframes(
            count,
            video_fps,
            fps=cfg.fps,
            nframes=nframes,
            min_frames=cfg.min_frames,
            max_frames=cfg.max_frames,
            factor=cfg.temporal_patch_size,
        )
        return _torch_linspace_round(start, end, n), n / max(count, 1e-6) * video_fps
    n = hf_num_frames(
        count,
        video_fps,
        fps=cfg.fps,
        num_frames=nframes,
        min_frames=cfg.min_frames,
        max_frames=cfg.max_frames,
        temporal_patch_size=cfg.temporal_patch_size,
    )
    indices = start + _torch_arange_int(count, n)
    return indices, len(indices) / count * video_fps


# ---------------------------------------------------------------------------------------------------------
# Sizes


def frame_max_pixels(
    cfg: VideoConfig, nframes: int, min_pixels: int, max_pixels: int | None = None
) -> int | float:
    """Per-frame pixel cap: qwen-vl-utils `max(min(max, total / n * 2), int(min * 1.05))`, then `<= max_pixels`.

    For `sampling="hf"` the same with HF's integer arithmetic (`int(total) * tps // n`,
    `cap_pixels_per_frame=True`). The `* 2` is qwen-vl-utils' FRAME_FACTOR, the temporal patch.
    """
    tps = cfg.temporal_patch_size
    if cfg.sampling == "hf":
        cap = max(min(cfg.max_pixels, int(cfg.budget_pixels) * tps // nframes), int(min_pixels * 1.05))
    else:
        cap = max(min(cfg.max_pixels, cfg.budget_pixels / nframes * tps), int(min_pixels * 1.05))
    return cap if max_pixels is None else min(max_pixels, cap)
