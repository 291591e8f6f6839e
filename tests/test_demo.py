"""`qwenvl-jax demo` (SFT then DPO, with --grpo SFT then GRPO, with --ppo SFT, a reward model and PPO, on
the shape task) and the shape-task generator.

- the fast demo end to end as a user runs it (a subprocess of the CLI): the SFT loss falls, the DPO reward
  margin rises, both final models are written, and every printed figure is the one recomputed from the
  answers and margins in `report.json`;
- the fast GRPO demo end to end: the GRPO run trains from `sft/final` on the prompts and `shape_reward`
  only, its reward curve is the one its metrics and logged samples give, and every printed held-out
  figure (exact answers, mean reward) is the one recomputed from the answers in `report.json`;
- the fast PPO demo end to end: the reward model trains from `sft/final` on the training pairs, PPO from
  `sft/final` against it alone (no reward function; the value model from the reward model), the reward
  model's held-out accuracy is what its scores of the held-out pairs give, and every printed held-out
  figure is the one recomputed from the answers in `report.json`;
- the demo's flags: --grpo with --ppo, and the training flags with --processor, are refused;
- the demo's output directory: an earlier demo's runs are cleared, a foreign directory is refused;
- the generator: deterministic, held-out images unlike any training image, labels that match the pixels,
  preference pairs whose rejected answer is wrong in exactly the requested attribute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.data.records import DPORecord, SFTRecord, read_jsonl
from qwenvl_jax.data.synthetic import (
    COLORS,
    SHAPES,
    answer,
    shape_reward,
    write_shape_task,
    write_synthetic_data,
)

# Compile time dominates a run of a few steps; XLA's cheapest CPU code generation halves it.
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
}


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwenvl_jax.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def _fast_demo(out: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`qwenvl-jax demo --fast [flags] --out out` as a user runs it: the process and its report.json."""
    proc = _cli("demo", *flags, "--fast", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------------------------ demo
def test_fast_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc, report = _fast_demo(out)
    n = report["settings"]["num_heldout"]
    truths = [h["answer"] for h in report["heldout"]]
    assert len(truths) == n == 8

    sft, dpo = report["sft"], report["dpo"]
    assert sft["steps"] == report["settings"]["sft_steps"] and dpo["steps"] == report["settings"]["dpo_steps"]
    assert sft["loss_last"] < 0.5 * sft["loss_first"], sft
    assert dpo["reward_margin_last"] > dpo["reward_margin_first"], dpo
    for run in ("sft", "dpo"):
        assert (out / run / "final" / "config.json").is_file()
        assert (out / run / "loss_curves.png").is_file()
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == report[run]["steps"]

    # Every figure is what the answers and margins give.
    for phase in ("before", "sft", "dpo"):
        ev = report["evaluations"][phase]
        answers, margins = ev["answers"], np.asarray(ev["margins"])
        assert len(answers) == len(margins) == n and np.isfinite(margins).all()
        assert ev["exact"] == pytest.approx(np.mean([a == t for a, t in zip(answers, truths, strict=True)]))
        colors = [t.split()[1] for t in truths]
        assert ev["color"] == pytest.approx(
            np.mean([c in a.split() for a, c in zip(answers, colors, strict=True)])
        )
        assert ev["prefers"] == pytest.approx(np.mean(margins > 0))
        assert ev["mean_margin"] == pytest.approx(margins.mean())
    assert report["evaluations"]["before"]["exact"] == 0.0  # a random model does not spell the answer

    ev = report["evaluations"]
    lines = proc.stdout.splitlines()
    exact_row = next(line for line in lines if line.startswith("exact answer"))
    assert exact_row.split()[2:] == [f"{round(ev[p]['exact'] * n)}/{n}" for p in ("before", "sft", "dpo")]
    prefer_row = next(line for line in lines if line.startswith("pairs preferring the true answer"))
    assert prefer_row.split()[-3:] == [f"{ev[p]['prefers']:.0%}" for p in ("before", "sft", "dpo")]
    assert f"SFT loss {sft['loss_first']:.3f} -> {sft['loss_last']:.3f}" in proc.stdout
    assert f"reward margin {dpo['reward_margin_first']:.3f} -> {dpo['reward_margin_last']:.3f}" in proc.stdout
    assert "step 8/8" in proc.stderr  # the loop's progress


def test_fast_grpo_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc, report = _fast_demo(out, "--grpo")
    settings, phases = report["settings"], report["phases"]
    assert settings["method"] == "grpo" and phases == ["before", "sft", "grpo", "more_sft"]
    assert "dpo" not in report and not (out / "dpo").exists()
    n = settings["num_heldout"]
    truths = [h["answer"] for h in report["heldout"]]
    assert len(truths) == n == 8

    # GRPO starts from the SFT model and sees prompts and the reward only.
    config = json.loads((out / "grpo" / "config.json").read_text())
    assert config["kind"] == "grpo" and config["rewards"] == ["qwenvl_jax.data.synthetic:shape_reward"]
    assert config["model"]["path"] == str(out / "sft" / "final")
    assert config["data"]["paths"] == [str(out / "data" / "grpo.jsonl")]
    assert config["grpo"]["num_generations"] == settings["grpo_generations"]
    for run in ("sft", "grpo", "more_sft"):
        assert (out / run / "final" / "config.json").is_file()

    # The reward curve is the metrics' `reward`, and that is the mean shape_reward of the step's samples
    # (the fast run logs every step's whole generation batch).
    grpo = report["grpo"]
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == grpo["steps"] == settings["grpo_steps"] == report["more_sft"]["steps"]
    rewards = np.asarray([r["reward"] for r in rows])
    assert grpo["reward_first"] == pytest.approx(rewards[0])
    assert grpo["reward_last"] == pytest.approx(rewards[-1])
    assert grpo["reward_curve"] == pytest.approx([c.mean() for c in np.array_split(rewards, len(rows))])
    solutions = {json.loads(line)["id"]: json.loads(line)["solution"]
                 for line in (out / "data" / "grpo.jsonl").read_text().splitlines()}  # fmt: skip
    samples = [json.loads(line) for line in (out / "grpo" / "completions.jsonl").read_text().splitlines()]
    per_step = settings["grpo_prompts"] * settings["grpo_generations"]
    assert len(samples) == per_step * len(rows)
    for step, row in enumerate(rows, 1):
        logged = [x for x in samples if x["step"] == step]
        gold = [solutions[x["id"].split("#")[0]] for x in logged]
        scores = shape_reward([x["completion"] for x in logged], gold)
        assert [x["rewards"]["shape_reward"] for x in logged] == pytest.approx(scores)
        assert np.mean(scores) == pytest.approx(row["reward"])

    # Every held-out figure is what the answers give.
    ev = report["evaluations"]
    for phase in phases:
        answers = ev[phase]["answers"]
        exact = [a == t for a, t in zip(answers, truths, strict=True)]
        assert ev[phase]["exact"] == pytest.approx(np.mean(exact))
        assert ev[phase]["reward"] == pytest.approx(np.mean(shape_reward(answers, truths)))
    assert ev["before"]["reward"] == 0.0  # a random model names no colour or shape

    lines = proc.stdout.splitlines()
    exact_row = next(line for line in lines if line.startswith("exact answer"))
    assert exact_row.split()[2:] == [f"{round(ev[p]['exact'] * n)}/{n}" for p in phases]
    reward_row = next(line for line in lines if line.startswith("mean reward"))
    assert reward_row.split()[-4:] == [f"{ev[p]['reward']:.2f}" for p in phases]
    assert f"training reward {grpo['reward_first']:.3f} -> {grpo['reward_last']:.3f}" in proc.stdout
    summary = (f"held-out exact answers {round(ev['sft']['exact'] * n)}/{n} -> {round(ev['grpo']['exact'] * n)}/{n}, "
               f"mean reward {ev['sft']['reward']:.2f} -> {ev['grpo']['reward']:.2f}")  # fmt: skip
    assert summary in proc.stdout
    assert f"step {settings['grpo_steps']}/{settings['grpo_steps']}" in proc.stderr


def test_fast_ppo_demo_end_to_end(tmp_path):
    from qwenvl_jax.demo import reward_margins
    from qwenvl_jax.processing import Processor

    out = tmp_path / "demo"
    proc, report = _fast_demo(out, "--ppo")
    settings, phases = report["settings"], report["phases"]
    assert settings["method"] == "ppo" and phases == ["before", "sft", "ppo"]  # no control when fast
    assert "dpo" not in report and "grpo" not in report and "more_sft" not in report
    assert not any((out / run).exists() for run in ("dpo", "grpo", "more_sft"))
    n = settings["num_heldout"]
    truths = [h["answer"] for h in report["heldout"]]
    assert len(truths) == n == 8
    for run in ("sft", "reward", "ppo"):
        assert (out / run / "final" / "config.json").is_file()

    # The reward model: the SFT model plus a head, on the training pairs.
    config = json.loads((out / "reward" / "config.json").read_text())
    assert config["kind"] == "reward" and config["model"]["path"] == str(out / "sft" / "final")
    assert config["data"]["paths"] == [str(out / "data" / "dpo.jsonl")]
    rm = report["reward"]
    rows = [json.loads(line) for line in (out / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == rm["steps"] == settings["reward_steps"]
    assert rm["accuracy_first"] == pytest.approx(rows[0]["accuracy"])
    # Its held-out accuracy is what its scores give (recomputed here in batches of another size).
    processor = Processor.from_pretrained(out / "processor")
    margins = reward_margins(
        out / "reward" / "final",
        processor,
        out / "data" / "heldout_dpo.jsonl",
        pairs_per_batch=3,
        spec_kw={"seq_buckets": (96,), "image_patches": 96, "max_images": 6},
    )
    assert rm["heldout_margins"] == pytest.approx(margins.tolist(), abs=1e-4)
    assert rm["heldout_accuracy"] == pytest.approx(np.mean(margins > 0))
    assert f"above the wrong one in {rm['heldout_accuracy']:.0%} of {n} pairs" in proc.stdout

    # PPO starts from the SFT model and is scored by the reward model alone.
    config = json.loads((out / "ppo" / "config.json").read_text())
    assert config["kind"] == "ppo" and config["model"]["path"] == str(out / "sft" / "final")
    assert not config.get("rewards") and config["trainable"] == "full"
    assert config["ppo"]["reward_model"] == str(out / "reward" / "final")
    assert config["ppo"]["value_init"] == "reward_model"
    assert config["data"]["paths"] == [str(out / "data" / "grpo.jsonl")]
    ppo = report["ppo"]
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == ppo["steps"] == settings["ppo_steps"]
    scores = np.asarray([r["objective/scores"] for r in rows if "objective/scores" in r])
    assert (
        len(scores)
        == ppo["generations"]
        == settings["ppo_steps"] // (settings["ppo_epochs"] * settings["ppo_mini_batches"])
    )
    assert ppo["score_first"] == pytest.approx(scores[0]) and ppo["score_last"] == pytest.approx(scores[-1])
    assert ppo["score_curve"] == pytest.approx(scores.tolist())
    assert not any(k.startswith("rewards/") for r in rows for k in r)  # no reward function ran

    # Every held-out figure is what the answers give.
    ev = report["evaluations"]
    for phase in phases:
        answers = ev[phase]["answers"]
        assert ev[phase]["exact"] == pytest.approx(
            np.mean([a == t for a, t in zip(answers, truths, strict=True)])
        )
        assert ev[phase]["reward"] == pytest.approx(np.mean(shape_reward(answers, truths)))
    lines = proc.stdout.splitlines()
    exact_row = next(line for line in lines if line.startswith("exact answer"))
    assert exact_row.split()[2:] == [f"{round(ev[p]['exact'] * n)}/{n}" for p in phases]
    reward_row = next(line for line in lines if line.startswith("mean reward"))
    assert reward_row.split()[-3:] == [f"{ev[p]['reward']:.2f}" for p in phases]
    summary = (f"held-out exact answers {round(ev['sft']['exact'] * n)}/{n} -> {round(ev['ppo']['exact'] * n)}/{n}, "
               f"mean reward {ev['sft']['reward']:.2f} -> {ev['ppo']['reward']:.2f}")  # fmt: skip
    assert summary in proc.stdout
    assert f"step {settings['ppo_steps']}/{settings['ppo_steps']}" in proc.stderr


def test_fast_qlora_demo_end_to_end(tmp_path):
    """LoRA and QLoRA SFT from the SFT model, side by side: the QLoRA run's base is NF4 (its status line),
    both write final/ (merged) and adapter/ (PEFT), and the printed figures are the answers'."""
    out = tmp_path / "demo"
    proc, report = _fast_demo(out, "--qlora")
    settings, phases = report["settings"], report["phases"]
    assert settings["method"] == "qlora" and phases == ["before", "sft", "lora", "qlora"]
    for run in ("lora", "qlora"):
        config = json.loads((out / run / "config.json").read_text())
        assert config["trainable"] == "lora" and config["model"]["path"] == str(out / "sft" / "final")
        assert config["lora"].get("quantize") == ("nf4" if run == "qlora" else None)
        assert (out / run / "final" / "config.json").is_file()
        assert {p.name for p in (out / run / "adapter").iterdir()} == {
            "adapter_model.safetensors",
            "adapter_config.json",
        }
        rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == report[run]["steps"] == settings["lora_steps"]
    assert proc.stderr.count("NF4 base: 14 kernels") == 1  # 7 decoder kernels x 2 layers, the QLoRA run only
    # Same start, same adapters' init and batches: the first losses differ by the quantization alone (how
    # closely QLoRA then tracks LoRA is tests/test_qlora.py's bound).
    first = [
        json.loads((out / r / "metrics.jsonl").read_text().splitlines()[0])["loss"] for r in ("lora", "qlora")
    ]
    assert first[0] != first[1]

    n, truths, ev = settings["num_heldout"], [h["answer"] for h in report["heldout"]], report["evaluations"]
    for phase in phases:
        answers = ev[phase]["answers"]
        assert ev[phase]["exact"] == pytest.approx(
            np.mean([a == t for a, t in zip(answers, truths, strict=True)])
        )
    exact_row = next(line for line in proc.stdout.splitlines() if line.startswith("exact answer"))
    assert exact_row.split()[2:] == [f"{round(ev[p]['exact'] * n)}/{n}" for p in phases]
    assert (f"held-out exact answers {round(ev['lora']['exact'] * n)}/{n} (LoRA) and "
            f"{round(ev['qlora']['exact'] * n)}/{n} (QLoRA)") in proc.stdout  # fmt: skip


def test_demo_out_dir(tmp_path):
    from qwenvl_jax.demo import MARKER, _prepare

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no earlier demo output"):
        _prepare(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"

    earlier = tmp_path / "earlier"
    (earlier / "sft" / "checkpoints").mkdir(parents=True)
    (earlier / MARKER).write_text("")
    (earlier / "report.json").write_text("{}")
    (earlier / "notes.txt").write_text("mine")
    _prepare(earlier)  # a rerun starts fresh instead of resuming the old runs
    assert sorted(p.name for p in earlier.iterdir()) == sorted([MARKER, "notes.txt"])


def test_demo_cli_options():
    proc = _cli("demo", "--model", "/nonexistent")
    assert proc.returncode == 2 and "--model applies to the processor demo only" in proc.stderr
    for flag in ("--fast", "--qlora"):
        proc = _cli("demo", "--processor", flag)
        assert (
            proc.returncode == 2
            and "--out, --fast, --grpo, --ppo and --qlora apply to the training demo" in proc.stderr
        )
    proc = _cli("demo", "--grpo", "--qlora", "--fast")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --grpo and --qlora are separate demos; choose one"


# ------------------------------------------------------------------------------------------- generator
def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _drawn(pixels: np.ndarray) -> tuple[set[tuple[int, ...]], str]:
    """The colours of the non-white pixels, and the shape their fill of the bounding box says."""
    mask = (pixels != 255).any(-1)
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"  # 1, pi/4, 1/2
    return {tuple(int(v) for v in c) for c in pixels[mask]}, shape


def test_shape_task_is_deterministic_and_heldout_is_disjoint(tmp_path):
    a = write_shape_task(tmp_path / "a", num_train=40, num_heldout=12, seed=3)
    b = write_shape_task(tmp_path / "b", num_train=40, num_heldout=12, seed=3)
    c = write_shape_task(tmp_path / "c", num_train=40, num_heldout=12, seed=4)
    for name in ("sft.jsonl", "dpo.jsonl", "heldout_sft.jsonl", "heldout_dpo.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    pairs = zip(a.train + a.heldout, b.train + b.heldout, strict=True)
    assert all(x.image.read_bytes() == y.image.read_bytes() for x, y in pairs)
    assert a.sft.read_bytes() != c.sft.read_bytes()

    train = {_pixels(e.image).tobytes() for e in a.train}
    assert len(train) == len(a.train)  # no image twice within the split either
    assert not train & {_pixels(e.image).tobytes() for e in a.heldout}
    assert len(a.train) == 40 and len(a.heldout) == 12


def test_shape_task_labels_match_the_pixels(tmp_path):
    task = write_shape_task(tmp_path, num_train=60, num_heldout=20, size=56, radius=(10, 17), seed=0)
    seen = set()
    for e in task.train + task.heldout:
        colors, shape = _drawn(_pixels(e.image))
        assert colors == {COLORS[e.color]}, e
        assert shape == e.shape, e
        assert e.answer == answer(e.color, e.shape) == f"A {e.color} {e.shape}."
        seen.add((e.shape, e.color))
    assert len(seen) == len(SHAPES) * len(COLORS)

    sft, heldout_sft = read_jsonl(task.sft), read_jsonl(task.heldout_sft)
    assert [r.id for r in sft] == [e.id for e in task.train] and all(isinstance(r, SFTRecord) for r in sft)
    assert len(heldout_sft) == 20
    for record, e in zip(sft, task.train, strict=True):
        assert record.messages[-1]["content"] in (e.answer, [{"type": "text", "text": e.answer}])


@pytest.mark.parametrize("rejected", ["shape", "color", "either"])
def test_shape_task_pairs_reject_one_wrong_attribute(tmp_path, rejected):
    task = write_shape_task(tmp_path, num_train=30, num_heldout=10, rejected=rejected, seed=1)
    wrong = set()
    for path, examples in ((task.dpo, task.train), (task.heldout_dpo, task.heldout)):
        records = read_jsonl(path)
        assert all(isinstance(r, DPORecord) for r in records)
        for record, e in zip(records, examples, strict=True):
            assert Path(record.images[0]) == e.image and e.image.is_file()
            chosen, rejected_text = record.chosen["content"], record.rejected["content"]
            assert e.answer in str(chosen) and e.rejected in str(rejected_text)
            _, color, shape = e.rejected.rstrip(".").split()
            assert e.rejected != e.answer and shape in SHAPES and color in COLORS
            assert (color != e.color) + (shape != e.shape) == 1, e
            wrong.add("color" if color != e.color else "shape")
    assert wrong == ({"color", "shape"} if rejected == "either" else {rejected})


def test_shape_task_errors(tmp_path):
    with pytest.raises(ValueError, match="rejected must be one of"):
        write_shape_task(tmp_path, num_train=2, num_heldout=1, rejected="size")
    with pytest.raises(ValueError, match="radius must be"):
        write_shape_task(tmp_path, num_train=2, num_heldout=1, size=56, radius=(20, 30))
    with pytest.raises(ValueError, match="num_train and num_heldout must be >= 1"):
        write_shape_task(tmp_path, num_train=5, num_heldout=0)
    # radius 13 in 28 pixels: 2 x 2 centres x 9 (shape, colour) = 36 distinct images
    with pytest.raises(ValueError, match="too few distinct images"):
        write_shape_task(tmp_path, num_train=30, num_heldout=7, size=28, radius=(13, 14))


def test_write_synthetic_data(tmp_path):
    path = write_synthetic_data(tmp_path / "a", 12, seed=5)
    assert path.read_bytes() == write_synthetic_data(tmp_path / "b", 12, seed=5).read_bytes()
    assert write_synthetic_data(tmp_path / "a", 3, seed=9) == path  # written once, then kept
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        _, color, shape = row["suffix"].rstrip(".").split()
        colors, drawn = _drawn(_pixels(path.parent / row["image"]))
        assert colors == {COLORS[color]} and drawn == shape and row["prefix"] == "What is in the image?"
