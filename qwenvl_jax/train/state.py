"""Train state: the trainable parameters and their optimizer state, split from the frozen ones.

The model is split once, explicitly, with `nnx.split(model, <trainable filter>, nnx.Param)`:

    graphdef, trainable, frozen = nnx.split(model, trainable_filter, nnx.Param)

and both parameter groups are kept as plain nested dicts (`nnx.to_pure_dict`); `nnx.merge(graphdef,
trainable, frozen)` rebuilds the model inside the step (`graphdef` keeps the `logical_axes` metadata).
`TrainState` (a pytree, donated to the step) holds only what changes; the frozen dict is a separate step
argument that is never donated or copied. Modes (`trainable=`):

- "full": every Param trains; `frozen` is empty.
- "frozen_vision": the vision tower is frozen; the merger (`visual/merger`) trains unless
  `train_merger=False` (QwenLM's `tune_mm_vision=False, tune_mm_mlp=True` default).
- "lora": every base Param is frozen; `params` is the LoRA tree of `qwenvl_jax.train.lora`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwenvl_jax.train import lora as lora_lib
from qwenvl_jax.train.optim import OptimConfig, make_optimizer

TRAINABLE_MODES = ("full", "frozen_vision", "lora")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps attempted (skipped non-finite steps included)
    params: Any  # trainable params: nested pure dict, or the LoRA tree
    opt_state: Any
    rng: jax.Array  # key data (uint32), split once per step (LoRA dropout)


def trainable_filter(trainable: str, *, train_merger: bool = True) -> Any:
    """The nnx filter of the trainable Params of a mode (LoRA: none of the base Params)."""
    if trainable == "full":
        return nnx.Param
    if trainable == "frozen_vision":
        vision = (
            nnx.All(nnx.PathContains("visual"), nnx.Not(nnx.PathContains("merger")))
            if train_merger
            else nnx.PathContains("visual")
        )
        return nnx.All(nnx.Param, nnx.Not(vision))
    if trainable == "lora":
        return nnx.Nothing()
    raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {trainable!r}")


def split_model(model: nnx.Module, trainable: str = "full", *, train_merger: bool = True):
    """`(graphdef, trainable params, frozen params)` as nested pure dicts."""
    graphdef, train_state, frozen_state = nnx.split(
        model, trainable_filter(trainable, train_merger=train_merger), nnx.Param
    )
    return graphdef, nnx.to_pure_dict(train_state), nnx.to_pure_dict(frozen_state)


def param_logical_axes(model: nnx.Module) -> dict[str, tuple[str | None, ...]]:
    """`{"a/b/c": logical_axes}` of every Param (for shardings of params and optimizer state)."""
    return {
        "/".join(map(str, path)): tuple(var.get_metadata()["logical_axes"])
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def init_train_state(
    model: nnx.Module,
    optim_cfg: OptimConfig,
    trainable: str = "full",
    lora_cfg: lora_lib.LoraConfig | None = None,
    seed: int = 0,
    *,
    train_merger: bool = True,
) -> tuple[Any, TrainState, dict, optax.GradientTransformation]:
    """`(graphdef, state, frozen, tx)` for `qwenvl_jax.train.step`.

    The parameters are taken as they are (dtype, placement); for a sharded run place the model first
    (`sharding.shard_model`) or let the jitted step reshard on its first call.
    """
    if (trainable == "lora") != (lora_cfg is not None):
        raise ValueError("lora_cfg is required with trainable='lora' and only then")
    graphdef, params, frozen = split_model(model, trainable, train_merger=train_merger)
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    if trainable == "lora":
        params = lora_lib.init_lora(frozen, lora_cfg, init_key)
    tx = make_optimizer(optim_cfg)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(key),
    )
    return graphdef, state, frozen, tx
