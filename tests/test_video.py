"""Video pipeline vs qwen-vl-utils 0.0.14 and transformers 5.24's `Qwen2VLVideoProcessor` (spec 4.6).

Neither reference imports without torchvision, which has no build here. qwen-vl-utils' module is executed
under stub torchvision modules (its frame resize replaced by one that records the call and, where sizes
differ, resizes by nearest neighbour, so only shapes are compared there). HF's `sample_frames`, `patchify`
and fused rescale+normalise are the real source functions, compiled out of the installed files.
"""

from __future__ import annotations
import __future__

import ast
import dataclasses
import importlib.util
import math
import pathlib
import sys
import types

import av
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from qwenvl_jax.processing import video as V
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.patchify import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TRANSFORMERS = pathlib.Path(transformers.__file__).parent


# ---------------------------------------------------------------------------------------------------------
# References


class _ResizeRecorder:
    """Stands in for `torchvision.transforms.functional.resize` inside qwen-vl-utils."""

    def __init__(self):
        self.calls: list[tuple[tuple[int, ...], list[int]]] = []

    def __call__(self, video, size, interpolation=None, antialias=None):
        self.calls.append((tuple(video.shape), list(size)))
        if list(video.shape[-2:]) == list(size):
            return video  # torchvision returns a same-size input unchanged
        return torch.nn.functional.interpolate(video.float(), size=size, mode="nearest")


@pytest.fixture(scope="module")
def qvu():
    """qwen_vl_utils.vision_process, executed under stub torchvision modules that are removed afterwards."""
    recorder = _ResizeRecorder()
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0.0"
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    io = types.ModuleType("torchvision.io")
    functional.resize = recorder
    transforms.functional = functional
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    tv.transforms, tv.io = transforms, io
    stubs = {
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.io": io,
    }
    path = pathlib.Path(importlib.util.find_spec("qwen_vl_utils").submodule_search_locations[0])
    with pytest.MonkeyPatch.context() as mp:
        for key, module in stubs.items():
            mp.setitem(sys.modules, key, module)
        spec = importlib.util.spec_from_file_location("_qvu_vision_process", path / "vision_process.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    module.resize_recorder = recorder
    return module


def _source_functions(path: pathlib.Path, names: set[str], namespace: dict) -> dict:
    """Compile the named (method) definitions of a source file, without decorators, into `namespace`."""
    tree = ast.parse(path.read_text())
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in names]
    assert {d.name for d in defs} == names, f"{names} not all found in {path}"
    for d in defs:
        d.decorator_list = []
    code = compile(
        ast.Module(body=defs, type_ignores=[]), str(path), "exec", flags=__future__.annotations.compiler_flag
    )
    exec(code, namespace)
    return {n: namespace[n] for n in names}


def _tv_normalize(image, mean, std, inplace=False):
    """torchvision.transforms.v2.functional.normalize on a float tensor (`normalize_image`)."""
    if not inplace:
        image = image.clone()
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    return image.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


@pytest.fixture(scope="module")
def hf():
    """A stand-in `self` carrying HF's real sample_frames / patchify / rescale_and_normalize."""
    ns = {"torch": torch, "math": math}
    video_fns = _source_functions(
        TRANSFORMERS / "models/qwen2_vl/video_processing_qwen2_vl.py", {"sample_frames", "patchify"}, ns
    )
    backend_fns = _source_functions(
        TRANSFORMERS / "image_processing_backends.py",
        {"_fuse_mean_std_and_rescale_factor", "rescale_and_normalize"},
        ns,
    )
    self = types.SimpleNamespace(
        num_frames=None,
        fps=None,
        temporal_patch_size=2,
        min_frames=4,
        max_frames=768,
        normalize=_tv_normalize,
    )
    for name, fn in {**video_fns, **backend_fns}.items():
        setattr(self, name, types.MethodType(fn, self))
    return self


def hf_pixels(hf, frames_tchw: torch.Tensor) -> tuple[np.ndarray, tuple[int, int, int]]:
    """HF `_preprocess` after resize: fused rescale+normalise, then patchify, for one video."""
    x = hf.rescale_and_normalize(
        frames_tchw[None], True, 1 / 255, True, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    )
    patches, gt, gh, gw = hf.patchify(x, patch_size=14, merge_size=2, temporal_patch_size=2)
    return patches[0].numpy(), (gt, gh, gw)


