"""`qwenvl-jax demo`: SFT then DPO, with `--grpo` SFT then GRPO, with `--ppo` SFT, a reward model and PPO,
with `--qlora` SFT then LoRA and QLoRA side by side, of a tiny random-weight Qwen2.5-VL on synthetic shape
images, on CPU.

Offline and measured: every figure it prints comes from the runs it makes.

1. Writes the tiny tokenizer/processor (`tiny.py`) and the shape task (`data/synthetic.py`): training
   images, held-out images that no run trains on, preference pairs and GRPO prompts.
2. Evaluates the random model (the tiny preset, as the SFT run builds it) on the held-out split.
3. SFT with the training loop (`train.loop.train`) from that model; evaluates `sft/final`.
4. DPO with the training loop from `sft/final` (reference: that model, frozen); evaluates `dpo/final`.
   With `--grpo` (`GRPO`): GRPO with the training loop from `sft/final` on the training prompts
   (`grpo.jsonl`), each sampled answer scored by `data.synthetic.shape_reward` (+0.5 per right colour or
   shape word, -0.5 per wrong one, 1.0 for the whole answer), the only signal it learns from; evaluates
   `grpo/final`, then, for comparison, plain SFT from `sft/final` for the same steps (`more_sft/`).
   With `--ppo` (`PPO`): a reward model (`kind: reward`, the SFT model plus a scalar head) from `sft/final`
   on the training pairs, and its accuracy on the held-out pairs; PPO (`kind: ppo`) from `sft/final` on the
   training prompts, each sampled answer scored by that reward model alone (no reward function), the value
   model starting from it (TRL's default); evaluates `ppo/final`, then the same comparison.
5. Prints the held-out figures of the models side by side, with sample answers, and writes them to
   `report.json` beside the runs.

Held-out figures: the greedy answer (`generate`, temperature 0) compared with the true sentence (exact,
colour word, shape word, and its `shape_reward`), and on the held-out preference pairs the summed log-prob
of the true answer minus that of the wrong one under the model being evaluated (its "margin"; "prefers" =
margin > 0).

DPO: two choices that the figures rest on (seed 0, measured with `run_demo(out, replace(FULL, dpo_loss=...))`):
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

GRPO (seed 0, `qwenvl-jax demo --grpo`, under two minutes on two shared CPU cores; the variants below
measured with `run_demo(out, replace(GRPO, ...))`). The SFT phase is a third of the DPO demo's (50 steps),
so the model answers in the task's form but is often wrong: held-out exact answers 11/48 (colour 52%,
shape 31%), mean reward -0.17. GRPO, 200 steps of 4 prompts x 8 answers sampled at temperature 0.7, lr
3e-5: 24/48 (colour 92%, shape 52%), mean reward 0.44; the training reward of its sampled answers goes
-0.13 -> -0.07 -> -0.03 -> 0.03 -> -0.00 over fifths of the run (below the greedy figures: sampled answers
misspell words). What this shows: GRPO in the training loop improves a visual task from a verifiable
reward alone. What it does not: that the reward beats labels. Plain SFT for the same 200 steps reaches
35/48 (reward 0.73); with seed 1, GRPO fixes the colour only (11/48 -> 19/48, shape 40% -> 40%) where more
SFT reaches 46/48. The colour is the mean pixel; the shape is what the tiny vision tower learns slowly, and
one number per sampled answer teaches it more slowly than a target for every token. The settings rest on:
- lr 3e-5. At 1e-4 the model learns to name the colour and misspell the shape ("A red cirle."):
  `shape_reward` pays 0.5 for that, more than for a wrong shape (0.0). Its held-out mean reward is 0.44,
  as high as above, with 0/48 exact answers: the exact answers are the figure to read. At 5e-5, 23/48;
  300 steps at 3e-5, 10/48 (answers like "A bluare." appear).
- Temperature 0.7. At 1.0, 17/48 (colour 65%): most answers sampled at 1.0 misspell a word (a word is 2-5
  tokens of the byte-level vocabulary), score the same whatever the image, and so carry no signal.
- 1500 training images. With the DPO demo's 300 (`num_train=300`) the held-out answers do not improve
  (8/48 -> 7/48), although the training reward rises about as much.

PPO (seed 0, `qwenvl-jax demo --ppo --out /tmp/demo_ppo`, 2m09s on two shared CPU cores). The SFT phase
is the GRPO demo's (50 steps; 9/48 exact here, mean reward -0.08: the pairs' wrong answers draw from the
same generator, so the images differ from the GRPO demo's). The reward model, 500 steps of 8 training
pairs (the true answer against one with the colour or the shape wrong) at lr 1e-3 from the SFT model,
ranks 73% of the held-out pairs right. PPO, 200 steps (50 generation batches of 16 answers at temperature
0.7, 2 epochs x 2 mini-batches each), lr 3e-5, kl_coef 0.05, the value model starting from the reward
model, trained on the reward model's scores alone: its score of the sampled answers -0.69 -> -0.47, held-out
exact answers 9/48 -> 12/48, mean reward -0.08 -> 0.04; plain SFT for the same 200 steps reaches 37/48
(0.77). What this shows: SFT -> reward model -> PPO through the loop, PPO raising the reward model's score
and, a little, the held-out figures. What it does not: that it learns the task well: a 73% reward model is
a weak signal, and the answers drift towards what it over-rates ("A blue circle." for 5 of the 6 samples
printed). Measured besides (the same runs, `run_demo(out, replace(PPO, ...))`):
- Pairs that reject only a wrong shape (`rejected="shape"`, the DPO demo's): the reward model ranks 77%,
  ignores the colour, and PPO exploits it: every answer becomes "A red circle." (11/48 -> 10/48, mean
  reward -0.17 -> -0.27) while its score rises -0.31 -> -0.18.
- Where the reward model is read matters: trained on templated rows it reads its head on the chat
  template's "\n" after "<|im_end|>", while sampling stops at "<|im_end|>". Scored there (TRL 0.22.1's
  choice), the shape-only reward model ranked 56% instead of 77% and PPO did not raise its score (0.42 ->
  0.42); PPO now appends the template's ending to a finished answer before scoring (`train.ppo.turn_suffix`).
- PPO with `rewards: [shape_reward]` in place of the reward model, lr 1e-4: 14/48, mean reward 0.23.

QLoRA (`qwenvl-jax demo --qlora`, 47 s on two shared CPU cores). From the GRPO demo's SFT (50 steps, 300
training images), two runs of rank-16 LoRA on the decoder (alpha 32), 300 steps of 8 records, lr 2e-3:
one on the SFT model's float32 weights, one on their NF4 quantization (`lora.quantize: nf4`: the decoder's
14 kernels in 4 bits, dequantized at use). Held-out exact answers, seed 0: 8/48 after SFT -> 22/48 with
LoRA, 31/48 with QLoRA (colour 58% -> 100% both, shape 25% -> 46% and 65%); seed 1: 12/48 -> 42/48 and
44/48. What this shows: QLoRA learns the task as LoRA does from the same start, through the whole loop
(NF4 base, PEFT adapters in `adapter/`, dequantized merge in `final/`). What it does not: that 4 bits help.
The gap between the two runs is run-to-run spread (their first losses differ by the quantization only; from
there the two runs' updates diverge), and it changes sign with the seed. At 150 steps and lr 1e-3 both
reached 14/48 (seed 0), mostly by fixing the colour.
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
from qwenvl_jax.data.synthetic import QUESTION, ShapeExample, ShapeTask, shape_reward, write_shape_task
from qwenvl_jax.loading import param_count, random_model
from qwenvl_jax.model.value_head import reward_scores
from qwenvl_jax.processing import BatchSpec, Processor
from qwenvl_jax.reward_model import load_reward_model
from qwenvl_jax.tiny import write_tiny_checkpoint
from qwenvl_jax.train.logger import format_duration, read_metrics
from qwenvl_jax.train.loop import train
from qwenvl_jax.train.step import token_stats

MARKER = ".qwenvl_jax_demo"  # marks a directory the demo may clear and rewrite
_OWNED = (MARKER, "processor", "data", "sft", "dpo", "grpo", "reward", "ppo", "more_sft", "lora", "qlora",
          "report.json")  # fmt: skip
REWARD = "qwenvl_jax.data.synthetic:shape_reward"  # GRPO's only training signal
METHODS = ("dpo", "grpo", "ppo", "qlora")


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
    # What follows SFT: "dpo" (preference pairs), "grpo" (the task's reward alone) or "ppo" (a reward model
    # trained on the preference pairs, then PPO against it).
    method: str = "dpo"
    rejected: str = "shape"  # the attribute a pair's rejected answer gets wrong (`write_shape_task`)
    # GRPO: prompts only; `shape_reward` of each sampled answer is the whole training signal. The lr and the
    # temperature are measured (module docstring): at lr 1e-4 it learns to misspell the shape word, which
    # the reward pays more than a wrong shape; at temperature 1 it barely learns.
    grpo_steps: int = 200
    grpo_lr: float = 3e-5
    grpo_prompts: int = 4  # prompts per step, each with grpo_generations sampled answers
    grpo_generations: int = 8
    grpo_temperature: float = 0.7
    # Reward model (PPO's only signal): the SFT model plus a scalar head, on the training pairs. At lr 1e-4
    # for 100 steps it ranked 46% of the held-out pairs right, at 1e-3 for 200 steps 58%.
    reward_steps: int = 500
    reward_lr: float = 1e-3
    # PPO from the SFT model against the reward model; the value model starts from the reward model.
    # `ppo_steps` are optimizer steps: a generation batch of `batch_size x ppo_mini_batches` prompts (one
    # answer each) serves `ppo_epochs x ppo_mini_batches` of them. lr and temperature as GRPO's, kl_coef
    # TRL's default.
    ppo_steps: int = 200
    ppo_lr: float = 3e-5
    ppo_mini_batches: int = 2
    ppo_epochs: int = 2
    ppo_temperature: float = 0.7
    ppo_kl_coef: float = 0.05
    # QLoRA: from the SFT model, LoRA SFT on its float32 weights and QLoRA SFT on their NF4 quantization
    # (the decoder's kernels), same adapters, steps and lr, side by side.
    lora_steps: int = 300
    lora_lr: float = 2e-3
    lora_rank: int = 16
    # After GRPO or PPO, plain SFT on the true answers from the same model for the same steps: the
    # comparison.
    control: bool = True
    seed: int = 0
    samples: int = 6  # held-out answers shown


FULL = DemoSettings()
# Seconds, for tests: the whole pipeline with a handful of steps (no claim about what it learns).
FAST = DemoSettings(
    num_train=16, num_heldout=8, batch_size=4, sft_steps=8, sft_lr=3e-3, dpo_steps=3, samples=3
)

# SFT for a third of FULL's steps: the model answers in the right form, but half its colours and most of
# its shapes are wrong. 1500 training images: with FULL's 300 the same GRPO run does not improve the
# held-out answers (module docstring).
GRPO = dataclasses.replace(FULL, method="grpo", num_train=1500, sft_steps=50)
GRPO_FAST = dataclasses.replace(FAST, method="grpo", grpo_steps=4, grpo_prompts=2, grpo_generations=4)
# From the GRPO demo's SFT, so that the two read side by side (module docstring).
PPO = dataclasses.replace(GRPO, method="ppo", rejected="either")
# No control run: it is the GRPO demo's code, and its compile would add a quarter to the smoke run.
PPO_FAST = dataclasses.replace(
    FAST, method="ppo", rejected="either", reward_steps=3, ppo_steps=4, ppo_epochs=1, control=False
)

# From the GRPO demo's SFT (the model answers in form, often wrongly), so that the adapters have
# something to fix. No control run: LoRA beside QLoRA is the comparison.
QLORA = dataclasses.replace(GRPO, method="qlora", num_train=300, control=False)
QLORA_FAST = dataclasses.replace(FAST, method="qlora", lora_steps=4, control=False)

MAX_NEW_TOKENS = 16  # "A green triangle." is 10 tokens of the tiny vocabulary, then <|im_end|>


# ---------------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Held-out figures of one model."""

    answers: tuple[str, ...]  # greedy answer per held-out example
    exact: float  # fraction of answers equal to the true sentence
    color: float  # fraction naming the right colour
    shape: float  # fraction naming the right shape
    reward: float  # mean `shape_reward` of the answers (the GRPO phase's reward; 1.0 = all exact)
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


