"""The training configs in configs/ and their memory plans (`qwenvl_jax.train.plan`), without allocating.

Every train config (a YAML file with a `kind`) loads, plans, names the HF parameter count of its preset,
has a mesh of its target's size and rows that split over it, and fits its target's memory with the
plan's headroom (peak estimate <= 90% of HBM, see `plan.USABLE_FRACTION`); a GRPO or PPO config's
generation phase (KV cache, prefill, decode logits, the sampler view) and PPO's scoring pass are part of
that peak. Every config's real train step is traced at full size with `jax.eval_shape` (about 2 s per
config on CPU). Configs that cannot fit are reported as not fitting.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.pipeline import collate_pairs
from qwenvl_jax.generation.cache import cache_bytes
from qwenvl_jax.processing.batch import BatchSpec
from qwenvl_jax.train import plan as plan_lib
from qwenvl_jax.train.plan import (
    GIB,
    abstract_batch,
    check_step_shapes,
    compiled_memory,
    format_plan,
    parse_target,
    plan,
)

CONFIG_DIR = Path(__file__).parent.parent / "configs"
TRAIN_CONFIGS = sorted(
    p.name for p in CONFIG_DIR.glob("*.yaml") if "kind" in (yaml.safe_load(p.read_text()) or {})
)
# HF's counts (tests/test_model_shapes.py: transformers on the meta device; the tied 3B lm_head once).
HF_PARAMS = {"3B": 3_754_622_976, "7B": 8_292_166_656}
EXPECTED = [
    "dpo_3b_1xh100.yaml", "dpo_7b_8xh100.yaml", "dpo_7b_v5p8.yaml", "sft_3b_1xh100.yaml",
    "sft_3b_8xh100.yaml", "sft_7b_1xh100.yaml", "sft_7b_8xh100.yaml", "sft_7b_v5p8.yaml",
    "grpo_3b_lora_1xh100.yaml", "grpo_3b_8xh100.yaml", "grpo_7b_8xh100.yaml", "grpo_7b_v5p8.yaml",
    "ppo_3b_lora_1xh100.yaml", "ppo_7b_8xh100.yaml",
    "sft_7b_v5p16.yaml", "dpo_7b_v5p32.yaml", "sft_7b_2x8xh100.yaml", "grpo_7b_v5p16.yaml",  # several hosts
    "sft_7b_qlora_24gb.yaml", "grpo_3b_qlora_24gb.yaml",  # QLoRA on one 24 GB GPU
]  # fmt: skip
# Rank 16 on the 7 text projections of the 3B (grpo_3b_lora_1xh100's and ppo_3b_lora_1xh100's LoRA).
ADAPTERS_3B = 29_933_568


def load(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / name).read_text(encoding="utf-8"))


def holds_reference(config: dict) -> bool:
    """A second full param tree: DPO, GRPO with beta > 0 and PPO, all without LoRA (train.loop's rule)."""
    if config["trainable"] == "lora":
        return False
    kind = config["kind"]
    return kind in ("dpo", "ppo") or (kind == "grpo" and config["grpo"].get("beta", 0) > 0)


def test_the_config_set():
    assert set(EXPECTED) <= set(TRAIN_CONFIGS)
    tiny = {"sft_tiny_cpu.yaml", "dpo_tiny_cpu.yaml", "grpo_tiny_cpu.yaml", "ppo_tiny_cpu.yaml"}
    assert tiny <= set(TRAIN_CONFIGS)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_config_plans_and_fits(name):
    config = load(name)
    p = plan(config)
    assert p.problems == (), format_plan(p)
    table = format_plan(p)
    assert f"{p.param_count:,} params" in table
    if config["kind"] == "grpo":
        # A generation batch is batch_size x steps_per_generation (default grad_accum) completions, in a
        # cache of round_up(prompt + completion, 128) slots; that phase is in the table and in the peak.
        g = config["grpo"]
        per_generation = g.get("steps_per_generation") or config.get("grad_accum", 1)
        assert p.rollout.rows == config["batch"]["batch_size"] * per_generation
        assert p.rollout.cache_slots == -(-(g["max_prompt_length"] + g["max_completion_length"]) // 128) * 128
        assert p.phase_bytes("rollout") > 0 and "rollout (per device)" in table
        assert p.peak_bytes >= p.state_bytes + p.phase_bytes("rollout")
    elif config["kind"] == "ppo":
        # One completion for each of batch_size x grad_accum x num_mini_batches prompts; the scoring pass
        # (forward only) is planned and stays below the forward/backward of the same micro-batch.
        g = config["ppo"]
        prompts = config["batch"]["batch_size"] * config.get("grad_accum", 1) * g.get("num_mini_batches", 1)
        assert (p.rollout.prompts, p.rollout.num_generations, p.rollout.rows) == (prompts, 1, prompts)
        assert p.rollout.cache_slots == -(-(g["max_prompt_length"] + g["max_completion_length"]) // 128) * 128
        assert p.phase_bytes("rollout") > 0 and "rollout (per device)" in table
        assert 0 < p.phase_bytes("scoring") < p.phase_bytes("backward") and "scoring (per device)" in table
        assert p.peak_bytes >= p.state_bytes + max(p.phase_bytes("rollout"), p.phase_bytes("backward"))
    else:
        assert p.rollout is None and p.phase_bytes("rollout") == 0
        assert p.phase_bytes("scoring") == 0 and "scoring" not in table
    preset = config["model"]["preset"]
    if preset in HF_PARAMS:
        assert not Path(config["model"]["path"]).exists()  # a placeholder: the plan read the preset
        assert p.model_source == f"preset {preset}"
        assert p.param_count == HF_PARAMS[preset]
    if config.get("target") is None:
        assert preset == "tiny" and p.fits is None
        return
    target = parse_target(config["target"])
    assert p.num_devices == target.num_devices
    assert p.rows_per_micro_batch % (p.mesh["data"] * p.mesh["fsdp"]) == 0
    assert p.fits and p.peak_bytes <= plan_lib.USABLE_FRACTION * target.chip.memory_bytes
    assert "FITS" in table and "DOES NOT FIT" not in table
    # Full fine-tuning with AdamW: param + gradient + mu + nu in float32 = 16 bytes per param (20 with
    # the DPO/GRPO/PPO reference copy) split over the devices; FSDP leaves only norms and biases
    # replicated. PPO adds the value model's 16 and the reward model at the compute dtype (bf16: 38).
    if config["trainable"] == "full":
        per_param = 20 if holds_reference(config) else 16
        if config["kind"] == "ppo":
            reward = jnp.dtype(config["model"]["dtype"]).itemsize if config["ppo"].get("reward_model") else 0
            per_param += 16 + reward
        even = per_param * p.param_count / p.num_devices
        state = sum(r.bytes for r in p.rows if r.phase == "state" and r.name != "batch inputs")
        assert even <= state <= 1.005 * even, (state, even)
    else:
        assert config["trainable"] == "lora"
        sets = 2 if config["kind"] == "ppo" else 1  # PPO: the policy's and the value model's adapters
        assert p.trainable_count < sets * 0.01 * p.param_count


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_step_shapes_at_full_size(name):
    """The real jitted step of the config's kind traced on abstract state and batch (no allocation)."""
    config = load(name)
    check = check_step_shapes(config)
    assert check.metrics["loss"].shape == () and check.metrics["loss"].dtype == np.float32
    assert check.metrics["skipped"].dtype == np.int32
    assert ("rewards/margins" in check.metrics) == (config["kind"] == "dpo")
    assert ("label_tokens" in check.metrics) == (config["kind"] == "sft")
    assert ("clip_ratio/region_mean" in check.metrics) == (config["kind"] == "grpo")
    assert ("loss/value_avg" in check.metrics) == (config["kind"] == "ppo")
    if config["kind"] == "grpo":  # the KL term needs the reference (a frozen copy, or the LoRA-free base)
        assert ("kl" in check.metrics) == (config["grpo"].get("beta", 0) > 0)
    backend = config["model"].get("attention_backend", "xla")
    native = {"cudnn": "gpu", "splash": "tpu"}.get(backend, jax.default_backend())
    assert check.attention_backend == (backend if jax.default_backend() == native else "xla")
    assert int(check.state.step.size) == 1


def test_abstract_batch_is_collate_output_stacked():
    config = load("dpo_7b_8xh100.yaml")
    cfg = Qwen25VLConfig.preset("7B")
    batch = abstract_batch(config, cfg)
    pairs, accum = config["batch"]["batch_size"], config["grad_accum"]
    seq = config["batch"]["seq_buckets"][-1]
    assert batch["input_ids"].shape == (accum, 2 * pairs, seq)
    assert batch["position_ids"].shape == (accum, 3, 2 * pairs, seq)
    # A pair's image is encoded once: half the budget of the 2 x pairs rows (`data.collate_pairs`).
    assert batch["pixel_values"].shape == (accum, config["batch"]["image_patches"] // 2, 1176)
    assert batch["completion_mask"].shape == (accum, 2 * pairs, seq)
    # Same keys, shapes and dtypes as collate of real-looking rows (one 448x448 image each).
    spec = BatchSpec.from_dict(
        {k: v for k, v in config["batch"].items() if k != "pack"},
        batch_size=2 * pairs,
        pad_token_id=cfg.bos_token_id,
    )
    rows = []
    for _ in range(pairs):
        ids = np.full(seq - 7, 100, np.int64)
        ids[5 : 5 + 256] = cfg.image_token_id
        row = {
            "input_ids": ids,
            "labels": ids,
            "pixel_values": np.zeros((1024, 1176), np.float32),
            "image_grid_thw": np.array([[1, 32, 32]]),
        }
        rows.append((row, dict(row)))
    real = collate_pairs(rows, spec)
    assert set(batch) - {"completion_mask"} == set(real)
    for key, value in real.items():
        assert batch[key].shape[1:] == value.shape and batch[key].dtype == value.dtype, key


def test_compiled_arguments_are_the_planned_state():
    """XLA's buffer assignment of the compiled tiny step holds exactly the planned params and optimizer
    state as arguments (plus the batch keys the step reads) and reuses the donated ones for its output."""
    config = {**load("sft_tiny_cpu.yaml"), "batch": {"batch_size": 2, "seq_buckets": [32]}, "grad_accum": 1}
    p = plan(config)
    memory = compiled_memory(config)
    held = {r.name: r.bytes for r in p.rows if r.phase == "state"}
    params_and_moments = held["trainable params"] + held["frozen params"] + held["optimizer state"]
    assert params_and_moments < memory["argument"] <= params_and_moments + held["batch inputs"]
    assert memory["alias"] >= held["trainable params"] + held["optimizer state"]
    assert memory["peak"] == memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]


def test_seven_b_full_finetune_on_one_h100_does_not_fit():
    config = copy.deepcopy(load("sft_7b_1xh100.yaml"))
    config["trainable"] = "full"
    config["model"]["param_dtype"] = "float32"
    del config["lora"]
    p = plan(config)
    assert p.fits is False
    assert p.state_bytes > 16 * HF_PARAMS["7B"]  # 123.6 GiB of state alone
    assert any("exceeds the usable" in problem for problem in p.problems)
    assert "DOES NOT FIT" in format_plan(p)


def test_three_b_full_finetune_fits_one_h100():
    """56 GiB of state (16 bytes/param) plus the update's one trainable-sized buffer: 70 GiB of 71.7
    usable, because `apply_update` writes the new params and moments in place (under lax.cond)."""
    config = copy.deepcopy(load("sft_3b_1xh100.yaml"))
    assert config["trainable"] == "full"
    p = plan(config)
    assert p.phase_bytes("update") > p.phase_bytes("backward")
    state = sum(r.bytes for r in p.rows if r.phase == "state" and r.name != "batch inputs")
    assert state == pytest.approx(16 * HF_PARAMS["3B"], abs=1024)  # 55.9 GiB; the step counters
    assert p.state_bytes < p.peak_bytes < p.usable_bytes
    assert p.fits is True


def test_mesh_and_batch_problems_are_reported():
    config = copy.deepcopy(load("sft_7b_8xh100.yaml"))
    config["mesh"] = {"fsdp": 4}
    config["batch"]["batch_size"] = 6
    problems = plan(config).problems
    assert any("has 4 devices, target 8xh100 has 8" in s for s in problems)
    assert any("6 rows per micro-batch do not divide over data x fsdp = 4" in s for s in problems)


def test_fsdp_splits_the_state_evenly():
    one = plan({**load("sft_7b_8xh100.yaml"), "mesh": None, "target": "1xh200"})
    eight = plan(load("sft_7b_8xh100.yaml"))
    for name in ("trainable params", "optimizer state", "gradients"):
        (a,) = [r.bytes for r in one.rows if r.name == name]
        (b,) = [r.bytes for r in eight.rows if r.name == name]
        assert a / 8 < b < 1.005 * a / 8, name  # replicated: only norm scales and biases


def test_lora_adapters_stay_float32_on_a_bf16_base():
    p = plan(load("sft_7b_1xh100.yaml"))
    assert p.trainable_dtype == "float32"  # the adapters and their AdamW moments
    assert not any("moments in the same dtype" in n for n in p.notes)
    # The adapters are applied, never merged: LoRA's own activations are rank-sized, not kernel-sized.
    rows = {r.name: r for r in p.rows}
    assert rows["LoRA activations"].phase == "backward" and not rows["LoRA activations"].exact
    assert rows["LoRA activations"].bytes < 1e-3 * rows["frozen params"].bytes
    assert not any("merged" in r.name for r in p.rows)


def test_qlora_plan_counts_the_nf4_base():
    """The frozen row of a QLoRA plan is the NF4 size of the decoder's kernels (`quant.nf4_bytes`) plus the
    other weights at the param dtype, exactly; without `lora.quantize` it is the whole base at that dtype.
    The dequantized layer is a row of its own."""
    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.quant import nf4_bytes, nf4_targets
    from qwenvl_jax.weights import param_shapes

    config = load("sft_7b_qlora_24gb.yaml")
    shapes = param_shapes(Qwen25VLConfig.preset("7B"))
    targets = set(nf4_targets(shapes))
    assert len(targets) == 7 and all(t.startswith("text/layers/") for t in targets)
    bf16 = {k: 2 * int(np.prod(s)) for k, s in shapes.items()}
    expected = sum(nf4_bytes(shapes[k]) if k in targets else bf16[k] for k in shapes)

    def rows(config):
        return {r.name: r.bytes for r in plan(config).rows}

    quantized = rows(config)
    assert quantized["frozen params"] == expected
    assert quantized["frozen params"] < 0.45 * sum(bf16.values())
    assert quantized["dequantized kernels"] > 0
    config["lora"].pop("quantize")
    plain = rows(config)
    assert plain["frozen params"] == sum(bf16.values()) and "dequantized kernels" not in plain


def test_model_path_config_json_is_read(tmp_path):
    Qwen25VLConfig.preset("3B").save_pretrained(tmp_path)
    config = {**load("sft_3b_1xh100.yaml"), "model": {"path": str(tmp_path), "dtype": "bfloat16"}}
    p = plan(config)
    assert p.model_source == str(tmp_path / "config.json")
    assert p.param_count == HF_PARAMS["3B"]


@pytest.mark.parametrize(
    ("value", "devices", "memory_gib"),
    [
        ("1xh100", 1, 79.6),
        ("8xH100", 8, 79.6),
        ("2xh200", 2, 140.4),
        ("v5p-8", 4, 95.0),
        ("v5p-16", 8, 95.0),
        ("v5p-32", 16, 95.0),
        ("2x8xh100", 16, 79.6),
        ("1xl4", 1, 22.5),
        ("1xrtx4090", 1, 24.0),
    ],
)
def test_parse_target(value, devices, memory_gib):
    target = parse_target(value)
    assert target.num_devices == devices
    assert target.chip.memory_bytes / GIB == pytest.approx(memory_gib, abs=0.05)
    # Hosts: a v5p worker drives 4 chips; "<hosts>x<n>x..." names them.
    assert target.hosts == {"v5p-16": 2, "v5p-32": 4, "2x8xh100": 2}.get(value, 1)


def test_a_multi_host_plan_names_each_host_share_and_refuses_an_uneven_batch():
    config = load("sft_7b_v5p16.yaml")
    text = format_plan(plan(config))
    assert "hosts: 2 processes x 4 local devices" in text and "8 batch_size, 8192 image_patches" in text
    config["batch"]["batch_size"] = 15
    config["mesh"] = {"data": 1, "fsdp": 8, "tensor": 1}
    assert any("batch.batch_size=15 does not split over 2 processes" in p for p in plan(config).problems)


@pytest.mark.parametrize("value", ["h100", "0xh100", "v5p-3", "8xa100"])
def test_bad_target_names_it(value):
    with pytest.raises(ValueError, match=repr(value)):
        parse_target(value)


def test_cli_dry_run(capsys):
    from qwenvl_jax.cli import main

    assert main(["train", "--config", str(CONFIG_DIR / "sft_3b_8xh100.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "-> FITS" in out and "train step traced at full size" in out
    too_big = ["--set", "model.preset=72B"]
    assert main(["train", "--config", str(CONFIG_DIR / "sft_3b_1xh100.yaml"), "--dry-run", *too_big]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["train", "--config", str(CONFIG_DIR / "grpo_3b_lora_1xh100.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out  # the resolved config (every grpo default filled in) plans alike
    assert "rollout (per device)" in out and "KV cache" in out and "-> FITS" in out
    assert main(["train", "--config", str(CONFIG_DIR / "ppo_3b_lora_1xh100.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "scoring (per device)" in out and "reward model" in out and "-> FITS" in out


# ------------------------------------------------------------------------------------------- GRPO


def test_grpo_abstract_batch_has_the_rl_keys():
    config = load("grpo_7b_v5p8.yaml")
    batch = abstract_batch(config, Qwen25VLConfig.preset("7B"))
    accum, rows, seq = config["grad_accum"], config["batch"]["batch_size"], config["batch"]["seq_buckets"][-1]
    assert batch["labels"].shape == (accum, rows, seq)
    assert batch["advantages"].shape == (accum, rows) and batch["advantages"].dtype == np.float32
    assert batch["sampling_per_token_logps"].shape == (accum, rows, seq - 1)
    assert "completion_mask" not in batch and "old_per_token_logps" not in batch  # on-policy


def test_grpo_old_logps_when_a_generation_spans_steps():
    """Served twice (num_iterations 2), a generation batch's second pass sees moved weights: the batch
    carries the old log-probs and the step that reads them traces."""
    config = copy.deepcopy(load("grpo_tiny_cpu.yaml"))
    config["grpo"]["num_iterations"] = 2
    batch = abstract_batch(config, Qwen25VLConfig.preset("tiny"))
    assert batch["old_per_token_logps"].shape == batch["sampling_per_token_logps"].shape
    assert check_step_shapes(config).metrics["loss"].shape == ()
    assert plan(config).rollout.rows == config["batch"]["batch_size"] * config["grad_accum"]


def test_grpo_seq_bucket_defaults_to_prompt_plus_completion():
    config = copy.deepcopy(load("grpo_3b_lora_1xh100.yaml"))
    del config["batch"]["seq_buckets"]
    g = config["grpo"]
    assert plan(config).seq_len == g["max_prompt_length"] + g["max_completion_length"]


def test_kv_cache_row_is_exact():
    """The cache row is `generation.cache`'s bytes (k, v, mask) plus the decode loop's token and
    log-prob buffers; FSDP splits k and v by rows, and a tensor axis that does not divide the 3B's 2 kv
    heads leaves them whole (the engine's `indivisible="replicate"` cache rules)."""
    config = load("grpo_3b_lora_1xh100.yaml")
    cfg = Qwen25VLConfig.preset("3B", dtype="bfloat16")
    one = plan(config)
    r = one.rollout
    free = r.cache_slots - r.prompt_len
    (kv,) = [row.bytes for row in one.rows if row.name == "KV cache"]
    assert kv == cache_bytes(cfg, r.rows, r.cache_slots) + r.rows * free * 8
    mask_and_tokens = r.rows * r.cache_slots * 4 + r.rows * free * 8
    (prefill,) = [row.bytes for row in one.rows if row.name == "prefill keys/values"]
    assert prefill == cache_bytes(cfg, r.prompts, r.prompt_len) - r.prompts * r.prompt_len * 4
    for mesh, ways in (({"fsdp": 8}, 8), ({"fsdp": 2, "tensor": 4}, 2), ({"fsdp": 4, "tensor": 2}, 8)):
        p = plan({**config, "mesh": mesh, "target": None})
        (split,) = [row.bytes for row in p.rows if row.name == "KV cache"]
        assert split - mask_and_tokens == pytest.approx((kv - mask_and_tokens) / ways, abs=1), mesh


def test_grpo_rollout_is_counted():
    """A config whose KV cache alone exceeds the device is refused, although its training phases fit:
    3B, 512 completions of a 2048-token prompt + 6144 new tokens = 144 GiB of cache on one H100."""
    config = copy.deepcopy(load("grpo_3b_lora_1xh100.yaml"))
    config["grad_accum"] = 64
    config["grpo"]["max_completion_length"] = 6144
    p = plan(config)
    (kv,) = [row.bytes for row in p.rows if row.name == "KV cache"]
    assert kv > p.target.chip.memory_bytes
    assert p.state_bytes + max(p.phase_bytes("backward"), p.phase_bytes("update")) < p.usable_bytes
    assert p.binding_phase == "rollout" and p.fits is False
    table = format_plan(p)
    assert "DOES NOT FIT" in table and "rollout binds" in table
    assert any("exceeds the usable" in problem for problem in p.problems)


def test_grpo_rollout_rows_by_mode():
    """Both modes generate from the sampler view: every parameter at the compute dtype (bf16: 2 bytes per
    parameter), whole along the model width on every device (8xH100 FSDP: the full model per device); LoRA
    adds its adapters, applied, and copies nothing of a base already in bf16. The reference copy exists for
    full fine-tuning with beta > 0 only."""
    lora = plan(load("grpo_3b_lora_1xh100.yaml"))  # float32 base: a bf16 cast of it, plus the adapters
    full = plan(load("grpo_3b_8xh100.yaml"))
    bf16_base = copy.deepcopy(load("grpo_3b_lora_1xh100.yaml"))
    bf16_base["model"]["param_dtype"] = "bfloat16"
    bf16_base = plan(bf16_base)
    for p, want in ((lora, 2 * lora.param_count), (full, 2 * full.param_count), (bf16_base, 0)):
        (view,) = [r for r in p.rows if r.name == "sampler view"]
        assert view.phase == "rollout" and view.exact
        assert p.trainable_count == (full.param_count if p is full else 29933568)
        adapters = 0 if p is full else 2 * p.trainable_count
        assert view.bytes == want + adapters, (view.bytes, want, adapters)  # no tensor parallelism here
    assert "reference params" not in {r.name for r in lora.rows}
    (ref,) = [r.bytes for r in full.rows if r.name == "reference params"]
    (params,) = [r.bytes for r in full.rows if r.name == "trainable params"]
    assert ref == params + sum(r.bytes for r in full.rows if r.name == "frozen params")
    no_kl = copy.deepcopy(load("grpo_3b_8xh100.yaml"))
    no_kl["grpo"]["beta"] = 0.0
    assert "reference params" not in {r.name for r in plan(no_kl).rows}
    assert plan(no_kl).state_bytes == full.state_bytes - ref


def test_grpo_generation_batch_problems_are_reported():
    config = copy.deepcopy(load("grpo_7b_v5p8.yaml"))
    config["grad_accum"] = 3  # 24 completions: 3 prompts of 8, on 4 chips
    (problem,) = plan(config).problems
    assert "3 prompts per generation batch do not divide over data x fsdp = 4" in problem
    config["batch"]["batch_size"] = 4  # 12 completions: not whole groups of 8
    problems = plan(config).problems
    assert any(
        "12 completions per generation batch are not a multiple of num_generations 8" in s for s in problems
    )


# -------------------------------------------------------------------------------------------- PPO


def test_ppo_plan_rows(tmp_path):
    """Full PPO holds the policy and the value model as trainable float32 trees (twice GRPO's params,
    gradients and AdamW moments, plus the value head), the initial policy as the reference and the reward
    model at the compute dtype; LoRA PPO holds two adapter sets and the head on one base, no reference
    copy, and its sampler view reads the policy's adapters only. Per micro-batch the forward/backward is
    twice SFT's (two models' activations, two adapter sets'); the scoring pass stays below it."""
    full = plan(load("ppo_7b_8xh100.yaml"))
    grpo = plan(load("grpo_7b_8xh100.yaml"))  # the same model, mesh and optimizer, one trainable tree
    rows, grpo_rows = {r.name: r.bytes for r in full.rows}, {r.name: r.bytes for r in grpo.rows}
    hidden = Qwen25VLConfig.preset("7B").text.hidden_size
    assert full.trainable_count == 2 * full.param_count + hidden
    # The head (hidden, 1) is split like the model width: fsdp 8.
    assert rows["trainable params"] == 2 * grpo_rows["trainable params"] + hidden * 4 // 8
    assert rows["gradients"] == rows["update temporaries"] == rows["trainable params"]
    counts = grpo_rows["optimizer state"] - 2 * grpo_rows["trainable params"]  # AdamW's step counts
    assert rows["optimizer state"] == 2 * rows["trainable params"] + counts
    assert rows["reference params"] == grpo_rows["reference params"]  # the policy alone, float32
    assert rows["frozen params"] == 0
    # The reward model: every param in bf16, laid out like the float32 reference; its head whole.
    assert rows["reward model"] == rows["reference params"] // 2 + hidden * 4
    one = plan({**load("ppo_7b_8xh100.yaml"), "mesh": None, "target": None})
    (reward,) = [r.bytes for r in one.rows if r.name == "reward model"]
    assert reward == 2 * HF_PARAMS["7B"] + 4 * hidden
    assert rows["sampler view"] == 2 * full.param_count  # the policy in bf16, whole on every device
    sft = plan({k: v for k, v in load("ppo_7b_8xh100.yaml").items() if k != "ppo"} | {"kind": "sft"})
    (act,) = [r.bytes for r in sft.rows if r.name == "activations"]
    assert rows["activations"] == 2 * act  # the policy's and the value model's, same micro-batch
    assert "LoRA activations" not in rows and "scoring LoRA activations" not in rows

    config = load("ppo_3b_lora_1xh100.yaml")
    lora = plan(config)
    rows = {r.name: r.bytes for r in lora.rows}
    assert lora.trainable_count == 2 * ADAPTERS_3B + 2048
    assert rows["trainable params"] == 4 * lora.trainable_count  # float32 adapters and head
    assert rows["frozen params"] == 2 * HF_PARAMS["3B"]  # the one bf16 base of both adapter sets
    assert "reference params" not in rows
    assert rows["reward model"] == 2 * HF_PARAMS["3B"] + 4 * 2048
    # The policy's adapters in bf16 on the base read as it is; the value model's are not generated with.
    assert rows["sampler view"] == 2 * ADAPTERS_3B
    sft = plan({k: v for k, v in config.items() if k != "ppo"} | {"kind": "sft"})
    sft_rows = {r.name: r.bytes for r in sft.rows}
    assert rows["activations"] == 2 * sft_rows["activations"]
    assert rows["LoRA activations"] == 2 * sft_rows["LoRA activations"]
    # Scoring runs both adapter sets without a backward: nothing of theirs is saved across layers.
    assert 0 < rows["scoring LoRA activations"] <= rows["LoRA activations"]
    assert lora.phase_bytes("scoring") < lora.phase_bytes("backward")
    assert (lora.rollout.prompts, lora.rollout.rows) == (32, 32)

    # A reward model that exists is planned with its own architecture (here a 7B scoring a 3B policy).
    Qwen25VLConfig.preset("7B").save_pretrained(tmp_path)
    config["ppo"] = {**config["ppo"], "reward_model": str(tmp_path)}
    (row,) = [r for r in plan(config).rows if r.name == "reward model"]
    assert row.bytes == 2 * HF_PARAMS["7B"] + 4 * hidden and str(tmp_path) in row.note


def test_ppo_batch_and_step():
    """A PPO micro-batch is collate's output plus the (B, T) arrays of `PpoSource.collate`; without
    seq_buckets it is one bucket of max_prompt_length + max_completion_length; the step's reference-free
    signature traces with them; no reward model, no reward-model row."""
    config = copy.deepcopy(load("ppo_tiny_cpu.yaml"))
    del config["batch"]["seq_buckets"]
    g, accum, rows = config["ppo"], config["grad_accum"], config["batch"]["batch_size"]
    batch = abstract_batch(config, Qwen25VLConfig.preset("tiny"))
    seq, t = g["max_prompt_length"] + g["max_completion_length"], g["max_completion_length"]
    assert batch["input_ids"].shape == batch["labels"].shape == (accum, rows, seq)
    dtypes = {"response_index": np.int32, "padding_mask": bool, "padding_mask_p1": bool}
    dtypes |= {k: np.float32 for k in ("logprobs", "values", "advantages", "returns")}
    for key, dtype in dtypes.items():
        assert batch[key].shape == (accum, rows, t) and batch[key].dtype == dtype, key
    p = plan(config)
    assert p.seq_len == seq and "reward model" not in {r.name for r in p.rows}
    assert check_step_shapes(config).metrics["loss/value_avg"].shape == ()
