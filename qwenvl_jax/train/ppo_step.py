"""PPO's two jitted functions: the rollout's scoring pass and the train step (TRL 0.22.1 semantics).

The train state holds the policy and the value model together, as TRL's `PolicyAndValueWrapper` does (one
optimizer, one loss `pg_loss + vf_coef · vf_loss`):

    params = {**policy, "value": value backbone, "score": value head}

`policy` is the policy's trainable tree (every Param, or its LoRA adapters); `"value"` the value model's
backbone in the same form (a full tree, or a second adapter set on the same frozen base, so a LoRA run
holds one copy of the base weights); `"score"` the scalar head of `model.value_head`. The reference is
a frozen copy of the initial policy (`ref_params`), or the adapter-free base with LoRA.

A micro-batch is `collate` output of prompt + response rows (right-padded, the prompt's vision inputs
with it), `labels` on the response tokens, plus TRL's per-response arrays `(B, T)`, `T` =
`max_completion_length`:

    response_index (B, T) int32   position j of the shifted log-probs (and of the hidden state) that
                                  scores response token t: `prompt_len - 1 + t` (clipped to the row)
    logprobs, values, advantages, returns (B, T) float32; padding_mask, padding_mask_p1 (B, T) bool
                                  from `losses.ppo_advantages` of the generation batch

Log-probs are those of `logits / (temperature + 1e-7)` (TRL 0.22.1); the value of response token t is the
value model's head on the hidden state of the position before it (`[:, ctx-1:-1]`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwenvl_jax.losses_ppo import ppo_loss
from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS
from qwenvl_jax.model.value_head import INIT_STD, SCORE, VALUE, init_head, reward_scores
from qwenvl_jax.train import lora as lora_lib
from qwenvl_jax.train.state import TrainState, _split, _state_shardings
from qwenvl_jax.train.step import _next_rng, accumulate, apply_update, build_model, token_stats

TEMPERATURE_EPS = 1e-7  # TRL 0.22.1 divides logits by (temperature + 1e-7)
# Per-response keys of a PPO micro-batch (row-sharded like the rows).
PPO_KEYS = (
    "response_index",
    "logprobs",
    "values",
    "advantages",
    "returns",
    "padding_mask",
    "padding_mask_p1",
)


def split_ppo(params: Mapping[str, Any]) -> tuple[dict, Any, Any]:
    """`(policy params, value backbone params, value head)` of a PPO state's params."""
    policy = {k: v for k, v in params.items() if k not in (VALUE, SCORE)}
    return policy, params[VALUE], params[SCORE]


def _gather(x_bs: jax.Array, index_bt: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_bs, index_bt, axis=1)


def response_logprobs(model, mb, *, temperature: float, chunk_size: int):
    """`(logprobs (B, T), entropy (B, T))` of the response tokens under `model` (tempered)."""
    st = token_stats(
        model, mb, mb["labels"], chunk_size=chunk_size, temperature=temperature + TEMPERATURE_EPS
    )
    index = mb["response_index"]
    return _gather(st["log_probs"], index), _gather(st["entropy"], index)


def response_values(model, head, mb) -> jax.Array:
    """`(B, T)` float32: the value head on the hidden state before each response token."""
    h_bsd = model.hidden_states(**{k: mb[k] for k in CORE_KEYS if k in mb})
    h_btd = jnp.take_along_axis(h_bsd, mb["response_index"][..., None], axis=1)
    return jnp.einsum("btd,dn->btn", h_btd.astype(jnp.float32), head["kernel"].astype(jnp.float32))[..., 0]


def _models(graphdef, params, frozen, lora_cfg, key=None):
    policy, value, head = split_ppo(params)
    policy_model = build_model(graphdef, policy, frozen, lora_cfg, dropout_key=key)
    value_key = None if key is None else jax.random.fold_in(key, 1)
    value_model = build_model(graphdef, value, frozen, lora_cfg, dropout_key=value_key)
    return policy_model, value_model, head


def ppo_loss_fn(
    graphdef: Any,
    frozen: Any,
    *,
    lora_cfg: lora_lib.LoraConfig | None = None,
    temperature: float = 0.7,
    chunk_size: int = 1024,
    num_micro_batches: int = 1,
    **loss_kw: Any,
):
    """`ppo_step`'s differentiated function `(params, micro_batch, dropout_key) -> (loss / M, metrics / M)`:
    `losses.ppo_loss` of the policy's and the value model's forward on the micro-batch (`loss_kw`: its
    keywords cliprange, cliprange_value, vf_coef, clip_ratio_c, loss_agg_mode)."""

    def loss_fn(params, mb, key):
        policy_model, value_model, head = _models(graphdef, params, frozen, lora_cfg, key)
        new_logprobs, entropy = response_logprobs(
            policy_model, mb, temperature=temperature, chunk_size=chunk_size
        )
        vpred = response_values(value_model, head, mb)
        loss, m = ppo_loss(
            new_logprobs, vpred, mb["logprobs"], mb["values"], mb["advantages"], mb["returns"],
            mb["padding_mask"], mb["padding_mask_p1"], **loss_kw,
        )  # fmt: skip
        real = ~mb["padding_mask"]
        metrics = {
            "policy/approxkl_avg": m["approxkl"],
            "policy/clipfrac_avg": m["pg_clipfrac"],
            "loss/policy_avg": m["pg_loss"],
            "loss/value_avg": m["vf_loss"],
            "val/clipfrac_avg": m["vf_clipfrac"],
            "policy/entropy_avg": jax.lax.stop_gradient(losses_masked_mean(entropy, real)),
            "val/ratio": m["ratio"],
            "val/ratio_sq": m["ratio"] ** 2,  # -> val/ratio_var over the step's micro-batches (host)
        }
        if "pg_clipfrac_lower" in m:
            metrics["policy/clipfrac_lower_avg"] = m["pg_clipfrac_lower"]
        return loss / num_micro_batches, jax.tree.map(lambda x: x / num_micro_batches, metrics)

    return loss_fn


