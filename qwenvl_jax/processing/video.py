"""Videos -> Qwen2.5-VL `pixel_values_videos`, `video_grid_thw` and `second_per_grid_ts` (spec 4.6).

Two references are followed, selected by `VideoConfig.sampling`:
* "qwen_vl_utils" (default): qwen-vl-utils 0.0.14 `fetch_video`. Frame count by `smart_nframes`, indices
  `torch.linspace(start, end, n).round()`, the total-pixel budget per frame, and for frame lists its
  per-frame `fetch_image` resize followed by the video resize.
* "hf": transformers' `Qwen2VLVideoProcessor.sample_frames` (`torch.arange(0, total, total / n).int()`)
  with its `cap_pixels_per_frame=True` budget, and frame lists resized once.

Both references compute indices with float32 torch kernels. For long videos the float32 rounding changes
which frame is picked, so the kernels are reproduced here bit for bit (`_torch_linspace_round`,
`_torch_arange_int`); float64 numpy would pick a different frame in about half of all videos over 100k
frames.

Resizing is PIL BICUBIC on uint8 RGB. The references resize decoded video with torchvision's bicubic
antialias kernel, which has no build here; its output differs from PIL by a few levels (spec 4.4). Frame
lists are resized by qwen-vl-utils with PIL, and there the frames match exactly whenever its second,
torchvision resize is to the same size. (qwen-vl-utils 0.0.14 first rounds list frames to multiples of 56,
a factor mix-up reproduced here, see `_frame_list`.) YUV -> RGB conversion is PyAV's (libswscale), as in
torchvision's `read_video`.

Rescale and normalise follow HF's video processor, which fuses them the torch way:
`(x - float32(mean) * 255) / (float32(std) * 255)` in float32 (`normalize_lut(mode="torch")`).

The host side never imports jax or torch. PyAV is imported only when a video file is decoded.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence

import numpy as np
from PIL import Image

from qwenvl_jax.processing.errors import InputError, describe
from qwenvl_jax.processing.image import load_image, smart_resize
from qwenvl_jax.processing.patchify import (
    normalize_lut,
    patchify_uint8,
)

# qwen-vl-utils 0.0.14 constants (vision_process.py).
from qwenvl_jax.processing.video_sampling import (  # noqa: F401  (re-exported: the video API in one place)
    DEFAULT_FRAME_LIST_FPS,
    IMAGE_MAX_TOKENS,
    IMAGE_MIN_TOKENS,
    MODEL_SEQ_LEN,
    VIDEO_MAX_TOKENS,
    VIDEO_MIN_TOKENS,
    VideoConfig,
    _torch_arange_int,
    _torch_linspace_round,
    calculate_video_frame_range,
    frame_max_pixels,
    hf_num_frames,
    sample_indices,
    smart_nframes,
)


@dataclasses.dataclass(frozen=True)
class Video:
    """Decoded, sampled and resized frames, ready for patchify.

    frames: uint8 `(T, H, W, 3)` at the final size, T a multiple of `temporal_patch_size` (the last frame
        repeated as padding). indices: int64 `(T,)`, the source frame of each row (padding repeats the last).
    sampled_fps: frames per second of `frames`; source_fps: the source's rate (None for frame lists);
    total_frames: frames in the source (within `video_start`/`video_end`).
    """

    frames: np.ndarray
    sampled_fps: float
    source_fps: float | None
    indices: np.ndarray
    total_frames: int


def _resize(frame: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 RGB frame -> `(h, w, 3)` uint8 at `size = (h, w)` with PIL BICUBIC (same size: no resampling)."""
    h, w = size
    if isinstance(frame, np.ndarray):
        if frame.shape[:2] == (h, w):
            return frame
        frame = Image.fromarray(frame)
    if frame.size != (w, h):
        frame = frame.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(frame)


# ---------------------------------------------------------------------------------------------------------
# Sources


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _list_frame_dir(path: pathlib.Path, name: str) -> list[pathlib.Path]:
    extensions = set(Image.registered_extensions())
    files = [
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    ]
    if not files:
        raise InputError(f"{name}: directory has no image frames")
    return sorted(files, key=lambda p: _natural_key(p.name))


def _local_path(source: str | os.PathLike) -> pathlib.Path | None:
    """The filesystem path of a path or `file://` URI; None for other URLs."""
    if isinstance(source, os.PathLike):
        return pathlib.Path(source)
    if source.startswith("file://"):
        return pathlib.Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
        return None
    return pathlib.Path(source)


