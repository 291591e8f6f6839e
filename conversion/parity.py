"""PyTorch parity harness: the transformers model and ours on the same inputs, compared as spec 6 says.

    qwenvl-jax parity --hf DIR [--dtype float32 --dtype bfloat16] [--device cpu|cuda]

Both models read the same arrays (our processor's output, itself HF-equal), so the comparison isolates
the model. Only positions with attention_mask == 1 are compared.

- float32: both sides at full precision (JAX "highest" matmul precision, torch TF32 off, cuDNN conv
  TF32 off, eager attention); gate: max |diff| on logits, spec 6 tolerance.
- bfloat16: not bit-exact across frameworks, so ours is judged against HF's own drift: with HF fp32 as
  the truth, err(ours-bf16) <= 1.5 x err(HF-bf16), top-1 agreement >= 99 %, mean per-token KL <= 1e-3.

This module imports torch and transformers; the runtime package never does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np


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
    """Run both models on the built-in inputs; return {dtype: [Comparison, ...]} and print a table."""
    import jax
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwenvl_jax import load
    from qwenvl_jax.processing import Processor

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the fp32 Conv3d patch embed uses TF32 by default (spec 6)
    jax.config.update("jax_default_matmul_precision", "highest")
    processor = Processor.from_pretrained(hf_dir)
    cases = builtin_inputs(processor)

    def hf_logits(dtype):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            hf_dir, dtype=dtype, attn_implementation="eager"
        )
        model = model.to(device).eval()
        outs = []
        with torch.no_grad():
            for _, batch in cases:
                logits = model(**_torch_inputs(batch, dtype, device)).logits
                outs.append(logits.float().cpu().numpy())
        del model
        return outs

    start = time.perf_counter()
    ref32 = hf_logits(torch.float32)
    results: dict[str, list[Comparison]] = {}
    for dtype in dtypes:
        ours = load(hf_dir, dtype=dtype)
        got = [np.asarray(ours(**batch), np.float32) for _, batch in cases]
        rows = [
            compare(f"ours-{dtype} vs HF-fp32: {name}", r, g, b["attention_mask"])
            for (name, b), r, g in zip(cases, ref32, got, strict=True)
        ]
        if dtype == "bfloat16":
            ref16 = hf_logits(torch.bfloat16)
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


def verdict(results: dict, *, real_model: bool = False) -> list[str]:
    """Spec 6 gates; returns the failures (empty when everything passes).

    float32: tiny models atol 1e-4; real 3B/7B weights rtol 1e-3 + atol 2e-2 with identical argmax.
    bfloat16: mean |diff| <= 1.5 x HF's own bf16 drift and mean KL <= 1e-3 always; top-1 >= 99 % for real
    weights. The absolute top-1 gate is the spec's estimate for real checkpoints: on a tiny random model the
    logits are near-uniform and HF's own bf16 run agrees with its fp32 run on only ~98-99 % of tokens
    (docs/parity.md), so there the relative error gate is the meaningful one and top-1 is reported.
    """
    failures = []
    for r in results.get("float32", []):
        if not real_model and r.max_abs > 1e-4:
            failures.append(f"{r.name}: max |diff| {r.max_abs:.3e} > 1e-4")
        if real_model and (r.max_excess > 2e-2 or r.top1 < 1.0):
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
