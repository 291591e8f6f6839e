"""Training objectives: fused LM-head token statistics, SFT and DPO (TRL 1.16 semantics).

Spec: ../shared/spec/rl.md sections 0-2. Everything here is a small pure function of arrays; normalisation
counts and running statistics are explicit inputs computed on the host (the two host helpers at the end use
numpy only). Conventions:

* Label shift: position `t` of a `(B, S)` sequence scores `labels[:, t+1]`; outputs are `(B, S-1)` and
  exactly 0 (with no gradient) where that label is -100.
* DPO batches are the concatenated `2B` rows `[chosen x B, rejected x B]` of one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax import sharding as shd

IGNORE_INDEX = -100
TOKEN_STAT_KEYS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

# ---------------------------------------------------------------------------------------------------------
# Token statistics (TRL 1.16 fused LM head, `kernels/chunked_logprob.py`)
# ---------------------------------------------------------------------------------------------------------


def _token_stats(logits_nv, labels_n, temperature):
    """Per-token statistics of `softmax(logits / temperature)` at `labels` (fp32 throughout).

    log_probs = z_y - logsumexp(z);  entropy = -Σ_v p_v log p_v;  log_sum_sq_probs = log Σ_v p_v²
    = logsumexp(2 log p);  mean_logits = mean_v z_v;  is_top1 = [argmax z == y];  z = logits / T.
    Positions with label -100 give exactly 0 and, through `where`, no gradient.
    """
    z = logits_nv.astype(jnp.float32) / temperature
    valid = labels_n != IGNORE_INDEX
    safe = jnp.where(valid, labels_n, 0)
    logp = jax.nn.log_softmax(z, axis=-1)
    stats = {
        "log_probs": jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0],
        "entropy": -jnp.sum(jnp.exp(logp) * logp, axis=-1),
        "log_sum_sq_probs": jax.nn.logsumexp(2.0 * logp, axis=-1),
        "mean_logits": jnp.mean(z, axis=-1),
        "is_top1": (jnp.argmax(z, axis=-1) == safe).astype(jnp.float32),
    }
    out = {k: jnp.where(valid, v, 0.0) for k, v in stats.items()}
    out["label_mask"] = valid.astype(jnp.float32)
    return out


def logits_logprobs(logits_bsv, labels_bs, temperature=1.0):
    """Reference version of `token_logprobs` on full `(B, S, V)` logits (tests and small cases)."""
    return _token_stats(logits_bsv[:, :-1], labels_bs[:, 1:], temperature)


def token_logprobs(hidden_bsd, lm_head_dv, labels_bs, *, temperature=1.0, chunk_size=1024):
    """Fused LM head: `_token_stats(hidden @ lm_head)` without materialising the `(B, S, V)` logits.

    The shifted tokens of each batch shard (the rows one device holds under the step's mesh; all `B*(S-1)`
    on one device) are cut into chunks of `chunk_size`; `lax.map` runs one chunk at a time and
    `jax.checkpoint` makes the backward pass recompute each chunk's logits instead of storing them, so peak
    memory is one `(chunk_size, V)` fp32 tile per device. The matmul runs in the hidden dtype with fp32
    accumulation; the softmax statistics are fp32. For tied embeddings pass `embedding.T` as `lm_head_dv`.

    Layout under a mesh (FSDP): the head is `(D, V)` with D split over the batch axes like every weight.
    Contracting that split D would leave each device a partial sum of every chunk's logits and GSPMD would
    all-reduce `(chunk, V)` fp32 tiles, forward and again in the recomputing backward (3B: ~35 GB per
    micro-batch). Instead every batch shard gets one whole-D copy, `w_gdv`, split along V by `tensor` only:
    one all-gather of the weight per micro-batch, each device's logits come from its own rows and the copy
    with no reduction, and in the backward each device accumulates its copy's gradient locally over the
    chunks; the sum over the copies (the transpose of the broadcast) is one reduction of a weight-sized
    gradient, FSDP's reduce-scatter. Without a mesh there is one copy and nothing changes.
    """
    b, s, d = hidden_bsd.shape
    v = lm_head_dv.shape[1]
    g = shd.batch_shards(b)  # rows are split g ways; each group of b/g rows stays on its devices
    n = (b // g) * (s - 1)
    h_gnd = hidden_bsd[:, :-1].reshape(g, n, d)
    labels_gn = labels_bs[:, 1:].reshape(g, n)
    chunk = max(1, min(chunk_size, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h_kgcd = jnp.pad(h_gnd, ((0, 0), (0, pad), (0, 0))).reshape(g, n_chunks, chunk, d).transpose(1, 0, 2, 3)
    labels_kgc = jnp.pad(labels_gn, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    labels_kgc = labels_kgc.reshape(g, n_chunks, chunk).transpose(1, 0, 2)
    h_kgcd = shd.constrain_activation(h_kgcd, (None, "batch", None, None))
    labels_kgc = shd.constrain_activation(labels_kgc, (None, "batch", None))
    w_dv = lm_head_dv.astype(hidden_bsd.dtype)
    w_gdv = shd.constrain_activation(jnp.broadcast_to(w_dv, (g, d, v)), ("batch", None, "vocab"))

    @jax.checkpoint
    def one_chunk(w, h_gcd, labels_gc):
        logits_gcv = jnp.einsum("gcd,gdv->gcv", h_gcd, w, preferred_element_type=jnp.float32)
        return _token_stats(logits_gcv, labels_gc, temperature)

    out = jax.lax.map(lambda xs: one_chunk(w_gdv, *xs), (h_kgcd, labels_kgc))
    return {
        k: x.transpose(1, 0, 2).reshape(g, n_chunks * chunk)[:, :n].reshape(b, s - 1) for k, x in out.items()
    }


# ---------------------------------------------------------------------------------------------------------
# SFT (rl.md section 1)
# ---------------------------------------------------------------------------------------------------------


def sft_loss(log_probs, label_mask, *, num_items_in_batch, loss_type="nll"):
    """Micro-batch SFT loss, normalised by the token count of the whole GA window (rl.md 1.3-1.4).

    nll: Σ -lp / N;   dft (Dynamic Fine-Tuning, arXiv 2508.05629): Σ -lp · sg(exp(lp)) / N.
    `N = num_items_in_batch` (host-computed, clamped >= 1); summing the micro-batch gradients of one
    optimizer step gives the token mean over the window, so the caller must not divide by GA.
    """
    if loss_type == "nll":
        per_token = -log_probs
    elif loss_type == "dft":
        per_token = -log_probs * jax.lax.stop_gradient(jnp.exp(log_probs))
    else:
        raise ValueError(f"unknown SFT loss_type {loss_type!r}")
    n = jnp.maximum(jnp.asarray(num_items_in_batch, jnp.float32), 1.0)
    return jnp.sum(per_token * label_mask) / n


def sft_metrics(entropy, is_top1, label_mask, attention_mask=None):
    """TRL SFT metrics (rl.md 1.6): token means over label positions; num_tokens = Σ attention_mask.

    num_tokens is this micro-batch's count; TRL logs the running total, which the training loop keeps.
    """
    n = jnp.maximum(jnp.sum(label_mask), 1.0)
    metrics = {
        "entropy": jnp.sum(entropy * label_mask) / n,
        "mean_token_accuracy": jnp.sum(is_top1 * label_mask) / n,
    }
    if attention_mask is not None:
        metrics["num_tokens"] = jnp.sum(attention_mask > 0).astype(jnp.float32)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# DPO (rl.md section 2)
# ---------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
)
_F_DIVERGENCE_LOSS_TYPES = (
    "sigmoid",
    "sigmoid_norm",
    "hinge",
    "ipo",
    "exo_pair",
    "robust",
    "discopop",
    "sft",
)


def f_divergence_score(r, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """u(r) of rl.md 2.3 (f-DPO, arXiv 2309.16240); the DPO logit is Δ = u(r_w) - u(r_l).

    reverse_kl: r;  forward_kl: 1 - e^{-r};  js_divergence: log 2 + logσ(r);
    alpha_divergence: (e^{(α-1) r} - 1) / (α - 1), exponent clamped at 80 (α = 1 → r).
    TRL 0.22.1's alpha convention maps by α_1.16 = 1 - α_0.22.
    """
    if f_divergence_type == "reverse_kl":
        return r
    if f_divergence_type == "forward_kl":
        return 1.0 - jnp.exp(-r)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + jax.nn.log_sigmoid(r)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if a == 1.0:
            return r
        return (jnp.exp(jnp.minimum((a - 1.0) * jnp.asarray(r, jnp.float32), 80.0)) - 1.0) / (a - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


def _smoothed_sigmoid_loss(x, eps):
    """-(1-ε) logσ(x) - ε logσ(-x)  (cDPO, Mitchell 2023; also the AOT form)."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def _sort_pairs(x, pair_mask):
    """`sort(x)`, or with a pair mask: the real entries sorted among themselves, placed at the real
    positions in order, and the dummy entries likewise at the dummy positions."""
    if pair_mask is None:
        return jnp.sort(x)
    dummy = (jnp.asarray(pair_mask) <= 0).astype(jnp.int32)
    by_value = jnp.lexsort((x, dummy))  # real values ascending, then dummy values ascending
    by_position = jnp.argsort(dummy, stable=True)  # real positions in order, then dummy positions
    return x[by_value][jnp.argsort(by_position)]


