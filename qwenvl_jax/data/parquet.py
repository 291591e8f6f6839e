"""Parquet files as Hugging Face `datasets` stores them -> the same records as JSONL lines.

Each row is a record with the keys of a JSONL line (`records.py`), read by row index: `ParquetSource`
maps a global index to (file, row group, row) from the files' metadata, reads whole row groups on demand
(the smallest unit Parquet decodes) and keeps the last few in a small cache, so that memory holds a few
row groups, never a whole file. A shuffled pass decodes about one row group per record unless neighbours
are drawn while it is cached; Hub image data sets keep row groups small (about 100 rows) for this reason.

Row values are made into what the record parsers take (`parse_row`):

- an image is a `{"bytes": b"...", "path": "..."}` struct (`datasets.Image`): its bytes when present
  (decoded from memory like a file's contents), else its path, relative to the Parquet file's directory;
  `image`/`images` columns hold one struct or a list of them, and image blocks in messages may hold one;
- a struct column holds every field of its type in every row, `None` where a row has none: those are
  dropped from messages, content blocks and the keys that choose the format (`prompt`, `images`, ...),
  so that a text block is not taken for an image block with a null image. Other columns, carried for
  the reward functions, are kept as stored.

The id is the row's `id` column, else `"<file>:<row>"` (1-based), and the location `"<file>:<row>"`.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain.python as grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qwenvl_jax.data.records import BadRecord, Record, record_from_obj, rename_columns, resolve
from qwenvl_jax.processing.errors import InputError

# Keys whose null value means "absent": the format is recognised by which of them a record holds.
_FORMAT_KEYS = (
    "id", "messages", "prompt", "chosen", "rejected", "prefix", "suffix", "image", "images", "video",
    "videos",
)  # fmt: skip
_MESSAGE_KEYS = ("messages", "prompt", "chosen", "rejected")


class ParquetSource(grain.RandomAccessDataSource):
    """The rows of Parquet files; item i is `{"path", "line": row (1-based), "row": {column: value}}`.

    A row group that cannot be read gives `{"path", "line", "error"}` instead, which becomes an invalid
    record. `cache_row_groups` decoded row groups are kept (least recently used first out). `columns`
    (a `data.columns` mapping) is checked against every file's schema at once.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        columns: Mapping[str, str] | None = None,
        cache_row_groups: int = 4,
    ):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise InputError("no Parquet files given")
        self._paths = [os.path.abspath(os.fspath(p)) for p in paths]
        self._cache_size = max(1, cache_row_groups)
        group_rows: list[np.ndarray] = []
        for path in self._paths:
            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, pa.ArrowException) as err:
                raise InputError(f"{path}: not a readable Parquet file ({err})") from err
            if meta.num_rows == 0:
                raise InputError(f"{path}: no records (a Parquet file without rows)")
            names = set(meta.schema.to_arrow_schema().names)
            missing = [f"{s!r} (as {n!r})" for n, s in (columns or {}).items() if s not in names]
            if missing:
                raise InputError(
                    f"{path}: no column {', '.join(missing)} given by data.columns; it has {sorted(names)}"
                )
            group_rows.append(np.asarray([meta.row_group(i).num_rows for i in range(meta.num_row_groups)]))
        # Global row index -> file by the cumulative row counts; row -> row group within the file likewise.
        self._file_start = np.concatenate([[0], np.cumsum([g.sum() for g in group_rows])]).astype(np.int64)
        self._group_start = [np.concatenate([[0], np.cumsum(g)]).astype(np.int64) for g in group_rows]
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()  # grain reads with several threads; a ParquetFile is not thread-safe
        self._files: dict[int, pq.ParquetFile] = {}
        self._cache: collections.OrderedDict[tuple[int, int], pa.Table] = collections.OrderedDict()

    def __getstate__(self):  # to grain worker processes: metadata only, files reopened there
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_files", "_cache")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def __len__(self) -> int:
        return int(self._file_start[-1])

    def _row_group(self, f: int, g: int) -> pa.Table:
        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if f not in self._files:
            self._files[f] = pq.ParquetFile(self._paths[f])
        table = self._files[f].read_row_group(g)
        self._cache[key] = table
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return table

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        f = int(np.searchsorted(self._file_start, index, side="right")) - 1
        row = index - int(self._file_start[f])
        g = int(np.searchsorted(self._group_start[f], row, side="right")) - 1
        element: dict[str, Any] = {"path": self._paths[f], "line": row + 1}
        try:
            with self._lock:
                table = self._row_group(f, g)
            element["row"] = table.slice(row - int(self._group_start[f][g]), 1).to_pylist()[0]
        except (OSError, pa.ArrowException) as err:
            element["error"] = f"cannot read row group {g} of the Parquet file: {err}"
        return element

    def __repr__(self) -> str:
        return f"ParquetSource({len(self)} rows in {len(self._paths)} files)"


