"""JSONL lines -> normalised records: a conversation (SFT), a prompt with two completions (DPO), or a
prompt to complete (GRPO/PPO).

Four line formats are recognised by their keys:

- (a) SFT document parsing: `{"image": path, "prefix": str, "suffix": str}` -> user `[image, prefix]`,
  assistant `suffix`.
- (b) conversational: `{"messages": [...], "images": [...]}`; every `{"type": "image"}` block that names no
  source is filled, in template order, from `images`. Placeholders and images must be equal in number.
- (c) DPO (RLAIF-V / TRL preference style): `{"images": [...], "prompt": str | messages, "chosen": str |
  messages, "rejected": str | messages}`. A string prompt becomes one user turn holding the images then
  the text; a messages prompt has its image placeholders filled as in (b). Chosen and rejected are one
  assistant turn each (a string, or a list holding one assistant message).
- (d) prompts (TRL's GRPO/PPO style): `{"prompt": str | messages, "images": [...], ...}` with none of
  `chosen`, `rejected`, `messages`; every other key (`solution`, `answer`, ...) is carried untouched in
  `PromptRecord.columns` for the reward functions. The prompt is built as DPO prompts are.

A string prompt (DPO or GRPO) that holds `<image>` / `<video>` placeholders, as many Hub VLM data sets
write them, gets its images and videos at those places (as many placeholders as items); without any, the
images, then the videos, come before the text. Videos (`"video"`: one source, `"videos"`: a list; a source
is a path, URL, frame directory or a list of frame paths) fill source-less `{"type": "video"}` blocks as
images do, in the conversational and prompt formats.

`image` (a single source) is accepted wherever `images` is. Relative paths resolve against the data file's
directory; absolute paths, `file://`, `http(s)://` and `data:` sources, and raw encoded bytes (Parquet)
are kept as they are. Every record has an `id`: the line's `"id"` field, else `"<file>:<line>"` (1-based).
A line that cannot become a record raises `BadRecord` naming the id and `file:line`. `rename_columns`
applies a column mapping (`data.columns`) before the format is recognised.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qwenvl_jax.processing.errors import InputError

_REMOTE = ("http://", "https://", "file://", "data:")

# Reasons a record is refused; `SkipCounter` counts by these names.
REASONS = ("malformed_json", "invalid", "missing_image", "corrupt_image", "too_long")


class BadRecord(InputError):
    """A record the pipeline refuses; carries why (one of `REASONS`), its id and its `file:line`."""

    def __init__(self, reason: str, record_id: str, location: str, detail: str):
        super().__init__(f"record {record_id} ({location}): {reason}: {detail}")
        self.reason, self.record_id, self.location, self.detail = reason, record_id, location, detail

    def __reduce__(self):  # picklable across grain worker processes
        return (BadRecord, (self.reason, self.record_id, self.location, self.detail))


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    """One conversation to train on; its image blocks name resolved sources."""

    id: str
    location: str
    messages: list[dict]


@dataclasses.dataclass(frozen=True)
class DPORecord:
    """A prompt conversation and two single assistant turns; the images belong to the prompt."""

    id: str
    location: str
    prompt: list[dict]
    chosen: dict
    rejected: dict
    images: list[str]


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt to complete (GRPO/PPO): the conversation up to the generation prompt, and the data set's
    other columns for the reward functions.

    `prompt` holds the media blocks filled with resolved sources; `images`/`videos` are those sources in
    template order. `text` is the prompt as given when it was a string (what TRL passes to reward
    functions as `prompts` for non-conversational data), else None.
    """

    id: str
    location: str
    prompt: list[dict]
    images: list
    columns: dict
    videos: list = dataclasses.field(default_factory=list)
    text: str | None = None

    @property
    def reward_prompt(self) -> str | list[dict]:
        """The prompt as reward functions see it: the original string, or the messages."""
        return self.prompt if self.text is None else self.text


Record = SFTRecord | DPORecord | PromptRecord

