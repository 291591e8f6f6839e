"""`qwenvl-jax demo`: SFT then DPO of a tiny random-weight Qwen2.5-VL on synthetic shape images, on CPU.

Offline and measured: every figure it prints comes from the runs it makes.

1. Writes the tiny tokenizer/processor (`tiny.py`) and the shape task (`data/synthetic.py`): training
   images, held-out images that no run trains on, and preference pairs.
2. Evaluates the random model (the tiny preset, as the SFT run builds it) on the held-out split.
3. SFT with the training loop (`train.loop.train`) from that model; evaluates `sft/final`.
4. DPO with the training loop from `sft/final` (reference: that model, frozen); evaluates `dpo/final`.
5. Prints the held-out figures of the three models side by side, with sample answers, and writes them
   to `report.json` beside the runs.

Held-out figures: the greedy answer (`generate`, temperature 0) compared with the true sentence (exact,
colour word, shape word), and on the held-out preference pairs the summed log-prob of the true answer
minus that of the wrong one under the model being evaluated (its "margin"; "prefers" = margin > 0).

Two choices that the figures rest on (seed 0, measured with `run_demo(out, replace(FULL, dpo_loss=...))`):
- The pairs reject a wrong SHAPE. Colour is the mean pixel and the SFT model names it right on every
  held-out image, so a wrong-colour pair teaches nothing it does not already know; the shape is what it
  still gets wrong.
- The DPO phase optimises the sigmoid DPO loss plus the chosen answer's NLL (RPO, arXiv 2404.19733; TRL's
  `rpo_alpha`): held-out exact answers 30/48 after SFT -> 42/48. With the sigmoid loss alone, 38/48 and
  the colour slips (45/48): the tiny byte-level vocabulary spells a word in 2-5 tokens, and the loss can
  lower the rejected answer's log-prob through the spelling tokens after the first one, which true
  answers share (answers like "A greenircle." appear). Plain SFT on the chosen answers for the same 100 steps
  (`dpo_loss=("sft",)`) reaches 44/48: what the demo shows is the SFT -> DPO pipeline working and
  measured, not that preference optimisation beats more SFT on this task.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np
from flax import nnx

import qwenvl_jax
from qwenvl_jax import losses
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.pipeline import make_batches
from qwenvl_jax.data.synthetic import QUESTION, ShapeExample, ShapeTask, write_shape_task
from qwenvl_jax.loading import param_count, random_model
from qwenvl_jax.processing import BatchSpec, Processor
from qwenvl_jax.tiny import write_tiny_checkpoint
from qwenvl_jax.train.logger import format_duration, read_metrics
from qwenvl_jax.train.loop import train
from qwenvl_jax.train.step import token_stats

MARKER = ".qwenvl_jax_demo"  # marks a directory the demo may clear and rewrite
_OWNED = (MARKER, "processor", "data", "sft", "dpo", "report.json")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    num_train: int = 300
    num_heldout: int = 48
    image_size: int = 56  # 4 x 4 patches of 14 pixels -> 4 image tokens after the 2 x 2 merge
    # One radius, shifted around the image. Shapes of varying size (radius 9-18) did not generalise to
    # held-out images within the time budget: the 4-block, 32-wide vision tower learns colour only.
    radius: tuple[int, int] = (14, 15)
    batch_size: int = 8  # SFT records or DPO pairs per step
    sft_steps: int = 150
    sft_lr: float = 1e-3
    dpo_steps: int = 100
    dpo_lr: float = 3e-4
    dpo_beta: float = 0.5
    dpo_loss: tuple[str, ...] = ("sigmoid", "sft")  # `losses.dpo_objective` loss types, weight 1 each
    seed: int = 0
    samples: int = 6  # held-out answers shown


FULL = DemoSettings()
# Seconds, for tests: the whole pipeline with a handful of steps (no claim about what it learns).
FAST = DemoSettings(
    num_train=16, num_heldout=8, batch_size=4, sft_steps=8, sft_lr=3e-3, dpo_steps=3, samples=3
)

MAX_NEW_TOKENS = 16  # "A green triangle." is 11 tokens of the tiny vocabulary, then <|im_end|>


# ---------------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Held-out figures of one model."""

    answers: tuple[str, ...]  # greedy answer per held-out example
    exact: float  # fraction of answers equal to the true sentence
    color: float  # fraction naming the right colour
    shape: float  # fraction naming the right shape
    margins: tuple[float, ...]  # log p(true answer) - log p(wrong answer) per held-out pair

    @property
    def prefers(self) -> float:
        return float(np.mean(np.asarray(self.margins) > 0))

    @property
    def mean_margin(self) -> float:
        return float(np.mean(self.margins))

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "prefers": self.prefers,
            "mean_margin": self.mean_margin,
        }


