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

Damage: a missing, truncated or corrupt file raises `CheckpointError`, one line naming the file. Orbax items
are checked before any array is read (`check_orbax_item` walks the OCDBT index down to every data file), so
the usual damage is named precisely; anything Orbax still fails on is reported by its innermost cause.
Paths may be relative or start with `~`: they are made absolute here, as Orbax requires.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.safetensors_io import CheckpointError
from qwenvl_jax.weights import (
    atomic_directory,
    copy_hf_assets,
    flatten_params,
    unflatten_params,
    write_config_json,
)

__all__ = [
    "CheckpointError",
    "check_json_file",
    "check_orbax_item",
    "load_params",
    "one_line_error",
    "params_dir",
    "read_config",
    "save_params",
    "stored_dtypes",
]

PARAMS_ITEM = "params"


def _checkpointer() -> ocp.Checkpointer:
    # Synchronous: `save_params` returns only when the data is committed, so the rename that publishes the
    # checkpoint can never race an async write.
    import jax

    if jax.process_count() == 1:
        return ocp.Checkpointer(ocp.StandardCheckpointHandler())
    # One process of a multi-host run writes host arrays alone (`train.hosts`: process 0 writes final/):
    # no barrier with processes that do not take part.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(
        ocp.StandardCheckpointHandler(multiprocessing_options=alone), multiprocessing_options=alone
    )


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
    `overwrite` replaces `params/`, config.json and the copied files of an existing dir, keeping the rest.
    """
    ckpt_dir = Path(ckpt_dir).expanduser().absolute()
    tree = unflatten_params(flatten_params(params))
    with atomic_directory(ckpt_dir, overwrite=overwrite) as tmp:
        if assets_from is not None:
            copy_hf_assets(Path(assets_from).expanduser().absolute(), tmp)
        write_config_json(config, tmp, dtype=source_dtype)
        _checkpointer().save(tmp / PARAMS_ITEM, args=ocp.args.StandardSave(tree))
    return ckpt_dir


def params_dir(ckpt_dir: str | Path) -> Path:
    """The Orbax item dir of a checkpoint: `CKPT/params`, or `CKPT/<latest step>/params`."""
    ckpt_dir = Path(ckpt_dir).expanduser().absolute()
    if (ckpt_dir / PARAMS_ITEM).is_dir():
        return ckpt_dir / PARAMS_ITEM
    steps = sorted(
        (int(p.name), p) for p in ckpt_dir.glob("*") if p.name.isdigit() and (p / PARAMS_ITEM).is_dir()
    )
    if steps:
        return steps[-1][1] / PARAMS_ITEM
    raise FileNotFoundError(f"{ckpt_dir}: no Orbax checkpoint ({PARAMS_ITEM}/ or <step>/{PARAMS_ITEM}/)")


def read_config(directory: str | Path, **policy: Any) -> Qwen25VLConfig:
    """`Qwen25VLConfig.from_pretrained(directory)` with `policy` applied; a missing, unparsable or invalid
    config.json raises `CheckpointError` naming it."""
    path = Path(directory).expanduser().absolute() / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint dir needs its config.json)")
    try:
        config = Qwen25VLConfig.from_pretrained(path.parent)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt, not JSON ({err})") from None
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: not a Qwen2.5-VL config ({type(err).__name__}: {err})") from None
    return config.replace(**policy) if policy else config


def load_params(
    ckpt_dir: str | Path,
    target: Mapping[str, Any] | None = None,
    **policy: Any,
) -> tuple[dict[str, Any], Qwen25VLConfig]:
    """Restore (flat params, config). `policy` overrides the config's run-time fields (dtype, remat...).

    Without `target`, arrays come back as host numpy arrays in their stored dtype. With `target` (flat or
    nested, leaves `jax.ShapeDtypeStruct` with a `sharding`), Orbax restores each array straight into
    that sharding and dtype, so no host copy of the full model is made. A damaged checkpoint raises
    `CheckpointError` naming the file.
    """
    ckpt_dir = Path(ckpt_dir).expanduser().absolute()
    item = params_dir(ckpt_dir)
    config_dir = ckpt_dir if (ckpt_dir / "config.json").is_file() else item.parent
    config = read_config(config_dir, **policy)
    check_orbax_item(item)
    if target is None:
        # Host arrays whatever devices saved them (a run on 8 devices, read back on one): numpy targets
        # of the stored shapes and dtypes, never the saved shardings.
        try:
            meta = _checkpointer().metadata(item)
        except Exception as err:
            raise CheckpointError(f"{item}: cannot be restored ({one_line_error(err)})") from None
        meta = getattr(meta, "item_metadata", meta)
        args = ocp.args.StandardRestore(jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta.tree))
    else:
        args = ocp.args.StandardRestore(unflatten_params(flatten_params(target)))
    try:
        restored = _checkpointer().restore(item, args=args)
    except Exception as err:  # whatever Orbax/TensorStore raise on damage the checks above did not see
        raise CheckpointError(f"{item}: cannot be restored ({one_line_error(err)})") from None
    flat = flatten_params(restored)
    if target is None:
        flat = {k: np.asarray(v) for k, v in flat.items()}
    return flat, config


def stored_dtypes(ckpt_dir: str | Path) -> dict[str, np.dtype]:
    """Path -> stored dtype, from Orbax metadata (no data read)."""
    item = params_dir(ckpt_dir)
    check_json_file(item / "_METADATA")
    meta = _checkpointer().metadata(item)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    return {k: np.dtype(v.dtype) for k, v in flatten_params(tree).items()}


# ------------------------------------------------------------------------------------------- damage


def check_json_file(path: Path) -> Any:
    """The parsed JSON file; `CheckpointError` when it is missing or does not parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt, not JSON ({err})") from None


