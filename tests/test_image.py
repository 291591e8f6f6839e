"""Image pipeline parity with `Qwen2VLImageProcessorPil` (bit-exact), both smart_resize rules, sources, errors."""

from __future__ import annotations

import base64
import http.server
import io
import math
import socket
import sys
import threading
import types

import numpy as np
import pytest
from PIL import Image

from conversion.tiny_hf import hf_image_processor
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.image import (
    ImageConfig,
    load_image,
    process_image,
    process_images,
    smart_resize,
)

SMALL_MAX = 28 * 28 * 64
HUB_MAX = 12845056


@pytest.fixture(scope="module")
def hf_small():
    return hf_image_processor(3136, SMALL_MAX)


@pytest.fixture(scope="module")
def hf_hub():
    return hf_image_processor(3136, HUB_MAX)


@pytest.fixture(scope="module")
def qvu():
    """qwen_vl_utils.vision_process, imported with torchvision stubbed (only its pure functions are used)."""
    import transformers  # noqa: F401 - must import before the stubs so it sees the real environment

    names = ("torchvision", "torchvision.io", "torchvision.transforms")
    saved = {n: sys.modules.get(n) for n in names}
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0"
    tv.io = types.ModuleType("torchvision.io")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC=3)
    sys.modules.update({"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms})
    try:
        from qwen_vl_utils import vision_process
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return vision_process


def _content(rng, h, w, channels):
    """Noise or a smooth gradient, uint8 (h, w, channels)."""
    if rng.random() < 0.5:
        return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    phase = rng.random(channels) * 6
    x = 127.5 + 127.5 * np.sin(xx[..., None] / max(w, 1) * 5 + yy[..., None] / max(h, 1) * 3 + phase)
    return x.round().astype(np.uint8)


def _random_image(rng, h, w, mode):
    if mode in ("RGB", "RGBA", "CMYK"):
        return Image.frombytes(mode, (w, h), _content(rng, h, w, len(mode)).tobytes())
    if mode == "LA":
        return Image.frombytes("LA", (w, h), _content(rng, h, w, 2).tobytes())
    if mode == "L":
        return Image.fromarray(_content(rng, h, w, 1)[..., 0])
    if mode in ("P", "P+t"):
        im = Image.fromarray(_content(rng, h, w, 3), "RGB").quantize(16)
        if mode == "P+t":
            im.info["transparency"] = 3
        return im
    if mode == "I;16":
        return Image.frombytes("I;16", (w, h), rng.integers(0, 65536, (h, w), dtype="<u2").tobytes())
    raise AssertionError(mode)


def _sizes(rng):
    """(h, w, hub) covering both branches, sides under 28 px, and aspect ratios just under 200."""
    out = []
    for _ in range(120):  # mostly shrink under the small max_pixels, some grow under min_pixels
        out.append((int(rng.integers(15, 360)), int(rng.integers(15, 360)), False))
    for _ in range(30):  # tiny sides, including 1..14 px
        out.append((int(rng.integers(1, 28)), int(rng.integers(1, 120)), False))
    for _ in range(20):  # aspect ratio in (190, 200]
        short = int(rng.integers(1, 4))
        long = math.floor(short * rng.uniform(190, 200))
        out.append((short, long, False) if rng.random() < 0.5 else (long, short, False))
    for _ in range(30):  # min_pixels branch and mild resizes under Hub limits
        out.append((int(rng.integers(1, 120)), int(rng.integers(1, 120)), True))
    out += [(199, 1, False), (1, 199, False), (1, 1, False), (14, 14, False), (15, 600, True)]
    return out


def test_pixel_values_bit_identical_to_hf(hf_small, hf_hub):
    rng = np.random.default_rng(20260101)
    modes = ["RGB", "RGBA", "LA", "L", "P", "P+t", "CMYK", "I;16"]
    small, hub = ImageConfig(max_pixels=SMALL_MAX), ImageConfig()
    sizes = _sizes(rng)
    assert len(sizes) >= 200
    branches = set()
    for i, (h, w, use_hub) in enumerate(sizes):
        image = _random_image(rng, h, w, modes[i % len(modes)])
        ref = (hf_hub if use_hub else hf_small)(image, return_tensors="np")
        patches, grid = process_image(image, hub if use_hub else small)
        assert patches.dtype == np.float32 and grid.dtype == np.int64
        assert np.array_equal(grid, ref["image_grid_thw"][0]), (h, w, image.mode)
        assert np.array_equal(patches, ref["pixel_values"]), (h, w, image.mode)
        rh, rw = int(grid[1]) * 14, int(grid[2]) * 14
        branches.add("down" if rh * rw < h * w else "up" if rh * rw > h * w else "same")
    assert {"down", "up"} <= branches


def test_process_images_concatenates_like_hf(hf_small):
    rng = np.random.default_rng(1)
    images = [_random_image(rng, h, w, "RGB") for h, w in [(40, 90), (300, 200), (28, 28)]]
    ref = hf_small(images, return_tensors="np")
    pv, thw = process_images(images, ImageConfig(max_pixels=SMALL_MAX))
    assert np.array_equal(pv, ref["pixel_values"]) and np.array_equal(thw, ref["image_grid_thw"])
    assert thw.dtype == np.int64 and thw.shape == (3, 3)


def test_numpy_rgba_follows_hf_numpy_rule(hf_small):
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, (37, 61, 4), dtype=np.uint8)
    ref = hf_small(array, return_tensors="np")
    patches, grid = process_image(array, ImageConfig(max_pixels=SMALL_MAX))
    assert np.array_equal(patches, ref["pixel_values"]) and np.array_equal(grid, ref["image_grid_thw"][0])


def test_smart_resize_hf_rule_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(3)
    for max_pixels in (HUB_MAX, 1003520, 200704, SMALL_MAX, 28 * 28 * 16):
        for _ in range(1000):
            h, w = (int(v) for v in rng.integers(1, 9000 if rng.random() < 0.5 else 60, 2))
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(InputError, match="aspect ratio"):
                    smart_resize(h, w, 28, 3136, max_pixels)
                continue
            assert smart_resize(h, w, 28, 3136, max_pixels) == hf_smart_resize(h, w, 28, 3136, max_pixels)


def test_smart_resize_qwen_vl_utils_rule(qvu):
    rng = np.random.default_rng(4)
    raised = 0
    for max_pixels in (HUB_MAX, 1003520, SMALL_MAX, 28 * 28 * 16):
        for _ in range(1000):
            h, w = (int(v) for v in rng.integers(1, 9000 if rng.random() < 0.5 else 60, 2))
            if max(h, w) / min(h, w) > 200:
                continue
            ref = qvu.smart_resize(h, w, 28, 3136, max_pixels)
            if 0 in ref:
                raised += 1
                with pytest.raises(InputError, match="resizes to"):
                    smart_resize(h, w, 28, 3136, max_pixels, rule="qwen_vl_utils")
            else:
                assert smart_resize(h, w, 28, 3136, max_pixels, rule="qwen_vl_utils") == ref
    with pytest.raises(InputError):
        smart_resize(10, 2000, 28, 3136, 28 * 28 * 16, rule="qwen_vl_utils")
    assert qvu.smart_resize(10, 2000, 28, 3136, 28 * 28 * 16) == (0, 1568)


def test_smart_resize_spec_examples():
    assert smart_resize(1, 100, rule="qwen_vl_utils") == (28, 112)
    assert smart_resize(1, 100) == (28, 560)
    assert smart_resize(14, 600, rule="qwen_vl_utils") == (28, 588)
    assert smart_resize(14, 600) == (28, 392)
    assert smart_resize(10, 2000, max_pixels=28 * 28 * 16) == (28, 812)
    for (h, w), tokens in {(480, 640): 391, (1080, 1920): 2691, (224, 224): 64}.items():
        rh, rw = smart_resize(h, w)
        assert rh * rw // (28 * 28) == tokens
    assert smart_resize(480, 640) == (476, 644)
    rh, rw = smart_resize(1080, 1920, max_pixels=1003520)
    assert rh * rw // 784 == 1222
    for bad in [(0, 10), (10, -1)]:
        with pytest.raises(InputError):
            smart_resize(*bad)
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(1, 201)


def test_resized_height_width_and_per_item_limits():
    rng = np.random.default_rng(5)
    image = _random_image(rng, 100, 150, "RGB")
    _, grid = process_image(image, resized_height=50, resized_width=70)
    assert grid.tolist() == [1, 4, 4]  # 56x56 after qwen-vl-utils' rounding
    _, grid = process_image(image, max_pixels=28 * 28 * 4)
    assert grid.tolist() == [1, 2, 4]  # 28x56: the max_pixels branch floors 45.7 and 68.6 px


def test_image_config_from_preprocessor_config():
    from conversion.tiny_hf import HUB_PREPROCESSOR_CONFIG

    assert ImageConfig.from_preprocessor_config(HUB_PREPROCESSOR_CONFIG) == ImageConfig()
    cfg = ImageConfig.from_preprocessor_config({"size": {"shortest_edge": 100, "longest_edge": 2000}})
    assert (cfg.min_pixels, cfg.max_pixels, cfg.factor) == (100, 2000, 28)


def _png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):
        if self.path != "/img.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_every_source_kind_loads_the_same_pixels(tmp_path, http_server):
    rng = np.random.default_rng(6)
    array = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    data = _png_bytes(array)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    _Handler.payload = data
    sources = [
        str(path),
        path,
        path.as_uri(),
        data,
        "data:image/png;base64," + base64.b64encode(data).decode(),
        Image.fromarray(array),
        array,
        f"{http_server}/img.png",
    ]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), array), type(source)
    gray = load_image(array[..., 0])
    assert np.array_equal(np.asarray(gray), np.repeat(array[..., :1], 3, axis=-1))


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_inputs_raise_named_input_errors(tmp_path, http_server):
    rng = np.random.default_rng(7)
    png = _png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    for name, data in {"trunc.png": png[: len(png) // 2], "trunc.jpg": jpeg[: len(jpeg) // 2]}.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really an image")
    # A valid PNG header claiming 100000 x 100000 pixels: refused before any decoding.
    bomb = bytearray(png)
    bomb[16:24] = (100000).to_bytes(4, "big") * 2
    (tmp_path / "bomb.png").write_bytes(bytes(bomb))
    port = _closed_port()
    cases = [
        (str(tmp_path / "missing.png"), "missing.png"),
        (str(tmp_path / "corrupt.png"), "corrupt.png"),
        (str(tmp_path / "trunc.png"), "trunc.png"),
        (str(tmp_path / "trunc.jpg"), "trunc.jpg"),
        (str(tmp_path / "bomb.png"), "bomb.png"),
        (b"garbage bytes", "raw bytes"),
        ("data:image/png;base64,!!!", "data URI"),
        (np.zeros((0, 5, 3), np.uint8), "shape=(0, 5, 3)"),
        (np.zeros((5, 5, 3), np.float32), "shape=(5, 5, 3)"),
        (np.zeros((2, 402, 3), np.uint8), "shape=(2, 402, 3)"),  # aspect ratio 201
        (f"http://127.0.0.1:{port}/x.png", f"127.0.0.1:{port}"),
        (f"{http_server}/nothing.png", "nothing.png"),
        (12345, "int"),
    ]
    for source, needle in cases:
        with pytest.raises(InputError) as info:
            process_image(source)
        assert needle in str(info.value), (needle, str(info.value))
    with pytest.raises(InputError, match="max_image_pixels"):
        load_image(png, max_image_pixels=1000)
    with pytest.raises(InputError, match="image 1"):
        process_images([png, b"junk"])
