"""PyTorch parity harness: the transformers model and ours on the same inputs, compared as spec 6 says.

    qwenvl-jax parity --hf DIR [--dtype float32 --dtype bfloat16] [--device cpu|cuda] [--real]
    qwenvl-jax parity --random 3B [--seed 0] [--processor DIR] [--dtype ...] [--device cuda]

Both models read the same arrays (our processor's output, itself HF-equal), so the comparison isolates
the model. Only positions with attention_mask == 1 are compared. `--random PRESET` needs no checkpoint:
both models get the same random weights (`conversion.random_weights`), drawn on the device, and the
models are built and freed one at a time (HF fp32, ours fp32, HF bf16, ours bf16), so a 7B run holds one
float32 copy (33 GB) at a time.

- float32: both sides at full precision (JAX "highest" matmul precision, torch TF32 off, cuDNN conv
  TF32 off, eager attention); gate: max |diff| on logits, spec 6 tolerance.
- bfloat16: not bit-exact across frameworks, so ours is judged against HF's own drift: with HF fp32 as
  the truth, err(ours-bf16) <= 1.5 x err(HF-bf16), mean per-token KL <= 1e-3, and for real weights top-1
  agreement >= 99 % (`verdict`).

This module imports torch and transformers; the runtime package never does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from qwenvl_jax.config import Qwen25VLConfig  # pure python: no jax


@dataclasses.dataclass
class Comparison:
    name: str
    max_abs: float
    mean_abs: float
    mean_kl: float
    top1: float
    tokens: int
    max_excess: float  # max(|diff| - 1e-3 |ref|): the atol needed on top of rtol 1e-3 (real-model gate)

    def row(self) -> str:
        return (f"{self.name:<58} {self.max_abs:>10.3e} {self.mean_abs:>10.3e} {self.mean_kl:>10.3e} "
                f"{100 * self.top1:>7.2f}% {self.tokens:>7d}")  # fmt: skip


def compare(name: str, ref: np.ndarray, got: np.ndarray, mask: np.ndarray) -> Comparison:
    """Metrics over valid tokens; KL(ref || got) from float64 log-softmax."""
    ref = np.asarray(ref, np.float64)[mask.astype(bool)]
    got = np.asarray(got, np.float64)[mask.astype(bool)]
    diff = np.abs(ref - got)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top1 = (ref.argmax(-1) == got.argmax(-1)).mean()
    excess = float((diff - 1e-3 * np.abs(ref)).max())
    return Comparison(
        name, float(diff.max()), float(diff.mean()), float(kl.mean()), float(top1), int(ref.shape[0]), excess
    )


TINY_MAX_PIXELS = (
    28 * 28 * 64
)  # the tiny checkpoint's limit (`tiny_hf.save_tiny_model_dir`): both resize branches


def builtin_inputs(processor) -> list[tuple[str, dict]]:
    """Prompts with images (partial and all-padding windows, both resize branches) and a video."""
    rng = np.random.default_rng(0)

    def image(h, w):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
        return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)

    img = {"type": "image"}
    convs = [
        [
            {"role": "user", "content": [dict(img, image=image(150, 200)), {"type": "text", "text": "Describe this."},
                                         dict(img, image=image(224, 112)), {"type": "text", "text": "And compare."}]},
            {"role": "assistant", "content": "Both are gradients with noise."},
            {"role": "user", "content": "Which is taller?"},
        ],
        [{"role": "user", "content": [dict(img, image=image(300, 500)), {"type": "text", "text": "What is it?"}]}],
    ]  # fmt: skip
    batch = processor.encode_chat(convs, add_generation_prompt=True, padding_side="left")
    frames = [image(112, 168) for _ in range(8)]
    video = [{"role": "user", "content": [{"type": "video", "video": frames, "sample_fps": 4.0, "min_pixels": 3136},
                                          {"type": "text", "text": "What happens in the clip?"}]}]  # fmt: skip
    vbatch = processor.encode_chat([video], add_generation_prompt=True)
    return [("2 prompts, 3 images, left-padded", batch), ("1 video, fractional seconds/grid", vbatch)]


def _torch_inputs(batch: dict, dtype, device):
    import torch

    out = {}
    for key, value in batch.items():
        t = torch.as_tensor(np.asarray(value)).to(device)
        if key in ("pixel_values", "pixel_values_videos"):
            t = t.to(dtype)
        out[key] = t
    return out


def run(
    hf_dir: str | Path, *, dtypes=("float32", "bfloat16"), device: str = "cpu", verbose: bool = True
) -> dict:
    """Run both models of an HF checkpoint dir on the built-in inputs; return {dtype: [Comparison, ...]}."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwenvl_jax import load
    from qwenvl_jax.processing import Processor

    def hf_model(dtype: str):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager"
        )
        return model.to(device)

    _check_shared_device(device)
    cases = builtin_inputs(Processor.from_pretrained(hf_dir))
    return _run(cases, hf_model, lambda dtype: load(hf_dir, dtype=dtype), dtypes, device, verbose)


