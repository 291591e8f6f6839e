"""Train steps and whole runs on 8 fake CPU devices equal their single-device versions (run by
test_train_multidevice.py in a fresh process): one SFT step on four meshes, one DPO step (frozen
reference copy) on a 2x2x2 mesh, and `train()` runs with a `mesh` section (SFT full, DPO with LoRA, PPO
with QLoRA).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_multidevice_checks.py 8x1x1 ...

Each check prints `PASS <name>` or `FAIL <name>: <reason>`; the exit status is 1 if any failed.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from qwenvl_jax import losses
from qwenvl_jax import sharding as shd
from qwenvl_jax.model.qwen2_5_vl import host_inputs
from qwenvl_jax.train import OptimConfig, init_train_state, make_train_step, param_logical_axes
from qwenvl_jax.train.lora import flatten
from qwenvl_jax.train.step import _param_sharding_tree, batch_shardings, state_shardings

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from multidevice_checks import random_model, raw_batch, tiny_config

ATOL = 1e-5
# eps=1: Adam's first step is ~lr·g instead of ~lr·sign(g), so reduction-order noise in near-zero
# gradients cannot flip whole lr-sized steps; weight decay on so the decay mask runs sharded too.
OPT = OptimConfig(learning_rate=1e-2, schedule="constant", eps=1.0, weight_decay=0.1, max_grad_norm=1.0)


@functools.cache
def setup():
    cfg = tiny_config(False)
    model = random_model(cfg)
    b = host_inputs(cfg, **raw_batch(cfg))
    ids = b["input_ids"]
    labels = np.where(b["attention_mask"] > 0, ids, -100)
    labels = np.where(ids == cfg.image_token_id, -100, labels).astype(np.int32)
    b["labels"] = labels
    batch = {k: np.asarray(v)[None] for k, v in b.items()}  # one micro-batch
    n = np.float32(losses.sft_num_items_in_batch([labels]))
    return model, batch, n


def fresh():
    model, batch, n = setup()
    graphdef, state, frozen, tx = init_train_state(model, OPT)
    state = jax.tree.map(lambda x: np.array(x), state)  # host copies: each run places its own
    return model, graphdef, state, frozen, tx, batch, n


@functools.cache
def reference():
    _, graphdef, state, frozen, tx, batch, n = fresh()
    dev = jax.devices()[0]
    state = jax.device_put(state, dev)
    step = make_train_step("sft", graphdef, tx)
    new, m = step(state, frozen, jax.device_put(batch, dev), jnp.float32(n))
    return {k: np.asarray(v) for k, v in flatten(new.params).items()}, float(m["loss"]), float(m["grad_norm"])


def check_mesh(shape):
    ref_params, ref_loss, ref_gnorm = reference()
    model, graphdef, state, frozen, tx, batch, n = fresh()
    mesh = shd.make_mesh(*shape)
    axes = param_logical_axes(model)
    step = make_train_step(
        "sft", graphdef, tx, state=state, frozen=frozen, batch=batch, logical_axes=axes, mesh=mesh
    )
    state = jax.device_put(state, state_shardings(state, tx, axes, mesh))
    frozen = jax.device_put(
        frozen, _param_sharding_tree(frozen, axes, mesh, shd.as_rules(shd.DEFAULT_RULES), False)
    )
    batch = jax.device_put(batch, batch_shardings(batch, mesh))
    new, m = step(state, frozen, batch, jnp.float32(n))
    # Params really are split (fsdp x tensor ways) and stay so after the step (out_shardings).
    w = new.params["text"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert isinstance(w.sharding, NamedSharding) and w.sharding.mesh.shape == mesh.shape
    assert len({str(s.index) for s in w.addressable_shards}) == shape[1] * shape[2]
    mu = jax.tree.leaves(new.opt_state)
    assert any(getattr(x, "shape", None) == w.shape and x.sharding == w.sharding for x in mu), (
        "Adam mu not sharded like params"
    )
    np.testing.assert_allclose(float(m["loss"]), ref_loss, rtol=1e-6, atol=ATOL)
    np.testing.assert_allclose(float(m["grad_norm"]), ref_gnorm, rtol=1e-5)
    assert int(m["skipped"]) == 0
    got = flatten(new.params)
    worst = 0.0
    for k, v in ref_params.items():
        np.testing.assert_allclose(np.asarray(got[k]), v, atol=ATOL, err_msg=k)
        worst = max(worst, float(np.abs(np.asarray(got[k]) - v).max()))
    return f"loss {float(m['loss']):.6f} (1 device {ref_loss:.6f}), max |dparam| {worst:.1e}"


def check_activation_hints():
    """The sharded step traces under its mesh, so the decoder's activation hints split the batch rows over
    (data, fsdp) inside every layer: without them GSPMD follows the FSDP-split weights and each device
    computes all rows, which doubles the step's temporary memory even at this size (3B: 80 -> 36 GiB)."""
    import qwenvl_jax.model.text as text

    def lowered(hints: bool):
        model, graphdef, state, frozen, tx, batch, n = fresh()
        mesh = shd.make_mesh(1, 8, 1)
        original = text.constrain_activation
        if not hints:
            text.constrain_activation = lambda x, axes: x
        try:
            step = make_train_step(
                "sft", graphdef, tx, state=state, frozen=frozen, batch=batch,
                logical_axes=param_logical_axes(model), mesh=mesh,
            )  # fmt: skip
            return step.lower(state, frozen, batch, np.float32(n))
        finally:
            text.constrain_activation = original

    on, off = lowered(True), lowered(False)
    # (B, S, D): rows over data x fsdp (the "[": not the loss head's (chunk, rows, ...) layouts).
    hint = '[{"data", "fsdp"}, {}, {}]>'
    assert on.as_text().count(hint) >= 1 and off.as_text().count(hint) == 0
    temp_on = on.compile().memory_analysis().temp_size_in_bytes
    temp_off = off.compile().memory_analysis().temp_size_in_bytes
    assert temp_on < 0.75 * temp_off, (temp_on, temp_off)
    return f"temp bytes per device {temp_on:,} with hints, {temp_off:,} without"