# Keys that make up a prompt record; every other key of the line is one of its `columns`.
PROMPT_KEYS = ("id", "prompt", "image", "images", "video", "videos")


def resolve(source: Any, base_dir: str) -> Any:
    """A relative local path is taken relative to the JSONL file's directory; anything else is kept."""
    if isinstance(source, str) and not source.startswith(_REMOTE) and not os.path.isabs(source):
        return os.path.normpath(os.path.join(base_dir, source))
    return source


def local_path(source: Any) -> str | None:
    """The filesystem path a source names, or None for URLs, data URIs and in-memory objects."""
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if not isinstance(source, str) or source.startswith(("http://", "https://", "data:")):
        return None
    if source.startswith("file://"):
        import urllib.parse
        import urllib.request

        return urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    return source


def _is_placeholder(block: Mapping, kind: str = "image") -> bool:
    sources = (kind, "url", "path", f"{kind}_url")
    return block.get("type") == kind and not any(k in block for k in sources)


class _Bad(Exception):
    """Internal: an invalid structure, turned into `BadRecord` with the record's id."""


_SOURCE = (str, bytes, os.PathLike)  # a path or URL, or encoded image bytes (Parquet image structs)


def _images_field(obj: Mapping) -> list:
    images = obj.get("images", obj.get("image", []))
    if images is None:
        return []
    if isinstance(images, _SOURCE):
        return [images]
    if not isinstance(images, list) or not all(isinstance(i, _SOURCE) for i in images):
        raise _Bad("'images' must be a list of paths or URLs")
    return list(images)


def _is_video_source(value: Any) -> bool:
    """A path, URL or frame directory, or a list of frame paths."""
    return isinstance(value, (str, os.PathLike)) or (
        isinstance(value, list) and bool(value) and all(isinstance(f, _SOURCE) for f in value)
    )


def _videos_field(obj: Mapping) -> list:
    if obj.get("videos") is not None:
        videos = obj["videos"]
        if not isinstance(videos, list) or not all(_is_video_source(v) for v in videos):
            raise _Bad("'videos' must be a list of video sources (a path or URL, or a list of frame paths)")
        return list(videos)
    if obj.get("video") is not None:
        if not _is_video_source(obj["video"]):
            raise _Bad("'video' must be a video source (a path or URL, or a list of frame paths)")
        return [obj["video"]]
    return []


def _resolve_video(source: Any, base_dir: str) -> Any:
    if isinstance(source, list):
        return [resolve(f, base_dir) for f in source]
    return resolve(source, base_dir)