def run_random(
    preset: str | Qwen25VLConfig,
    *,
    seed: int = 0,
    processor_dir: str | Path | None = None,
    dtypes=("float32", "bfloat16"),
    device: str = "cpu",
    verbose: bool = True,
) -> dict:
    """`run` without a checkpoint: both models of `Qwen25VLConfig.preset(preset)` (or of `preset` itself,
    a config) with the random weights of `conversion.random_weights` (seed `seed`), drawn on `device` and
    shared with JAX there (DLPack).

    Inputs: the built-in prompts, from `processor_dir` when given (its special token ids must be the
    preset's), otherwise from the tiny tokenizer with its added-token ids moved to the preset's
    (`builtin_inputs_for`).
    """
    from conversion.random_weights import build_hf_model, build_ours_model

    config = preset if isinstance(preset, Qwen25VLConfig) else Qwen25VLConfig.preset(preset)
    _check_shared_device(device)
    if device.startswith("cuda"):
        import jax

        if jax.default_backend() != "gpu":
            raise RuntimeError(
                f"device {device!r}: JAX runs on {jax.default_backend()!r}, but the weights are shared "
                "with JAX on the GPU (DLPack): install JAX's CUDA backend or check JAX_PLATFORMS"
            )

    def hf_model(dtype: str):
        return build_hf_model(config, device, dtype, seed, attn_implementation="eager")

    def our_model(dtype: str):
        return build_ours_model(config.replace(dtype=dtype, param_dtype=dtype), device, seed, on_device=True)

    cases = builtin_inputs_for(config, processor_dir)
    if verbose:
        ids = (
            f"processor {processor_dir}"
            if processor_dir
            else "tiny-tokenizer ids, added tokens moved to the preset's"
        )
        name = preset if isinstance(preset, str) else "custom config"
        print(f"random weights: {name}, seed {seed}; built-in prompts, {ids}", flush=True)
    return _run(cases, hf_model, our_model, dtypes, device, verbose)


def builtin_inputs_for(
    config: Qwen25VLConfig, processor_dir: str | Path | None = None
) -> list[tuple[str, dict]]:
    """`builtin_inputs` with the token ids of `config`.

    With `processor_dir`: that processor, refused unless its image, video and vision start/end ids are
    the config's. Without: the tiny tokenizer's processor (`qwenvl_jax.tiny`, the tiny checkpoint's pixel
    limits), and every id of its 22 added tokens (320..341, Qwen order) moved by the same offset as the
    config's `<|endoftext|>` (151643 for 3B/7B); ordinary ids 0..319 are kept. With random weights only
    the special ids carry meaning (placeholders, M-RoPE positions, padding); the ordinary ids spell other
    text in the real vocabulary, which changes nothing the comparison measures.
    """
    from qwenvl_jax.processing import Processor
    from qwenvl_jax.processing.errors import InputError

    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    if processor_dir is not None:
        processor = Processor.from_pretrained(processor_dir)
        wrong = {n: (getattr(processor, n), getattr(config, n)) for n in names
                 if getattr(processor, n) != getattr(config, n)}  # fmt: skip
        if wrong:
            raise InputError(f"{processor_dir}: special token ids (processor, model) {wrong} differ")
        return builtin_inputs(processor)
    import tempfile

    from qwenvl_jax.tiny import write_tiny_checkpoint

    tiny = Qwen25VLConfig.preset("tiny")
    offset = config.bos_token_id - tiny.bos_token_id
    moved = {n: getattr(tiny, n) + offset for n in (*names, "vision_token_id")}
    # config.json's own stop id (the first); generation_config.json may add others, e.g. <|endoftext|>.
    moved["eos_token_id"] = tiny.eos_token_id[0] + offset
    actual = {n: getattr(config, n) for n in moved} | {"eos_token_id": config.eos_token_id[0]}
    wrong = {n: (v, actual[n]) for n, v in moved.items() if v != actual[n]}
    if wrong or moved["video_token_id"] >= config.text.vocab_size:
        raise ValueError(
            f"the model's special token ids are not Qwen2.5's layout ({wrong or 'vocabulary too small'}): "
            "pass a processor directory with its vocabulary"
        )
    with tempfile.TemporaryDirectory() as tmp:
        cases = builtin_inputs(
            Processor.from_pretrained(write_tiny_checkpoint(tmp, max_pixels=TINY_MAX_PIXELS))
        )
    for _, batch in cases:
        ids = batch["input_ids"]
        batch["input_ids"] = np.where(ids >= tiny.bos_token_id, ids + offset, ids).astype(ids.dtype)
    return cases


def _check_shared_device(device: str) -> None:
    """torch and JAX share the GPU: JAX must not take 75 % of it up front (its default preallocation)."""
    import os

    if device.startswith("cuda") and not (
        os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() == "false"
        or os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform"
    ):
        raise RuntimeError(
            "torch and JAX share the GPU: set XLA_PYTHON_CLIENT_PREALLOCATE=false before JAX starts "
            "(qwenvl-jax parity sets it; from Python, set it in the environment)"
        )


