"""HF safetensors <-> native parameters: a torch-free safetensors reader/writer and the declarative key map.

Host side only (numpy + ml_dtypes + json); this module never imports jax or torch.

Layouts (spec 5.1):
- On disk (the Hub and `save_pretrained` in transformers 5.24): `visual.*`, `model.*` (text), `lm_head.weight`.
  A tied checkpoint (3B) has no `lm_head.weight`.
- In memory, transformers 5 renames `visual.` -> `model.visual.` and `model.` -> `model.language_model.`;
  some saved checkpoints carry those names, so the reader accepts both and the writer emits the on-disk form.
- Ours: a flat dict keyed by '/'-joined paths of the Flax parameter tree. Per-layer tensors are stacked on a
  leading layer axis and kernels are 2-D (in, out), so every HF linear weight (out, in) is transposed.

Memory: `iter_hf_tensors` yields zero-copy views into memory-mapped files, one tensor at a time, and
`hf_to_params` copies each into its final place (stacked parameters are preallocated once), so converting
needs about one host copy of the model. `params_to_hf` returns views; the writer materialises one tensor at
a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.safetensors_io import (  # noqa: F401  (re-exported: weights.py is the public entry)
    _ST_NAMES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SafetensorsFile,
    TensorInfo,
    as_dtype,
    checkpoint_files,
    dtype_name,
    hf_tensor_infos,
    iter_hf_tensors,
    load_safetensors,
    read_safetensors_header,
    save_safetensors,
)

# ------------------------------------------------------------------------------------------- errors


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the config. Lists every offending key, grouped by kind."""

    def __init__(
        self,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        wrong_shape: Mapping[str, tuple[Any, Any]] | None = None,
        wrong_dtype: Mapping[str, tuple[Any, Any]] | None = None,
        other: Iterable[str] = (),
        source: str = "checkpoint",
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.wrong_shape = dict(sorted((wrong_shape or {}).items()))
        self.wrong_dtype = dict(sorted((wrong_dtype or {}).items()))
        self.other = list(other)
        lines = [f"{source} does not match the config:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}):")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}):")
            lines += [f"    {k}" for k in self.unexpected]
        if self.wrong_shape:
            lines.append(f"  wrong shape ({len(self.wrong_shape)}):")
            lines += [
                f"    {k}: expected {tuple(e)}, got {tuple(g)}" for k, (e, g) in self.wrong_shape.items()
            ]
        if self.wrong_dtype:
            lines.append(f"  wrong dtype ({len(self.wrong_dtype)}):")
            lines += [f"    {k}: expected {e}, got {g}" for k, (e, g) in self.wrong_dtype.items()]
        lines += [f"  {msg}" for msg in self.other]
        super().__init__("\n".join(lines))