def _messages(value: Any, what: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"'{what}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise _Bad(f"'{what}' message {i} must be a dict with a string 'role'")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise _Bad(f"'{what}' message {i} has no string or list 'content'")
        if isinstance(content, list) and not all(isinstance(b, Mapping) for b in content):
            raise _Bad(f"'{what}' message {i}: content blocks must be dicts")
        out.append(copy.deepcopy(dict(m)))
    return out


def _fill(messages: list[dict], images: list, base_dir: str, what: str, videos: Sequence = ()) -> None:
    """Fill the source-less image (video) blocks in order from `images` (`videos`); resolve sources
    already named."""
    media = {"image": (iter(images), len(images)), "video": (iter(videos), len(videos))}
    used = {"image": 0, "video": 0}
    for m in messages:
        if not isinstance(m.get("content"), list):
            continue
        for block in m["content"]:
            kind = next((k for k in media if _is_placeholder(block, k)), None)
            if kind is not None:
                it, n = media[kind]
                try:
                    source = next(it)
                except StopIteration:
                    raise _Bad(f"'{what}' holds more {kind} placeholders than the {n} {kind}s") from None
                block[kind] = (
                    _resolve_video(source, base_dir) if kind == "video" else resolve(source, base_dir)
                )
                used[kind] += 1
            else:
                for key in ("image", "video", "path"):
                    if isinstance(block.get(key), str):
                        block[key] = resolve(block[key], base_dir)
    for kind, (_, n) in media.items():
        if used[kind] != n:
            raise _Bad(f"'{what}' holds {used[kind]} {kind} placeholders for {n} {kind}s")


_TEXT_PLACEHOLDERS = {"<image>": "image", "<video>": "video"}


def _string_prompt(text: str, images: list, videos: list, base_dir: str) -> list[dict]:
    """A string prompt -> one user turn: media at the `<image>`/`<video>` placeholders, else before the text."""
    parts = re.split(r"(<image>|<video>)", text)
    counts = {kind: parts.count(tag) for tag, kind in _TEXT_PLACEHOLDERS.items()}
    blocks: list[dict] = []
    if not any(counts.values()):
        blocks += [{"type": "image", "image": resolve(i, base_dir)} for i in images]
        blocks += [{"type": "video", "video": _resolve_video(v, base_dir)} for v in videos]
        return [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]
    for kind, items in (("image", images), ("video", videos)):
        if counts[kind] != len(items):
            raise _Bad(f"the prompt holds {counts[kind]} <{kind}> placeholders for {len(items)} {kind}s")
    media = {"image": iter(images), "video": iter(videos)}
    for part in parts:
        kind = _TEXT_PLACEHOLDERS.get(part)
        if kind == "image":
            blocks.append({"type": "image", "image": resolve(next(media[kind]), base_dir)})
        elif kind == "video":
            blocks.append({"type": "video", "video": _resolve_video(next(media[kind]), base_dir)})
        elif part:
            blocks.append({"type": "text", "text": part})
    return [{"role": "user", "content": blocks}]


def _prompt(obj: Mapping, images: list, videos: list, base_dir: str) -> list[dict]:
    if isinstance(obj["prompt"], str):
        prompt = _string_prompt(obj["prompt"], images, videos, base_dir)
    else:
        prompt = _messages(obj["prompt"], "prompt")
        _fill(prompt, images, base_dir, "prompt", videos)
    if prompt[-1]["role"] == "assistant":
        raise _Bad("the prompt must not end with an assistant turn")
    return prompt


def rename_columns(obj: Any, columns: Mapping[str, str] | None) -> Any:
    """Apply a column mapping `{name: column}` to a decoded record: each `column` is read as `name`.

    The renamed columns are taken out of the record; a renamed column replaces any column already called
    `name`. A column the mapping names but the record lacks raises `ValueError` (an invalid record).
    """
    if not columns or not isinstance(obj, Mapping):
        return obj
    missing = [f"{source!r} (as {name!r})" for name, source in columns.items() if source not in obj]
    if missing:
        raise ValueError(
            f"no column {', '.join(missing)} given by data.columns; the record has {sorted(obj)}"
        )
    out = {k: v for k, v in obj.items() if k not in set(columns.values())}
    out.update({name: obj[source] for name, source in columns.items()})
    return out


def check_columns(columns: Any) -> dict[str, str] | None:
    """A column mapping `{name: column}` as given in a config; `ValueError` when it is not one."""
    if columns is None:
        return None
    if not isinstance(columns, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in columns.items()
    ):
        raise ValueError(f"data.columns must map record keys to column names (strings), got {columns!r:.200}")
    return dict(columns)


def _completion(value: Any, what: str) -> dict:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    msgs = _messages(value, what)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _Bad(f"'{what}' must be a string or a list of exactly one assistant message")
    return msgs[0]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"'{what}' must be a string")
    return value