def _frame_list(
    frames: Sequence[object] | np.ndarray,
    cfg: VideoConfig,
    *,
    frame_rate: float,
    min_pixels: int,
    max_pixels: int | None,
    total_pixels: float | None,
    resized: tuple[int, int] | None,
    name: str,
) -> Video:
    """qwen-vl-utils' list path: pad to the temporal patch, then per-frame size, then the video size."""
    tps = cfg.temporal_patch_size
    if len(frames) == 0:
        raise InputError(f"{name}: video has no frames")
    loaded: list[Image.Image | np.ndarray] = []
    for i, frame in enumerate(frames):
        label = f"{name}: frame {i} ({describe(frame)})"
        if (
            isinstance(frame, np.ndarray)
            and frame.ndim == 3
            and frame.shape[-1] == 3
            and frame.dtype == np.uint8
        ):
            item: Image.Image | np.ndarray = frame  # already RGB; no PIL round trip
        else:
            item = load_image(frame, name=label)
        size = item.shape[:2] if isinstance(item, np.ndarray) else item.size[::-1]
        if loaded:
            first = loaded[0].shape[:2] if isinstance(loaded[0], np.ndarray) else loaded[0].size[::-1]
            if tuple(size) != tuple(first):
                raise InputError(
                    f"{label}: frame size {size[1]}x{size[0]} differs from frame 0's {first[1]}x{first[0]}"
                )
        loaded.append(item)
    height, width = loaded[0].shape[:2] if isinstance(loaded[0], np.ndarray) else loaded[0].size[::-1]
    n = len(loaded)
    padded = -(-n // tps) * tps
    budget_cfg = cfg if total_pixels is None else dataclasses.replace(cfg, total_pixels=total_pixels)
    sizes = []
    if cfg.sampling == "qwen_vl_utils":
        # qwen-vl-utils resizes each frame with fetch_image first. 0.0.14 passes its 28-px factor as
        # fetch_image's `image_patch_size`, so this first size is a multiple of 56, with the image bounds
        # of that factor unless the call gives min/max_pixels. The video size below is then computed from
        # this size, and frames are resized twice where the two differ, as there.
        f1 = 2 * cfg.factor
        lo = IMAGE_MIN_TOKENS * f1 * f1 if min_pixels is None else min_pixels
        hi = IMAGE_MAX_TOKENS * f1 * f1 if max_pixels is None else max_pixels
        try:
            if resized is not None:
                height, width = smart_resize(
                    *resized, f1, IMAGE_MIN_TOKENS * f1 * f1, IMAGE_MAX_TOKENS * f1 * f1, rule=cfg.resize_rule
                )
            else:
                height, width = smart_resize(height, width, f1, lo, hi, rule=cfg.resize_rule)
        except InputError as e:
            raise InputError(f"{name}: {e}") from e
        sizes.append((height, width))
    lo = cfg.min_pixels if min_pixels is None else min_pixels
    sizes.append(_target_size(height, width, budget_cfg, padded, lo, max_pixels, resized, name))
    out = []
    for item in loaded:
        for size in sizes:
            item = _resize(item, size)
        out.append(item)
    out.extend([out[-1]] * (padded - n))
    indices = np.minimum(np.arange(padded, dtype=np.int64), n - 1)
    return Video(np.stack(out), float(frame_rate), None, indices, n)


def _import_av(name: str):
    try:
        import av
    except ImportError as e:
        raise InputError(
            f"{name}: decoding video files needs PyAV; install the extra `pip install qwenvl-jax[video]`"
        ) from e
    return av


def _open(av, path: str, name: str):
    try:
        return av.open(path)
    except av.error.FileNotFoundError as e:
        raise InputError(f"{name}: no such file") from e
    except (av.error.FFmpegError, OSError) as e:
        raise InputError(f"{name}: cannot open video ({type(e).__name__}: {e})") from e


def _probe(av, path: str, name: str) -> tuple[int, float]:
    """`(frame count, average frame rate)` from the stream header; packets are counted when it has none."""
    with _open(av, path, name) as container:
        if not container.streams.video:
            raise InputError(f"{name}: file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise InputError(f"{name}: video stream has no frame rate")
        total = int(stream.frames or 0)
        if total <= 0:
            try:
                total = sum(1 for packet in container.demux(stream) if packet.size)
            except av.error.FFmpegError as e:
                raise InputError(f"{name}: corrupt video ({type(e).__name__}: {e})") from e
    return total, float(rate)


def _decode(
    path: str,
    cfg: VideoConfig,
    *,
    fps: float | None,
    nframes: int | None,
    video_start: float | None,
    video_end: float | None,
    min_pixels: int,
    max_pixels: int | None,
    total_pixels: float | None,
    resized: tuple[int, int] | None,
    name: str,
    known_total: int | None = None,
) -> Video:
    """Sample, then decode sequentially up to the last sampled frame, resizing each kept frame at once."""
    av = _import_av(name)
    total, video_fps = _probe(av, path, name)
    if known_total is not None:
        total = known_total
    if total < 2:
        raise InputError(f"{name}: video has {total} frame(s); at least 2 are needed")
    sample_cfg = cfg if fps is None else dataclasses.replace(cfg, fps=fps)
    try:
        indices, sampled_fps = sample_indices(total, video_fps, sample_cfg, video_start, video_end, nframes)
    except InputError as e:
        raise InputError(f"{name}: {e}") from e
    tps = cfg.temporal_patch_size
    padded = -(-len(indices) // tps) * tps
    budget_cfg = cfg if total_pixels is None else dataclasses.replace(cfg, total_pixels=total_pixels)
    wanted: dict[int, list[int]] = {}
    for row, index in enumerate(indices.tolist()):
        wanted.setdefault(index, []).append(row)
    last = int(indices.max())
    rows: list[np.ndarray] = [None] * len(indices)  # type: ignore[list-item]
    size = None
    decoded = 0
    with _open(av, path, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    if size is None:
                        size = _target_size(
                            frame.height,
                            frame.width,
                            budget_cfg,
                            padded,
                            min_pixels,
                            max_pixels,
                            resized,
                            name,
                        )
                    pixels = _resize(frame.to_image(), size)
                    for row in wanted[decoded]:
                        rows[row] = pixels
                decoded += 1
                if decoded > last:
                    break
        except av.error.FFmpegError as e:
            raise InputError(f"{name}: corrupt video, decoding failed at frame {decoded} ({e})") from e
    if decoded <= last:
        # The header's frame count was too high: sample again from the frames that exist.
        if known_total is not None or decoded < 2:
            raise InputError(f"{name}: only {decoded} frame(s) could be decoded")
        return _decode(
            path, cfg, fps=fps, nframes=nframes, video_start=video_start, video_end=video_end,
            min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels, resized=resized,
            name=name, known_total=decoded,
        )  # fmt: skip
    rows.extend([rows[-1]] * (padded - len(rows)))
    indices = np.concatenate([indices, np.repeat(indices[-1:], padded - len(indices))]).astype(np.int64)
    count = calculate_video_frame_range(total, video_fps, video_start, video_end)[2]
    return Video(np.stack(rows), float(sampled_fps), video_fps, indices, count)


def _target_size(
    height: int,
    width: int,
    cfg: VideoConfig,
    nframes: int,
    min_pixels: int,
    max_pixels: int | None,
    resized: tuple[int, int] | None,
    name: str,
) -> tuple[int, int]:
    """Final frame size of a decoded video: `smart_resize` under the per-frame budget."""
    f = cfg.factor
    try:
        if resized is not None:
            # qwen-vl-utils rounds resized_height/width with its image bounds, not the video budget.
            lo, hi = IMAGE_MIN_TOKENS * f * f, IMAGE_MAX_TOKENS * f * f
            return smart_resize(*resized, f, lo, hi, rule=cfg.resize_rule)
        cap = frame_max_pixels(cfg, nframes, min_pixels, max_pixels)
        return smart_resize(height, width, f, min_pixels, cap, rule=cfg.resize_rule)
    except InputError as e:
        raise InputError(f"{name}: {e}") from e


def load_video(
    source: object,
    cfg: VideoConfig = VideoConfig(),
    *,
    fps: float | None = None,
    nframes: int | None = None,
    video_start: float | None = None,
    video_end: float | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
    sample_fps: float | None = None,
    name: str | None = None,
) -> Video:
    """A video source -> `Video` with sampled frames at their final size.

    Sources: a video file path or `file://` URI (decoded with PyAV, sequentially up to the last needed
    frame); a directory of frame images (natural file-name order); a list/tuple of frames (PIL images,
    uint8 arrays, or anything `load_image` opens); a uint8 `(T, H, W, 3)` array.

    Video files are sampled by `cfg.sampling` at `fps` (default `cfg.fps`) or to `nframes` frames, within
    `video_start`/`video_end` seconds. Frame lists, directories and arrays are used whole, as qwen-vl-utils
    does; their frame rate is `sample_fps`, else `fps`, else 2.0 (qwen-vl-utils reads only `sample_fps`);
    `nframes`/`video_start`/`video_end` are refused for them rather than ignored.

    `min_pixels`/`max_pixels`/`total_pixels` are the per-call overrides of qwen-vl-utils' message keys
    (`max_pixels` can only lower the budgeted cap). `resized_height`/`resized_width` go through
    `smart_resize` with the image bounds and bypass the budget.
    """
    name = (
        name if name is not None else describe(source if not isinstance(source, os.PathLike) else str(source))
    )
    if (resized_height is None) != (resized_width is None):
        raise InputError(f"{name}: resized_height and resized_width must be given together")
    resized = None if resized_height is None else (int(resized_height), int(resized_width))
    if isinstance(source, (str, os.PathLike)):
        path = _local_path(source)
        if path is not None and path.is_dir():
            source = _list_frame_dir(path, name)
        elif path is not None and not path.exists():
            raise InputError(f"{name}: no such file")
        else:
            if sample_fps is not None:
                raise InputError(f"{name}: sample_fps applies to frame lists; use fps for video files")
            lo = cfg.min_pixels if min_pixels is None else min_pixels
            return _decode(
                str(path) if path is not None else str(source), cfg, fps=fps, nframes=nframes,
                video_start=video_start, video_end=video_end, min_pixels=lo, max_pixels=max_pixels,
                total_pixels=total_pixels, resized=resized, name=name,
            )  # fmt: skip
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 4 or source.shape[-1] != 3:
            raise InputError(
                f"{name}: video arrays must be uint8 (T, H, W, 3), got {source.dtype} {source.shape}"
            )
    elif not isinstance(source, (list, tuple)):
        raise InputError(f"{name}: unsupported video source type {type(source).__name__}")
    if nframes is not None or video_start is not None or video_end is not None:
        raise InputError(f"{name}: nframes/video_start/video_end apply to video files, not frame lists")
    rate = sample_fps if sample_fps is not None else fps if fps is not None else DEFAULT_FRAME_LIST_FPS
    return _frame_list(
        source, cfg, frame_rate=rate, min_pixels=min_pixels, max_pixels=max_pixels,
        total_pixels=total_pixels, resized=resized, name=name,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Tensors


def video_lut(cfg: VideoConfig) -> np.ndarray:
    """The normalisation table of `cfg.normalize`."""
    return normalize_lut(tuple(cfg.image_mean), tuple(cfg.image_std), cfg.rescale_factor, cfg.normalize)


def patchify_video(frames: np.ndarray, cfg: VideoConfig = VideoConfig()) -> tuple[np.ndarray, np.ndarray]:
    """uint8 `(T, H, W, 3)` frames at the final size -> `(patches float32 (N, 1176), grid_thw int64 (3,))`."""
    patches, grid = patchify_uint8(
        frames,
        video_lut(cfg),
        patch_size=cfg.patch_size,
        merge_size=cfg.merge_size,
        temporal_patch_size=cfg.temporal_patch_size,
    )
    return patches, np.asarray(grid, dtype=np.int64)


def process_video(
    source: object, cfg: VideoConfig = VideoConfig(), **kw
) -> tuple[np.ndarray, np.ndarray, float]:
    """One video -> `(pixel_values_videos (N, 1176) float32, video_grid_thw (3,) int64, second_per_grid_ts)`.

    `second_per_grid_ts = temporal_patch_size / sampled_fps` (HF `_process_videos`); frames without a
    frame rate use 2.0 fps (`load_video`), i.e. 1.0 s per grid step, not HF's 2/24 fallback.
    Keyword arguments are `load_video`'s.
    """
    video = load_video(source, cfg, **kw)
    patches, grid = patchify_video(video.frames, cfg)
    return patches, grid, cfg.temporal_patch_size / video.sampled_fps


def process_videos(
    sources: Sequence[object], cfg: VideoConfig = VideoConfig(), **kw
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Videos -> `(pixel_values_videos (sum N, 1176), video_grid_thw (n, 3) int64, second_per_grid_ts (n,) float32)`."""
    if isinstance(sources, (str, os.PathLike, np.ndarray)):
        raise InputError(f"process_videos takes a list of videos, got one {describe(sources)}")
    patches, grids, seconds = [], [], []
    for i, source in enumerate(sources):
        label = f"video {i} ({describe(str(source) if isinstance(source, os.PathLike) else source)})"
        p, g, s = process_video(source, cfg, name=label, **kw)
        patches.append(p)
        grids.append(g)
        seconds.append(s)
    if not patches:
        d = 3 * cfg.temporal_patch_size * cfg.patch_size**2
        return np.zeros((0, d), np.float32), np.zeros((0, 3), np.int64), np.zeros((0,), np.float32)
    return (
        np.concatenate(patches, axis=0),
        np.stack(grids).astype(np.int64),
        np.asarray(seconds, dtype=np.float32),
    )