def check_orbax_item(item: str | Path) -> None:
    """Raise `CheckpointError` naming the first missing, truncated or corrupt file of an Orbax PyTree item.

    Reads `_METADATA` and, for OCDBT items (what `StandardSave` writes), the manifest and every b-tree node
    (`tensorstore.ocdbt.dump`), and checks that each data file they point at exists and is long enough.
    No array data is read: the cost is the index, a few KiB per hundred arrays.
    """
    item = Path(item)
    if not item.is_dir():
        raise CheckpointError(f"{item}: missing")
    metadata = check_json_file(item / "_METADATA")
    if not (isinstance(metadata, dict) and metadata.get("use_ocdbt", True)):
        return
    manifest = item / "manifest.ocdbt"
    if not manifest.is_file():
        raise CheckpointError(f"{manifest}: missing")
    import tensorstore as ts

    base = ts.KvStore.open({"driver": "file", "path": f"{item}/"}).result()
    try:
        versions = ts.ocdbt.dump(base).result()["versions"]
    except Exception as err:  # any failure to decode the manifest is its corruption
        raise CheckpointError(f"{manifest}: corrupt ({one_line_error(err)})") from None
    if not versions:
        raise CheckpointError(f"{manifest}: corrupt (no version)")
    root = max(versions, key=lambda v: v["generation_number"])["root"]
    sizes: dict[Path, int | None] = {}  # each data file holds many arrays: stat it once
    # (node location, key prefix): a node's keys are relative to the common prefixes above it.
    pending = [(root["location"], b"")] if "location" in root else []
    while pending:
        location, prefix = pending.pop()
        file = _check_location(item, location, "b-tree node", sizes)
        try:
            node = ts.ocdbt.dump(base, location).result()
        except Exception as err:
            raise CheckpointError(f"{file}: corrupt ({one_line_error(err)})") from None
        for entry in node.get("entries", ()):
            if "location" in entry:  # an interior node's child
                pending.append((entry["location"], prefix + _bytes(entry.get("subtree_common_prefix"))))
            elif "indirect_value" in entry:  # array bytes kept in a data file
                array = (prefix + _bytes(entry["key"])).decode("utf-8", "replace").split("/")[0]
                _check_location(item, entry["indirect_value"], f"data of {array}", sizes)


def _bytes(x: Any) -> bytes:
    return x if isinstance(x, bytes) else str(x or "").encode("utf-8")


def _check_location(item: Path, location: str, what: str, sizes: dict[Path, int | None]) -> Path:
    """`"btreenode::d/NAME:OFFSET:LENGTH"` or `"value:ocdbt.process_0/:d/NAME:OFFSET:LENGTH"`: the file it
    names under `item`, after checking that it exists and holds OFFSET + LENGTH bytes."""
    _, rest = location.split(":", 1)
    prefix, name, offset, length = rest.rsplit(":", 3)
    file = item / prefix / name
    if file not in sizes:
        sizes[file] = file.stat().st_size if file.is_file() else None
    size, needed = sizes[file], int(offset) + int(length)
    if size is None:
        raise CheckpointError(f"{file}: missing ({what})")
    if size < needed:
        raise CheckpointError(f"{file}: truncated to {size} bytes, {needed} needed ({what})")
    return file


def one_line_error(err: BaseException) -> str:
    """An Orbax/TensorStore exception in one line: its innermost cause's first line, without the spec dump
    TensorStore appends."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
