"""grain pipeline: JSONL lines / Parquet rows -> records -> encoded examples -> static-shape numpy batches.

    JsonlSource (line offsets, indexed once) / ParquetSource (row groups on demand, `parquet.py`)
      -- IndexSampler (seeded shuffle, ShardOptions, epochs)
      -> EncodeRecords (workers: parse, image decode/resize/patchify, tokenise; never raises)
      -> BatchIterator (main process: skip policy, grouping, `collate` with the BatchSpec)

GRPO/PPO prompts (`kind="grpo"` or `"ppo"`, `prompts.py`) go the same way, except that a "batch" is a
list of encoded prompts, grouped within the vision budget but not collated: the loop generates the
completions and collates prompt + completion rows itself.

The encode transform turns every failure into a skip marker instead of raising, so that skips are a
deterministic function of the record and happen inside the pipeline: the same seed gives the same
batches with or without bad records, with any worker count. The batch iterator refuses, as `too_long`,
an example that fits in no batch of the `BatchSpec` even alone (its images, patch rows, videos or
tokens over the spec's budgets), counts the skipped records in a `SkipCounter` (or raises `BadRecord`
under `policy="strict"`), groups the good ones and collates.

Grouping takes good examples (SFT) or pairs (DPO) in stream order while they fit together: at most
`batch_size` rows and within the patch budgets and `max_images`/`max_videos`
(`processing.packing.Grouper`), or, packed (`pack=True`, SFT only), into the rows of one packed batch
(`processing.packing.Packer`). The first that does not fit is held back and starts the next batch, so
a batch never overflows its budget; a batch closed early is padded as usual (rows with `example_mask`
0, dummy DPO pairs). The held-back element has already been pulled from grain, so while one is held
the checkpoint carries grain's state from BEFORE it was pulled: a restored iterator pulls it again, and
nothing is lost or duplicated. Otherwise the iterator pulls no element beyond the batch it returns, so
its checkpoint is grain's `DataLoader` iterator state plus the skip state, and restoring it mid-epoch
yields exactly the batches that followed.

Each skipped record is counted once, by its `path:line`, however many epochs pass it; with a skip log
every one is written once to a JSONL file, which a restore cuts back to what had been written at the
save, so that the file equals that of an uninterrupted run.

Collation runs in the main process (it needs whole groups, and grain's `Batch` would group skip markers
too, leaving holes); decoding, which dominates, runs in the workers.

DPO batches are the `2B` rows `[chosen x B, rejected x B]` of one forward pass (`losses.py`), so the
`BatchSpec.batch_size` of a DPO pipeline is twice the number of pairs. A short last batch of pairs is
filled with one-token dummy rows (attention_mask, example_mask 0, labels -100) so that the halves stay
aligned.
"""

from __future__ import annotations

import dataclasses
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
    PromptRecord,
    Record,
    SFTRecord,
    check_columns,
    local_path,
    parse_line,
    record_images,
)
from qwenvl_jax.processing.batch import IGNORE_INDEX, BatchSpec, check_spec, collate, pair_budget_problem
from qwenvl_jax.processing.chat import (
    expand_placeholders,
    normalize_messages,
    shift_span,
    span_token_mask,
    vision_items,
)
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.image import process_image
from qwenvl_jax.processing.packing import (
    ExampleSize,
    Grouper,
    Packer,
    pack_examples,
    pair_size,
    unfit_reason,
)
from qwenvl_jax.processing.processor import Processor

_IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
_EXAMPLE_KEYS = (
    "input_ids", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
    "second_per_grid_ts",
)  # fmt: skip
POLICIES = ("skip", "strict")
KINDS = ("sft", "dpo", "grpo", "ppo")
PROMPT_KINDS = ("grpo", "ppo")  # prompts to complete; PPO reads the same data as GRPO


