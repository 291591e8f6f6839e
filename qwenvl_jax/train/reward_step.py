"""The reward-model train step `(state, frozen, batch) -> (state, metrics)` and its train state.

A reward model is the backbone plus the scalar head of `model.value_head` (`"score"`), trained on the
DPO-format pair batches: each micro-batch holds the `2B` rows `[chosen x B, rejected x B]` and
`example_mask (2B,)` marks the real pairs (the dummy pairs that fill a short batch get no weight).
The objective is TRL 1.16 RewardTrainer's (`losses.reward_loss`):

    L = -mean_i log σ(r_c,i - r_r,i - margin)  [+ center_rewards_coefficient · mean_i (r_c,i + r_r,i)²]

with r the head at the last non-pad token of each row. Gradient accumulation as DPO's (rl.md 2.5): each
micro-batch's pair mean is divided by M, the number of micro-batches. Metrics (TRL's names): `accuracy`,
`margin` (mean r_c - r_r), `chosen`, `rejected`, `min_reward`, `mean_reward`, `max_reward`.

Train state: `params = {**backbone_trainable_or_lora, "score": head}`; the head always trains in full
(with `trainable: lora` it is the only non-adapter parameter that trains, as PEFT's
`modules_to_save=["score"]` that TRL recommends).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qwenvl_jax import losses
from qwenvl_jax.model.value_head import INIT_STD, SCORE, init_head, reward_scores
from qwenvl_jax.train import lora as lora_lib
from qwenvl_jax.train.state import TrainState, _split, _state_shardings
from qwenvl_jax.train.step import _next_rng, accumulate, apply_update, build_model


def split_head(params: Mapping[str, Any]) -> tuple[dict, Any]:
    """`(backbone params, head)` of a reward state's params."""
    return {k: v for k, v in params.items() if k != SCORE}, params[SCORE]


def pair_reward_loss(r_chosen, r_rejected, pair_mask=None, *, margin=None, center_rewards_coefficient=None):
    """`losses.reward_loss` over the real pairs only (`pair_mask (B,)`, 1 = real): each pair's loss and
    metrics by `reward_loss` itself, then their mean over the real pairs (min/max over their rewards).
    With every pair real this is `reward_loss` of the batch."""
    r_c, r_r = jnp.asarray(r_chosen, jnp.float32), jnp.asarray(r_rejected, jnp.float32)
    m = jnp.ones_like(r_c) if pair_mask is None else jnp.asarray(pair_mask, jnp.float32)
    margin_b = (
        jnp.zeros_like(r_c)
        if margin is None
        else jnp.broadcast_to(jnp.asarray(margin, jnp.float32), r_c.shape)
    )

    def one(c, r, mg):
        return losses.reward_loss(c[None], r[None], margin=mg[None],
                                  center_rewards_coefficient=center_rewards_coefficient)  # fmt: skip

    loss_b, per = jax.vmap(one)(r_c, r_r, margin_b)
    n = jnp.maximum(m.sum(), 1.0)
    metrics = {k: (v * m).sum() / n for k, v in per.items() if k not in ("min_reward", "max_reward")}
    both = jnp.concatenate([r_c, r_r])
    real = jnp.concatenate([m, m]) > 0
    metrics["min_reward"] = jax.lax.stop_gradient(jnp.min(jnp.where(real, both, jnp.inf)))
    metrics["max_reward"] = jax.lax.stop_gradient(jnp.max(jnp.where(real, both, -jnp.inf)))
    return (loss_b * m).sum() / n, metrics


