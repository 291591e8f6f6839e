"""`qwenvl-jax convert` (HF safetensors -> Orbax) and `qwenvl-jax export` (Orbax -> HF safetensors).

Both are streaming on the host (numpy only, no torch): about one host copy of the model at peak, and both
publish their output directory atomically. HF -> Orbax -> HF is bit-exact: same keys, dtypes and bytes.

Safety: the output may not be, contain or lie inside the source (symlinks resolved). `overwrite` replaces
only what the command writes (convert: `params/`, config.json and the copied tokenizer/processor files;
export: the weights, their index, config.json, generation_config.json and the copied files) and keeps
every other file of the output dir. A missing, truncated or corrupt source file raises `CheckpointError`
naming it; a source without the tokenizer/processor files converts, with a warning on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.checkpoint import CheckpointError, load_params, read_config, save_params
from qwenvl_jax.weights import (
    EMBED,
    SCORE_PATH,
    as_dtype,
    atomic_directory,
    hf_tensor_infos,
    hf_to_params,
    normalize_hf_key,
    read_config_dtype,
    write_hf_checkpoint,
)

BF16 = as_dtype("bfloat16")

# What `export` owns in its output dir: an overwrite replaces these even when this export does not
# write them (e.g. a single model.safetensors after an earlier sharded export), so that no stale weight
# file can shadow the new ones.
HF_OUTPUTS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
)

# The files `AutoProcessor` / `AutoTokenizer` (and `qwenvl_jax.processing.Processor`) need.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


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
    Nothing is written when the checkpoint does not match its config (`CheckpointMismatchError`) or a
    file of it is damaged (`CheckpointError`).
    """
    hf_dir, out_dir = _absolute(hf_dir), _absolute(out_dir)
    check_separate(hf_dir, out_dir)
    config = read_config(hf_dir)
    params = hf_to_params(hf_dir, config, dtype=dtype, progress=progress)
    source_dtype = _source_dtype(hf_dir)
    out = save_params(
        params, out_dir, config, assets_from=hf_dir, source_dtype=source_dtype, overwrite=overwrite
    )
    _warn_missing_processor_files(hf_dir, out)
    return out


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

    A reward model's checkpoint (`score/kernel` beside the backbone) is written as a sequence classifier
    (`weights.write_hf_checkpoint`), with the pad id of its tokenizer files.
    """
    ckpt_dir, out_dir = _absolute(ckpt_dir), _absolute(out_dir)
    check_separate(ckpt_dir, out_dir)
    params, config = load_params(ckpt_dir)
    if dtype is None:
        stored = {np.dtype(v.dtype) for v in params.values()}
        recorded = read_config_dtype(ckpt_dir)
        dtype = BF16 if stored == {BF16} else recorded or BF16
    # The outer directory decides what an overwrite replaces (HF_OUTPUTS and whatever is written); the
    # writer fills its (empty) temporary dir.
    pad = _pad_token_id(ckpt_dir) if SCORE_PATH in params else None
    with atomic_directory(out_dir, overwrite=overwrite, replaces=HF_OUTPUTS) as tmp:
        write_hf_checkpoint(params, config, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes,
                            assets_from=ckpt_dir, overwrite=True, progress=progress,
                            pad_token_id=pad)  # fmt: skip
    _warn_missing_processor_files(ckpt_dir, out_dir)
    return out_dir


def _pad_token_id(ckpt_dir: Path) -> int | None:
    """The pad id a sequence classifier's config needs: the tokenizer's (as the training batches were
    padded with), or None with a warning when the checkpoint has no tokenizer files."""
    if missing_processor_files(ckpt_dir) and not (ckpt_dir / "tokenizer.json").is_file():
        print(f"warning: {ckpt_dir} has no tokenizer files: the exported reward model's config has no "
              "pad_token_id, so transformers scores only unpadded single rows", file=sys.stderr)  # fmt: skip
        return None
    from qwenvl_jax.processing.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(ckpt_dir).pad_token_id


def check_separate(source: Path, target: Path) -> None:
    """Refuse an output dir that is the source, or holds it, or lies inside it (symlinks resolved): the
    output is published by renames into that dir, which would replace or mix with the source's files."""
    src, dst = source.resolve(), target.resolve()
    if src == dst:
        raise CheckpointError(f"{target}: the output dir is the source dir; choose another output dir")
    if src in dst.parents:
        raise CheckpointError(f"{target}: the output dir lies inside the source dir {source}")
    if dst in src.parents:
        raise CheckpointError(f"{target}: the output dir contains the source dir {source}")


def missing_processor_files(directory: str | Path) -> list[str]:
    """The tokenizer/processor files (`PROCESSOR_FILES`) that `directory` lacks."""
    return [name for name in PROCESSOR_FILES if not (Path(directory) / name).is_file()]


def _warn_missing_processor_files(source: Path, out_dir: Path) -> None:
    missing = missing_processor_files(source)
    if missing:
        print(f"warning: {source} has no {', '.join(missing)}, so neither has {out_dir}: AutoTokenizer / "
              "AutoProcessor will not load it until they are copied from the original HF checkpoint",
              file=sys.stderr)  # fmt: skip


def _absolute(path: str | Path) -> Path:
    return Path(path).expanduser().absolute()


def _source_dtype(hf_dir: Path) -> str:
    """The checkpoint's storage dtype: that of the embedding (Hub checkpoints are uniformly bf16)."""
    for key, info in hf_tensor_infos(hf_dir).items():
        if normalize_hf_key(key) == EMBED:
            return info.dtype.name
    raise AssertionError("unreachable: hf_to_params checked the embedding exists")
