"""Run configs: a plain dict (a YAML file's contents), `--set key=value` overrides, defaults, validation.

A config is checked as a whole before anything is built, so a typo fails in a second with the key's name
instead of silently running with a default after minutes of loading:

    kind: sft | dpo
    target: 1xh100                 # hardware of the memory plan (`train.plan`, `--dry-run`): NxH100,
                                   # NxH200, v5p-CORES; not used by the run itself
    run_dir: DIR                   # metrics.jsonl, tensorboard/, loss_curves.png, checkpoints/, final/
    steps: 20                      # optimizer steps in total (a resumed run continues up to it)
    seed: 0                        # train-state rng (LoRA dropout) and data shuffling
    model: {preset: tiny, random_seed: 0}    # random weights, no downloads; or {path: DIR} (HF or Orbax)
           dtype: float32, param_dtype: float32, remat: none|full|dots, attention_backend: xla|cudnn
    processor: DIR                 # default: model.path, or the tiny processor written into run_dir
    data: {paths: [a.jsonl, ...]}  # or {synthetic: N}: N shape-drawing records written into run_dir/data
          shuffle, num_epochs (null = repeat), worker_count, policy: skip|strict, max_length,
          mask_vision_tokens
    batch: {batch_size, seq_buckets, image_patches, max_images, ..., pack}   # `BatchSpec` fields + pack;
                                   # for DPO batch_size counts PAIRS (a batch holds 2 x pairs rows)
    grad_accum: 1                  # micro-batches per optimizer step (padded to one length)
    trainable: full | frozen_vision | lora,  train_merger: true
    lora: {rank, alpha, dropout, targets, scopes}                     # `LoraConfig` fields
    optim: {learning_rate, warmup_steps, schedule, ...}              # `OptimConfig` fields
    mesh: {data: 1, fsdp: 1, tensor: 1}                              # omitted: one device, no mesh
    dpo: {loss_type, beta, label_smoothing, reference_free, ...}     # `losses.dpo_objective` keywords
    checkpoint: {every: 50, keep: 3, async: true}
    max_bad_steps: 10              # stop after this many non-finite (skipped) steps in a row
    loss_type: nll, chunk_size: 1024
    logging: {progress: true, tensorboard: true, plot: true}
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "kind": "sft",
    "target": None,
    "run_dir": None,
    "steps": 20,
    "seed": 0,
    "model": {"preset": "tiny", "random_seed": 0, "dtype": "float32", "param_dtype": "float32"},
    "processor": None,
    "data": {"shuffle": True, "num_epochs": None, "worker_count": 0, "policy": "skip"},
    "batch": {"batch_size": 2},
    "grad_accum": 1,
    "trainable": "full",
    "train_merger": True,
    "lora": {},
    "optim": {},
    "mesh": None,
    "dpo": {},
    "checkpoint": {"every": 50, "keep": 3, "async": True},
    "max_bad_steps": 10,
    "loss_type": "nll",
    "chunk_size": 1024,
    "logging": {"progress": True, "tensorboard": True, "plot": True},
}

MODEL_KEYS = ("path", "preset", "random_seed", "dtype", "param_dtype", "remat", "attention_backend")
DATA_KEYS = (
    "paths", "synthetic", "shuffle", "num_epochs", "worker_count", "policy", "max_length",
    "mask_vision_tokens",
)  # fmt: skip
MESH_KEYS = ("data", "fsdp", "tensor")
CHECKPOINT_KEYS = ("every", "keep", "async")
LOGGING_KEYS = ("progress", "tensorboard", "plot")
# Filled in by the loop from the batch itself, never by the user.
_DPO_INTERNAL = ("policy_token_logps", "ref_token_logps", "completion_mask", "policy_log_sum_sq_probs",
                 "ref_chosen_logps", "ref_rejected_logps", "token_stats", "attention_mask")  # fmt: skip


class ConfigError(ValueError):
    """A config key or value that cannot be run; the message names the key."""


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, recursively for mappings (a `None` section replaces nothing below it)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
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
            raise ConfigError(f"--set expects key=value, got {item!r}")
        node = config
        *parents, last = key.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
        node[last] = yaml.safe_load(raw)
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping, got {type(config).__name__}")
    return apply_overrides(config, list(overrides))


def _check_keys(section: str, values: Any, known) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config {section} must be a mapping, got {values!r}")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown {section} keys {unknown}; known: {sorted(known)}")


def dpo_keys() -> tuple[str, ...]:
    from qwenvl_jax.losses import dpo_objective

    params = inspect.signature(dpo_objective).parameters
    return tuple(k for k in params if k not in _DPO_INTERNAL)


def resolve(config: dict) -> dict:
    """Defaults merged in and every key checked; raises `ConfigError` naming the first bad key."""
    from qwenvl_jax.processing.batch import BatchSpec
    from qwenvl_jax.train.lora import LoraConfig
    from qwenvl_jax.train.optim import OptimConfig
    from qwenvl_jax.train.state import TRAINABLE_MODES

    _check_keys("top-level", config, DEFAULTS)
    config = merge(DEFAULTS, config)
    if config["kind"] not in ("sft", "dpo"):
        raise ConfigError(f"kind must be sft or dpo, got {config['kind']!r}")
    if not config.get("run_dir"):
        raise ConfigError("config needs run_dir (e.g. --set run_dir=/tmp/run)")
    if config["trainable"] not in TRAINABLE_MODES:
        raise ConfigError(f"trainable must be one of {TRAINABLE_MODES}, got {config['trainable']!r}")
    _check_keys("model", config["model"], MODEL_KEYS)
    _check_keys("data", config["data"], DATA_KEYS)
    _check_keys("batch", config["batch"], [f.name for f in dataclasses.fields(BatchSpec)] + ["pack"])
    _check_keys("lora", config["lora"], [f.name for f in dataclasses.fields(LoraConfig)])
    _check_keys("optim", config["optim"], [f.name for f in dataclasses.fields(OptimConfig)])
    _check_keys("dpo", config["dpo"], dpo_keys())
    _check_keys("checkpoint", config["checkpoint"], CHECKPOINT_KEYS)
    _check_keys("logging", config["logging"], LOGGING_KEYS)
    if config["mesh"] is not None:
        _check_keys("mesh", config["mesh"], MESH_KEYS)
    if config["lora"] and config["trainable"] != "lora":
        raise ConfigError(f"a lora section needs trainable: lora (trainable is {config['trainable']!r})")
    if config["dpo"] and config["kind"] != "dpo":
        raise ConfigError("a dpo section needs kind: dpo")
    if config["kind"] == "dpo" and config["batch"].get("pack"):
        raise ConfigError("batch.pack applies to SFT only")
    for key in ("steps", "grad_accum", "max_bad_steps"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"{key} must be a positive integer, got {config[key]!r}")
    return config