# ------------------------------------------------------------------------------------------- source
class JsonlSource(grain.RandomAccessDataSource):
    """The non-blank lines of JSONL files, indexed once by byte offset; item i is `(path, line, bytes)`.

    A file without a non-blank line is refused, naming it: an empty file among several is a mistake
    (a failed export, a wrong path), not a part of the data set to pass over.
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise InputError("no JSONL files given")
        self._paths = [os.path.abspath(os.fspath(p)) for p in paths]
        files, starts, ends, lines, empty = [], [], [], [], []
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
            if not files or files[-1] != f:
                empty.append(path)
        if empty:
            raise InputError("; ".join(f"{p}: no records (empty or only blank lines)" for p in empty))
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


class ConcatSource(grain.RandomAccessDataSource):
    """Several sources one after another (JSONL and Parquet files in the order given)."""

    def __init__(self, sources: Sequence[grain.RandomAccessDataSource]):
        self._sources = list(sources)
        self._start = np.concatenate([[0], np.cumsum([len(s) for s in self._sources])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._start[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        i = int(np.searchsorted(self._start, index, side="right")) - 1
        return self._sources[i][index - int(self._start[i])]

    def __repr__(self) -> str:
        return f"ConcatSource({', '.join(map(repr, self._sources))})"


def open_source(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, columns: dict[str, str] | None = None
) -> grain.RandomAccessDataSource:
    """The records of JSONL and Parquet (`*.parquet`) files, in the order given.

    Consecutive files of one kind share a source; `columns` (a `data.columns` mapping) is checked against
    the Parquet schemas here, and against each JSONL line when it is parsed.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise InputError("no data files given")
    runs: list[tuple[bool, list]] = []
    for path in paths:
        parquet = os.fspath(path).lower().endswith(".parquet")
        if runs and runs[-1][0] == parquet:
            runs[-1][1].append(path)
        else:
            runs.append((parquet, [path]))
    sources = []
    for parquet, group in runs:
        if parquet:
            from qwenvl_jax.data.parquet import ParquetSource  # pyarrow only for Parquet input

            sources.append(ParquetSource(group, columns=columns))
        else:
            sources.append(JsonlSource(group))
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


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
    """Source item -> `{"example": ...}` (SFT, GRPO/PPO prompt: `prompts.encode_prompt`) or
    `{"pair": (chosen, rejected)}` (DPO), with the record's `"location"`, or `{"skip": ...}`.

    Never raises on a bad record: the skip marker carries reason, id, location and detail to the main
    process, where the policy is applied. The processor is loaded lazily from its directory in each
    worker process (jinja templates do not pickle). `max_length` is the prompt's for GRPO/PPO. `columns`
    is a `data.columns` mapping (`records.rename_columns`).
    """

    def __init__(
        self,
        processor: Processor | str | os.PathLike,
        *,
        kind: str = "sft",
        max_length: int | None = None,
        mask_vision_tokens: bool = False,
        columns: dict[str, str] | None = None,
        image_options: dict[str, int] | None = None,
        prompt_suffix: str = "",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        # `Processor.from_pretrained` overrides (min_pixels, max_pixels) for the processor a worker loads.
        self.image_options = dict(image_options or {})
        self.prompt_suffix = prompt_suffix  # GRPO/PPO: appended to each prompt's last user turn
        self._dir = None if isinstance(processor, Processor) else os.fspath(processor)
        self._processor = processor if isinstance(processor, Processor) else None
        self.kind, self.max_length, self.mask_vision_tokens = kind, max_length, mask_vision_tokens
        self.columns = check_columns(columns)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._dir is not None:
            state["_processor"] = None
        return state

    @property
    def processor(self) -> Processor:
        if self._processor is None:
            self._processor = Processor.from_pretrained(self._dir, **self.image_options)
        return self._processor

    def encode(self, record: Record):
        expected = {"sft": SFTRecord, "dpo": DPORecord}.get(self.kind, PromptRecord)
        if not isinstance(record, expected):
            names = {SFTRecord: "an SFT record", DPORecord: "a DPO record", PromptRecord: "a prompt record"}
            data = {"sft": "an SFT", "dpo": "a DPO", "grpo": "a GRPO", "ppo": "a PPO"}[self.kind]
            raise BadRecord(
                "invalid", record.id, record.location, f"{names[type(record)]} in {data} data set"
            )
        if self.kind == "sft":
            return {"example": encode_sft(
                self.processor, record, max_length=self.max_length, mask_vision_tokens=self.mask_vision_tokens
            )}  # fmt: skip
        if self.kind == "dpo":
            return {"pair": encode_dpo(self.processor, record, max_length=self.max_length)}
        from qwenvl_jax.data.prompts import encode_prompt  # prompts.py imports this module

        return {"example": encode_prompt(
            self.processor, record, max_prompt_length=self.max_length, suffix=self.prompt_suffix
        )}  # fmt: skip

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        try:
            if "text" in element:  # a JSONL line
                record = parse_line(
                    element["text"], path=element["path"], line=element["line"], columns=self.columns
                )
            else:  # a Parquet row
                from qwenvl_jax.data.parquet import parse_row

                record = parse_row(element, columns=self.columns)
            return {**self.encode(record), "location": record.location}
        except BadRecord as err:
            return {"skip": (err.reason, err.record_id, err.location, err.detail)}


# ----------------------------------------------------------------------------------------- skipping
class SkipCounter:
    """Skipped records by reason, each counted once by its location (`path:line`) across epochs and restores.

    With `log`, every skipped record is appended once to that JSONL file (`id`, `location`, `reason`,
    `detail`) when it is counted, and flushed. The state holds the skipped locations (grouped by file)
    and the log's length: `set_state` cuts the log back to it, so that the records skipped again after a
    restore are not listed twice. A counter that was not restored starts the log afresh at its first
    `sync_log`. `examples` keeps the first few of each reason, for a summary without a log.
    """

    def __init__(self, keep: int = 3, log: str | os.PathLike | None = None):
        self.keep = keep
        self.log = None if log is None else Path(log)
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self._reasons: dict[str, str] = {}  # location -> reason
        self._log_bytes = 0  # what this stream has written to the log
        self._log_synced = False

    def add(self, err: BadRecord) -> bool:
        """Count a skipped record; False when its location was counted already (a later epoch)."""
        if err.location in self._reasons:
            return False
        self._reasons[err.location] = err.reason
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        shown = self.examples.setdefault(err.reason, [])
        if len(shown) < self.keep:
            shown.append(f"{err.record_id} ({err.location}): {err.detail}"[:300])
        if self.log is not None:
            self.sync_log()
            entry = {
                "id": err.record_id,
                "location": err.location,
                "reason": err.reason,
                "detail": err.detail,
            }
            line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
            with open(self.log, "ab") as f:
                f.write(line)
            self._log_bytes += len(line)
        return True

    def sync_log(self) -> None:
        """Cut the log back to what this stream had written (nothing, when it was not restored); once."""
        if self.log is None or self._log_synced:
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            size = f.seek(0, os.SEEK_END)
            if size >= self._log_bytes:
                f.truncate(self._log_bytes)
            else:  # lines written before the save are gone: go on from what is there
                self._log_bytes = size
        self._log_synced = True

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        parts = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
        head = f"{self.total} records skipped ({parts})"
        if self.log is not None:
            return f"{head}; each is listed in {self.log}"
        return f"{head}; e.g. " + "; ".join(v[0] for _, v in sorted(self.examples.items()))

    def state(self) -> dict:
        locations: dict[str, dict[str, list]] = {}
        for location, reason in self._reasons.items():
            path, _, line = location.rpartition(":")
            if line.isdigit():
                locations.setdefault(reason, {}).setdefault(path, []).append(int(line))
            else:  # not `path:line`: kept whole
                locations.setdefault(reason, {}).setdefault(location, []).append(None)
        for by_path in locations.values():
            for lines in by_path.values():
                lines.sort(key=lambda x: -1 if x is None else x)
        return {
            "locations": locations,
            "examples": {k: list(v) for k, v in self.examples.items()},
            "log_bytes": self._log_bytes,
        }

    def set_state(self, state: dict) -> None:
        self.examples = {k: list(v) for k, v in state["examples"].items()}
        self._reasons = {
            path if line is None else f"{path}:{line}": reason
            for reason, by_path in state.get("locations", {}).items()
            for path, lines in by_path.items()
            for line in lines
        }
        if "locations" in state:
            self.counts = {}
            for reason in self._reasons.values():
                self.counts[reason] = self.counts.get(reason, 0) + 1
        else:  # a state saved before locations were kept: its counts, and no locations
            self.counts = dict(state["counts"])
        self._log_bytes, self._log_synced = int(state.get("log_bytes", 0)), False
        self.sync_log()


# ----------------------------------------------------------------------------------------- batching
def _dummy(pad_token_id: int) -> dict[str, Any]:
    return {"id": "<dummy>", "input_ids": np.asarray([pad_token_id]), "labels": np.asarray([IGNORE_INDEX])}


def collate_pairs(pairs: Sequence[tuple[dict, dict]], spec: BatchSpec) -> dict[str, np.ndarray]:
    """`[chosen x B, rejected x B]` rows, B = spec.batch_size // 2; missing pairs become masked dummy rows.

    A pair's rows hold the same images (`encode_dpo`), so they are encoded once: the pixel budgets are half
    the spec's (what the chosen rows need; the pair's two rows together fit the spec's whole budget) and
    each rejected row reads its chosen row's features (`collate(share=...)`, `image_scatter_u`). The
    vision tower's work per batch is half of encoding every row's images."""
    half = spec.batch_size // 2
    if spec.batch_size % 2 or len(pairs) > half or not pairs:
        raise InputError(f"{len(pairs)} pairs for a DPO batch spec of {spec.batch_size} rows")
    fill = [_dummy(spec.pad_token_id)] * (half - len(pairs))
    share = [None] * half + list(range(len(pairs))) + [None] * len(fill)
    batch = collate(
        [c for c, _ in pairs] + fill + [r for _, r in pairs] + fill, pair_vision_spec(spec), share=share
    )
    if fill:
        dead = np.r_[np.arange(len(pairs), half), np.arange(half + len(pairs), 2 * half)]
        for key in ("attention_mask", "example_mask", "seq_lengths"):
            if key in batch:
                batch[key][dead] = 0
    return batch


def pair_vision_spec(spec: BatchSpec) -> BatchSpec:
    """The spec a batch of pairs is collated with: the vision budgets halved (each pair's images once)."""
    for name in ("image_patches", "video_patches"):
        problem = pair_budget_problem(name, getattr(spec, name), spec.merge_size)
        if problem:
            raise InputError(problem)
    return dataclasses.replace(
        spec, image_patches=spec.image_patches // 2, video_patches=spec.video_patches // 2
    )


class BatchIterator:
    """Static-shape batches from a grain `DataLoader` of encoded records; checkpointable.

    `get_state()` returns bytes (JSON: grain's DataLoader iterator state and the skip state) and
    `set_state(bytes)` restores them; the batches after a restore are bitwise those that followed the save.
    For `kind="grpo"`/`"ppo"` a batch is the list of up to `spec.batch_size` encoded prompts whose vision
    inputs fit the spec's budgets together, not collated (`prompts.make_prompt_batches`).
    `last_ids` holds the record ids of the last batch (chosen-row order for DPO, stream order when packed).
    With `pack=True` (SFT) each batch is `pack_examples` of the examples that fit (module docstring).
    `drop_remainder` drops the last batch, the one the end of the data closed (a batch closed early by a
    budget is kept). `skip_log`: a JSONL file listing every skipped record once (`SkipCounter`).
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
        skip_log: str | os.PathLike | None = None,
        alone_spec: BatchSpec | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if kind in PROMPT_KINDS and pack:
            raise ValueError(f"packing is for SFT batches only, not kind={kind!r}")
        check_spec(spec, "sft" if kind in PROMPT_KINDS else kind, pack)
        self.spec, self.kind, self.policy, self.drop_remainder = spec, kind, policy, drop_remainder
        self.pack = pack
        # (element, grain state from before it was pulled): the good element that did not fit in the
        # last batch, the first of the next one.
        self._held: tuple[dict[str, Any], bytes] | None = None
        self.group = spec.batch_size // 2 if kind == "dpo" else spec.batch_size
        self.skipped = SkipCounter(log=skip_log)
        self.last_ids: tuple[str, ...] = ()
        self._it = iter(loader)
        # The budget one element must fit by itself (default: the batch's). GRPO gives each prompt a
        # row's share, so that any micro-batch of its completions fits the training budget.
        self.alone_spec = alone_spec
        # Records per epoch of this shard (set by `make_batches`); with it, a stream in which every record
        # is skipped fails instead of looping forever under `num_epochs=None`.
        self.num_records: int | None = num_records
        self._bad_streak = 0

    def __iter__(self):
        return self

    def _size(self, element: dict[str, Any]) -> ExampleSize:
        if self.kind != "dpo":
            return ExampleSize.of(element["example"])
        chosen, rejected = element["pair"]
        return pair_size(ExampleSize.of(chosen), ExampleSize.of(rejected))

    def _refusal(self, element: dict[str, Any]) -> BadRecord | None:
        """Why an element is skipped: its skip marker, or `too_long` when it fits in no batch even alone."""
        if "skip" in element:
            return BadRecord(*element["skip"])
        reason = unfit_reason(self._size(element), self.alone_spec or self.spec)
        if reason is None:
            return None
        if self.kind == "dpo":
            reason = f"chosen and rejected rows together: {reason}"
        first = element["pair"][0] if self.kind == "dpo" else element["example"]
        return BadRecord("too_long", str(first["id"]), element.get("location", "?"), reason)

    def _good(self, element: dict[str, Any]) -> bool:
        """False for a skipped element (counted, or raised under the strict policy)."""
        err = self._refusal(element)
        if err is None:
            self._bad_streak = 0
            return True
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

    def _pull(self) -> tuple[dict[str, Any], bytes] | None:
        """The next good element and grain's state from before it was pulled; None at the end."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        while True:
            before = self._it.get_state()
            try:
                element = next(self._it)
            except StopIteration:
                return None
            if self._good(element):
                return element, before

    def __next__(self) -> dict[str, np.ndarray] | list[dict[str, Any]]:
        self.skipped.sync_log()
        former = Packer(self.spec) if self.pack else Grouper(self.spec, self.group)
        items, ended = [], False
        while self.pack or len(items) < self.group:
            pulled = self._pull()
            if pulled is None:
                ended = True
                break
            element, before = pulled
            if not former.add(self._size(element)):
                self._held = (element, before)
                break
            items.append(element["pair"] if self.kind == "dpo" else element["example"])
        if not items or (self.drop_remainder and ended):
            raise StopIteration
        if self.kind in PROMPT_KINDS:
            self.last_ids = tuple(str(ex["id"]) for ex in items)
            return items
        if self.kind == "dpo":
            self.last_ids = tuple(str(c["id"]) for c, _ in items)
            return collate_pairs(items, self.spec)
        self.last_ids = tuple(str(ex["id"]) for ex in items)
        return pack_examples(items, self.spec) if self.pack else collate(items, self.spec)

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
    columns: dict[str, str] | None = None,
    image_options: dict[str, int] | None = None,
    prompt_suffix: str = "",
) -> grain.DataLoader:
    """A grain `DataLoader` of per-record elements (see `EncodeRecords`), sharded and seeded.

    Shard `i` of `k` is the i-th contiguous block of `len(source) // k` lines (grain `ShardOptions` with
    `drop_remainder=True`: every process gets the same number of records, so that processes take the
    same number of steps; the last `len % k` lines are left out, and grain 0.2.18 loses records with
    `drop_remainder=False` anyway). Each epoch of a shard is shuffled with `seed` and the epoch number;
    `num_epochs=None` repeats forever. `read_options` defaults to 2 threads prefetching 64 lines (grain's
    default of 16 threads and 500 lines costs seconds at start-up for nothing: a line read is cheap).
    `paths` may mix JSONL and Parquet files (`open_source`); `columns` is a `data.columns` mapping;
    `image_options` (min_pixels, max_pixels) override the processor's image config in worker processes;
    `prompt_suffix` is appended to every GRPO/PPO prompt's last user turn (`prompts.with_suffix`).
    """
    if worker_count:
        _parse_absl_flags()
    columns = check_columns(columns)
    source = open_source(paths, columns=columns)
    if len(source) < shard_count:
        raise InputError(
            f"{len(source)} records for shard_count={shard_count}: every shard needs at least one ({source})"
        )
    shard = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    sampler = grain.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=shuffle, num_epochs=num_epochs, seed=seed
    )
    encode = EncodeRecords(
        processor,
        kind=kind,
        max_length=max_length,
        mask_vision_tokens=mask_vision_tokens,
        columns=columns,
        image_options=image_options,
        prompt_suffix=prompt_suffix,
    )
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
    skip_log: str | os.PathLike | None = None,
    alone_spec: BatchSpec | None = None,
    **loader_kwargs: Any,
) -> BatchIterator:
    """JSONL / Parquet files -> a checkpointable iterator of static-shape batches (see module docstring).

    `max_length` defaults to the largest sequence bucket of `spec`; pass the processor's directory (not a
    `Processor`) when `worker_count > 0`. `pack=True` (SFT only) packs several examples per row.
    `skip_log` names a JSONL file that lists every skipped record once (`SkipCounter`). `alone_spec`: the
    budget one record must fit by itself (default `spec`); a record over it is `too_long`. For
    `kind="grpo"`/`"ppo"` the batches are lists of encoded prompts (`prompts.make_prompt_batches`, which
    states the budgets without a `BatchSpec`): `spec.batch_size` prompts at most, their images within
    `image_patches`/`max_images` (videos likewise), `max_length` the longest prompt.
    """
    if kind in PROMPT_KINDS and pack:
        raise ValueError(f"packing is for SFT batches only, not kind={kind!r}")
    check_spec(spec, "sft" if kind in PROMPT_KINDS else kind, pack)
    max_length = spec.seq_buckets[-1] if max_length is None else min(max_length, spec.seq_buckets[-1])
    loader = make_loader(paths, processor, kind=kind, max_length=max_length, **loader_kwargs)
    return BatchIterator(
        loader, spec, kind=kind, policy=policy, drop_remainder=drop_remainder, pack=pack, skip_log=skip_log,
        num_records=len(loader._data_source) // loader_kwargs.get("shard_count", 1), alone_spec=alone_spec,
    )  # fmt: skip