def reward_loss_fn(
    graphdef: Any,
    frozen: Any,
    *,
    pad_token_id: int,
    lora_cfg: lora_lib.LoraConfig | None = None,
    margin: float | None = None,
    center_rewards_coefficient: float | None = None,
    num_micro_batches: int = 1,
    pair_blocks: int = 1,
):
    """`(params, micro_batch, dropout_key) -> (loss / M, metrics / M)` of one micro-batch of pairs
    (`pair_blocks` blocks of `[chosen, rejected]` rows, `losses.pair_order`)."""

    def loss_fn(params, mb, key):
        backbone, head = split_head(params)
        model = build_model(graphdef, backbone, frozen, lora_cfg, dropout_key=key)
        r_b = reward_scores(model, head, mb, pad_token_id)
        pairs = r_b.shape[0] // 2
        if pair_blocks > 1:
            r_b = jnp.take(r_b, losses.pair_order(r_b.shape[0], pair_blocks), axis=0)
        mask = mb.get("example_mask")
        if mask is not None and pair_blocks > 1:
            mask = jnp.take(mask, losses.pair_order(mask.shape[0], pair_blocks), axis=0)
        pair_mask = mask[:pairs] if mask is not None else None
        loss, metrics = pair_reward_loss(
            r_b[:pairs], r_b[pairs:], pair_mask, margin=margin,
            center_rewards_coefficient=center_rewards_coefficient,
        )  # fmt: skip
        return loss / num_micro_batches, jax.tree.map(lambda x: x / num_micro_batches, metrics)

    return loss_fn


def reward_step(
    state: TrainState,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    pad_token_id: int,
    lora_cfg: lora_lib.LoraConfig | None = None,
    margin: float | None = None,
    center_rewards_coefficient: float | None = None,
    pair_blocks: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One reward-model optimizer step over the micro-batches of `batch` (leading axis M; each holds
    `[chosen x B, rejected x B]` rows, optional `example_mask`). Loss = Σ_micro-batches pair mean / M."""
    new_rng, step_key = _next_rng(state)
    num = jax.tree.leaves(batch)[0].shape[0]
    loss_fn = reward_loss_fn(
        graphdef, frozen, pad_token_id=pad_token_id, lora_cfg=lora_cfg, margin=margin,
        center_rewards_coefficient=center_rewards_coefficient, num_micro_batches=num, pair_blocks=pair_blocks,
    )  # fmt: skip
    loss, metrics, grads = accumulate(loss_fn, state.params, batch, step_key)
    state, upd = apply_update(state, grads, loss, tx, new_rng)
    return state, {"loss": loss, **metrics, **upd}


# ------------------------------------------------------------------------------------------- state


def _new_reward_state(params, frozen, tx, lora_cfg, seed, hidden_size, head_init_std) -> TrainState:
    # The same keys as `state._new_state` (a LoRA reward run's adapters equal an SFT run's), the head's
    # from a key of its own.
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    if lora_cfg is not None:
        params = lora_lib.init_lora(frozen, lora_cfg, init_key)
    head_key = jax.random.fold_in(jax.random.key(seed), 0x5C0E)
    params = {**params, SCORE: init_head(hidden_size, head_key, std=head_init_std)}
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key_data(key)
    )


def init_reward_state(model, optim_cfg, trainable="full", lora_cfg=None, seed=0, *, train_merger=True,
                      head_init_std: float = INIT_STD):  # fmt: skip
    """`state.init_train_state` with the head added to the trainable params: `(graphdef, state, frozen, tx)`."""
    graphdef, params, frozen, tx = _split(model, optim_cfg, trainable, lora_cfg, train_merger)
    hidden = model.config.text.hidden_size
    return graphdef, _new_reward_state(params, frozen, tx, lora_cfg, seed, hidden, head_init_std), frozen, tx


def abstract_reward_state(model, optim_cfg, trainable="full", lora_cfg=None, seed=0, *, train_merger=True,
                          head_init_std: float = INIT_STD, rules=None):  # fmt: skip
    """`state.abstract_train_state` of `init_reward_state` (no allocation), to restore a checkpoint into."""
    graphdef, params, frozen, tx = _split(model, optim_cfg, trainable, lora_cfg, train_merger)
    hidden = model.config.text.hidden_size
    shapes = jax.eval_shape(
        lambda p, f: _new_reward_state(p, f, tx, lora_cfg, seed, hidden, head_init_std), params, frozen
    )
    shardings = _state_shardings(shapes, model, params, frozen, tx, lora_cfg, rules)
    state = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, shardings
    )
    return graphdef, state, frozen, tx
