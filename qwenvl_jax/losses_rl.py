"""GRPO objectives: group-relative advantages, the clipped policy loss and its variants (TRL 1.16 semantics).

Spec: ../shared/spec/rl.md section 3 (GRPO, arXiv 2402.03300; TRL `GRPOTrainer`). Every function is a pure
function of arrays with static Python keywords; token counts and other normalisers are host-computed inputs.
Shapes: `N` completions of one generation batch (groups of `num_generations` consecutive rows), `K` reward
functions, `B` rows of a micro-batch, `T` completion tokens. Per-token inputs are the shifted completion
log-probs of `token_logprobs` (already divided by the sampling temperature).

`compat="0.22.1"` reproduces TRL 0.22.1 where it differs: inverted `scale_rewards` branches (trl#3991), no
NaN-aware reward statistics, no bias-corrected KL, dapo normaliser `num_items_in_batch / P` and clip-ratio
min/max over per-rank means. It is off by default and accepts only what 0.22.1 had.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "cispo", "vespo")  # normalised by the generation batch's token count
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
_STD_EPS = 1e-4  # TRL adds it to every reward std before dividing
_COMPAT = (None, "0.22.1")

sg = jax.lax.stop_gradient


def _check_compat(compat):
    if compat not in _COMPAT:
        raise ValueError(f"compat must be one of {_COMPAT}, got {compat!r}")


# ---------------------------------------------------------------------------------------------------------
# NaN-aware reductions (TRL `nanstd`: Bessel-corrected, NaN when fewer than 2 values)
# ---------------------------------------------------------------------------------------------------------


def _nanstd(x, axis=None, keepdims=False):
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    var = var * jnp.where(count > 1, count / jnp.maximum(count - 1, 1), jnp.nan)
    std = jnp.sqrt(var)
    return std if keepdims else jnp.squeeze(std, axis=axis)


def _is_zero(x):
    """`torch.isclose(x, 0)` with its default atol 1e-8 (False for NaN)."""
    return jnp.abs(x) <= 1e-8


# ---------------------------------------------------------------------------------------------------------
# Rewards -> advantages (rl.md 3.4)
# ---------------------------------------------------------------------------------------------------------


def _scale_mode(scale_rewards):
    mode = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # GRPOConfig accepts bools
    if mode not in ("group", "batch", "none"):
        raise ValueError(
            f"scale_rewards must be 'group', 'batch', 'none', True or False, got {scale_rewards!r}"
        )
    return mode


def _weighted_rewards(rewards_per_func, reward_weights):
    """R_i = nansum_k w_k r_ik, NaN where every function returned None (unscorable row)."""
    r = jnp.asarray(rewards_per_func, jnp.float32)
    w = jnp.ones(r.shape[1]) if reward_weights is None else jnp.asarray(reward_weights)
    w = w.astype(jnp.float32)
    unscorable = jnp.all(jnp.isnan(r), axis=1)
    return r, w, unscorable, jnp.where(unscorable, jnp.nan, jnp.nansum(r * w, axis=1))


def _advantages_and_std(
    rewards_per_func, num_generations, reward_weights, scale_rewards, multi_objective_aggregation, compat
):
    """(advantages, std_rewards): the std that TRL divides by (or would, for "none"); it feeds is_std_zero."""
    _check_compat(compat)
    mode = _scale_mode(scale_rewards)
    g = num_generations
    r, w, unscorable, rewards = _weighted_rewards(rewards_per_func, reward_weights)
    n = rewards.shape[0]
    if n % g:
        raise ValueError(f"{n} completions do not form whole groups of num_generations={g}")
    if compat == "0.22.1":
        if multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("TRL 0.22.1 has only multi_objective_aggregation='sum_then_normalize'")
        # 0.22.1 code (l.1391-1415): plain means, and the scale_rewards branches inverted (trl#3991):
        # "group" takes the batch std and never divides; "batch" and "none" divide by the group std.
        rewards = jnp.nansum(r * w, axis=1)
        grouped = rewards.reshape(-1, g)
        advantages = rewards - jnp.repeat(grouped.mean(axis=1), g)
        if mode == "group":
            return advantages, jnp.broadcast_to(jnp.std(rewards, ddof=1), rewards.shape)
        std = jnp.repeat(jnp.std(grouped, axis=1, ddof=1), g)
        return advantages / (std + _STD_EPS), std

    if multi_objective_aggregation == "sum_then_normalize":
        # A_i = (R_i - mean_group R) / (std R + 1e-4); std over the group ("group"/"none") or batch ("batch").
        grouped = rewards.reshape(-1, g)
        mean = jnp.repeat(jnp.nanmean(grouped, axis=1), g)
        if mode == "batch":
            std = jnp.broadcast_to(_nanstd(rewards), rewards.shape) if n > 1 else jnp.zeros_like(rewards)
        else:
            std = jnp.repeat(_nanstd(grouped, axis=1), g) if g > 1 else jnp.zeros_like(rewards)
        advantages = rewards - mean
        if mode != "none":
            advantages = advantages / (std + _STD_EPS)
    elif multi_objective_aggregation == "normalize_then_sum":
        # GDPO (arXiv 2601.05242): z-score each function within its group, sum with the weights, then
        # z-score the sum over the batch. scale_rewards does not apply.
        grouped = r.reshape(-1, g, r.shape[1])
        mean_k = jnp.nanmean(grouped, axis=1, keepdims=True)
        std_k = _nanstd(grouped, axis=1, keepdims=True) if g > 1 else jnp.zeros_like(mean_k)
        z = ((grouped - mean_k) / (std_k + _STD_EPS)).reshape(r.shape)
        rewards = jnp.where(unscorable, jnp.nan, jnp.nansum(z * w, axis=1))
        std = jnp.broadcast_to(_nanstd(rewards), rewards.shape) if n > 1 else jnp.zeros_like(rewards)
        advantages = (rewards - jnp.nanmean(rewards)) / (std + _STD_EPS)
    else:
        raise ValueError(f"unknown multi_objective_aggregation {multi_objective_aggregation!r}")
    # Unscorable rows (and groups with a single scored row) carry no signal: advantage 0.
    return jnp.nan_to_num(advantages, nan=0.0), std


def grpo_advantages(
    rewards_per_func,
    *,
    num_generations,
    reward_weights=None,
    scale_rewards="group",
    multi_objective_aggregation="sum_then_normalize",
    compat=None,
):
    """Group-relative advantages `(N,)` of a whole generation batch (TRL 1.16, rl.md 3.4; GRPO, 2402.03300).

    rewards_per_func: `(N, K)`, NaN where a reward function returned None; rows are gathered from every rank
    (a group may straddle ranks), each rank then keeps its own slice. scale_rewards: "group" (True), "batch"
    (std over the batch, mean still per group, PPO-Lite 2508.08221) or "none" (False; Dr. GRPO 2503.20783).
    """
    advantages, _ = _advantages_and_std(
        rewards_per_func, num_generations, reward_weights, scale_rewards, multi_objective_aggregation, compat
    )
    return advantages


def grpo_reward_metrics(
    rewards_per_func,
    *,
    num_generations,
    reward_weights=None,
    names=None,
    scale_rewards="group",
    multi_objective_aggregation="sum_then_normalize",
    compat=None,
):
    """TRL's reward metrics of one generation batch (rl.md 3.7): `rewards/<name>/mean|std` (NaN-aware, over
    the rows each function scored), `reward` and `reward_std` (nanmean / nanstd of the weighted sum),
    `frac_reward_zero_std` (fraction of rows whose normalising std is 0). `names` default to "0", "1", ...

    0.22.1 logged `reward` = mean of the group means and `reward_std` = mean of the normalising std.
    """
    r, w, _, rewards = _weighted_rewards(rewards_per_func, reward_weights)
    names = [str(i) for i in range(r.shape[1])] if names is None else list(names)
    if len(names) != r.shape[1]:
        raise ValueError("names must have one entry per reward function")
    _, std = _advantages_and_std(
        rewards_per_func, num_generations, reward_weights, scale_rewards, multi_objective_aggregation, compat
    )
    metrics = {}
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = jnp.nanmean(r[:, i])
        metrics[f"rewards/{name}/std"] = _nanstd(r[:, i])
    if compat == "0.22.1":
        metrics["reward"] = jnp.nansum(r * w, axis=1).mean()
        metrics["reward_std"] = std.mean()
    else:
        metrics["reward"] = jnp.nanmean(rewards)
        metrics["reward_std"] = _nanstd(rewards)
    metrics["frac_reward_zero_std"] = _is_zero(std).astype(jnp.float32).mean()
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Sampler / trainer mismatch: truncated importance sampling (rl.md 3.6, "vLLM importance sampling")
# ---------------------------------------------------------------------------------------------------------


def sampling_importance_ratio(
    old_per_token_logps,
    sampling_per_token_logps,
    completion_mask,
    *,
    mode="sequence_mask",
    clip_min=None,
    clip_max=3.0,
):
    """Importance ratio of the training forward (`old`, before any update) over the sampling engine.

    d_t = nan_to_num((ℓ_old - ℓ_sample) m_t)  (a NaN sampling log-prob contributes 0);
    token modes: w = e^{d_t} `(B, T)`;  sequence modes: w = e^{Σ_t d_t} `(B, 1)`;
    *_truncate: clip(w, C_min, C_max) (TIS);  *_mask: w · [C_min ≤ w ≤ C_max] (MIS); None = unbounded.
    Returns `(ratio, metrics)` with TRL's `sampling/sampling_logp_difference/mean|max` (|d_t| over the
    completion tokens) and `sampling/importance_sampling_ratio/min|mean|max` (over the completion tokens,
    or over the rows for sequence modes); 0 when there is nothing to reduce.
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}; expected one of {IS_MODES}")
    m = jnp.asarray(completion_mask, jnp.float32)
    d = jnp.nan_to_num((old_per_token_logps - sampling_per_token_logps) * m, nan=0.0)
    sequence = mode.startswith("sequence")
    ratio = jnp.exp(jnp.sum(d, axis=-1, keepdims=True) if sequence else d)
    lo = -jnp.inf if clip_min is None else clip_min
    hi = jnp.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        ratio = jnp.clip(ratio, lo, hi)
    else:
        ratio = jnp.where((ratio < lo) | (ratio > hi), 0.0, ratio)

    valid = m > 0
    ratio_valid = jnp.ones_like(ratio, bool) if sequence else valid
    metrics = {
        "sampling/sampling_logp_difference/mean": _masked_mean_or_zero(jnp.abs(d), valid),
        "sampling/sampling_logp_difference/max": _masked_extreme_or_zero(jnp.abs(d), valid, jnp.max),
        "sampling/importance_sampling_ratio/min": _masked_extreme_or_zero(ratio, ratio_valid, jnp.min),
        "sampling/importance_sampling_ratio/mean": _masked_mean_or_zero(ratio, ratio_valid),
        "sampling/importance_sampling_ratio/max": _masked_extreme_or_zero(ratio, ratio_valid, jnp.max),
    }
    return ratio, {k: sg(v) for k, v in metrics.items()}


