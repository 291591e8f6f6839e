"""PPO through the loop (`kind: ppo`): the scoring pass and the train step against TRL 0.22.1's layout
computed independently, row by row, from full logits and hidden states; a reward model as scorer and as
the value model's start; runs with full fine-tuning and LoRA; exact resume after `kill -9`; one-line
refusals.

The objectives themselves (`losses.ppo_advantages`, `losses.ppo_loss`) are checked against TRL's vectors
in test_ppo_losses.py.
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
from qwenvl_jax.rl.rollout import rollout
from qwenvl_jax.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ppo_tiny_cpu.yaml"
REWARD_CONFIG = ROOT / "configs" / "reward_tiny_cpu.yaml"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
LETTER_E = """
def letter_e(completions, **kw):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [t.count("e") / max(len(t), 1) for t in texts]
"""
QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plot=false"]
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qwenvl_jax.data.prompts import encode_prompt
    from qwenvl_jax.data.records import read_jsonl

    tmp = tmp_path_factory.mktemp("ppo")
    processor = Processor.from_pretrained(write_tiny_checkpoint(tmp / "proc"))
    task = write_shape_task(tmp / "data", num_train=4, num_heldout=1, seed=0)
    prompts = [encode_prompt(processor, r) for r in read_jsonl(task.grpo)][:4]
    return tmp, processor, prompts


def _source(tmp, processor, prompts, model, **ppo):
    """A PpoSource holding one generation batch of the 4 `prompts` sampled from `model` (no iterator)."""
    from qwenvl_jax.train.config import resolve
    from qwenvl_jax.train.ppo import PpoSource

    config = resolve({
        "kind": "ppo", "run_dir": str(tmp / "run"), "data": {"synthetic": 4}, "rewards": ["think_format_reward"],
        "batch": {"batch_size": 2, "seq_buckets": [96], "image_patches": 32, "max_images": 2}, "grad_accum": 2,
        "ppo": {"max_prompt_length": 80, "max_completion_length": 8, "temperature": TEMPERATURE, **ppo},
    })  # fmt: skip
    src = PpoSource(config, processor, None, run_dir=tmp, eos_token_id=model.config.eos_token_id[0])
    out, _ = rollout(model, prompts, src.prompt_spec, src.sampling, seed=1)
    src.buffer = src._buffer(prompts, out, {}, b"", 1)
    return src, out


def _row_inputs(processor, prompt, completion):
    """One prompt + completion row alone (no padding), as model inputs."""
    from qwenvl_jax.processing.batch import collate
    from qwenvl_jax.rl.batch import VISION_KEYS

    ids = np.concatenate([np.asarray(prompt["input_ids"]).reshape(-1), completion])
    example = {"id": "x", "input_ids": ids, "labels": np.full(ids.size, -100)}
    example.update({k: prompt[k] for k in VISION_KEYS if prompt.get(k) is not None})
    spec = BatchSpec(batch_size=1, seq_buckets=(ids.size,), image_patches=16, max_images=1,
                     pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
                     video_token_id=processor.video_token_id)  # fmt: skip
    batch = collate([example], spec)
    return {k: jnp.asarray(v) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")
            or k.startswith(("pixel_values", "image_"))}  # fmt: skip


def _trl_row(policy, value, head, processor, prompt, completion):
    """TRL 0.22.1 on one row from its full logits: `log_softmax(logits[ctx-1:-1] / (temp + 1e-7))` at
    the response tokens, and the value head on `hidden[ctx-1:]` (the state before each response token,
    plus the one after the last, which GAE's `padding_mask_p1` keeps)."""
    inputs = _row_inputs(processor, prompt, completion)
    ctx, n = np.asarray(prompt["input_ids"]).size, completion.size
    logits = np.asarray(policy(**inputs), np.float64)[0, ctx - 1 : ctx - 1 + n] / (TEMPERATURE + 1e-7)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    lp = logp[np.arange(n), completion]
    h = np.asarray(value.hidden_states(**inputs), np.float64)[0, ctx - 1 :]
    return lp, h @ np.asarray(head["kernel"], np.float64)[:, 0]


def _models(graphdef, params, frozen, lora_cfg):
    from qwenvl_jax.train.ppo_step import split_ppo
    from qwenvl_jax.train.step import build_model

    policy, value, head = split_ppo(params)
    return (
        build_model(graphdef, policy, frozen, lora_cfg),
        build_model(graphdef, value, frozen, lora_cfg),
        head,
    )


def _moved(params, key, lora_cfg):
    """Params moved off their init (so policy != reference and every term is non-trivial)."""
    from qwenvl_jax.model.value_head import SCORE, VALUE

    keys = iter(jax.random.split(key, 4096))
    if lora_cfg is not None:

        def move(tree):
            return {p: {"a": ab["a"], "b": ab["b"] + 0.05 * jax.random.normal(next(keys), ab["b"].shape)}
                    for p, ab in tree.items()}  # fmt: skip

        policy = {k: v for k, v in params.items() if k not in (VALUE, SCORE)}
        return {**move(policy), VALUE: move(params[VALUE]), SCORE: params[SCORE]}
    return jax.tree.map(lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape, x.dtype), params)


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_scoring_and_step_equal_trl_layout(setup, trainable):
    """The scoring pass's policy and reference log-probs and values, and the train step's loss and
    metrics on parameters that moved since, equal TRL 0.22.1's formulas evaluated on each row alone."""
    from flax import nnx

    from qwenvl_jax.losses_ppo import ppo_advantages, ppo_loss
    from qwenvl_jax.train.lora import LoraConfig
    from qwenvl_jax.train.optim import OptimConfig
    from qwenvl_jax.train.ppo import ROW_ARRAYS
    from qwenvl_jax.train.ppo_step import init_ppo_state, ppo_loss_fn, score_fn
    from qwenvl_jax.train.state import split_model

    tmp, processor, prompts = setup
    cfg = Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32")
    model = random_model(cfg, 0)
    src, out = _source(tmp / trainable, processor, prompts, model)
    lora_cfg = LoraConfig(rank=4, alpha=8.0) if trainable == "lora" else None
    graphdef, state, frozen, _ = init_ppo_state(model, OptimConfig(), trainable, lora_cfg, seed=0)
    params = _moved(state.params, jax.random.key(1), lora_cfg)
    ref_params = None
    if lora_cfg is None:  # the reference: the initial policy
        ref_params = split_model(random_model(cfg, 0), "full")[1]
    score = jax.jit(score_fn(graphdef, frozen, lora_cfg=lora_cfg, temperature=TEMPERATURE, chunk_size=64))
    rows = np.arange(4)
    parts = [score(params, ref_params, None, src.collate(rows[i : i + 2])) for i in (0, 2)]
    scored = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    policy, value, head = _models(graphdef, params, frozen, lora_cfg)
    if lora_cfg is None:
        reference = nnx.merge(graphdef, ref_params)
    else:  # two adapter sets (policy, value) on the one frozen base, which is the reference
        from qwenvl_jax.model.value_head import VALUE
        from qwenvl_jax.train.step import build_model

        assert set(state.params[VALUE]) == {p for p in state.params if p not in (VALUE, "score")}
        assert all(set(ab) == {"a", "b"} for ab in state.params[VALUE].values())
        reference = build_model(graphdef, {}, frozen, lora_cfg, lora_enabled=False)
    t = src.T
    for r in range(4):
        completion = out.completion(r)
        n = completion.size
        lp, v = _trl_row(policy, value, head, processor, prompts[r], completion)
        ref_lp, _ = _trl_row(reference, value, head, processor, prompts[r], completion)
        np.testing.assert_allclose(scored["logprobs"][r, :n], lp, atol=3e-5)
        np.testing.assert_allclose(scored["ref_logprobs"][r, :n], ref_lp, atol=3e-5)
        kept = min(n + 1, t)  # values up to padding_mask_p1
        np.testing.assert_allclose(scored["values"][r, :kept], v[:kept], atol=3e-5)
    assert np.abs(scored["logprobs"] - scored["ref_logprobs"]).max() > 1e-3  # the policy moved
    # GAE over the batch, then the step on parameters moved again (ratio != 1, both losses live).
    responses = np.full((4, t), processor.pad_token_id, np.int32)
    for r in range(4):
        responses[r, : out.lengths[r]] = out.completion(r)
    adv = ppo_advantages(responses, scored["logprobs"], scored["ref_logprobs"], scored["values"],
                         np.asarray([1.0, -0.5, 0.25, 0.0], np.float32), eos_token_id=cfg.eos_token_id[0],
                         pad_token_id=processor.pad_token_id, stop_token_id=None)  # fmt: skip
    src.buffer["arrays"] = {k: np.asarray(adv[k]) for k in ROW_ARRAYS}
    moved = _moved(params, jax.random.key(2), lora_cfg)
    mb = {k: jnp.asarray(v) for k, v in src.collate(np.asarray([2, 0])).items()}
    loss_fn = ppo_loss_fn(graphdef, frozen, lora_cfg=lora_cfg, temperature=TEMPERATURE, chunk_size=64)
    loss, metrics = jax.jit(loss_fn)(moved, mb, jax.random.key(0))
    policy, value, head = _models(graphdef, moved, frozen, lora_cfg)
    new_lp, vpred = np.zeros((2, t)), np.zeros((2, t))
    for i, r in enumerate((2, 0)):
        completion = out.completion(r)
        lp, v = _trl_row(policy, value, head, processor, prompts[r], completion)
        new_lp[i, : lp.size], vpred[i, : min(v.size, t)] = lp, v[:t]
    a = {k: np.asarray(adv[k])[[2, 0]] for k in ("logprobs", "values", "advantages", "returns", "padding_mask",
                                                  "padding_mask_p1")}  # fmt: skip
    want, m = ppo_loss(new_lp, vpred, a["logprobs"], a["values"], a["advantages"], a["returns"], a["padding_mask"],
                       a["padding_mask_p1"])  # fmt: skip
    np.testing.assert_allclose(float(loss), float(want), rtol=2e-5, atol=1e-6)
    for ours, theirs in (("policy/approxkl_avg", "approxkl"), ("loss/value_avg", "vf_loss"),
                         ("loss/policy_avg", "pg_loss"), ("val/ratio", "ratio")):  # fmt: skip
        np.testing.assert_allclose(float(metrics[ours]), float(m[theirs]), rtol=1e-4, atol=1e-6)
    assert float(m["approxkl"]) > 1e-5 and float(m["vf_loss"]) > 0


