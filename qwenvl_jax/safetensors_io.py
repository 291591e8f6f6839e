"""Safetensors files without torch: the header, zero-copy memory-mapped reads, and byte-exact writes.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets per tensor,
optional `__metadata__`), then the raw tensor bytes. bfloat16 and the float8 types come from ml_dtypes.
The writer reproduces the safetensors Rust writer's header, tensor order and padding byte for byte, so a
checkpoint written here is the file `save_pretrained` would have written. numpy + ml_dtypes + json only.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked: a missing, truncated or corrupt file, or an
    output dir that overlaps its source. The message names the file or dir (one line per problem).

    (A checkpoint that is readable but does not match its config is `weights.CheckpointMismatchError`.)
    """


# ------------------------------------------------------------------------------------------- dtypes

# safetensors dtype names <-> numpy dtypes (little endian, as the format requires).
_ST_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _ST_DTYPES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)
_ST_NAMES: dict[np.dtype, str] = {v: k for k, v in _ST_DTYPES.items()}

# The order of the `Dtype` enum in the safetensors Rust crate. Its writer lays tensors out by dtype
# (descending in this order), then by name; we do the same so that our files are byte-identical to
# the ones transformers writes.
_ST_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
             "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]  # fmt: skip

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                  "float": "float32", "fp64": "float64", "double": "float64"}  # fmt: skip


def as_dtype(dtype: Any) -> np.dtype | None:
    """`None`, a numpy/ml_dtypes dtype, or a name ('bfloat16', 'bf16', 'float32', 'torch.bfloat16', ...)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        name = _DTYPE_ALIASES.get(name, name)
        if name == "bfloat16":
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(name)
    return np.dtype(dtype)


def dtype_name(dtype: Any) -> str:
    """The transformers `config.json` spelling of a dtype ('bfloat16', 'float32', ...)."""
    return np.dtype(dtype).name


# ------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the 8-byte little-endian header length and the JSON header; validate offsets against the file.

    A missing, truncated or garbled file raises `CheckpointError` naming it.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header length {n} in a file of {size} bytes)"
                )
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos = {}
    for key, raw in header.items():
        try:
            name, shape = raw["dtype"], tuple(int(s) for s in raw["shape"])
            begin, end = (int(o) for o in raw["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: corrupt safetensors header entry {key!r}: {repr(raw)[:200]}"
            ) from None
        if name not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {name}, which numpy cannot represent")
        dtype = _ST_DTYPES[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or base + end > size:
            raise CheckpointError(f"{path}: truncated or corrupt: tensor {key!r} has offsets {begin}..{end} "
                                  f"for {nbytes} bytes in a file of {size} bytes")  # fmt: skip
        infos[key] = TensorInfo(dtype, shape, base + begin, base + end)
    return infos, metadata


class SafetensorsFile:
    """A memory-mapped safetensors file; `get(key)` is a zero-copy, read-only numpy view."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors, self.metadata = read_safetensors_header(self.path)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if self.path.stat().st_size else None

    def keys(self) -> list[str]:
        """Keys in file (offset) order, so that a sequential scan reads the file front to back."""
        return sorted(self.tensors, key=lambda k: self.tensors[k].start)

    def get(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        if info.start == info.end:
            return np.zeros(info.shape, info.dtype)
        return self._mmap[info.start : info.end].view(info.dtype).reshape(info.shape)


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one file, copied out of the memory map (for small files and tests)."""
    f = SafetensorsFile(path)
    return {k: np.array(f.get(k)) for k in f.keys()}


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def checkpoint_files(directory: str | Path) -> dict[Path, list[str] | None]:
    """The safetensors files of an HF checkpoint dir, each with its keys per the index (None: all keys).

    Like transformers, a single `model.safetensors` wins over a sharded index.
    """
    directory = Path(directory)
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return {single: None}
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files: dict[Path, list[str]] = {}
            for key, name in weight_map.items():
                files.setdefault(directory / name, []).append(key)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: corrupt index ({type(err).__name__}: {err})") from None
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that are missing: {', '.join(missing)}")
        return dict(sorted(files.items()))
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    has_bin = any(n.endswith(".bin") for n in present)
    hint = " (PyTorch .bin checkpoints are not supported; re-save with safetensors)" if has_bin else ""
    raise FileNotFoundError(
        f"{directory}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}; found {present}"
    )


def hf_tensor_infos(directory: str | Path) -> dict[str, TensorInfo]:
    """Headers only: key -> dtype/shape for every tensor of a (possibly sharded) checkpoint dir."""
    infos: dict[str, TensorInfo] = {}
    for path, keys in checkpoint_files(directory).items():
        header, _ = read_safetensors_header(path)
        for key in header if keys is None else keys:
            if key not in header:
                raise CheckpointError(f"{path}: the index maps {key!r} to this file, but the file lacks it")
            if key in infos:
                raise CheckpointError(f"{directory}: tensor {key!r} appears in more than one shard")
            infos[key] = header[key]
    return infos


def iter_hf_tensors(directory: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) one tensor at a time, as read-only views into memory-mapped shards."""
    for path, keys in checkpoint_files(directory).items():
        f = SafetensorsFile(path)
        wanted = set(f.keys() if keys is None else keys)
        for key in f.keys():
            if key in wanted:
                yield key, f.get(key)
        del f


# ------------------------------------------------------------------------------------------- writing


def _layout(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """The safetensors Rust writer's order: dtype descending (enum order), then name."""
    return sorted(tensors, key=lambda k: (-_ST_ORDER.index(_ST_NAMES[tensors[k].dtype]), k))


def _header(tensors: Mapping[str, np.ndarray], order: list[str], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key in order:
        x = tensors[key]
        if x.dtype not in _ST_NAMES:
            raise ValueError(f"{key}: dtype {x.dtype} has no safetensors name")
        header[key] = {
            "dtype": _ST_NAMES[x.dtype],
            "shape": list(x.shape),
            "data_offsets": [offset, offset + x.nbytes],
        }
        offset += x.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the Rust writer pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    on_tensor=None,
) -> None:
    """Write one safetensors file in exactly the format the Rust writer produces (header, order, padding),
    materialising one tensor at a time."""
    order = _layout(tensors)
    with open(path, "wb") as f:
        f.write(_header(tensors, order, metadata))
        for key in order:
            x = np.ascontiguousarray(tensors[key])
            if x.dtype.byteorder == ">":  # pragma: no cover - big-endian hosts
                x = x.astype(x.dtype.newbyteorder("<"))
            f.write(memoryview(x.reshape(-1).view(np.uint8)))
            if on_tensor is not None:
                on_tensor(key)
