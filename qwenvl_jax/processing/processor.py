"""`Processor`: the HF-compatible facade over images, videos, chat template and tokenizer.

`Processor.from_pretrained(dir)` reads an HF Qwen2.5-VL checkpoint directory; `processor(text=...,
images=..., videos=...)` returns the same numpy arrays, under the same keys, as transformers'
`Qwen2_5_VLProcessor` with the PIL image backend. `encode_chat` goes one step further for training and
inference: conversations whose content blocks name their images and videos (paths, URLs, bytes, PIL,
arrays) become ids, masks, assistant-only labels and pixels in one call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.processing.chat import (
    ChatTemplate,
    expand_placeholders,
    normalize_messages,
    shift_span,
    span_token_mask,
    vision_items,
)
from qwenvl_jax.processing.errors import InputError, describe
from qwenvl_jax.processing.image import ImageConfig, process_image
from qwenvl_jax.processing.tokenizer import Tokenizer
from qwenvl_jax.processing.video import process_video
from qwenvl_jax.processing.video_sampling import VideoConfig

IGNORE_INDEX = -100

# Per-item options a content block may carry (qwen-vl-utils names).
_IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
_VIDEO_OPTIONS = (
    "min_pixels", "max_pixels", "total_pixels", "resized_height", "resized_width", "fps", "nframes",
    "video_start", "video_end", "sample_fps",
)  # fmt: skip


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _flatten_images(items) -> list:
    """HF accepts images flat or nested per sample; both mean the same order across the batch."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    out = []
    for item in items:
        out.extend(item) if isinstance(item, (list, tuple)) else out.append(item)
    return out


def _video_list(items) -> list:
    """Videos come as a flat list, since one video may itself be a list of frames."""
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _media_source(block: Mapping[str, Any], kind: str):
    for key in (kind, f"{kind}_url", "url", "path"):
        if key in block:
            value = block[key]
            return value.get("url") if isinstance(value, Mapping) else value
    raise InputError(f"{kind} block {dict(block)!r:.120} names no source ('{kind}', 'url' or 'path')")