def _words(text: str) -> list[str]:
    return text.rstrip(".").split()


def greedy_answers(model, processor: Processor, examples: Sequence[ShapeExample]) -> list[str]:
    """The greedy answer of `model` to the task's question about each example's image, one batch."""
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": str(e.image)}, {"type": "text", "text": QUESTION}]}]
        for e in examples
    ]  # fmt: skip
    batch = processor.encode_chat(conversations, add_generation_prompt=True, padding_side="left")
    out = qwenvl_jax.generate(model, batch, max_new_tokens=MAX_NEW_TOKENS, temperature=0)
    decode = processor.tokenizer.decode
    return [
        decode(out.completion(i).tolist(), skip_special_tokens=True).strip() for i in range(len(examples))
    ]


@functools.partial(jax.jit, static_argnums=0)
def _completion_logps(graphdef, params, batch):
    """Summed log-prob of each row's labelled (completion) tokens."""
    stats = token_stats(nnx.merge(graphdef, params), batch, batch["labels"])
    return losses.sequence_logps(stats["log_probs"], stats["label_mask"])


def pair_margins(
    model, processor: Processor, pairs_path: Path, *, pairs_per_batch: int, spec_kw: dict
) -> np.ndarray:
    """log p(chosen) - log p(rejected) under `model` for every pair of a DPO JSONL file, in file order."""
    spec = BatchSpec(
        batch_size=2 * pairs_per_batch,
        pad_token_id=processor.pad_token_id,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        **spec_kw,
    )
    graphdef, params = nnx.split(model)
    margins = []
    for batch in make_batches([str(pairs_path)], processor, spec, kind="dpo", shuffle=False, num_epochs=1):
        n = int(batch["example_mask"][:pairs_per_batch].sum())
        arrays = {k: v for k, v in batch.items() if v is not None}
        logps = np.asarray(_completion_logps(graphdef, params, arrays))
        margins.extend(logps[:n] - logps[pairs_per_batch : pairs_per_batch + n])
    return np.asarray(margins, np.float64)


def evaluate(
    model, processor: Processor, task: ShapeTask, *, spec_kw: dict, pairs_per_batch: int
) -> Evaluation:
    """Greedy answers and pair margins of `model` on the task's held-out split."""
    heldout = task.heldout
    answers = greedy_answers(model, processor, heldout)
    margins = pair_margins(
        model, processor, task.heldout_dpo, pairs_per_batch=pairs_per_batch, spec_kw=spec_kw
    )
    if len(margins) != len(heldout):
        raise RuntimeError(f"{len(margins)} held-out pair margins for {len(heldout)} held-out examples")
    return Evaluation(
        answers=tuple(answers),
        exact=float(np.mean([a == e.answer for a, e in zip(answers, heldout, strict=True)])),
        color=float(np.mean([e.color in _words(a) for a, e in zip(answers, heldout, strict=True)])),
        shape=float(np.mean([e.shape in _words(a) for a, e in zip(answers, heldout, strict=True)])),
        margins=tuple(float(m) for m in margins),
    )


