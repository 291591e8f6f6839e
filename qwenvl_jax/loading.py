"""`qwenvl_jax.load(path, dtype=...)`: an HF checkpoint directory or an Orbax checkpoint -> `Qwen25VL`.

The model is built abstractly (`nnx.eval_shape`: no allocation, no random init), and each parameter is
filled from the checkpoint one tensor at a time: safetensors are memory-mapped, so peak host memory stays
near one copy of the model, and nothing is initialised only to be overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig, generation_eos_token_ids
from qwenvl_jax.model import Qwen25VL
from qwenvl_jax.quant import QUANTIZE_KINDS, nf4_targets, quantize_nf4, quantize_stream
from qwenvl_jax.weights import (
    CheckpointMismatchError,
    checkpoint_files,
    flatten_params,
    hf_to_params,
    unflatten_params,
)


def _is_orbax(path: Path) -> bool:
    from qwenvl_jax.checkpoint import params_dir

    try:
        return params_dir(path).is_dir()
    except FileNotFoundError:
        return False


def _config_dir(path: Path) -> Path:
    """Where `load` found config.json: `path`, or the step dir of an Orbax CheckpointManager dir."""
    if (path / "config.json").is_file() or not _is_orbax(path):
        return path
    from qwenvl_jax.checkpoint import params_dir

    return params_dir(path).parent


def abstract_model(
    config: Qwen25VLConfig, *, quantize: str | None = None, quantize_vision: bool = False
) -> Qwen25VL:
    """The model with ShapeDtypeStruct leaves: full-size shapes without allocating a byte. `quantize`,
    `quantize_vision`: the kernels `model_from_params` would quantize are abstract `NF4Weight`s."""
    model = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
    _check_quantize(quantize)
    if quantize:
        params = nnx.state(model, nnx.Param)
        flat = {"/".join(map(str, path)): var for path, var in nnx.to_flat_state(params)}
        for path in nf4_targets({k: v.shape for k, v in flat.items()}, vision=quantize_vision):
            flat[path].set_value(jax.eval_shape(quantize_nf4, flat[path].get_value()))
        nnx.update(model, params)
    return model


def _check_quantize(quantize: str | None) -> None:
    if quantize not in (None, *QUANTIZE_KINDS):
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE_KINDS} or None")


def model_from_params(
    config: Qwen25VLConfig,
    flat: dict[str, Any],
    *,
    quantize: str | None = None,
    quantize_vision: bool = False,
) -> Qwen25VL:
    """Put flat `{'a/b/c': array}` parameters into a model of `config`; keys and shapes must match exactly.

    `quantize="nf4"`: the kernels `quant.nf4_targets` names (the decoder's, and with `quantize_vision` the
    vision tower's) are stored in NF4, QLoRA's frozen base. Each is quantized as it is read, one layer
    at a time (`quant.quantize_stream`): the model never stands on the device in full precision."""
    graphdef, state = nnx.split(abstract_model(config))
    pure = nnx.to_pure_dict(state)
    expected = flatten_params(pure)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = {k: (tuple(np.shape(flat[k])), tuple(expected[k].shape)) for k in expected.keys() & flat.keys()
             if tuple(np.shape(flat[k])) != tuple(expected[k].shape)}  # fmt: skip
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(
            missing=missing, unexpected=unexpected, wrong_shape=wrong, source="parameters"
        )
    param_dtype = jnp.dtype(config.param_dtype)
    _check_quantize(quantize)
    targets = (
        set(nf4_targets({k: v.shape for k, v in expected.items()}, vision=quantize_vision))
        if quantize
        else ()
    )

    def one(key):  # one device array at a time from the (memory-mapped) host arrays
        if key in targets:
            return quantize_stream(flat[key], dtype=param_dtype)
        return jnp.asarray(flat[key], dtype=param_dtype)

    filled = unflatten_params({k: one(k) for k in expected})
    nnx.replace_by_pure_dict(state, filled)
    return nnx.merge(graphdef, state)


def random_model(config: Qwen25VLConfig, seed: int = 0, **quantize: Any) -> Qwen25VL:
    """A model of `config` with random weights drawn in numpy: fast, deterministic, no torch.

    Norm scales 1 + N(0, 0.1^2), matrices N(0, 1/fan_in), other vectors N(0, 0.1^2). Eager NNX init would
    cost seconds per tiny model on many devices; this fills the abstract model instead. `quantize`,
    `quantize_vision`: as `model_from_params`.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(config))):
        axes, shape = var.get_metadata()["logical_axes"], var.shape
        if axes[-1] == "norm":
            value = 1 + 0.1 * rng.normal(size=shape)
        elif len(shape) - (axes[0] == "layers") >= 2:
            value = rng.normal(size=shape) * shape[-2] ** -0.5
        else:
            value = 0.1 * rng.normal(size=shape)
        flat["/".join(map(str, path))] = value.astype(np.float32)
    return model_from_params(config, flat, **quantize)


def load(
    path: str | Path,
    *,
    dtype: str = "bfloat16",
    param_dtype: str | None = None,
    quantize: str | None = None,
    quantize_vision: bool = False,
    **policy: Any,
) -> Qwen25VL:
    """Load an HF Qwen2.5-VL directory (single or sharded safetensors, tied 3B without `lm_head.weight`) or an
    Orbax checkpoint written by `qwenvl-jax convert`.

    `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: `dtype`, which is what
    inference wants; training keeps float32 master weights with `param_dtype="float32"`). Other keyword
    arguments set the config's execution policy (`attention_backend`, `remat`, `scan_layers`).

    `quantize="nf4"` (QLoRA) stores the decoder's kernels (and with `quantize_vision` the vision tower's)
    in NF4 as they are read (`model_from_params`).
    """
    path = Path(path).expanduser().absolute()  # Orbax refuses relative paths
    policy = dict(policy, dtype=dtype, param_dtype=param_dtype or dtype)
    if _is_orbax(path):
        from qwenvl_jax.checkpoint import load_params

        flat, config = load_params(path)
        config = config.replace(**policy)
    elif (path / "config.json").exists() and checkpoint_files(path):
        from qwenvl_jax.checkpoint import read_config  # a damaged config.json: CheckpointError

        config = read_config(path, **policy)
        flat = hf_to_params(path, config)
    else:
        raise FileNotFoundError(
            f"{path}: neither an HF checkpoint (config.json + safetensors) nor an Orbax checkpoint"
        )
    # transformers' generate also stops on generation_config.json's eos ids: so do we.
    config = config.with_eos_token_ids(generation_eos_token_ids(_config_dir(path)))
    return model_from_params(config, flat, quantize=quantize, quantize_vision=quantize_vision)


def param_count(model_or_config) -> int:
    """Number of parameters (the tied lm_head counted once, as HF counts)."""
    model = (
        abstract_model(model_or_config) if isinstance(model_or_config, Qwen25VLConfig) else model_or_config
    )
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return sum(int(np.prod(var.get_value().shape)) for _, var in params)
