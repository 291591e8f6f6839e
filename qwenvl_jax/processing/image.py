"""Images -> Qwen2.5-VL `pixel_values` and `image_grid_thw`, bit-identical to `Qwen2VLImageProcessorPil`.

The reference converts PIL -> numpy CHW -> PIL -> BICUBIC resize -> numpy -> float64 rescale -> float32
normalise -> patchify (spec 4.2-4.5). Here the decoded image is resized once in PIL and its uint8 pixels go
straight to `patchify_uint8`, whose lookup table reproduces the float arithmetic exactly. Every input that
cannot be turned into a correct tensor raises `InputError` naming it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import pathlib
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

from qwenvl_jax.processing.errors import InputError, describe
from qwenvl_jax.processing.patchify import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    normalize_lut,
    patchify_uint8,
)

# PIL's own warning threshold (~0.25 GiB of RGB); larger images are refused before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 3136,
    max_pixels: int = 12845056,
    *,
    rule: str = "hf",
) -> tuple[int, int]:
    """Target `(h, w)`: multiples of `factor`, area within `[min_pixels, max_pixels]`, aspect kept.

    rule "hf" is transformers' `smart_resize`; rule "qwen_vl_utils" is qwen-vl-utils 0.0.14's, which clamps
    each side to `factor` before the range test and has no clamp after flooring (spec 4.3). They differ
    only for sides <= 14 px or tiny max_pixels with extreme aspect ratios.
    """
    if rule not in ("hf", "qwen_vl_utils"):
        raise ValueError(f"resize rule must be 'hf' or 'qwen_vl_utils', got {rule!r}")
    if height <= 0 or width <= 0:
        raise InputError(f"image size {height}x{width} (height x width) is not positive")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(
            f"image size {height}x{width} has aspect ratio {max(height, width) / min(height, width):.1f}, "
            f"above the limit of {MAX_ASPECT_RATIO}"
        )
    # Python round is half-to-even: round(14/28) == 0, which sends HF to the min_pixels branch.
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if rule == "qwen_vl_utils":
        if max_pixels < min_pixels:
            raise InputError(f"max_pixels {max_pixels} is below min_pixels {min_pixels}")
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
        if rule == "hf":
            h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0:
        # qwen-vl-utils would return a degenerate 0-pixel side here.
        raise InputError(
            f"image size {height}x{width} resizes to {h_bar}x{w_bar} under max_pixels={max_pixels} "
            f"(qwen_vl_utils rule)"
        )
    return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """The image half of an HF `preprocessor_config.json`, with the Hub defaults of every Qwen2.5-VL size."""

    min_pixels: int = 3136
    max_pixels: int = 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resize_rule: str = "hf"

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, cfg: dict) -> ImageConfig:
        """Reads flat `min_pixels`/`max_pixels` or the `size` dict (`shortest_edge`/`longest_edge`).

        The flat keys win, as in `Qwen2VLImageProcessor.__init__`, which copies them over `size`.
        """
        size = cfg.get("size") or {}
        kw: dict = {}
        min_pixels = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if min_pixels is not None:
            kw["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kw["max_pixels"] = int(max_pixels)
        for key in ("patch_size", "temporal_patch_size", "merge_size"):
            if cfg.get(key) is not None:
                kw[key] = int(cfg[key])
        for key in ("image_mean", "image_std"):
            if cfg.get(key) is not None:
                kw[key] = tuple(float(v) for v in cfg[key])
        if cfg.get("rescale_factor") is not None:
            kw["rescale_factor"] = float(cfg["rescale_factor"])
        return cls(**kw)


def _to_rgb(image: Image.Image) -> Image.Image:
    """HF `convert_to_rgb` for PIL images: any alpha or transparency key is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # HF's convert("RGB") on an RGB image is only a copy; callers never mutate the result.
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_rgb(array: np.ndarray, name: str) -> Image.Image:
    """uint8 `(H, W)`, `(H, W, 1|3|4)` arrays, converted as HF's numpy path converts them.

    Four channels are blended onto white in float64 and rounded half-to-even (HF's numpy rule, which can
    differ by one level from PIL's `alpha_composite` used for RGBA PIL images). Float arrays are refused:
    HF rescales them by a range guess, which is a silent source of wrong tensors.
    """
    if array.dtype != np.uint8:
        raise InputError(f"{name}: numpy images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise InputError(f"{name}: numpy images must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name}: image has zero size {array.shape[1]}x{array.shape[0]}")
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _fetch_url(url: str, timeout: float, name: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise InputError(f"{name}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        # URLError wraps refused connections; socket timeouts surface as TimeoutError (an OSError).
        raise InputError(f"{name}: cannot fetch URL ({e})") from e


def _read_path(path: pathlib.Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise InputError(f"{name}: no such file") from e
    except OSError as e:
        raise InputError(f"{name}: cannot read file ({e})") from e


def _decode(data: bytes, max_image_pixels: int, name: str) -> Image.Image:
    """Open, size-check from the header, fully decode, convert to RGB."""
    try:
        # PIL warns, and over twice its limit raises, inside open(); our own limit below replaces that.
        # (catch_warnings mutates process state; concurrent decoding threads may briefly share it.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: image too large to decode safely ({e})") from e
    except Exception as e:  # any decoder failure means an unusable input
        raise InputError(f"{name}: cannot identify image ({type(e).__name__}: {e})") from e
    width, height = image.size
    if width * height > max_image_pixels:
        raise InputError(
            f"{name}: image of {width}x{height} pixels exceeds max_image_pixels={max_image_pixels}"
        )
    if width == 0 or height == 0:
        raise InputError(f"{name}: image has zero size {width}x{height}")
    try:
        # A full decode here, so that truncated data fails now rather than as a short tensor later.
        image.load()
        return _to_rgb(image)
    except Exception as e:
        raise InputError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from e


def load_image(
    source: object,
    *,
    timeout: float = 10.0,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Any supported image source -> a decoded RGB `PIL.Image.Image`.

    Sources: a path (str or pathlib), `file://` URI, `http(s)://` URL, `data:image/...;base64,` URI, raw
    bytes, a PIL image (returned as is when already RGB without transparency), or a uint8 numpy array. EXIF orientation is not applied, as in HF and
    qwen-vl-utils, so that pixels match the reference.
    """
    name = name if name is not None else describe(source)
    if isinstance(source, Image.Image):
        width, height = source.size
        if width == 0 or height == 0:
            raise InputError(f"{name}: image has zero size {width}x{height}")
        try:
            source.load()
            return _to_rgb(source)
        except Exception as e:
            raise InputError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(bytes(source), max_image_pixels, name)
    if isinstance(source, pathlib.Path):
        return _decode(_read_path(source, name), max_image_pixels, name)
    if not isinstance(source, str):
        raise InputError(f"{name}: unsupported image source type {type(source).__name__}")
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError(f"{name}: only base64 data URIs are supported")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"{name}: invalid base64 payload ({e})") from e
        return _decode(data, max_image_pixels, name)
    if source.startswith(("http://", "https://")):
        return _decode(_fetch_url(source, timeout, name), max_image_pixels, name)
    if source.startswith("file://"):
        path = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
        return _decode(_read_path(pathlib.Path(path), name), max_image_pixels, name)
    return _decode(_read_path(pathlib.Path(source), name), max_image_pixels, name)


def process_image(
    source: object,
    config: ImageConfig = ImageConfig(),
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
    name: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> `(patches float32 (N, C*tps*ps*ps), grid_thw int64 (3,))`.

    Per-item `min_pixels`/`max_pixels` override the config. An explicit `resized_height`/`resized_width`
    is itself rounded by `smart_resize` with qwen-vl-utils' default bounds (4 and 16384 tokens), as its
    `fetch_image` does, and then ignores the pixel limits.
    """
    name = name if name is not None else describe(source)
    image = load_image(source, name=name)
    width, height = image.size
    f = config.factor
    try:
        if resized_height is not None or resized_width is not None:
            if resized_height is None or resized_width is None:
                raise InputError("resized_height and resized_width must be given together")
            target = smart_resize(
                resized_height, resized_width, f, 4 * f * f, 16384 * f * f, rule=config.resize_rule
            )
        else:
            lo = config.min_pixels if min_pixels is None else min_pixels
            hi = config.max_pixels if max_pixels is None else max_pixels
            target = smart_resize(height, width, f, lo, hi, rule=config.resize_rule)
    except InputError as e:
        raise InputError(f"{name}: {e}") from e
    h, w = target
    if (w, h) != (width, height):
        # The reference's resize: PIL BICUBIC on uint8 RGB with no reducing_gap (same-size is a copy).
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    lut = normalize_lut(config.image_mean, config.image_std, config.rescale_factor, "pil")
    patches, grid = patchify_uint8(
        pixels[None],
        lut,
        patch_size=config.patch_size,
        merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size,
    )
    return patches, np.asarray(grid, dtype=np.int64)


def process_images(
    sources: Sequence[object],
    config: ImageConfig = ImageConfig(),
    **per_call,
) -> tuple[np.ndarray, np.ndarray]:
    """A list of images -> concatenated `pixel_values (sum N, D)` and `image_grid_thw (n, 3)` int64."""
    if isinstance(sources, (str, bytes, np.ndarray, Image.Image)):
        raise InputError(f"process_images takes a list of images, got one {describe(sources)}")
    patches, grids = [], []
    for i, source in enumerate(sources):
        p, g = process_image(source, config, name=f"image {i} ({describe(source)})", **per_call)
        patches.append(p)
        grids.append(g)
    if not patches:
        d = 3 * config.temporal_patch_size * config.patch_size**2
        return np.zeros((0, d), np.float32), np.zeros((0, 3), np.int64)
    return np.concatenate(patches, axis=0), np.stack(grids).astype(np.int64)