def test_reward_model_scores_and_starts_the_value_model(setup, tmp_path):
    """A `kind: reward` run's final/ as the PPO reward model: its score is the head at each row's last
    token, and a value model started from it (`value_init: reward_model`, TRL's default) values the
    position after the last response token exactly as the reward model scores the row."""
    from qwenvl_jax.train.loop import _ppo_models, load_config, train
    from qwenvl_jax.train.optim import OptimConfig
    from qwenvl_jax.train.ppo_step import init_ppo_state, score_fn

    _, processor, prompts = setup
    rm_dir = tmp_path / "rm"
    assert train(load_config(REWARD_CONFIG, [f"run_dir={rm_dir}", "steps=2", *QUIET])) == 0
    cfg = Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32")
    model = random_model(cfg, 3)
    config = {"trainable": "full", "ppo": {"reward_model": str(rm_dir / "final")}}
    reward, value_start = _ppo_models(config, model, None)
    assert set(value_start) == {"value_init", "head"}
    graphdef, state, frozen, _ = init_ppo_state(model, OptimConfig(), "full", None, 0, **value_start)
    src, out = _source(tmp_path, processor, prompts, model)
    score = jax.jit(score_fn(graphdef, frozen, temperature=TEMPERATURE, chunk_size=64, reward_graphdef=reward[0],
                             pad_token_id=processor.pad_token_id))  # fmt: skip
    from qwenvl_jax.train.state import split_model

    ref = split_model(model, "full")[1]
    got = score(state.params, ref, (reward[1], reward[2]), src.collate(np.arange(2)))
    for r in range(2):  # the score sits on the row's last token: the template's ending after a finished turn
        completion = out.completion(r)
        t = completion.size + (src.suffix.size if completion[-1] == src.turn_end else 0)
        if t < src.T and completion[-1] != processor.pad_token_id:
            np.testing.assert_allclose(
                float(got["values"][r, t]), float(got["scores"][r]), rtol=1e-5, atol=1e-6
            )
    assert np.abs(np.asarray(got["scores"])).max() > 0
    # Through the loop, scored by the reward model alone, over two generation batches.
    run, rows = _ppo(tmp_path / "loop", 5, "rewards=null", f"ppo.reward_model={rm_dir / 'final'}")
    gens = [r for r in rows if "objective/scores" in r]
    assert [r["step"] for r in gens] == [1, 5] and all(np.isfinite(r["objective/scores"]) for r in gens)
    assert gens[0]["objective/scores"] != 0.0 and (run / "final").is_dir()


