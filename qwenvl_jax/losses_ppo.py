"""PPO objectives (TRL 0.22.1 `PPOTrainer.train` semantics), verl's extensions, and the reward model's loss.

Spec: ../shared/spec/rl.md section 4 (PPO, arXiv 1707.06347; RLHF recipe of arXiv 1909.08593 as TRL 0.22.1
implements it — TRL 1.x has no PPOTrainer). Every function is a pure function of arrays with static Python
keywords (`kl_coef` may be a traced scalar, so an adaptive coefficient does not recompile).
Shapes: `B` responses, `T` response tokens (TRL's `response_length`). Per-token log-probs are the response
tokens' log-probs of logits divided by the sampling temperature (`token_logprobs`), in float32.

Order of operations and names follow TRL 0.22.1 `train()` l.500-537 (rollout post-processing, rewards, KL,
whitening, GAE) and l.540-618 (the clipped losses), with its helpers `first_true_indices`,
`truncate_response`, `masked_mean`, `masked_var` and `masked_whiten` from `trl.core`.

Beyond TRL, off by default (documented where used): dual-clip PPO (`clip_ratio_c`), verl's `loss_agg_mode`,
the adaptive KL controller of arXiv 1909.08593 (TRL's old `core.AdaptiveKLController`, verl's copy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INVALID_LOGPROB = 1.0  # TRL's fill value for log-probs past a response's end (so ratio = 1, KL = 0 there)
KL_ESTIMATORS = ("k1", "k3")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_WHITEN_EPS = 1e-8  # trl.core.masked_whiten: rsqrt(var + 1e-8)

sg = jax.lax.stop_gradient


# ---------------------------------------------------------------------------------------------------------
# trl.core helpers
# ---------------------------------------------------------------------------------------------------------


def first_true_indices(bools):
    """Index of the first True along the last axis, the row length where there is none."""
    t = bools.shape[-1]
    return jnp.min(jnp.where(bools, jnp.arange(t), t), axis=-1)


def truncate_response(stop_token_id, pad_token_id, responses):
    """Every token after the first `stop_token_id` becomes `pad_token_id` (the stop token itself is kept)."""
    trunc_idxs = first_true_indices(responses == stop_token_id)[..., None]
    return jnp.where(jnp.arange(responses.shape[-1]) > trunc_idxs, pad_token_id, responses)


def masked_mean(values, mask, axis=None):
    """Σ values·mask / Σ mask (NaN for an empty mask, as TRL)."""
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def masked_var(values, mask, unbiased=True):
    """Masked variance with Bessel's correction n/(n-1) (TRL raises for n = 0; here it is NaN)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        mask_sum = mask.sum()
        variance = variance * (mask_sum / (mask_sum - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    """(x - μ_m) / sqrt(var_m + 1e-8), plus μ_m back when `shift_mean=False`; statistics over the mask only."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * jax.lax.rsqrt(var + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def gae(rewards, values, *, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (arXiv 1506.02438), backwards over the T response positions.

    δ_t = r_t + γ V_{t+1} - V_t  (V_T = 0);   Â_t = δ_t + γλ Â_{t+1}  (Â_T = 0).
    """
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(lastgaelam, delta_t):
        lastgaelam = delta_t + gamma * lam * lastgaelam
        return lastgaelam, lastgaelam

    _, advantages_tb = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    return advantages_tb.T


# ---------------------------------------------------------------------------------------------------------
# Rollout post-processing, rewards, KL, whitening, GAE (rl.md 4.2-4.3; TRL 0.22.1 l.470-537)
# ---------------------------------------------------------------------------------------------------------


def ppo_advantages(
    responses,
    logprobs,
    ref_logprobs,
    values,
    scores,
    *,
    eos_token_id,
    pad_token_id,
    stop_token_id="eos",
    kl_coef=0.05,
    kl_estimator="k1",
    gamma=1.0,
    lam=0.95,
    whiten_rewards=False,
    missing_eos_penalty=None,
):
    """Per-token rewards, advantages and returns of one PPO batch, from the rollout's raw arrays.

    Inputs (as the rollout produces them, nothing masked yet): `responses (B, T)` sampled ids, `logprobs`,
    `ref_logprobs (B, T)` of the policy and reference, `values (B, T)` (value of the state before each
    response token), `scores (B,)` the reward model's score of the truncated response.
    `stop_token_id`: "eos" (TRL `stop_token="eos"`) truncates after the first `eos_token_id`; None (TRL's
    config default) does not truncate; an int truncates after that id.

        post            = truncate_response(stop, pad, responses)
        seq_len         = first_true_indices(post == pad) - 1          (index of the last real token)
        scores         -= missing_eos_penalty  where post has no eos
        padding_mask    = t > seq_len ;      logprobs, ref_logprobs ← 1.0 (INVALID_LOGPROB) there
        padding_mask_p1 = t > seq_len + 1 ;  values ← 0 there (the value after the last token is kept)
        logr = ref_logprobs - logprobs ;  kl = -logr (k1) | (e^logr - 1) - logr (k3)
        rewards = -kl_coef·kl ;  rewards[i, seq_len_i+1 if < T else seq_len_i] += score_i
        if whiten_rewards: rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False), 0 on p1
        Â = GAE(rewards, values) ;  returns = Â + values ;  advantages = masked_whiten(Â, ~padding_mask), 0 on pad

    Returns a dict: `postprocessed_responses, sequence_lengths, contain_eos_token, scores` (after the
    penalty), `padding_mask, padding_mask_p1, logprobs, ref_logprobs, values` (masked: the ones `ppo_loss`
    takes), `kl, non_score_reward, rewards, advantages, returns` (B, T), and `metrics`, what TRL logs from
    this stage: `objective/kl` = mean_i Σ_t kl, `objective/entropy` = mean_i Σ_t -logprobs (TRL's quirk:
    the 1.0 fill counts as -1 per padded position), `objective/non_score_reward`, `objective/rlhf_reward` =
    non_score + mean score, `objective/scores`, `val/num_eos_tokens` (eos count in the raw responses).
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    responses = jnp.asarray(responses)
    logprobs, ref_logprobs, values, scores = (
        jnp.asarray(x, jnp.float32) for x in (logprobs, ref_logprobs, values, scores)
    )
    b, t = responses.shape

    stop = eos_token_id if stop_token_id == "eos" else stop_token_id
    postprocessed_responses = responses if stop is None else truncate_response(stop, pad_token_id, responses)
    sequence_lengths = first_true_indices(postprocessed_responses == pad_token_id) - 1
    contain_eos_token = jnp.any(postprocessed_responses == eos_token_id, axis=-1)
    if missing_eos_penalty is not None:
        scores = jnp.where(contain_eos_token, scores, scores - missing_eos_penalty)

    response_idxs = jnp.arange(t)[None, :]
    padding_mask = response_idxs > sequence_lengths[:, None]
    logprobs = jnp.where(padding_mask, INVALID_LOGPROB, logprobs)
    ref_logprobs = jnp.where(padding_mask, INVALID_LOGPROB, ref_logprobs)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > sequence_lengths_p1[:, None]
    values = jnp.where(padding_mask_p1, 0.0, values)

    # k1 = log π/π_ref, k3 = (r - 1) - log r with r = π_ref/π (joschu.net/blog/kl-approx.html)
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (jnp.exp(logr) - 1) - logr
    non_score_reward = -kl_coef * kl
    # The score lands one step after the last token (the eos), or on the last token when that is T-1.
    actual_end = jnp.where(sequence_lengths_p1 < t, sequence_lengths_p1, sequence_lengths)
    rewards = non_score_reward.at[jnp.arange(b), actual_end].add(scores)

    if whiten_rewards:
        rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards = jnp.where(padding_mask_p1, 0.0, rewards)

    advantages = gae(rewards, values, gamma=gamma, lam=lam)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = jnp.where(padding_mask, 0.0, advantages)

    mean_non_score_reward = non_score_reward.sum(1).mean()
    metrics = {
        "objective/kl": kl.sum(1).mean(),
        "objective/entropy": (-logprobs).sum(1).mean(),
        "objective/non_score_reward": mean_non_score_reward,
        "objective/rlhf_reward": mean_non_score_reward + scores.mean(),
        "objective/scores": scores.mean(),
        "val/num_eos_tokens": (responses == eos_token_id).sum(),
    }
    return {
        "postprocessed_responses": postprocessed_responses,
        "sequence_lengths": sequence_lengths,
        "contain_eos_token": contain_eos_token,
        "scores": scores,
        "padding_mask": padding_mask,
        "padding_mask_p1": padding_mask_p1,
        "logprobs": logprobs,
        "ref_logprobs": ref_logprobs,
        "values": values,
        "kl": kl,
        "non_score_reward": non_score_reward,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
        "metrics": metrics,
    }


# ---------------------------------------------------------------------------------------------------------
# The clipped policy and value losses (rl.md 4.4; TRL 0.22.1 l.540-618)
# ---------------------------------------------------------------------------------------------------------


def agg_loss(loss_mat, loss_mask, loss_agg_mode="token-mean", *, loss_scale_factor=None):
    """Reduce a (B, T) loss to a scalar (verl `core_algos.agg_loss`, single process).

    token-mean              Σ_bt L m / Σ_bt m                              (TRL's masked_mean)
    seq-mean-token-sum      mean over rows with m ≠ 0 of Σ_t L m
    seq-mean-token-mean     mean over rows with m ≠ 0 of Σ_t L m / (Σ_t m + 1e-8)
    seq-mean-token-sum-norm Σ_bt L m / loss_scale_factor   (default T; Dr. GRPO, arXiv 2503.20783 — pass
                            a constant, e.g. the maximum response length, to keep it fixed across batches)
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if loss_agg_mode == "token-mean":
        return masked_mean(loss_mat, loss_mask)
    seq_losses = (loss_mat * loss_mask).sum(-1)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return seq_losses.sum() / scale
    tokens = loss_mask.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = seq_losses / (tokens + 1e-8)
    return masked_mean(seq_losses, tokens > 0)  # rows without a token do not count


def ppo_loss(
    new_logprobs,
    vpred,
    logprobs,
    values,
    advantages,
    returns,
    padding_mask,
    padding_mask_p1,
    *,
    cliprange=0.2,
    cliprange_value=0.2,
    vf_coef=0.1,
    clip_ratio_c=None,
    loss_agg_mode="token-mean",
    loss_scale_factor=None,
):
    """PPO's clipped surrogate plus the clipped value loss of one micro-batch; returns `(loss, metrics)`.

    `new_logprobs (B, T)` and `vpred (B, T)` come from the model being trained (unmasked; gradients flow
    through them); the rest from `ppo_advantages` (`logprobs`, `values` masked as it returns them — masking
    them again here is a no-op).

        new_logprobs ← 1.0 on padding_mask ;  vpred ← 0 on padding_mask_p1
        vf_loss = ½ · agg(max((vpred - R)², (clip(vpred, V ± cliprange_value) - R)²), ~padding_mask_p1)
        ratio   = exp(new_logprobs - logprobs)
        pg      = max(-A·ratio, -A·clip(ratio, 1 ± cliprange))
        pg_loss = agg(pg, ~padding_mask) ;  loss = pg_loss + vf_coef · vf_loss

    Defaults are TRL's (agg = token-mean = TRL's masked_mean). Beyond TRL:
    * `clip_ratio_c` (> 1): dual-clip PPO (arXiv 1912.09729; verl `compute_policy_loss_vanilla`): for A < 0
      the per-token loss is also capped at -A·c, `pg = min(pg, -A·c)`, so a very large ratio on a negative
      advantage cannot dominate; adds the metric `pg_clipfrac_lower`. verl also clamps the log-ratio to
      ±20 before `exp`; that is not done here (TRL does not either).
    * `loss_agg_mode`: verl's reductions (`agg_loss`), applied to the policy and the value loss alike as verl
      does; the clip fractions stay token means.

    Metrics: `pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approxkl` (= ½·mean Δlogp² over ALL B·T
    positions, TRL's `policy/approxkl_avg`), `ratio` (mean over all positions, TRL's `val/ratio`).
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual-clip PPO, got {clip_ratio_c}")
    new_logprobs, vpred, logprobs, values, advantages, returns = (
        jnp.asarray(x, jnp.float32) for x in (new_logprobs, vpred, logprobs, values, advantages, returns)
    )
    padding_mask = jnp.asarray(padding_mask, bool)
    padding_mask_p1 = jnp.asarray(padding_mask_p1, bool)
    new_logprobs = jnp.where(padding_mask, INVALID_LOGPROB, new_logprobs)
    logprobs = jnp.where(padding_mask, INVALID_LOGPROB, logprobs)
    vpred = jnp.where(padding_mask_p1, 0.0, vpred)
    values = jnp.where(padding_mask_p1, 0.0, values)

    vpredclipped = jnp.clip(vpred, values - cliprange_value, values + cliprange_value)
    vf_losses1 = jnp.square(vpred - returns)
    vf_losses2 = jnp.square(vpredclipped - returns)
    vf_loss_max = jnp.maximum(vf_losses1, vf_losses2)
    vf_loss = 0.5 * agg_loss(
        vf_loss_max, ~padding_mask_p1, loss_agg_mode, loss_scale_factor=loss_scale_factor
    )
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).astype(jnp.float32), ~padding_mask_p1)

    logprobs_diff = new_logprobs - logprobs
    ratio = jnp.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = jnp.maximum(pg_losses, pg_losses2)
    metrics = {}
    if clip_ratio_c is not None:
        pg_losses3 = -advantages * clip_ratio_c
        dual = jnp.minimum(pg_losses3, pg_loss_max)
        metrics["pg_clipfrac_lower"] = sg(
            masked_mean(((pg_loss_max > pg_losses3) & (advantages < 0)).astype(jnp.float32), ~padding_mask)
        )
        pg_loss_max = jnp.where(advantages < 0, dual, pg_loss_max)
    pg_loss = agg_loss(pg_loss_max, ~padding_mask, loss_agg_mode, loss_scale_factor=loss_scale_factor)
    loss = pg_loss + vf_coef * vf_loss

    metrics.update(
        pg_loss=sg(pg_loss),
        vf_loss=sg(vf_loss),
        pg_clipfrac=sg(masked_mean((pg_losses2 > pg_losses).astype(jnp.float32), ~padding_mask)),
        vf_clipfrac=sg(vf_clipfrac),
        approxkl=sg(0.5 * jnp.mean(logprobs_diff**2)),
        ratio=sg(jnp.mean(ratio)),
    )
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# Adaptive KL coefficient (arXiv 1909.08593 section 2.2; TRL's old core.AdaptiveKLController, verl's copy)
# ---------------------------------------------------------------------------------------------------------


def adaptive_kl_coef(kl_coef, current_kl, n_steps, *, target, horizon):
    """β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·n_steps/horizon).

    With jax arrays (also traced ones) it computes in their dtype; with Python/numpy numbers in float64 on
    the host, as TRL's controller does, so a coefficient carried across thousands of steps does not drift.
    """
    xp = jnp if any(isinstance(x, jax.Array) for x in (kl_coef, current_kl, n_steps)) else np
    proportional_error = xp.clip(current_kl / target - 1, -0.2, 0.2)
    return kl_coef * (1 + proportional_error * n_steps / horizon)


class AdaptiveKLController:
    """Host-side state around `adaptive_kl_coef`: `value` is the coefficient for the next rollout.

    Not part of TRL 0.22.1 (its PPO has a fixed `kl_coef`). Usage: after each PPO batch,
    `ctl.update(metrics["objective/kl"], n_steps=batch_size)`, then pass `kl_coef=ctl.value` (as an array,
    so the jitted advantage step does not recompile) to `ppo_advantages`.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps) -> float:
        """Rescale `value` from the batch's mean KL (`objective/kl`) over `n_steps` samples; returns it."""
        self.value = float(
            adaptive_kl_coef(self.value, float(current_kl), n_steps, target=self.target, horizon=self.horizon)
        )
        return self.value


# ---------------------------------------------------------------------------------------------------------
# Reward model (Bradley-Terry; TRL 1.16 RewardTrainer.compute_loss)
# ---------------------------------------------------------------------------------------------------------


def reward_loss(rewards_chosen, rewards_rejected, *, margin=None, center_rewards_coefficient=None):
    """Pairwise reward-model loss; returns `(loss, metrics)`.

    L = -mean_i logσ(r_c,i - r_r,i - m_i)  [+ center_rewards_coefficient · mean_i (r_c,i + r_r,i)²]
    (margin m: arXiv 2307.09288 (Llama 2); centring term: arXiv 2312.09244). Inputs hold `B` scores each
    ((B,) or the head's (B, 1)); `margin (B,)` or None.

    Metrics (TRL 1.16 logs): `accuracy` = mean(r_c > r_r), `margin` = mean(r_c - r_r) (the reward gap,
    not the margin input), `chosen`/`rejected` = mean r_c / mean r_r, `min_reward`/`mean_reward`/
    `max_reward` over all 2B scores.
    """
    rewards_chosen = jnp.asarray(rewards_chosen, jnp.float32).reshape(-1)
    rewards_rejected = jnp.asarray(rewards_rejected, jnp.float32).reshape(-1)
    logits = rewards_chosen - rewards_rejected
    if margin is not None:
        logits = logits - jnp.asarray(margin, jnp.float32).reshape(-1)
    loss = -jax.nn.log_sigmoid(logits).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * jnp.mean((rewards_chosen + rewards_rejected) ** 2)
    all_rewards = sg(jnp.concatenate([rewards_chosen, rewards_rejected]))
    metrics = {
        "accuracy": sg((rewards_chosen > rewards_rejected).astype(jnp.float32).mean()),
        "margin": sg((rewards_chosen - rewards_rejected).mean()),
        "chosen": sg(rewards_chosen.mean()),
        "rejected": sg(rewards_rejected.mean()),
        "min_reward": all_rewards.min(),
        "mean_reward": all_rewards.mean(),
        "max_reward": all_rewards.max(),
    }
    return loss, metrics
