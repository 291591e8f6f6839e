"""Images per second per core: `process_image` vs HF `Qwen2VLImageProcessorPil`, decoded PIL image in.

Both sides run the whole image path (RGB conversion, BICUBIC resize, rescale/normalise, patchify) on the
same decoded photo-like PIL images with the Hub pixel limits, pinned to one core. Outputs are checked
bit-identical before timing. Run: `python bench/bench_processor.py` (add `--markdown` for a table).
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from conversion.tiny_hf import hf_image_processor  # noqa: E402
from qwenvl_jax.processing.image import ImageConfig, process_image  # noqa: E402

SIZES = [(448, 448), (640, 480), (1280, 720), (1920, 1080), (3024, 4032)]


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus sensor-like noise: resize cost is content-independent, but keep it realistic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 128 + 100 * np.sin(xx[..., None] / 97 + yy[..., None] / 61 + np.array([0, 2, 4], np.float32))
    noise = rng.normal(0, 8, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def best_rate(fn, min_time: float = 1.0, repeats: int = 5) -> float:
    """Images/s from the best of `repeats` runs of at least `min_time` s each (least disturbed by others)."""
    fn()
    best = 0.0
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time / repeats or n == 0:
            fn()
            n += 1
        best = max(best, n / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--min-time", type=float, default=2.0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    hf = hf_image_processor()
    config = ImageConfig()
    rows = []
    for width, height in SIZES:
        image = photo_like(width, height)
        ref = hf(image, return_tensors="np")
        ours, grid = process_image(image, config)
        assert np.array_equal(ours, ref["pixel_values"]) and np.array_equal(grid, ref["image_grid_thw"][0])
        ours_rate = best_rate(lambda image=image: process_image(image, config), args.min_time)
        hf_rate = best_rate(lambda image=image: hf(image, return_tensors="np"), args.min_time)
        rh, rw = int(grid[1]) * 14, int(grid[2]) * 14
        rows.append((f"{width}x{height}", f"{rw}x{rh}", ours.shape[0], ours_rate, hf_rate))
    if args.markdown:
        print("| input (WxH) | resized (WxH) | patches | ours img/s | HF img/s | speed-up |")
        print("|---|---|---|---|---|---|")
        for size, resized, n, ours_rate, hf_rate in rows:
            print(
                f"| {size} | {resized} | {n} | {ours_rate:.1f} | {hf_rate:.1f} | {ours_rate / hf_rate:.2f}x |"
            )
    else:
        print(f"{'input':>10} {'resized':>10} {'patches':>8} {'ours/s':>8} {'HF/s':>8} {'x':>6}")
        for size, resized, n, ours_rate, hf_rate in rows:
            print(
                f"{size:>10} {resized:>10} {n:>8} {ours_rate:8.1f} {hf_rate:8.1f} {ours_rate / hf_rate:6.2f}"
            )


if __name__ == "__main__":
    main()
