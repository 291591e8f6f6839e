"""The SFT training loop: `train(config)` from a plain dict (a YAML file's contents, `--set` overrides applied).

Config keys (defaults in `DEFAULTS`):

    kind: sft                      # only SFT for now
    run_dir: DIR                   # metrics.jsonl, checkpoints/, processor/ (tiny), data/ (synthetic)
    steps: 20                      # optimizer steps in total (a resumed run continues up to it)
    seed: 0                        # train-state rng (LoRA dropout) and data shuffling
    model: {preset: tiny, random_seed: 0}   # random weights, no downloads; or {path: DIR} (HF or Orbax)
           dtype: float32          # compute dtype; parameters are float32 master weights
    processor: DIR                 # default: model.path, or the tiny processor written into run_dir/processor
    data: {paths: [a.jsonl, ...]}  # or {synthetic: N}: N shape-drawing records written into run_dir/data
          shuffle: true, num_epochs: null (repeat), worker_count: 0, policy: skip
    batch: {batch_size, seq_buckets, image_patches, max_images, ...}   # `BatchSpec` fields
    grad_accum: 1                  # micro-batches per step (they must collate to the same shapes)
    trainable: full                # full | frozen_vision
    optim: {learning_rate, warmup_steps, schedule, ...}               # `OptimConfig` fields
    checkpoint: {every: 50, keep: 3, async: true}
    loss_type: nll, chunk_size: 1024

Each step writes one JSON line to `run_dir/metrics.jsonl` (step, loss, tokens, tokens_per_s, skipped,
records_skipped, grad_norm, ...) and a progress line to stderr. With a checkpoint in `run_dir/checkpoints`
the run RESUMES from its latest complete step: params, optimizer state, step, rng and the data iterator
state (so the batches continue where they stopped), and metrics lines past that step are dropped. SIGTERM
saves a checkpoint at the current step and exits cleanly (`train` returns 0).
"""

from __future__ import annotations

import copy
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULTS: dict[str, Any] = {
    "kind": "sft",
    "run_dir": None,
    "steps": 20,
    "seed": 0,
    "model": {"preset": "tiny", "random_seed": 0, "dtype": "float32"},
    "processor": None,
    "data": {"shuffle": True, "num_epochs": None, "worker_count": 0, "policy": "skip"},
    "batch": {"batch_size": 2},
    "grad_accum": 1,
    "trainable": "full",
    "optim": {},
    "checkpoint": {"every": 50, "keep": 3, "async": True},
    "loss_type": "nll",
    "chunk_size": 1024,
}


# ---------------------------------------------------------------------------------------------- config
def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`["a.b=3", "run_dir=/tmp/x"]` -> config with those (YAML-parsed) values set at the dotted keys."""
    import yaml

    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a mapping")
        node[last] = yaml.safe_load(raw)
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    import yaml

    config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return apply_overrides(config, list(overrides))


# ------------------------------------------------------------------------------------------------ setup


def build_model(model_cfg: dict):
    dtype = model_cfg.get("dtype", "float32")
    if model_cfg.get("path"):
        from qwenvl_jax import loading

        return loading.load(model_cfg["path"], dtype=dtype, param_dtype="float32")
    from qwenvl_jax.config import Qwen25VLConfig

    cfg = Qwen25VLConfig.preset(model_cfg.get("preset", "tiny"), dtype=dtype, param_dtype="float32")
    from qwenvl_jax.loading import random_model

    return random_model(cfg, int(model_cfg.get("random_seed", 0)))


def processor_dir(config: dict, run_dir: Path) -> Path:
    if config.get("processor"):
        return Path(config["processor"])
    if config["model"].get("path"):
        return Path(config["model"]["path"])
    out = run_dir / "processor"
    if not (out / "tokenizer.json").exists():
        from qwenvl_jax.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(out)
    return out


SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


def write_synthetic_data(out_dir: Path, num: int, *, size: int = 56, seed: int = 0) -> Path:
    """`num` SFT records (one drawn shape each, "What is in the image?" -> "A red circle.") and their PNGs
    under `out_dir`; deterministic in `seed`, written once (kept if the JSONL already exists)."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "synthetic.jsonl"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(num):
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        r = size // 4
        cx, cy = size // 2 + int(rng.integers(-4, 5)), size // 2 + int(rng.integers(-4, 5))
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
        name = f"img_{i:05d}.png"
        image.save(out_dir / name)
        lines.append(
            json.dumps(
                {
                    "id": f"syn{i}",
                    "image": name,
                    "prefix": "What is in the image?",
                    "suffix": f"A {color} {shape}.",
                }
            )
        )
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def data_paths(config: dict, run_dir: Path) -> list[str]:
    data = config["data"]
    if data.get("synthetic"):
        return [str(write_synthetic_data(run_dir / "data", int(data["synthetic"]), seed=int(config["seed"])))]
    paths = data.get("paths")
    if not paths:
        raise ValueError("config data needs `paths: [...]` or `synthetic: N`")
    return [str(p) for p in ([paths] if isinstance(paths, str) else paths)]