def _free_torch(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _run(cases, hf_model, our_model, dtypes, device: str, verbose: bool) -> dict:
    """HF fp32, ours fp32, HF bf16, ours bf16, in that order, each model freed before the next is built
    (a 7B model is 33 GB in float32: two at once do not fit beside the activations on an 80 GB GPU)."""
    import jax
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the fp32 Conv3d patch embed uses TF32 by default (spec 6)
    jax.config.update("jax_default_matmul_precision", "highest")

    cuda = device.startswith("cuda")

    def phase(label: str, fn):
        """Run one model; print its time and, on a GPU, the peak memory of each allocator."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        begin = time.perf_counter()
        out = fn()
        if verbose:
            mem = ""
            if cuda:
                stats = jax.devices()[0].memory_stats() or {}
                mem = (f", torch peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, JAX peak since "
                       f"start {stats.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB")  # fmt: skip
            print(f"  {label}: {time.perf_counter() - begin:.1f} s{mem}", flush=True)
        return out

    def hf_logits(dtype: str) -> list[np.ndarray]:
        model = hf_model(dtype).eval()
        with torch.no_grad():
            outs = [model(**_torch_inputs(b, getattr(torch, dtype), device)).logits.float().cpu().numpy()
                    for _, b in cases]  # fmt: skip
        del model
        _free_torch(device)
        return outs

    def our_logits(dtype: str) -> list[np.ndarray]:
        model = our_model(dtype)
        outs = [np.asarray(model(**batch), np.float32) for _, batch in cases]
        del model
        jax.clear_caches()  # compiled forwards of this dtype
        _free_torch(device)  # weights shared through DLPack return to torch's cache, then to the driver
        return outs

    if verbose:
        import transformers

        where = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"reference: transformers {transformers.__version__}, torch {torch.__version__} on {where}, "
              f"eager attention; ours: jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)  # fmt: skip
    start = time.perf_counter()
    ref32 = phase("HF float32", lambda: hf_logits("float32"))
    results: dict[str, list[Comparison]] = {}
    for dtype in dtypes:
        ref16 = phase("HF bfloat16", lambda: hf_logits("bfloat16")) if dtype == "bfloat16" else None
        got = phase(f"ours {dtype}", lambda dtype=dtype: our_logits(dtype))
        rows = [
            compare(f"ours-{dtype} vs HF-fp32: {name}", r, g, b["attention_mask"])
            for (name, b), r, g in zip(cases, ref32, got, strict=True)
        ]
        if ref16 is not None:
            rows += [
                compare(f"HF-bf16 vs HF-fp32: {name}", r, h, b["attention_mask"])
                for (name, b), r, h in zip(cases, ref32, ref16, strict=True)
            ]
        results[dtype] = rows
    if verbose:
        print(
            f"{'comparison (valid tokens)':<58} {'max|diff|':>10} {'mean|diff|':>10} {'mean KL':>10} {'top-1':>8} {'tokens':>7}"
        )
        for rows in results.values():
            for r in rows:
                print(r.row())
        print(f"({time.perf_counter() - start:.1f} s)")
    return results


def verdict(results: dict, *, real_model: bool = False, full_size: bool = False) -> list[str]:
    """Spec 6 gates; returns the failures (empty when everything passes).

    float32: tiny models atol 1e-4; 3B/7B (`real_model`, or `full_size` for random full-size weights)
    rtol 1e-3 + atol 2e-2 with identical argmax: the tolerance is set by depth, width and float32
    summation order, not by where the weights came from.
    bfloat16: mean |diff| <= 1.5 x HF's own bf16 drift and mean KL <= 1e-3 always; top-1 >= 99 % for real
    weights only. The absolute top-1 gate is the spec's estimate for real checkpoints: with random weights
    the logits are near-uniform (tiny, and full width alike: std ~1 over 152k tokens, top-1 probability
    ~3e-4) and HF's own bf16 run agrees with its fp32 run on only ~94-99 % of tokens (docs/parity.md), so
    there the relative error gate is the meaningful one and top-1 is reported.
    """
    failures = []
    for r in results.get("float32", []):
        if not (real_model or full_size) and r.max_abs > 1e-4:
            failures.append(f"{r.name}: max |diff| {r.max_abs:.3e} > 1e-4")
        if (real_model or full_size) and (r.max_excess > 2e-2 or r.top1 < 1.0):
            failures.append(
                f"{r.name}: |diff| exceeds rtol 1e-3 by {r.max_excess:.3e} (atol 2e-2), top-1 {r.top1:.4f}"
            )
    rows = results.get("bfloat16", [])
    ours = [r for r in rows if r.name.startswith("ours")]
    hf = [r for r in rows if r.name.startswith("HF")]
    for o, h in zip(ours, hf, strict=True):
        if o.mean_abs > 1.5 * h.mean_abs:
            failures.append(
                f"{o.name}: mean |diff| {o.mean_abs:.3e} > 1.5 x HF's own bf16 drift {h.mean_abs:.3e}"
            )
        if o.mean_kl > 1e-3:
            failures.append(f"{o.name}: mean KL {o.mean_kl:.3e} > 1e-3")
        if real_model and o.top1 < 0.99:
            failures.append(f"{o.name}: top-1 agreement {100 * o.top1:.2f}% < 99%")
    return failures