def _masked_mean_or_zero(x, valid):
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _masked_extreme_or_zero(x, valid, reduce):
    fill = jnp.inf if reduce is jnp.min else -jnp.inf
    return jnp.where(jnp.any(valid), reduce(jnp.where(valid, x, fill)), 0.0)


# ---------------------------------------------------------------------------------------------------------
# Token and sequence masks
# ---------------------------------------------------------------------------------------------------------


def masked_quantile(x, mask, q):
    """`torch.quantile(x[mask], q)` (linear interpolation) with static shapes: the masked-out entries sort
    last as +inf and the rank `q (n - 1)` is a traced index. With no valid entry the result is +inf."""
    flat = jnp.sort(jnp.where(mask > 0, x, jnp.inf).reshape(-1))
    n = jnp.sum(mask > 0)
    rank = jnp.asarray(q, flat.dtype) * (n - 1).astype(flat.dtype)
    below = jnp.clip(jnp.floor(rank), 0, flat.shape[0] - 1).astype(jnp.int32)
    above = jnp.clip(jnp.ceil(rank), 0, flat.shape[0] - 1).astype(jnp.int32)
    a, b, t = flat[below], flat[above], rank - jnp.floor(rank)
    # torch.lerp's two-sided form, so ties at the threshold resolve as in TRL.
    value = jnp.where(t < 0.5, a + t * (b - a), b - (b - a) * (1.0 - t))
    return jnp.where(n > 0, value, jnp.inf)