def dpo_batch():
    """The 8 rows as 4 pairs: rows 0-3 chosen, 4-7 rejected; the completion is each row's last 8 tokens."""
    _, batch, _ = setup()
    b = {k: v for k, v in batch.items() if k != "labels"}
    comp = np.zeros_like(b["attention_mask"])
    comp[..., -8:] = b["attention_mask"][..., -8:]
    b["completion_mask"] = comp
    return b


def check_dpo_mesh(shape):
    model, graphdef, state, frozen, tx, _, _ = fresh()
    batch = dpo_batch()
    ref_params = jax.tree.map(np.copy, state.params)
    dev = jax.devices()[0]
    one = make_train_step("dpo", graphdef, tx, beta=0.1)
    new1, m1 = one(
        jax.device_put(state, dev), frozen, jax.device_put(batch, dev), jax.device_put(ref_params, dev)
    )
    mesh = shd.make_mesh(*shape)
    axes = param_logical_axes(model)
    step = make_train_step(
        "dpo", graphdef, tx, state=state, frozen=frozen, batch=batch, logical_axes=axes, mesh=mesh,
        with_ref_params=True, beta=0.1,
    )  # fmt: skip
    new, m = step(state, frozen, batch, ref_params)
    np.testing.assert_allclose(float(m["loss"]), math.log(2), rtol=1e-6)  # reference = initial policy
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(float(m[key]), float(m1[key]), rtol=1e-5, atol=ATOL, err_msg=key)
    got, ref = flatten(new.params), flatten(new1.params)
    for k, v in ref.items():
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(v), atol=ATOL, err_msg=k)
    return f"loss {float(m['loss']):.6f}, grad norm {float(m['grad_norm']):.4f} (1 device {float(m1['grad_norm']):.4f})"


