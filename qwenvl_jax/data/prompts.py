"""GRPO/PPO prompts: prompt records -> encoded prompts -> groups of prompts per generation batch.

A prompt record (`records.PromptRecord`, TRL's `{"prompt": ..., "images": [...], <columns>}`) is encoded
once, with the generation prompt appended, as TRL renders prompts for generation. The training loop
generates G completions per prompt and collates the prompt + completion rows itself, so the iterator
returns lists of encoded prompts, not batches: `make_prompt_batches` groups up to `prompts_per_batch`
prompts in stream order while their images and videos fit the vision budget of one generation batch
(each prompt's vision inputs counted once), holding back the first that does not fit for the next group
(`pipeline.BatchIterator`, whose skip policy, skip log and exact `get_state`/`set_state` it shares). A
prompt whose vision inputs exceed the budget alone, or longer than `max_prompt_length` tokens, is refused
as `too_long`: prompts are never truncated (a cut could split an image's placeholder run).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from qwenvl_jax.data.pipeline import (
    _EXAMPLE_KEYS,
    PROMPT_KINDS,
    BatchIterator,
    _check_images,
    _classify,
    make_batches,
)
from qwenvl_jax.data.records import BadRecord, PromptRecord
from qwenvl_jax.processing.batch import BatchSpec
from qwenvl_jax.processing.errors import InputError
from qwenvl_jax.processing.processor import Processor

# A bound that never closes a group: prompts have no sequence bucket, `max_prompt_length` limits them.
_NO_LIMIT = 2**31 - 1


def with_suffix(messages: list[dict], suffix: str) -> list[dict]:
    """`messages` with `suffix` appended to the text of the last user turn (a task's format instructions,
    as EasyR1's `format_prompt` appends them); a new text block when the turn ends with an image."""
    out = [dict(m) for m in messages]
    turn = next((m for m in reversed(out) if m.get("role") == "user"), None)
    if turn is None:
        return out
    content = turn.get("content")
    if isinstance(content, str):
        turn["content"] = content + suffix
        return out
    blocks = [dict(b) for b in content or []]
    if blocks and blocks[-1].get("type") == "text":
        blocks[-1]["text"] = blocks[-1].get("text", "") + suffix
    else:
        blocks.append({"type": "text", "text": suffix.lstrip()})
    turn["content"] = blocks
    return out


def encode_prompt(
    processor: Processor, record: PromptRecord, *, max_prompt_length: int | None = None, suffix: str = ""
) -> dict[str, Any]:
    """One prompt record -> `{"id", "location", "input_ids" (1-D int64), vision arrays, "columns", "prompt"}`.

    `input_ids` are the chat-templated prompt with the assistant generation prompt, image and video
    placeholders expanded; the vision arrays are those of `Processor.encode_chat` (`pixel_values`,
    `image_grid_thw`; `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`), present when the
    prompt holds images or videos. `columns` are the record's other columns; `prompt` is the prompt as
    TRL passes it to reward functions (`PromptRecord.reward_prompt`, with `suffix`). Longer than `max_prompt_length`
    tokens: `BadRecord("too_long")`. `suffix` is appended to the last user turn (`with_suffix`).
    """
    _check_images(record)
    messages = with_suffix(record.prompt, suffix) if suffix else record.prompt
    try:
        out = processor.encode_chat([messages], add_generation_prompt=True, padding=False)
    except InputError as err:
        raise _classify(err, record) from None
    n = int(out["input_ids"].shape[1])
    if max_prompt_length is not None and n > max_prompt_length:
        raise BadRecord(
            "too_long",
            record.id,
            record.location,
            f"{n} tokens, more than max_prompt_length={max_prompt_length}",
        )
    example: dict[str, Any] = {"id": record.id, "location": record.location}
    for key in _EXAMPLE_KEYS:
        if key in out:
            example[key] = out[key][0] if key == "input_ids" else out[key]
    example["columns"] = dict(record.columns)
    # The prompt as the model saw it, suffix included (as if the data set had been formatted with it).
    prompt = record.reward_prompt
    if suffix:
        prompt = prompt + suffix if isinstance(prompt, str) else with_suffix(prompt, suffix)
    example["prompt"] = prompt
    return example


def prompt_spec(
    prompts_per_batch: int,
    *,
    image_patches: int = 0,
    max_images: int = 16,
    video_patches: int = 0,
    max_videos: int = 4,
    max_frame_patches: int = 0,
) -> BatchSpec:
    """The `BatchSpec` that states a generation batch's prompt budget for `BatchIterator`'s grouping."""
    return BatchSpec(
        batch_size=prompts_per_batch, seq_buckets=(_NO_LIMIT,), image_patches=image_patches,
        max_images=max_images, video_patches=video_patches, max_videos=max_videos,
        max_frame_patches=max_frame_patches,
    )  # fmt: skip


def make_prompt_batches(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    processor: Processor | str | os.PathLike,
    *,
    prompts_per_batch: int,
    image_patches: int = 0,
    max_images: int = 16,
    video_patches: int = 0,
    max_videos: int = 4,
    max_prompt_length: int | None = None,
    kind: str = "grpo",
    policy: str = "skip",
    drop_remainder: bool = False,
    skip_log: str | os.PathLike | None = None,
    per_prompt: dict[str, int] | None = None,
    **loader_kwargs: Any,
) -> BatchIterator:
    """JSONL / Parquet prompt files -> a checkpointable iterator of lists of encoded prompts.

    `next()` gives up to `prompts_per_batch` examples of `encode_prompt`, in stream order, whose images
    take at most `image_patches` patch rows and `max_images` images together (videos: `video_patches`,
    `max_videos`); a group closed by the budget is followed by one that starts with the prompt that did
    not fit. The group that the end of the data closes comes short, or not at all with `drop_remainder`.
    `per_prompt` (`image_patches`, `max_images`, `video_patches`, `max_videos`, `max_frame_patches`) caps
    what one prompt may hold: a prompt over it is `too_long` (GRPO: a training row's share of the
    micro-batch budget; the vision tower's frame bound).
    `get_state()`/`set_state(bytes)` restore the stream exactly; `last_ids` holds the ids of the last group,
    `skipped` the `SkipCounter`. `loader_kwargs` go to `pipeline.make_loader` (`seed`, `shuffle`,
    `num_epochs`, `shard_index`, `shard_count`, `worker_count`, `columns`, ...).
    """
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")
    try:
        spec = prompt_spec(
            prompts_per_batch, image_patches=image_patches, max_images=max_images,
            video_patches=video_patches, max_videos=max_videos,
        )  # fmt: skip
    except ValueError as err:  # name the arguments, not the spec's fields
        raise ValueError(
            str(err).replace("BatchSpec.", "").replace("batch_size", "prompts_per_batch")
        ) from None
    alone = None
    if per_prompt is not None:
        alone = prompt_spec(1, **{"image_patches": image_patches, "max_images": max_images,
                                  "video_patches": video_patches, "max_videos": max_videos, **per_prompt})  # fmt: skip
    return make_batches(
        paths, processor, spec, kind=kind, policy=policy, drop_remainder=drop_remainder,
        max_length=max_prompt_length, skip_log=skip_log, alone_spec=alone, **loader_kwargs,
    )  # fmt: skip
