"""Synthetic shape images for offline training runs: "What is in the image?" -> "A red circle.".

Each image is one filled shape (circle, square or triangle) in one colour (red, green or blue) on white.
Two writers:

- `write_synthetic_data(out_dir, num, size=, seed=)`: `num` SFT records (format (a) of `records.py`), the
  data of `data: {synthetic: N}` in the training loop.
- `write_shape_task(out_dir, num_train=, num_heldout=, ...)`: a small supervised task with a HELD-OUT
  split whose images appear nowhere in the training split, and preference pairs (format (c)) for DPO on
  both splits: chosen = the true answer, rejected = the same sentence with the colour or the shape wrong
  (`rejected=` picks which). Position and size of the shape vary, so an image is identified by (shape,
  colour, centre, radius) and the two splits are drawn without replacement from those keys.

Host side only: numpy and PIL.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}
QUESTION = "What is in the image?"


def answer(color: str, shape: str) -> str:
    """The target sentence of an image: `answer("red", "circle") == "A red circle."`."""
    return f"A {color} {shape}."


def draw_shape(shape: str, color: str, *, size: int, center: tuple[int, int], radius: int):
    """A `size` x `size` white RGB image with one filled `shape` of `radius` around `center`."""
    from PIL import Image, ImageDraw

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if color not in COLORS:
        raise ValueError(f"color must be one of {tuple(COLORS)}, got {color!r}")
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    (cx, cy), r = center, radius
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return image


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def write_synthetic_data(out_dir: Path, num: int, *, size: int = 56, seed: int = 0) -> Path:
    """`num` SFT records (one drawn shape each, "What is in the image?" -> "A red circle.") and their PNGs
    under `out_dir`; deterministic in `seed`, written once (kept if the JSONL already exists)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "synthetic.jsonl"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num):
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        center = (size // 2 + int(rng.integers(-4, 5)), size // 2 + int(rng.integers(-4, 5)))
        name = f"img_{i:05d}.png"
        draw_shape(shape, color, size=size, center=center, radius=size // 4).save(out_dir / name)
        rows.append({"id": f"syn{i}", "image": name, "prefix": QUESTION, "suffix": answer(color, shape)})
    return _write_jsonl(path, rows)


# ------------------------------------------------------------------------------------------ the task
@dataclasses.dataclass(frozen=True)
class ShapeExample:
    """One image of the task, its true answer and the wrong answer its preference pair rejects."""

    id: str
    image: Path
    shape: str
    color: str
    rejected: str

    @property
    def answer(self) -> str:
        return answer(self.color, self.shape)


@dataclasses.dataclass(frozen=True)
class ShapeTask:
    """The files `write_shape_task` wrote, and the examples behind them."""

    sft: Path  # training split, SFT records
    dpo: Path  # training split, preference pairs
    heldout_sft: Path  # held-out split, SFT records (the reference answers)
    heldout_dpo: Path  # held-out split, preference pairs
    grpo: Path  # training split, prompts with their `solution` (GRPO)
    heldout_grpo: Path  # held-out split, prompts with their `solution`
    train: tuple[ShapeExample, ...]
    heldout: tuple[ShapeExample, ...]


REJECTED = ("either", "color", "shape")


def _wrong_answer(rng: np.random.Generator, color: str, shape: str, rejected: str) -> str:
    """The true sentence with exactly one attribute changed: the colour, the shape, or either (equally
    often)."""
    if rejected == "color" or (rejected == "either" and rng.integers(2)):
        others = [c for c in COLORS if c != color]
        return answer(others[rng.integers(len(others))], shape)
    others = [s for s in SHAPES if s != shape]
    return answer(color, others[rng.integers(len(others))])


def write_shape_task(
    out_dir: str | Path,
    *,
    num_train: int,
    num_heldout: int,
    size: int = 56,
    radius: tuple[int, int] | None = None,
    rejected: str = "either",
    seed: int = 0,
) -> ShapeTask:
    """Write the shape task (PNGs and four JSONL files) under `out_dir`; deterministic in its arguments.

    The shape's radius is drawn from `radius` = [lo, hi) (default [size/6, size/3)) and its centre keeps
    the whole shape inside the image; every image key (shape, colour, centre, radius) occurs at most once
    over both splits. `rejected` says which attribute the rejected answer of a pair gets wrong: "color",
    "shape", or "either" (one of the two per pair, equally often).
    """
    if rejected not in REJECTED:
        raise ValueError(f"rejected must be one of {REJECTED}, got {rejected!r}")
    if num_train < 1 or num_heldout < 1:
        raise ValueError(f"num_train and num_heldout must be >= 1, got {num_train} and {num_heldout}")
    if size < 28:
        raise ValueError(f"size must be >= 28 (two 14-pixel patches), got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    r_lo, r_hi = radius or (max(size // 6, 3), max(size // 3, size // 6 + 1))
    if not 1 <= r_lo < r_hi <= size // 2:
        raise ValueError(f"radius must be [lo, hi) with 1 <= lo < hi <= size/2 = {size // 2}, got {radius}")
    seen: set[tuple] = set()
    examples: list[ShapeExample] = []
    total = num_train + num_heldout
    attempts = 0
    while len(examples) < total:
        attempts += 1
        if attempts > 100 * total:
            raise ValueError(f"size {size} has too few distinct images for {total} examples")
        shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
        r = int(rng.integers(r_lo, r_hi))
        center = tuple(int(c) for c in rng.integers(r, size - r, size=2))
        key = (shape, color, center, r)
        if key in seen:
            continue
        seen.add(key)
        split = "train" if len(examples) < num_train else "heldout"
        index = len(examples) if split == "train" else len(examples) - num_train
        name = f"{split}_{index:05d}.png"
        draw_shape(shape, color, size=size, center=center, radius=r).save(out_dir / name)
        examples.append(
            ShapeExample(
                f"{split}{index}", out_dir / name, shape, color, _wrong_answer(rng, color, shape, rejected)
            )
        )
    train, heldout = tuple(examples[:num_train]), tuple(examples[num_train:])

    def sft_rows(split):
        return [{"id": e.id, "image": e.image.name, "prefix": QUESTION, "suffix": e.answer} for e in split]

    def dpo_rows(split):
        return [
            {
                "id": e.id,
                "images": [e.image.name],
                "prompt": QUESTION,
                "chosen": e.answer,
                "rejected": e.rejected,
            }
            for e in split
        ]

    def grpo_rows(split):
        return [
            {"id": e.id, "images": [e.image.name], "prompt": QUESTION, "solution": e.answer} for e in split
        ]

    return ShapeTask(
        grpo=_write_jsonl(out_dir / "grpo.jsonl", grpo_rows(train)),
        heldout_grpo=_write_jsonl(out_dir / "heldout_grpo.jsonl", grpo_rows(heldout)),
        sft=_write_jsonl(out_dir / "sft.jsonl", sft_rows(train)),
        dpo=_write_jsonl(out_dir / "dpo.jsonl", dpo_rows(train)),
        heldout_sft=_write_jsonl(out_dir / "heldout_sft.jsonl", sft_rows(heldout)),
        heldout_dpo=_write_jsonl(out_dir / "heldout_dpo.jsonl", dpo_rows(heldout)),
        train=train,
        heldout=heldout,
    )


def shape_reward(completions, solution, **kwargs) -> list[float]:
    """The shape task's verifiable reward (TRL's reward-function signature): 0.5 for the right colour word
    and 0.5 for the right shape word, minus 0.5 for each wrong one named; 1.0 exactly for the whole answer
    and no other colour or shape. A dense signal a tiny model can climb by reward alone."""
    out = []
    for completion, gold in zip(completions, solution, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        words = set(text.lower().replace(".", " ").split())
        color = next(c for c in COLORS if c in gold.lower())
        shape = next(s for s in SHAPES if s in gold.lower())
        score = 0.5 * (color in words) + 0.5 * (shape in words)
        score -= 0.5 * len(words & (set(COLORS) - {color})) + 0.5 * len(words & (set(SHAPES) - {shape}))
        out.append(float(score))
    return out
