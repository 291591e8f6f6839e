"""Sampled generation of Qwen2.5-VL in bf16, ours vs transformers: decode tokens/s and the HBM roofline.

Each prompt is `--prompt` tokens with one square image (448x448: 256 of them are image tokens); both sides
get the same random bf16 weights and prompts (see bench/common.py), temperature 1 (no top-k, no top-p), and
exactly `--new` tokens per row (EOS cannot end a row early).
- ours: `qwenvl_jax.generate(..., stop_token_ids=())` (no stop token); its `prefill_s` and `decode_s`
  timings are taken after a first call of the same shapes (compilation);
- hf: `generate(do_sample=True, temperature=1, top_k=0, top_p=1, max_new_tokens=N, min_new_tokens=N)`
  (sdpa, bf16, the default dynamic cache); prefill is separated by timing the same call with N = 1:
  decode time = time(N) - time(1).

Both decode times cover N - 1 forward passes (the first token comes from the prefill logits), so
decode step = decode time / (N - 1) and decode tokens/s = rows x (N - 1) / decode time.

Roofline: a decode step must read the decoder's parameters and the KV cache (`common.decode_bytes`, at
the mean cache length prompt + N/2); divided by the HBM bandwidth measured first (a jitted elementwise
pass over `--bw-bytes`, bytes read + written / time) that gives the roofline step time, and "achieved" =
roofline step / measured step. Our engine attends over its whole preallocated cache (prompt bucket + N,
rounded up to 128 slots) every step, so it reads more than this minimum.

    python bench/bench_generate.py                      # 3B, batch 16 and 64, 512 + 256 tokens
    python bench/bench_generate.py --preset tiny --device cpu
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DEFAULTS = {"tiny": {"batches": "2", "prompt": 64, "new": 8, "repeats": 1, "bw_bytes": 2**26}}
DEFAULT = {"batches": "16,64", "prompt": 512, "new": 256, "repeats": 2, "bw_bytes": 2**32}


def _setup(job):
    backend = job["backend"] if job["side"] == "ours" else "xla"
    config = common.model_config(
        job["preset"], dtype="bfloat16", param_dtype="bfloat16", attention_backend=backend
    )
    batch = common.make_batch(
        config, job["rows"], job["prompt"], job["image_px"], seed=job["seed"], labels=False, left=True
    )
    return config, batch


def bandwidth(job) -> dict:
    kind = common.check_jax_backend(job["device"])
    return {"bandwidth_Bps": common.jax_copy_bandwidth(job["bw_bytes"]), "device_name": kind}


def ours(job) -> dict:
    from qwenvl_jax.generation import generate

    config, batch = _setup(job)
    start = time.perf_counter()
    model = common.build_ours_model(config, job["device"], job["seed"])
    kind = common.check_jax_backend(job["device"])
    setup_s = time.perf_counter() - start
    runs = []
    for i in range(1 + job["repeats"]):  # the first call compiles
        out = generate(model, batch, max_new_tokens=job["new"], temperature=1.0, stop_token_ids=(), seed=i)
        if not (out.lengths == job["new"]).all():
            raise RuntimeError(f"rows stopped early: lengths {sorted(set(out.lengths.tolist()))}")
        runs.append(out)
    timed = runs[1:]
    return {"prefill_s": common.median(r.prefill_s for r in timed), "decode_s": common.median(r.decode_s for r in timed),
            "first_call_s": runs[0].prefill_s + runs[0].decode_s, "setup_s": setup_s, "cache_len": out.cache_len,
            "peak_bytes": common.jax_peak_bytes(), "device_name": kind}  # fmt: skip


def hf(job) -> dict:
    import torch

    config, batch = _setup(job)
    device = job["device"]
    start = time.perf_counter()
    model = common.build_hf_model(config, device, "bfloat16", job["seed"]).eval()
    inputs = common.torch_inputs(batch, device, torch.bfloat16)
    setup_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run(new: int, seed: int) -> float:
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                             min_new_tokens=new, eos_token_id=config.eos_token_id,
                             pad_token_id=config.bos_token_id)  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        if out.shape[1] != job["prompt"] + new:
            raise RuntimeError(f"generate returned {out.shape[1] - job['prompt']} new tokens, not {new}")
        return time.perf_counter() - start

    first = run(job["new"], 0) + run(1, 0)  # warm-up: allocator, kernels, cuBLAS plans
    full, one = [], []
    for i in range(job["repeats"]):
        full.append(run(job["new"], 1 + i))
        one.append(run(1, 1 + i))
    prefill_s = common.median(one)
    return {"prefill_s": prefill_s, "decode_s": common.median(full) - prefill_s, "first_call_s": first,
            "setup_s": setup_s, "peak_bytes": common.torch_peak_bytes(device),
            "device_name": common.device_name(device)}  # fmt: skip


COLUMNS = [
    ("side", "side", ""), ("backend", "attention", ""), ("rows", "batch", ""), ("tokens", "prompt + new", ""),
    ("prefill_ms", "prefill ms", ".1f"), ("step_ms", "decode ms/step", ".2f"),
    ("decode_tokens_per_s", "decode tokens/s", ".0f"), ("roofline_step_ms", "roofline ms/step", ".2f"),
    ("achieved", "achieved", ".2f"), ("peak_gib", "peak GiB", ".1f"), ("status", "status", ""),
]  # fmt: skip


def main(argv=None) -> None:
    p = common.base_parser(__doc__)
    p.add_argument("--batches", default=None, help="comma list of batch sizes (3B default 16,64)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens, image included (3B default 512)")
    p.add_argument("--new", type=int, default=None, help="new tokens per row (3B default 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (median)")
    p.add_argument("--backends", default=None, help="ours: comma list of cudnn, xla (cuda default cudnn)")
    p.add_argument("--bw-bytes", type=int, default=None, help="bytes of the bandwidth measurement")
    args = p.parse_args(argv)
    if args.worker:
        return common.worker_main(args.worker, {"ours": ours, "hf": hf, "bandwidth": bandwidth})
    d = DEFAULTS.get(args.preset, DEFAULT)
    prompt, new = args.prompt or d["prompt"], args.new or d["new"]
    if new < 2:
        raise SystemExit("--new must be >= 2: decode time covers new - 1 steps")
    backends = common.csv(args.backends or ("cudnn" if args.device == "cuda" else "xla"))
    config = common.model_config(args.preset)
    report = common.Report("generate", COLUMNS, args.jsonl)
    bw = common.run_job(__file__, {"side": "bandwidth", "bw_bytes": args.bw_bytes or d["bw_bytes"]}, args)
    report.emit({"kind": "bandwidth", **bw}, table=False)
    bandwidth_Bps = bw.get("bandwidth_Bps")
    sides = common.sides(args)
    for rows in common.csv(args.batches or d["batches"], int):
        jobs = [("ours", b) for b in backends] if "ours" in sides else []
        jobs += [("hf", "sdpa")] if "hf" in sides else []
        for side, backend in jobs:
            job = {"side": side, "backend": backend, "rows": rows, "prompt": prompt, "new": new,
                   "image_px": common.image_px(args), "repeats": args.repeats or d["repeats"]}  # fmt: skip
            r = common.run_job(__file__, job, args)
            r["tokens"] = f"{prompt} + {new}"
            if r["status"] == "ok":
                step_s = r["decode_s"] / (new - 1)
                r.update(prefill_ms=1e3 * r["prefill_s"], step_ms=1e3 * step_s,
                         decode_tokens_per_s=rows * (new - 1) / r["decode_s"],
                         peak_gib=None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30)  # fmt: skip
                if bandwidth_Bps:
                    need = common.decode_bytes(config, rows, prompt + new / 2)
                    roofline_s = (need["param_bytes"] + need["kv_bytes"]) / bandwidth_Bps
                    r.update(need, bandwidth_Bps=bandwidth_Bps, roofline_step_ms=1e3 * roofline_s,
                             achieved=roofline_s / step_s)  # fmt: skip
            report.emit(r)
    report.close()
    if bandwidth_Bps:
        print(f"\nHBM bandwidth (read + written): {bandwidth_Bps / 1e12:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
