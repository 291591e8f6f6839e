"""GRPO through the loop on CPU (float32, tiny random model, synthetic shape prompts):

- the sampler's log-probs of the sampled tokens equal the training forward's (same weights, no token
  suppressed), so `sampling/*` metrics measure a real mismatch, not a misalignment;
- vision placeholders are never sampled, even by a model that prefers them;
- a run raises its reward by reward alone, logs TRL's metrics and writes completions.jsonl;
- after `kill -9` the same command resumes with bitwise-equal losses, rewards and completions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import xla_flags

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.synthetic import write_shape_task
from qwenvl_jax.loading import random_model
from qwenvl_jax.processing import BatchSpec, Processor
from qwenvl_jax.rl.batch import micro_batches
from qwenvl_jax.rl.rollout import SamplingConfig, rollout, suppressed_ids
from qwenvl_jax.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "grpo_tiny_cpu.yaml"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
LETTER_E = """
def letter_e(completions, **kw):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.count("e") / max(len(t), 1) for t in texts]
"""


@pytest.fixture
def generate_calls(monkeypatch):
    """The keywords of every `generate` call a rollout makes."""
    import qwenvl_jax.rl.rollout as rl_rollout

    calls, real = [], rl_rollout.generate

    def spy(model, batch, **kw):
        calls.append(kw)
        return real(model, batch, **kw)

    monkeypatch.setattr(rl_rollout, "generate", spy)
    return calls


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    processor = Processor.from_pretrained(write_tiny_checkpoint(tmp / "proc"))
    task = write_shape_task(tmp / "data", num_train=2, num_heldout=1, seed=0)
    from qwenvl_jax.data.prompts import encode_prompt
    from qwenvl_jax.data.records import read_jsonl

    prompts = [encode_prompt(processor, r) for r in read_jsonl(task.grpo)]
    cfg = Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32")
    return processor, prompts, cfg


def _specs(processor, rows):
    ids = dict(pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
               video_token_id=processor.video_token_id)  # fmt: skip
    left = BatchSpec(
        batch_size=2, seq_buckets=(80,), image_patches=32, max_images=2, padding_side="left", **ids
    )
    right = BatchSpec(batch_size=rows, seq_buckets=(96,), image_patches=16 * rows, max_images=rows, **ids)
    return left, right


def test_sampler_logprobs_equal_the_training_forward(setup):
    """The sampler's log-probs are those of the distribution it drew from (temperature, vision tokens
    suppressed); from the same weights, the training forward's log-probs of the same tokens differ from
    them by exactly the suppressed mass, log(1 - P_suppressed), at every completion token."""
    from qwenvl_jax import losses
    from qwenvl_jax.train.grpo_step import grpo_loss_fn
    from qwenvl_jax.train.state import split_model

    processor, prompts, cfg = setup
    model = random_model(cfg, 0)
    temperature = 0.7
    sampling = SamplingConfig(num_generations=4, max_completion_length=12, temperature=temperature)
    left, right = _specs(processor, 8)
    rollouts, _ = rollout(model, prompts, left, sampling, seed=3)
    advantages = np.linspace(-1, 1, 8).astype(np.float32)
    (mb,) = micro_batches(prompts, rollouts, advantages, right, num_micro_batches=1)
    batch = {k: jnp.asarray(v) for k, v in mb.items()}
    # Reference: full logits of the same rows, tempered; the suppressed mass at each position.
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    vision = {k: batch[k] for k in batch if k.startswith(("pixel_values", "image_"))}
    logits = np.asarray(model(**inputs, **vision), np.float64)[:, :-1] / temperature
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    banned = list(suppressed_ids(cfg))
    suppressed = np.log1p(-np.exp(logp[..., banned]).sum(-1))  # log(1 - P_suppressed)
    labels = np.asarray(mb["labels"])[:, 1:]
    mask = labels != losses.IGNORE_INDEX
    train_lp = np.take_along_axis(logp, np.where(mask, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(mb["sampling_per_token_logps"][mask], (train_lp - suppressed)[mask], atol=2e-5)
    # And the step's own forward lines up with the sampler's tokens (no shift): its metric is that gap.
    graphdef, params, frozen = split_model(model, "full")
    fn = grpo_loss_fn(graphdef, frozen, jnp.float32(mask.sum()), temperature=temperature)
    _, metrics = jax.jit(fn)(params, batch, jax.random.key(0))
    np.testing.assert_allclose(
        float(metrics["sampling/sampling_logp_difference/max"]), np.abs(suppressed[mask]).max(), rtol=1e-3
    )
    assert mask.sum() == rollouts.lengths.sum()  # every completion token is trained, and nothing else


@pytest.mark.parametrize("base_dtype", ["bfloat16", "float32"])
def test_lora_sampler_view_applies_the_adapters(setup, base_dtype):
    """With LoRA the sampler decodes `x W + scale (x A) B`: no merged kernel exists, a base already at the
    compute dtype is the train state's own arrays (not a copy), and the view's logits and greedy rollouts
    equal those of the merged model's."""
    from flax import nnx

    from qwenvl_jax.model.layers import LoraWeight
    from qwenvl_jax.train import lora as lora_lib
    from qwenvl_jax.train.grpo import sampler_view
    from qwenvl_jax.train.state import split_model

    processor, prompts, _ = setup
    cfg = Qwen25VLConfig.preset("tiny", dtype="bfloat16", param_dtype=base_dtype)
    graphdef, _, frozen = split_model(random_model(cfg, 0), "lora")
    lora_cfg = lora_lib.LoraConfig(rank=4, alpha=8.0)
    adapters = lora_lib.init_lora(frozen, lora_cfg, jax.random.key(1))
    adapters = {p: {"a": ab["a"], "b": jax.random.normal(jax.random.key(i), ab["b"].shape) * 0.05}
                for i, (p, ab) in enumerate(adapters.items())}  # fmt: skip
    make = sampler_view(graphdef, frozen, lora_cfg, dtype="bfloat16")
    view = make(adapters)
    flat_frozen = lora_lib.flatten(frozen)
    kernels = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(view, nnx.Param))}
    for path in adapters:  # the base kernel as it is, the adapters beside it
        np.testing.assert_array_equal(np.asarray(kernels[path], np.float32),
                                      np.asarray(flat_frozen[path].astype(jnp.bfloat16), np.float32))  # fmt: skip
    assert len(nnx.to_flat_state(nnx.state(view, LoraWeight))) == 2 * len(adapters)
    if base_dtype == "bfloat16":  # nothing copied: the view reads the frozen arrays themselves
        assert make.copied_paths == ()
        assert all(kernels[p] is flat_frozen[p] for p in flat_frozen if p in kernels)
    else:
        assert set(make.copied_paths) == set(flat_frozen)
    # Numbers in float32 (the same weights): the merged model against the applied adapters.
    cfg32 = Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32")
    graphdef32 = split_model(random_model(cfg32, 0), "lora")[0]
    frozen32 = jax.tree.map(lambda x: x.astype(jnp.float32), frozen)
    merged = nnx.merge(graphdef32, {}, lora_lib.apply_lora(frozen32, adapters, lora_cfg))
    applied = sampler_view(graphdef32, frozen32, lora_cfg, dtype="float32")(adapters)
    ids = jnp.asarray(np.arange(3, 40).reshape(1, -1) % cfg.text.vocab_size, jnp.int32)
    want, got = np.asarray(merged(input_ids=ids)), np.asarray(applied(input_ids=ids))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    left, _ = _specs(processor, 4)
    sampling = SamplingConfig(num_generations=2, max_completion_length=8, temperature=0.0)
    a, _ = rollout(merged, prompts, left, sampling, seed=0)
    b, _ = rollout(applied, prompts, left, sampling, seed=0)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_vision_tokens_are_never_sampled(setup, generate_calls):
    """Rollouts hand the engine every vision special token to suppress (the engine's suppression itself
    is tested in test_generation.py), and no completion holds one."""
    processor, prompts, cfg = setup
    assert suppressed_ids(cfg) == tuple(sorted({cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                                cfg.vision_end_token_id, cfg.vision_token_id}))  # fmt: skip
    left, _ = _specs(processor, 4)
    out, _ = rollout(random_model(cfg, 0), prompts, left, SamplingConfig(num_generations=4, max_completion_length=32),
                     seed=0)  # fmt: skip
    (seen,) = generate_calls
    assert seen["suppress_token_ids"] == suppressed_ids(cfg) and seen["n"] == 4
    assert not np.isin(out.tokens, suppressed_ids(cfg)).any()


