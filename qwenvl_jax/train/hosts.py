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

GRPO and PPO (`train.grpo`, `train.ppo`): each process generates for its share of a generation's prompts
on its own devices (`local_mesh`, `localize`), with sampling keys by global row (`global_rows`); per-row
host values are all-gathered (`distributed.gather_rows`) so that advantages and metrics are the whole
batch's; the old log-probs and PPO's scoring pass run on the global micro-batch (`score_rows`).

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

_SPLIT = ("batch_size", "image_patches", "video_patches", "max_images", "max_videos")


def check_split(config: dict, processes: int) -> None:
    """Refuse, naming the key, a config whose global batch does not split evenly over `processes`."""
    if processes == 1:
        return
    from qwenvl_jax.processing.batch import budget_unit

    kind = config["kind"]
    batch = config["batch"]
    unit = budget_unit(int(batch.get("merge_size") or 2), pairs=kind in ("dpo", "reward"))
    for key in _SPLIT:
        value = batch.get(key)
        if value is None:
            continue
        step = processes * (unit if key.endswith("patches") else 1)
        if int(value) % step:
            raise ConfigError(
                f"batch.{key}={value} does not split over {processes} processes: use a multiple of {step} "
                "(each process collates an equal share of the global batch)"
            )
    if batch.get("pack"):
        raise ConfigError(
            "batch.pack on several processes is not supported: packed rows are planned per batch"
        )
    from qwenvl_jax.train.grpo import batch_shards

    shards = batch_shards(config)
    if config.get("mesh") and shards % processes:
        raise ConfigError(
            f"mesh data x fsdp = {shards} does not split over {processes} processes: each process holds "
            "whole tensor groups (the tensor axis stays within a host)"
        )
    if kind == "grpo":
        _check_grpo_split(config, processes)


def _check_grpo_split(config: dict, processes: int) -> None:
    """GRPO: each process generates for an equal share of a generation's prompts, all G completions of a
    prompt on the process that holds it, and collates its rows in its share of the shared vision budget."""
    from qwenvl_jax.train.grpo import local_budget, prompt_budgets

    prompts = prompt_budgets(config)[0]
    if prompts % processes:
        raise ConfigError(
            f"grpo: {prompts} prompts per generation (batch_size x steps_per_generation / num_generations) "
            f"do not split over {processes} processes: each process generates for an equal share"
        )
    try:
        local_budget(config, processes)
    except ValueError as err:
        raise ConfigError(f"{err} (on {processes} processes, each with its share of the batch)") from None


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


def global_rows(rows: int, block: int) -> np.ndarray:
    """The ids in the global generation batch of this process's `rows` rows, `block` the rows it gives each
    training micro-batch: a global micro-batch is every process's block in process order, so local row
    `r` is row `(r // block) * block * processes + index * block + r % block` of the global batch, the
    order one process holding every row would have them in. Sampling keys follow these ids
    (`rl.rollout`), so a run's samples do not depend on how many processes share it."""
    r = np.arange(rows)
    processes, index = dist.process_count(), dist.process_index()
    return (r // block) * block * processes + index * block + r % block


def local_mesh(mesh):
    """The sub-mesh of this process's devices (same axis names), on which it generates for its own prompts
    (GRPO, PPO). Its devices must form a box of the mesh holding whole tensor groups, as `make_mesh`
    lays processes out along data and fsdp; `ConfigError` otherwise."""
    import jax
    from jax.sharding import Mesh

    devices = np.asarray(mesh.devices)
    mine = np.vectorize(lambda d: d.process_index == jax.process_index())(devices)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mine))
    sub = Mesh(devices[box], mesh.axis_names, axis_types=getattr(mesh, "axis_types", None))
    if sub.devices.size != int(mine.sum()) or sub.shape.get("tensor", 1) != mesh.shape.get("tensor", 1):
        raise ConfigError(
            f"mesh {dict(mesh.shape)}: a process's devices must hold whole tensor groups to generate on "
            "their own (GRPO, PPO on several processes); use a tensor size that divides each host's devices"
        )
    return sub


def localize(model, sub_mesh):
    """`model` (the sampler view, laid out on the global mesh, whole along data and fsdp) as a model on
    this process's `sub_mesh`: each array built from the shards this process already holds, no copy."""
    import jax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    def move(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if isinstance(x.sharding, NamedSharding):
            local = NamedSharding(sub_mesh, x.sharding.spec)
            if local.shard_shape(x.shape) == x.sharding.shard_shape(x.shape):
                shards = {s.device: s.data for s in x.addressable_shards}
                return jax.make_array_from_single_device_arrays(
                    x.shape, local, [shards[d] for d in sub_mesh.devices.flat]
                )
        whole = np.asarray(multihost_utils.process_allgather(x, tiled=True))  # split along data/fsdp
        return jax.device_put(whole, NamedSharding(sub_mesh, PartitionSpec()))

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(move, state))


def score_rows(fn, args, micro_batch: Mapping[str, np.ndarray], mesh):
    """`fn(*args, batch)` on the global micro-batch made of every process's `micro_batch` (`batch` has a
    leading micro-batch axis of 1, laid out by `to_global` as the train step's batch), its row outputs
    back as this process's rows (host numpy). Every process must call it. GRPO's old log-probs, PPO's
    scoring pass (on one process too, for the layout)."""
    import jax
    from jax.experimental import multihost_utils

    from qwenvl_jax.train.step import stack_micro_batches

    rows = int(np.shape(micro_batch["input_ids"])[0])
    batch = to_global(stack_micro_batches([micro_batch]), mesh, rows)
    out = fn(*args, batch)
    start = dist.process_index() * rows

    def mine(x):
        whole = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return whole[start : start + rows]

    return jax.tree.map(mine, out)


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
