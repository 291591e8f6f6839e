"""Train steps (`qwenvl_jax.train`): optimizer masks, trainable subsets, LoRA, SFT/DPO steps, skipping.

Tiny random model, float32, one CPU device. Batches are text-only (the vision tower is exercised by the
frozen_vision test through a batch with an image).

Claims about what a step computes (gradient accumulation, reference modes, dummy pairs) compare losses
and GRADIENTS (the steps' own loss functions, `accumulate`d), never parameters after an Adam update: Adam
turns rounding-level differences of near-zero gradients into lr-sized steps (~lr·sign(g)).
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwenvl_jax import losses
from qwenvl_jax.model.qwen2_5_vl import host_inputs
from qwenvl_jax.train import (
    LoraConfig,
    OptimConfig,
    build_model,
    decay_mask,
    init_train_state,
    make_optimizer,
    make_train_step,
    merge_lora,
    stack_micro_batches,
)
from qwenvl_jax.train.lora import flatten
from qwenvl_jax.train.optim import decays
from qwenvl_jax.train.step import accumulate, dpo_loss_fn, sft_loss_fn, token_stats

sys.path.insert(0, str(Path(__file__).parent))
from multidevice_checks import random_model, tiny_config

B, S = 4, 16


@functools.cache
def _model_and_cfg():
    cfg = tiny_config(False)
    return random_model(cfg), cfg


def fresh_model():
    from flax import nnx

    model, _ = _model_and_cfg()
    model = nnx.clone(model)
    # Fresh buffers: the jitted steps donate the state, and clone shares the arrays.
    nnx.update(model, jax.tree.map(jnp.copy, nnx.state(model)))
    return model


def text_batch(seed=0, rows=B):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 320, (rows, S)).astype(np.int32)
    mask = np.ones((rows, S), np.int32)
    mask[0, -3:] = 0
    labels = np.where(mask > 0, ids, -100).astype(np.int32)
    labels[:, :4] = -100  # a "prompt"
    pos = np.broadcast_to(np.maximum(np.cumsum(mask, -1) - 1, 0)[None], (3, rows, S)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}


def image_batch():
    """Two rows, row 1 holds a 1x4x4 image (4 placeholder tokens)."""
    _, cfg = _model_and_cfg()
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 320, (2, S)).astype(np.int32)
    ids[1, 3:7] = cfg.image_token_id
    grids = np.array([[1, 4, 4]], np.int64)
    pixels = rng.normal(size=(16, 1176)).astype(np.float32)
    out = host_inputs(cfg, ids, np.ones((2, S), np.int32), pixel_values=pixels, image_grid_thw=grids)
    out["labels"] = np.where(ids == cfg.image_token_id, -100, ids).astype(np.int32)
    return out


def n_items(*mbs):
    return jnp.float32(losses.sft_num_items_in_batch([mb["labels"] for mb in mbs]))


def flat(tree):
    return {k: np.asarray(v) for k, v in flatten(tree).items()}


OPT = OptimConfig(
    learning_rate=1e-2, total_steps=10, schedule="constant", weight_decay=0.0, max_grad_norm=1.0
)


@functools.partial(jax.jit, static_argnums=0)
def loss_and_grads(make_loss_fn, params, batch, *args):
    """(loss, metrics, gradients) of a whole step, what the step feeds its optimizer:
    `accumulate(make_loss_fn(*args), ...)`, with the arrays of `args` as arguments, not constants."""
    return accumulate(make_loss_fn(*args), params, batch, jax.random.key(0))


def assert_same_grads(g1, g2):
    """fp32 gradients equal up to summation order: rtol 1e-5, atol 1e-6 (the chunked head's gradient
    tolerance in test_losses; the embedding's scatter-add of repeated tokens differs by ~5e-6 relative)."""
    g1, g2 = flat(g1), flat(g2)
    assert set(g1) == set(g2)
    for k in g1:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-5, atol=1e-6, err_msg=k)