def _run(tmp_path, steps=12, **sets):
    from qwenvl_jax.train.loop import load_config, train

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "rew.py").write_text(LETTER_E)
    over = [f"run_dir={tmp_path / 'run'}", f"steps={steps}", f"rewards=[{tmp_path / 'rew.py'}:letter_e]",
            "optim.learning_rate=1e-2", "logging.progress=false", "logging.tensorboard=false",
            "logging.plot=false", *(f"{k}={v}" for k, v in sets.items())]  # fmt: skip
    assert train(load_config(CONFIG, over)) == 0
    run = tmp_path / "run"
    return run, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_reward_alone_raises_the_reward(tmp_path):
    run, rows = _run(tmp_path)
    rewards = [r["reward"] for r in rows]
    assert np.mean(rewards[-3:]) > 2 * np.mean(rewards[:3]), rewards
    want = {"reward", "reward_std", "rewards/letter_e/mean", "rewards/letter_e/std", "frac_reward_zero_std",
            "completions/mean_length", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean",
            "sampling/sampling_logp_difference/mean", "sampling/importance_sampling_ratio/mean",
            "time/rollout_s", "time/reward_s", "time/train_s", "grad_norm"}  # fmt: skip
    assert want <= set(rows[0]), sorted(want - set(rows[0]))
    assert any(r["grad_norm"] > 0 for r in rows)
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    # log_completions_every 5: steps 1, 5 and 10, the first 2 prompts x 4 completions each.
    assert sorted({s["step"] for s in samples}) == [1, 5, 10]
    assert all(set(s) == {"step", "id", "prompt", "completion", "rewards", "advantage"} for s in samples)
    assert (run / "final").is_dir()