def high_entropy_mask(entropies, mask, top_entropy_quantile):
    """Keep the top `ρ` fraction of valid tokens by entropy (arXiv 2506.01939): θ = quantile(H[m], 1 - ρ),
    M = [H m ≥ θ] ∧ m. In a data-parallel run pass the whole (global) micro-batch: TRL gathers H over ranks."""
    m = mask > 0
    threshold = masked_quantile(entropies, m, 1.0 - top_entropy_quantile)
    return (entropies * m >= threshold) & m


def off_policy_sequence_mask(advantages_b1, per_token_logps, sampling_per_token_logps, mask, threshold):
    """OPSM (DeepSeek-V3.2): keep a row iff A ≥ 0 or mean_t(ℓ_sample - sg(ℓ)) ≤ δ. Returns `(B, 1)` floats."""
    kl = jnp.nan_to_num(sampling_per_token_logps - sg(per_token_logps), nan=0.0)
    avg = jnp.sum(kl * mask, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)
    return ((advantages_b1 >= 0) | (avg <= threshold)).astype(jnp.float32)


def vespo_gamma_weights(
    advantages_b1, log_ratio, mask, importance_sampling_ratio, k_pos, lambda_pos, k_neg, lambda_neg
):
    """VESPO φ(w) = e^λ w^k e^{-λ w} (φ(1) = 1) of the sequence ratio w = Π_t π/π_old (× token IS ratios),
    in log space with TRL's clamps; `(B, 1)`, no gradient (it only scales -A ℓ)."""
    lower = math.log(1e-8)
    log_w = jnp.sum(jnp.clip(sg(log_ratio), -20.0, 20.0) * mask, axis=-1, keepdims=True)
    if importance_sampling_ratio is not None:
        log_w = log_w + jnp.sum(
            jnp.clip(jnp.log(importance_sampling_ratio), lower, 20.0), axis=-1, keepdims=True
        )
    log_w = jnp.clip(log_w, lower, 20.0)
    nonneg = advantages_b1 >= 0
    k = jnp.where(nonneg, k_pos, k_neg)
    lam = jnp.maximum(jnp.where(nonneg, lambda_pos, lambda_neg), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return sg(jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0))