@functools.partial(jax.jit, static_argnums=(0, 3))
def _reward_scores(graphdef, params, head, pad_token_id, batch):
    return reward_scores(nnx.merge(graphdef, params), head, batch, pad_token_id)


def reward_margins(
    path: Path, processor: Processor, pairs_path: Path, *, pairs_per_batch: int, spec_kw: dict
) -> np.ndarray:
    """r(chosen) - r(rejected) under the reward model at `path` for every pair of a DPO JSONL file, in file
    order, each row scored as the reward run trained on it and as PPO scores an answer: the head at the
    row's last token (the chat template's newline after "<|im_end|>", which PPO appends to a finished
    answer, `train.ppo.turn_suffix`)."""
    model, head = load_reward_model(path, dtype="float32")
    spec = BatchSpec(
        batch_size=2 * pairs_per_batch,
        pad_token_id=processor.pad_token_id,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        **spec_kw,
    )
    graphdef, params = nnx.split(model)
    pad = int(processor.pad_token_id)
    margins = []
    for batch in make_batches([str(pairs_path)], processor, spec, kind="dpo", shuffle=False, num_epochs=1):
        n = int(batch["example_mask"][:pairs_per_batch].sum())
        arrays = {k: v for k, v in batch.items() if v is not None}
        scores = np.asarray(_reward_scores(graphdef, params, head, pad, arrays))
        margins.extend(scores[:n] - scores[pairs_per_batch : pairs_per_batch + n])
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
        reward=float(np.mean(shape_reward(answers, [e.answer for e in heldout]))),
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


