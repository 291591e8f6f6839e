"""Collate examples into fixed-shape numpy batches: the only shapes device code ever sees.

A jitted step compiles once per distinct input shape, so every size-dependent quantity is padded to a
small set of static sizes chosen ahead of time:

- text length: the smallest bucket of `BatchSpec.seq_buckets` that holds the longest example;
- rows: always `batch_size` (missing examples are all-padding rows with `example_mask` 0);
- image and video patches: a fixed patch budget per batch (`image_patches`, `video_patches`), with the
  vision indices (window permutation and inverse, rotary ids, segment ids) padded by the convention of
  `positions.VisionIndices`;
- placeholder scatter indices: one slot per merged unit of the budget (rows that share images: a fixed
  count, see `collate`); unused slots hold `s_idx == seq_len`, out of range, so
  `x.at[b, s].set(v, mode="drop")` ignores them.

Padding conventions: pad id is the tokenizer's pad token, `attention_mask` 0, `labels` -100, position
ids 0 (as HF leaves them). Right padding for training, left padding for generation. All integer
arrays are int32 (what the device wants); `pixel_values` float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NoReturn

import numpy as np

from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.positions import get_rope_index, vision_indices

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The static shapes of a batch. Choose buckets so that a handful of compiled shapes serve all data."""

    batch_size: int
    seq_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    image_patches: int = 0  # patch rows per batch for images (0: images refused)
    video_patches: int = 0  # patch rows per batch for videos (0: videos refused)
    max_images: int = 16  # rows of image_grid_thw
    max_videos: int = 4  # rows of video_grid_thw
    # The most patches of one frame (an image, or one temporal step of a video): the vision tower's full
    # blocks then attend band by band over blocks of this size instead of over the whole budget (a frame
    # over it is refused); 0: no bound. For images of at most max_pixels: max_pixels // patch_size**2.
    max_frame_patches: int = 0
    padding_side: str = "right"
    pad_token_id: int = 151643
    image_token_id: int = 151655
    video_token_id: int = 151656
    merge_size: int = 2
    patch_size: int = 14
    window_size: int = 112
    tokens_per_second: float = 2.0
    rope_rule: str = "5.24"

    def __post_init__(self):
        _check_fields(self)

    @classmethod
    def from_dict(cls, values: Mapping, **overrides) -> BatchSpec:
        """Build from a config mapping (a YAML file's contents); unknown keys are refused, not ignored."""
        values = {**values, **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown batch spec keys {unknown}; known: {sorted(known)}")
        if "seq_buckets" in values:
            values["seq_buckets"] = tuple(values["seq_buckets"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path, **overrides) -> BatchSpec:
        import yaml

        with open(path, encoding="utf-8") as f:
            return cls.from_dict(yaml.safe_load(f) or {}, **overrides)

    @property
    def rope_options(self) -> dict:
        """The keyword arguments of `get_rope_index` that this spec fixes (collate and packing share them)."""
        return {
            "spatial_merge_size": self.merge_size,
            "tokens_per_second": self.tokens_per_second,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "rule": self.rope_rule,
        }

    def bucket(self, length: int) -> int:
        for size in self.seq_buckets:
            if length <= size:
                return size
        raise InputError(f"{length} tokens exceed the largest sequence bucket {self.seq_buckets[-1]}")


def _refuse(name: str, value: object, why: str) -> NoReturn:
    raise ValueError(f"BatchSpec.{name}={value!r}: {why}")


def _check_fields(spec: BatchSpec) -> None:
    """The checks of one spec on its own (`BatchSpec` runs them when it is built)."""
    for name in ("batch_size", "merge_size", "patch_size"):
        if getattr(spec, name) < 1:
            _refuse(name, getattr(spec, name), "must be >= 1")
    if spec.padding_side not in ("left", "right"):
        _refuse("padding_side", spec.padding_side, "must be 'left' or 'right'")
    buckets = spec.seq_buckets
    if not buckets or list(buckets) != sorted(set(buckets)):
        _refuse("seq_buckets", buckets, "must be non-empty and increasing")
    if buckets[0] < 1:
        _refuse("seq_buckets", buckets, "every bucket must hold at least one token")
    unit = spec.merge_size**2
    for name in ("image_patches", "video_patches"):
        value = getattr(spec, name)
        if value < 0 or value % unit:  # collate scatters one merged unit (merge_size**2 rows) per slot
            _refuse(name, value, f"must be a non-negative multiple of merge_size**2 = {unit}")
    for name in ("max_images", "max_videos"):
        if getattr(spec, name) < 0:
            _refuse(name, getattr(spec, name), "must be >= 0")
    if spec.max_frame_patches < 0 or spec.max_frame_patches % unit:
        _refuse("max_frame_patches", spec.max_frame_patches, f"must be a non-negative multiple of {unit}")


def budget_unit(merge_size: int = 2, *, pairs: bool = False) -> int:
    """The patches a batch's image or video budget comes in: whole merge units of `merge_size**2`
    patches, and twice that for pairs (DPO, reward), whose images are encoded once, in half the budget."""
    return (2 if pairs else 1) * merge_size**2


def pair_budget_problem(name: str, value: int, merge_size: int = 2) -> str | None:
    """Why a pairs batch's `name` budget (`image_patches`, `video_patches`) cannot be halved, or None: a
    pair's images are encoded once, in half the budget, which must still be whole merge units."""
    unit = budget_unit(merge_size, pairs=True)
    if value % unit:
        return (
            f"batch.{name}={value} must be a multiple of {unit} for pairs: each pair's images are encoded "
            f"once, in half the budget (whole merge units of {merge_size**2} patches)"
        )
    return None


def check_spec(
    spec: BatchSpec, kind: str = "sft", pack: bool = False, *, min_pixels: int | None = None
) -> None:
    """Refuse up front, with a `ValueError` naming the field and its value, a spec that cannot batch `kind`.

    `kind` is "sft" or "dpo"; a DPO batch is `[chosen x B, rejected x B]`, so its `batch_size` must be
    even, and `pack` is for SFT only. With the processor's `min_pixels`, a non-zero `image_patches` that
    holds no image of the smallest size the processor resizes to (per pair for DPO, whose two rows both
    carry the prompt's images) is refused: only records that override the image size could ever pass.
    A zero budget or `max_images=0` is allowed, since text-only records still form batches.
    """
    _check_fields(spec)
    if kind not in ("sft", "dpo"):
        raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
    if kind == "dpo" and spec.batch_size % 2:
        _refuse("batch_size", spec.batch_size, "a DPO batch needs an even number of rows (2 x pairs)")
    if pack and kind != "sft":
        raise ValueError(f"packing is for SFT batches only, not kind={kind!r}")
    if min_pixels is not None and spec.image_patches:
        side = spec.patch_size * spec.merge_size
        # smart_resize gives sides that are multiples of `side` with an area of at least min_pixels.
        smallest = spec.merge_size**2 * max(1, -(-min_pixels // side**2))
        if kind == "dpo":
            smallest, per = 2 * smallest, " per DPO pair (both rows hold the images)"
        else:
            per = ""
        if spec.image_patches < smallest:
            why = f"holds no image: the smallest takes {smallest} patch rows{per} at min_pixels={min_pixels}"
            _refuse("image_patches", spec.image_patches, why)


def _row(example: Mapping, key: str):
    value = example.get(key)
    if value is None:
        return None
    value = np.asarray(value)
    return value[0] if value.ndim == 2 and value.shape[0] == 1 and key in ("input_ids", "labels") else value


def _vision(
    examples,
    spec: BatchSpec,
    kind: str,
    budget: int,
    max_items: int,
    ids_bs: np.ndarray,
    seq: int,
    share: Sequence[int | None] | None = None,
    slots: int | None = None,
):
    """Pixel rows, grid rows, indices and scatter slots for one modality, padded to the budget.

    Returns `(arrays, grids of every row in row order, seconds per grid)`: the grids of the rows whose
    images are shared (`share`, see `collate`) are repeated there, as the M-RoPE positions need them.
    `slots`: the scatter slots of a sharing batch (see `collate`)."""
    pv_key, grid_key = (
        ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
    )
    token_id = spec.image_token_id if kind == "image" else spec.video_token_id
    sharing = share is not None
    share = [None] * len(examples) if share is None else list(share)
    pvs, grids, spgs, row_grids, row_spgs = [], [], [], [], []
    row_units = np.zeros(len(examples), np.int64)  # each row's merged units of this modality
    for i, ex in enumerate(examples):
        grid = ex.get(grid_key)
        if grid is None or len(grid) == 0:
            continue
        grid = np.asarray(grid, dtype=np.int64).reshape(-1, 3)
        seconds = None
        if kind == "video":
            spg = ex.get("second_per_grid_ts")
            seconds = (
                np.ones(len(grid), np.float32) if spg is None else np.asarray(spg, np.float32).reshape(-1)
            )
        row_grids.append(grid)
        row_units[i] = int(grid.prod(-1).sum()) // spec.merge_size**2
        row_spgs.append(seconds)
        j = share[i]
        if j is not None:  # encoded once, with row j's: the same images, never silently other ones
            src = examples[j]
            if not (np.array_equal(grid, np.asarray(src.get(grid_key)).reshape(-1, 3))
                    and (ex[pv_key] is src[pv_key] or np.array_equal(ex[pv_key], src[pv_key]))):  # fmt: skip
                raise InputError(
                    f"example {ex.get('id', i)}: its {kind}s are meant to be those of example "
                    f"{src.get('id', j)} but differ"
                )
            continue
        pvs.append(np.asarray(ex[pv_key], dtype=np.float32))
        grids.append(grid)
        spgs.append(seconds)
    grid_n3 = np.concatenate(grids) if grids else np.zeros((0, 3), np.int64)
    n = int(grid_n3.prod(-1).sum())
    if n > budget:
        raise InputError(f"the batch's {kind}s need {n} patch rows, more than the budget {budget}")
    if len(grid_n3) > max_items:
        raise InputError(f"the batch holds {len(grid_n3)} {kind}s, more than max_{kind}s={max_items}")
    pixel = np.zeros((budget, pvs[0].shape[-1] if pvs else 1176), np.float32)
    if pvs:
        pixel[:n] = np.concatenate(pvs)
    out = {
        pv_key: pixel,
        grid_key: np.zeros((max_items, 3), np.int32),
        f"num_{kind}s": np.int32(len(grid_n3)),
    }
    out[grid_key][: len(grid_n3)] = grid_n3
    if kind == "video":
        spg = np.zeros(max_items, np.float32)
        spg[: len(grid_n3)] = np.concatenate(spgs) if spgs else []
        out["second_per_grid_ts"] = spg
    idx = vision_indices(
        grid_n3,
        merge_size=spec.merge_size,
        window_size=spec.window_size,
        patch_size=spec.patch_size,
        num_patches=budget,
    )
    for field in ("rope_pos", "patch_perm", "patch_inv", "unit_unperm", "window_seg", "full_seg", "valid"):
        value = getattr(idx, field)
        out[f"{kind}_{field}"] = value if value.dtype == bool else value.astype(np.int32)
    if spec.max_frame_patches:
        frames = grid_n3[:, 1] * grid_n3[:, 2] if len(grid_n3) else np.zeros(0, np.int64)
        if frames.size and frames.max() > spec.max_frame_patches:
            raise InputError(
                f"an {kind} frame of {int(frames.max())} patches exceeds batch.max_frame_patches="
                f"{spec.max_frame_patches}"
            )
        # Its SHAPE carries the bound into the jitted model (`VisionTower`'s full blocks); the values are unused.
        out[f"{kind}_full_block"] = np.zeros(spec.max_frame_patches, np.int32)
    # Scatter slots: one per merged unit of the budget, row-major (batch, seq) as HF's masked_scatter.
    unit = spec.merge_size**2
    b_idx, s_idx = np.nonzero(ids_bs == token_id)
    units = budget // unit
    if not sharing:
        if b_idx.size != n // unit:
            raise InputError(f"{b_idx.size} {kind} placeholder tokens for {n // unit} {kind} features")
        slot_units, num_slots = None, units
    else:  # a sharing row's slots read the features of the row it shares, in the same order
        slot_units = _shared_slot_units(examples, share, b_idx, kind, row_units)
        # Sharing batches always have `num_slots` slots and `scatter_u`: a static shape.
        num_slots = 2 * units if slots is None else slots
        if len(slot_units) > num_slots:
            held = f"2 x {units}" if slots is None else str(slots)
            raise InputError(f"{len(slot_units)} {kind} placeholder tokens for {held} slots")
    scatter_b = np.zeros(num_slots, np.int32)
    scatter_s = np.full(num_slots, seq, np.int32)  # out of range: dropped
    scatter_b[: b_idx.size], scatter_s[: s_idx.size] = b_idx, s_idx
    out[f"{kind}_scatter_b"], out[f"{kind}_scatter_s"] = scatter_b, scatter_s
    if slot_units is not None:
        scatter_u = np.zeros(num_slots, np.int32)
        scatter_u[: slot_units.size] = slot_units
        out[f"{kind}_scatter_u"] = scatter_u
    all_grids = np.concatenate(row_grids) if row_grids else np.zeros((0, 3), np.int64)
    seconds = np.concatenate(row_spgs) if row_spgs and kind == "video" else None
    return out, all_grids, seconds


def _shared_slot_units(examples, share, b_idx: np.ndarray, kind: str, row_units: np.ndarray) -> np.ndarray:
    """The feature unit each placeholder slot (row-major `b_idx`) reads when rows share images: a row
    that owns its images reads the next units in order (`row_units[i]` of them), a sharing row those of
    the row it shares."""
    counts = np.bincount(b_idx, minlength=len(examples))[: len(examples)]
    start, owned = {}, 0
    for i, ex in enumerate(examples):
        if share[i] is not None:
            continue
        need = int(row_units[i])
        if counts[i] != need:
            raise InputError(
                f"example {ex.get('id', i)}: {counts[i]} {kind} placeholder tokens for {need} features"
            )
        start[i], owned = owned, owned + need
    per_row = []
    for i, ex in enumerate(examples):
        j = i if share[i] is None else share[i]
        if counts[i] != counts[j]:
            raise InputError(
                f"example {ex.get('id', i)}: {counts[i]} {kind} placeholder tokens, but the example whose "
                f"{kind}s it shares has {counts[j]}"
            )
        per_row.append(start.get(j, 0) + np.arange(counts[i]))
    return np.concatenate(per_row).astype(np.int32) if per_row else np.zeros(0, np.int32)


def collate(
    examples: Sequence[Mapping],
    spec: BatchSpec,
    *,
    share: Sequence[int | None] | None = None,
    slots: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Pad unpadded examples (processor output for one conversation each) into one static-shape batch.

    Each example holds 1-D `input_ids` (or `(1, L)`), optional `labels`, and optional `pixel_values` +
    `image_grid_thw`, `pixel_values_videos` + `video_grid_thw` + `second_per_grid_ts`, and an optional
    `id` used in error messages.

    `share[i] = j` (j < i, an example that owns its images; None elsewhere): example i holds the same
    images as example j (checked), and they are encoded once. The pixel budget then holds only the owned
    images and `{kind}_scatter_u` names the feature unit each slot reads. `slots[kind]` ("image",
    "video") is the number of scatter slots of a sharing batch, in merged units: as many as the batch's
    placeholder tokens may ever be, whatever it shares, so that its shape is static. Default: twice the
    budget's units (one source shared by one other row at most, as DPO's chosen and rejected rows).
    """
    if not examples:
        raise InputError("no examples to collate")
    if len(examples) > spec.batch_size:
        raise InputError(f"{len(examples)} examples for a batch of {spec.batch_size}")
    rows = [_row(ex, "input_ids") for ex in examples]
    for i, r in enumerate(rows):
        if r is None or r.ndim != 1 or r.size == 0:
            raise InputError(
                f"example {examples[i].get('id', i)}: input_ids must be a non-empty 1-D sequence"
            )
    try:
        seq = spec.bucket(max(r.size for r in rows))
    except InputError as err:
        longest = max(range(len(rows)), key=lambda i: rows[i].size)
        raise InputError(f"example {examples[longest].get('id', longest)}: {err}") from None
    has_labels = any(ex.get("labels") is not None for ex in examples)
    batch, left = spec.batch_size, spec.padding_side == "left"
    ids = np.full((batch, seq), spec.pad_token_id, np.int64)
    mask = np.zeros((batch, seq), np.int64)
    labels = np.full((batch, seq), IGNORE_INDEX, np.int64)
    for i, r in enumerate(rows):
        sl = slice(seq - r.size, seq) if left else slice(0, r.size)
        ids[i, sl], mask[i, sl] = r, 1
        if has_labels and examples[i].get("labels") is not None:
            lab = _row(examples[i], "labels")
            if lab.shape != r.shape:
                raise InputError(f"example {examples[i].get('id', i)}: labels and input_ids differ in length")
            labels[i, sl] = lab
    types = np.where(ids == spec.image_token_id, 1, np.where(ids == spec.video_token_id, 2, 0)) * mask
    out: dict[str, np.ndarray] = {
        "input_ids": ids.astype(np.int32),
        "attention_mask": mask.astype(np.int32),
        "mm_token_type_ids": types.astype(np.int32),
        "example_mask": (np.arange(batch) < len(examples)).astype(np.int32),
    }
    if has_labels:
        out["labels"] = labels.astype(np.int32)
    if not left:  # unpacked right-padded rows: the cuDNN attention reads lengths instead of a mask
        out["seq_lengths"] = mask.sum(-1).astype(np.int32)
    grids: dict[str, np.ndarray | None] = {"image": None, "video": None}
    spg = None
    for kind, budget, max_items in (
        ("image", spec.image_patches, spec.max_images),
        ("video", spec.video_patches, spec.max_videos),
    ):
        if budget:
            num_slots = None if slots is None else slots.get(kind)
            part, grids[kind], seconds = _vision(
                examples, spec, kind, budget, max_items, ids * mask, seq, share, num_slots
            )
            out.update(part)
            spg = seconds if kind == "video" else spg
        elif any(ex.get(f"{kind}_grid_thw") is not None and len(ex[f"{kind}_grid_thw"]) for ex in examples):
            raise InputError(f"the batch holds {kind}s but the batch spec has no {kind} patch budget")
    image_grid, video_grid = grids["image"], grids["video"]
    pos, deltas = get_rope_index(
        ids,
        types,
        image_grid if image_grid is not None and len(image_grid) else None,
        video_grid if video_grid is not None and len(video_grid) else None,
        spg,
        mask,
        **spec.rope_options,
    )
    out["position_ids"], out["rope_deltas"] = pos.astype(np.int32), deltas.astype(np.int32)
    return out


# Keys with a trailing sequence axis and the value their padding takes (right padding).
_SEQ_PAD = {"attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0}


def pad_to_length(batch: Mapping[str, np.ndarray], seq_len: int, pad_token_id: int) -> dict[str, np.ndarray]:
    """A right-padded training batch re-padded to a longer `seq_len`: what `collate` would have produced with
    that bucket (gradient accumulation needs one shape for the micro-batches of a step). Unused placeholder
    scatter slots point one past the end, so they move to the new end."""
    seq = int(np.shape(batch["input_ids"])[-1])
    if seq_len < seq:
        raise ValueError(f"cannot pad a batch of {seq} tokens down to {seq_len}")
    if seq_len == seq:
        return dict(batch)
    mask = np.asarray(batch["attention_mask"])
    if ((mask[:, 0] == 0) & (mask[:, -1] > 0)).any():  # a row that starts with padding
        raise ValueError("pad_to_length needs right-padded rows (training batches)")
    out = dict(batch)
    extra = seq_len - seq
    for key, fill in (("input_ids", pad_token_id), *_SEQ_PAD.items()):
        if key in batch:
            x = np.asarray(batch[key])
            out[key] = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=fill)
    for key in ("image_scatter_s", "video_scatter_s"):
        if key in batch:
            s_idx = np.asarray(batch[key])
            out[key] = np.where(s_idx == seq, seq_len, s_idx).astype(s_idx.dtype)
    return out