# ---------------------------------------------------------------------------------------------------------
# The micro-batch loss (rl.md 3.6, TRL 1.16 `GRPOTrainer._compute_loss`)
# ---------------------------------------------------------------------------------------------------------


def grpo_loss(
    per_token_logps,
    completion_mask,
    advantages,
    *,
    old_per_token_logps=None,
    ref_per_token_logps=None,
    entropies=None,
    loss_type="dapo",
    beta=0.0,
    epsilon=0.2,
    epsilon_high=None,
    delta=None,
    importance_sampling_level="token",
    use_bias_correction_kl=True,
    top_entropy_quantile=1.0,
    max_completion_length=None,
    num_items_in_batch=None,
    gradient_accumulation_steps=1,
    steps_per_generation=1,
    num_processes=1,
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    vespo_k_pos=2.0,
    vespo_lambda_pos=3.0,
    vespo_k_neg=3.0,
    vespo_lambda_neg=2.0,
    off_policy_mask_threshold=None,
    sampling_per_token_logps=None,
    importance_sampling_ratio=None,
    vllm_importance_sampling_mode=None,
    vllm_importance_sampling_clip_min=None,
    vllm_importance_sampling_clip_max=3.0,
    entropy_coef=0.0,
    compat=None,
):
    """GRPO-family loss of one micro-batch, as TRL 1.16 `_compute_loss` returns it; `(loss, metrics)`.

    Inputs `(B, T)`: ℓ = per_token_logps (differentiated), m = completion_mask (× tool mask), ℓ_old (None:
    on-policy, ℓ_old = sg(ℓ)), ℓ_ref (β ≠ 0), H = entropies (metric `entropy`; needed by the entropy mask
    and bonus). advantages: `(B,)` (or `(B, T)`).
      ρ_t = ℓ - ℓ_old;  s = ρ_t ("token") or Σ_t ρ m / max(1, Σ m) ("sequence", GSPO 2507.18071);  r = e^s
      k3 = e^{ℓ_ref - ℓ} - (ℓ_ref - ℓ) - 1, × r when use_bias_correction_kl
      grpo/bnpo/dr_grpo/dapo/luspo: L = -min(r A, clip(r, 1-ε, 1+ε_hi) A), r ← min(r, delta) after the
        clip (INTELLECT-2 2505.07291);  cispo (MiniMax-M1 2506.13585): L = -sg(min(r, ε_hi)) A ℓ;
      sapo (2511.20347): L = -(4/τ) σ(τ (r - 1)) A, τ by the sign of A;  vespo: L = -φ(w) A ℓ
      L ×= OPSM mask × high-entropy mask × importance_sampling_ratio (not vespo);  L += β k3
    Aggregation (GA = gradient_accumulation_steps, P = num_processes, N = num_items_in_batch = Σ m over the
    whole generation batch on all ranks):
      grpo/sapo: mean_i(Σ_t L m / max(1, Σ_t m)) / GA;  bnpo: Σ L m / max(1, Σ m) / GA;
      dr_grpo (2503.20783): Σ L m / (B max_completion_length) / GA;  luspo: mean(L Σ_t m) / GA;
      dapo (2503.14476)/cispo/vespo: Σ L m / (max(1, N) / P · GA / steps_per_generation).
    Then loss -= entropy_coef · (Σ H m_e / max(1, Σ m_e)) / GA, m_e = m × high-entropy mask.
    For a loss over a global (SPMD) batch pass num_processes=1; P reproduces one rank's TRL loss. For eval,
    pass gradient_accumulation_steps = steps_per_generation = 1.

    Importance sampling against the sampling engine: pass `importance_sampling_ratio` from
    `sampling_importance_ratio` (computed once per generation batch, as TRL does), or set
    `vllm_importance_sampling_mode` to compute it here from ℓ_old and `sampling_per_token_logps`.
    `sampling_per_token_logps` is also what OPSM compares with (default ℓ_old).
    """
    _check_compat(compat)
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    if compat == "0.22.1" and (
        loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo")
        or off_policy_mask_threshold is not None
        or importance_sampling_ratio is not None
        or vllm_importance_sampling_mode is not None
        or entropy_coef != 0.0
    ):
        raise ValueError(
            "TRL 0.22.1 had only grpo/bnpo/dr_grpo/dapo, without OPSM, IS correction or entropy bonus"
        )
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("dr_grpo needs max_completion_length (the config constant, not the padded width)")
    if loss_type in _GLOBAL_TOKEN_LOSS_TYPES and num_items_in_batch is None:
        raise ValueError(f"{loss_type} needs num_items_in_batch (completion tokens of the generation batch)")
    if (top_entropy_quantile < 1.0 or entropy_coef != 0.0) and entropies is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef need entropies")
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("beta != 0 needs ref_per_token_logps")

    f32 = jnp.float32
    logp = per_token_logps.astype(f32)
    mask = jnp.asarray(completion_mask, f32)
    adv = jnp.asarray(advantages, f32)
    adv = adv[:, None] if adv.ndim == 1 else adv
    old = sg(logp) if old_per_token_logps is None else jnp.asarray(old_per_token_logps, f32)
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ga = gradient_accumulation_steps

    if vllm_importance_sampling_mode is not None:
        if sampling_per_token_logps is None or importance_sampling_ratio is not None:
            raise ValueError(
                "vllm_importance_sampling_mode computes the ratio from sampling_per_token_logps; "
                "pass those instead of importance_sampling_ratio"
            )
        importance_sampling_ratio, _ = sampling_importance_ratio(
            old,
            sampling_per_token_logps,
            mask,
            mode=vllm_importance_sampling_mode,
            clip_min=vllm_importance_sampling_clip_min,
            clip_max=vllm_importance_sampling_clip_max,
        )
    if importance_sampling_ratio is not None:
        importance_sampling_ratio = sg(jnp.asarray(importance_sampling_ratio, f32))
        if loss_type == "vespo" and importance_sampling_ratio.shape != logp.shape:
            raise ValueError("vespo takes token-level importance sampling ratios only (token_* modes)")

    log_ratio = logp - old
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / jnp.maximum(
            jnp.sum(mask, axis=-1, keepdims=True), 1.0
        )
    coef_1 = jnp.exp(log_weights)  # (B, T) or (B, 1); every term below broadcasts as torch does

    if beta != 0.0:
        ref = jnp.asarray(ref_per_token_logps, f32)
        per_token_kl = jnp.exp(ref - logp) - (ref - logp) - 1.0  # k3 (Schulman 2020)
        if use_bias_correction_kl and compat is None:  # 0.22.1 had no correction: ∇ = ∇k3
            per_token_kl = per_token_kl * coef_1

    phi_seq = None
    if loss_type == "cispo":
        per_token_loss = -sg(jnp.minimum(coef_1, eps_high)) * adv * logp
    elif loss_type in _CLIPPED_LOSS_TYPES:
        coef_2 = jnp.clip(coef_1, 1.0 - eps_low, 1.0 + eps_high)
        if delta is not None:
            coef_1 = jnp.minimum(coef_1, delta)  # TRL's clip-ratio metrics see this capped ratio too
        per_token_loss = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        tau = jnp.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -jax.nn.sigmoid(tau * (coef_1 - 1.0)) * 4.0 / tau * adv
    else:  # vespo
        phi_seq = vespo_gamma_weights(
            adv,
            log_ratio,
            mask,
            importance_sampling_ratio,
            vespo_k_pos,
            vespo_lambda_pos,
            vespo_k_neg,
            vespo_lambda_neg,
        )
        per_token_loss = -phi_seq * adv * logp

    if off_policy_mask_threshold is not None:
        sampling = old if sampling_per_token_logps is None else jnp.asarray(sampling_per_token_logps, f32)
        per_token_loss = per_token_loss * off_policy_sequence_mask(
            adv, logp, sampling, mask, off_policy_mask_threshold
        )
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(sg(jnp.asarray(entropies, f32)), mask, top_entropy_quantile)
        entropy_mask = entropy_mask.astype(f32)
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type in ("grpo", "sapo"):
        policy_loss = jnp.mean(jnp.sum(per_token_loss * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))
        loss = policy_loss / ga
    elif loss_type == "bnpo":
        policy_loss = jnp.sum(per_token_loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        loss = policy_loss / ga
    elif loss_type == "dr_grpo":
        policy_loss = jnp.sum(per_token_loss * mask) / (per_token_loss.shape[0] * max_completion_length)
        loss = policy_loss / ga
    elif loss_type == "luspo":
        policy_loss = jnp.mean(per_token_loss * jnp.sum(mask, axis=1, keepdims=True))
        loss = policy_loss / ga
    else:  # dapo, cispo, vespo: already the share of a token mean over the generation batch
        n = jnp.asarray(num_items_in_batch, f32)
        # 0.22.1: no clamp and no GA / steps_per_generation factor (the same value when they are equal).
        if compat == "0.22.1":
            normaliser = n / num_processes
        else:
            normaliser = jnp.maximum(n, 1.0) / num_processes * ga / steps_per_generation
        policy_loss = jnp.sum(per_token_loss * mask) / normaliser
        loss = policy_loss

    if entropy_coef != 0.0:  # entropy bonus: L - c · mean H over the (high-entropy) tokens, per GA window
        m_e = mask if entropy_mask is None else mask * entropy_mask
        ent = jnp.asarray(entropies, f32)
        loss = loss - entropy_coef * (jnp.sum(ent * m_e) / jnp.maximum(jnp.sum(m_e), 1.0)) / ga

    metrics = _loss_metrics(
        mask,
        adv,
        coef_1,
        loss_type,
        eps_low,
        eps_high,
        per_token_kl if beta != 0.0 else None,
        entropies,
        phi_seq,
        compat,
    )
    if entropy_coef != 0.0:
        metrics["policy_loss"] = sg(policy_loss)
        metrics["entropy_coef"] = jnp.asarray(entropy_coef, f32)
    return loss, metrics


def _loss_metrics(mask, adv, coef_1, loss_type, eps_low, eps_high, per_token_kl, entropies, phi_seq, compat):
    """TRL's `_compute_loss` metrics. A `(B, 1)` (sequence-level) quantity is averaged over rows, a `(B, T)`
    one over the completion tokens; `clip_ratio/low_min|high_max` are the min/max of per-row token means
    (0.22.1: of per-rank means, i.e. the batch mean on one process)."""
    coef_1, adv = sg(coef_1), sg(adv)

    def batch_mean(x):
        if x.shape[1] == 1:
            return jnp.mean(x)
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def row_means(x):  # NaN for an empty row; nanmin/nanmax skip it
        return x[:, 0] if x.shape[1] == 1 else jnp.sum(x * mask, -1) / jnp.sum(mask, -1)

    metrics = {}
    if per_token_kl is not None:
        metrics["kl"] = batch_mean(sg(per_token_kl))
    if entropies is not None:
        metrics["entropy"] = batch_mean(sg(jnp.asarray(entropies, jnp.float32)))
    if loss_type in _CLIPPED_LOSS_TYPES:
        low = ((coef_1 < 1.0 - eps_low) & (adv < 0)).astype(jnp.float32)
        high = ((coef_1 > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
        metrics["clip_ratio/low_mean"] = batch_mean(low)
        metrics["clip_ratio/high_mean"] = batch_mean(high)
        metrics["clip_ratio/region_mean"] = batch_mean(jnp.maximum(low, high))
        if compat == "0.22.1":
            metrics["clip_ratio/low_min"] = metrics["clip_ratio/low_mean"]
            metrics["clip_ratio/high_max"] = metrics["clip_ratio/high_mean"]
        else:
            metrics["clip_ratio/low_min"] = jnp.nanmin(row_means(low))
            metrics["clip_ratio/high_max"] = jnp.nanmax(row_means(high))
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = batch_mean(((coef_1 > eps_high) & (adv > 0)).astype(jnp.float32))
    elif loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = batch_mean(phi_seq)
    return metrics
