"""Pack several SFT examples into each row of a static-shape batch, computing exactly what they give alone.

A packed row holds whole examples one after another (its *segments*), then padding. The decoder turns
`attention_mask` into the segment ids of a causal, same-segment attention (`model/attention.py`), so a
row whose `attention_mask` holds the segment id 1..k (0 on padding) lets every token see exactly the
tokens of its own example up to itself. The rest of the exactness is bookkeeping done here:

- positions: every segment gets the M-RoPE positions of its example ALONE (`get_rope_index` on the
  example), restarting at 0. A packed row has no single `rope_deltas`, so packed batches carry none:
  they are for training and scoring, never for generation.
- labels: the losses shift labels (position t scores the label at t+1), so the first token of every
  segment is set to -100; otherwise the last token of the previous segment would be trained to predict
  it. Unpacked, that label is never scored either (it sits at position 0), so the loss is unchanged.
- vision: the images and videos of all segments share the batch's patch budget in ROW-MAJOR placement
  order, the order in which placeholder tokens receive features (`collate`'s scatter slots). It differs
  from the given order whenever first-fit sends a later example to an earlier row.

Planning is first-fit in the given order into `batch_size` rows, run for every sequence bucket at once;
the batch takes the smallest bucket whose first-fit holds every example, so a few short examples do not
pay for the largest bucket. `Packer` does it online: `add` places one more example or refuses it and
changes nothing, which is how the data iterator groups a stream greedily (`data/pipeline.py`).
`Grouper` is the same for unpacked batches (one example or DPO pair per row), so that unpacked batches
too close before they would overflow a patch budget instead of failing in `collate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwenvl_jax.processing.batch import IGNORE_INDEX, BatchSpec, _row, _vision
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.positions import get_rope_index


@dataclasses.dataclass(frozen=True)
class ExampleSize:
    """What an example takes of a batch: tokens of one row, patch rows and items of each vision budget,
    and its largest frame (an image, or one temporal step of a video) in patches, which
    `BatchSpec.max_frame_patches` bounds."""

    tokens: int
    image_patches: int = 0
    images: int = 0
    video_patches: int = 0
    videos: int = 0
    frame_patches: int = 0

    @classmethod
    def of(cls, example: Mapping[str, Any]) -> ExampleSize:
        """The size of an unpadded example (`collate`'s input format)."""
        ids = _row(example, "input_ids")
        counts, frame = {}, 0
        for kind in ("image", "video"):
            grid = example.get(f"{kind}_grid_thw")
            grid_n3 = (
                np.zeros((0, 3), np.int64) if grid is None else np.asarray(grid, np.int64).reshape(-1, 3)
            )
            counts[f"{kind}_patches"] = int(grid_n3.prod(-1).sum())
            counts[f"{kind}s"] = len(grid_n3)
            frame = max(frame, int((grid_n3[:, 1] * grid_n3[:, 2]).max(initial=0)))
        return cls(tokens=0 if ids is None else int(ids.size), frame_patches=frame, **counts)

    def __add__(self, other: ExampleSize) -> ExampleSize:
        summed = np.add(dataclasses.astuple(self), dataclasses.astuple(other)).tolist()
        return ExampleSize(*summed[:-1], frame_patches=max(self.frame_patches, other.frame_patches))


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Where the examples of one packed batch go.

    `rows[r]` lists the indices of the examples in row r, in placement order (left to right); there are
    `batch_size` rows, trailing ones possibly empty. `seq_len` is the sequence bucket of the batch.
    """

    seq_len: int
    rows: tuple[tuple[int, ...], ...]

    @property
    def order(self) -> tuple[int, ...]:
        """Example indices in row-major placement order: the order of their vision inputs."""
        return tuple(i for row in self.rows for i in row)


def unfit_reason(size: ExampleSize, spec: BatchSpec) -> str | None:
    """Why `size` fits in no batch of `spec` even alone, or None when it fits."""
    if size.tokens < 1:
        return "input_ids must be a non-empty 1-D sequence"
    if size.tokens > spec.seq_buckets[-1]:
        return f"{size.tokens} tokens exceed the largest sequence bucket {spec.seq_buckets[-1]}"
    for kind, budget, max_items in (
        ("image", spec.image_patches, spec.max_images),
        ("video", spec.video_patches, spec.max_videos),
    ):
        patches, items = getattr(size, f"{kind}_patches"), getattr(size, f"{kind}s")
        if items and not budget:
            return f"holds {kind}s but the batch spec has no {kind} patch budget"
        if patches > budget:
            return f"its {kind}s need {patches} patch rows, more than the budget {budget}"
        if items > max_items:
            return f"holds {items} {kind}s, more than max_{kind}s={max_items}"
    if spec.max_frame_patches and size.frame_patches > spec.max_frame_patches:
        return (
            f"a frame of {size.frame_patches} patches exceeds batch.max_frame_patches={spec.max_frame_patches}"
            " (the bound data.max_pixels sets; raise both, or set max_frame_patches: 0)"
        )
    return None


def _over_budget(total: ExampleSize, spec: BatchSpec) -> bool:
    """Whether examples of these summed sizes overflow a batch's patch budgets or item limits."""
    return (
        total.image_patches > spec.image_patches
        or total.images > spec.max_images
        or total.video_patches > spec.video_patches
        or total.videos > spec.max_videos
    )


class Grouper:
    """Online grouping of whole examples, one per row, into one `collate` batch: `Packer` unpacked.

    `add(size)` takes the next example and returns True, or returns False and changes nothing when the
    batch already holds `capacity` examples or the example would overflow its patch budgets or
    `max_images`/`max_videos` together with those taken. Text length never closes a group: every
    example has a row of its own, padded to the bucket of the longest. A DPO pair is one item of
    `capacity = batch_size // 2` whose size is that of its two rows together (`pair_size`).
    """

    def __init__(self, spec: BatchSpec, capacity: int | None = None):
        self.spec = spec
        self.capacity = spec.batch_size if capacity is None else capacity
        self._total = ExampleSize(tokens=0)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, size: ExampleSize, *, name: object = None) -> bool:
        """Take one more example; False (nothing changed) when it does not fit with those taken.

        Raises `InputError` naming the example, as `Packer.add` does, when it fits in no batch alone.
        """
        reason = unfit_reason(size, self.spec)
        if reason is not None:
            raise InputError(f"example {self._count if name is None else name}: {reason}")
        total = self._total + size
        if self._count >= self.capacity or _over_budget(total, self.spec):
            return False
        self._total, self._count = total, self._count + 1
        return True