@functools.cache
def setup_step(kind="sft", trainable="full", opt=OPT, lora_cfg=None, **kw):
    """One jitted step per configuration for the whole module (compiles dominate the runtime); the
    state/frozen of each test come from `init` (same structure, fresh buffers)."""
    graphdef, _, _, tx = init_train_state(fresh_model(), opt, trainable=trainable, lora_cfg=lora_cfg)
    return make_train_step(kind, graphdef, tx, lora_cfg=lora_cfg, **kw)


def init(trainable="full", opt=OPT, lora_cfg=None, **kw):
    return init_train_state(fresh_model(), opt, trainable=trainable, lora_cfg=lora_cfg, **kw)


# ------------------------------------------------------------------------------------ optimizer


def test_weight_decay_mask_matches_transformers():
    """The decayed parameters are exactly those of transformers' `Trainer.get_decay_parameter_names` on
    the same tiny model (each HF name mapped to our path by the checkpoint key map)."""
    from transformers import Trainer

    from conversion import tiny_hf
    from qwenvl_jax.weights import key_map, normalize_hf_key

    _, cfg = _model_and_cfg()
    hf_model = tiny_hf.build_tiny_model()
    hf_decayed = set(Trainer.get_decay_parameter_names(None, hf_model))  # uses no Trainer state
    ours = {hf: e.path for e in key_map(cfg) for hf in e.hf_keys()}
    hf_names = [n for n, _ in hf_model.named_parameters()]
    assert {normalize_hf_key(n) for n in hf_names} == set(ours)
    want: dict[str, bool] = {}
    for n in hf_names:
        path = ours[normalize_hf_key(n)]
        assert want.setdefault(path, n in hf_decayed) == (n in hf_decayed), path  # same for every layer
    _, state, _, _ = init_train_state(fresh_model(), OPT)
    assert flatten(decay_mask(state.params)) == want
    # The cases that matter: transformers decays the vision RMSNorms and ln_q, not the text norms.
    assert want["visual/blocks/norm1/scale"] and want["visual/blocks/norm2/scale"]
    assert want["visual/merger/ln_q/scale"] and want["lm_head/kernel"] and want["text/embed_tokens/embedding"]
    assert not want["text/norm/scale"] and not want["text/layers/input_layernorm/scale"]
    assert not want["text/layers/self_attn/q_proj/bias"] and not want["visual/blocks/mlp/up_proj/bias"]
    # LoRA factors decay (PEFT's lora_A/lora_B do under transformers).
    _, lora_state, _, _ = init_train_state(fresh_model(), OPT, trainable="lora", lora_cfg=LORA)
    lora_mask = flatten(decay_mask(lora_state.params))
    assert lora_mask and all(lora_mask.values())
    assert decays("visual/blocks/attn/qkv/kernel/a") and not decays("visual/blocks/attn/qkv/bias")
    # Numerically: with zero gradients, AdamW shrinks decayed params by lr*wd and leaves the rest.
    ones = jnp.ones(2)
    params = {"w": {"kernel": ones}, "norm": {"scale": ones}, "norm1": {"scale": ones}, "b": {"bias": ones}}
    tx = make_optimizer(
        OptimConfig(learning_rate=0.1, weight_decay=0.5, schedule="constant", max_grad_norm=None)
    )
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(upd["w"]["kernel"], -0.05)
    np.testing.assert_allclose(upd["norm1"]["scale"], -0.05)
    np.testing.assert_array_equal(upd["norm"]["scale"], 0.0)
    np.testing.assert_array_equal(upd["b"]["bias"], 0.0)