# ------------------------------------------------------------------------------------------ the runs
def _window_means(rows: list[dict], key: str) -> tuple[float, float, str]:
    """Means of `key` over the first and over the last `w` steps, w = a tenth of them (1 to 10), and what
    they are means of."""
    values = [float(r[key]) for r in rows if key in r]
    if not values:
        raise RuntimeError(f"no {key!r} in the run's metrics")
    w = max(1, min(10, len(values) // 10))
    what = "first / last step" if w == 1 else f"mean of the first / last {w} steps"
    return float(np.mean(values[:w])), float(np.mean(values[-w:])), what


def run_configs(out: Path, task: ShapeTask, settings: DemoSettings, processor_dir: Path) -> tuple[dict, dict]:
    """The SFT and DPO configs of the demo (`train.loop` schema)."""
    s = settings
    patches = (s.image_size // 14) ** 2
    # One sequence bucket: a record is ~70 tokens (template, question, 4 image tokens, answer).
    common = {
        "seed": s.seed,
        "processor": str(processor_dir),
        "data": {"shuffle": True, "num_epochs": None},
        # One checkpoint, at the end: the runs are short and `final/` is what the next phase loads.
        "checkpoint": {"every": max(s.sft_steps, s.dpo_steps), "keep": 1, "async": True},
        "logging": {"progress": True, "tensorboard": True, "plot": True},
    }
    sft = {
        **common,
        "kind": "sft",
        "run_dir": str(out / "sft"),
        "steps": s.sft_steps,
        "model": {"preset": "tiny", "random_seed": s.seed, "dtype": "float32"},
        "data": {**common["data"], "paths": [str(task.sft)]},
        "batch": {"batch_size": s.batch_size, "seq_buckets": [96], "image_patches": s.batch_size * patches,
                  "max_images": s.batch_size},
        "optim": {"learning_rate": s.sft_lr, "schedule": "cosine", "end_lr_ratio": 0.1},
    }  # fmt: skip
    rows = 2 * s.batch_size  # a DPO batch holds [chosen x pairs, rejected x pairs]
    dpo = {
        **common,
        "kind": "dpo",
        "run_dir": str(out / "dpo"),
        "steps": s.dpo_steps,
        "model": {"path": str(out / "sft" / "final"), "dtype": "float32"},
        "data": {**common["data"], "paths": [str(task.dpo)]},
        "batch": {"batch_size": s.batch_size, "seq_buckets": [96], "image_patches": rows * patches,
                  "max_images": rows},
        "optim": {"learning_rate": s.dpo_lr, "schedule": "cosine", "end_lr_ratio": 0.1},
        "dpo": {"loss_type": list(s.dpo_loss), "loss_weights": [1.0] * len(s.dpo_loss), "beta": s.dpo_beta},
    }  # fmt: skip
    return sft, dpo


def _prepare(out: Path) -> None:
    """Create `out`, or clear what an earlier demo wrote there (so the runs start fresh, never resume)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(
                f"{out} is not empty and holds no earlier demo output; choose another --out"
            )
        for name in _OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `qwenvl-jax demo`; rerunning it clears this directory's runs\n")


def _run_phase(config: dict) -> None:
    """One training run of the demo; a run that did not finish cleanly (stopped, or mostly skipped steps)
    ends the demo with the run's exit code rather than evaluating a model that is not there."""
    code = train(config)
    if code:
        raise SystemExit(code)


def run_demo(out_dir: str | Path, settings: DemoSettings = FULL, *, stream: TextIO | None = None) -> dict:
    """Run the demo into `out_dir` (see the module docstring), print its report and return it as a dict."""
    stream = sys.stdout if stream is None else stream
    start = time.perf_counter()
    s = settings
    out = Path(out_dir).absolute()

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    _prepare(out)
    proc_dir = write_tiny_checkpoint(out / "processor")
    processor = Processor.from_pretrained(proc_dir)
    task = write_shape_task(out / "data", num_train=s.num_train, num_heldout=s.num_heldout, size=s.image_size,
                            radius=s.radius, rejected="shape", seed=s.seed)  # fmt: skip
    sft_cfg, dpo_cfg = run_configs(out, task, s, proc_dir)
    pairs_per_batch = min(16, s.num_heldout)
    rows = 2 * pairs_per_batch
    spec_kw = {"seq_buckets": (96,), "image_patches": rows * (s.image_size // 14) ** 2, "max_images": rows}
    evaluations: dict[str, Evaluation] = {}

    def phase_eval(name: str, model) -> None:
        t = time.perf_counter()
        say(f"  evaluating on the {len(task.heldout)} held-out images ...")
        evaluations[name] = ev = evaluate(
            model, processor, task, spec_kw=spec_kw, pairs_per_batch=pairs_per_batch
        )
        say(f"  held-out: {ev.exact:.0%} exact answers ({ev.color:.0%} right colour, {ev.shape:.0%} right shape); "
            f"prefers the true answer in {ev.prefers:.0%} of pairs  [{time.perf_counter() - t:.0f} s]")  # fmt: skip

    config = Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32")
    model = random_model(config, s.seed)
    say("qwenvl-jax demo: SFT then DPO of a tiny random-weight Qwen2.5-VL on the CPU, offline")
    say(f"  task: {s.image_size}x{s.image_size} images of one shape (circle, square, triangle; red, green, "
        'blue): "What is in the image?" -> "A red circle."')  # fmt: skip
    say(f"  {len(task.train)} training images; {len(task.heldout)} held-out images that no run trains on")
    say(f"  model: the tiny preset, {param_count(model):,} parameters, random weights (seed {s.seed})")
    say(f"  output: {out}")
    say()
    say("[1/3] before training")
    phase_eval("before", model)
    del model

    say()
    say(f"[2/3] SFT: {s.sft_steps} steps of {s.batch_size} records, lr {s.sft_lr:g} (cosine)")
    _run_phase(sft_cfg)
    sft_rows = read_metrics(out / "sft" / "metrics.jsonl")
    sft_loss = _window_means(sft_rows, "loss")
    say(f"  SFT loss {sft_loss[0]:.3f} -> {sft_loss[1]:.3f} ({sft_loss[2]})")
    phase_eval("sft", qwenvl_jax.load(out / "sft" / "final", dtype="float32"))

    say()
    say(f"[3/3] DPO from the SFT model: {s.dpo_steps} steps of {s.batch_size} pairs (true answer vs a wrong "
        f"shape), beta {s.dpo_beta:g}, lr {s.dpo_lr:g}, loss {' + '.join(s.dpo_loss)}")  # fmt: skip
    _run_phase(dpo_cfg)
    dpo_rows = read_metrics(out / "dpo" / "metrics.jsonl")
    dpo_loss = _window_means(dpo_rows, "loss")
    reward_acc = _window_means(dpo_rows, "rewards/accuracies")
    reward_margin = _window_means(dpo_rows, "rewards/margins")
    say(f"  DPO loss {dpo_loss[0]:.3f} -> {dpo_loss[1]:.3f}; reward accuracy {reward_acc[0]:.2f} -> "
        f"{reward_acc[1]:.2f}; reward margin {reward_margin[0]:.3f} -> {reward_margin[1]:.3f} "
        f"({dpo_loss[2]})")  # fmt: skip
    phase_eval("dpo", qwenvl_jax.load(out / "dpo" / "final", dtype="float32"))

    elapsed = time.perf_counter() - start
    report = {
        "settings": dataclasses.asdict(s),
        "heldout": [{"id": e.id, "image": str(e.image), "answer": e.answer, "rejected": e.rejected}
                    for e in task.heldout],
        "evaluations": {k: v.as_dict() for k, v in evaluations.items()},
        "sft": {"loss_first": sft_loss[0], "loss_last": sft_loss[1], "steps": len(sft_rows)},
        "dpo": {"loss_first": dpo_loss[0], "loss_last": dpo_loss[1], "reward_accuracy_first": reward_acc[0],
                "reward_accuracy_last": reward_acc[1], "reward_margin_first": reward_margin[0],
                "reward_margin_last": reward_margin[1], "steps": len(dpo_rows)},
        "seconds": elapsed,
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    say()
    say(format_report(report))
    say()
    say(f"took {format_duration(elapsed)}. Runs (metrics.jsonl, tensorboard/, loss_curves.png, final/) under "
        f"{out}/sft and {out}/dpo; the figures in {out / 'report.json'}")  # fmt: skip
    return report


# ---------------------------------------------------------------------------------------- the report
def format_report(report: dict) -> str:
    """The table of held-out figures before training, after SFT and after DPO, and sample answers."""
    ev = report["evaluations"]
    phases = ("before", "sft", "dpo")
    n = len(report["heldout"])
    head = f"{'held-out (' + str(n) + ' images)':<44}{'before':>12}{'after SFT':>12}{'after DPO':>12}"
    lines = [head, "-" * len(head)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<44}" + "".join(f"{v:>12}" for v in values))

    row("exact answer", [f"{round(ev[p]['exact'] * n)}/{n}" for p in phases])
    row("  right colour", [f"{ev[p]['color']:.0%}" for p in phases])
    row("  right shape", [f"{ev[p]['shape']:.0%}" for p in phases])
    row("pairs preferring the true answer", [f"{ev[p]['prefers']:.0%}" for p in phases])
    row("mean log p(true) - log p(wrong shape)", [f"{ev[p]['mean_margin']:.2f}" for p in phases])
    lines.append("")
    shown = report["settings"]["samples"]
    width = 22
    lines.append(f"{'truth':<{width}}{'before':<{width}}{'after SFT':<{width}}{'after DPO':<{width}}")
    for i, example in enumerate(report["heldout"][:shown]):
        cells = [example["answer"]] + [_cell(ev[p]["answers"][i], width - 2) for p in phases]
        lines.append("".join(f"{c:<{width}}" for c in cells))
    return "\n".join(lines)


def _cell(text: str, width: int) -> str:
    """An answer as printable text (a random model emits control bytes), cut to `width`."""
    text = repr(text)[1:-1] if not text.isprintable() else text
    return text if len(text) <= width else text[: width - 3] + "..."
