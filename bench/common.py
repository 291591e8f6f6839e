"""Shared parts of the GPU benchmarks (`bench_train.py`, `bench_prefill.py`, `bench_generate.py`).

Process model: the parent process only plans and prints; every measurement (one side, one shape) runs in
a fresh worker process, `python bench/<script>.py --worker JOB.json`, one after the other. Why:
- peak memory: JAX's `peak_bytes_in_use` cannot be reset, and JAX (preallocating its pool) and torch
  (caching allocator) in one process would each see the other's memory;
- robustness: an OOM is caught in the worker and reported as "OOM"; a worker that dies (an XLA abort, a
  CUDA fault, the host's OOM killer) or hangs (`--job-timeout`) is reported as such, and the next
  measurement still runs.

Same weights on both sides, with no file written (`conversion.random_weights`, shared with `qwenvl-jax
parity --random`): each HF tensor is drawn on the device by torch's generator seeded from (seed, its
on-disk key), with `conversion.tiny_hf.randomize_`'s rule (matrices N(0, 1/fan_in), biases N(0, 0.1^2),
norm scales 1 + N(0, 0.1^2)). The HF worker copies the draws into its model; our worker draws the same
tensors, maps them with `qwenvl_jax.weights.key_map`, copies them to the host one layer at a time and
builds the model with `loading.model_from_params`. Inputs come from a seeded numpy generator and
`qwenvl_jax.processing.collate`, so both sides see the same token ids, pixels and grids.

This module imports no jax or torch at top level: the parent must not touch the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere, without installing the package
    sys.path.insert(0, str(REPO))

# Re-exported for the bench scripts (`common.build_hf_model`); torch and jax are imported lazily there.
from conversion.random_weights import build_hf_model, build_ours_model  # noqa: E402, F401
from qwenvl_jax.config import Qwen25VLConfig  # noqa: E402  (pure python: no jax)
from qwenvl_jax.weights import param_shapes  # noqa: E402  (numpy only)

IMAGE_PX = {"tiny": 56}  # every other preset: 448x448 (1024 patches, 256 merged tokens)
H100_BF16_DENSE_FLOPS = 989.4e12


# ------------------------------------------------------------------------------------------- CLI


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="3B", help="model preset: 3B, 7B, ... or tiny (CPU tests)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--sides", default="ours,hf", help="comma list of ours, hf")
    p.add_argument("--image-px", type=int, default=None, help="square image side (default 448; tiny 56)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--job-timeout", type=float, default=420, help="seconds before a worker is killed")
    p.add_argument("--jax-mem-fraction", default="0.95", help="XLA_PYTHON_CLIENT_MEM_FRACTION of our workers")
    p.add_argument("--jsonl", default=None, help="also append every JSON line to this file")
    p.add_argument("--jax-cache-dir", default=str(Path(tempfile.gettempdir()) / "qwenvl_jax_bench_cache"),
                   help="JAX's persistent compilation cache for our workers ('' = off): a rerun skips compiles")  # fmt: skip
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def csv(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def shapes(text: str) -> list[tuple[int, int]]:
    """`"4x1024,8x2048"` -> `[(4, 1024), (8, 2048)]` (rows x tokens per row)."""
    out = []
    for item in csv(text):
        rows, _, seq = item.partition("x")
        if not (rows.isdigit() and seq.isdigit() and int(rows) > 0 and int(seq) > 0):
            raise SystemExit(f"shape {item!r} is not ROWSxSEQ with positive integers (e.g. 4x1024)")
        out.append((int(rows), int(seq)))
    return out


def sides(args) -> list[str]:
    chosen = csv(args.sides)
    bad = [s for s in chosen if s not in ("ours", "hf")]
    if bad or not chosen:
        raise SystemExit(f"--sides must be a comma list of 'ours' and 'hf', got {args.sides!r}")
    return chosen


def model_config(preset: str, **policy) -> Qwen25VLConfig:
    return Qwen25VLConfig.preset(preset, **policy)


def image_px(args) -> int:
    return args.image_px or IMAGE_PX.get(args.preset, 448)


# ------------------------------------------------------------------------------------------- inputs


def image_grid(config: Qwen25VLConfig, px: int) -> tuple[int, int, int]:
    """`(t, h, w)` patch grid of one square `px` image (no resize: `px` must be a multiple of 28)."""
    unit = config.vision.patch_size * config.vision.spatial_merge_size
    if px % unit:
        raise ValueError(f"image side {px} must be a multiple of patch_size * merge_size = {unit}")
    side = px // config.vision.patch_size
    return 1, side, side


def make_batch(config: Qwen25VLConfig, rows: int, seq: int, px: int, *, seed: int, labels: bool, left: bool):
    """`collate` output: `rows` rows of exactly `seq` real tokens, each [8 text, <vision_start>, image
    placeholders, <vision_end>, text]; pixels N(0, 1) (normalised-pixel scale). With `labels`, the text
    after the image is labelled and everything before it is -100."""
    from qwenvl_jax.processing import BatchSpec, collate

    vc = config.vision
    grid = image_grid(config, px)
    patches = grid[1] * grid[2]
    units = patches // vc.spatial_merge_size**2
    prefix = 8
    tail = seq - prefix - units - 2
    if tail < 2:
        raise ValueError(f"seq {seq} cannot hold a {px}px image ({units} tokens) and text after it")
    rng = np.random.default_rng(seed)
    high = min(config.bos_token_id, config.text.vocab_size)  # special tokens start at <|endoftext|>
    examples = []
    for _ in range(rows):
        ids = np.concatenate([rng.integers(0, high, prefix), [config.vision_start_token_id],
                              np.full(units, config.image_token_id), [config.vision_end_token_id],
                              rng.integers(0, high, tail)])  # fmt: skip
        ex = {"input_ids": ids.astype(np.int64), "image_grid_thw": np.array([grid]),
              "pixel_values": rng.standard_normal((patches, vc.patch_dim), np.float32)}  # fmt: skip
        if labels:
            ex["labels"] = np.where(np.arange(seq) >= seq - tail, ids, -100)
        examples.append(ex)
    spec = BatchSpec(
        batch_size=rows, seq_buckets=(seq,), image_patches=rows * patches, max_images=rows,
        padding_side="left" if left else "right", pad_token_id=config.bos_token_id,
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        merge_size=vc.spatial_merge_size, patch_size=vc.patch_size, window_size=vc.window_size,
        tokens_per_second=vc.tokens_per_second,
    )  # fmt: skip
    return collate(examples, spec)


def torch_inputs(batch, device, pixel_dtype, *, labels: bool = False) -> dict:
    """The HF processor's keys for `batch` (real images only), on `device`."""
    import torch

    n = int(batch["num_images"])
    grid = np.asarray(batch["image_grid_thw"][:n], np.int64)
    patches = int(grid.prod(-1).sum())
    keys = ["input_ids", "attention_mask", "mm_token_type_ids"] + (["labels"] if labels else [])
    out = {k: torch.as_tensor(np.asarray(batch[k], np.int64), device=device) for k in keys}
    out["image_grid_thw"] = torch.as_tensor(grid, device=device)
    out["pixel_values"] = torch.as_tensor(batch["pixel_values"][:patches], device=device).to(pixel_dtype)
    return out


