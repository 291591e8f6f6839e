"""What the compiled training programs spend, from XLA's own cost analysis on CPU (no GPU needed).

    python bench/compute_at_scale.py lora [--preset 7B] [--json OUT]
    python bench/compute_at_scale.py decode [--preset 3B] [--batch 64] [--cached 1024] [--json OUT]

`lora`: FLOPs of one SFT step of the real config, LoRA (rank 16 on every text projection, the adapters
applied as `x W + (x A) B`, `train.lora.attach`) against full fine-tuning, at the preset's widths, one row
of 2,048 tokens with one 448x448 image (1,024 patches), bf16 compute, float32 master weights, no remat
(the algorithmic count; `--remat full` adds the recomputed forward to both). Full fine-tuning computes
every weight gradient (forward 2NP, backward 4NP); LoRA computes only the input gradients through the
frozen kernels and the adapters' own (backward ~2NP) and nothing of the frozen vision tower's backward.

`decode`: one decode step (`Qwen25VL.decode_step`: the new token through every layer against the KV
cache, the cache updated, the logits) at the preset's widths, `batch` rows with
`cached` filled slots (the cache holds exactly those), float32 weights and cache by default (XLA:CPU
converts bf16 dot operands to float32, whole stacked arrays at a time, which a GPU does not; the ratio is
the figure): XLA's "bytes accessed" against what a decode step
must read, the weights plus the live cache (the goal: within 1.3x). Layers unrolled (XLA counts a scan
body once).

How (`lora`): XLA counts a `lax.scan` body once, so the step is compiled with the layers unrolled
(`scan_layers=False`) at three small depths, (1, 1), (2, 1) and (1, 2) text layers and vision blocks, and
the cost `c + Lt ft + Lv fv`, exactly linear in the depths because the layers are identical, is
extrapolated to the preset's depths. Each compile takes tens of seconds on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def step_config(trainable: str, *, rows: int, seq: int, patches: int) -> dict:
    """The run config of the analysed step (SFT; shapes only)."""
    config = {
        "kind": "sft", "run_dir": "unused", "trainable": trainable,
        "batch": {"batch_size": rows, "seq_buckets": [seq], "image_patches": patches, "max_images": 1},
        "optim": {"learning_rate": 1e-5},
    }  # fmt: skip
    if trainable == "lora":
        config["lora"] = {"rank": 16, "alpha": 32.0}
    return config


def model_at_depth(preset: str, text_layers: int, vision_blocks: int, *, remat: str):
    from qwenvl_jax.config import Qwen25VLConfig

    cfg = Qwen25VLConfig.preset(preset, dtype="bfloat16", param_dtype="float32", remat=remat)
    text = dataclasses.replace(cfg.text, num_hidden_layers=text_layers)
    vision = dataclasses.replace(cfg.vision, depth=vision_blocks, fullatt_block_indexes=())
    return cfg, cfg.replace(text=text, vision=vision, scan_layers=False)


def step_flops(config: dict, model_cfg) -> float:
    from qwenvl_jax.train.plan import step_and_args

    _, step, args = step_and_args(config, sharded=False, model_cfg=model_cfg)
    cost = step.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def extrapolated_flops(config: dict, preset: str, *, remat: str) -> dict[str, float]:
    """`{"constant", "per_text_layer", "per_vision_block", "total"}` of the step at the preset's depths."""
    full_cfg, _ = model_at_depth(preset, 1, 1, remat=remat)
    f11 = step_flops(config, model_at_depth(preset, 1, 1, remat=remat)[1])
    f21 = step_flops(config, model_at_depth(preset, 2, 1, remat=remat)[1])
    f12 = step_flops(config, model_at_depth(preset, 1, 2, remat=remat)[1])
    ft, fv = f21 - f11, f12 - f11
    c = f11 - ft - fv
    lt, lv = full_cfg.text.num_hidden_layers, full_cfg.vision.depth
    return {"constant": c, "per_text_layer": ft, "per_vision_block": fv, "total": c + lt * ft + lv * fv}


def cmd_decode(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.generation.cache import cache_shape
    from qwenvl_jax.loading import abstract_model

    dtype = args.dtype
    cfg = Qwen25VLConfig.preset(args.preset, dtype=dtype, param_dtype=dtype).replace(scan_layers=False)
    graphdef, params = nnx.split(abstract_model(cfg))
    b, t = args.batch, args.cached
    kv = jax.ShapeDtypeStruct(cache_shape(cfg, b, t), jnp.dtype(dtype))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

    def step(params, ids, pos, k, v, mask, index):
        return nnx.merge(graphdef, params).decode_step(ids, pos, k, v, mask, index)

    compiled = (
        jax.jit(step, donate_argnums=(3, 4))
        .lower(params, i32(b), i32(3, b), kv, kv, i32(b, t), i32())
        .compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    accessed = float(cost["bytes accessed"])
    weights = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    vision = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(nnx.state(abstract_model(cfg).visual)))  # fmt: skip
    text_weights = weights - vision  # a decode step never reads the vision tower
    cache = 2 * int(np.prod(kv.shape)) * np.dtype(kv.dtype).itemsize
    need = text_weights + cache
    out = {"preset": args.preset, "dtype": dtype, "batch": b, "cached": t, "bytes_accessed": accessed, "weights": text_weights,
           "cache": cache, "ratio": accessed / need}  # fmt: skip
    print(f"decode step, {args.preset} {dtype}, batch {b}, {t} cached tokens: XLA bytes accessed {accessed / 2**30:.2f} GiB; "
          f"weights {text_weights / 2**30:.2f} + live cache {cache / 2**30:.2f} = {need / 2**30:.2f} GiB: "
          f"{accessed / need:.2f}x (goal: at most 1.3x)")  # fmt: skip
    return out


def cmd_lora(args) -> dict:
    shape = dict(rows=1, seq=2048, patches=1024)
    out = {"preset": args.preset, "remat": args.remat, **shape}
    for trainable in ("full", "lora"):
        out[trainable] = extrapolated_flops(step_config(trainable, **shape), args.preset, remat=args.remat)
        print(f"{trainable:>5}: {out[trainable]['total'] / 1e12:8.2f} TFLOP per step "
              f"(per text layer {out[trainable]['per_text_layer'] / 1e9:.1f} GFLOP, per vision block "
              f"{out[trainable]['per_vision_block'] / 1e9:.1f} GFLOP, rest {out[trainable]['constant'] / 1e9:.1f} GFLOP)",
              flush=True)  # fmt: skip
    out["ratio"] = out["lora"]["total"] / out["full"]["total"]
    print(f"LoRA / full: {out['ratio']:.3f} (goal: at most 0.72)")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    lora = sub.add_parser("lora", help="LoRA vs full fine-tuning step FLOPs")
    lora.add_argument("--preset", default="7B")
    lora.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    lora.add_argument("--json", help="write the figures here as JSON")
    decode = sub.add_parser("decode", help="bytes accessed by one decode step")
    decode.add_argument("--preset", default="3B")
    decode.add_argument("--batch", type=int, default=64)
    decode.add_argument("--cached", type=int, default=1024)
    decode.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="weights and cache; XLA:CPU converts bf16 operands to f32, which inflates its count",
    )
    decode.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    out = {"lora": cmd_lora, "decode": cmd_decode}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
