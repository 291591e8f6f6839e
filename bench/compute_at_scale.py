"""What the compiled training programs spend, from XLA's own cost analysis on CPU (no GPU needed).

    python bench/compute_at_scale.py lora [--preset 7B] [--json OUT]
    python bench/compute_at_scale.py decode [--preset 3B] [--batch 64] [--cached 1024] [--json OUT]
    python bench/compute_at_scale.py vision [--patches 16384 65536] [--max-frame-patches 1024] [--json OUT]
    python bench/compute_at_scale.py dpo [--preset 3B] [--trainable full] [--json OUT]

`lora`: FLOPs of one SFT step of the real config, LoRA (rank 16 on every text projection, the adapters
applied as `x W + (x A) B`, `train.lora.attach`) against full fine-tuning, at the preset's widths, one row
of 2,048 tokens with one 448x448 image (1,024 patches), bf16 compute, float32 master weights, no remat
(the algorithmic count; `--remat full` adds the recomputed forward to both). Full fine-tuning computes
every weight gradient (forward 2NP, backward 4NP); LoRA computes only the input gradients through the
frozen kernels and the adapters' own (backward ~2NP) and nothing of the frozen vision tower's backward.

`decode`: one decode step (`Qwen25VL.decode_step`: the new token through every layer against the KV
cache, the cache updated in place, the logits) at the preset's widths, `batch` rows with `cached` filled
slots (the cache's span holds exactly those), float32 weights and cache by default (XLA:CPU converts
bf16 dot operands to float32, which a GPU does not; the ratio is the figure): XLA's "bytes accessed"
against what a decode step must read, the weights plus the live cache (the goal: within 1.3x). The
step runs over the per-layer weights and cache buffers the generation engine passes it (the layers
unrolled by construction; XLA would count a scan body once), with the cache donated as the engine
donates it; the script also lists any copy or transpose of cache data left in the optimized HLO.

`vision`: the vision tower's forward + backward (gradients of every vision parameter) at 3B widths, on
images of 448x448 (1,024 patches each) filling the patch budget: XLA's FLOPs against the analytic count
(its linear layers, each window's attention over its own rows, each image's full attention over its own
rows; backward = 2 x forward), and XLA:CPU's temporaries at each budget (linear growth is the goal). The
windowed blocks attend band by band (3 x 64 keys per query); the full blocks too when the frames are
bounded (`--max-frame-patches`, `BatchSpec.max_frame_patches`: 3 x bound keys per query), else over the
whole budget with a segment mask (`--max-frame-patches 0`).

`dpo`: a DPO step (2 pairs x 2,048 tokens, one 448x448 image per pair, bf16, no remat; `--trainable
full` or `lora`) with each pair's image encoded once (`data.collate_pairs`) against every row's images
encoded (a stand-in for the former `collate_pairs`): the vision blocks' FLOPs (per block, from the depth
extrapolation below, x 32) and the whole step's.

How (`lora`, `dpo`): XLA counts a `lax.scan` body once, so the step is compiled with the layers unrolled
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


def cache_copies(hlo: str, layer_shape: tuple[int, ...]) -> list[str]:
    """`copy`/`transpose` instructions of an optimized HLO module, fused or not, whose result has the
    element count of one layer's cache buffer or more (a copy or transpose of cache data)."""
    import re

    size = 1
    for d in layer_shape:
        size *= d
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*%\S+ = \w+\[([\d,]*)\]\S* (copy|transpose)\(", line)
        if m and m.group(1):
            elements = 1
            for d in m.group(1).split(","):
                elements *= int(d)
            if elements >= size:
                found.append(line.strip()[:160])
    return found


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
    layers = jax.eval_shape(lambda p: nnx.merge(graphdef, p).text.decode_layers(), params)
    layer_kv = jax.ShapeDtypeStruct(cache_shape(cfg, b, t)[1:], jnp.dtype(dtype))  # one layer's buffer
    kv = (layer_kv,) * cfg.text.num_hidden_layers
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

    def step(params, layers, ids, pos, k, v, mask, index):
        return nnx.merge(graphdef, params).decode_step(layers, ids, pos, k, v, mask, index)

    compiled = (
        jax.jit(step, donate_argnums=(4, 5))
        .lower(params, layers, i32(b), i32(3, b), kv, kv, i32(b, t), i32())
        .compile()
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    accessed = float(cost["bytes accessed"])
    weights = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    vision = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(nnx.state(abstract_model(cfg).visual)))  # fmt: skip
    text_weights = weights - vision  # a decode step never reads the vision tower
    cache = 2 * int(np.prod(cache_shape(cfg, b, t))) * np.dtype(dtype).itemsize
    need = text_weights + cache
    copies = cache_copies(compiled.as_text(), layer_kv.shape)
    out = {"preset": args.preset, "dtype": dtype, "batch": b, "cached": t, "bytes_accessed": accessed, "weights": text_weights,
           "cache": cache, "ratio": accessed / need, "cache_copies": len(copies)}  # fmt: skip
    print(f"decode step, {args.preset} {dtype}, batch {b}, {t} cached tokens: XLA bytes accessed {accessed / 2**30:.2f} GiB; "
          f"weights {text_weights / 2**30:.2f} + live cache {cache / 2**30:.2f} = {need / 2**30:.2f} GiB: "
          f"{accessed / need:.2f}x (goal: at most 1.3x); copies or transposes of cache data: {len(copies)}")  # fmt: skip
    for line in copies:
        print("  ", line)
    return out


def vision_analytic_flops(vc, grids) -> dict[str, float]:
    """Forward FLOPs of the vision tower on `grids` (exact count of its matmuls; norms and softmax
    excluded): linear layers, windowed attention (each window's rows^2) and full attention (each frame's
    rows^2), `2 x` per multiply-add."""
    import numpy as np

    from qwenvl_jax.processing.positions import vision_indices

    vi = vision_indices(grids, merge_size=vc.spatial_merge_size, window_size=vc.window_size,
                        patch_size=vc.patch_size)  # fmt: skip
    n, d, inner = vi.num_patches, vc.hidden_size, vc.intermediate_size
    unit = vc.spatial_merge_size**2
    per_block = 2 * n * (d * 3 * d + d * d + 3 * d * inner)  # qkv, proj, gate/up/down
    windows = np.diff(vi.cu_window_seqlens).astype(np.float64)
    frames = np.diff(vi.cu_seqlens).astype(np.float64)
    attn = lambda lens: 4 * float((lens**2).sum()) * d  # noqa: E731  (QK^T and PV, all heads)
    full = len(vc.fullatt_block_indexes)
    linear = vc.depth * per_block + 2 * n * vc.patch_dim * d
    linear += 2 * (n // unit) * (unit * d * unit * d + unit * d * vc.out_hidden_size)  # the merger
    return {"linear": linear, "window_attention": (vc.depth - full) * attn(windows),
            "full_attention": full * attn(frames)}  # fmt: skip


def vision_program(vc, grids, patches: int, full_block: int | None):
    """`(flops, temp bytes)` of the compiled vision forward + backward on one device (XLA:CPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.model.vision import VisionInputs, VisionTower
    from qwenvl_jax.processing.positions import vision_indices

    cfg = Qwen25VLConfig.preset("3B", dtype="bfloat16", param_dtype="float32").replace(scan_layers=False)
    tower = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(tower)
    vi = vision_indices(grids, merge_size=vc.spatial_merge_size, window_size=vc.window_size,
                        patch_size=vc.patch_size, num_patches=patches)  # fmt: skip
    ints = [jnp.asarray(x, jnp.int32) for x in (vi.rope_pos, vi.patch_perm, vi.window_seg, vi.full_seg,
                                                  vi.unit_unperm)]  # fmt: skip
    pixels = jax.ShapeDtypeStruct((patches, vc.patch_dim), np.float32)
    no_slots = jnp.zeros(0, jnp.int32)  # the tower reads no scatter slots

    def loss(params, pixels, *idx):
        inputs = VisionInputs(pixels, *idx, no_slots, no_slots, full_block=full_block)
        return nnx.merge(graphdef, params)(inputs).astype(jnp.float32).sum()

    compiled = jax.jit(jax.grad(loss)).lower(params, pixels, *ints).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]), int(compiled.memory_analysis().temp_size_in_bytes)


def cmd_vision(args) -> dict:
    from qwenvl_jax.config import Qwen25VLConfig

    vc = Qwen25VLConfig.preset("3B").vision
    bound = args.max_frame_patches or None
    out = {"image": "448x448 (grid 1x32x32)", "max_frame_patches": bound, "budgets": {}}
    for patches in args.patches:
        grids = [[1, 32, 32]] * (patches // 1024)
        analytic = vision_analytic_flops(vc, grids)
        total = 3 * sum(analytic.values())  # forward + backward
        flops, temp = vision_program(vc, grids, patches, bound)
        out["budgets"][patches] = {"analytic_fwd": analytic, "analytic_total": total, "xla_flops": flops,
                                   "ratio": flops / total, "temp_bytes": temp}  # fmt: skip
        print(f"{patches:>6} patches ({len(grids)} images): XLA {flops / 1e12:7.2f} TFLOP, analytic "
              f"{total / 1e12:7.2f} (linear {3 * analytic['linear'] / 1e12:.2f}, windows "
              f"{3 * analytic['window_attention'] / 1e12:.3f}, full {3 * analytic['full_attention'] / 1e12:.3f}): "
              f"{flops / total:.2f}x (goal: at most 1.2x); temporaries {temp / 2**30:.2f} GiB", flush=True)  # fmt: skip
    sizes = sorted(out["budgets"])
    if len(sizes) > 1:
        a, b = out["budgets"][sizes[0]]["temp_bytes"], out["budgets"][sizes[-1]]["temp_bytes"]
        out["temp_growth"] = b / a
        print(f"temporaries {sizes[-1]} / {sizes[0]} patches: {b / a:.2f}x (patches {sizes[-1] / sizes[0]:.0f}x; "
              "goal: at most 4.5x for 4x)")  # fmt: skip
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


def dpo_config(trainable: str, *, pairs: int, seq: int, patches: int) -> dict:
    """A DPO run config (shapes only): `pairs` pairs, one image of `patches` patches per pair."""
    config = {
        "kind": "dpo", "run_dir": "unused", "trainable": trainable, "dpo": {"beta": 0.1},
        "batch": {"batch_size": pairs, "seq_buckets": [seq], "image_patches": 2 * pairs * patches,
                  "max_images": 2 * pairs},
        "optim": {"learning_rate": 1e-5},
    }  # fmt: skip
    if trainable == "lora":
        config["lora"] = {"rank": 16, "alpha": 32.0}
    return config


def every_row_encoded():
    """A stand-in for `data.collate_pairs` as it was: every row's images encoded (the full budget)."""
    from qwenvl_jax.processing.batch import collate

    def collate_pairs(pairs, spec):
        rows = [c for c, _ in pairs] + [r for _, r in pairs]
        return collate(rows + [rows[0]] * (spec.batch_size - len(rows)), spec)

    return collate_pairs


def cmd_dpo(args) -> dict:
    """Vision FLOPs of a DPO step with each pair's image encoded once, against every row's encoded."""
    import qwenvl_jax.data.pipeline as pipeline

    shape = dict(pairs=2, seq=2048, patches=1024)
    out = {"preset": args.preset, "trainable": args.trainable, **shape}
    shared_fn = pipeline.collate_pairs
    for layout, fn in (("every row", every_row_encoded()), ("once per pair", shared_fn)):
        pipeline.collate_pairs = fn
        try:
            out[layout] = extrapolated_flops(dpo_config(args.trainable, **shape), args.preset, remat="none")
        finally:
            pipeline.collate_pairs = shared_fn
        vision = (
            out[layout]["per_vision_block"] * model_at_depth(args.preset, 1, 1, remat="none")[0].vision.depth
        )
        out[layout]["vision"] = vision
        print(f"{layout:>13}: step {out[layout]['total'] / 1e12:8.2f} TFLOP, vision blocks {vision / 1e12:.2f} "
              f"TFLOP (per block {out[layout]['per_vision_block'] / 1e9:.1f} GFLOP)", flush=True)  # fmt: skip
    out["vision_ratio"] = out["once per pair"]["vision"] / out["every row"]["vision"]
    out["step_ratio"] = out["once per pair"]["total"] / out["every row"]["total"]
    print(f"vision FLOPs once per pair / every row: {out['vision_ratio']:.3f} (goal: at most 0.5); "
          f"whole step {out['step_ratio']:.3f}")  # fmt: skip
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
    vision = sub.add_parser("vision", help="vision tower forward + backward FLOPs and temporaries")
    vision.add_argument("--patches", type=int, nargs="+", default=[16384, 65536])
    vision.add_argument("--max-frame-patches", type=int, default=1024, help="0: full blocks unbounded")
    vision.add_argument("--json", help="write the figures here as JSON")
    dpo = sub.add_parser("dpo", help="a DPO step's vision FLOPs, each pair's image encoded once vs per row")
    dpo.add_argument("--preset", default="3B")
    dpo.add_argument("--trainable", default="full", choices=("full", "lora"))
    dpo.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    out = {"lora": cmd_lora, "decode": cmd_decode, "vision": cmd_vision, "dpo": cmd_dpo}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
