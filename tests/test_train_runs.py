"""`train()` runs beyond plain SFT, in process on CPU (float32, tiny random model, synthetic shapes):

- DPO with a frozen copy of the initial policy as reference: the first loss is log 2 exactly, the loss
  falls, TRL's reward metrics are logged, and `final/` holds the trained model;
- LoRA SFT: `final/` is the base with the adapters merged (non-target weights bit-identical to the base);
- LoRA DPO: the reference is the adapter-disabled base (first loss log 2) with no second copy;
- a streak of non-finite steps stops the run with a clear error after saving a checkpoint;
- config errors name the bad key before anything is built.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qwenvl_jax import loading
from qwenvl_jax.checkpoint import load_params
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.train.config import ConfigError, resolve
from qwenvl_jax.train.loop import TrainingError, train
from qwenvl_jax.train.lora import flatten

BATCH = {"batch_size": 2, "seq_buckets": [96], "image_patches": 64, "max_images": 4}
SAME_PAIRS = {"synthetic": 2, "shuffle": False}  # every DPO batch is the same two pairs: the loss must fall
QUIET = {"progress": False, "tensorboard": False, "plot": False}


def config(run_dir, **over) -> dict:
    return {
        "run_dir": str(run_dir), "steps": 3, "seed": 0,
        "model": {"preset": "tiny", "dtype": "float32", "param_dtype": "float32"},
        "data": {"synthetic": 8}, "batch": BATCH,
        "optim": {"learning_rate": 3e-3, "schedule": "constant"},
        "checkpoint": {"every": 0, "async": False}, "logging": QUIET,
        **over,
    }  # fmt: skip


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def base_params() -> dict[str, np.ndarray]:
    cfg = Qwen25VLConfig.preset("tiny", dtype="float32", param_dtype="float32")
    from flax import nnx

    return {
        k: np.asarray(v)
        for k, v in flatten(nnx.to_pure_dict(nnx.state(loading.random_model(cfg, 0)))).items()
    }


def test_dpo_run_with_frozen_reference_copy(tmp_path):
    run = tmp_path / "dpo"
    assert train(config(run, kind="dpo", steps=4, data=SAME_PAIRS, dpo={"beta": 0.1})) == 0
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # At step 1 the policy IS the reference: every margin is 0, so the loss is -log σ(0) = log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"} <= set(rows[0])
    assert all(r["tokens"] > 0 and r["skipped"] == 0 for r in rows)
    final, cfg = load_params(run / "final")
    base = base_params()
    assert set(final) == set(base) and cfg.text.vocab_size == 384
    assert any(not np.array_equal(final[k], base[k]) for k in base)  # trained, not the initial weights
    model = loading.load(run / "final", dtype="float32")
    assert loading.param_count(model) == sum(v.size for v in base.values())


def test_lora_sft_final_is_merged_base(tmp_path):
    run = tmp_path / "lora"
    over = {"trainable": "lora", "lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}}
    assert train(config(run, optim={"learning_rate": 1e-2, "schedule": "constant"}, **over)) == 0
    rows = metrics(run)
    assert rows[-1]["loss"] < rows[0]["loss"]
    final, _ = load_params(run / "final")
    base = base_params()
    changed = sorted(k for k in base if not np.array_equal(final[k], base[k]))
    assert changed == ["text/layers/self_attn/q_proj/kernel", "text/layers/self_attn/v_proj/kernel"]


def test_lora_dpo_reference_is_the_base(tmp_path):
    run = tmp_path / "lora_dpo"
    over = {"kind": "dpo", "trainable": "lora", "lora": {"rank": 4, "alpha": 8.0}}
    assert (
        train(config(run, data=SAME_PAIRS, optim={"learning_rate": 1e-2, "schedule": "constant"}, **over))
        == 0
    )
    rows = metrics(run)
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_non_finite_streak_stops_after_saving(tmp_path):
    run = tmp_path / "nan"
    # An absurd learning rate: the first update is finite but huge, every later forward overflows.
    cfg = config(run, steps=8, max_bad_steps=2, optim={"learning_rate": 1e15, "schedule": "constant"})
    with pytest.raises(TrainingError, match=r"2 non-finite steps in a row \(steps 2-3\)"):
        train(cfg)
    rows = metrics(run)
    assert [r["skipped"] for r in rows] == [0, 1, 1]
    assert not math.isfinite(rows[-1]["loss"])
    assert (run / "checkpoints" / "3").is_dir() and not (run / "final").exists()


def test_update_overflow_stops_without_saving(tmp_path):
    run = tmp_path / "overflow"
    cfg = config(run, steps=4, checkpoint={"every": 1, "async": False})
    cfg["optim"] = {"learning_rate": float("inf"), "schedule": "constant"}  # the update alone overflows
    with pytest.raises(TrainingError, match=r"step 1: the optimizer update overflowed.*\(step None\)"):
        train(cfg)
    assert not (run / "checkpoints" / "1").exists() and not (run / "final").exists()


@pytest.mark.parametrize(
    "over, match",
    [
        ({"stpes": 3}, r"unknown top-level keys \['stpes'\]"),
        ({"optim": {"lr": 1e-3}}, r"unknown optim keys \['lr'\]"),
        ({"batch": {"batch_size": 2, "seq_bucket": [96]}}, r"unknown batch keys \['seq_bucket'\]"),
        ({"lora": {"rank": 4}}, "a lora section needs trainable: lora"),
        ({"kind": "dpo", "dpo": {"betta": 0.1}}, r"unknown dpo keys \['betta'\]"),
        ({"kind": "rlhf"}, r"config kind='rlhf': input should be 'sft', 'dpo', 'grpo', 'reward' or 'ppo'"),
        ({"steps": 0}, r"config steps=0: input should be greater than 0"),
        ({"mesh": {"data": 2, "model": 4}}, r"unknown mesh keys \['model'\]"),
    ],
)
def test_config_errors_name_the_key(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        resolve(config(tmp_path, **over))


def test_packed_sft_run(tmp_path):
    run = tmp_path / "packed"
    # ~70-token examples: one row of 160 holds two of them (segment ids 1 and 2).
    batch = {"batch_size": 1, "seq_buckets": [160], "image_patches": 64, "max_images": 4, "pack": True}
    assert train(config(run, steps=4, batch=batch)) == 0
    rows = metrics(run)
    # Real tokens, not the sum of segment ids (which would exceed the row).
    assert all(96 < r["tokens"] <= 160 for r in rows), [r["tokens"] for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_cli_reports_config_errors(tmp_path, capsys):
    from qwenvl_jax.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("kind: sft\nsteps: 2\n")
    assert main(["train", "--config", str(cfg), "--set", f"run_dir={tmp_path}", "--set", "optim.lr=3"]) == 2
    assert "unknown optim keys ['lr']" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_grad_accum_over_different_buckets(tmp_path):
    from qwenvl_jax.data.synthetic import draw_shape

    data = tmp_path / "data"
    data.mkdir()
    draw_shape("circle", "red", size=56, center=(28, 28), radius=12).save(data / "a.png")
    rows = [
        {
            "id": f"r{i}",
            "image": "a.png",
            "prefix": "What is in the image?",
            "suffix": "A red circle." * (1 + 8 * (i % 2)),
        }
        for i in range(4)
    ]
    (data / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = {"batch_size": 1, "seq_buckets": [80, 200], "image_patches": 16, "max_images": 1}
    run = tmp_path / "accum"
    cfg = config(
        run, steps=2, grad_accum=2, batch=batch, data={"paths": [str(data / "d.jsonl")], "shuffle": False}
    )
    assert train(cfg) == 0  # one short (bucket 80) and one long (bucket 200) micro-batch per step
    assert [r["skipped"] for r in metrics(run)] == [0, 0]
