"""Multi-host runs with plain `jax.distributed`: start-up, and what the hosts agree on each step.

One command runs on every host (process) of a TPU pod or GPU cluster. Each process reads its own shard of
the data, collates its own rows at the global batch's shapes divided by the process count, and the
global batch is assembled from those parts (`global_batch`), so no process ever holds another's rows
except the packed vision inputs (below). What the processes must agree on for the program to be the same
everywhere, and for none to hang in a collective the others never enter, is settled on the host by one
small all-gather per step (`agree`): whether every process still has data, the sequence bucket (the
longest of all), whether a stop signal arrived anywhere.

Start-up (`initialize`), before anything touches a JAX backend, from the config's `distributed` section
or the environment: `auto: true` lets jax detect the cluster (TPU pod workers, SLURM, Open MPI); else
`coordinator_address` (host:port of process 0), `num_processes` and `process_id`, each of which the
environment may give instead (`QWENVL_COORDINATOR_ADDRESS`, `QWENVL_NUM_PROCESSES`, `QWENVL_PROCESS_ID`:
a shared config plus one variable per host). On CPU the processes exchange collectives through gloo.

The packed vision inputs of a batch (`pixel_values`, `image_*`, `video_*`, `collate`) index the rows and
patches of the whole batch and enter the step replicated, so each process's are all-gathered and merged
(`merge_vision`): its patch rows, units, segments and rows are offset by those of the processes before
it. The step's vision tower then splits the patch rows over the devices as on one host.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ENV = {
    "coordinator_address": "QWENVL_COORDINATOR_ADDRESS",
    "num_processes": "QWENVL_NUM_PROCESSES",
    "process_id": "QWENVL_PROCESS_ID",
}


class DistributedError(RuntimeError):
    """A multi-host start-up that cannot go on (bad settings, an unreachable coordinator): one line."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How this process joins a multi-process run; `None` fields are jax's to detect (`auto`)."""

    auto: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300  # joining: how long to wait for every process
    heartbeat_s: int = 100  # a process silent this long (killed, hung) stops the others with an error

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None or (self.num_processes or 1) > 1


def settings(section: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> Settings:
    """The config's `distributed` section with the environment filling what it leaves unset; a missing or
    inconsistent field of a manual set-up raises `DistributedError` naming it."""
    environ = os.environ if environ is None else environ
    if section is not None and not isinstance(section, Mapping):
        raise DistributedError(
            f"distributed={section!r}: expected a mapping (auto, coordinator_address, ...)"
        )
    values = dict(section or {})
    for key in ("num_processes", "process_id", "timeout_s", "heartbeat_s"):
        if values.get(key) is not None and (
            isinstance(values[key], bool) or not isinstance(values[key], int)
        ):
            raise DistributedError(f"distributed.{key}={values[key]!r}: expected an integer")
    for key, var in ENV.items():
        if values.get(key) is None and environ.get(var):
            raw = environ[var]
            try:
                values[key] = raw if key == "coordinator_address" else int(raw)
            except ValueError:
                raise DistributedError(f"{var}={raw!r}: expected an integer") from None
    s = Settings(
        auto=bool(values.get("auto", False)),
        coordinator_address=values.get("coordinator_address"),
        num_processes=values.get("num_processes"),
        process_id=values.get("process_id"),
        timeout_s=int(values.get("timeout_s", 300)),
        heartbeat_s=int(values.get("heartbeat_s", 100)),
    )
    if s.enabled and not s.auto:
        for key in ("coordinator_address", "num_processes", "process_id"):
            if getattr(s, key) is None:
                raise DistributedError(
                    f"distributed.{key} is not set (nor {ENV[key]}): a multi-process run needs the "
                    "coordinator's host:port, the process count and this process's id, or `auto: true`"
                )
        if not 0 <= s.process_id < s.num_processes:
            raise DistributedError(
                f"distributed.process_id={s.process_id} is outside 0..{s.num_processes - 1} "
                f"(num_processes={s.num_processes})"
            )
    return s


def initialize(s: Settings) -> None:
    """Join the run `s` describes (nothing when it is a single process); call before any JAX backend is
    used. A coordinator that does not answer within `timeout_s` is one line, not a hang."""
    if not s.enabled:
        return
    import jax

    # CPU devices of several processes reach each other through gloo (jax's default there is none).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {
        "initialization_timeout": s.timeout_s,
        "heartbeat_timeout_seconds": s.heartbeat_s,
    }
    if not s.auto:
        kwargs.update(
            coordinator_address=s.coordinator_address, num_processes=s.num_processes, process_id=s.process_id
        )
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # jax raises several types (RuntimeError, ValueError, XlaRuntimeError)
        where = "jax's cluster detection" if s.auto else f"coordinator {s.coordinator_address}"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(f"cannot join the multi-process run through {where}: {first}") from None


