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

A resumed run does not initialise a state only to overwrite it: `abstract_train_state` gives its structure,
dtypes and shardings without allocating it, and the checkpoint is restored straight into that.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

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
    graphdef, params, frozen, tx = _split(model, optim_cfg, trainable, lora_cfg, train_merger)
    return graphdef, _new_state(params, frozen, tx, lora_cfg, seed), frozen, tx


def abstract_train_state(
    model: nnx.Module,
    optim_cfg: OptimConfig,
    trainable: str = "full",
    lora_cfg: lora_lib.LoraConfig | None = None,
    seed: int = 0,
    *,
    train_merger: bool = True,
    rules: Any = None,
) -> tuple[Any, TrainState, dict, optax.GradientTransformation]:
    """`init_train_state` without allocating the state: `(graphdef, abstract state, frozen, tx)`, the state's
    leaves `jax.ShapeDtypeStruct`s with shardings, to restore a checkpoint into (one copy of the state).

    The initialisation is traced by `jax.eval_shape` (LoRA needs the frozen params for their shapes only).
    Shardings: on a sharded model (Params on a mesh, `sharding.shard_model`), those the train step uses
    (`step.state_shardings` with `rules`, default `sharding.DEFAULT_RULES`): params by their logical axes,
    Adam moments like their params, scalars replicated; otherwise the device of the model's params.
    `frozen` holds the model's arrays, as in `init_train_state`: nothing here copies a parameter.
    """
    graphdef, params, frozen, tx = _split(model, optim_cfg, trainable, lora_cfg, train_merger)
    shapes = jax.eval_shape(lambda p, f: _new_state(p, f, tx, lora_cfg, seed), params, frozen)
    shardings = _state_shardings(shapes, model, params, frozen, tx, lora_cfg, rules)
    state = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, shardings
    )
    return graphdef, state, frozen, tx


def _split(model, optim_cfg, trainable, lora_cfg, train_merger):
    if (trainable == "lora") != (lora_cfg is not None):
        raise ValueError("lora_cfg is required with trainable='lora' and only then")
    graphdef, params, frozen = split_model(model, trainable, train_merger=train_merger)
    return graphdef, params, frozen, make_optimizer(optim_cfg)


def _new_state(params, frozen, tx, lora_cfg, seed) -> TrainState:
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    if lora_cfg is not None:
        params = lora_lib.init_lora(frozen, lora_cfg, init_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(key),
    )


def _state_shardings(shapes: TrainState, model, params, frozen, tx, lora_cfg, rules) -> TrainState:
    """The shardings of a state of `shapes` (see `abstract_train_state`)."""
    placed = [getattr(x, "sharding", None) for x in jax.tree.leaves((params, frozen))]
    mesh = next((s.mesh for s in placed if isinstance(s, NamedSharding)), None)
    if mesh is not None:
        from qwenvl_jax import sharding as shd
        from qwenvl_jax.train.step import state_shardings  # step imports this module

        rules = shd.DEFAULT_RULES if rules is None else rules
        return state_shardings(shapes, tx, param_logical_axes(model), mesh, rules, lora=lora_cfg is not None)
    devices = next((s.device_set for s in placed if s is not None), {jax.devices()[0]})
    if len(devices) != 1:
        raise ValueError(f"the model's params are spread over {len(devices)} devices without a mesh")
    single = SingleDeviceSharding(next(iter(devices)))
    return jax.tree.map(lambda _: single, shapes)
