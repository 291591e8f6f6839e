"""Reward models (`kind: reward`): the scalar head, the step, whole runs in process, export and parity.

- the head reads the last non-pad token of each row (transformers' sequence-classifier rule);
- the masked pair loss is `losses.reward_loss` of the real pairs (dummy pairs weightless);
- a run with a zero head starts at loss log 2, accuracy 0; on the synthetic shape task's pairs its loss
  falls and its HELD-OUT pair accuracy rises;
- a LoRA run stopped and resumed equals the uninterrupted one, bit for bit;
- `export` writes an HF sequence classifier (`score.weight`) whose transformers score equals ours;
- config errors name the key.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax import losses
from qwenvl_jax.model.value_head import head_scores, last_token_index, reward_scores
from qwenvl_jax.train.config import ConfigError, resolve
from qwenvl_jax.train.loop import train
from qwenvl_jax.train.reward_step import pair_reward_loss

BATCH = {"batch_size": 2, "seq_buckets": [96], "image_patches": 64, "max_images": 4}
QUIET = {"progress": False, "tensorboard": False, "plot": False}


def config(run_dir, **over) -> dict:
    return {
        "kind": "reward", "run_dir": str(run_dir), "steps": 3, "seed": 0,
        "model": {"preset": "tiny", "dtype": "float32", "param_dtype": "float32"},
        "data": {"synthetic": 8}, "batch": BATCH,
        "optim": {"learning_rate": 1e-3, "schedule": "constant"},
        "checkpoint": {"every": 0, "async": False}, "logging": QUIET,
        **over,
    }  # fmt: skip


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- head
def test_head_reads_the_last_non_pad_token():
    pad, seq, lengths = 7, 9, [9, 1, 4, 6]
    rng = np.random.default_rng(0)
    ids = np.full((len(lengths), seq), pad)
    for b, n in enumerate(lengths):  # right padding; ids drawn without the pad id
        ids[b, :n] = rng.integers(8, 50, n)
    np.testing.assert_array_equal(last_token_index(jnp.asarray(ids), pad), np.array(lengths) - 1)
    left = np.stack([np.roll(row, seq - n) for row, n in zip(ids, lengths, strict=True)])
    np.testing.assert_array_equal(last_token_index(jnp.asarray(left), pad), np.full(len(lengths), seq - 1))
    h = rng.normal(size=(len(lengths), seq, 5)).astype(np.float32)
    w = rng.normal(size=(5, 1)).astype(np.float32)
    got = head_scores({"kernel": jnp.asarray(w)}, jnp.asarray(h), last_token_index(jnp.asarray(ids), pad))
    want = np.stack([h[b, n - 1] @ w for b, n in enumerate(lengths)])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_masked_pair_loss_is_reward_loss_of_the_real_pairs():
    rng = np.random.default_rng(1)
    r_c, r_r = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0])
    real = mask > 0
    kw = {"margin": 0.3, "center_rewards_coefficient": 0.01}
    loss, got = pair_reward_loss(r_c, r_r, mask, **kw)
    want_loss, want = losses.reward_loss(
        r_c[real], r_r[real], margin=np.full(3, 0.3), center_rewards_coefficient=0.01
    )
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-7), key
    # Every pair real: exactly `reward_loss`.
    loss_all, _ = pair_reward_loss(r_c, r_r, None, **kw)
    want_all, _ = losses.reward_loss(r_c, r_r, margin=np.full(5, 0.3), center_rewards_coefficient=0.01)
    assert float(loss_all) == pytest.approx(float(want_all), rel=1e-6)


# ------------------------------------------------------------------------------------------ runs
def _score_pairs(final, pairs_path, cfg) -> tuple[float, np.ndarray]:
    """Held-out pair accuracy of a reward checkpoint, and its rewards (chosen, rejected) per pair."""
    from flax import nnx

    from qwenvl_jax.data.pipeline import make_batches
    from qwenvl_jax.processing import Processor
    from qwenvl_jax.reward_model import load_reward_model
    from qwenvl_jax.train.loop import batch_spec

    model, head = load_reward_model(final, dtype="float32")
    processor = Processor.from_pretrained(final)
    spec, _ = batch_spec(resolve(cfg), processor)
    graphdef, state = nnx.split(model)
    score = jax.jit(lambda st, hd, b: reward_scores(nnx.merge(graphdef, st), hd, b, processor.pad_token_id))
    chosen, rejected = [], []
    for batch in make_batches([str(pairs_path)], processor, spec, kind="dpo", shuffle=False, num_epochs=1):
        r = np.asarray(
            score(state, head, {k: v for k, v in batch.items() if v is not None and k != "labels"})
        )
        pairs, real = len(r) // 2, np.asarray(batch["example_mask"][: len(r) // 2]) > 0
        chosen += list(r[:pairs][real])
        rejected += list(r[pairs:][real])
    chosen, rejected = np.array(chosen), np.array(rejected)
    return float(np.mean(chosen > rejected)), np.stack([chosen, rejected])


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A zero-head full run on the shape task's 16 training pairs, 16 held out."""
    from qwenvl_jax.data import synthetic

    root = tmp_path_factory.mktemp("reward")
    task = synthetic.write_shape_task(root / "task", num_train=32, num_heldout=16, seed=1)
    cfg = config(
        root / "run",
        steps=150,
        data={"paths": [str(task.dpo)]},
        reward={"head_init_std": 0.0},
        optim={"learning_rate": 3e-4, "schedule": "constant"},
    )
    assert train(cfg) == 0
    return root / "run", task, cfg