def record_from_json(obj: Any, *, record_id: str, location: str, base_dir: str) -> Record:
    """A decoded JSON line -> `SFTRecord`, `DPORecord` or `PromptRecord`; `BadRecord('invalid')` when the
    shape is wrong."""
    try:
        if not isinstance(obj, Mapping):
            raise _Bad(f"a record must be a JSON object, got {type(obj).__name__}")
        if "chosen" in obj or "rejected" in obj:
            for key in ("prompt", "chosen", "rejected"):
                if key not in obj:
                    raise _Bad(f"a DPO record needs '{key}'")
            images = _images_field(obj)
            prompt = _prompt(obj, images, _videos_field(obj), base_dir)
            chosen, rejected = _completion(obj["chosen"], "chosen"), _completion(obj["rejected"], "rejected")
            return DPORecord(
                record_id, location, prompt, chosen, rejected, [resolve(i, base_dir) for i in images]
            )
        if "messages" in obj:
            messages = _messages(obj["messages"], "messages")
            _fill(messages, _images_field(obj), base_dir, "messages", _videos_field(obj))
            if not any(m["role"] == "assistant" for m in messages):
                raise _Bad("no assistant message to train on")
            return SFTRecord(record_id, location, messages)
        if "prompt" in obj:
            images, videos = _images_field(obj), _videos_field(obj)
            prompt = _prompt(obj, images, videos, base_dir)
            columns = {k: v for k, v in obj.items() if k not in PROMPT_KEYS}
            text = obj["prompt"] if isinstance(obj["prompt"], str) else None
            return PromptRecord(
                record_id, location, prompt, _media(prompt, "image"), columns, _media(prompt, "video"), text
            )
        if "suffix" in obj or "prefix" in obj:
            images = _images_field(obj)
            if len(images) != 1:
                raise _Bad(f"a prefix/suffix record needs exactly one 'image', got {len(images)}")
            prefix, suffix = _text(obj.get("prefix"), "prefix"), _text(obj.get("suffix"), "suffix")
            user = [
                {"type": "image", "image": resolve(images[0], base_dir)},
                {"type": "text", "text": prefix},
            ]
            return SFTRecord(
                record_id,
                location,
                [{"role": "user", "content": user}, {"role": "assistant", "content": suffix}],
            )
        raise _Bad(
            f"unknown record format with keys {sorted(obj)}; expected prefix/suffix, messages, "
            "prompt/chosen/rejected, or prompt"
        )
    except _Bad as err:
        raise BadRecord("invalid", record_id, location, str(err)) from None


def record_from_obj(
    obj: Any, *, location: str, base_dir: str, columns: Mapping[str, str] | None = None
) -> Record:
    """A decoded record (a JSON line, a Parquet row) -> a record, after the column mapping; its id is its
    `"id"` field, else `location`."""
    record_id = location
    if isinstance(obj, Mapping) and obj.get("id") is not None:
        record_id = str(obj["id"])
    if isinstance(obj, Mapping) and columns:
        try:
            obj = rename_columns(obj, columns)
        except ValueError as err:
            raise BadRecord("invalid", record_id, location, str(err)) from None
        record_id = str(obj["id"]) if obj.get("id") is not None else location
    return record_from_json(obj, record_id=record_id, location=location, base_dir=base_dir)


def parse_line(
    text: str | bytes, *, path: str, line: int, columns: Mapping[str, str] | None = None
) -> Record:
    """One JSONL line (1-based `line` of the file `path`) -> a record; `BadRecord` names id and file:line."""
    location = f"{path}:{line}"
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRecord("malformed_json", location, location, str(err)) from None
    return record_from_obj(obj, location=location, base_dir=os.path.dirname(path), columns=columns)


def read_jsonl(
    path: str | os.PathLike, *, columns: Mapping[str, str] | None = None
) -> list[Record | BadRecord]:
    """Every non-blank line of a file as a record, or the `BadRecord` it raised (for inspection and tests)."""
    path = os.fspath(path)
    out: list[Record | BadRecord] = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    out.append(parse_line(raw, path=path, line=i, columns=columns))
                except BadRecord as err:
                    out.append(err)
    return out


def _media(messages: Sequence[Mapping], kind: str) -> list:
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            out += [b[kind] for b in m["content"] if b.get("type") == kind and kind in b]
    return out


def record_images(record: Record) -> list:
    """The image sources of a record, in template order."""
    return _media(record.messages if isinstance(record, SFTRecord) else record.prompt, "image")