def test_schedule_warmup_then_cosine_and_trainable_mask():
    from qwenvl_jax.train import learning_rate_schedule

    sched = learning_rate_schedule(
        OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
    )
    np.testing.assert_allclose(
        [sched(0), sched(5), sched(10), sched(60), sched(110)], [0, 0.5, 1.0, 0.55, 0.1], atol=1e-6
    )
    lin = learning_rate_schedule(OptimConfig(learning_rate=1.0, total_steps=10, schedule="linear"))
    np.testing.assert_allclose(lin(5), 0.5, atol=1e-6)
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    tx = make_optimizer(
        OptimConfig(learning_rate=0.1, schedule="constant"), trainable_mask={"a": True, "b": False}
    )
    upd, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert np.all(np.asarray(upd["a"]) < 0) and np.all(np.asarray(upd["b"]) == 0)


# ------------------------------------------------------------------------------------ SFT


def test_model_hidden_states_and_lm_head_matrix_match_forward():
    model = fresh_model()
    b = text_batch()
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
    logits = model.forward(**inputs)
    h = model.hidden_states(**inputs)
    np.testing.assert_allclose(h @ model.lm_head_matrix(), logits, atol=1e-5)


def test_sft_overfits_one_batch():
    model = fresh_model()
    _, state, frozen, _ = init_train_state(model, OPT)
    step = setup_step()
    b = text_batch()
    batch = stack_micro_batches([b])
    # Step-0 loss equals the token mean NLL from full logits.
    full = losses.logits_logprobs(
        model.forward(b["input_ids"], b["attention_mask"], b["position_ids"]), b["labels"]
    )
    expected0 = -float(jnp.sum(full["log_probs"])) / float(jnp.sum(full["label_mask"]))
    seen = []
    for _ in range(8):
        state, m = step(state, frozen, batch, n_items(b))
        seen.append(float(m["loss"]))
        assert int(m["skipped"]) == 0
    np.testing.assert_allclose(seen[0], expected0, rtol=1e-5)
    assert seen[-1] < 0.5 * seen[0], seen
    assert int(state.step) == 8


def test_grad_accumulation_equals_one_big_batch():
    big = text_batch(rows=4)
    mb0 = {k: (v[:, :2] if k == "position_ids" else v[:2]) for k, v in big.items()}
    mb1 = {k: (v[:, 2:] if k == "position_ids" else v[2:]) for k, v in big.items()}
    mb1["labels"][:, 4:9] = -100  # uneven token counts per micro-batch: a mean of means would differ
    big["labels"][2:, 4:9] = -100
    graphdef, state, frozen, _ = init()
    results = []
    for micro in ([big], [mb0, mb1]):
        make = functools.partial(sft_loss_fn, graphdef)
        results.append(
            loss_and_grads(make, state.params, stack_micro_batches(micro), frozen, n_items(*micro))
        )
    (l1, aux1, g1), (l2, aux2, g2) = results
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for k in aux1:
        np.testing.assert_allclose(float(aux1[k]), float(aux2[k]), rtol=1e-6, err_msg=k)
    assert_same_grads(g1, g2)
    assert float(optax.tree.norm(g1)) > 0


def test_frozen_vision_split():
    _, state, frozen, _ = init("frozen_vision", train_merger=False)
    assert set(flatten(frozen)) == {k for k in flatten(fresh_model_params()) if k.startswith("visual/")}
    assert all(not k.startswith("visual/") for k in flatten(state.params))


def fresh_model_params():
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(_model_and_cfg()[0], nnx.Param))


def test_frozen_vision_leaves_vision_bit_identical():
    train_merger = True
    _, state, frozen, _ = init("frozen_vision")
    assert all(k.startswith("visual/") for k in flatten(frozen))
    assert ("visual/merger/fc1/kernel" in flatten(state.params)) == train_merger
    before = {**flat(state.params), **flat(frozen)}
    step = setup_step(trainable="frozen_vision")
    b = image_batch()
    for _ in range(2):
        state, m = step(state, frozen, stack_micro_batches([b]), n_items(b))
        assert int(m["skipped"]) == 0
    after = {**flat(state.params), **flat(frozen)}
    for k in before:
        if k.startswith("visual/") and (not train_merger or "merger" not in k):
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    assert not np.array_equal(
        before["text/layers/self_attn/q_proj/kernel"], after["text/layers/self_attn/q_proj/kernel"]
    )
    if train_merger:  # the merger gets gradient through the image row
        assert not np.array_equal(before["visual/merger/fc2/kernel"], after["visual/merger/fc2/kernel"])