def noise_frames(rng, t, h, w) -> np.ndarray:
    return rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def write_video(path, frames, rate: int, codec: str = "ffv1", pix_fmt: str = "bgr0", bit_rate=None) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format=pix_fmt)
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------------------
# Frame counts and indices


def test_smart_nframes_matches_qwen_vl_utils(qvu):
    for (total, fps), want in {(300, 30): 20, (40, 25): 4, (2000, 24): 166, (30000, 30): 768}.items():
        assert V.smart_nframes(total, fps) == qvu.smart_nframes({}, total, fps) == want
    rng = np.random.default_rng(0)
    for _ in range(2000):
        total = int(rng.integers(1, 50000))
        video_fps = float(rng.choice([rng.uniform(0.5, 120), rng.integers(1, 61)]))
        ele: dict = {}
        if rng.random() < 0.3:
            ele["nframes"] = int(rng.integers(0, 100))
        else:
            if rng.random() < 0.5:
                ele["fps"] = float(rng.uniform(0.1, 8))
            if rng.random() < 0.3:
                ele["min_frames"] = int(rng.integers(1, 12))
            if rng.random() < 0.3:
                ele["max_frames"] = int(rng.integers(2, 1000))
        try:
            want = qvu.smart_nframes(ele, total, video_fps)
        except ValueError:
            with pytest.raises(InputError):
                V.smart_nframes(total, video_fps, **ele)
            continue
        assert V.smart_nframes(total, video_fps, **ele) == want, (total, video_fps, ele)


def test_smart_nframes_errors():
    with pytest.raises(InputError, match="cannot sample"):
        V.smart_nframes(1, 30.0)
    with pytest.raises(InputError, match="cannot sample"):
        V.smart_nframes(100, 30.0, nframes=200)
    with pytest.raises(InputError, match="cannot sample"):
        V.smart_nframes(100, 30.0, nframes=0)
    with pytest.raises(InputError, match="frame rate"):
        V.smart_nframes(100, 0.0)
    with pytest.raises(InputError):
        V.hf_num_frames(10, 30.0, num_frames=12)


def _random_range(rng, total, video_fps):
    duration = total / video_fps
    start = float(rng.uniform(-1, duration)) if rng.random() < 0.5 else None
    end = float(rng.uniform(0, duration + 1)) if rng.random() < 0.5 else None
    return start, end


def test_indices_match_qwen_vl_utils(qvu):
    """Long videos included: there float32 linspace picks other frames than float64 would."""
    rng = np.random.default_rng(1)
    cfg = V.VideoConfig()
    checked = 0
    for _ in range(1500):
        total = int(rng.choice([rng.integers(2, 2000), rng.integers(2000, 400000)]))
        video_fps = float(rng.choice([24, 25, 29.97, 30, 60, rng.uniform(1, 60)]))
        start, end = _random_range(rng, total, video_fps)
        nframes = int(rng.integers(2, 800)) if rng.random() < 0.2 else None
        fps = float(rng.uniform(0.2, 6)) if rng.random() < 0.3 else 2.0
        ele = {
            k: v for k, v in dict(video_start=start, video_end=end, nframes=nframes).items() if v is not None
        }
        if nframes is None:
            ele["fps"] = fps
        try:
            s, e, count = qvu.calculate_video_frame_range(ele, total, video_fps)
            n = qvu.smart_nframes(ele, total_frames=count, video_fps=video_fps)
        except ValueError:
            with pytest.raises(InputError):
                V.sample_indices(total, video_fps, dataclasses.replace(cfg, fps=fps), start, end, nframes)
            continue
        want = torch.linspace(s, e, n).round().long().numpy()
        got, sampled_fps = V.sample_indices(
            total, video_fps, dataclasses.replace(cfg, fps=fps), start, end, nframes
        )
        np.testing.assert_array_equal(got, want, err_msg=str((total, video_fps, ele)))
        assert got.dtype == np.int64
        assert sampled_fps == n / max(count, 1e-6) * video_fps
        checked += 1
    assert checked > 1000