def dpo_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing=0.0,
    reference_free=False,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    chosen_lengths=None,
    rejected_lengths=None,
    discopop_tau=0.05,
    cdpo=False,
    bco_delta=0.0,
    pair_mask=None,
):
    """Per-pair DPO loss of one sequence-level loss type (rl.md 2.4, TRL 1.16 `_compute_loss`).

    Inputs are `(B,)` sequence log-probs L. r = L - L_ref, Δ = u(r_w) - u(r_l) (f-divergence), β = beta,
    ε = label_smoothing, n = completion lengths (clamped >= 1; needed by ipo and sigmoid_norm).
    Returns `(losses, chosen_rewards, rejected_rewards)` with rewards = sg(β r).

    Compatibility flags (TRL 0.22.1): `cdpo` makes sigmoid honour ε (cDPO); `reference_free` drops the
    reference from the preference score (rewards still use it); `bco_delta` is bco_pair's running mean δ
    of the batch-mean reward (see `bco_running_mean`; 0 in 1.16).

    `pair_mask` `(B,)` (1 = real pair, 0 = a dummy pair filling a short batch) matters only to the aot
    losses, which compare batch quantiles: the real pairs are sorted among themselves (dummy ranks stay at
    the dummy positions), so dummies shift no real rank. Every other loss is per pair; the caller weights
    the pairs (`dpo_objective`).
    """
    if loss_type not in DPO_LOSS_TYPES or loss_type == "sft":
        raise ValueError(f"dpo_loss does not handle loss_type {loss_type!r}")
    if f_divergence_type != "reverse_kl" and loss_type not in _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} is not supported with {loss_type!r}")
    eps = label_smoothing
    if loss_type == "exo_pair" and not eps > 0:
        raise ValueError("exo_pair needs label_smoothing > 0 (the paper uses 1e-3)")
    r_w = chosen_logps - ref_chosen_logps
    r_l = rejected_logps - ref_rejected_logps
    chosen_rewards = jax.lax.stop_gradient(beta * r_w)
    rejected_rewards = jax.lax.stop_gradient(beta * r_l)
    s_w, s_l = (chosen_logps, rejected_logps) if reference_free else (r_w, r_l)
    u_w = f_divergence_score(s_w, f_divergence_type, f_alpha_divergence_coef)
    u_l = f_divergence_score(s_l, f_divergence_type, f_alpha_divergence_coef)
    x = beta * (u_w - u_l)

    def lengths():
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
        return jnp.maximum(chosen_lengths, 1), jnp.maximum(rejected_lengths, 1)

    if loss_type == "sigmoid":  # DPO, arXiv 2305.18290
        losses = _smoothed_sigmoid_loss(x, eps) if cdpo else -jax.nn.log_sigmoid(x)
    elif loss_type == "hinge":  # SLiC, arXiv 2305.10425
        losses = jax.nn.relu(1.0 - x)
    elif loss_type == "ipo":  # IPO, arXiv 2310.12036, length-normalised scores
        n_w, n_l = lengths()
        losses = (u_w / n_w - u_l / n_l - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "exo_pair":  # EXO, arXiv 2402.00856 (ε > 0 required)
        losses = jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - math.log(1.0 - eps)) + jax.nn.sigmoid(-x) * (
            jax.nn.log_sigmoid(-x) - math.log(eps)
        )
    elif loss_type == "nca_pair":  # NCA, arXiv 2402.05369 (raw r, not u)
        losses = (
            -jax.nn.log_sigmoid(beta * r_w)
            - 0.5 * jax.nn.log_sigmoid(-beta * r_w)
            - 0.5 * jax.nn.log_sigmoid(-beta * r_l)
        )
    elif loss_type == "robust":  # rDPO, arXiv 2403.00409
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(x) + eps * jax.nn.log_sigmoid(-x)) / (1.0 - 2.0 * eps)
    elif loss_type == "bco_pair":  # BCO, arXiv 2404.04656: -logσ(β r_w - δ) - logσ(-(β r_l - δ))
        losses = -jax.nn.log_sigmoid(beta * r_w - bco_delta) - jax.nn.log_sigmoid(-(beta * r_l - bco_delta))
    elif loss_type == "sppo_hard":  # SPPO, arXiv 2405.00675
        losses = (r_w - 1.0 / (2.0 * beta)) ** 2 + (r_l + 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "aot":  # AOT, arXiv 2406.05882: d = sort_B(L_w - L_l) - sort_B(L^ref_w - L^ref_l)
        d = _sort_pairs(chosen_logps - rejected_logps, pair_mask) - _sort_pairs(
            ref_chosen_logps - ref_rejected_logps, pair_mask
        )
        losses = _smoothed_sigmoid_loss(beta * d, eps)
    elif loss_type == "aot_unpaired":  # AOT unpaired (0.22.1 `aot_pair`): d = sort_B(r_w) - sort_B(r_l)
        losses = _smoothed_sigmoid_loss(
            beta * (_sort_pairs(r_w, pair_mask) - _sort_pairs(r_l, pair_mask)), eps
        )
    elif loss_type == "apo_zero":  # APO, arXiv 2408.06266
        losses = 1.0 - jax.nn.sigmoid(beta * r_w) + jax.nn.sigmoid(beta * r_l)
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(beta * r_w) + 1.0 - jax.nn.sigmoid(beta * (r_w - r_l))
    elif loss_type == "discopop":  # DiscoPOP, arXiv 2406.08414: w = σ(x/τ)
        w = jax.nn.sigmoid(x / discopop_tau)
        losses = (1.0 - w) * -jax.nn.log_sigmoid(x) + w * jnp.exp(-x)
    else:  # sigmoid_norm: -logσ(β(u_w/n_w - u_l/n_l))
        n_w, n_l = lengths()
        losses = -jax.nn.log_sigmoid(beta * (u_w / n_w - u_l / n_l))
    return losses, chosen_rewards, rejected_rewards


def pair_order(rows: int, pair_blocks: int = 1) -> np.ndarray:
    """The row order `[chosen x B, rejected x B]` that the pair objectives read, from a batch made of
    `pair_blocks` blocks that are each `[chosen x b, rejected x b]` (b = B / pair_blocks): one block per
    process of a multi-process run (`train.hosts`), whose global batch is the processes' blocks in order.
    The identity for one block."""
    if rows % (2 * pair_blocks):
        raise ValueError(f"{rows} rows do not make {pair_blocks} blocks of pairs")
    b = rows // (2 * pair_blocks)
    block_kc = np.arange(rows).reshape(pair_blocks, 2, b)
    return np.concatenate([block_kc[:, 0].reshape(-1), block_kc[:, 1].reshape(-1)])


def sequence_logps(token_logps, loss_mask, *, ld_alpha=None):
    """Sequence log-probs L of the `2B` rows `[chosen, rejected]` (rl.md 2.2).

    L_i = Σ_t lp[i,t] m[i,t]. With LD-DPO (arXiv 2409.06411), pos = cumsum(m), s = min(n_chosen, n_rejected)
    of the pair: L_i = Σ_t lp·m·[pos ≤ s] + α Σ_t lp·m·[pos > s]. Use it for precomputed reference
    log-probs too (1.16 applies the same weighting to the reference).
    """
    m = loss_mask.astype(token_logps.dtype)
    if ld_alpha is None:
        return jnp.sum(token_logps * m, axis=1)
    pos = jnp.cumsum(m, axis=1)
    n = jnp.sum(m, axis=1)
    half = n.shape[0] // 2
    s = jnp.tile(jnp.minimum(n[:half], n[half:]), 2)
    w = jnp.where(pos <= s[:, None], 1.0, ld_alpha) * m
    return jnp.sum(token_logps * w, axis=1)


def wpo_weights(token_logps, log_sum_sq_probs, loss_mask):
    """WPO (arXiv 2406.11827) per-sequence weight, TRL 1.16: w_i = sg(exp(Σ_t (lp - log Σ_v p_v²) m / n_i))."""
    m = loss_mask.astype(token_logps.dtype)
    n = jnp.maximum(jnp.sum(m, axis=1), 1.0)
    return jax.lax.stop_gradient(jnp.exp(jnp.sum((token_logps - log_sum_sq_probs) * m, axis=1) / n))


def _masked_mean(x, m):
    """Σ x·m / max(Σ m, 1)."""
    return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def dpo_objective(
    policy_token_logps,
    ref_token_logps,
    completion_mask,
    *,
    loss_type="sigmoid",
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    ld_alpha=None,
    use_weighting=False,
    policy_log_sum_sq_probs=None,
    reference_free=False,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    cdpo=False,
    bco_delta=0.0,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    token_stats=None,
    attention_mask=None,
    pair_mask=None,
):
    """DPO micro-batch loss and metrics on the concatenated `2B` rows (TRL 1.16 `DPOTrainer._compute_loss`).

    policy/ref_token_logps: `(2B, T-1)` shifted per-token log-probs (0 off the completion);
    completion_mask: `(2B, T)` (shifted here as `[:, 1:]`) or already shifted `(2B, T-1)`.
    The reference may instead be given as precomputed `ref_chosen_logps`/`ref_rejected_logps` `(B,)`
    (LD weighting already applied, as `sequence_logps` does).

    loss = Σ_k λ_k mean_pairs(loss_k)  (λ = loss_weights, default ones); loss_k from `dpo_loss`, or for
    "sft" the chosen-token NLL -(1/N_c) Σ lp broadcast to every pair (MPO = sigmoid+bco_pair+sft with
    [0.8, 0.2, 1]; RPO = sigmoid+sft). WPO (`use_weighting`) multiplies each per-pair loss by the
    stop-gradient weights w_chosen · w_rejected (needs `policy_log_sum_sq_probs`).

    token_stats: optional dict with `(2B, T-1)` `mean_logits`, `is_top1`, `entropy` of the policy for
    the logits/*, mean_token_accuracy and entropy metrics; attention_mask `(2B, T)` gives num_tokens.

    pair_mask: `(B,)`, 1 for a real pair and 0 for a dummy pair filling a short batch (default: all real).
    Dummy pairs carry no weight: every mean over pairs (the loss, rewards/*, logps/*) is over the real
    pairs, and their rows count in no token metric and get no gradient.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError("loss_weights must have one weight per loss type")
    if use_weighting and any(t.startswith("aot") for t in loss_types):
        raise ValueError("use_weighting is not supported with aot losses")
    lp = policy_token_logps
    m = completion_mask
    if m.shape[1] == lp.shape[1] + 1:
        m = m[:, 1:]
    half = lp.shape[0] // 2
    real = jnp.ones((half,), bool) if pair_mask is None else jnp.asarray(pair_mask) > 0
    pm = real.astype(lp.dtype)
    m = m.astype(lp.dtype) * jnp.tile(pm, 2)[:, None]

    def pair_mean(x):
        return _masked_mean(jnp.where(real, x, 0.0), pm)

    seq = sequence_logps(lp, m, ld_alpha=ld_alpha)
    chosen_logps, rejected_logps = seq[:half], seq[half:]
    if ref_chosen_logps is None or ref_rejected_logps is None:
        ref_seq = jax.lax.stop_gradient(sequence_logps(ref_token_logps, m, ld_alpha=ld_alpha))
        ref_chosen_logps, ref_rejected_logps = ref_seq[:half], ref_seq[half:]
    # A dummy pair's precomputed reference is arbitrary: keep its losses finite (0 x NaN is no zero weight).
    ref_chosen_logps = jnp.where(real, ref_chosen_logps, 0.0)
    ref_rejected_logps = jnp.where(real, ref_rejected_logps, 0.0)
    n = jnp.sum(m, axis=1)
    pair_weight = 1.0
    if use_weighting:
        if policy_log_sum_sq_probs is None:
            raise ValueError("use_weighting needs policy_log_sum_sq_probs")
        w = wpo_weights(lp, policy_log_sum_sq_probs, m)
        pair_weight = w[:half] * w[half:]

    loss = jnp.zeros((), jnp.float32)
    for lt, lam in zip(loss_types, weights, strict=True):
        if lt == "sft":
            per_pair = jnp.broadcast_to(-_masked_mean(lp[:half], m[:half]), chosen_logps.shape)
        else:
            per_pair, _, _ = dpo_loss(
                chosen_logps,
                rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                loss_type=lt,
                beta=beta,
                label_smoothing=label_smoothing,
                reference_free=reference_free,
                f_divergence_type=f_divergence_type,
                f_alpha_divergence_coef=f_alpha_divergence_coef,
                chosen_lengths=n[:half],
                rejected_lengths=n[half:],
                discopop_tau=discopop_tau,
                cdpo=cdpo,
                bco_delta=bco_delta,
                pair_mask=None if pair_mask is None else pm,
            )
        loss = loss + lam * pair_mean(per_pair * pair_weight)

    sg = jax.lax.stop_gradient
    rw = sg(beta * (chosen_logps - ref_chosen_logps))
    rl = sg(beta * (rejected_logps - ref_rejected_logps))
    metrics = {
        "rewards/chosen": pair_mean(rw),
        "rewards/rejected": pair_mean(rl),
        "rewards/accuracies": pair_mean((rw > rl).astype(jnp.float32)),
        "rewards/margins": pair_mean(rw - rl),
        "logps/chosen": pair_mean(sg(chosen_logps)),
        "logps/rejected": pair_mean(sg(rejected_logps)),
    }
    if token_stats is not None:
        ts = {k: sg(v) for k, v in token_stats.items()}
        metrics["logits/chosen"] = _masked_mean(ts["mean_logits"][:half], m[:half])
        metrics["logits/rejected"] = _masked_mean(ts["mean_logits"][half:], m[half:])
        metrics["mean_token_accuracy"] = _masked_mean(ts["is_top1"][:half], m[:half])
        metrics["entropy"] = _masked_mean(ts["entropy"], m)
    if attention_mask is not None:
        rows = jnp.tile(real, 2)[:, None]
        metrics["num_tokens"] = jnp.sum((attention_mask > 0) & rows).astype(jnp.float32)
    return loss, metrics


def bco_running_mean(mean, count, batch_reward_mean):
    """TRL `RunningMoments.update` restricted to the mean, as bco_pair uses it (TRL 0.22.1).

    bco_pair feeds one scalar per step (the batch mean of `[β r_w, β r_l]`, gathered over ranks), so the
    update is mean += (x - mean) / (count + 1). Start from `mean=0, count=1e-24`; feed the returned mean as
    `bco_delta` of the same step (0.22.1 updates before computing the loss). Take the batch mean with
    `bco_batch_reward_mean`, so that the dummy pairs of a short batch do not pull it towards 0.
    """
    new_count = count + 1.0
    return mean + (batch_reward_mean - mean) / new_count, new_count


def bco_batch_reward_mean(chosen_rewards, rejected_rewards, pair_mask=None):
    """The batch mean of `[β r_w, β r_l]` that bco_pair's running mean takes, over the real pairs only
    (`pair_mask` `(B,)`, 1 = real, as in `dpo_objective`)."""
    pm = jnp.ones_like(chosen_rewards) if pair_mask is None else jnp.asarray(pair_mask, chosen_rewards.dtype)
    both = jnp.where(pm > 0, chosen_rewards + rejected_rewards, 0.0)
    return jnp.sum(both) / jnp.maximum(2.0 * jnp.sum(pm), 1.0)


# ---------------------------------------------------------------------------------------------------------
# Host helpers (numpy only)
# ---------------------------------------------------------------------------------------------------------


def sft_num_items_in_batch(labels_per_micro_batch: Sequence[np.ndarray]) -> int:
    """N of rl.md 1.4: label tokens after the shift, summed over the GA window's micro-batches.

    Sum the result over data-parallel hosts too before passing it to `sft_loss`.
    """
    return int(sum(int((np.asarray(lab)[:, 1:] != IGNORE_INDEX).sum()) for lab in labels_per_micro_batch))


def truncate_sequence(prompt_ids, completion_ids, max_length=None, truncation_mode="keep_start"):
    """One prompt+completion sequence and its completion mask, truncated as TRL 1.16 does (rl.md 2.1).

    keep_start keeps the first `max_length` tokens, keep_end the last. Returns numpy `(ids, completion_mask)`.
    """
    ids = np.concatenate([np.asarray(prompt_ids), np.asarray(completion_ids)]).astype(np.int64)
    mask = np.concatenate([np.zeros(len(prompt_ids), np.int64), np.ones(len(completion_ids), np.int64)])
    if max_length is not None and len(ids) > max_length:
        if truncation_mode == "keep_start":
            ids, mask = ids[:max_length], mask[:max_length]
        elif truncation_mode == "keep_end":
            ids, mask = ids[-max_length:], mask[-max_length:]
        else:
            raise ValueError(f"unknown truncation_mode {truncation_mode!r}")
    return ids, mask


def preference_batch(examples, *, max_length=None, truncation_mode="keep_start", pad_token_id=0):
    """Right-padded `2B`-row DPO batch `[prompt+chosen x B, prompt+rejected x B]` (TRL 1.16 collator).

    `examples`: dicts with `prompt_ids`, `chosen_ids`, `rejected_ids`. Returns numpy `input_ids`,
    `attention_mask`, `completion_mask`, each `(2B, T)`.
    """
    rows = [
        truncate_sequence(e["prompt_ids"], e["chosen_ids"], max_length, truncation_mode) for e in examples
    ]
    rows += [
        truncate_sequence(e["prompt_ids"], e["rejected_ids"], max_length, truncation_mode) for e in examples
    ]
    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), pad_token_id, np.int64)
    attention_mask = np.zeros((len(rows), width), np.int64)
    completion_mask = np.zeros((len(rows), width), np.int64)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(ids)] = mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


from qwenvl_jax.losses_ppo import (  # noqa: E402, F401  (re-exported: every objective from one module)
    AdaptiveKLController,
    adaptive_kl_coef,
    ppo_advantages,
    ppo_loss,
    reward_loss,
)
from qwenvl_jax.losses_rl import (  # noqa: E402, F401  (re-exported: every objective from one module)
    grpo_advantages,
    grpo_loss,
    grpo_reward_metrics,
    sampling_importance_ratio,
)