def test_non_finite_skips_update():
    _, state, frozen, _ = init()
    step = setup_step()
    b = text_batch()
    before = flat(state.params)
    opt_before = [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]
    state, m = step(state, frozen, stack_micro_batches([b]), jnp.float32(np.nan))  # NaN normaliser
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 1
    for k, v in flat(state.params).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    for x, y in zip(jax.tree.leaves(state.opt_state), opt_before, strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    # A normal step after a skip trains again.
    state, m = step(state, frozen, stack_micro_batches([b]), n_items(b))
    assert int(m["skipped"]) == 0 and int(state.step) == 2
    assert not np.array_equal(flat(state.params)["lm_head/kernel"], before["lm_head/kernel"])


def test_update_overflow_is_reported():
    """A huge learning rate with finite gradients overflows the update itself: reported, not applied
    silently (the loop stops on it; see test_train_runs)."""
    from qwenvl_jax.train import TrainState
    from qwenvl_jax.train.step import apply_update

    params = {"w": jnp.full((3,), 1e38)}
    for lr, finite in ((3e38, 0), (1.0, 1)):  # Adam's first step is lr·sign(g): 1e38 + 3e38 overflows
        tx = make_optimizer(OptimConfig(learning_rate=lr, schedule="constant", max_grad_norm=None))
        state = TrainState(jnp.int32(0), params, tx.init(params), jax.random.key_data(jax.random.key(0)))
        new, m = jax.jit(lambda s, tx=tx: apply_update(s, {"w": -jnp.ones(3)}, jnp.float32(1.0), tx, s.rng))(
            state
        )
        assert int(m["skipped"]) == 0 and int(new.step) == 1
        assert int(m["params_finite"]) == finite
        assert np.all(np.isfinite(np.asarray(new.params["w"]))) == bool(finite)


# ------------------------------------------------------------------------------------ LoRA


LORA = LoraConfig(rank=4, alpha=8.0)


def test_lora_only_adapters_change_and_merge_matches():
    from qwenvl_jax import loading

    model = fresh_model()
    _, cfg = _model_and_cfg()
    graphdef, state, frozen, _ = init_train_state(model, OPT, trainable="lora", lora_cfg=LORA)
    assert len(state.params) == 7  # 7 targets in the (single, stacked) decoder stack
    a = state.params["text/layers/self_attn/q_proj/kernel"]
    assert a["a"].shape == (2, 64, 4) and a["b"].shape == (2, 4, 64)
    b = text_batch()
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}
    base_logits = model.forward(**inputs)
    # B = 0: the adapted model is the base model exactly.
    np.testing.assert_array_equal(
        build_model(graphdef, state.params, frozen, LORA).forward(**inputs), base_logits
    )
    frozen_before = flat(frozen)
    lora_before = flat(state.params)
    step = setup_step(trainable="lora", lora_cfg=LORA)
    losses_seen = []
    for _ in range(3):
        state, m = step(state, frozen, stack_micro_batches([b]), n_items(b))
        losses_seen.append(float(m["loss"]))
    assert losses_seen[-1] < losses_seen[0]
    for k, v in flat(frozen).items():
        np.testing.assert_array_equal(v, frozen_before[k], err_msg=k)
    after = flat(state.params)
    assert all(not np.array_equal(after[k], lora_before[k]) for k in after if k.endswith("/b"))
    adapted = build_model(graphdef, state.params, frozen, LORA).forward(**inputs)
    assert np.abs(np.asarray(adapted) - np.asarray(base_logits)).max() > 1e-3
    merged = loading.model_from_params(cfg, merge_lora(frozen, state.params, LORA))
    np.testing.assert_allclose(merged.forward(**inputs), adapted, atol=1e-5)
    # LoRA disabled = the base params.
    np.testing.assert_array_equal(
        build_model(graphdef, state.params, frozen, LORA, lora_enabled=False).forward(**inputs), base_logits
    )