def _expect_shape(name: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise CheckpointMismatchError(wrong_shape={name: (tuple(expected), tuple(got))}, source=name)


# ------------------------------------------------------------------------------------------- key map

IDENTITY, LINEAR, PATCH = "identity", "linear", "patch"
LM_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"
# A reward model's scalar head (`model.value_head`): ours `score/kernel (hidden, num_labels)`, HF
# `score.weight (num_labels, hidden)` of a sequence classifier (`GenericForSequenceClassification`).
SCORE, SCORE_PATH = "score.weight", "score/kernel"
SEQ_CLS_ARCHITECTURE = "Qwen2_5_VLForSequenceClassification"


def seq_cls_key(key: str) -> str:
    """On-disk key -> that of a Qwen2.5-VL sequence classifier's `save_pretrained`: its backbone is
    `Qwen2_5_VLModel` under `model.`, which no conversion mapping renames, so its files carry the
    transformers-5 names (`model.language_model.*`, `model.visual.*`) beside `score.weight`."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: our path, its HF on-disk key (with `{i}` when stacked), the HF shape per layer,
    and the transform. `layers` > 0 means our array is the HF tensors stacked on a leading axis."""

    path: str
    hf: str
    hf_shape: tuple[int, ...]
    transform: str
    layers: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """Our shape per layer (without the stacked axis)."""
        if self.transform == IDENTITY:
            return self.hf_shape
        if self.transform == LINEAR:  # torch Linear (out, in) -> kernel (in, out)
            return self.hf_shape[::-1]
        if self.transform == PATCH:  # Conv3d (D, C, T, ph, pw) -> (C*T*ph*pw, D), flatten order C,T,kh,kw
            return (int(np.prod(self.hf_shape[1:])), self.hf_shape[0])
        raise AssertionError(self.transform)

    @property
    def full_shape(self) -> tuple[int, ...]:
        return ((self.layers,) if self.layers else ()) + self.shape

    def hf_keys(self) -> list[str]:
        return [self.hf.format(i=i) for i in range(self.layers)] if self.layers else [self.hf]

    def to_ours(self, key: str, x: np.ndarray) -> np.ndarray:
        """HF tensor -> our layout (a view), after asserting the HF shape."""
        _expect_shape(key, x.shape, self.hf_shape)
        if self.transform == IDENTITY:
            return x
        if self.transform == LINEAR:
            return x.T
        return x.reshape(self.hf_shape[0], -1).T

    def to_hf(self, name: str, x: np.ndarray) -> np.ndarray:
        """Our per-layer array -> HF layout (a view where possible), after asserting our shape."""
        _expect_shape(name, x.shape, self.shape)
        if self.transform == IDENTITY:
            return x
        if self.transform == LINEAR:
            return x.T
        return x.T.reshape(self.hf_shape)


def key_map(config: Qwen25VLConfig) -> tuple[Entry, ...]:
    """The full table for `config` (spec 5.1); lm_head is absent when the embeddings are tied."""
    v, t = config.vision, config.text
    dv, iv, lv = v.hidden_size, v.intermediate_size, v.depth
    dm = dv * v.spatial_merge_size**2  # merger width: U = m^2 patches concatenated
    h, i, lt, vocab = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
    q_out, kv_out = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    patch = (dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    vb, tl = "visual.blocks.{i}.", "model.layers.{i}."
    table = [
        Entry("visual/patch_embed/kernel", "visual.patch_embed.proj.weight", patch, PATCH),
        Entry("visual/blocks/norm1/scale", vb + "norm1.weight", (dv,), IDENTITY, lv),
        Entry("visual/blocks/norm2/scale", vb + "norm2.weight", (dv,), IDENTITY, lv),
        Entry("visual/blocks/attn/qkv/kernel", vb + "attn.qkv.weight", (3 * dv, dv), LINEAR, lv),
        Entry("visual/blocks/attn/qkv/bias", vb + "attn.qkv.bias", (3 * dv,), IDENTITY, lv),
        Entry("visual/blocks/attn/proj/kernel", vb + "attn.proj.weight", (dv, dv), LINEAR, lv),
        Entry("visual/blocks/attn/proj/bias", vb + "attn.proj.bias", (dv,), IDENTITY, lv),
        Entry("visual/blocks/mlp/gate_proj/kernel", vb + "mlp.gate_proj.weight", (iv, dv), LINEAR, lv),
        Entry("visual/blocks/mlp/gate_proj/bias", vb + "mlp.gate_proj.bias", (iv,), IDENTITY, lv),
        Entry("visual/blocks/mlp/up_proj/kernel", vb + "mlp.up_proj.weight", (iv, dv), LINEAR, lv),
        Entry("visual/blocks/mlp/up_proj/bias", vb + "mlp.up_proj.bias", (iv,), IDENTITY, lv),
        Entry("visual/blocks/mlp/down_proj/kernel", vb + "mlp.down_proj.weight", (dv, iv), LINEAR, lv),
        Entry("visual/blocks/mlp/down_proj/bias", vb + "mlp.down_proj.bias", (dv,), IDENTITY, lv),
        Entry("visual/merger/ln_q/scale", "visual.merger.ln_q.weight", (dv,), IDENTITY),
        Entry("visual/merger/fc1/kernel", "visual.merger.mlp.0.weight", (dm, dm), LINEAR),
        Entry("visual/merger/fc1/bias", "visual.merger.mlp.0.bias", (dm,), IDENTITY),
        Entry("visual/merger/fc2/kernel", "visual.merger.mlp.2.weight", (v.out_hidden_size, dm), LINEAR),
        Entry("visual/merger/fc2/bias", "visual.merger.mlp.2.bias", (v.out_hidden_size,), IDENTITY),
        Entry("text/embed_tokens/embedding", "model.embed_tokens.weight", (vocab, h), IDENTITY),
        Entry("text/layers/input_layernorm/scale", tl + "input_layernorm.weight", (h,), IDENTITY, lt),
        Entry("text/layers/post_attention_layernorm/scale", tl + "post_attention_layernorm.weight", (h,), IDENTITY, lt),
        Entry("text/layers/self_attn/q_proj/kernel", tl + "self_attn.q_proj.weight", (q_out, h), LINEAR, lt),
        Entry("text/layers/self_attn/q_proj/bias", tl + "self_attn.q_proj.bias", (q_out,), IDENTITY, lt),
        Entry("text/layers/self_attn/k_proj/kernel", tl + "self_attn.k_proj.weight", (kv_out, h), LINEAR, lt),
        Entry("text/layers/self_attn/k_proj/bias", tl + "self_attn.k_proj.bias", (kv_out,), IDENTITY, lt),
        Entry("text/layers/self_attn/v_proj/kernel", tl + "self_attn.v_proj.weight", (kv_out, h), LINEAR, lt),
        Entry("text/layers/self_attn/v_proj/bias", tl + "self_attn.v_proj.bias", (kv_out,), IDENTITY, lt),
        Entry("text/layers/self_attn/o_proj/kernel", tl + "self_attn.o_proj.weight", (h, q_out), LINEAR, lt),
        Entry("text/layers/mlp/gate_proj/kernel", tl + "mlp.gate_proj.weight", (i, h), LINEAR, lt),
        Entry("text/layers/mlp/up_proj/kernel", tl + "mlp.up_proj.weight", (i, h), LINEAR, lt),
        Entry("text/layers/mlp/down_proj/kernel", tl + "mlp.down_proj.weight", (h, i), LINEAR, lt),
        Entry("text/norm/scale", "model.norm.weight", (h,), IDENTITY),
    ]  # fmt: skip
    if not t.tie_word_embeddings:
        table.append(Entry("lm_head/kernel", LM_HEAD, (vocab, h), LINEAR))
    return tuple(table)


def param_shapes(config: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
    """Our flat path -> full shape (with the stacked layer axis)."""
    return {e.path: e.full_shape for e in key_map(config)}


def normalize_hf_key(key: str) -> str:
    """transformers-5 in-memory names -> the on-disk layout (inverse of its `conversion_mapping`)."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def _hf_index(config: Qwen25VLConfig) -> dict[str, tuple[Entry, int]]:
    index = {}
    for entry in key_map(config):
        for layer, key in enumerate(entry.hf_keys()):
            index[key] = (entry, layer)
    return index


def check_hf_infos(
    infos: Mapping[str, TensorInfo], config: Qwen25VLConfig, source: str = "checkpoint"
) -> None:
    """Validate keys and shapes from headers alone, before any data is read."""
    index = _hf_index(config)
    seen: dict[str, str] = {}
    unexpected, wrong_shape, other = [], {}, []
    for raw_key, info in infos.items():
        key = normalize_hf_key(raw_key)
        if key in seen:
            other.append(f"{raw_key!r} and {seen[key]!r} are the same tensor under two naming schemes")
            continue
        seen[key] = raw_key
        if key == LM_HEAD and config.text.tie_word_embeddings:
            expected = (config.text.vocab_size, config.text.hidden_size)
            if info.shape != expected:
                wrong_shape[raw_key] = (expected, info.shape)
            continue
        if key not in index:
            unexpected.append(raw_key)
        elif info.shape != index[key][0].hf_shape:
            wrong_shape[raw_key] = (index[key][0].hf_shape, info.shape)
    missing = [k for k in index if k not in seen]
    if missing or unexpected or wrong_shape or other:
        raise CheckpointMismatchError(missing=missing, unexpected=unexpected, wrong_shape=wrong_shape,
                                      other=other, source=source)  # fmt: skip


class _Progress:
    """A counter on stderr: one rewritten line on a terminal, a line per 10% otherwise.
    `enabled=None` means only when stderr is a terminal."""

    def __init__(self, total: int, label: str, enabled: bool | None):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.tty = sys.stderr.isatty()
        self.enabled = self.tty if enabled is None else enabled

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            end = "\n" if self.done >= self.total else ""
            sys.stderr.write(f"\r\033[K{self.label} {self.done}/{self.total} {what}{end}")
        elif self.done * 10 // self.total != (self.done - 1) * 10 // self.total:
            sys.stderr.write(f"{self.label} {self.done}/{self.total} {what}\n")
        sys.stderr.flush()


def hf_to_params(
    source: str | Path | Iterable[tuple[str, np.ndarray]],
    config: Qwen25VLConfig,
    *,
    dtype: Any = None,
    progress: bool | None = False,
) -> dict[str, np.ndarray]:
    """HF tensors (a checkpoint dir, or an iterable of (key, array)) -> flat params keyed by our paths.

    `dtype=None` keeps the checkpoint's dtype; otherwise every tensor is cast (bf16 rounding is
    round-to-nearest-even, as torch's `.to(torch.bfloat16)`). A checkpoint that does not match `config`
    raises `CheckpointMismatchError` listing every missing, unexpected and mis-shaped key.
    """
    target = as_dtype(dtype)
    index = _hf_index(config)
    label = "checkpoint"
    if isinstance(source, (str, os.PathLike)):
        label = str(source)
        infos = hf_tensor_infos(source)
        check_hf_infos(infos, config, source=label)  # fail before reading any data
        tensors: Iterable[tuple[str, np.ndarray]] = iter_hf_tensors(source)
        total = len(infos)
    else:
        tensors, total = source, len(index)
    meter = _Progress(total, "reading", progress)

    params: dict[str, np.ndarray] = {}
    seen: dict[str, str] = {}
    unexpected, wrong_shape, wrong_dtype, other = [], {}, {}, []
    tied_head = embed_raw = None
    for raw_key, x in tensors:
        key = normalize_hf_key(raw_key)
        meter.step(raw_key)
        if key in seen:
            other.append(f"{raw_key!r} and {seen[key]!r} are the same tensor under two naming schemes")
            continue
        seen[key] = raw_key
        if key == LM_HEAD and config.text.tie_word_embeddings:
            tied_head = (raw_key, x)
            continue
        if key not in index:
            unexpected.append(raw_key)
            continue
        entry, layer = index[key]
        if x.shape != entry.hf_shape:
            wrong_shape[raw_key] = (entry.hf_shape, x.shape)
            continue
        if key == EMBED:
            embed_raw = x
        y = entry.to_ours(raw_key, x)
        if not entry.layers:
            params[entry.path] = np.array(y, dtype=target or y.dtype, order="C")
            continue
        buf = params.get(entry.path)
        if buf is None:  # one preallocated array per stacked parameter: no list + np.stack copy
            buf = params[entry.path] = np.empty(entry.full_shape, dtype=target or y.dtype)
        elif target is None and y.dtype != buf.dtype:
            wrong_dtype[raw_key] = (buf.dtype.name, y.dtype.name)
            continue
        buf[layer] = y
    missing = [k for k in index if k not in seen]
    if tied_head is not None and embed_raw is not None:
        # transformers 5.24 (`PreTrainedModel.tie_weights` during from_pretrained): when a tied config's
        # checkpoint holds both tensors, it ties them only if they are equal; otherwise it warns and leaves
        # them UNTIED, i.e. silently runs an untied model under a tied config. We have no untied head under
        # a tied config, so an equal copy is dropped and a different one is an error.
        raw_key, head = tied_head
        expected = (config.text.vocab_size, config.text.hidden_size)
        if head.shape != expected:
            wrong_shape[raw_key] = (expected, head.shape)
        elif not np.array_equal(head, embed_raw):
            other.append(f"{raw_key!r} differs from the embedding under tie_word_embeddings=True; "
                         "set tie_word_embeddings=false in config.json if the head is really untied")  # fmt: skip
    if missing or unexpected or wrong_shape or wrong_dtype or other:
        raise CheckpointMismatchError(missing=missing, unexpected=unexpected, wrong_shape=wrong_shape,
                                      wrong_dtype=wrong_dtype, other=other, source=label)  # fmt: skip
    return {e.path: params[e.path] for e in key_map(config)}


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping (dict, nnx.State, ...) -> flat dict of '/'-joined paths. Flat input passes through."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, path + "/"))
        else:
            # nnx.Variable leaves (of an `nnx.State`) hold their array behind `get_value()`.
            get_value = getattr(value, "get_value", None)
            flat[path] = get_value() if callable(get_value) else value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat '/'-joined paths -> nested dicts."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def check_params(params: Mapping[str, Any], config: Qwen25VLConfig, source: str = "params") -> None:
    """Our side of the contract: exactly the paths and shapes of `param_shapes(config)`."""
    shapes = param_shapes(config)
    missing = [p for p in shapes if p not in params]
    unexpected = [p for p in params if p not in shapes]
    wrong = {p: (shapes[p], tuple(params[p].shape)) for p in shapes
             if p in params and tuple(params[p].shape) != shapes[p]}  # fmt: skip
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(
            missing=missing, unexpected=unexpected, wrong_shape=wrong, source=source
        )


def params_to_hf(params: Mapping[str, Any], config: Qwen25VLConfig) -> dict[str, np.ndarray]:
    """Flat (or nested) params -> HF on-disk keys and layouts, sorted by key; lm_head omitted when tied.

    With a reward head (`score/kernel`), the keys are those of a sequence classifier (`seq_cls_key`)
    plus `score.weight`. Values are views of `params` where the layout allows (no copy of the model).
    """
    flat = flatten_params(params)
    flat = {k: np.asarray(v) for k, v in flat.items()}
    score = flat.pop(SCORE_PATH, None)
    check_params(flat, config)
    out: dict[str, np.ndarray] = {}
    for entry in key_map(config):
        x = flat[entry.path]
        if entry.layers:
            for layer, key in enumerate(entry.hf_keys()):
                out[key] = entry.to_hf(f"{entry.path}[{layer}]", x[layer])
        else:
            out[entry.hf] = entry.to_hf(entry.path, x)
    if score is not None:
        hidden = config.text.hidden_size
        if score.ndim != 2 or score.shape[0] != hidden:
            raise CheckpointMismatchError(
                wrong_shape={SCORE_PATH: ((hidden, "num_labels"), tuple(score.shape))}, source="params"
            )
        out = {seq_cls_key(k): v for k, v in out.items()}
        out[SCORE] = score.T
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------- writing


# ------------------------------------------------------------------------------------------- writing


def _shard(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy, in key order, as transformers does; a tensor larger than the limit gets its own shard."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


# Files of an HF checkpoint dir that are not weights: tokenizer, processor, templates, generation config.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def copy_hf_assets(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the non-weight top-level files (tokenizer, processor, chat template, generation config, README)
    of an HF dir; `config.json` and weight files/indexes are left out (they are always rewritten)."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if (not p.is_file() or p.name.startswith(".") or p.name == "config.json"
                or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json")):  # fmt: skip
            continue
        shutil.copy2(p, Path(dst) / p.name)
        copied.append(p.name)
    return copied


@contextlib.contextmanager
def atomic_directory(
    target: str | Path, *, overwrite: bool = False, replaces: Iterable[str] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; its entries are published in `target` only if the
    block finishes.

    An exception removes the temporary dir; a hard crash leaves only a `.NAME.tmp-*` sibling, never a
    partial `target`. A new (or empty) `target` appears by one rename, atomic on POSIX. An existing
    non-empty `target` is refused (`FileExistsError`) unless `overwrite`, which replaces only what this
    write owns, keeping every other file: the entries the block wrote, and existing entries that match a
    glob pattern of `replaces` (outputs of an earlier write that this one supersedes, such as shards of
    another count). A file is replaced by one rename; a directory is first moved aside; stale entries
    go first and `config.json` last. The old entries wait in a `.NAME.old-*` sibling until the end.
    """
    target = Path(target).expanduser().absolute()
    if target.is_symlink():  # publish into the linked dir, not over the link
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists() or not any(target.iterdir()):
        os.rename(tmp, target)  # rename(2) replaces an empty directory
        return
    _publish_entries(tmp, target, replaces)


def _publish_entries(tmp: Path, target: Path, replaces: Iterable[str]) -> None:
    """Move the entries of `tmp` into `target` (see `atomic_directory`), then remove `tmp`."""
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    new = sorted(tmp.iterdir(), key=lambda p: (p.name == "config.json", p.name))
    names = {p.name for p in new}
    stale = {p.name for pattern in replaces for p in target.glob(pattern)} - names
    for name in sorted(stale):
        os.rename(target / name, trash / name)
    for entry in new:
        dest = target / entry.name
        if entry.is_dir() or (dest.is_dir() and not dest.is_symlink()):
            if os.path.lexists(dest):
                os.rename(dest, trash / entry.name)
            os.rename(entry, dest)
        else:
            os.replace(entry, dest)
    os.rmdir(tmp)
    shutil.rmtree(trash, ignore_errors=True)


def write_hf_checkpoint(
    params: Mapping[str, Any],
    config: Qwen25VLConfig,
    out_dir: str | Path,
    *,
    dtype: Any = "bfloat16",
    max_shard_bytes: int = 5 * 2**30,
    assets_from: str | Path | None = None,
    overwrite: bool = False,
    progress: bool | None = False,
    pad_token_id: int | None = None,
) -> Path:
    """Write an HF checkpoint dir that `transformers` loads: safetensors in the on-disk layout (sharded with
    `model.safetensors.index.json` above `max_shard_bytes`), `config.json`, and the tokenizer/processor
    files of `assets_from`. `dtype=None` keeps each parameter's dtype. Nothing is written on a mismatch,
    and the dir appears atomically.

    Params with a reward head (`score/kernel`) are written as a sequence classifier: `score.weight`, the
    config's architecture `Qwen2_5_VLForSequenceClassification`, its labels, and `pad_token_id` (the
    classifier reads each row at its last non-pad token, so transformers needs it for batches)."""
    hf = params_to_hf(params, config)  # validates before anything touches the disk
    target = as_dtype(dtype)
    out_dtype = {k: target or v.dtype for k, v in hf.items()}
    sizes = {k: int(np.prod(v.shape, dtype=np.int64)) * out_dtype[k].itemsize for k, v in hf.items()}
    shards = _shard(sizes, max_shard_bytes)
    meter = _Progress(len(hf), "writing", progress)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        weight_map = {}
        for n, keys in enumerate(shards, 1):
            name = (
                SAFE_WEIGHTS_NAME if len(shards) == 1 else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            )
            # The cast happens per tensor inside the writer, so at most one cast copy is alive.
            save_safetensors({k: _LazyCast(hf[k], out_dtype[k]) for k in keys}, tmp / name,
                             metadata={"format": "pt"}, on_tensor=meter.step)  # fmt: skip
            weight_map.update(dict.fromkeys(keys, name))
        if len(shards) > 1:
            index = {"metadata": {"total_parameters": sum(int(np.prod(v.shape, dtype=np.int64)) for v in hf.values()),
                                  "total_size": sum(sizes.values())},
                     "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
            (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if assets_from is not None:
            copy_hf_assets(assets_from, tmp)
        path = write_config_json(config, tmp, dtype=_single_dtype(out_dtype.values()))
        if SCORE in hf:
            _as_sequence_classifier(path, num_labels=hf[SCORE].shape[0], pad_token_id=pad_token_id)
    return Path(out_dir)


PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


def write_peft_adapter(
    lora_params: Mapping[str, Mapping[str, Any]],
    lora_cfg: Any,
    config: Qwen25VLConfig,
    out_dir: str | Path,
    *,
    base_model: str,
    overwrite: bool = False,
) -> Path:
    """Write LoRA adapters (`train.lora`: `{"<kernel path>": {"a": A (..., in, r), "b": B (..., r, out)}}`)
    as PEFT saves them, so that `peft.PeftModel.from_pretrained(<the HF base>, out_dir)` applies them:
    `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight (r, in)` and `lora_B.weight
    (out, r)` per layer, under transformers-5 module names (`model.language_model.layers.{i}...`), and
    `adapter_config.json` (rank, alpha, dropout, and `target_modules` as a regex naming exactly the
    adapted modules, so the vision tower's same-named projections are left alone). float32, as trained.

    The adapters act on whatever base PEFT loads: the original bf16 weights, or the same weights in
    4-bit (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True)`), which is the base a QLoRA run trained against."""
    import re

    entries = {e.path: e for e in key_map(config)}
    tensors: dict[str, np.ndarray] = {}
    patterns = []
    for path, ab in sorted(lora_params.items()):
        entry = entries.get(path)
        if entry is None or entry.transform != LINEAR:
            raise ValueError(f"LoRA adapter {path!r} is not a Linear weight of {config.__class__.__name__}")
        module = seq_cls_key(entry.hf).removesuffix(".weight")  # transformers-5 in-memory module name
        patterns.append(re.escape(module).replace(re.escape("{i}"), r"\d+"))
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        names = [module.format(i=i) for i in range(entry.layers)] if entry.layers else [module]
        a, b = (a, b) if entry.layers else (a[None], b[None])
        for i, name in enumerate(names):
            tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": int(lora_cfg.rank),
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": "(?:" + "|".join(patterns) + ")",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_safetensors(dict(sorted(tensors.items())), tmp / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return Path(out_dir)


def _as_sequence_classifier(path: Path, *, num_labels: int, pad_token_id: int | None) -> None:
    hf = json.loads(path.read_text(encoding="utf-8"))
    hf["architectures"] = [SEQ_CLS_ARCHITECTURE]
    hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    hf["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    if pad_token_id is not None:
        hf["pad_token_id"] = hf["text_config"]["pad_token_id"] = int(pad_token_id)
    path.write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")


def _single_dtype(dtypes: Iterable[np.dtype]) -> str | None:
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 else None


def write_config_json(config: Qwen25VLConfig, directory: str | Path, *, dtype: str | None = None) -> Path:
    """`config.save_pretrained`, plus transformers' `dtype` field (the storage dtype) when known."""
    path = config.save_pretrained(directory)
    if dtype is not None:
        hf = json.loads(path.read_text(encoding="utf-8"))
        hf["dtype"] = dtype_name(as_dtype(dtype))
        path.write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    return path


def read_config_dtype(directory: str | Path) -> np.dtype | None:
    """The `dtype` (or legacy `torch_dtype`) field of a `config.json`, if any."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    hf = json.loads(path.read_text(encoding="utf-8"))
    name = hf.get("dtype") or hf.get("torch_dtype") or (hf.get("text_config") or {}).get("dtype")
    if not isinstance(name, str) or name == "auto":
        return None
    return as_dtype(name)


class _LazyCast:
    """An array-like whose dtype/shape are known up front and whose data is cast only when materialised."""

    def __init__(self, x: np.ndarray, dtype: np.dtype):
        self.x, self.dtype, self.shape = x, np.dtype(dtype), tuple(x.shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.x, dtype=self.dtype)
