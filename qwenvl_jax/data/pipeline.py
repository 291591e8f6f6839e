"""grain pipeline: JSONL lines -> records -> encoded examples -> static-shape numpy batches.

    JsonlSource (line offsets, indexed once)  -- IndexSampler (seeded shuffle, ShardOptions, epochs)
      -> EncodeRecords (workers: JSON parse, image decode/resize/patchify, tokenise; never raises)
      -> BatchIterator (main process: skip policy, grouping, `collate` with the BatchSpec)

The encode transform turns every failure into a skip marker instead of raising, so that skips are a
deterministic function of the record and happen inside the pipeline: the same seed gives the same
batches with or without bad records, with any worker count. The batch iterator groups exactly
`batch_size` good examples (SFT) or pairs (DPO) per batch, counts the skipped ones in a `SkipCounter`
(or raises `BadRecord` under `policy="strict"`), and collates. It pulls no element beyond the batch it
returns, so its checkpoint is grain's `DataLoader` iterator state plus the skip counts, and restoring it
mid-epoch yields exactly the batches that followed.

Collation runs in the main process (it needs whole groups, and grain's `Batch` would group skip markers
too, leaving holes); decoding, which dominates, runs in the workers.

Packing (`pack=True`, SFT only): a batch takes good examples in stream order while they fit together
into its rows (`processing.packing.Packer`: sequence buckets, patch budgets, `max_images`); the first
that does not fit is held back and starts the next batch. The held-back example has already been pulled
from grain, so while one is held the checkpoint carries grain's state from BEFORE it was pulled: a
restored iterator pulls it again, and nothing is lost or duplicated.

DPO batches are the `2B` rows `[chosen x B, rejected x B]` of one forward pass (`losses.py`), so the
`BatchSpec.batch_size` of a DPO pipeline is twice the number of pairs. A short last batch of pairs is
filled with one-token dummy rows (attention_mask, example_mask 0, labels -100) so that the halves stay
aligned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain.python as grain
import numpy as np

from qwenvl_jax.data.records import (
    BadRecord,
    DPORecord,
    Record,
    SFTRecord,
    local_path,
    parse_line,
    record_images,
)
from qwenvl_jax.processing.batch import IGNORE_INDEX, BatchSpec, collate
from qwenvl_jax.processing.chat import (
    expand_placeholders,
    normalize_messages,
    shift_span,
    span_token_mask,
    vision_items,
)
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.image import process_image
from qwenvl_jax.processing.packing import ExampleSize, Packer, pack_examples
from qwenvl_jax.processing.processor import Processor

_IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
_EXAMPLE_KEYS = (
    "input_ids", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
    "second_per_grid_ts",
)  # fmt: skip
POLICIES = ("skip", "strict")


# ------------------------------------------------------------------------------------------- source
class JsonlSource(grain.RandomAccessDataSource):
    """The non-blank lines of JSONL files, indexed once by byte offset; item i is `(path, line, bytes)`."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise InputError("no JSONL files given")
        self._paths = [os.path.abspath(os.fspath(p)) for p in paths]
        files, starts, ends, lines = [], [], [], []
        for f, path in enumerate(self._paths):
            try:
                data = Path(path).read_bytes()
            except OSError as err:
                raise InputError(f"{path}: cannot read JSONL file ({err})") from err
            breaks = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
            line_starts = np.concatenate([[0], breaks + 1])
            line_ends = np.concatenate([breaks, [len(data)]])
            for i, (s, e) in enumerate(zip(line_starts.tolist(), line_ends.tolist(), strict=True)):
                if data[s:e].strip():
                    files.append(f)
                    starts.append(s)
                    ends.append(e)
                    lines.append(i + 1)
        self._file = np.asarray(files, np.int32)
        self._start = np.asarray(starts, np.int64)
        self._end = np.asarray(ends, np.int64)
        self._line = np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self._line)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        path = self._paths[self._file[index]]
        with open(path, "rb") as f:
            f.seek(int(self._start[index]))
            text = f.read(int(self._end[index] - self._start[index]))
        return {"path": path, "line": int(self._line[index]), "text": text}

    def __repr__(self) -> str:
        return f"JsonlSource({len(self)} lines in {len(self._paths)} files)"


