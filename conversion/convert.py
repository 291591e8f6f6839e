"""`qwenvl-jax convert` (HF safetensors -> Orbax) and `qwenvl-jax export` (Orbax -> HF safetensors).

Both are streaming on the host (numpy only, no torch): about one host copy of the model at peak, and both
publish their output directory atomically. HF -> Orbax -> HF is bit-exact: same keys, dtypes and bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.checkpoint import load_params, save_params
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.weights import (
    EMBED,
    as_dtype,
    hf_tensor_infos,
    hf_to_params,
    normalize_hf_key,
    read_config_dtype,
    write_hf_checkpoint,
)

BF16 = as_dtype("bfloat16")


def convert(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: Any = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """HF checkpoint dir -> self-contained Orbax checkpoint dir (params, config.json, tokenizer/processor).

    `dtype=None` keeps the checkpoint's dtype (bf16 for Hub checkpoints); 'float32' etc. cast. The
    checkpoint's own dtype is recorded in config.json so that `export` writes it back by default.
    Nothing is written when the checkpoint does not match its config (`CheckpointMismatchError`).
    """
    hf_dir = Path(hf_dir)
    config = Qwen25VLConfig.from_pretrained(hf_dir)
    params = hf_to_params(hf_dir, config, dtype=dtype, progress=progress)
    source_dtype = _source_dtype(hf_dir)
    return save_params(
        params, out_dir, config, assets_from=hf_dir, source_dtype=source_dtype, overwrite=overwrite
    )


def export(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Orbax checkpoint dir -> HF dir that `transformers.from_pretrained` loads.

    `dtype=None` picks: the stored dtype when it is already bfloat16; otherwise the dtype the weights
    were converted from (config.json `dtype`, so f32 -> f32 and bf16 -> bf16 round trips are bit-exact);
    otherwise bfloat16 (e.g. float32 master weights from training).
    """
    params, config = load_params(ckpt_dir)
    if dtype is None:
        stored = {np.dtype(v.dtype) for v in params.values()}
        recorded = read_config_dtype(ckpt_dir)
        dtype = BF16 if stored == {BF16} else recorded or BF16
    return write_hf_checkpoint(params, config, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                               assets_from=ckpt_dir, overwrite=overwrite, progress=progress)  # fmt: skip


def _source_dtype(hf_dir: Path) -> str:
    """The checkpoint's storage dtype: that of the embedding (Hub checkpoints are uniformly bf16)."""
    for key, info in hf_tensor_infos(hf_dir).items():
        if normalize_hf_key(key) == EMBED:
            return info.dtype.name
    raise AssertionError("unreachable: hf_to_params checked the embedding exists")
