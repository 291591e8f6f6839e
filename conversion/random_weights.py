"""Random weights for any preset, full size included, with no checkpoint on disk: one set of tensors for
the transformers model and ours.

Every tensor is named by its HF on-disk key and drawn by torch on the device, from a generator seeded by
the crc32 of the key started from `seed`: any process on the same device type draws the same values, in any order, and
neither side needs the other's copy. The distribution is `conversion.tiny_hf.randomize_`'s:
- matrices (Linear weights, the embedding, the Conv3d patch embedding): N(0, 1/fan_in), fan_in =
  prod(shape[1:]);
- biases N(0, 0.1^2); norm scales (every 1-D parameter that is not a bias) 1 + N(0, 0.1^2).

Why not HF's own `_init_weights` (N(0, initializer_range^2) with initializer_range 0.02, zero biases, unit
norm scales): zero biases and unit scales would hide a bias or a norm scale that is dropped or mapped to
the wrong place, and the matrix scale is the same order anyway. 1/sqrt(fan_in) is 0.022 (3B) and 0.017 (7B)
for the d_model-input matrices and the embedding, 0.028 for the vision blocks, 0.0095/0.0073 for the text
down_proj, i.e. within a factor 2.7 of 0.02 everywhere; it keeps every matmul output at unit scale at any
width, so the final RMSNorm output is O(1) and the logits have a standard deviation near 1 (not
degenerate: no overflow, no saturated softmax, no constant rows).

Two ways to hand our side the weights:
- `on_device=True` (parity): each parameter is assembled in its final layout and dtype in one torch tensor on
  the device and shared with JAX through DLPack, without a copy; the model's arrays are torch's memory until
  the model is dropped. Peak: one model plus one float32 layer tensor, no host round trip.
- `on_device=False` (benchmarks): the same tensors are copied to the host one layer at a time and JAX copies
  them in, after torch has released its cache; needed where JAX preallocates its pool.

This module imports torch and transformers (and jax for the model); the runtime package never imports it.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.weights import key_map, normalize_hf_key


def random_hf_tensor(key: str, shape, seed: int, device):
    """The float32 tensor of HF on-disk `key`: the same values in every process for the same device type."""
    import torch

    if not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} must be in [0, 2**32)")
    gen = torch.Generator(device=device)
    # The seed goes into the key's checksum: torch's CPU generator keeps only the low 32 bits of its seed.
    gen.manual_seed(zlib.crc32(key.encode(), seed))
    x = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    if key.endswith(".bias"):
        return x * 0.1
    if len(shape) == 1:  # RMSNorm scales
        return x * 0.1 + 1.0
    return x * math.prod(shape[1:]) ** -0.5


def hf_config(config: Qwen25VLConfig):
    """The `transformers.Qwen2_5_VLConfig` of `config` (its nested `config.json` form)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**config.to_hf_dict())


def empty_hf_model(config: Qwen25VLConfig, device, dtype: str, *, attn_implementation: str = "sdpa"):
    """`Qwen2_5_VLForConditionalGeneration` of `config` created on `device` (HF's own init; "meta": no
    memory at all)."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            hf_config(config), dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
    return model.to(device)  # a no-op where the device context was honoured


def hf_parameters(model, config: Qwen25VLConfig) -> dict[str, Any]:
    """The model's parameters by on-disk key, checked against `key_map(config)`: every key present with
    its shape, and no parameter outside the map (a tied lm_head is the embedding and is listed once)."""
    params = {normalize_hf_key(name): p for name, p in model.named_parameters()}
    expected = {key: entry.hf_shape for entry in key_map(config) for key in entry.hf_keys()}
    for key, shape in expected.items():
        got = tuple(params[key].shape) if key in params else "missing"
        if got != shape:
            raise ValueError(f"HF model parameter {key}: {got}, expected {shape}")
    if set(params) - set(expected):
        raise ValueError(f"HF parameters with no draw: {sorted(set(params) - set(expected))}")
    return params


def build_hf_model(
    config: Qwen25VLConfig, device, dtype: str, seed: int, *, attn_implementation: str = "sdpa"
):
    """`Qwen2_5_VLForConditionalGeneration` of `config` on `device` in `dtype`, with the random weights.

    The draws are float32 and cast by `copy_` (round to nearest even), one tensor at a time: peak is the
    model plus one float32 tensor."""
    import torch

    model = empty_hf_model(config, device, dtype, attn_implementation=attn_implementation)
    with torch.no_grad():
        for key, p in hf_parameters(model, config).items():
            p.copy_(random_hf_tensor(key, tuple(p.shape), seed, p.device))
    return model


def ours_params(config: Qwen25VLConfig, device, seed: int, *, on_device: bool = False) -> dict[str, Any]:
    """Our flat `{path: array}` parameters with `build_hf_model`'s values, in `config.param_dtype`.

    Each HF draw is mapped to our layout (`key_map`) and cast on `device` (round to nearest even, as the HF
    side's `copy_`), then written into its slot of the stacked parameter. `on_device=True`: the stacked
    tensors stay on `device` and become JAX arrays through DLPack (no copy); otherwise numpy arrays on the
    host (bfloat16 as `ml_dtypes.bfloat16`).
    """
    import torch

    dtype = getattr(torch, config.param_dtype)
    flat = {}
    for entry in key_map(config):
        out = torch.empty(entry.full_shape, dtype=dtype, device=device if on_device else "cpu")
        for i, key in enumerate(entry.hf_keys()):
            part = entry.to_ours(key, random_hf_tensor(key, entry.hf_shape, seed, device)).to(dtype)
            (out[i] if entry.layers else out).copy_(part)
            del part  # before the next draw: one float32 layer tensor at a time
        flat[entry.path] = _to_jax(out) if on_device else _to_numpy(out)
    return flat


def build_ours_model(config: Qwen25VLConfig, device, seed: int, *, on_device: bool = False):
    """Our model with the weights `build_hf_model` draws (`ours_params`).

    With `on_device=False`, torch's cached blocks are released before JAX allocates anything, so a JAX
    that preallocates its pool still finds the memory free."""
    import torch

    from qwenvl_jax.loading import model_from_params

    flat = ours_params(config, device, seed, on_device=on_device)
    if not on_device and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return model_from_params(config, flat)


def _to_numpy(x) -> np.ndarray:
    import torch

    if x.dtype == torch.bfloat16:  # numpy has no bfloat16: same bits, viewed as ml_dtypes'
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def _to_jax(x):
    import jax
    import torch

    if x.device.type == "cuda":
        torch.cuda.current_stream(x.device).synchronize()  # the copies above ran on torch's stream
    return jax.dlpack.from_dlpack(x)
