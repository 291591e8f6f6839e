"""SFT train step of Qwen2.5-VL, ours (`qwenvl_jax.train.step`, jitted) vs transformers (Trainer's step).

Both sides: the same random weights and the same batch (see bench/common.py), full fine-tuning with AdamW
(lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay, global-norm clip 1.0), bf16 compute, master weights
and optimizer state in `--param-dtype` (float32 by default), one square image per row (448x448: 1024
patches, 256 tokens) and labels on the text after it.
- ours: `init_train_state` + `make_train_step("sft")` (one micro-batch), `--backend` attention,
  `--remat` policy; the loss never materialises full logits.
- hf: `Qwen2_5_VLForConditionalGeneration` (sdpa) with `torch.autocast(bfloat16)` over fp32 weights (what
  `Trainer(bf16=True)` does), loss from `model(..., labels=...)`, `clip_grad_norm_`, `AdamW(fused=True)`
  on CUDA; `gradient_checkpointing_enable()` when `--remat` is not none (HF has one policy).

Reported per (side, shape): median step time over `--steps` steps after `--warmup` steps (each step
synchronised: `jax.block_until_ready` / `torch.cuda.synchronize`), tokens/s (real tokens: rows x seq),
MFU = `common.forward_flops` x 3 (backward = 2 forwards; recomputation under remat is not counted) /
step time / `--peak-flops`, peak device memory (JAX `peak_bytes_in_use`, torch `max_memory_allocated`),
and the loss of the first step, which must agree between the sides (same weights, same data): the
"parity" line. The batch stays on the device; data loading is not timed.

    python bench/bench_train.py                                   # 3B, 4x1024 and 8x2048, both sides
    python bench/bench_train.py --param-dtype bfloat16 --remat full --shapes 8x2048
    python bench/bench_train.py --preset tiny --device cpu        # seconds, for tests
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DEFAULTS = {"tiny": {"shapes": "2x64", "steps": 2, "warmup": 1}}
DEFAULT = {"shapes": "4x1024,8x2048", "steps": 8, "warmup": 2}


def _setup(job):
    config = common.model_config(job["preset"], dtype=job["dtype"], param_dtype=job["param_dtype"],
                                 attention_backend=job["backend"] if job["side"] == "ours" else "xla",
                                 remat=job["remat"])  # fmt: skip
    batch = common.make_batch(
        config, job["rows"], job["seq"], job["image_px"], seed=job["seed"], labels=True, left=False
    )
    return config, batch


def ours(job) -> dict:
    import jax
    import numpy as np

    from qwenvl_jax import losses
    from qwenvl_jax.train.optim import OptimConfig
    from qwenvl_jax.train.state import init_train_state
    from qwenvl_jax.train.step import make_train_step, stack_micro_batches

    config, batch = _setup(job)
    start = time.perf_counter()
    model = common.build_ours_model(config, job["device"], job["seed"])
    kind = common.check_jax_backend(job["device"])
    optim = OptimConfig(learning_rate=1e-5, schedule="constant", weight_decay=0.0, max_grad_norm=1.0)
    graphdef, state, frozen, tx = init_train_state(model, optim)
    del model
    step = make_train_step("sft", graphdef, tx)
    inputs = jax.device_put(stack_micro_batches([{**common.core_inputs(batch), "labels": batch["labels"]}]))
    num_items = np.float32(losses.sft_num_items_in_batch([batch["labels"]]))
    setup_s = time.perf_counter() - start
    times, out = [], {}
    for i in range(job["warmup"] + job["steps"]):
        start = time.perf_counter()
        state, metrics = step(state, frozen, inputs, num_items)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        if i == 0:
            out["first_loss"] = float(metrics["loss"])
    metrics = jax.device_get(metrics)
    if int(metrics["skipped"]):
        raise RuntimeError(f"the last step was skipped (loss {float(metrics['loss'])}: not finite)")
    return {**out, "last_loss": float(metrics["loss"]), "step_s": common.median(times[job["warmup"] :]),
            "first_step_s": times[0], "setup_s": setup_s, "peak_bytes": common.jax_peak_bytes(),
            "device_name": kind}  # fmt: skip


def hf(job) -> dict:
    import torch

    config, batch = _setup(job)
    device = job["device"]
    start = time.perf_counter()
    model = common.build_hf_model(config, device, job["param_dtype"], job["seed"])
    if job["remat"] != "none":
        model.gradient_checkpointing_enable()
    model.train()
    fused = device == "cuda"  # the fused kernel is what Trainer picks on CUDA ("adamw_torch_fused")
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused
    )
    inputs = common.torch_inputs(batch, device, getattr(torch, job["param_dtype"]), labels=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=job["dtype"] == "bfloat16")
    setup_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, out = [], {}
    for i in range(job["warmup"] + job["steps"]):
        start = time.perf_counter()
        with autocast:
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if i == 0:
            out["first_loss"] = loss.item()
    return {**out, "last_loss": loss.item(), "step_s": common.median(times[job["warmup"] :]),
            "first_step_s": times[0], "setup_s": setup_s, "peak_bytes": common.torch_peak_bytes(device),
            "device_name": common.device_name(device)}  # fmt: skip


COLUMNS = [
    ("side", "side", ""), ("backend", "attention", ""), ("shape", "rows x seq", ""), ("remat", "remat", ""),
    ("param_dtype", "params", ""), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tokens/s", ".0f"),
    ("mfu", "MFU", ".3f"), ("peak_gib", "peak GiB", ".1f"), ("first_loss", "loss step 1", ".4f"),
    ("status", "status", ""),
]  # fmt: skip


def main(argv=None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--shapes", default=None, help="comma list of ROWSxSEQ (3B default 4x1024,8x2048)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    p.add_argument("--backend", default=None, choices=("cudnn", "xla"), help="ours (default cudnn on cuda)")
    p.add_argument("--peak-flops", type=float, default=common.H100_BF16_DENSE_FLOPS)
    args = p.parse_args(argv)
    if args.worker:
        return common.worker_main(args.worker, {"ours": ours, "hf": hf})
    d = DEFAULTS.get(args.preset, DEFAULT)
    shapes = common.shapes(args.shapes or d["shapes"])
    backend = args.backend or ("cudnn" if args.device == "cuda" else "xla")
    config = common.model_config(args.preset)
    px = common.image_px(args)
    report = common.Report("train", COLUMNS, args.jsonl)
    for rows, seq in shapes:
        flops = 3 * common.forward_flops(config, rows, seq, common.image_grid(config, px))
        losses = {}
        for side in common.sides(args):
            job = {"side": side, "rows": rows, "seq": seq, "image_px": px, "remat": args.remat,
                   "param_dtype": args.param_dtype, "dtype": args.dtype,
                   "steps": args.steps or d["steps"], "warmup": args.warmup or d["warmup"],
                   "backend": backend if side == "ours" else "sdpa"}  # fmt: skip
            r = common.run_job(__file__, job, args)
            r.update(shape=f"{rows}x{seq}", model_flops=flops)
            if r["status"] == "ok":
                r.update(step_ms=1e3 * r["step_s"], tokens_per_s=rows * seq / r["step_s"],
                         mfu=flops / r["step_s"] / args.peak_flops,
                         peak_gib=None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30)  # fmt: skip
                losses[side] = r["first_loss"]
            report.emit(r)
        if len(losses) == 2:
            diff = abs(losses["ours"] - losses["hf"])
            report.emit({"kind": "parity", "shape": f"{rows}x{seq}", "loss_ours": losses["ours"],
                         "loss_hf": losses["hf"], "abs_diff": diff}, table=False)  # fmt: skip
    report.close()


if __name__ == "__main__":
    main()
