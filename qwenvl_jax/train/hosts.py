"""The training loop on several processes (`qwenvl_jax.distributed`): each one's share of the batch, the
global arrays built from the shares, and what only process 0 does.

Every process runs the same loop on its own shard of the records (`shard_index` = its index). The config's
`batch` describes the GLOBAL batch: each process collates `batch_size / processes` rows (DPO and reward:
pairs) in `image_patches / processes` patch rows (videos, `max_images`, `max_videos` alike), so the
global batch has the config's shapes, and the step compiled from them is the one a single process would
compile. Row arrays enter the step through `jax.make_array_from_process_local_data`: each process gives
its rows, none holds another's. The packed vision inputs are merged (`distributed.merge_vision`) and
enter replicated, as on one host.

Row order: process p's rows are the p-th block of the global batch. A DPO batch of one process is
`[chosen x b, rejected x b]`; the global one is therefore those blocks in process order, which the DPO
objective reads with `pair_blocks = processes` (`losses.dpo_pair_split`).

Files (config.json, metrics, tensorboard, plots, final/, the run lock) are written by process 0; each
process keeps its own skip log (`skipped.jsonl`, `skipped.p<i>.jsonl`). The run directory must be one
shared file system for all hosts (Orbax's multi-host checkpoints need it too).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwenvl_jax import distributed as dist
from qwenvl_jax.train.config import ConfigError

# Kinds whose loop feeds collated batches from the record stream (GRPO and PPO generate theirs).
STREAM_KINDS = ("sft", "dpo", "reward")
_SPLIT = ("batch_size", "image_patches", "video_patches", "max_images", "max_videos")


def check_split(config: dict, processes: int) -> None:
    """Refuse, naming the key, a config whose global batch does not split evenly over `processes`."""
    if processes == 1:
        return
    kind = config["kind"]
    if kind not in STREAM_KINDS:
        raise ConfigError(
            f"kind: {kind} on {processes} processes: multi-process runs support sft, dpo and reward so far "
            "(GRPO and PPO generate on one process; run them on one host)"
        )
    batch = config["batch"]
    unit = int(batch.get("merge_size") or 2) ** 2
    for key in _SPLIT:
        value = batch.get(key)
        if value is None:
            continue
        step = processes * (unit * (2 if kind in ("dpo", "reward") else 1) if key.endswith("patches") else 1)
        if int(value) % step:
            raise ConfigError(
                f"batch.{key}={value} does not split over {processes} processes: use a multiple of {step} "
                "(each process collates an equal share of the global batch)"
            )
    if batch.get("pack"):
        raise ConfigError(
            "batch.pack on several processes is not supported: packed rows are planned per batch"
        )


def local_config(config: dict, processes: int, frame_patches: int) -> dict:
    """The config one process collates with: the global batch's rows and budgets divided by `processes`,
    the frame bound fixed to the global one (`frame_patches`), so that every process bands alike."""
    if processes == 1:
        return config
    out = copy.deepcopy(config)
    batch = out["batch"]
    for key in _SPLIT:
        if batch.get(key) is not None:
            batch[key] = int(batch[key]) // processes
    batch["max_frame_patches"] = int(frame_patches)
    return out


def to_global(stacked: Mapping[str, np.ndarray], mesh, local_rows: int) -> dict[str, Any]:
    """This process's stacked micro-batches `(M, rows/processes, ...)` as the global batch's arrays, laid
    out as the step's `batch_shardings` of the global shapes. Every process must call it (the vision
    inputs are all-gathered)."""
    import jax

    from qwenvl_jax.sharding import batch_axes
    from qwenvl_jax.train.step import batch_shardings

    processes = dist.process_count()
    vision = dist.vision_keys(stacked)
    parts = [{} for _ in range(processes)]
    for key in vision:
        gathered = dist.allgather(np.asarray(stacked[key]))
        for p in range(processes):
            parts[p][key] = gathered[p]
    merged = dist.merge_vision(parts, local_rows) if vision else {}
    shapes: dict[str, Any] = {}
    for key, value in stacked.items():
        if key in merged:
            shapes[key] = merged[key]
            continue
        shape = list(np.shape(value))
        axes = (None, *batch_axes(key, len(shape) - 1))
        if "batch" in axes:
            shape[axes.index("batch")] *= processes
        shapes[key] = jax.ShapeDtypeStruct(tuple(shape), np.asarray(value).dtype)
    shardings = batch_shardings(shapes, mesh)
    out = {}
    for key, value in stacked.items():
        data = merged.get(key, np.asarray(value))
        out[key] = jax.make_array_from_process_local_data(shardings[key], data, tuple(np.shape(shapes[key])))
    return out


def gather_params(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every array of `flat` whole on every process's host (a collective: all processes call it), so that
    process 0 can write them; one array at a time. An array this process holds whole (a host array, or
    one on its own devices: the same on every process, as every process computed it alike) is read as it
    is: `process_allgather` would stack every process's copy of it."""
    import jax
    from jax.experimental import multihost_utils

    def whole(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return {k: whole(v) for k, v in flat.items()}


def barrier(name: str) -> None:
    """Wait until every process gets here (process 0 has written what the others read next)."""
    if dist.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class QuietLogger:
    """The logger of processes other than 0: counts skipped steps (the exit code is every process's),
    writes nothing."""

    def __init__(self, start_skipped: int = 0):
        self.skipped_steps = start_skipped

    def log(self, row: dict) -> None:
        self.skipped_steps += bool(row.get("skipped"))

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