def test_finished_turns_are_scored_where_the_reward_model_was_trained(setup, tmp_path):
    """A reward model trained on templated pairs reads its head at the row's last token, the "\n" the chat
    template writes after `<|im_end|>`; a completion that ended on `<|im_end|>` gets that ending appended
    (no label), so the reward model reads it at the same token; a cut-off completion gets nothing."""
    from qwenvl_jax.rl.batch import Rollouts

    _, processor, prompts = setup
    model = random_model(Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32"), 0)
    src, _ = _source(tmp_path, processor, prompts, model)
    end = processor.tokenizer.token_to_id("<|im_end|>")
    assert src.turn_end == end and src.suffix.tolist() == [int(i) for i in processor.tokenizer.encode("\n")]
    tokens = np.full((4, src.T), processor.pad_token_id, np.int32)
    tokens[:, :3] = [[5, 6, end], [5, end, 9], [7, 8, 9], [end, 0, 0]]
    lengths = np.asarray([3, 2, src.T, 1])
    tokens[2] = 7
    rollouts = Rollouts(
        tokens, lengths, np.zeros((4, src.T), np.float32), np.asarray([True, True, False, True]), 1
    )
    buffer = src._buffer(prompts, rollouts, {}, b"", 1)
    for r, ex in enumerate(buffer["examples"]):
        prompt = np.asarray(prompts[r]["input_ids"]).reshape(-1)
        tail = ex["input_ids"][prompt.size :].tolist()
        completion = rollouts.completion(r).tolist()
        ended = completion[-1] == end
        assert tail == completion + (src.suffix.tolist() if ended else [])
        assert (ex["labels"][prompt.size :] != -100).sum() == len(completion)


def _ppo(tmp_path, steps, *sets):
    from qwenvl_jax.train.loop import load_config, train

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "rew.py").write_text(LETTER_E)
    over = [f"run_dir={tmp_path / 'run'}", f"steps={steps}", f"rewards=[{tmp_path / 'rew.py'}:letter_e]",
            *QUIET, *sets]  # fmt: skip
    assert train(load_config(CONFIG, over)) == 0
    run = tmp_path / "run"
    return run, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_run(tmp_path):
    """LoRA PPO through the loop: the reference is the adapter-free base, so the first generation's KL is
    exactly 0 and its first step's ratio is 1; then the policy moves away from the reference and clips;
    TRL's metric names are logged, samples every generation batch."""
    run, rows = _ppo(tmp_path, 8, "trainable=lora", "lora.rank=4", "optim.learning_rate=1e-2",
                     "ppo.log_completions_every=1")  # fmt: skip
    first = rows[0]
    assert first["objective/kl"] == 0.0
    assert abs(first["val/ratio"] - 1.0) < 1e-5 and first["policy/clipfrac_avg"] == 0.0
    gens = [r for r in rows if "objective/kl" in r]
    assert [r["step"] for r in gens] == [1, 5]
    assert gens[-1]["objective/kl"] != 0.0
    want = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
            "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
            "val/clipfrac_avg", "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens",
            "rewards/letter_e/mean", "completions/mean_length", "time/rollout_s", "time/score_s", "time/train_s"}  # fmt: skip
    assert want <= set(first), sorted(want - set(first))
    assert any(r["policy/clipfrac_avg"] > 0 for r in rows)
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 5]
    assert all(set(s) == {"step", "id", "prompt", "completion", "score", "advantage_mean"} for s in samples)
    assert (run / "final").is_dir()


