"""The GRPO train step `(state, frozen, batch, num_items_in_batch[, ref_params]) -> (state, metrics)`.

A micro-batch is `collate` output of prompt + completion rows (right-padded, the prompt's vision inputs
with it) plus:

    labels (B, S)                  the completion tokens, -100 elsewhere (prompt, padding)
    advantages (B,)                `losses.grpo_advantages` of the row's group, computed on the host
    sampling_per_token_logps (B, S-1)   optional: the sampler's log-probs of the same tokens, shifted like
                                   the training log-probs (0 off the completion); gives TRL's
                                   `sampling/*` metrics and, with `vllm_importance_sampling_mode`, the
                                   truncated importance-sampling correction
    old_per_token_logps (B, S-1)   optional: log-probs from the weights before the first update on this
                                   generation batch (num_iterations > 1); without it the ratio is 1
                                   (on-policy), as TRL does

The loss of a micro-batch is `losses.grpo_loss` (TRL 1.16 `_compute_loss`, already divided by the
accumulation factor), so the step's loss is the SUM over its micro-batches and its gradient that of the
sum. `num_items_in_batch` (dapo, cispo, vespo: completion tokens of the whole generation batch) comes
from the host. Per-token log-probs and entropies are those of `logits / temperature` (rl.md 3.5).
Reference log-probs (`beta != 0`): the LoRA-disabled base, or `ref_params` (a frozen copy of the initial
policy), never differentiated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwenvl_jax import losses
from qwenvl_jax.train import lora as lora_lib
from qwenvl_jax.train.state import TrainState
from qwenvl_jax.train.step import _next_rng, accumulate, apply_update, build_model, token_stats

# Keys of a GRPO micro-batch beyond the model inputs (their batch sharding is the rows').
RL_KEYS = ("labels", "advantages", "sampling_per_token_logps", "old_per_token_logps")


def grpo_loss_fn(
    graphdef: Any,
    frozen: Any,
    num_items_in_batch: jax.Array,
    ref_params: Any = None,
    *,
    lora_cfg: lora_lib.LoraConfig | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    num_micro_batches: int = 1,
    **loss_kw: Any,
) -> Callable:
    """`grpo_step`'s differentiated function `(params, micro_batch, dropout_key) -> (loss, metrics)`.

    `loss_kw` are `losses.grpo_loss` keywords (loss_type, beta, epsilon, ...); the accumulation factors
    (`gradient_accumulation_steps`, `steps_per_generation`) are `num_micro_batches` unless given. Metrics
    are TRL's per micro-batch, divided by `num_micro_batches` so that `accumulate` gives their mean.
    """
    loss_kw = {"gradient_accumulation_steps": num_micro_batches, "steps_per_generation": num_micro_batches,
               **loss_kw}  # fmt: skip
    beta = float(loss_kw.get("beta", 0.0))

    def loss_fn(params, mb, key):
        model = build_model(graphdef, params, frozen, lora_cfg, dropout_key=key)
        st = token_stats(model, mb, mb["labels"], chunk_size=chunk_size, temperature=temperature)
        mask = st["label_mask"]
        ref_lp = None
        if beta != 0.0:
            if lora_cfg is not None:
                ref_model = build_model(graphdef, params, frozen, lora_cfg, lora_enabled=False)
            elif ref_params is not None:
                ref_model = nnx.merge(graphdef, ref_params)
            else:
                raise ValueError("beta != 0 needs a reference: ref_params, or LoRA (the adapter-free base)")
            ref_st = token_stats(ref_model, mb, mb["labels"], chunk_size=chunk_size, temperature=temperature)
            ref_lp = jax.lax.stop_gradient(ref_st["log_probs"])
        old = mb.get("old_per_token_logps")
        extra = {}
        # The sampler's log-probs enter the loss for the truncated importance-sampling correction and for
        # the off-policy sequence mask (TRL uses them there when the sampler returns them).
        uses_sampling = (loss_kw.get("vllm_importance_sampling_mode") is not None
                         or loss_kw.get("off_policy_mask_threshold") is not None)  # fmt: skip
        if "sampling_per_token_logps" in mb and uses_sampling:
            extra["sampling_per_token_logps"] = mb["sampling_per_token_logps"]
        loss, metrics = losses.grpo_loss(
            st["log_probs"],
            mask,
            mb["advantages"],
            old_per_token_logps=old,
            ref_per_token_logps=ref_lp,
            entropies=st["entropy"],
            num_items_in_batch=num_items_in_batch,
            **extra,
            **loss_kw,
        )
        if "sampling_per_token_logps" in mb:
            # The sampler's log-probs against the training forward's (before any update on this batch):
            # the mismatch users chase between inference and training numerics.
            trained = jax.lax.stop_gradient(st["log_probs"] if old is None else old)
            _, sampling = losses.sampling_importance_ratio(trained, mb["sampling_per_token_logps"], mask)
            metrics = {**metrics, **sampling}
        return loss, jax.tree.map(lambda x: x / num_micro_batches, metrics)

    return loss_fn


def grpo_step(
    state: TrainState,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    num_items_in_batch: jax.Array,
    ref_params: Any = None,
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    lora_cfg: lora_lib.LoraConfig | None = None,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    **loss_kw: Any,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One GRPO optimizer step over the micro-batches of `batch` (leading micro-batch axis, as
    `step.stack_micro_batches` makes it); see the module docstring for the keys."""
    new_rng, step_key = _next_rng(state)
    num = jax.tree.leaves(batch)[0].shape[0]
    loss_fn = grpo_loss_fn(
        graphdef, frozen, num_items_in_batch, ref_params, lora_cfg=lora_cfg, chunk_size=chunk_size,
        temperature=temperature, num_micro_batches=num, **loss_kw,
    )  # fmt: skip
    loss, metrics, grads = accumulate(loss_fn, state.params, batch, step_key)
    state, upd = apply_update(state, grads, loss, tx, new_rng)
    return state, {"loss": loss, **metrics, **upd}


def score_fn(graphdef, frozen, *, lora_cfg=None, chunk_size=1024, temperature=1.0):
    """`(params, micro_batch) -> per-token log-probs (B, S-1)` of the completion tokens, not differentiated:
    the old log-probs of a generation batch before its first update (num_iterations > 1)."""

    def score(params, mb):
        mb = {k: v for k, v in mb.items() if k not in ("advantages", "sampling_per_token_logps")}
        model = build_model(graphdef, params, frozen, lora_cfg)
        st = token_stats(model, mb, mb["labels"], chunk_size=chunk_size, temperature=temperature)
        return jnp.where(st["label_mask"] > 0, st["log_probs"], 0.0)

    return score
