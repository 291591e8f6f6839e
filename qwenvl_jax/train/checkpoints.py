"""Training checkpoints: an Orbax `CheckpointManager` over `run_dir/checkpoints/<step>/`.

Each step directory holds three items:

- `state`: the `TrainState` as a dict `{step, params, opt_state, rng}` (trainable params only; the frozen
  ones are rebuilt from the model source);
- `data`: the data iterator state (`BatchIterator.get_state()` bytes, base64 in JSON);
- `config`: the run config (JSON).

Orbax writes each step into a temporary directory and renames it when complete, so a crash in the middle
of a save leaves the previous step as the latest loadable one (`restore_latest` only sees finalized steps).
Saves may be asynchronous; `wait()` (called by `close()`) blocks until they are committed.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwenvl_jax.train.state import TrainState

STATE, DATA, CONFIG = "state", "data", "config"


def _as_dict(state: TrainState) -> dict[str, Any]:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


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
        self.directory = Path(directory).absolute()
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

    def restore_latest(self, like: TrainState) -> tuple[int, TrainState, bytes, dict] | None:
        """`(step, state, data_state, config)` of the latest complete step, or None without one.

        `like` gives the structure, dtypes and shardings of the state (e.g. the freshly initialised one).
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_dict(like))
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(abstract),
                    DATA: ocp.args.JsonRestore(),
                    CONFIG: ocp.args.JsonRestore(),
                }
            ),
        )
        state = TrainState(**out[STATE])
        data_state = base64.b64decode(out[DATA]["iterator"])
        return step, state, data_state, out[CONFIG]