def _cmd(run_dir: Path, reward: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "qwenvl_jax.cli", "train", "--config", str(CONFIG), "--set", f"run_dir={run_dir}",
           "--set", f"rewards=[{reward}:letter_e]"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def test_resume_after_sigkill_is_bitwise(tmp_path):
    """Killed mid generation batch (step 3 of the 4 a batch serves) and run again: the same losses,
    scores and samples as an uninterrupted run, float for float."""
    reward = tmp_path / "rew.py"
    reward.write_text(LETTER_E)
    sets = ("steps=6", "checkpoint.every=1", "checkpoint.keep=10", "ppo.log_completions_every=1",
            "optim.learning_rate=1e-2", "ppo.kl_target=0.1")  # fmt: skip
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
    for key in ("loss", "grad_norm", "loss/value_avg", "policy/approxkl_avg"):
        assert [r[key] for r in rb] == [r[key] for r in ra], key  # float equality
    gens = [
        (r["step"], r["objective/scores"], r["objective/kl"], r["objective/kl_coef"])
        for r in ra
        if "objective/kl" in r
    ]
    assert gens == [(r["step"], r["objective/scores"], r["objective/kl"], r["objective/kl_coef"])
                    for r in rb if "objective/kl" in r]  # fmt: skip
    assert gens[1][3] != gens[0][3]  # the adaptive coefficient moved, and was restored
    assert (b / "completions.jsonl").read_text() == (a / "completions.jsonl").read_text()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["rewards=null"], "kind: ppo needs ppo.reward_model"),
        (
            ["trainable=lora", "ppo.value_init=reward_model", "ppo.reward_model=/nonexistent"],
            "ppo.value_init: reward_model with trainable: lora",
        ),
        (
            ["ppo.reward_model=/nonexistent/rm"],
            "ppo.reward_model /nonexistent/rm: no such checkpoint directory",
        ),
        (["trainable=frozen_vision"], "kind: ppo trains with trainable: full or lora"),
        (["ppo.cliprange=0"], "config ppo.cliprange=0"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, sets, message):
    cmd = [sys.executable, "-m", "qwenvl_jax.cli", "train", "--config", str(CONFIG), "--set",
           f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert not (tmp_path / "run").exists()
