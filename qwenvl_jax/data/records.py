"""JSONL lines -> normalised records: one conversation (SFT) or one prompt with two completions (DPO).

Three line formats are recognised by their keys:

- (a) SFT document parsing: `{"image": path, "prefix": str, "suffix": str}` -> user `[image, prefix]`,
  assistant `suffix`.
- (b) conversational: `{"messages": [...], "images": [...]}`; every `{"type": "image"}` block that names no
  source is filled, in template order, from `images`. Placeholders and images must be equal in number.
- (c) DPO (RLAIF-V / TRL preference style): `{"images": [...], "prompt": str | messages, "chosen": str |
  messages, "rejected": str | messages}`. A string prompt becomes one user turn holding the images then
  the text; a messages prompt has its image placeholders filled as in (b). Chosen and rejected are one
  assistant turn each (a string, or a list holding one assistant message).

`image` (a single source) is accepted wherever `images` is. Relative image paths resolve against the JSONL
file's directory; absolute paths, `file://`, `http(s)://` and `data:` sources are kept as they are. Every
record has an `id`: the line's `"id"` field, else `"<file>:<line>"` (1-based). A line that cannot become a
record raises `BadRecord` naming the id and `file:line`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
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


Record = SFTRecord | DPORecord


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


def _is_placeholder(block: Mapping) -> bool:
    return block.get("type") == "image" and not any(k in block for k in ("image", "url", "path", "image_url"))


class _Bad(Exception):
    """Internal: an invalid structure, turned into `BadRecord` with the record's id."""


def _images_field(obj: Mapping) -> list:
    images = obj.get("images", obj.get("image", []))
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike)):
        return [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise _Bad("'images' must be a list of paths or URLs")
    return list(images)


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


def _fill(messages: list[dict], images: list, base_dir: str, what: str) -> None:
    """Fill the source-less image blocks in order from `images`; resolve sources already named."""
    it = iter(images)
    used = 0
    for m in messages:
        if not isinstance(m.get("content"), list):
            continue
        for block in m["content"]:
            if _is_placeholder(block):
                try:
                    block["image"] = resolve(next(it), base_dir)
                except StopIteration:
                    raise _Bad(
                        f"'{what}' holds more image placeholders than the {len(images)} images"
                    ) from None
                used += 1
            else:
                for key in ("image", "video", "path"):
                    if isinstance(block.get(key), str):
                        block[key] = resolve(block[key], base_dir)
    if used != len(images):
        raise _Bad(f"'{what}' holds {used} image placeholders for {len(images)} images")


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
    """A decoded JSON line -> `SFTRecord` or `DPORecord`; `BadRecord('invalid')` when the shape is wrong."""
    try:
        if not isinstance(obj, Mapping):
            raise _Bad(f"a record must be a JSON object, got {type(obj).__name__}")
        if "chosen" in obj or "rejected" in obj:
            for key in ("prompt", "chosen", "rejected"):
                if key not in obj:
                    raise _Bad(f"a DPO record needs '{key}'")
            images = _images_field(obj)
            if isinstance(obj["prompt"], str):
                blocks = [{"type": "image", "image": resolve(i, base_dir)} for i in images]
                prompt = [{"role": "user", "content": [*blocks, {"type": "text", "text": obj["prompt"]}]}]
            else:
                prompt = _messages(obj["prompt"], "prompt")
                _fill(prompt, images, base_dir, "prompt")
            if prompt[-1]["role"] == "assistant":
                raise _Bad("the DPO prompt must not end with an assistant turn")
            chosen, rejected = _completion(obj["chosen"], "chosen"), _completion(obj["rejected"], "rejected")
            return DPORecord(
                record_id, location, prompt, chosen, rejected, [resolve(i, base_dir) for i in images]
            )
        if "messages" in obj:
            messages = _messages(obj["messages"], "messages")
            _fill(messages, _images_field(obj), base_dir, "messages")
            if not any(m["role"] == "assistant" for m in messages):
                raise _Bad("no assistant message to train on")
            return SFTRecord(record_id, location, messages)
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
            f"unknown record format with keys {sorted(obj)}; expected prefix/suffix, messages, or "
            "prompt/chosen/rejected"
        )
    except _Bad as err:
        raise BadRecord("invalid", record_id, location, str(err)) from None


def parse_line(text: str | bytes, *, path: str, line: int) -> Record:
    """One JSONL line (1-based `line` of the file `path`) -> a record; `BadRecord` names id and file:line."""
    location = f"{path}:{line}"
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRecord("malformed_json", location, location, str(err)) from None
    record_id = location
    if isinstance(obj, Mapping) and obj.get("id") is not None:
        record_id = str(obj["id"])
    return record_from_json(obj, record_id=record_id, location=location, base_dir=os.path.dirname(path))


def read_jsonl(path: str | os.PathLike) -> list[Record | BadRecord]:
    """Every non-blank line of a file as a record, or the `BadRecord` it raised (for inspection and tests)."""
    path = os.fspath(path)
    out: list[Record | BadRecord] = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    out.append(parse_line(raw, path=path, line=i))
                except BadRecord as err:
                    out.append(err)
    return out


def record_images(record: Record) -> list:
    """The image sources of a record, in template order."""
    messages: Sequence[Mapping] = record.prompt if isinstance(record, DPORecord) else record.messages
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            out += [b["image"] for b in m["content"] if b.get("type") == "image" and "image" in b]
    return out
