"""Training checkpoints: an Orbax `CheckpointManager` over `run_dir/checkpoints/<step>/`.

Each step directory holds three items:

- `state`: the `TrainState` as a dict `{step, params, opt_state, rng}` (trainable params only; the frozen
  ones are rebuilt from the model source);
- `data`: the data iterator state (`BatchIterator.get_state()` bytes, base64 in JSON);
- `config`: the run config (JSON).

Orbax writes each step into a temporary directory and renames it when complete, so a crash in the middle
of a save leaves the previous step as the latest loadable one (`restore_latest` only sees finalized steps).
Saves may be asynchronous; `wait()` (called by `close()`) blocks until they are committed.

A finalized step can still be damaged afterwards (a file lost or truncated on disk). `restore_latest` then
falls back to the newest step that loads, reports each skipped step, and moves the damaged ones aside to
`<step>.damaged` (never deleted): the run saves that step number afresh and the `keep` rotation, which
only sees numbered dirs, never removes them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwenvl_jax.checkpoint import CheckpointError, check_json_file, check_orbax_item, one_line_error
from qwenvl_jax.train.state import TrainState

STATE, DATA, CONFIG = "state", "data", "config"


def _as_dict(state: TrainState) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


@dataclasses.dataclass
class Restored:
    """What `TrainCheckpointer.restore_latest` restored, and the newer steps it skipped as damaged:
    `skipped` is `[(step, reason)]`, newest first, each reason one line naming the dir and the file."""

    step: int
    state: TrainState
    data_state: bytes
    config: dict
    skipped: list[tuple[int, str]]

    def __iter__(self):
        """Unpacks as `step, state, data_state, config` (`skipped` by name only)."""
        return iter((self.step, self.state, self.data_state, self.config))


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """A restore target leaf: a ShapeDtypeStruct keeps its sharding (default device when it has none),
    an array gives its shape, dtype and sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is not None:
            return x
        return jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
    return ocp.utils.to_shape_dtype_struct(x)


def _host_copy(x: Any) -> Any:
    """An owned host copy of a fully addressable array: the train step DONATES the state, so an async save
    must not keep a (possibly zero-copy, on CPU) view of buffers that the next step overwrites."""
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        return np.array(x, copy=True)
    return x


class TrainCheckpointer:
    """Save every `save_every` steps (and on demand), keep the last `keep` steps, restore the latest."""

    def __init__(
        self, directory: str | Path, *, save_every: int = 100, keep: int = 3, async_save: bool = True
    ):
        self.directory = Path(directory).expanduser().absolute()
        self.save_every = int(save_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=(STATE, DATA, CONFIG), options=options
        )

    # ------------------------------------------------------------------------------------------- save
    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would save (a multiple of `save_every`, not saved yet): the loop asks
        first, so that the data state, gathered from every process, is only made when it is needed."""
        return self.save_every > 0 and step % self.save_every == 0 and step not in self.manager.all_steps()

    def save(
        self, step: int, state: TrainState, data_state: bytes, config: dict, *, force: bool = False
    ) -> bool:
        """Save at `step` when it is a multiple of `save_every` (or `force`); returns whether it saved."""
        if not force and (self.save_every <= 0 or step % self.save_every):
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(jax.tree.map(_host_copy, _as_dict(state))),
                DATA: ocp.args.JsonSave({"iterator": base64.b64encode(data_state).decode("ascii")}),
                CONFIG: ocp.args.JsonSave(config),
            }
        )
        return bool(self.manager.save(step, args=args, force=True))

    def save_now(self, step: int, state: TrainState, data_state: bytes, config: dict) -> None:
        """Save `step` regardless of `save_every` and wait until it is committed (SIGTERM, end of run)."""
        self.save(step, state, data_state, config, force=True)
        self.wait()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # ---------------------------------------------------------------------------------------- restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract: TrainState) -> Restored | None:
        """The newest step that loads, as `Restored`; None when there is no step at all.

        `abstract` gives the structure, dtypes and shardings of the state: `jax.ShapeDtypeStruct` leaves
        (`state.abstract_train_state`), so that Orbax allocates the one copy of the state straight into its
        shardings; concrete arrays work too. A step that fails to load (a missing, truncated or corrupt
        file) is skipped for the next older one and moved aside (see the module docstring); when none
        loads, `CheckpointError` lists every step's reason and nothing is moved.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        target = jax.tree.map(_abstract, _as_dict(abstract))
        failed: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, data_state, config = self._restore(step, target)
            except Exception as err:  # whatever the damage, the next older step may load
                reason = str(err) if isinstance(err, CheckpointError) else one_line_error(err)
                failed.append((step, reason))
                continue
            skipped = [(s, f"{reason}; kept as {self._set_aside(s)}") for s, reason in failed]
            if skipped:
                self.manager.reload()
            return Restored(step, state, data_state, config, skipped)
        lines = "\n".join(f"  step {s}: {reason}" for s, reason in failed)
        raise CheckpointError(f"{self.directory}: no checkpoint step can be restored:\n{lines}")

    def _restore(self, step: int, target: dict) -> tuple[TrainState, bytes, dict]:
        step_dir = self.directory / str(step)
        check_orbax_item(step_dir / STATE)
        for item in (DATA, CONFIG):
            check_json_file(step_dir / item / "metadata")  # JsonSave's file
        args = {
            STATE: ocp.args.StandardRestore(target),
            DATA: ocp.args.JsonRestore(),
            CONFIG: ocp.args.JsonRestore(),
        }
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:
            raise CheckpointError(f"{step_dir}: cannot be restored ({one_line_error(err)})") from None
        try:
            data_state = base64.b64decode(out[DATA]["iterator"], validate=True)
        except (binascii.Error, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{step_dir / DATA}: corrupt iterator state ({one_line_error(err)})"
            ) from None
        return TrainState(**out[STATE]), data_state, out[CONFIG]

    def _set_aside(self, step: int) -> Path | str:
        """Rename a damaged step dir out of Orbax's numbering: `<step>.damaged` (`-2`, `-3`... if taken)."""
        src = self.directory / str(step)
        dst, n = self.directory / f"{step}.damaged", 1
        while dst.exists():
            n += 1
            dst = self.directory / f"{step}.damaged-{n}"
        try:
            os.rename(src, dst)
        except OSError as err:
            return f"{src} (could not be moved aside: {err})"
        return dst