# ----------------------------------------------------------------------------------------- encoding
def _classify(err: InputError, record: Record) -> BadRecord:
    if isinstance(err, BadRecord):
        return err
    text = str(err)
    corrupt = ("cannot identify image", "corrupt or truncated", "zero size", "too large to decode")
    reason = "corrupt_image" if any(s in text for s in corrupt) else "invalid"
    return BadRecord(reason, record.id, record.location, text)


def _check_images(record: Record) -> None:
    for source in record_images(record):
        path = local_path(source)
        if path is not None and not os.path.isfile(path):
            raise BadRecord("missing_image", record.id, record.location, f"{path}: no such file")


def _too_long(record: Record, n: int, max_length: int | None) -> None:
    if max_length is not None and n > max_length:
        raise BadRecord(
            "too_long", record.id, record.location, f"{n} tokens, more than max_length={max_length}"
        )


def encode_sft(
    processor: Processor,
    record: SFTRecord,
    *,
    max_length: int | None = None,
    mask_vision_tokens: bool = False,
) -> dict[str, Any]:
    """One conversation -> an unpadded example for `collate`: 1-D ids and assistant-only labels, pixels, id.

    A record longer than `max_length` tokens is refused, never truncated (a cut could split an image's
    placeholder run from its features).
    """
    _check_images(record)
    try:
        out = processor.encode_chat(
            [record.messages], labels=True, padding=False, mask_vision_tokens=mask_vision_tokens
        )
    except InputError as err:
        raise _classify(err, record) from None
    _too_long(record, out["input_ids"].shape[1], max_length)
    example: dict[str, Any] = {"id": record.id}
    for key in _EXAMPLE_KEYS:
        if key in out:
            example[key] = out[key][0] if key in ("input_ids", "labels") else out[key]
    return example