def test_indices_match_hf_sample_frames(hf):
    rng = np.random.default_rng(2)
    cfg = V.VideoConfig(sampling="hf")
    for _ in range(1500):
        total = int(rng.choice([rng.integers(2, 2000), rng.integers(2000, 400000)]))
        video_fps = float(rng.choice([24, 25, 30, rng.uniform(1, 60)]))
        metadata = types.SimpleNamespace(total_num_frames=total, fps=video_fps)
        if rng.random() < 0.2:
            kw = dict(num_frames=int(rng.integers(2, min(total, 800) + 1)))
            ours = dict(cfg=cfg, nframes=kw["num_frames"])
        else:
            kw = dict(fps=float(rng.uniform(0.2, 6)))
            ours = dict(cfg=dataclasses.replace(cfg, fps=kw["fps"]))
        try:
            want = hf.sample_frames(metadata, **kw).numpy()
        except ValueError:
            with pytest.raises(InputError):
                V.sample_indices(total, video_fps, **ours)
            continue
        got, sampled_fps = V.sample_indices(total, video_fps, **ours)
        np.testing.assert_array_equal(got, want, err_msg=str((total, video_fps)))
        assert sampled_fps == len(want) / total * video_fps


def test_frame_range_errors():
    with pytest.raises(InputError, match="time range"):
        V.sample_indices(100, 25.0, V.VideoConfig(), video_start=3.0, video_end=2.0)
    with pytest.raises(InputError, match="frame rate"):
        V.sample_indices(100, 0.0, V.VideoConfig())


# ---------------------------------------------------------------------------------------------------------
# Patchify and normalisation


@pytest.mark.parametrize("t", [1, 3, 4])
def test_patchify_matches_hf_video_processor(hf, t):
    frames = noise_frames(np.random.default_rng(t), t, 56, 84)
    patches, grid = V.patchify_video(frames)
    want, want_grid = hf_pixels(hf, torch.from_numpy(frames).permute(0, 3, 1, 2))
    assert patches.dtype == np.float32 and patches.shape == (((t + 1) // 2) * 4 * 6, 1176)
    np.testing.assert_array_equal(patches, want)
    np.testing.assert_array_equal(grid, want_grid)
    assert grid.dtype == np.int64


def test_fused_lut_every_level(hf):
    """All 256 levels of every channel, against HF's fused normalisation."""
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256)[None]
    want = hf.rescale_and_normalize(
        levels, True, 1 / 255, True, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    )
    np.testing.assert_array_equal(V.video_lut(V.VideoConfig()), want[0, :, 0, :].numpy())


# ---------------------------------------------------------------------------------------------------------
# Frame lists


@pytest.mark.parametrize("limits", [{}, {"min_pixels": 28 * 28 * 50, "max_pixels": 28 * 28 * 100}])
def test_frame_list_matches_qwen_vl_utils(qvu, hf, limits):
    """Sizes chosen so that qwen-vl-utils' second (torchvision) resize is to the same size: exact pixels."""
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(f) for f in noise_frames(rng, 5, 340, 450)]
    qvu.resize_recorder.calls.clear()
    video, sample_fps = qvu.fetch_video({"video": frames, **limits}, return_video_sample_fps=True)
    assert all(list(shape[-2:]) == size for shape, size in qvu.resize_recorder.calls)
    ours = V.load_video(frames, **limits)
    want = video.permute(0, 2, 3, 1).numpy()
    assert ours.frames.shape == want.shape and ours.frames.shape[0] == 6
    np.testing.assert_array_equal(ours.frames, want.astype(np.uint8))
    assert ours.sampled_fps == sample_fps == 2.0
    np.testing.assert_array_equal(ours.indices, [0, 1, 2, 3, 4, 4])

    patches, grid, seconds = V.process_video(frames, **limits)
    want_patches, want_grid = hf_pixels(hf, video)
    np.testing.assert_array_equal(patches, want_patches)
    np.testing.assert_array_equal(grid, want_grid)
    assert seconds == 2 / sample_fps == 1.0


@pytest.mark.parametrize(
    ("n", "size", "extra"),
    [
        (4, (700, 900), {}),
        (30, (700, 900), {}),
        (7, (700, 900), {"total_pixels": 2_000_000}),
        (40, (360, 640), {"total_pixels": 3_000_000}),
        (10, (500, 500), {"total_pixels": 300_000, "min_pixels": 28 * 28 * 64}),
        (3, (90, 120), {}),
        (6, (480, 640), {"max_pixels": 200_000}),
        (4, (480, 640), {"resized_height": 300, "resized_width": 200}),
    ],
)
def test_frame_list_sizes_and_budget_match_qwen_vl_utils(qvu, n, size, extra):
    """The per-frame budget and both resize stages produce qwen-vl-utils' final shape."""
    base = [Image.new("RGB", size[::-1], (i * 40, 0, 0)) for i in range(2)]
    frames = [base[i % 2] for i in range(n)]
    want = qvu.fetch_video({"video": frames, **extra})
    ours = V.load_video(frames, V.VideoConfig(resize_rule="qwen_vl_utils"), **extra)
    assert ours.frames.shape == tuple(want.permute(0, 2, 3, 1).shape), extra


