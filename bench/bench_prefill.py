"""Prefill (the prompt's forward pass) of Qwen2.5-VL in bf16, ours vs transformers, tokens per second.

Each row of the batch is one square image (448x448: 1024 patches, 256 tokens) plus text, `--seq` tokens in
all; both sides get the same random bf16 weights and the same inputs (see bench/common.py).
- ours: `Qwen25VL.prefill` jitted (vision tower, decoder, last-position logits, and every layer's keys and
  values, as generation needs), for each of `--backends` (cudnn, xla);
- hf: `Qwen2_5_VLForConditionalGeneration` (sdpa, bf16) under `torch.inference_mode()`, called as
  `generate` calls it for the prompt: `use_cache=True, logits_to_keep=1`.

Reported: median time of `--iters` calls after `--warmup` (synchronised), tokens/s = rows x seq / time,
peak device memory, and, as a sanity check, the max |difference| of the last-position logits against
HF's (random weights in bf16: expect differences of bf16 size, not zero).

    python bench/bench_prefill.py                       # 3B, batch 1, 4, 8 x 2048 tokens
    python bench/bench_prefill.py --preset tiny --device cpu
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DEFAULTS = {"tiny": {"batches": "1,2", "seq": 64, "iters": 2, "warmup": 1}}
DEFAULT = {"batches": "1,4,8", "seq": 2048, "iters": 5, "warmup": 2}


def _setup(job):
    backend = job["backend"] if job["side"] == "ours" else "xla"
    config = common.model_config(
        job["preset"], dtype="bfloat16", param_dtype="bfloat16", attention_backend=backend
    )
    batch = common.make_batch(
        config, job["rows"], job["seq"], job["image_px"], seed=job["seed"], labels=False, left=True
    )
    return config, batch


def _timed(fn, warmup: int, iters: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(warmup + iters):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def ours(job) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    config, batch = _setup(job)
    start = time.perf_counter()
    model = common.build_ours_model(config, job["device"], job["seed"])
    kind = common.check_jax_backend(job["device"])
    graphdef, params = nnx.split(model)
    prefill = jax.jit(lambda p, x: nnx.merge(graphdef, p).prefill(**x))
    inputs = jax.device_put(common.core_inputs(batch))
    setup_s = time.perf_counter() - start
    times, out = _timed(lambda: jax.block_until_ready(prefill(params, inputs)), job["warmup"], job["iters"])
    np.save(job["logits"], np.asarray(out[0], np.float32))
    return {"time_s": common.median(times[job["warmup"] :]), "first_call_s": times[0], "setup_s": setup_s,
            "peak_bytes": common.jax_peak_bytes(), "device_name": kind}  # fmt: skip


def hf(job) -> dict:
    import numpy as np
    import torch

    config, batch = _setup(job)
    device = job["device"]
    start = time.perf_counter()
    model = common.build_hf_model(config, device, "bfloat16", job["seed"]).eval()
    inputs = common.torch_inputs(batch, device, torch.bfloat16)
    setup_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def call():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        times, out = _timed(call, job["warmup"], job["iters"])
        np.save(job["logits"], out.logits[:, -1].float().cpu().numpy())
    return {"time_s": common.median(times[job["warmup"] :]), "first_call_s": times[0], "setup_s": setup_s,
            "peak_bytes": common.torch_peak_bytes(device), "device_name": common.device_name(device)}  # fmt: skip


COLUMNS = [
    ("side", "side", ""), ("backend", "attention", ""), ("rows", "batch", ""), ("seq", "tokens/row", ""),
    ("time_ms", "prefill ms", ".1f"), ("tokens_per_s", "tokens/s", ".0f"), ("peak_gib", "peak GiB", ".1f"),
    ("logits_max_abs_diff", "max abs logit diff vs HF", ".3g"), ("status", "status", ""),
]  # fmt: skip


def main(argv=None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--batches", default=None, help="comma list of batch sizes (3B default 1,4,8)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row, image included (3B default 2048)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--backends", default=None, help="ours: comma list of cudnn, xla (cuda default both)")
    args = p.parse_args(argv)
    if args.worker:
        return common.worker_main(args.worker, {"ours": ours, "hf": hf})
    import numpy as np

    d = DEFAULTS.get(args.preset, DEFAULT)
    backends = common.csv(args.backends or ("cudnn,xla" if args.device == "cuda" else "xla"))
    seq, px = args.seq or d["seq"], common.image_px(args)
    report = common.Report("prefill", COLUMNS, args.jsonl)
    sides = common.sides(args)
    with tempfile.TemporaryDirectory(prefix="bench_prefill_") as tmp:
        for rows in common.csv(args.batches or d["batches"], int):
            hf_logits = None
            jobs = [("hf", "sdpa")] if "hf" in sides else []  # first, so each ours row can be compared
            jobs += [("ours", b) for b in backends] if "ours" in sides else []
            for side, backend in jobs:
                logits = f"{tmp}/{side}_{backend}_{rows}.npy"
                job = {"side": side, "backend": backend, "rows": rows, "seq": seq, "image_px": px,
                       "iters": args.iters or d["iters"], "warmup": args.warmup or d["warmup"], "logits": logits}  # fmt: skip
                r = common.run_job(__file__, job, args)
                r.pop("logits")
                if r["status"] == "ok":
                    r.update(time_ms=1e3 * r["time_s"], tokens_per_s=rows * seq / r["time_s"],
                             peak_gib=None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30)  # fmt: skip
                    if side == "hf":
                        hf_logits = np.load(logits)
                    elif hf_logits is not None:
                        r["logits_max_abs_diff"] = float(np.max(np.abs(np.load(logits) - hf_logits)))
                report.emit(r)
    report.close()


if __name__ == "__main__":
    main()