# ------------------------------------------------------------------------------------ DPO


def dpo_batch():
    b = text_batch(seed=5, rows=4)  # rows 0,1 chosen; 2,3 rejected (same prompts)
    b["input_ids"][2:, :4] = b["input_ids"][:2, :4]
    comp = np.zeros((4, S), np.int32)
    comp[:, 4:] = b["attention_mask"][:, 4:]
    b["completion_mask"] = comp
    del b["labels"]
    return b


def test_dpo_step_frozen_ref_and_lora_ref():
    b = stack_micro_batches([dpo_batch()])
    # Frozen reference copy = the initial policy: loss at step 0 is -logσ(0) = log 2.
    _, state, frozen, _ = init()
    ref = jax.tree.map(jnp.copy, state.params)
    step = step_ref = setup_step("dpo", beta=0.1)
    state, m = step(state, frozen, b, ref)
    np.testing.assert_allclose(float(m["loss"]), math.log(2), rtol=1e-6)
    assert int(m["skipped"]) == 0 and float(m["grad_norm"]) > 0
    state, m = step(state, frozen, b, ref)
    assert float(m["loss"]) < math.log(2)  # the policy moved towards the chosen rows
    # LoRA: the reference is the base with adapters disabled.
    _, state, frozen, _ = init("lora", lora_cfg=LORA)
    step = setup_step("dpo", "lora", lora_cfg=LORA, beta=0.1)
    state, m = step(state, frozen, b)
    np.testing.assert_allclose(float(m["loss"]), math.log(2), rtol=1e-6)
    state, m = step(state, frozen, b)
    assert float(m["loss"]) < math.log(2)
    # Precomputed reference log-probs give the same loss, metrics and gradients as the in-step reference.
    # They come from a jitted pass of their own, as a precompute pass runs: op-by-op dispatch would round
    # the sequence sums differently (an ulp of ~60 is 4e-6), which β passes on to the gradients.
    graphdef, s1, frozen, _ = init()

    @jax.jit
    def reference_logps(params, mb):
        labels = jnp.where(mb["completion_mask"] > 0, mb["input_ids"], losses.IGNORE_INDEX)
        lp = token_stats(build_model(graphdef, params, frozen), mb, labels)["log_probs"]
        return losses.sequence_logps(lp, mb["completion_mask"][:, 1:])

    seq = np.asarray(reference_logps(s1.params, jax.tree.map(lambda x: x[0], b)))
    pre = dict(b, ref_chosen_logps=seq[None, :2], ref_rejected_logps=seq[None, 2:])
    make = functools.partial(dpo_loss_fn, graphdef, beta=0.1)
    l1, m1, g1 = loss_and_grads(make, s1.params, b, frozen, s1.params)
    l2, m2, g2 = loss_and_grads(make, s1.params, pre, frozen)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    np.testing.assert_allclose(float(l1), math.log(2), rtol=1e-6)
    for k in m1:
        np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    assert_same_grads(g1, g2)
    assert float(optax.tree.norm(g1)) > 0
    # The step differentiates this same function: its first step reports the same loss and gradient norm.
    _, m = step_ref(jax.tree.map(jnp.copy, s1), frozen, b, jax.tree.map(jnp.copy, s1.params))
    np.testing.assert_allclose(float(m["loss"]), float(l1), rtol=1e-6)
    np.testing.assert_allclose(float(m["grad_norm"]), float(optax.tree.norm(g1)), rtol=1e-5)