def start_watchdog(s: Settings, *, interval_s: float = 1.0) -> None:
    """A daemon thread that notices a process of the run has died (killed, its host lost) and ends this
    one with one line, exit status 1, before jax's own heartbeat check aborts it with a C++ stack.

    Each process writes a beat to the coordination service's key-value store every `interval_s`; a
    process whose beat has not changed for half of `heartbeat_s` (jax's limit) is dead, as is the
    coordinator when the store stops answering. A busy process (compiling, in a long step) keeps beating:
    the thread runs while the main thread is in XLA."""
    if not s.enabled:
        return
    import sys
    import threading
    import time

    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    me, count = process_index(), process_count()
    limit = s.heartbeat_s / 2
    _WATCHDOG["grace_s"] = limit + 3 * interval_s

    def die(why: str) -> None:
        print(f"error: {why}; this process stops too. Run the same command on every host to resume from the "
              "last checkpoint", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(1)

    def store() -> dict[str, dict[int, str]]:
        """The run's keys in one read: `{"beat" | "done" | "failed": {process: value}}`."""
        out: dict[str, dict[int, str]] = {"beat": {}, "done": {}, "failed": {}}
        for key, value in client.key_value_dir_get("qwenvl/"):
            kind, p = key.split("/")[-2:]
            out.setdefault(kind, {})[int(p)] = value
        return out

    def run() -> None:
        seen: dict[int, tuple[str, float]] = {}
        beat = 0
        while not _WATCHDOG["done"]:
            beat += 1
            try:
                client.key_value_set(f"qwenvl/beat/{me}", str(beat), allow_overwrite=True)
                keys = store()
            except Exception as err:  # the store is process 0's: it is gone
                if _WATCHDOG["done"]:
                    return
                if me != 0:
                    die(f"the coordinator (process 0) stopped answering ({type(err).__name__})")
                keys = {"beat": {}, "done": {}, "failed": {}}
            for p, failed in sorted(keys["failed"].items()):
                if p != me:  # it stopped on an error of its own: the others would wait for it
                    die(f"process {p} of {count} stopped: {failed}")
            # A process that has not started beating yet, or has finished, is not watched.
            values = {p: v for p, v in keys["beat"].items() if p != me and p not in keys["done"]}
            now = time.monotonic()
            for p, value in values.items():
                last = seen.get(p)
                if last is None or last[0] != value:
                    seen[p] = (value, now)
                elif now - last[1] > limit:
                    die(
                        f"process {p} of {count} stopped (no sign of life for {limit:.0f} s: killed, or its host failed)"
                    )
            time.sleep(interval_s)

    threading.Thread(target=run, name="qwenvl-watchdog", daemon=True).start()


_WATCHDOG: dict[str, Any] = {"done": False, "grace_s": 0.0}


def await_watchdog() -> None:
    """On an error in a multi-process run, give the watchdog the time it needs to tell whether another
    process died (a collective then fails here first, with a long trace): it ends this process with its
    one line if so; otherwise this returns and the error stands."""
    import time

    deadline = time.monotonic() + _WATCHDOG["grace_s"]
    while time.monotonic() < deadline and not _WATCHDOG["done"]:
        time.sleep(0.2)


def finished(error: str | None = None) -> None:
    """This process is done with the run: its watchdog stops, and the others' stop watching it, so that
    processes ending a moment apart never take each other for dead. With `error` (it stopped on an error
    of its own, which the others may not meet: a strict reward failure, a data error) the others stop
    too, with that line, instead of waiting for it in their next collective."""
    if _WATCHDOG["done"]:
        return
    _WATCHDOG["done"] = True
    if process_count() > 1:
        from jax._src import distributed as jax_distributed

        key = "failed" if error is not None else "done"
        value = "1" if error is None else (error.strip().splitlines() or ["error"])[0]
        try:
            jax_distributed.global_state.client.key_value_set(
                f"qwenvl/{key}/{process_index()}", value, allow_overwrite=True
            )
        except Exception:  # the coordinator is gone already: nobody is left to tell
            pass


def process_count() -> int:
    import jax

    return jax.process_count()


def process_index() -> int:
    import jax

    return jax.process_index()


def is_primary() -> bool:
    """Process 0: the one that writes the run's files (config, logs, metrics, plots, final/)."""
    return process_index() == 0


def allgather(x: np.ndarray) -> np.ndarray:
    """`(processes, *x.shape)`: every process's `x` (same shape and dtype everywhere), on every process."""
    if process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


@dataclasses.dataclass(frozen=True)
class Agreement:
    """What every process agreed on for one step: all have data, the longest sequence, a stop signal."""

    have_data: bool
    seq: int
    stop: bool


def agree(have_data: bool, seq: int, stop: bool) -> Agreement:
    """One host all-gather per step: data runs out for all when it runs out for one (the others would
    wait in the step's collectives forever), the step pads to the longest sequence of any process (one
    compiled shape everywhere), and a signal on any host stops all at the same step."""
    got = allgather(np.asarray([int(have_data), int(seq), int(stop)], np.int64))
    return Agreement(bool(got[:, 0].all()), int(got[:, 1].max()), bool(got[:, 2].any()))


def global_sum(value: float) -> float:
    """The sum over processes of a host number (loss normalisers: label tokens, pairs)."""
    return float(allgather(np.asarray([value], np.float64)).sum())


def gather_rows(x: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """`(rows, offset)`: the first `count` rows of every process's `x` (the same shape everywhere: a
    capacity, of which each process fills its own count), concatenated in process order, and where this
    process's rows start in them. Per-row host values of a generation batch (rewards, lengths) seen whole,
    as one process holding every row would see them."""
    x = np.asarray(x)
    if process_count() == 1:
        return x[:count], 0
    counts = allgather(np.asarray([count], np.int64))[:, 0]
    got = allgather(x)
    rows = np.concatenate([got[p, : int(n)] for p, n in enumerate(counts)])
    return rows, int(counts[: process_index()].sum())


def gather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data` (any lengths), in process order, on every process."""
    lengths = allgather(np.asarray([len(data)], np.int64))[:, 0]
    buf = np.zeros(int(lengths.max()) if len(lengths) else 0, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    got = allgather(buf)
    return [bytes(got[i, : int(n)]) for i, n in enumerate(lengths)]


# ------------------------------------------------------------------------------------ vision inputs
# `collate`'s per-modality vision keys (after the `image_` / `video_` prefix) by what their values index.
_PATCH_VALUES = ("patch_perm", "patch_inv")  # patch rows of the budget
_UNIT_VALUES = ("unit_unperm", "scatter_u")  # merged units of the budget
_SEGMENT_VALUES = ("window_seg", "full_seg")  # segment ids, -1 on padding
_CONCAT = ("rope_pos", "valid", "scatter_s", "grid_thw")  # no offset


def vision_keys(batch: Mapping[str, Any]) -> list[str]:
    """The packed vision keys of a collated batch (what `merge_vision` merges)."""
    from qwenvl_jax.model.vision import PIXEL_KEYS

    out = [k for k in batch if k.startswith(("image_", "video_")) or k in PIXEL_KEYS.values()]
    out += [k for k in ("num_images", "num_videos", "second_per_grid_ts") if k in batch]
    return sorted(set(out))


def merge_vision(parts: Sequence[Mapping[str, np.ndarray]], rows: int) -> dict[str, np.ndarray]:
    """The packed vision inputs of the global batch from each process's (in process order), each collated
    for its `rows` rows at the global budget divided by the process count: concatenated along the patch,
    unit, slot and item axes, with every index offset by the patches, units, segments and rows of the
    processes before it, so that the merged arrays mean for the global batch what each meant for its
    part (padding rows in between are isolated as at the end). Keys with a leading micro-batch axis
    (`stack_micro_batches`) are merged per micro-batch."""
    from qwenvl_jax.model.vision import PIXEL_KEYS

    first = parts[0]
    out: dict[str, np.ndarray] = {}
    for key in first:
        values = [np.asarray(p[key]) for p in parts]
        kind, _, field = key.partition("_")
        if key in PIXEL_KEYS.values():
            out[key] = np.concatenate(values, axis=-2)
        elif key in ("num_images", "num_videos"):
            out[key] = np.sum(values, axis=0).astype(values[0].dtype)
        elif key == "second_per_grid_ts":
            out[key] = np.concatenate(values, axis=-1)
        elif kind in ("image", "video") and field == "full_block":
            out[key] = values[0]  # its shape is the bound, the same everywhere
        elif kind in ("image", "video"):
            pixels = np.asarray(first[PIXEL_KEYS[kind]]).shape[-2]
            offsets = {
                **dict.fromkeys(_PATCH_VALUES, pixels),
                **dict.fromkeys(_UNIT_VALUES, pixels // _unit(first, kind)),
                **dict.fromkeys(_SEGMENT_VALUES, pixels),  # ids are below the patch count
                "scatter_b": rows,
            }
            if field in offsets:
                step = offsets[field]
                shifted = []
                for p, v in enumerate(values):
                    w = v.astype(np.int64) + p * step
                    if field in _SEGMENT_VALUES:
                        w = np.where(v < 0, v, w)  # padding stays -1
                    shifted.append(w.astype(v.dtype))
                values = shifted
            elif field not in _CONCAT:
                raise ValueError(f"merge_vision: no rule for the vision key {key!r}")
            axis = -2 if field in ("rope_pos", "grid_thw") else -1
            out[key] = np.concatenate(values, axis=axis)
        else:
            raise ValueError(f"merge_vision: {key!r} is not a vision key")
    return out


def _unit(batch: Mapping[str, np.ndarray], kind: str) -> int:
    """Patches per merged unit: the budget's patch rows over its units."""
    from qwenvl_jax.model.vision import PIXEL_KEYS

    units = np.asarray(batch[f"{kind}_unit_unperm"]).shape[-1]
    return np.asarray(batch[PIXEL_KEYS[kind]]).shape[-2] // units