def losses_masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def ppo_step(
    state: TrainState,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    lora_cfg: lora_lib.LoraConfig | None = None,
    temperature: float = 0.7,
    chunk_size: int = 1024,
    **loss_kw: Any,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One PPO optimizer step (one mini-batch) over the micro-batches of `batch` (leading axis M, as
    `step.stack_micro_batches` makes it); each micro-batch's loss is divided by M (accelerate's
    gradient accumulation)."""
    new_rng, step_key = _next_rng(state)
    num = jax.tree.leaves(batch)[0].shape[0]
    loss_fn = ppo_loss_fn(graphdef, frozen, lora_cfg=lora_cfg, temperature=temperature, chunk_size=chunk_size,
                          num_micro_batches=num, **loss_kw)  # fmt: skip
    loss, metrics, grads = accumulate(loss_fn, state.params, batch, step_key)
    metrics = dict(metrics)
    metrics["val/ratio_var"] = jnp.maximum(metrics.pop("val/ratio_sq") - metrics["val/ratio"] ** 2, 0.0)
    state, upd = apply_update(state, grads, loss, tx, new_rng)
    return state, {"loss": loss, **metrics, **upd}


def score_fn(graphdef, frozen, *, lora_cfg=None, temperature=0.7, chunk_size=1024, reward_graphdef=None,
             pad_token_id: int = 0):  # fmt: skip
    """The rollout's scoring pass, not differentiated: `(params, ref_params, reward, mb) -> dict` with the
    policy's and the reference's response log-probs `logprobs`, `ref_logprobs (B, T)`, the value model's
    `values (B, T)` and, with a reward model (`reward = (its params, its head)`, else None), its
    `scores (B,)` at each row's last non-pad token (TRL's `get_reward`)."""

    def score(params, ref_params, reward, mb):
        policy_model, value_model, head = _models(graphdef, params, frozen, lora_cfg)
        kw = dict(temperature=temperature, chunk_size=chunk_size)
        out = {"logprobs": response_logprobs(policy_model, mb, **kw)[0],
               "values": response_values(value_model, head, mb)}  # fmt: skip
        if lora_cfg is not None:
            ref_model = build_model(graphdef, split_ppo(params)[0], frozen, lora_cfg, lora_enabled=False)
        else:
            ref_model = nnx.merge(graphdef, ref_params)
        out["ref_logprobs"] = response_logprobs(ref_model, mb, **kw)[0]
        if reward is not None:
            reward_params, reward_head = reward
            out["scores"] = reward_scores(
                nnx.merge(reward_graphdef, reward_params), reward_head, mb, pad_token_id
            )
        return out

    return score


# ------------------------------------------------------------------------------------------- state


def _new_ppo_state(params, frozen, tx, lora_cfg, seed, hidden_size, value_init, head) -> TrainState:
    """The policy's keys as `state._new_state` (a LoRA policy's adapters equal an SFT run's); the value
    model's adapters and head from keys of their own."""
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    if lora_cfg is not None:
        params = lora_lib.init_lora(frozen, lora_cfg, init_key)
        value = lora_lib.init_lora(frozen, lora_cfg, jax.random.fold_in(init_key, 0x7A1E))
    else:
        value = value_init if value_init is not None else params
    if head is None:
        head = init_head(hidden_size, jax.random.fold_in(jax.random.key(seed), 0x5C0E), std=INIT_STD)
    params = {**params, VALUE: value, SCORE: head}
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key_data(key)
    )


def init_ppo_state(model, optim_cfg, trainable="full", lora_cfg=None, seed=0, *, train_merger=True,
                   value_init=None, head=None):  # fmt: skip
    """`(graphdef, state, frozen, tx)`: `state.init_train_state` with the value model added.

    `value_init`: the value backbone's trainable tree for full fine-tuning (a reward model's, TRL's
    default), or None for a copy of the policy's; with LoRA the value model is a fresh adapter set.
    `head`: its initial head (the reward model's), or None for N(0, 0.02²)."""
    graphdef, params, frozen, tx = _split(model, optim_cfg, trainable, lora_cfg, train_merger)
    if value_init is None and lora_cfg is None:
        value_init = jax.tree.map(lambda x: x.copy(), params)  # the state is donated: never alias the policy
    hidden = model.config.text.hidden_size
    return graphdef, _new_ppo_state(params, frozen, tx, lora_cfg, seed, hidden, value_init, head), frozen, tx


def abstract_ppo_state(model, optim_cfg, trainable="full", lora_cfg=None, seed=0, *, train_merger=True,
                       rules=None, **_):  # fmt: skip
    """`state.abstract_train_state` of `init_ppo_state` (no allocation), to restore a checkpoint into."""
    graphdef, params, frozen, tx = _split(model, optim_cfg, trainable, lora_cfg, train_merger)
    hidden = model.config.text.hidden_size
    shapes = jax.eval_shape(
        lambda p, f: _new_ppo_state(p, f, tx, lora_cfg, seed, hidden, None, None), params, frozen
    )
    shardings = _state_shardings(shapes, model, params, frozen, tx, lora_cfg, rules)
    state = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, shardings
    )
    return graphdef, state, frozen, tx