def pair_size(chosen: ExampleSize, rejected: ExampleSize) -> ExampleSize:
    """What a DPO pair takes of a batch: both rows carry the prompt's images, each row its own tokens."""
    return dataclasses.replace(chosen + rejected, tokens=max(chosen.tokens, rejected.tokens))


class Packer:
    """Online first-fit of examples into the `batch_size` rows of one batch, for every bucket at once.

    `add(size)` places the next example in the first row of each bucket that still has room for it and
    returns True, or returns False and changes nothing when no bucket can take it or the batch's patch
    budgets or `max_images`/`max_videos` would overflow. A bucket that cannot take an example is dropped
    (every example must go in); `plan()` uses the smallest bucket left.
    """

    def __init__(self, spec: BatchSpec):
        self.spec = spec
        self._loads = {b: [0] * spec.batch_size for b in spec.seq_buckets}
        self._rows: dict[int, list[list[int]]] = {
            b: [[] for _ in range(spec.batch_size)] for b in spec.seq_buckets
        }
        self._total = ExampleSize(tokens=0)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, size: ExampleSize, *, name: object = None) -> bool:
        """Place one more example; False (nothing changed) when it does not fit with those placed.

        Raises `InputError`, naming the example (`name`, else its index), when it fits in no batch even
        alone, so that no caller mistakes it for the first example of the next batch.
        """
        reason = unfit_reason(size, self.spec)
        if reason is not None:
            raise InputError(f"example {self._count if name is None else name}: {reason}")
        total = self._total + size
        if _over_budget(total, self.spec):
            return False
        slots = {}
        for bucket, loads in self._loads.items():
            row = next((r for r, load in enumerate(loads) if load + size.tokens <= bucket), None)
            if row is not None:
                slots[bucket] = row
        if not slots:
            return False
        for bucket in list(self._loads):
            if bucket in slots:
                self._loads[bucket][slots[bucket]] += size.tokens
                self._rows[bucket][slots[bucket]].append(self._count)
            else:
                del self._loads[bucket], self._rows[bucket]
        self._total, self._count = total, self._count + 1
        return True

    def plan(self) -> PackPlan:
        """The placement in the smallest bucket whose first-fit holds every example added."""
        if not self._count:
            raise InputError("no examples to pack")
        bucket = min(self._loads)
        return PackPlan(seq_len=bucket, rows=tuple(tuple(row) for row in self._rows[bucket]))


def plan_batches(sizes: Sequence[ExampleSize], spec: BatchSpec) -> list[PackPlan]:
    """Split a stream of example sizes into consecutive packed batches, greedily.

    A batch takes examples in order while they fit (`Packer.add`); the first that does not starts the
    next batch. Indices in the plans are positions in `sizes`. This is the grouping the data iterator's
    `pack=True` makes of the good examples of its stream.
    """
    plans, packer, start = [], Packer(spec), 0
    for i, size in enumerate(sizes):
        if not packer.add(size, name=i):
            plans.append(_shift(packer.plan(), start))
            packer, start = Packer(spec), i
            packer.add(size, name=i)
    if len(packer):
        plans.append(_shift(packer.plan(), start))
    return plans