def _run(tmp: Path, name: str, mesh, **over) -> tuple[list[dict], dict]:
    from qwenvl_jax.checkpoint import load_params
    from qwenvl_jax.train.loop import train

    config = {
        "run_dir": str(tmp / name), "steps": 2, "seed": 0, "mesh": mesh,
        "model": {"preset": "tiny", "dtype": "float32", "param_dtype": "float32"},
        "data": {"synthetic": 8},
        "batch": {"batch_size": 4, "seq_buckets": [96], "image_patches": 128, "max_images": 8},
        "optim": {"learning_rate": 1e-3, "schedule": "constant", "eps": 1.0},
        "checkpoint": {"every": 0, "async": False},
        "logging": {"progress": False, "tensorboard": False, "plot": False},
        **over,
    }  # fmt: skip
    assert train(config) == 0
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    params, _ = load_params(tmp / name / "final")
    return rows, params


def check_loop_mesh(shape, **over):
    with tempfile.TemporaryDirectory() as tmp:
        rows1, params1 = _run(Path(tmp), "one", None, **over)
        rows, params = _run(
            Path(tmp), "mesh", dict(zip(("data", "fsdp", "tensor"), shape, strict=True)), **over
        )
    assert [r["step"] for r in rows] == [1, 2]
    for r, r1 in zip(rows, rows1, strict=True):
        np.testing.assert_allclose(r["loss"], r1["loss"], rtol=1e-5, atol=ATOL)
    worst = max(float(np.abs(params[k] - v).max()) for k, v in params1.items())
    assert worst < 1e-4, worst
    return f"losses {[round(r['loss'], 5) for r in rows]} (1 device {[round(r['loss'], 5) for r in rows1]})"


def check_grpo_sampler_view(shape):
    """The rollout's sampler view on a mesh: compute dtype, decode layout (no FSDP split: a decode step
    gathers no weights), and greedy completions from it equal one device's."""
    from qwenvl_jax.data.prompts import encode_prompt
    from qwenvl_jax.data.records import read_jsonl
    from qwenvl_jax.data.synthetic import write_shape_task
    from qwenvl_jax.processing import BatchSpec, Processor
    from qwenvl_jax.rl.rollout import SamplingConfig, rollout
    from qwenvl_jax.tiny import write_tiny_checkpoint
    from qwenvl_jax.train.grpo import sampler_view
    from qwenvl_jax.train.state import split_model

    model, _, _ = setup()
    mesh = shd.make_mesh(*shape)
    logical = param_logical_axes(model)
    rules = shd.as_rules(shd.DECODE_RULES)
    with tempfile.TemporaryDirectory() as tmp:
        processor = Processor.from_pretrained(write_tiny_checkpoint(Path(tmp) / "proc"))
        task = write_shape_task(Path(tmp) / "data", num_train=2, num_heldout=1, seed=0)
        prompts = [encode_prompt(processor, r) for r in read_jsonl(task.grpo)]
    spec = BatchSpec(batch_size=2, seq_buckets=(80,), image_patches=32, max_images=2, padding_side="left",
                     pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
                     video_token_id=processor.video_token_id)  # fmt: skip
    sampling = SamplingConfig(num_generations=2, max_completion_length=8, temperature=0.0)
    graphdef, params, frozen = split_model(model, "full")
    one = sampler_view(graphdef, frozen, None, dtype="float32")(params)
    want, _ = rollout(one, prompts, spec, sampling, seed=0)
    shd.shard_model(model, mesh)
    graphdef, params, frozen = split_model(model, "full")
    for dtype in ("bfloat16", "float32"):
        viewed = sampler_view(graphdef, frozen, None, dtype=dtype, mesh=mesh, logical_axes=logical)(params)
        for path, var in nnx_params(viewed):
            x = var.get_value()
            assert x.dtype == jnp.dtype(dtype), (path, x.dtype)
            assert x.sharding.spec == rules.spec(logical[path], x.shape, mesh), (path, x.sharding.spec)
            assert "fsdp" not in str(x.sharding.spec), (path, x.sharding.spec)
    got, _ = rollout(viewed, prompts, spec, sampling, seed=0, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    # LoRA: the adapters applied on the mesh; the fsdp-split float32 base is re-laid (and cast) for decode,
    # the adapters too, and greedy tokens equal one device's view of the same adapters.
    from qwenvl_jax.model.layers import LoraWeight
    from qwenvl_jax.train import lora as lora_lib

    lora_cfg = lora_lib.LoraConfig(rank=2, alpha=4.0)
    model1, _, _ = setup()
    graphdef, _, frozen1 = split_model(model1, "lora")
    adapters = lora_lib.init_lora(frozen1, lora_cfg, jax.random.key(1))
    adapters = {p: {"a": ab["a"], "b": ab["b"] + 0.05} for p, ab in adapters.items()}
    want, _ = rollout(sampler_view(graphdef, frozen1, lora_cfg, dtype="float32")(adapters), prompts, spec, sampling,
                      seed=0)  # fmt: skip
    graphdef, _, frozen = split_model(model, "lora")
    make = sampler_view(graphdef, frozen, lora_cfg, dtype="float32", mesh=mesh, logical_axes=logical)
    viewed = make(adapters)
    fsdp = {p for p, x in lora_lib.flatten(frozen).items() if "fsdp" in str(x.sharding.spec)}
    assert fsdp and set(make.copied_paths) == fsdp, (len(fsdp), len(make.copied_paths))
    for path, var in nnx_params(viewed) + [(p, v) for p, v in nnx_vars(viewed, LoraWeight)]:
        assert "fsdp" not in str(var.get_value().sharding.spec), (path, var.get_value().sharding.spec)
    got, _ = rollout(viewed, prompts, spec, sampling, seed=0, mesh=mesh)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    return (f"greedy tokens equal one device (full and LoRA); {len(nnx_params(viewed))} params in the decode "
            f"layout, LoRA re-lays {len(fsdp)} fsdp-split base leaves")  # fmt: skip


def nnx_vars(model, kind):
    from flax import nnx

    return [("/".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model, kind))]