def test_frame_max_pixels_formula():
    cfg = V.VideoConfig()
    budget = 128000 * 784 * 0.9
    for n in (2, 4, 100, 192, 768):
        want = max(min(768 * 784, budget / n * 2), int(128 * 784 * 1.05))
        assert V.frame_max_pixels(cfg, n, cfg.min_pixels) == want
    assert V.frame_max_pixels(cfg, 4, cfg.min_pixels, 50_000) == 50_000
    # HF's cap_pixels_per_frame arithmetic is integral.
    hf_cfg = V.VideoConfig(sampling="hf")
    assert V.frame_max_pixels(hf_cfg, 700, hf_cfg.min_pixels) == max(
        min(602112, int(budget) * 2 // 700), int(100352 * 1.05)
    )


def test_numpy_array_and_directory_equal_frame_list(tmp_path):
    rng = np.random.default_rng(4)
    frames = noise_frames(rng, 5, 64, 90)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"frame_{i + 1}.png")  # natural order: 1, 2, ..., 10
    Image.fromarray(frames[0]).save(tmp_path / "frame_10.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    listed = [*frames, frames[0]]
    ref = V.load_video([Image.fromarray(f) for f in listed], sample_fps=4.0)
    for source in (tmp_path, str(tmp_path), np.stack(listed)):
        got = V.load_video(source, sample_fps=4.0)
        np.testing.assert_array_equal(got.frames, ref.frames)
        assert got.sampled_fps == ref.sampled_fps == 4.0
    paths = [str(tmp_path / f"frame_{i}.png") for i in (1, 2, 3, 4, 5, 10)]
    np.testing.assert_array_equal(V.load_video(paths, fps=4.0).frames, ref.frames)


def test_frame_list_errors(tmp_path):
    frames = [np.zeros((56, 56, 3), np.uint8)] * 2 + [np.zeros((56, 84, 3), np.uint8)]
    with pytest.raises(InputError, match="frame 2"):
        V.load_video(frames, name="clip-7")
    with pytest.raises(InputError, match="frame 1"):
        V.load_video([np.zeros((56, 56, 3), np.uint8), str(tmp_path / "missing.png")])
    with pytest.raises(InputError, match="no frames"):
        V.load_video([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image frames"):
        V.load_video(tmp_path / "empty")
    with pytest.raises(InputError, match="video files"):
        V.load_video(frames[:2], nframes=4)
    with pytest.raises(InputError, match="uint8"):
        V.load_video(np.zeros((2, 56, 56, 3), np.float32))


# ---------------------------------------------------------------------------------------------------------
# Video files


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """50 lossless noise frames at 25 fps in an MKV (no frame count in the header) and an MP4 (mpeg4)."""
    frames = noise_frames(np.random.default_rng(5), 50, 72, 96)
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "noise.mkv", frames, 25)
    gray = np.repeat(
        np.repeat(np.arange(0, 250, 5, dtype=np.uint8), 72 * 96).reshape(50, 72, 96)[..., None], 3, -1
    )
    write_video(root / "gray.mp4", gray, 25, codec="mpeg4", pix_fmt="yuv420p", bit_rate=20_000_000)
    return frames, root


def _resized(frames, size):
    return np.stack(
        [np.asarray(Image.fromarray(f).resize(size[::-1], Image.Resampling.BICUBIC)) for f in frames]
    )


def test_video_file_decode_exact(clip):
    frames, root = clip
    path = root / "noise.mkv"
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # exercises the packet count
    video = V.load_video(str(path))
    np.testing.assert_array_equal(video.indices, [0, 16, 33, 49])  # linspace(0, 49, 4).round()
    assert video.source_fps == 25.0 and video.total_frames == 50
    assert video.sampled_fps == 4 / 50 * 25
    h, w = video.frames.shape[1:3]
    assert (h, w) == V.smart_resize(72, 96, 28, 128 * 784, 768 * 784)
    np.testing.assert_array_equal(video.frames, _resized(frames[[0, 16, 33, 49]], (h, w)))
    patches, grid, seconds = V.process_video(f"file://{path}")
    np.testing.assert_array_equal(grid, [2, h // 14, w // 14])
    assert seconds == 2 / 2.0
    np.testing.assert_array_equal(patches, V.patchify_video(video.frames)[0])


def test_video_file_sampling_options(clip):
    frames, root = clip
    path = str(root / "noise.mkv")
    v = V.load_video(path, fps=10.0, resized_height=56, resized_width=56)
    np.testing.assert_array_equal(v.indices, V._torch_linspace_round(0, 49, 20))
    assert v.frames.shape == (20, 56, 56, 3) and v.sampled_fps == 10.0
    np.testing.assert_array_equal(v.frames, _resized(frames[v.indices], (56, 56)))
    v = V.load_video(path, nframes=6, video_start=0.5, video_end=1.5, resized_height=56, resized_width=56)
    # frames ceil(12.5)=13 .. floor(37.5)=37, 6 of them
    np.testing.assert_array_equal(v.indices, torch.linspace(13, 37, 6).round().long().numpy())
    assert v.total_frames == 25 and v.sampled_fps == 6 / 25 * 25
    v = V.load_video(path, V.VideoConfig(sampling="hf"), resized_height=56, resized_width=56)
    np.testing.assert_array_equal(v.indices, [0, 12, 25, 37])  # arange(0, 50, 12.5).int()
    np.testing.assert_array_equal(v.frames, _resized(frames[[0, 12, 25, 37]], (56, 56)))


def test_lossy_video_file(clip):
    _, root = clip
    video = V.load_video(root / "gray.mp4", fps=5.0, resized_height=56, resized_width=56)
    with av.open(str(root / "gray.mp4")) as c:
        assert c.streams.video[0].frames == 50
    np.testing.assert_array_equal(video.indices, V._torch_linspace_round(0, 49, 10))
    levels = video.frames[:, 28, 28, 0].astype(int)
    assert np.abs(levels - 5 * video.indices).max() <= 3


def test_process_videos_batch(clip):
    frames, root = clip
    pv, grids, seconds = V.process_videos(
        [root / "noise.mkv", list(frames[:3])], resized_height=56, resized_width=84
    )
    np.testing.assert_array_equal(grids, [[2, 4, 6], [2, 4, 6]])
    assert pv.shape == (96, 1176) and pv.dtype == np.float32
    assert seconds.dtype == np.float32
    np.testing.assert_array_equal(seconds, [1.0, 1.0])
    with pytest.raises(InputError, match="video 1"):
        V.process_videos([root / "noise.mkv", root / "missing.mp4"])


def test_video_file_errors(clip, tmp_path, monkeypatch):
    frames, root = clip
    with pytest.raises(InputError, match="no such file"):
        V.load_video(str(tmp_path / "missing.mp4"))
    with pytest.raises(InputError, match="no such file"):
        V.load_video(f"file://{tmp_path}/missing.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(6).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match=r"garbage\.mp4"):
        V.load_video(str(garbage))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((root / "gray.mp4").read_bytes()[:2000])
    with pytest.raises(InputError, match=r"truncated\.mp4"):
        V.load_video(str(truncated))
    write_video(tmp_path / "one.mkv", frames[:1], 25)
    with pytest.raises(InputError, match="at least 2"):
        V.load_video(str(tmp_path / "one.mkv"))
    with pytest.raises(InputError, match="time range"):
        V.load_video(str(root / "noise.mkv"), video_start=1.5, video_end=1.0)
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(InputError, match=r"qwenvl-jax\[video\]"):
        V.load_video(str(root / "noise.mkv"))


# ---------------------------------------------------------------------------------------------------------
# Config


def test_from_preprocessor_config():
    cfg = V.VideoConfig.from_preprocessor_config(
        {
            "size": {"shortest_edge": 3136, "longest_edge": 12845056},
            "max_pixels": 602112,
            "temporal_patch_size": 2,
            "fps": 1.0,
            "max_video_tokens": 32000,
            "video_processor_type": "Qwen2VLVideoProcessor",
        }
    )
    assert (cfg.min_pixels, cfg.max_pixels, cfg.fps) == (3136, 602112, 1.0)
    assert cfg.budget_pixels == 32000 * 784 * 0.9
    assert V.VideoConfig().budget_pixels == 128000 * 784 * 0.9
    with pytest.raises(ValueError, match="sampling"):
        V.VideoConfig(sampling="decord")