def test_dpo_dummy_pairs_carry_no_weight():
    """A short DPO batch is filled with dummy pairs (rows with attention_mask and example_mask 0, as
    `data.pipeline.collate_pairs` makes them): 2 real pairs + 1 dummy give the loss, metrics and gradients
    of the 2 real pairs alone."""
    real = dpo_batch()  # rows [c0, c1, r0, r1]
    rng = np.random.default_rng(7)
    ref = rng.normal(-40.0, 3.0, (4,)).astype(np.float32)  # a reference the policy is not: loss != log 2

    def with_dummy(x):
        pad = np.zeros((1, *x.shape[1:]), x.dtype)
        return np.concatenate([x[:2], pad, x[2:], pad])

    short = {k: with_dummy(v) for k, v in real.items() if k != "position_ids"}
    short["input_ids"][[2, 5]] = 320  # <|endoftext|>, the pad id
    pos, zeros = real["position_ids"], np.zeros((3, 1, S), np.int32)
    short["position_ids"] = np.concatenate([pos[:, :2], zeros, pos[:, 2:], zeros], 1)
    short["example_mask"] = np.array([1, 1, 0, 1, 1, 0], np.int32)
    short["ref_chosen_logps"] = np.array([ref[0], ref[1], np.nan], np.float32)  # never read
    short["ref_rejected_logps"] = np.array([ref[2], ref[3], np.nan], np.float32)
    real = dict(real, ref_chosen_logps=ref[:2], ref_rejected_logps=ref[2:])
    graphdef, state, frozen, _ = init()
    make = functools.partial(dpo_loss_fn, graphdef, beta=0.1)
    l1, m1, g1 = loss_and_grads(make, state.params, stack_micro_batches([real]), frozen)
    l2, m2, g2 = loss_and_grads(make, state.params, stack_micro_batches([short]), frozen)
    assert abs(float(l1) - math.log(2)) > 0.01
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    assert set(m1) == set(m2)
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    assert_same_grads(g2, g1)


def test_lora_dropout_is_peft_input_dropout():
    """`dropout > 0` drops the adapter's input per element (PEFT's `B(A(dropout(x)))`): the base path is
    untouched, each key gives its own mask per token and feature, and the mean over keys is the
    dropout-free output."""
    from flax import nnx

    from qwenvl_jax.model.layers import Dense
    from qwenvl_jax.train import lora as lora_lib

    cfg = lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    dense = Dense(4, 8, use_bias=False, axes=("embed", "mlp"), dtype=jnp.float32, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(0))  # fmt: skip
    ab = {
        "a": jax.random.normal(jax.random.key(1), (4, 4)),
        "b": jax.random.normal(jax.random.key(2), (4, 8)),
    }
    x = jax.random.normal(jax.random.key(3), (6, 4))
    base = x @ dense.kernel[...]
    full = base + cfg.scale * (x @ ab["a"]) @ ab["b"]

    def out(key):
        graphdef, state = nnx.split(dense)
        fresh = nnx.merge(graphdef, state)
        lora_lib.attach(fresh, {"kernel": ab}, cfg, dropout_key=key)
        return fresh(x)

    one, two = out(jax.random.key(10)), out(jax.random.key(11))
    assert not np.allclose(one, two)
    # Each token's delta is (x ⊙ m / (1 - p)) A B for a 0/1 mask m over its 4 features: solve for m.
    delta = np.asarray(one - base, np.float64) / cfg.scale
    masked_x = np.linalg.lstsq(np.asarray(ab["a"] @ ab["b"], np.float64).T, delta.T, rcond=None)[0].T
    ratio = masked_x / np.asarray(x) * (1 - cfg.dropout)
    np.testing.assert_allclose(np.minimum(np.abs(ratio), np.abs(ratio - 1)), 0, atol=1e-3)
    assert 0 < (np.abs(ratio - 1) < 1e-3).mean() < 1 and len({tuple(r) for r in np.round(ratio)}) > 1
    mean = np.mean([np.asarray(out(jax.random.key(100 + i))) for i in range(2000)], axis=0)
    np.testing.assert_allclose(mean, full, atol=0.15 * np.abs(full - base).max())