def nnx_params(model):
    from flax import nnx

    return [("/".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


CHECKS = {
    **{
        f"sft_step_{d}x{f}x{t}": functools.partial(check_mesh, (d, f, t))
        for d, f, t in ((8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2))
    },
    "dpo_step_2x2x2": functools.partial(check_dpo_mesh, (2, 2, 2)),
    "activation_hints_1x8x1": check_activation_hints,
    "loop_sft_2x2x2": functools.partial(check_loop_mesh, (2, 2, 2)),
    "loop_dpo_lora_1x4x2": functools.partial(
        check_loop_mesh,
        (1, 4, 2),
        kind="dpo",
        trainable="lora",
        lora={"rank": 4, "alpha": 8.0},
        batch={"batch_size": 2, "seq_buckets": [96], "image_patches": 128, "max_images": 8},
        optim={"learning_rate": 1e-2, "schedule": "constant", "eps": 1.0},
    ),
    "grpo_sampler_view_1x2x4": functools.partial(check_grpo_sampler_view, (1, 2, 4)),
    # PPO with QLoRA on the mesh: the NF4 base placed by the kernels' rules, rollouts from the sampler view
    # (the NF4 base re-laid for decode), the scoring pass and the step (policy and value adapters) sharded,
    # the final merge dequantized; two generation batches equal one device's.
    "loop_ppo_qlora_1x4x2": functools.partial(
        check_loop_mesh,
        (1, 4, 2),
        kind="ppo",
        trainable="lora",
        lora={"rank": 4, "alpha": 8.0, "quantize": "nf4"},
        rewards=["qwenvl_jax.data.synthetic:shape_reward"],
        ppo={"max_prompt_length": 80, "max_completion_length": 8, "num_ppo_epochs": 1, "temperature": 1.0},
        batch={"batch_size": 4, "seq_buckets": [96], "image_patches": 128, "max_images": 8},
        optim={"learning_rate": 1e-2, "schedule": "constant", "eps": 1.0},
    ),
}


def main(names: list[str]) -> int:
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    failed = 0
    for name in names or list(CHECKS):
        t0 = time.time()
        try:
            note = CHECKS[name]()
            print(f"PASS {name} ({time.time() - t0:.1f}s) {note or ''}", flush=True)
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
