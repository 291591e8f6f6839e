"""Chat template rendering, vision placeholder expansion and assistant-only label spans.

The template is rendered by jinja2 in the same sandboxed environment transformers uses
(`trim_blocks`, `lstrip_blocks`, `loopcontrols`, its `tojson`, `raise_exception`, `strftime_now`), on
messages normalised the way transformers normalises them (keys whose value is None dropped, OpenAI
`image_url` blocks turned into image blocks, media objects replaced by inert strings), so the string is
the one HF's `apply_chat_template` returns.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import Any

import numpy as np

from qwenvl_jax.processing.errors import InputError

Message = Mapping[str, Any]


@functools.cache
def default_chat_template() -> str:
    """The Qwen2.5-VL template (all sizes share it), used when a checkpoint ships none."""
    return (
        resources.files("qwenvl_jax.processing").joinpath("qwen2_5_vl_chat_template.jinja").read_text("utf-8")
    )


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """JSON-typed copy of template data; media objects become an inert string (templates test presence only)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Message], *, name: str = "conversation") -> list[dict]:
    """Validate and normalise one conversation as transformers does before rendering."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InputError(f"{name}: a conversation must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise InputError(
                f"{name}, message {i}: a message must be a dict with a 'role', got {message!r:.80}"
            )
        msg = {k: v for k, v in message.items() if v is not None}
        content = msg.get("content")
        if isinstance(content, list):
            blocks = []
            for block in content:
                if isinstance(block, Mapping) and block.get("type") == "image_url" and "image_url" in block:
                    url = block["image_url"]
                    url = url.get("url", "") if isinstance(url, Mapping) else url
                    block = {"type": "image", "url": url}
                elif not isinstance(block, Mapping):
                    raise InputError(f"{name}, message {i}: content blocks must be dicts, got {block!r:.80}")
                blocks.append(block)
            msg["content"] = blocks
        out.append(msg)
    return out


def vision_items(messages: Sequence[Message]) -> tuple[list[dict], list[dict]]:
    """The image and video content blocks of a conversation, in the order the template places them."""
    images, videos = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if block.get("type") == "image" or "image" in block or "image_url" in block:
                images.append(block)
            elif block.get("type") == "video" or "video" in block:
                videos.append(block)
    return images, videos


class ChatTemplate:
    """A compiled chat template plus the special-token variables transformers passes to it."""

    def __init__(self, template: str | None = None, special_tokens: Mapping[str, Any] | None = None):
        self.source = template if template is not None else default_chat_template()
        self._template = _compile(self.source)
        self._special = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        name: str = "conversation",
        **kwargs: Any,
    ) -> str:
        import jinja2

        msgs = normalize_messages(messages, name=name)
        try:
            return self._template.render(
                messages=_plain(msgs),
                tools=_plain(kwargs.pop("tools", None)),
                documents=_plain(kwargs.pop("documents", None)),
                add_generation_prompt=add_generation_prompt,
                **_plain({**self._special, **kwargs}),
            )
        except jinja2.exceptions.TemplateError as err:
            raise InputError(f"{name}: the chat template refused it: {err}") from err

    def assistant_spans(
        self, messages: Sequence[Message], *, name: str = "conversation", **kwargs
    ) -> list[tuple[int, int]]:
        """Character spans of each assistant turn in `render(messages)`: content plus the end-of-turn marker.

        Found by rendering prefixes: the turn starts after `render(messages[:i], add_generation_prompt=True)`
        and ends at `render(messages[:i+1])`. For the Qwen template that is the content plus
        `<|im_end|>\\n`, the same span TRL's assistant mask covers; the `<|im_start|>assistant\\n` cue is
        excluded. A template whose renders are not prefixes of each other is refused, not guessed.
        """
        full = self.render(messages, name=name, **kwargs)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            head = self.render(messages[:i], add_generation_prompt=True, name=name, **kwargs) if i else ""
            upto = self.render(messages[: i + 1], name=name, **kwargs)
            if not (full.startswith(upto) and upto.startswith(head)):
                raise InputError(
                    f"{name}: the chat template does not render turn {i} as a prefix; cannot mask"
                )
            spans.append((len(head), len(upto)))
        if not spans:
            raise InputError(f"{name}: no assistant message to train on")
        return spans


def expand_placeholders(
    texts: Sequence[str],
    image_tokens: Sequence[int],
    video_tokens: Sequence[int],
    *,
    image_token: str = "<|image_pad|>",
    video_token: str = "<|video_pad|>",
) -> tuple[list[str], list[list[tuple[int, int, int]]]]:
    """Replace the k-th placeholder (counted across the batch) by `tokens[k]` copies of itself.

    Returns the expanded texts and, per text, `(old_pos, new_pos, delta)` shift points so that character
    spans computed on the unexpanded text can be moved onto the expanded one.
    """
    n_img = sum(t.count(image_token) for t in texts)
    n_vid = sum(t.count(video_token) for t in texts)
    if n_img != len(image_tokens):
        raise InputError(
            f"the texts hold {n_img} {image_token} placeholders but {len(image_tokens)} images were given"
        )
    if n_vid != len(video_tokens):
        raise InputError(
            f"the texts hold {n_vid} {video_token} placeholders but {len(video_tokens)} videos were given"
        )
    pattern = re.compile("|".join(re.escape(t) for t in (image_token, video_token)))
    counts = {image_token: iter(image_tokens), video_token: iter(video_tokens)}
    out, shifts = [], []
    for text in texts:
        pieces, last, delta, text_shifts = [], 0, 0, []
        for m in pattern.finditer(text):
            n = int(next(counts[m.group()]))
            pieces.append(text[last : m.start()])
            pieces.append(m.group() * n)
            last = m.end()
            delta += len(m.group()) * (n - 1)
            text_shifts.append((m.end(), m.end() + delta, delta))
        pieces.append(text[last:])
        out.append("".join(pieces))
        shifts.append(text_shifts)
    return out, shifts


def shift_span(span: tuple[int, int], shifts: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """Move a character span of an unexpanded text onto the expanded text (see `expand_placeholders`)."""

    def move(pos: int) -> int:
        delta = 0
        for old_end, _, d in shifts:
            if old_end <= pos:
                delta = d
        return pos + delta

    return move(span[0]), move(span[1])


def span_token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose first character lies inside one of the spans."""
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=np.int64)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return mask