def _curve(rows: list[dict], key: str, parts: int = 5) -> list[float]:
    """Means of `key` over `parts` equal stretches of the run (fewer when the run has fewer steps)."""
    values = np.asarray([float(r[key]) for r in rows if key in r])
    return [float(v.mean()) for v in np.array_split(values, min(parts, len(values)))]


def rl_steps(settings: DemoSettings) -> int:
    """The steps of the phase after SFT that the control (`more_sft`) matches."""
    return settings.ppo_steps if settings.method == "ppo" else settings.grpo_steps


def run_configs(out: Path, task: ShapeTask, settings: DemoSettings, processor_dir: Path) -> dict[str, dict]:
    """The demo's run configs (`train.loop` schema) by run directory: "sft", "dpo", "grpo", "reward",
    "ppo", and "more_sft" (the GRPO and PPO demos' comparison: SFT from `sft/final` for their steps)."""
    s = settings
    patches = (s.image_size // 14) ** 2
    # One sequence bucket: a record is ~70 tokens (template, question, 4 image tokens, answer).
    common = {
        "seed": s.seed,
        "processor": str(processor_dir),
        "data": {"shuffle": True, "num_epochs": None},
        # One checkpoint, at the end: the runs are short and `final/` is what the next phase loads.
        "checkpoint": {
            "every": max(s.sft_steps, s.dpo_steps, s.grpo_steps, s.reward_steps, s.ppo_steps),
            "keep": 1,
            "async": True,
        },
        "logging": {"progress": True, "tensorboard": True, "plot": True},
    }

    def budget(rows: int) -> dict:
        return {"seq_buckets": [96], "image_patches": rows * patches, "max_images": rows}

    from_sft = {"path": str(out / "sft" / "final"), "dtype": "float32"}
    sft = {
        **common,
        "kind": "sft",
        "run_dir": str(out / "sft"),
        "steps": s.sft_steps,
        "model": {"preset": "tiny", "random_seed": s.seed, "dtype": "float32"},
        "data": {**common["data"], "paths": [str(task.sft)]},
        "batch": {"batch_size": s.batch_size, **budget(s.batch_size)},
        "optim": {"learning_rate": s.sft_lr, "schedule": "cosine", "end_lr_ratio": 0.1},
    }
    dpo = {
        **common,
        "kind": "dpo",
        "run_dir": str(out / "dpo"),
        "steps": s.dpo_steps,
        "model": from_sft,
        "data": {**common["data"], "paths": [str(task.dpo)]},
        # A DPO batch holds [chosen x pairs, rejected x pairs].
        "batch": {"batch_size": s.batch_size, **budget(2 * s.batch_size)},
        "optim": {"learning_rate": s.dpo_lr, "schedule": "cosine", "end_lr_ratio": 0.1},
        "dpo": {"loss_type": list(s.dpo_loss), "loss_weights": [1.0] * len(s.dpo_loss), "beta": s.dpo_beta},
    }  # fmt: skip
    rows = s.grpo_prompts * s.grpo_generations
    grpo = {
        **common,
        "kind": "grpo",
        "run_dir": str(out / "grpo"),
        "steps": s.grpo_steps,
        "model": from_sft,
        # Prompts only: the `solution` column reaches the reward, never the model.
        "data": {**common["data"], "paths": [str(task.grpo)]},
        # One micro-batch holds the step's whole generation batch: P prompts x G sampled answers.
        "batch": {"batch_size": rows, **budget(rows)},
        "optim": {"learning_rate": s.grpo_lr, "schedule": "cosine", "end_lr_ratio": 0.1},
        "grpo": {"num_generations": s.grpo_generations, "max_prompt_length": 96 - MAX_NEW_TOKENS,
                 "max_completion_length": MAX_NEW_TOKENS, "temperature": s.grpo_temperature,
                 "log_completions_every": max(1, s.grpo_steps // 10)},
        "rewards": [REWARD],
    }  # fmt: skip
    reward = {
        **common,
        "kind": "reward",
        "run_dir": str(out / "reward"),
        "steps": s.reward_steps,
        "model": from_sft,
        "data": {**common["data"], "paths": [str(task.dpo)]},
        "batch": {"batch_size": s.batch_size, **budget(2 * s.batch_size)},
        "optim": {"learning_rate": s.reward_lr, "schedule": "cosine", "end_lr_ratio": 0.1},
    }
    # TRL's setup: the reward model alone scores the answers (no `rewards:`) and starts the value model.
    ppo = {
        **common,
        "kind": "ppo",
        "run_dir": str(out / "ppo"),
        "steps": s.ppo_steps,
        "model": from_sft,
        "data": {**common["data"], "paths": [str(task.grpo)]},
        # The training rows: prompt + answer; a generation batch is `ppo_mini_batches` of these.
        "batch": {"batch_size": s.batch_size, **budget(s.batch_size)},
        "trainable": "full",
        "optim": {"learning_rate": s.ppo_lr, "schedule": "cosine", "end_lr_ratio": 0.1},
        "ppo": {"reward_model": str(out / "reward" / "final"), "value_init": "reward_model",
                "max_prompt_length": 96 - MAX_NEW_TOKENS, "max_completion_length": MAX_NEW_TOKENS,
                "temperature": s.ppo_temperature, "num_ppo_epochs": s.ppo_epochs,
                "num_mini_batches": s.ppo_mini_batches, "kl_coef": s.ppo_kl_coef,
                "log_completions_every": max(1, s.ppo_steps // (10 * s.ppo_epochs * s.ppo_mini_batches))},
    }  # fmt: skip
    more_sft = {**sft, "run_dir": str(out / "more_sft"), "steps": rl_steps(s), "model": from_sft}
    lora = {**sft, "run_dir": str(out / "lora"), "steps": s.lora_steps, "model": from_sft, "trainable": "lora",
            "lora": {"rank": s.lora_rank, "alpha": 2.0 * s.lora_rank},
            "optim": {"learning_rate": s.lora_lr, "schedule": "cosine", "end_lr_ratio": 0.1}}  # fmt: skip
    qlora = {**lora, "run_dir": str(out / "qlora"), "lora": {**lora["lora"], "quantize": "nf4"}}
    return {"sft": sft, "dpo": dpo, "grpo": grpo, "reward": reward, "ppo": ppo, "more_sft": more_sft,
            "lora": lora, "qlora": qlora}  # fmt: skip


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
    if s.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {s.method!r}")
    out = Path(out_dir).absolute()

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    _prepare(out)
    proc_dir = write_tiny_checkpoint(out / "processor")
    processor = Processor.from_pretrained(proc_dir)
    task = write_shape_task(out / "data", num_train=s.num_train, num_heldout=s.num_heldout, size=s.image_size,
                            radius=s.radius, rejected=s.rejected, seed=s.seed)  # fmt: skip
    configs = run_configs(out, task, s, proc_dir)
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
            f"mean reward {ev.reward:.2f}; prefers the true answer in {ev.prefers:.0%} of pairs  "
            f"[{time.perf_counter() - t:.0f} s]")  # fmt: skip

    def sft_run(name: str) -> dict:
        _run_phase(configs[name])
        metrics = read_metrics(out / name / "metrics.jsonl")
        loss = _window_means(metrics, "loss")
        say(f"  SFT loss {loss[0]:.3f} -> {loss[1]:.3f} ({loss[2]})")
        phase_eval(name, qwenvl_jax.load(out / name / "final", dtype="float32"))
        return {"loss_first": loss[0], "loss_last": loss[1], "steps": len(metrics)}

    control = s.method in ("grpo", "ppo") and s.control
    total = {"dpo": 3, "grpo": 3, "ppo": 4, "qlora": 4}[s.method] + control
    config = Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32")
    model = random_model(config, s.seed)
    then = "LoRA and QLoRA from it" if s.method == "qlora" else s.method.upper()
    say(f"qwenvl-jax demo: SFT then {then} of a tiny random-weight Qwen2.5-VL on the CPU, offline")
    say(f"  task: {s.image_size}x{s.image_size} images of one shape (circle, square, triangle; red, green, "
        'blue): "What is in the image?" -> "A red circle."')  # fmt: skip
    say(f"  {len(task.train)} training images; {len(task.heldout)} held-out images that no run trains on")
    say(f"  model: the tiny preset, {param_count(model):,} parameters, random weights (seed {s.seed})")
    say(f"  output: {out}")
    say()
    say(f"[1/{total}] before training")
    phase_eval("before", model)
    del model

    say()
    say(f"[2/{total}] SFT: {s.sft_steps} steps of {s.batch_size} records, lr {s.sft_lr:g} (cosine)")
    report: dict[str, Any] = {"sft": sft_run("sft")}

    say()
    if s.method == "dpo":
        say(f"[3/3] DPO from the SFT model: {s.dpo_steps} steps of {s.batch_size} pairs (true answer vs a wrong "
            f"shape), beta {s.dpo_beta:g}, lr {s.dpo_lr:g}, loss {' + '.join(s.dpo_loss)}")  # fmt: skip
        _run_phase(configs["dpo"])
        dpo_rows = read_metrics(out / "dpo" / "metrics.jsonl")
        dpo_loss = _window_means(dpo_rows, "loss")
        reward_acc = _window_means(dpo_rows, "rewards/accuracies")
        reward_margin = _window_means(dpo_rows, "rewards/margins")
        say(f"  DPO loss {dpo_loss[0]:.3f} -> {dpo_loss[1]:.3f}; reward accuracy {reward_acc[0]:.2f} -> "
            f"{reward_acc[1]:.2f}; reward margin {reward_margin[0]:.3f} -> {reward_margin[1]:.3f} "
            f"({dpo_loss[2]})")  # fmt: skip
        phase_eval("dpo", qwenvl_jax.load(out / "dpo" / "final", dtype="float32"))
        report["dpo"] = {"loss_first": dpo_loss[0], "loss_last": dpo_loss[1], "reward_accuracy_first": reward_acc[0],
                         "reward_accuracy_last": reward_acc[1], "reward_margin_first": reward_margin[0],
                         "reward_margin_last": reward_margin[1], "steps": len(dpo_rows)}  # fmt: skip
    elif s.method == "grpo":
        say(f"[3/{total}] GRPO from the SFT model: {s.grpo_steps} steps of {s.grpo_prompts} prompts x "
            f"{s.grpo_generations} sampled answers (temperature {s.grpo_temperature:g}), lr {s.grpo_lr:g}; "
            "trained on the reward alone (shape_reward), never on a true answer")  # fmt: skip
        _run_phase(configs["grpo"])
        grpo_rows = read_metrics(out / "grpo" / "metrics.jsonl")
        reward = _window_means(grpo_rows, "reward")
        curve = _curve(grpo_rows, "reward")
        flat = _window_means(grpo_rows, "frac_reward_zero_std")
        say(f"  training reward {reward[0]:.3f} -> {reward[1]:.3f} ({reward[2]}); over {len(curve)} equal "
            f"stretches: {' -> '.join(f'{v:.2f}' for v in curve)}")  # fmt: skip
        say(f"  groups whose answers all scored the same (no signal): {flat[0]:.0%} -> {flat[1]:.0%}")
        phase_eval("grpo", qwenvl_jax.load(out / "grpo" / "final", dtype="float32"))
        report["grpo"] = {"reward_first": reward[0], "reward_last": reward[1], "reward_curve": curve,
                          "zero_std_first": flat[0], "zero_std_last": flat[1], "steps": len(grpo_rows)}  # fmt: skip
    elif s.method == "qlora":
        for i, name in enumerate(("lora", "qlora"), 3):
            base = "its NF4 quantization (the decoder's kernels in 4 bits)" if name == "qlora" else "float32"
            say(f"[{i}/{total}] {dict(lora='LoRA', qlora='QLoRA')[name]} SFT from the SFT "
                f"model: rank-{s.lora_rank} adapters on the decoder, base {base}; {s.lora_steps} steps of "
                f"{s.batch_size} records, lr {s.lora_lr:g} (cosine)")  # fmt: skip
            report[name] = sft_run(name)
            say()
    else:
        wrong = {"shape": "a wrong shape", "color": "a wrong colour", "either": "a wrong colour or shape"}
        say(f"[3/{total}] reward model from the SFT model (a scalar head on its last token): "
            f"{s.reward_steps} steps of {s.batch_size} pairs (true answer vs {wrong[s.rejected]}), "
            f"lr {s.reward_lr:g}")  # fmt: skip
        _run_phase(configs["reward"])
        rm_rows = read_metrics(out / "reward" / "metrics.jsonl")
        rm_loss = _window_means(rm_rows, "loss")
        rm_acc = _window_means(rm_rows, "accuracy")
        say(f"  loss {rm_loss[0]:.3f} -> {rm_loss[1]:.3f}; training pair accuracy {rm_acc[0]:.2f} -> "
            f"{rm_acc[1]:.2f} ({rm_loss[2]})")  # fmt: skip
        margins = reward_margins(out / "reward" / "final", processor, task.heldout_dpo,
                                 pairs_per_batch=pairs_per_batch, spec_kw=spec_kw)  # fmt: skip
        if len(margins) != len(task.heldout):
            raise RuntimeError(f"{len(margins)} held-out reward margins for {len(task.heldout)} pairs")
        say(f"  held-out: scores the true answer above the wrong one in {np.mean(margins > 0):.0%} of "
            f"{len(margins)} pairs (mean r(true) - r(wrong) {np.mean(margins):.2f})")  # fmt: skip
        report["reward"] = {"loss_first": rm_loss[0], "loss_last": rm_loss[1], "accuracy_first": rm_acc[0],
                            "accuracy_last": rm_acc[1], "steps": len(rm_rows),
                            "heldout_margins": [float(m) for m in margins],
                            "heldout_accuracy": float(np.mean(margins > 0))}  # fmt: skip

        say()
        prompts = s.batch_size * s.ppo_mini_batches
        say(f"[4/{total}] PPO from the SFT model against the reward model: {s.ppo_steps} steps, each of "
            f"{s.batch_size} answers; {prompts} answers sampled (temperature {s.ppo_temperature:g}) serve "
            f"{s.ppo_epochs * s.ppo_mini_batches} steps; kl_coef {s.ppo_kl_coef:g}, lr {s.ppo_lr:g}; the "
            "value model starts from the reward model; trained on the reward model's scores alone")  # fmt: skip
        _run_phase(configs["ppo"])
        ppo_rows = read_metrics(out / "ppo" / "metrics.jsonl")
        score = _window_means(ppo_rows, "objective/scores")
        curve = _curve(ppo_rows, "objective/scores")
        kl = _window_means(ppo_rows, "objective/kl")
        say(f"  reward-model score of the sampled answers {score[0]:.3f} -> {score[1]:.3f} ({score[2]} that "
            f"sampled); over {len(curve)} equal stretches: {' -> '.join(f'{v:.2f}' for v in curve)}; "
            f"KL to the SFT model {kl[0]:.3f} -> {kl[1]:.3f}")  # fmt: skip
        phase_eval("ppo", qwenvl_jax.load(out / "ppo" / "final", dtype="float32"))
        report["ppo"] = {"score_first": score[0], "score_last": score[1], "score_curve": curve,
                         "kl_first": kl[0], "kl_last": kl[1], "steps": len(ppo_rows),
                         "generations": sum("objective/scores" in r for r in ppo_rows)}  # fmt: skip
    if control:
        say()
        say(f"[{total}/{total}] for comparison, plain SFT on the true answers from the same SFT model for "
            f"{s.method.upper()}'s {rl_steps(s)} steps: {s.batch_size} records a step, lr {s.sft_lr:g} (cosine)")  # fmt: skip
        report["more_sft"] = sft_run("more_sft")

    elapsed = time.perf_counter() - start
    phases = ["before", "sft", *(("lora", "qlora") if s.method == "qlora" else (s.method,))]
    phases += ["more_sft"] if control else []
    runs = phases[1:2] + (["reward"] if s.method == "ppo" else []) + phases[2:]
    report = {
        "settings": dataclasses.asdict(s),
        "phases": phases,
        "heldout": [{"id": e.id, "image": str(e.image), "answer": e.answer, "rejected": e.rejected}
                    for e in task.heldout],
        "evaluations": {k: v.as_dict() for k, v in evaluations.items()},
        **report,
        "seconds": elapsed,
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    say()
    say(format_report(report))
    say()
    say(f"took {format_duration(elapsed)}. Runs (metrics.jsonl, tensorboard/, loss_curves.png, final/) under "
        f"{', '.join(f'{out}/{r}' for r in runs)}; the figures in {out / 'report.json'}")  # fmt: skip
    return report


# ---------------------------------------------------------------------------------------- the report
def _labels(report: dict) -> dict[str, str]:
    steps = report["more_sft"]["steps"] if "more_sft" in report else 0
    return {"before": "before", "sft": "after SFT", "dpo": "after DPO", "grpo": "after GRPO",
            "ppo": "after PPO", "more_sft": f"SFT+{steps}", "lora": "+LoRA", "qlora": "+QLoRA"}  # fmt: skip


def format_report(report: dict) -> str:
    """The table of held-out figures of each evaluated model, and sample answers; for the GRPO and PPO
    demos, what GRPO or PPO (and the reward model) did and what the same steps of plain SFT did."""
    ev = report["evaluations"]
    phases = report["phases"]
    labels = _labels(report)
    n = len(report["heldout"])
    head = f"{'held-out (' + str(n) + ' images)':<44}" + "".join(f"{labels[p]:>12}" for p in phases)
    lines = [head, "-" * len(head)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<44}" + "".join(f"{v:>12}" for v in values))

    row("exact answer", [f"{round(ev[p]['exact'] * n)}/{n}" for p in phases])
    row("  right colour", [f"{ev[p]['color']:.0%}" for p in phases])
    row("  right shape", [f"{ev[p]['shape']:.0%}" for p in phases])
    row("mean reward (shape_reward, greedy answers)", [f"{ev[p]['reward']:.2f}" for p in phases])
    row("pairs preferring the true answer", [f"{ev[p]['prefers']:.0%}" for p in phases])
    wrong = {"shape": "wrong shape", "color": "wrong colour", "either": "wrong"}[
        report["settings"]["rejected"]
    ]
    row(f"mean log p(true) - log p({wrong})", [f"{ev[p]['mean_margin']:.2f}" for p in phases])
    lines.append("")
    shown = report["settings"]["samples"]
    width = 22
    lines.append("".join(f"{c:<{width}}" for c in ["truth"] + [labels[p] for p in phases]))
    for i, example in enumerate(report["heldout"][:shown]):
        cells = [example["answer"]] + [_cell(ev[p]["answers"][i], width - 2) for p in phases]
        lines.append("".join(f"{c:<{width}}" for c in cells))
    if "grpo" in report:
        before, after, run = ev["sft"], ev["grpo"], report["grpo"]
        lines += ["", f"GRPO, by reward alone: held-out exact answers {round(before['exact'] * n)}/{n} -> "
                  f"{round(after['exact'] * n)}/{n}, mean reward {before['reward']:.2f} -> {after['reward']:.2f}; "
                  f"training reward {run['reward_first']:.2f} -> {run['reward_last']:.2f}"]  # fmt: skip
    if "ppo" in report:
        before, after, rm = ev["sft"], ev["ppo"], report["reward"]
        lines += ["", f"reward model: true answer scored above the wrong one in {rm['heldout_accuracy']:.0%} of "
                  f"the {len(rm['heldout_margins'])} held-out pairs",
                  f"PPO, by the reward model alone: held-out exact answers {round(before['exact'] * n)}/{n} -> "
                  f"{round(after['exact'] * n)}/{n}, mean reward {before['reward']:.2f} -> {after['reward']:.2f}; "
                  f"reward-model score {report['ppo']['score_first']:.2f} -> {report['ppo']['score_last']:.2f}"]  # fmt: skip
    if "qlora" in report:
        lora, qlora = ev["lora"], ev["qlora"]
        lines += ["", f"QLoRA beside LoRA (same adapters, steps and lr from the SFT model): held-out exact answers "
                  f"{round(lora['exact'] * n)}/{n} (LoRA) and {round(qlora['exact'] * n)}/{n} (QLoRA); training loss "
                  f"{report['lora']['loss_last']:.3f} and {report['qlora']['loss_last']:.3f}"]  # fmt: skip
    if "more_sft" in ev:
        more = ev["more_sft"]
        lines.append(f"{labels['more_sft']} (plain SFT on the true answers, same steps from the same model): "
                     f"{round(more['exact'] * n)}/{n} exact, mean reward {more['reward']:.2f}")  # fmt: skip
    return "\n".join(lines)


def _cell(text: str, width: int) -> str:
    """An answer as printable text (a random model emits control bytes), cut to `width`."""
    text = repr(text)[1:-1] if not text.isprintable() else text
    return text if len(text) <= width else text[: width - 3] + "..."