# ---------------------------------------------------------------------------------------------- rows
def _is_image_struct(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) <= {"bytes", "path"} and bool(value)


def _image(value: Any, base_dir: str, what: str) -> Any:
    """An image struct -> its bytes, else its path (relative to the Parquet file); other values as they are."""
    if not _is_image_struct(value):
        return value
    if value.get("bytes") is not None:
        return bytes(value["bytes"])
    if value.get("path") is not None:
        return resolve(str(value["path"]), base_dir)
    raise ValueError(f"{what}: an image struct with neither bytes nor a path")


def _video(value: Any, what: str) -> Any:
    if not _is_image_struct(value):
        return value
    if value.get("path") is not None:
        return str(value["path"])
    raise ValueError(f"{what}: video bytes in Parquet are not supported; store the video's path")


def _without_nulls(value: Any) -> Any:
    """Struct fields a row does not have (`None`) dropped, in messages and their content blocks."""
    if isinstance(value, Mapping):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def normalize_row(row: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
    """A Parquet row -> a JSON-like record (module docstring); `ValueError` for an unusable image struct."""
    out = {k: v for k, v in row.items() if not (k in _FORMAT_KEYS and v is None)}
    for key in _MESSAGE_KEYS:
        if isinstance(out.get(key), list):
            out[key] = _without_nulls(out[key])
            blocks = [
                b
                for m in out[key]
                if isinstance(m, Mapping) and isinstance(m.get("content"), list)
                for b in m["content"]
                if isinstance(b, dict)
            ]
            for block in blocks:
                if "image" in block:
                    block["image"] = _image(block["image"], base_dir, f"'{key}' image block")
                if "video" in block:
                    block["video"] = _video(block["video"], f"'{key}' video block")
    for key in ("image", "images"):
        if isinstance(out.get(key), list):
            out[key] = [_image(v, base_dir, f"'{key}'") for v in out[key]]
        elif key in out:
            out[key] = _image(out[key], base_dir, f"'{key}'")
    if isinstance(out.get("videos"), list):
        out["videos"] = [_video(v, "'videos'") for v in out["videos"]]
    if "video" in out:
        out["video"] = _video(out["video"], "'video'")
    return out


def parse_row(element: Mapping[str, Any], *, columns: Mapping[str, str] | None = None) -> Record:
    """A `ParquetSource` item -> a record, as `records.parse_line` makes one of a JSONL line."""
    path, line = element["path"], element["line"]
    location = f"{path}:{line}"
    if "error" in element:
        raise BadRecord("invalid", location, location, element["error"])
    row, base_dir = element["row"], os.path.dirname(path)
    record_id = str(row["id"]) if row.get("id") is not None else location
    try:
        obj = normalize_row(rename_columns(row, columns), base_dir)
    except ValueError as err:
        raise BadRecord("invalid", record_id, location, str(err)) from None
    return record_from_obj(obj, location=location, base_dir=base_dir)
