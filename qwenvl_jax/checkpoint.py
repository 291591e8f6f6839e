"""Orbax checkpoints of the parameter tree, with `config.json` (and the tokenizer/processor files) beside it.

Layout of a checkpoint dir:

    CKPT/
      config.json      HF-form config (`Qwen25VLConfig.save_pretrained`), plus `dtype`: the dtype the
                       weights came from, which `export` writes back by default
      params/          Orbax `StandardCheckpointHandler` item: the nested parameter tree
      tokenizer.json, preprocessor_config.json, chat_template.*, generation_config.json, ...  (optional)

A `CheckpointManager` directory whose steps hold a `params` item (`CKPT/<step>/params`) also loads; the
latest step is taken.

Atomicity: everything is written into a temporary sibling `.CKPT.tmp-*` and renamed into place at the end
(`weights.atomic_directory`). A crash before the rename leaves no `CKPT`; Orbax's own tmp-dir + finalize
protects `params/` inside the temporary dir as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.weights import (
    atomic_directory,
    copy_hf_assets,
    flatten_params,
    unflatten_params,
    write_config_json,
)

PARAMS_ITEM = "params"


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous: `save_params` returns only when the data is committed, so the rename that publishes the
    # checkpoint can never race an async write.
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def save_params(
    params: Mapping[str, Any],
    ckpt_dir: str | Path,
    config: Qwen25VLConfig,
    *,
    assets_from: str | Path | None = None,
    source_dtype: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save flat ('/'-joined paths) or nested params, atomically, with config.json beside them.

    `assets_from`: an HF dir whose tokenizer/processor files are copied in, so the checkpoint is
    self-contained for `export`. `source_dtype`: recorded as `dtype` in config.json (the dtype to export).
    """
    tree = unflatten_params(flatten_params(params))
    with atomic_directory(ckpt_dir, overwrite=overwrite) as tmp:
        if assets_from is not None:
            copy_hf_assets(assets_from, tmp)
        write_config_json(config, tmp, dtype=source_dtype)
        _checkpointer().save(tmp / PARAMS_ITEM, args=ocp.args.StandardSave(tree))
    return Path(ckpt_dir)


def params_dir(ckpt_dir: str | Path) -> Path:
    """The Orbax item dir of a checkpoint: `CKPT/params`, or `CKPT/<latest step>/params`."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / PARAMS_ITEM).is_dir():
        return ckpt_dir / PARAMS_ITEM
    steps = sorted(
        (int(p.name), p) for p in ckpt_dir.glob("*") if p.name.isdigit() and (p / PARAMS_ITEM).is_dir()
    )
    if steps:
        return steps[-1][1] / PARAMS_ITEM
    raise FileNotFoundError(f"{ckpt_dir}: no Orbax checkpoint ({PARAMS_ITEM}/ or <step>/{PARAMS_ITEM}/)")


def load_params(
    ckpt_dir: str | Path,
    target: Mapping[str, Any] | None = None,
    **policy: Any,
) -> tuple[dict[str, Any], Qwen25VLConfig]:
    """Restore (flat params, config). `policy` overrides the config's run-time fields (dtype, remat...).

    Without `target`, arrays come back as host numpy arrays in their stored dtype. With `target` (flat or
    nested, leaves `jax.ShapeDtypeStruct` with a `sharding`), Orbax restores each array straight into
    that sharding and dtype, so no host copy of the full model is made.
    """
    ckpt_dir = Path(ckpt_dir)
    item = params_dir(ckpt_dir)
    config_dir = ckpt_dir if (ckpt_dir / "config.json").is_file() else item.parent
    config = Qwen25VLConfig.from_pretrained(config_dir, **policy)
    if target is None:
        args = ocp.args.StandardRestore()
    else:
        args = ocp.args.StandardRestore(unflatten_params(flatten_params(target)))
    restored = _checkpointer().restore(item, args=args)
    flat = flatten_params(restored)
    if target is None:
        flat = {k: np.asarray(v) for k, v in flat.items()}
    return flat, config


def stored_dtypes(ckpt_dir: str | Path) -> dict[str, np.dtype]:
    """Path -> stored dtype, from Orbax metadata (no data read)."""
    meta = _checkpointer().metadata(params_dir(ckpt_dir))
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return {k: np.dtype(v.dtype) for k, v in flatten_params(tree).items()}
