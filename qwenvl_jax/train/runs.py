"""A run directory's edges: paths resolved once, inputs checked before anything is written, one writer at
a time, a resumed config compared with the one its checkpoint was saved with, and the exit codes.

Exit codes of `qwenvl-jax train` (`train.loop.train` returns them):

    0  finished: `final/` written
    1  failed during training (a streak of non-finite steps, an overflowing update); the last good
       checkpoint is kept, nothing of the failed step is saved
    2  refused before training: a config, data, checkpoint or path error (one line names it), a run_dir
       in use by another process, or a resume whose config changes the state or the data order
    3  stopped by SIGTERM or Ctrl-C: a checkpoint of the current step is saved and `final/` is NOT
       written; the same command resumes
    4  finished with `final/` written, but more than `max_skipped_fraction` of this run's steps were
       skipped as non-finite: the model trained on fewer steps than asked; read the warning before using it
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from qwenvl_jax.train.config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_STOPPED, EXIT_UNHEALTHY = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------- paths
def absolute(path: str | os.PathLike) -> str:
    """A user's path made absolute once, at the edge (relative to the working directory, `~` expanded)."""
    return str(Path(path).expanduser().absolute())


def resolve_paths(config: dict) -> dict:
    """The resolved config with run_dir, model.path, processor, data.paths and ppo.reward_model absolute."""
    config = {**config, "model": dict(config["model"]), "data": dict(config["data"])}
    if (config.get("ppo") or {}).get("reward_model"):
        config["ppo"] = {**config["ppo"], "reward_model": absolute(config["ppo"]["reward_model"])}
    config["run_dir"] = absolute(config["run_dir"])
    if config["model"].get("path"):
        config["model"]["path"] = absolute(config["model"]["path"])
    if config.get("processor"):
        config["processor"] = absolute(config["processor"])
    paths = config["data"].get("paths")
    if paths:
        config["data"]["paths"] = [absolute(p) for p in ([paths] if isinstance(paths, str) else paths)]
    return config


def check_inputs(config: dict) -> None:
    """Every file and directory the run reads exists (a `ConfigError` names the first that does not)."""
    model = config["model"].get("path")
    if model and not Path(model).is_dir():
        raise ConfigError(f"model.path {model}: no such checkpoint directory")
    processor = config.get("processor")
    if processor and not Path(processor).is_dir():
        raise ConfigError(f"processor {processor}: no such directory")
    for path in config["data"].get("paths") or []:
        if not Path(path).is_file():
            raise ConfigError(f"data.paths: {path}: no such file")
    reward_model = (config.get("ppo") or {}).get("reward_model")
    if reward_model and not Path(reward_model).is_dir():
        raise ConfigError(f"ppo.reward_model {reward_model}: no such checkpoint directory")
    run_dir = Path(config["run_dir"])
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} exists and is not a directory")


def check_mesh(config: dict, device_count: int, platform: str) -> None:
    """A mesh must use exactly the devices this process sees."""
    mesh = config.get("mesh")
    if mesh is None:
        return
    sizes = {axis: int(mesh.get(axis, 1)) for axis in ("data", "fsdp", "tensor")}
    need = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
    if need != device_count:
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ConfigError(
            f"mesh {shape} needs {need} devices; this process sees {device_count} ({platform}). Set the mesh "
            f"so that data x fsdp x tensor = {device_count}, or omit it for one device"
        )


# ----------------------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive `flock` on `run_dir/.lock` holding the owner's pid and host: one writer per run_dir.

    The kernel drops the lock when the owner dies (even by SIGKILL), so a stale file never blocks a resume.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise ConfigError(
                f"run_dir {self.path.parent} is in use by {owner}; wait for that run to end or use another "
                "run_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------------- resumed configs
# Keys whose change makes a checkpoint restore into a different state (tree, shapes, frozen weights) or
# makes the resumed data stream differ from the one the checkpoint's iterator position refers to.
STRUCTURE_KEYS = (
    "kind", "trainable", "train_merger", "model.path", "model.preset", "model.random_seed",
    "model.param_dtype", "lora", "optim.max_grad_norm", "ppo.reward_model", "ppo.value_init",
)  # fmt: skip
DATA_ORDER_KEYS = ("seed", "data.paths", "data.synthetic", "data.shuffle", "data.num_epochs", "data.max_length",
                   "data.columns", "data.prompt_suffix", "data.min_pixels", "data.max_pixels", "grpo.num_generations", "grpo.steps_per_generation", "grpo.num_iterations",
                   "grpo.max_prompt_length", "ppo.num_mini_batches", "ppo.num_ppo_epochs", "ppo.max_prompt_length",
                   "batch", "grad_accum")  # fmt: skip
# Where the run's outputs go or how they are shown: never worth a word.
QUIET_KEYS = ("run_dir", "logging")


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flat(value, name))
        else:
            out[name] = value
    return out


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, new: dict) -> tuple[list[str], list[str]]:
    """`(refused, reported)`: `"key: old -> new"` lines of the keys that differ between the config a
    checkpoint was saved with and the one resuming it. Refused: they change the state's structure or the
    data order; reported: everything else (e.g. steps, learning rate)."""
    old_flat, new_flat = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(new)))
    refused, reported = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, value = old_flat.get(key), new_flat.get(key)
        if old == value or _under(key, QUIET_KEYS):
            continue
        line = f"{key}: {old!r} -> {value!r}"
        if _under(key, STRUCTURE_KEYS + DATA_ORDER_KEYS):
            refused.append(line)
        else:
            reported.append(line)
    return refused, reported


def saved_config(checkpoint_dir: str | Path) -> tuple[int, dict] | None:
    """`(step, config)` saved with the newest checkpoint step whose config is readable, or None."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        try:
            return step, json.loads((directory / str(step) / "config" / "metadata").read_text("utf-8"))
        except (OSError, ValueError):
            continue
    return None


def check_resume(checkpoint_dir: str | Path, config: dict) -> list[str]:
    """Refuse (`ConfigError`) a resume whose config changes the state or the data order; returns the
    other changes, to be reported."""
    found = saved_config(checkpoint_dir)
    if found is None:
        return []
    step, saved = found
    refused, reported = config_changes(saved, config)
    if refused:
        raise ConfigError(
            f"run_dir holds a checkpoint (step {step}) saved with a different config, and resuming it with "
            f"these changes would restore a different state or data order: {'; '.join(refused)}. Use a new "
            "run_dir, or restore those values to resume"
        )
    return reported