def core_inputs(batch) -> dict:
    from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS

    return {k: np.asarray(batch[k]) for k in CORE_KEYS if k in batch}


# ------------------------------------------------------------------------------------ measurements


def median(xs) -> float:
    return float(statistics.median(xs))


def jax_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def torch_peak_bytes(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def jax_copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """HBM bytes/s: a jitted `x + 1` over `nbytes` of float32 (an elementwise stream XLA cannot elide),
    counting the bytes read and written; median of `repeats` after one compile run."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.size * 4 / median(times)


def check_jax_backend(device: str) -> str:
    """Fail fast when JAX did not get the platform we asked for; returns the device kind."""
    import jax

    want = "gpu" if device == "cuda" else "cpu"
    if jax.default_backend() != want:
        raise RuntimeError(
            f"JAX runs on {jax.default_backend()!r}, not {want!r} (JAX_PLATFORMS, CUDA plugin?)"
        )
    return jax.devices()[0].device_kind


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------- FLOPs


def matmul_params(config: Qwen25VLConfig) -> dict[str, int]:
    """Weights that multiply activations: decoder layers (q, k, v, o, gate, up, down), the lm_head (V x D,
    counted even when tied), each vision block (qkv, proj, gate, up, down), the patch embedding and the
    merger. Embedding lookups, biases and norms are not matmuls and are left out."""
    t, v = config.text, config.vision
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    dm = v.hidden_size * v.spatial_merge_size**2
    return {
        "decoder": t.num_hidden_layers * t.hidden_size * (2 * q + 2 * kv + 3 * t.intermediate_size),
        "lm_head": t.hidden_size * t.vocab_size,
        "vision_block": 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size,
        "patch_embed": v.patch_dim * v.hidden_size,
        "merger": dm * dm + dm * v.out_hidden_size,
    }


def forward_flops(config: Qwen25VLConfig, rows: int, seq: int, grid, images_per_row: int = 1) -> float:
    """Model FLOPs of one forward pass (2 per multiply-add), counting only useful work:
    - decoder: 2 x (decoder + lm_head) matmul params x rows x seq (placeholder tokens included);
    - decoder attention, causal: QK^T and PV over the lower triangle, 2 x seq^2 x (heads x head_dim) per
      layer and row (4 x seq^2 x d halved);
    - vision, per image of P patches: 2 x (depth x block + patch_embed) x P + 2 x merger x P / merge^2;
    - vision attention, non-causal: 4 x d_v x sum of window_len^2 over each window of each windowed block,
      and 4 x d_v x P^2 in each full-attention block.
    A kernel that computes masked-out blocks (a dense mask over all patches, say) does more than this."""
    t, v = config.text, config.vision
    m = matmul_params(config)
    tokens = rows * seq
    decoder = 2 * (m["decoder"] + m["lm_head"]) * tokens
    decoder += t.num_hidden_layers * rows * 2 * seq**2 * t.num_attention_heads * t.head_dim
    _, h, w = grid
    patches = h * w
    vision = 2 * (v.depth * m["vision_block"] + m["patch_embed"]) * patches
    vision += 2 * m["merger"] * patches // v.spatial_merge_size**2
    unit = v.spatial_merge_size
    win = v.window_size // (v.patch_size * unit)  # window side in merged units; HF pads the last window
    win_h = [min(win, h // unit - k) for k in range(0, h // unit, win)]
    win_w = [min(win, w // unit - k) for k in range(0, w // unit, win)]
    window_sq = sum((a * b * unit**2) ** 2 for a in win_h for b in win_w)
    full = len(v.fullatt_block_indexes)
    vision += 4 * v.hidden_size * ((v.depth - full) * window_sq + full * patches**2)
    return float(decoder + vision * rows * images_per_row)


def decode_bytes(config: Qwen25VLConfig, rows: int, cache_len: float, itemsize: int = 2) -> dict[str, float]:
    """HBM bytes one decode step must read: the decoder's parameters (layers, final norm, and the V x D
    lm_head, which is the embedding when tied; the embedding lookup itself reads only `rows` rows) and the
    KV cache at `cache_len` tokens (2 x layers x kv_heads x head_dim x len x rows x itemsize)."""
    t = config.text
    shapes = param_shapes(config)
    decoder = sum(
        math.prod(s) for p, s in shapes.items() if p.startswith("text/layers/") or p == "text/norm/scale"
    )
    params = (decoder + t.vocab_size * t.hidden_size) * itemsize
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * cache_len * rows * itemsize
    return {"param_bytes": float(params), "kv_bytes": float(kv)}


# ------------------------------------------------------------------------------------------ workers


def classify_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if (
        type(exc).__name__ == "OutOfMemoryError"
        or "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
    ):
        return "OOM"
    return "error: " + " ".join(text.split())[:300]


def worker_main(job_path: str, handlers: dict) -> None:
    """Run one job in this (fresh) process; always leave a result file, OOM and errors included."""
    job = json.loads(Path(job_path).read_text())
    start = time.perf_counter()
    try:
        result = handlers[job["side"]](job)
        result["status"] = "ok"
    except Exception as exc:  # the parent reports it and goes on with the next measurement
        traceback.print_exc()
        result = {"status": classify_error(exc)}
    result["worker_s"] = round(time.perf_counter() - start, 2)
    tmp = Path(job["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(job["result"])


def run_job(script: str, job: dict, args) -> dict:
    """One worker process for `job`; its stdout and stderr go to our stderr (our stdout is the report)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["JAX_PLATFORMS"] = "cuda" if args.device == "cuda" else "cpu"
    if args.device == "cuda":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.jax_mem_fraction))
    if args.jax_cache_dir:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", args.jax_cache_dir)
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        job = dict(job, device=args.device, preset=args.preset, seed=args.seed, result=f"{tmp}/result.json")
        Path(f"{tmp}/job.json").write_text(json.dumps(job))
        print(f"--- {Path(script).name}: {json.dumps({k: v for k, v in job.items() if k != 'result'})}",
              file=sys.stderr, flush=True)  # fmt: skip
        try:
            proc = subprocess.run([sys.executable, script, "--worker", f"{tmp}/job.json"], env=env,
                                  stdout=sys.stderr, timeout=args.job_timeout, check=False)  # fmt: skip
            status = None if proc.returncode == 0 else f"crashed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout ({args.job_timeout:.0f} s)"
        result_path = Path(job["result"])
        if result_path.exists():  # measured; a non-zero exit after that (teardown) is only noted
            result = json.loads(result_path.read_text())
            if status:
                result["exit"] = status
        else:
            result = {"status": status or "no result file"}
    return {**{k: v for k, v in job.items() if k not in ("result", "device", "seed")}, **result}


# ------------------------------------------------------------------------------------------- output


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


class Report:
    """Prints each record as a JSON line and a markdown row as soon as it exists, and the whole table at
    the end (a run cut short still leaves every finished row)."""

    def __init__(self, bench: str, columns: list[tuple[str, str, str]], jsonl: str | None):
        self.bench, self.columns, self.jsonl, self.rows = bench, columns, jsonl, []
        print(self.header(), flush=True)

    def header(self) -> str:
        names = [title for _, title, _ in self.columns]
        return "| " + " | ".join(names) + " |\n|" + "---|" * len(names)

    def row(self, record: dict) -> str:
        return "| " + " | ".join(fmt(record.get(key), spec) for key, _, spec in self.columns) + " |"

    def emit(self, record: dict, table: bool = True) -> None:
        record = {"bench": self.bench, **record}
        line = json.dumps(record, allow_nan=True)
        print(line, flush=True)
        if self.jsonl:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        if table:
            self.rows.append(self.row(record))
            print(self.rows[-1], flush=True)

    def close(self) -> None:
        print("\n" + self.header() + "\n" + "\n".join(self.rows), flush=True)