def _shift(plan: PackPlan, offset: int) -> PackPlan:
    return PackPlan(plan.seq_len, tuple(tuple(i + offset for i in row) for row in plan.rows))


def _example_positions(example: Mapping, ids: np.ndarray, spec: BatchSpec, name: object) -> np.ndarray:
    """`(3, L)` M-RoPE positions of one example alone, as `collate` would give it in a batch of one."""
    grids = {}
    for kind in ("image", "video"):
        grid = example.get(f"{kind}_grid_thw")
        grids[kind] = None if grid is None or len(grid) == 0 else np.asarray(grid, np.int64).reshape(-1, 3)
    spg = example.get("second_per_grid_ts")
    if grids["video"] is not None and spg is None:
        spg = np.ones(len(grids["video"]), np.float32)  # `collate`'s default for videos without it
    try:
        pos_3bs, _ = get_rope_index(
            ids[None],
            None,
            grids["image"],
            grids["video"],
            None if grids["video"] is None else np.asarray(spg, np.float32).reshape(-1),
            None,
            **spec.rope_options,
        )
    except InputError as err:
        raise InputError(f"example {name}: {err}") from None
    return pos_3bs[:, 0]


def pack_examples(examples: Sequence[Mapping], spec: BatchSpec) -> dict[str, np.ndarray]:
    """Pack unpadded examples (`collate`'s input format) into ONE batch of `spec.batch_size` rows.

    Examples are placed by `Packer` in the given order; an example that does not fit with those before
    it, or fits in no batch alone, raises `InputError` naming it (`id`, else its index). The keys are
    `collate`'s, with these differences: `attention_mask` holds the segment id (1..k in a row, 0 on
    padding); `position_ids` restart at 0 in every segment; `labels` are -100 on each segment's first
    token; `example_mask` marks rows holding at least one example; there is no `rope_deltas`.
    """
    if not examples:
        raise InputError("no examples to pack")
    names = [ex.get("id", i) for i, ex in enumerate(examples)]
    rows, packer = [], Packer(spec)
    for i, ex in enumerate(examples):
        ids = _row(ex, "input_ids")
        if ids is None or ids.ndim != 1 or ids.size == 0:
            raise InputError(f"example {names[i]}: input_ids must be a non-empty 1-D sequence")
        rows.append(ids)
        if not packer.add(ExampleSize.of(ex), name=names[i]):
            raise InputError(
                f"example {names[i]}: does not fit in one packed batch with the {i} examples before it "
                f"({spec.batch_size} rows of at most {spec.seq_buckets[-1]} tokens, "
                f"{spec.image_patches} image and {spec.video_patches} video patch rows)"
            )
    plan = packer.plan()
    has_labels = any(ex.get("labels") is not None for ex in examples)
    batch, seq = spec.batch_size, plan.seq_len
    ids_bs = np.full((batch, seq), spec.pad_token_id, np.int64)
    seg_bs = np.zeros((batch, seq), np.int64)
    labels_bs = np.full((batch, seq), IGNORE_INDEX, np.int64)
    pos_3bs = np.zeros((3, batch, seq), np.int64)
    for r, row in enumerate(plan.rows):
        start = 0
        for k, i in enumerate(row):
            ids = rows[i]
            sl = slice(start, start + ids.size)
            ids_bs[r, sl], seg_bs[r, sl] = ids, k + 1
            pos_3bs[:, r, sl] = _example_positions(examples[i], ids, spec, names[i])
            if examples[i].get("labels") is not None:
                lab = _row(examples[i], "labels")
                if lab.shape != ids.shape:
                    raise InputError(f"example {names[i]}: labels and input_ids differ in length")
                labels_bs[r, sl] = lab
                labels_bs[r, start] = IGNORE_INDEX
            start += ids.size
    real_bs = seg_bs > 0
    types = (
        np.where(ids_bs == spec.image_token_id, 1, np.where(ids_bs == spec.video_token_id, 2, 0)) * real_bs
    )
    out: dict[str, np.ndarray] = {
        "input_ids": ids_bs.astype(np.int32),
        "attention_mask": seg_bs.astype(np.int32),
        "mm_token_type_ids": types.astype(np.int32),
        "example_mask": real_bs.any(-1).astype(np.int32),
        "position_ids": pos_3bs.astype(np.int32),
    }
    if has_labels:
        out["labels"] = labels_bs.astype(np.int32)
    ordered = [examples[i] for i in plan.order]
    masked_ids = np.where(real_bs, ids_bs, spec.pad_token_id)
    for kind, budget, max_items in (
        ("image", spec.image_patches, spec.max_images),
        ("video", spec.video_patches, spec.max_videos),
    ):
        if budget:
            part, _, _ = _vision(ordered, spec, kind, budget, max_items, masked_ids, seq)
            out.update(part)
    return out