class Processor:
    """Turns text, images and videos into the arrays Qwen2.5-VL consumes, equal to HF's processor output."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate,
        image_config: ImageConfig = ImageConfig(),
        video_config: VideoConfig = VideoConfig(),
        *,
        image_token: str = "<|image_pad|>",
        video_token: str = "<|video_pad|>",
        vision_start_token: str = "<|vision_start|>",
        vision_end_token: str = "<|vision_end|>",
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_config = image_config
        self.video_config = video_config
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        self.video_token_id = tokenizer.token_to_id(video_token)
        self.vision_start_token_id = tokenizer.token_to_id(vision_start_token)
        self.vision_end_token_id = tokenizer.token_to_id(vision_end_token)
        if tokenizer.pad_token_id is None:
            raise InputError(
                "the tokenizer defines no pad token (pad_token or eos_token in tokenizer_config.json)"
            )
        self.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, directory: str | Path, **image_overrides: Any) -> Processor:
        """Read `preprocessor_config.json`, the tokenizer files and the chat template of an HF directory."""
        directory = Path(directory)
        if not directory.is_dir():
            raise InputError(f"{directory}: not a directory")
        pre = _read_json(directory / "preprocessor_config.json")
        video_pre = _read_json(directory / "video_preprocessor_config.json")
        image_config = ImageConfig.from_preprocessor_config({**pre, **image_overrides})
        video_config = VideoConfig.from_preprocessor_config(video_pre) if video_pre else VideoConfig()
        tokenizer = Tokenizer.from_pretrained(directory)
        template = None
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        elif (directory / "chat_template.json").exists():
            template = _read_json(directory / "chat_template.json").get("chat_template")
        else:
            template = _read_json(directory / "tokenizer_config.json").get("chat_template")
        if isinstance(template, list):  # several named templates: transformers uses "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        special = {
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "bos_token": tokenizer.bos_token,
        }
        return cls(tokenizer, ChatTemplate(template, special), image_config, video_config)

    # ----------------------------------------------------------------------------------------- text
    def apply_chat_template(
        self, conversation, *, add_generation_prompt: bool = False, **kwargs: Any
    ) -> str | list[str]:
        """The prompt string(s) HF's `apply_chat_template(..., tokenize=False)` returns."""
        batched = (
            isinstance(conversation, (list, tuple))
            and bool(conversation)
            and isinstance(conversation[0], (list, tuple))
        )
        convs = conversation if batched else [conversation]
        out = [
            self.chat_template.render(
                c, add_generation_prompt=add_generation_prompt, name=f"conversation {i}", **kwargs
            )
            for i, c in enumerate(convs)
        ]
        return out if batched else out[0]

    # ---------------------------------------------------------------------------------------- media
    def _images(self, images: Sequence, options: Sequence[Mapping] | None = None):
        patches, grids = [], []
        for i, image in enumerate(images):
            opts = dict(options[i]) if options else {}
            p, g = process_image(image, self.image_config, name=f"image {i} ({describe(image)})", **opts)
            patches.append(p)
            grids.append(g)
        return np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int64).reshape(-1, 3)

    def _videos(self, videos: Sequence, options: Sequence[Mapping] | None = None, second_per_grid_ts=None):
        patches, grids, spg = [], [], []
        for i, video in enumerate(videos):
            opts = dict(options[i]) if options else {}
            p, g, s = process_video(video, self.video_config, name=f"video {i} ({describe(video)})", **opts)
            patches.append(p)
            grids.append(g)
            spg.append(s)
        if second_per_grid_ts is not None:
            spg = list(np.broadcast_to(np.asarray(second_per_grid_ts, dtype=np.float32), (len(videos),)))
        return (
            np.concatenate(patches, axis=0),
            np.asarray(grids, dtype=np.int64).reshape(-1, 3),
            np.asarray(spg, dtype=np.float32),
        )

    # ------------------------------------------------------------------------------------ HF facade
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        videos=None,
        *,
        padding: bool | str = False,
        padding_side: str = "right",
        max_length: int | None = None,
        truncation: bool = False,
        second_per_grid_ts=None,
        return_tensors: str | None = "np",
        **_ignored: Any,
    ) -> dict[str, np.ndarray]:
        """Same keys and values as HF `Qwen2_5_VLProcessor.__call__` (numpy arrays; ids int64)."""
        if return_tensors not in (None, "np"):
            raise InputError(
                f"return_tensors={return_tensors!r}: the host pipeline returns numpy arrays only"
            )
        if text is None:
            raise InputError("text is required: Qwen2.5-VL consumes images through placeholders in the text")
        texts = [text] if isinstance(text, str) else list(text)
        image_list, video_list = _flatten_images(images), _video_list(videos)
        out: dict[str, np.ndarray] = {}
        image_tokens, video_tokens = [], []
        if image_list:
            pv, grid = self._images(image_list)
            out["pixel_values"], out["image_grid_thw"] = pv, grid
            image_tokens = list(grid.prod(-1) // self.image_config.merge_size**2)
        if video_list:
            pv, grid, spg = self._videos(video_list, second_per_grid_ts=second_per_grid_ts)
            out["pixel_values_videos"], out["video_grid_thw"], out["second_per_grid_ts"] = pv, grid, spg
            video_tokens = list(grid.prod(-1) // self.video_config.merge_size**2)
        expanded, _ = expand_placeholders(
            texts, image_tokens, video_tokens, image_token=self.image_token, video_token=self.video_token
        )
        ids = self.tokenizer.encode_batch(expanded)
        ids = [self._truncate(row, max_length, i) for i, row in enumerate(ids)] if truncation else ids
        text_out = self.pad(
            [{"input_ids": row} for row in ids],
            padding=padding,
            padding_side=padding_side,
            max_length=max_length,
        )
        return {**text_out, **out}

    def _truncate(self, ids: list[int], max_length: int | None, index: int) -> list[int]:
        """Keep the first `max_length` tokens; refuse a cut inside a vision span, which would leave the
        number of placeholders different from the number of features."""
        if max_length is None or len(ids) <= max_length:
            return ids
        kept = np.asarray(ids[:max_length])
        starts = np.flatnonzero(kept == self.vision_start_token_id)
        ends = np.flatnonzero(kept == self.vision_end_token_id)
        if starts.size and (not ends.size or ends[-1] < starts[-1]):
            raise InputError(
                f"text {index}: truncation to {max_length} tokens would cut through an image or video"
            )
        return kept.tolist()

    def token_types(self, ids: np.ndarray) -> np.ndarray:
        """mm_token_type_ids: 1 on image placeholders, 2 on video placeholders, 0 elsewhere."""
        ids = np.asarray(ids)
        return np.where(ids == self.image_token_id, 1, np.where(ids == self.video_token_id, 2, 0)).astype(
            np.int64
        )

    def pad(
        self,
        rows: Sequence[Mapping[str, Sequence[int]]],
        *,
        padding: bool | str = True,
        padding_side: str = "right",
        max_length: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Pad per-sample `input_ids` (and `labels` when present) into int64 arrays.

        Pad id is the tokenizer's pad token, `attention_mask` and `mm_token_type_ids` are 0 on padding and
        `labels` are -100 there. Left padding is for generation, right padding for training.
        """
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        lengths = [len(r["input_ids"]) for r in rows]
        if padding in (False, "do_not_pad"):
            if len(set(lengths)) > 1:
                raise InputError(f"texts have different lengths {lengths}; pass padding=True to pad them")
            width = lengths[0]
        elif padding in (True, "longest"):
            width = max(lengths)
        elif padding == "max_length":
            if max_length is None or max_length < max(lengths):
                raise InputError(f"padding='max_length' needs max_length >= {max(lengths)}, got {max_length}")
            width = max_length
        else:
            raise InputError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        batch = len(rows)
        ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int64) if "labels" in rows[0] else None
        for i, row in enumerate(rows):
            n = lengths[i]
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[i, sl] = row["input_ids"]
            mask[i, sl] = 1
            if labels is not None:
                labels[i, sl] = row["labels"]
        out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": self.token_types(ids) * mask}
        if labels is not None:
            out["labels"] = labels
        return out

    # ------------------------------------------------------------------------------ conversations
    def encode_chat(
        self,
        conversations: Sequence[Sequence[Mapping[str, Any]]],
        *,
        add_generation_prompt: bool = False,
        labels: bool = False,
        mask_vision_tokens: bool = False,
        padding_side: str = "right",
        padding: bool | str = True,
        max_length: int | None = None,
        **template_kwargs: Any,
    ) -> dict[str, np.ndarray]:
        """Conversations with media in their content blocks -> model-ready numpy arrays.

        Images and videos are read from the blocks (`{"type": "image", "image": path_or_url, "max_pixels":
        ...}`, qwen-vl-utils style per-item options included), in template order. With `labels=True` the
        result carries `labels`: token ids on assistant turns (content and end-of-turn marker, as TRL's
        assistant-only loss), -100 elsewhere; `mask_vision_tokens=True` also masks vision placeholders.
        """
        texts, spans_per_conv, image_src, image_opt, video_src, video_opt = [], [], [], [], [], []
        for i, conv in enumerate(conversations):
            name = f"conversation {i}"
            msgs = normalize_messages(conv, name=name)
            texts.append(
                self.chat_template.render(
                    msgs, add_generation_prompt=add_generation_prompt, name=name, **template_kwargs
                )
            )
            if labels:
                spans_per_conv.append(self.chat_template.assistant_spans(msgs, name=name, **template_kwargs))
            imgs, vids = vision_items(msgs)
            image_src += [_media_source(b, "image") for b in imgs]
            image_opt += [{k: b[k] for k in _IMAGE_OPTIONS if k in b} for b in imgs]
            video_src += [_media_source(b, "video") for b in vids]
            video_opt += [{k: b[k] for k in _VIDEO_OPTIONS if k in b} for b in vids]
        out: dict[str, np.ndarray] = {}
        image_tokens, video_tokens = [], []
        if image_src:
            pv, grid = self._images(image_src, image_opt)
            out["pixel_values"], out["image_grid_thw"] = pv, grid
            image_tokens = list(grid.prod(-1) // self.image_config.merge_size**2)
        if video_src:
            pv, grid, spg = self._videos(video_src, video_opt)
            out["pixel_values_videos"], out["video_grid_thw"], out["second_per_grid_ts"] = pv, grid, spg
            video_tokens = list(grid.prod(-1) // self.video_config.merge_size**2)
        expanded, shifts = expand_placeholders(
            texts, image_tokens, video_tokens, image_token=self.image_token, video_token=self.video_token
        )
        rows = []
        for i, (ids, offsets) in enumerate(self.tokenizer.encode_batch_with_offsets(expanded)):
            row: dict[str, Any] = {"input_ids": ids}
            if labels:
                spans = [shift_span(s, shifts[i]) for s in spans_per_conv[i]]
                keep = span_token_mask(offsets, spans).astype(bool)
                if mask_vision_tokens:
                    vision = (
                        self.image_token_id,
                        self.video_token_id,
                        self.vision_start_token_id,
                        self.vision_end_token_id,
                    )
                    keep &= ~np.isin(np.asarray(ids), vision)
                row["labels"] = np.where(keep, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)
            if max_length is not None and len(ids) > max_length:
                raise InputError(f"conversation {i}: {len(ids)} tokens, more than max_length={max_length}")
            rows.append(row)
        return {**self.pad(rows, padding=padding, padding_side=padding_side, max_length=max_length), **out}