def _cmd(run_dir: Path, reward: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "qwenvl_jax.cli", "train", "--config", str(CONFIG), "--set",
           f"run_dir={run_dir}", "--set", f"rewards=[{reward}:letter_e]"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def test_resume_after_sigkill_is_bitwise(tmp_path):
    reward = tmp_path / "rew.py"
    reward.write_text(LETTER_E)
    sets = ("steps=6", "checkpoint.every=1", "checkpoint.keep=10", "grpo.log_completions_every=1",
            "optim.learning_rate=1e-2")  # fmt: skip
    a, b = tmp_path / "a", tmp_path / "b"
    out = subprocess.run(_cmd(a, reward, *sets), env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(b, reward, *sets), env=ENV, stderr=log)
        end = time.monotonic() + 300
        while 3 not in _steps(b):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < end, "timed out"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert 3 <= max(_steps(b)) < 6
    out = subprocess.run(_cmd(b, reward, *sets), env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step" in out.stderr

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "reward", "grad_norm", "completions/mean_length", "entropy"):
        assert [r[key] for r in rb] == [r[key] for r in ra], key  # float equality
    assert (b / "completions.jsonl").read_text() == (a / "completions.jsonl").read_text()


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_kl_to_the_reference(tmp_path, trainable):
    """beta > 0: the reference is a frozen copy of the initial policy (full) or the adapter-free base
    (LoRA, no second copy). At step 1 the policy IS the reference, so the KL is exactly 0; then it grows."""
    sets = {"grpo.beta": 0.04, "trainable": trainable}
    if trainable == "lora":
        sets["lora.rank"] = 4
    run, rows = _run(tmp_path, steps=4, **sets)
    assert rows[0]["kl"] == 0.0
    assert rows[-1]["kl"] > 0.0 and all(np.isfinite(r["loss"]) for r in rows)
    assert (run / "final").is_dir()


def test_generation_buffer_is_reused_and_restored_exactly(tmp_path):
    """steps_per_generation 2 with grad_accum 1: one generation feeds two optimizer steps, the second
    off-policy (old log-probs from before the first update, so the ratio moves and clipping can act).
    Stopping after step 1 (its checkpoint holds the half-used buffer) and resuming gives the same steps."""
    sets = {"grad_accum": 1, "grpo.steps_per_generation": 2, "optim.learning_rate": 3e-2}
    _, rows = _run(tmp_path / "a", steps=4, **sets)
    generated = ["reward" in r for r in rows]
    assert generated == [True, False, True, False]
    assert all(r["time/old_logps_s"] > 0 for r in rows if "reward" in r)
    # On-policy steps have ratio 1 exactly; the reused half of a generation does not.
    assert rows[0]["clip_ratio/region_mean"] == 0.0
    _run(tmp_path / "b", steps=1, **sets)
    _, resumed = _run(tmp_path / "b", steps=4, **sets)
    for key in ("loss", "grad_norm", "entropy", "clip_ratio/region_mean"):
        assert [r[key] for r in resumed] == [r[key] for r in rows], key


def test_num_iterations_replays_the_generation(tmp_path):
    _, rows = _run(tmp_path, steps=4, **{"grpo.num_iterations": 2, "optim.learning_rate": 3e-2})
    assert ["reward" in r for r in rows] == [True, False, True, False]


def test_rollouts_pass_min_p_and_repetition_penalty(setup, generate_calls):
    processor, prompts, cfg = setup
    left, _ = _specs(processor, 4)
    sampling = SamplingConfig(num_generations=2, max_completion_length=4, min_p=0.1, repetition_penalty=1.2)
    rollout(random_model(cfg, 0), prompts, left, sampling, seed=0)
    (seen,) = generate_calls
    assert seen["min_p"] == 0.1 and seen["repetition_penalty"] == 1.2


def test_reward_mistakes_are_one_line(tmp_path, capsys):
    """A reward that does not load is a config error (exit 2); one that raises during training under
    reward_policy: strict stops the run (exit 1) naming the function; neither is a traceback."""
    from qwenvl_jax.cli import main

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "bad.py").write_text(
        "def boom(completions, **kw):\n    raise RuntimeError('no answer key')\n"
    )
    common = ["train", "--config", str(CONFIG), "--set", "steps=2", "--set", "logging.progress=false"]
    missing = [*common, "--set", f"run_dir={tmp_path / 'a'}", "--set", "rewards=[no_such_reward]"]
    assert main(missing) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rewards: ") and "no_such_reward" in last and "Traceback" not in err
    raising = [
        *common,
        "--set",
        f"run_dir={tmp_path / 'b'}",
        "--set",
        f"rewards=[{tmp_path / 'bad.py'}:boom]",
    ]
    assert main(raising) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: step 1: ") and "boom" in last and "Traceback" not in err