def encode_dpo(
    processor: Processor, record: DPORecord, *, max_length: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A preference record -> (chosen, rejected) examples sharing the prompt tokens and one set of pixels.

    The images are decoded and patchified once; both examples hold the same `pixel_values` array.
    `labels` cover the completion turn only (its content and `<|im_end|>\\n`, as TRL's completion mask);
    `completion_mask` is the same as int32. A pair in which either row exceeds `max_length` is refused.
    """
    _check_images(record)
    name = f"record {record.id}"
    try:
        prompt = normalize_messages(record.prompt, name=name)
        blocks, videos = vision_items(prompt)
        if videos:
            raise InputError(f"{name}: videos in DPO prompts are not supported")
        patches, grids = [], []
        for i, block in enumerate(blocks):
            opts = {k: block[k] for k in _IMAGE_OPTIONS if k in block}
            p, g = process_image(block["image"], processor.image_config, name=f"{name} image {i}", **opts)
            patches.append(p)
            grids.append(g)
        convs = [[*prompt, record.chosen], [*prompt, record.rejected]]
        template = processor.chat_template
        texts = [template.render(c, name=name) for c in convs]
        # The completion is the last assistant turn; earlier assistant turns belong to the prompt.
        spans = [template.assistant_spans(c, name=name)[-1] for c in convs]
        merge = processor.image_config.merge_size
        tokens = [int(np.prod(g)) // merge**2 for g in grids]
        expanded, shifts = expand_placeholders(
            texts, tokens * 2, [], image_token=processor.image_token, video_token=processor.video_token
        )
    except InputError as err:
        raise _classify(err, record) from None
    pixel_values = np.concatenate(patches) if patches else None
    grid_thw = np.stack(grids).astype(np.int64) if grids else None
    rows = []
    for (ids, offsets), span, shift in zip(
        processor.tokenizer.encode_batch_with_offsets(expanded), spans, shifts, strict=True
    ):
        ids = np.asarray(ids, np.int64)
        _too_long(record, ids.size, max_length)
        keep = span_token_mask(offsets, [shift_span(span, shift)]).astype(bool)
        example: dict[str, Any] = {
            "id": record.id,
            "input_ids": ids,
            "labels": np.where(keep, ids, IGNORE_INDEX),
            "completion_mask": keep.astype(np.int32),
        }
        if pixel_values is not None:
            example["pixel_values"], example["image_grid_thw"] = pixel_values, grid_thw
        rows.append(example)
    chosen, rejected = rows
    start_c, start_r = int(np.argmax(chosen["completion_mask"])), int(np.argmax(rejected["completion_mask"]))
    if start_c != start_r or not np.array_equal(
        chosen["input_ids"][:start_c], rejected["input_ids"][:start_r]
    ):
        raise BadRecord(
            "invalid", record.id, record.location, "chosen and rejected do not share the prompt tokens"
        )
    return chosen, rejected


class EncodeRecords(grain.MapTransform):
    """Source item -> `{"example": ...}` (SFT), `{"pair": (chosen, rejected)}` (DPO) or `{"skip": ...}`.

    Never raises on a bad record: the skip marker carries reason, id, location and detail to the main
    process, where the policy is applied. The processor is loaded lazily from its directory in each
    worker process (jinja templates do not pickle).
    """

    def __init__(
        self,
        processor: Processor | str | os.PathLike,
        *,
        kind: str = "sft",
        max_length: int | None = None,
        mask_vision_tokens: bool = False,
    ):
        if kind not in ("sft", "dpo"):
            raise ValueError(f"kind must be 'sft' or 'dpo', got {kind!r}")
        self._dir = None if isinstance(processor, Processor) else os.fspath(processor)
        self._processor = processor if isinstance(processor, Processor) else None
        self.kind, self.max_length, self.mask_vision_tokens = kind, max_length, mask_vision_tokens

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._dir is not None:
            state["_processor"] = None
        return state

    @property
    def processor(self) -> Processor:
        if self._processor is None:
            self._processor = Processor.from_pretrained(self._dir)
        return self._processor

    def encode(self, record: Record):
        if self.kind == "sft":
            if not isinstance(record, SFTRecord):
                raise BadRecord("invalid", record.id, record.location, "a DPO record in an SFT data set")
            return {"example": encode_sft(
                self.processor, record, max_length=self.max_length, mask_vision_tokens=self.mask_vision_tokens
            )}  # fmt: skip
        if not isinstance(record, DPORecord):
            raise BadRecord("invalid", record.id, record.location, "an SFT record in a DPO data set")
        return {"pair": encode_dpo(self.processor, record, max_length=self.max_length)}

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        try:
            record = parse_line(element["text"], path=element["path"], line=element["line"])
            return self.encode(record)
        except BadRecord as err:
            return {"skip": (err.reason, err.record_id, err.location, err.detail)}


# ----------------------------------------------------------------------------------------- skipping
class SkipCounter:
    """Skipped records by reason, with the first few ids of each, for the training loop to log."""

    def __init__(self, keep: int = 5):
        self.keep = keep
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, err: BadRecord) -> None:
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        shown = self.examples.setdefault(err.reason, [])
        if len(shown) < self.keep:
            shown.append(f"{err.record_id} ({err.location}): {err.detail}"[:300])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        parts = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        return f"{self.total} records skipped ({parts}); e.g. " + "; ".join(
            v[0] for _, v in sorted(self.examples.items())
        )

    def state(self) -> dict:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def set_state(self, state: dict) -> None:
        self.counts = dict(state["counts"])
        self.examples = {k: list(v) for k, v in state["examples"].items()}


# ----------------------------------------------------------------------------------------- batching
def _dummy(pad_token_id: int) -> dict[str, Any]:
    return {"id": "<dummy>", "input_ids": np.asarray([pad_token_id]), "labels": np.asarray([IGNORE_INDEX])}


def collate_pairs(pairs: Sequence[tuple[dict, dict]], spec: BatchSpec) -> dict[str, np.ndarray]:
    """`[chosen x B, rejected x B]` rows, B = spec.batch_size // 2; missing pairs become masked dummy rows."""
    half = spec.batch_size // 2
    if spec.batch_size % 2 or len(pairs) > half or not pairs:
        raise InputError(f"{len(pairs)} pairs for a DPO batch spec of {spec.batch_size} rows")
    fill = [_dummy(spec.pad_token_id)] * (half - len(pairs))
    batch = collate([c for c, _ in pairs] + fill + [r for _, r in pairs] + fill, spec)
    if fill:
        dead = np.r_[np.arange(len(pairs), half), np.arange(half + len(pairs), 2 * half)]
        for key in ("attention_mask", "example_mask"):
            batch[key][dead] = 0
    return batch


class BatchIterator:
    """Static-shape batches from a grain `DataLoader` of encoded records; checkpointable.

    `get_state()` returns bytes (JSON: grain's DataLoader iterator state and the skip counts) and
    `set_state(bytes)` restores them; the batches after a restore are bitwise those that followed the save.
    `last_ids` holds the record ids of the last batch (chosen-row order for DPO, stream order when packed).
    With `pack=True` (SFT) each batch is `pack_examples` of the examples that fit (module docstring);
    `drop_remainder` then drops the last batch, the one the end of the data closed.
    """

    def __init__(
        self,
        loader: grain.DataLoader,
        spec: BatchSpec,
        *,
        kind: str = "sft",
        policy: str = "skip",
        drop_remainder: bool = False,
        pack: bool = False,
        num_records: int | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if kind == "dpo" and spec.batch_size % 2:
            raise ValueError(f"a DPO batch spec needs an even batch_size (2 x pairs), got {spec.batch_size}")
        if pack and kind != "sft":
            raise ValueError(f"packing is for SFT batches only, not kind={kind!r}")
        self.spec, self.kind, self.policy, self.drop_remainder = spec, kind, policy, drop_remainder
        self.pack = pack
        # (element, grain state from before it was pulled): the example that did not fit in the last
        # packed batch, the first of the next one.
        self._held: tuple[dict[str, Any], bytes] | None = None
        self.group = spec.batch_size // 2 if kind == "dpo" else spec.batch_size
        self.skipped = SkipCounter()
        self.last_ids: tuple[str, ...] = ()
        self._it = iter(loader)
        # Records per epoch of this shard (set by `make_batches`); with it, a stream in which every record
        # is skipped fails instead of looping forever under `num_epochs=None`.
        self.num_records: int | None = num_records
        self._bad_streak = 0

    def __iter__(self):
        return self

    def _good(self, element: dict[str, Any]) -> bool:
        """False for a skip marker (counted, or raised under the strict policy)."""
        if "skip" not in element:
            self._bad_streak = 0
            return True
        err = BadRecord(*element["skip"])
        if self.policy == "strict":
            raise err
        self.skipped.add(err)
        self._bad_streak += 1
        if self.num_records is not None and self._bad_streak > self.num_records:
            # Every record of the shard was refused in a row: a repeating loader would spin forever.
            raise InputError(
                f"all {self.num_records} records were skipped, none is usable: {self.skipped.summary()}"
            )
        return False

    def _next_packed(self) -> dict[str, np.ndarray]:
        packer, items, ended = Packer(self.spec), [], False
        while True:
            if self._held is not None:
                (element, before), self._held = self._held, None
            else:
                before = self._it.get_state()
                try:
                    element = next(self._it)
                except StopIteration:
                    ended = True
                    break
            if not self._good(element):
                continue
            example = element["example"]
            # Raises, naming the example, only when it fits in no batch even alone.
            if not packer.add(ExampleSize.of(example), name=example.get("id")):
                self._held = (element, before)
                break
            items.append(example)
        if not items or (self.drop_remainder and ended):
            raise StopIteration
        self.last_ids = tuple(str(ex["id"]) for ex in items)
        return pack_examples(items, self.spec)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.pack:
            return self._next_packed()
        items = []
        while len(items) < self.group:
            try:
                element = next(self._it)
            except StopIteration:
                break
            if not self._good(element):
                continue
            items.append(element["example"] if self.kind == "sft" else element["pair"])
        if not items or (self.drop_remainder and len(items) < self.group):
            raise StopIteration
        if self.kind == "sft":
            self.last_ids = tuple(str(ex["id"]) for ex in items)
            return collate(items, self.spec)
        self.last_ids = tuple(str(c["id"]) for c, _ in items)
        return collate_pairs(items, self.spec)

    def get_state(self) -> bytes:
        grain_state = self._held[1] if self._held is not None else self._it.get_state()
        return json.dumps({"grain": grain_state.decode("utf-8"), "skipped": self.skipped.state()}).encode()

    def set_state(self, state: bytes) -> None:
        value = json.loads(state)
        self._it.set_state(value["grain"].encode("utf-8"))
        self._held = None
        self.skipped.set_state(value["skipped"])


def _parse_absl_flags() -> None:
    """grain's worker processes read absl flags; outside `app.run` they are unparsed and grain fails."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_loader(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    processor: Processor | str | os.PathLike,
    *,
    kind: str = "sft",
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    worker_buffer_size: int = 1,
    read_options: grain.ReadOptions | None = None,
    max_length: int | None = None,
    mask_vision_tokens: bool = False,
) -> grain.DataLoader:
    """A grain `DataLoader` of per-record elements (see `EncodeRecords`), sharded and seeded.

    Shard `i` of `k` is the i-th contiguous block of `len(source) // k` lines (grain `ShardOptions` with
    `drop_remainder=True`: every process gets the same number of records, so that processes take the
    same number of steps; the last `len % k` lines are left out, and grain 0.2.18 loses records with
    `drop_remainder=False` anyway). Each epoch of a shard is shuffled with `seed` and the epoch number;
    `num_epochs=None` repeats forever. `read_options` defaults to 2 threads prefetching 64 lines (grain's
    default of 16 threads and 500 lines costs seconds at start-up for nothing: a line read is cheap).
    """
    if worker_count:
        _parse_absl_flags()
    source = JsonlSource(paths)
    shard = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    sampler = grain.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed
    )
    encode = EncodeRecords(processor, kind=kind, max_length=max_length, mask_vision_tokens=mask_vision_tokens)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[encode],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard,
        read_options=read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=64),
    )


def make_batches(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    processor: Processor | str | os.PathLike,
    spec: BatchSpec,
    *,
    kind: str = "sft",
    policy: str = "skip",
    drop_remainder: bool = False,
    max_length: int | None = None,
    pack: bool = False,
    **loader_kwargs: Any,
) -> BatchIterator:
    """JSONL files -> a checkpointable iterator of static-shape batches (see module docstring).

    `max_length` defaults to the largest sequence bucket of `spec`; pass the processor's directory (not a
    `Processor`) when `worker_count > 0`. `pack=True` (SFT only) packs several examples per row.
    """
    if kind == "dpo" and spec.batch_size % 2:
        raise ValueError(f"a DPO batch spec needs an even batch_size (2 x pairs), got {spec.batch_size}")
    if pack and kind != "sft":
        raise ValueError(f"packing is for SFT batches only, not kind={kind!r}")
    max_length = spec.seq_buckets[-1] if max_length is None else min(max_length, spec.seq_buckets[-1])
    loader = make_loader(paths, processor, kind=kind, max_length=max_length, **loader_kwargs)
    return BatchIterator(
        loader, spec, kind=kind, policy=policy, drop_remainder=drop_remainder, pack=pack,
        num_records=len(loader._data_source) // loader_kwargs.get("shard_count", 1),
    )  # fmt: skip