def test_zero_head_run_starts_at_log2_and_learns(learned):
    run, task, cfg = learned
    rows = metrics(run)
    # A zero head scores every row 0: loss -log σ(0) = log 2, no pair ranked right, no gap.
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert rows[0]["accuracy"] == 0.0 and rows[0]["margin"] == 0.0
    assert rows[0]["chosen"] == 0.0 and rows[0]["rejected"] == 0.0
    assert {"min_reward", "mean_reward", "max_reward", "grad_norm"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    accuracy, _ = _score_pairs(run / "final", task.heldout_dpo, cfg)
    assert last < first - 0.2, (first, last)
    assert np.mean([r["accuracy"] for r in rows[-20:]]) >= 0.75
    # Held out: the zero head ranks no pair (ties, accuracy 0); the trained one above chance (10 of 16 at
    # seed 0: a tiny random backbone generalises little in 150 steps).
    assert accuracy > 0.5, accuracy


def test_export_is_a_transformers_sequence_classifier(learned, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, Qwen2_5_VLConfig
    from transformers.modeling_layers import GenericForSequenceClassification
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel

    from conversion.convert import export
    from qwenvl_jax.checkpoint import load_params
    from qwenvl_jax.reward_model import load_reward_model
    from qwenvl_jax.safetensors_io import hf_tensor_infos

    # transformers 5.24 has no Qwen2.5-VL sequence classifier: this is the class it would define (as it
    # does `Qwen3_5ForSequenceClassification`), registered for AutoModelForSequenceClassification.
    class Qwen2_5_VLForSequenceClassification(GenericForSequenceClassification, Qwen2_5_VLPreTrainedModel):
        pass

    AutoModelForSequenceClassification.register(
        Qwen2_5_VLConfig, Qwen2_5_VLForSequenceClassification, exist_ok=True
    )
    run, _, _ = learned
    flat, _ = load_params(run / "final")
    assert flat["score/kernel"].shape == (64, 1) and flat["score/kernel"].dtype == np.float32
    out = export(run / "final", tmp_path / "hf", dtype="float32")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2_5_VLForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "LABEL_0"} and hf_config["text_config"]["pad_token_id"] is not None
    assert hf_tensor_infos(out)["score.weight"].shape == (1, 64)
    hf_model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(hf_model).__name__ == "Qwen2_5_VLForSequenceClassification"
    # The untied lm_head is kept (lossless: `load_reward_model` reads the dir back as the generative
    # backbone too); the classifier ignores it, as TRL does loading a causal LM into one.
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert set(info["unexpected_keys"]) <= {"lm_head.weight"}
    np.testing.assert_array_equal(hf_model.score.weight.detach().numpy(), flat["score/kernel"].T)

    # Right-padded text rows of several lengths: transformers' pooled logit vs ours, float32.
    pad = hf_config["text_config"]["pad_token_id"]
    rng = np.random.default_rng(0)
    lengths, seq = [12, 5, 9], 12
    ids = np.full((3, seq), pad, np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(10, 300, n)
    mask = (ids != pad).astype(np.int64)
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    for path in (run / "final", out):  # both the Orbax final/ and the exported HF dir load back
        model, head = load_reward_model(path, dtype="float32")
        ours = reward_scores(
            model, head, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}, pad
        )
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-5)


def test_lora_run_resumes_exactly(tmp_path):
    over = {
        "trainable": "lora", "lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]},
        "optim": {"learning_rate": 1e-2, "schedule": "constant"}, "checkpoint": {"every": 2, "async": False},
    }  # fmt: skip
    assert train(config(tmp_path / "whole", steps=4, **over)) == 0
    assert train(config(tmp_path / "split", steps=2, **over)) == 0
    assert train(config(tmp_path / "split", steps=4, **over)) == 0
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(whole, split, strict=True):
        for key in ("loss", "accuracy", "margin", "chosen", "rejected", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)
    from qwenvl_jax.checkpoint import load_params

    p_whole, _ = load_params(tmp_path / "whole" / "final")
    p_split, _ = load_params(tmp_path / "split" / "final")
    assert set(p_whole) == set(p_split) and "score/kernel" in p_whole
    for key in p_whole:
        np.testing.assert_array_equal(p_whole[key], p_split[key], err_msg=key)
    # LoRA merged into the base; the head (N(0, 0.02) at init) trained in full.
    init = 0.02 * jax.random.normal(jax.random.fold_in(jax.random.key(0), 0x5C0E), (64, 1))
    assert not np.allclose(p_whole["score/kernel"], np.asarray(init))


# --------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "over, match",
    [
        ({"kind": "dpo", "reward": {"margin": 0.5}}, "a reward section needs kind: reward"),
        ({"reward": {"margins": 0.5}}, r"unknown reward keys \['margins'\]"),
        ({"reward": {"center_rewards_coefficient": -1.0}}, "reward.center_rewards_coefficient"),
        ({"reward": {"head_init_std": -0.1}}, "reward.head_init_std"),
        ({"rewards": ["accuracy_reward"]}, "a reward model's section is `reward:`"),
        ({"batch": {**BATCH, "pack": True}}, "packing applies to SFT only"),
    ],
)
def test_config_errors(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        resolve(config(tmp_path, **over))


def test_config_resolves_reward_section(tmp_path):
    out = resolve(config(tmp_path, reward={"margin": 0.5, "center_rewards_coefficient": 0.01}))
    assert out["kind"] == "reward" and out["reward"] == {"margin": 0.5, "center_rewards_coefficient": 0.01}