def _truncate_metrics(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = [line for line in keep if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


# ------------------------------------------------------------------------------------------------- loop
def train(config: dict) -> int:
    """Run (or resume) the training run `config` describes; returns 0 (also after SIGTERM)."""
    import jax

    from qwenvl_jax import losses
    from qwenvl_jax.data.pipeline import make_batches
    from qwenvl_jax.processing import BatchSpec, Processor
    from qwenvl_jax.train.checkpoints import TrainCheckpointer
    from qwenvl_jax.train.optim import OptimConfig
    from qwenvl_jax.train.state import init_train_state
    from qwenvl_jax.train.step import make_train_step, stack_micro_batches

    config = _merge(DEFAULTS, config)
    if config["kind"] != "sft":
        raise ValueError(f"only kind: sft is supported by the loop, got {config['kind']!r}")
    if not config.get("run_dir"):
        raise ValueError("config needs run_dir (e.g. --set run_dir=/tmp/run)")
    if config["trainable"] not in ("full", "frozen_vision"):
        raise ValueError(f"trainable must be full or frozen_vision, got {config['trainable']!r}")
    run_dir = Path(config["run_dir"]).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    steps, seed, accum = int(config["steps"]), int(config["seed"]), int(config["grad_accum"])
    (run_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    # Model, processor, batch spec, data.
    model = build_model(config["model"])
    proc_dir = processor_dir(config, run_dir)
    processor = Processor.from_pretrained(proc_dir)
    spec = BatchSpec.from_dict(
        config["batch"],
        pad_token_id=processor.pad_token_id,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
    )
    data = config["data"]
    batches = make_batches(
        data_paths(config, run_dir),
        proc_dir if int(data.get("worker_count", 0)) else processor,
        spec,
        kind="sft",
        policy=data.get("policy", "skip"),
        seed=seed,
        shuffle=bool(data.get("shuffle", True)),
        num_epochs=data.get("num_epochs"),
        worker_count=int(data.get("worker_count", 0)),
    )

    # Train state and step.
    optim_cfg = OptimConfig(**{"total_steps": steps, **config["optim"]})
    graphdef, state, frozen, tx = init_train_state(model, optim_cfg, config["trainable"], seed=seed)
    del model
    step_fn = make_train_step(
        "sft", graphdef, tx, loss_type=config["loss_type"], chunk_size=int(config["chunk_size"])
    )

    ck = config["checkpoint"]
    ckpt = TrainCheckpointer(
        run_dir / "checkpoints",
        save_every=int(ck.get("every", 50)),
        keep=int(ck.get("keep", 3)),
        async_save=bool(ck.get("async", True)),
    )
    metrics_path = run_dir / "metrics.jsonl"
    restored = ckpt.restore_latest(state)
    if restored is not None:
        start, state, data_state, _ = restored
        batches.set_state(data_state)
        _truncate_metrics(metrics_path, start)
        print(f"resumed from step {start} ({ckpt.directory})", file=sys.stderr)
    else:
        start = 0
        metrics_path.unlink(missing_ok=True)

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    step = start
    try:
        with metrics_path.open("a", encoding="utf-8") as log:
            while step < steps and stop["signal"] is None:
                micro = []
                for _ in range(accum):
                    try:
                        micro.append(next(batches))
                    except StopIteration:
                        break
                if len(micro) < accum:
                    print("data exhausted", file=sys.stderr)
                    break
                shapes = {tuple((k, np.shape(v)) for k, v in mb.items() if v is not None) for mb in micro}
                if len(shapes) > 1:
                    raise ValueError(
                        "grad_accum micro-batches collated to different shapes; use one seq bucket"
                    )
                num_items = losses.sft_num_items_in_batch([mb["labels"] for mb in micro])
                stacked = stack_micro_batches(micro)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, frozen, stacked, np.float32(num_items))
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                step += 1
                tokens = float(metrics["num_tokens"])
                row = {
                    "step": step,
                    "loss": float(metrics["loss"]),
                    "tokens": tokens,
                    "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                    "skipped": int(metrics["skipped"]),
                    "records_skipped": batches.skipped.total,
                    "grad_norm": float(metrics["grad_norm"]),
                    "label_tokens": float(metrics["label_tokens"]),
                    "mean_token_accuracy": float(metrics["mean_token_accuracy"]),
                    "time_s": dt,
                }
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(
                    f"step {step}/{steps} loss {row['loss']:.4f} tok/s {row['tokens_per_s']:.0f}"
                    + (" SKIPPED" if row["skipped"] else ""),
                    file=sys.stderr,
                    flush=True,
                )
                ckpt.save(step, state, batches.get_state(), config)
        if step > start or ckpt.latest_step() is None:
            if ckpt.latest_step() != step:
                ckpt.save_now(step, state, batches.get_state(), config)
        if stop["signal"] is not None:
            print(f"SIGTERM: saved step {step}, exiting", file=sys.stderr)
    finally:
        ckpt.close()
        signal.signal(signal.SIGTERM, previous)
    return 0
