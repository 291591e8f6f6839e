"""Objectives vs TRL's own numbers (tests/data/trl_vectors.npz, spec rl.md section 5).

Tolerances are the spec's and are never relaxed: losses/gradients rtol 2e-5, atol 2e-6 (fp32); SFT from
logits 1e-4. Gradients are compared under the completion mask (TRL's leaf stand-in has gradient there too).
"""

from __future__ import annotations

import ast
import functools
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from trl_vectors import VECTORS, vectors

from qwenvl_jax import losses as L

RTOL, ATOL = 2e-5, 2e-6
SFT_TOL = 1e-4


def _cases(prefix):
    with np.load(VECTORS, allow_pickle=False) as f:
        return sorted({k[len(prefix) :].split("/")[0] for k in f.files if k.startswith(prefix)})


def _readme_cfg(key, marker):
    line = next(s for s in vectors()["_readme"] if s.startswith(key + ":"))
    return ast.literal_eval(re.search(marker + r"=(\{.*?\})(;|$)", line).group(1))


def _examples():
    v = vectors()
    return [
        {k: v[f"common/dpo/example{i}/{k}"] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for i in range(4)
    ]


# Jitted once per shape: op-by-op dispatch of the chunked head is far slower than one compile.
token_logprobs = jax.jit(L.token_logprobs, static_argnames=("temperature", "chunk_size"))
logits_logprobs = jax.jit(L.logits_logprobs, static_argnames=("temperature",))


def _close(actual, desired, rtol=RTOL, atol=ATOL, err_msg=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(desired, np.float64), rtol, atol, err_msg=err_msg
    )


# ---------------------------------------------------------------------------------------------------------
# Token statistics: chunked fused head vs full logits vs TRL
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
def test_selective_log_softmax_and_entropy_match_trl(temperature):
    """TRL `selective_log_softmax(logits / T)` and entropy, no shift: give an unused extra position."""
    v = vectors()
    logits, index = v["v116/utils/logits"], v["v116/utils/index"]
    tag = f"T{temperature:g}"
    logits_p = np.concatenate([logits, np.zeros_like(logits[:, :1])], axis=1)
    labels_p = np.concatenate([np.full_like(index[:, :1], -100), index], axis=1)
    full = logits_logprobs(jnp.asarray(logits_p), jnp.asarray(labels_p), temperature=temperature)
    # hidden = logits, lm_head = identity: the fused head must reproduce the same numbers.
    fused = token_logprobs(
        jnp.asarray(logits_p), jnp.eye(11), jnp.asarray(labels_p), temperature=temperature, chunk_size=3
    )
    for out in (full, fused):
        _close(out["log_probs"], v[f"v116/utils/selective_log_softmax_{tag}"])
        _close(out["entropy"], v[f"v116/utils/entropy_{tag}"])


@pytest.mark.parametrize("case,max_length", [("sigmoid", None), ("trunc_keep_start_max7", 7)])
def test_bigram_token_stats_and_batch_match_trl(case, max_length):
    """The DPO vectors' bigram model is `logits[t] = W[input_ids[t]]`, i.e. hidden = one_hot, lm_head = W."""
    v = vectors()
    p = f"v116/dpo/{case}/"
    batch = L.preference_batch(_examples(), max_length=max_length, truncation_mode="keep_start")
    for k in ("input_ids", "attention_mask", "completion_mask"):
        np.testing.assert_array_equal(batch[k], v[p + k], err_msg=k)
    labels = jnp.asarray(np.where(batch["completion_mask"] == 1, batch["input_ids"], -100))
    hidden = jax.nn.one_hot(batch["input_ids"], 16)
    for who in ("policy", "ref"):
        w = jnp.asarray(v[f"common/dpo/w_{who}"])
        fused = token_logprobs(hidden, w, labels, chunk_size=5)
        full = logits_logprobs(hidden @ w, labels)
        for out in (fused, full):
            _close(out["log_probs"], v[p + f"{who}_per_token_logps"])
            if who == "policy":
                _close(out["entropy"], v[p + "policy_entropy"])
                _close(out["log_sum_sq_probs"], v[p + "policy_log_sum_sq_probs"])
                _close(out["mean_logits"], v[p + "policy_mean_logits"])
                np.testing.assert_array_equal(np.asarray(out["is_top1"]) == 1, v[p + "policy_is_top1"])
            np.testing.assert_array_equal(out["label_mask"], batch["completion_mask"][:, 1:])


def test_truncation_keep_start_and_keep_end():
    ids, mask = L.truncate_sequence([1, 2, 3], [4, 5, 6, 7], max_length=5)
    np.testing.assert_array_equal(ids, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(mask, [0, 0, 0, 1, 1])
    ids, mask = L.truncate_sequence([1, 2, 3], [4, 5, 6, 7], max_length=5, truncation_mode="keep_end")
    np.testing.assert_array_equal(ids, [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(mask, [0, 1, 1, 1, 1])
    ids, mask = L.truncate_sequence([1, 2], [3], max_length=5)
    np.testing.assert_array_equal(ids, [1, 2, 3])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunked_head_matches_full_logits_values_and_gradients(temperature):
    """Ragged chunking (S-1 = 9 tokens x B = 3, chunk 4), masked labels, gradients w.r.t. hidden and lm_head."""
    rng = np.random.default_rng(0)
    b, s, d, vocab = 3, 10, 8, 37
    hidden = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, vocab)) * 0.7, jnp.float32)
    labels = jnp.asarray(np.where(rng.random((b, s)) < 0.3, -100, rng.integers(0, vocab, (b, s))))
    full = logits_logprobs(jnp.einsum("bsd,dv->bsv", hidden, w), labels, temperature)
    fused = token_logprobs(hidden, w, labels, temperature=temperature, chunk_size=4)
    masked = np.asarray(labels[:, 1:] == -100)
    assert masked.any()
    for k in L.TOKEN_STAT_KEYS:
        _close(fused[k], full[k], err_msg=k)
        assert np.all(np.asarray(fused[k])[masked] == 0.0), k

    coef = jnp.asarray(rng.normal(size=(len(L.TOKEN_STAT_KEYS) - 1, b, s - 1)), jnp.float32)

    def objective(stats):
        keys = [k for k in L.TOKEN_STAT_KEYS if k != "is_top1"]
        return sum(jnp.sum(c * stats[k]) for c, k in zip(coef, keys, strict=True))

    g_fused = jax.jit(
        jax.grad(
            lambda h, w: objective(L.token_logprobs(h, w, labels, temperature=temperature, chunk_size=4)),
            argnums=(0, 1),
        )
    )(hidden, w)
    g_full = jax.jit(
        jax.grad(
            lambda h, w: objective(L.logits_logprobs(jnp.einsum("bsd,dv->bsv", h, w), labels, temperature)),
            argnums=(0, 1),
        )
    )(hidden, w)
    for a, e in zip(g_fused, g_full, strict=True):
        _close(a, e, rtol=1e-5, atol=1e-6)
    # No gradient flows from masked positions: a hidden state whose next label is -100 gets none.
    g_h = np.asarray(g_fused[0])[:, :-1]
    assert np.all(g_h[masked] == 0.0)


def test_chunked_head_never_materialises_full_logits():
    """No (B, S-1, V)-sized fp32 buffer appears in the jaxpr of the loss or its gradient."""
    b, s, d, vocab, chunk = 2, 65, 8, 512, 16
    hidden = jnp.ones((b, s, d), jnp.bfloat16)
    w = jnp.ones((d, vocab), jnp.bfloat16)
    labels = jnp.zeros((b, s), jnp.int32)

    def f(h, w):
        return jnp.sum(token_logprobs(h, w, labels, chunk_size=chunk)["log_probs"])

    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, w)
    sizes = []

    def walk(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                sizes.append(int(np.prod(var.aval.shape)) if hasattr(var.aval, "shape") else 0)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert max(sizes) <= chunk * vocab < b * (s - 1) * vocab
    out = token_logprobs(hidden, w, labels, chunk_size=chunk)
    assert all(out[k].dtype == jnp.float32 and out[k].shape == (b, s - 1) for k in L.TOKEN_STAT_KEYS)


# ---------------------------------------------------------------------------------------------------------
# SFT (v116/sft/{nll,dft})
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_losses_metrics_and_grad_accum_match_trl(loss_type):
    v = vectors()
    p = f"v116/sft/{loss_type}/"
    mbs = sorted({k[len(p) :].split("/")[0] for k in v if k.startswith(p + "mb")})
    assert mbs == ["mb0", "mb1"]
    n = L.sft_num_items_in_batch([v[p + f"{mb}/labels"] for mb in mbs])
    assert n == int(v[p + "num_items_in_batch"])
    total = 0.0
    for mb in mbs:
        q = p + mb + "/"
        labels = jnp.asarray(v[q + "labels"])
        stats = logits_logprobs(jnp.asarray(v[q + "logits"]), labels)
        loss = L.sft_loss(stats["log_probs"], stats["label_mask"], num_items_in_batch=n, loss_type=loss_type)
        _close(loss, v[q + "loss"], rtol=SFT_TOL, atol=SFT_TOL)
        metrics = L.sft_metrics(
            stats["entropy"], stats["is_top1"], stats["label_mask"], v[q + "attention_mask"]
        )
        for name in ("entropy", "mean_token_accuracy", "num_tokens"):
            _close(metrics[name], v[q + "metric/" + name][0], rtol=SFT_TOL, atol=SFT_TOL, err_msg=name)
        total += float(loss)
    _close(total, v[p + "loss_sum_over_grad_accum"], rtol=SFT_TOL, atol=SFT_TOL)


def test_sft_loss_gradient_and_clamp():
    lp = jnp.asarray([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    g = jax.grad(lambda x: L.sft_loss(x, mask, num_items_in_batch=4))(lp)
    _close(g, -mask / 4)
    # dft: the weight exp(lp) is a stop-gradient, so d/dlp = -exp(lp) / N
    g = jax.grad(lambda x: L.sft_loss(x, mask, num_items_in_batch=4, loss_type="dft"))(lp)
    _close(g, -np.exp(lp) * mask / 4)
    _close(L.sft_loss(lp * 0, mask * 0, num_items_in_batch=0), 0.0)


# ---------------------------------------------------------------------------------------------------------
# DPO 1.16 (v116/dpo/<case>): loss, gradient w.r.t. policy per-token log-probs, metrics
# ---------------------------------------------------------------------------------------------------------

V116_DPO = _cases("v116/dpo/")


def test_all_v116_dpo_cases_present():
    assert len(V116_DPO) == 25


@pytest.mark.parametrize("case", V116_DPO)
def test_v116_dpo_loss_grad_metrics(case):
    v = vectors()
    p = f"v116/dpo/{case}/"
    cfg = _readme_cfg(f"v116/dpo/{case}", "config")
    loss_type = cfg.pop("loss_type")
    max_length = cfg.pop("max_length", None)
    if max_length is not None:
        batch = L.preference_batch(_examples(), max_length=max_length, truncation_mode="keep_start")
        np.testing.assert_array_equal(batch["completion_mask"], v[p + "completion_mask"])
    token_stats = {
        "mean_logits": v[p + "policy_mean_logits"],
        "is_top1": v[p + "policy_is_top1"].astype(np.float32),
        "entropy": v[p + "policy_entropy"],
    }

    def objective(lp):
        return L.dpo_objective(
            lp,
            jnp.asarray(v[p + "ref_per_token_logps"]),
            jnp.asarray(v[p + "completion_mask"]),
            loss_type=loss_type,
            policy_log_sum_sq_probs=jnp.asarray(v[p + "policy_log_sum_sq_probs"]),
            token_stats=token_stats,
            attention_mask=v[p + "attention_mask"],
            **cfg,
        )

    (loss, metrics), grad = jax.value_and_grad(objective, has_aux=True)(
        jnp.asarray(v[p + "policy_per_token_logps"])
    )
    _close(loss, v[p + "loss"])
    m = v[p + "completion_mask"][:, 1:].astype(bool)
    _close(np.asarray(grad)[m], v[p + "grad_policy_per_token_logps"][m])
    names = [k[len(p + "metric/") :] for k in v if k.startswith(p + "metric/")]
    assert len(names) == 11
    for name in names:
        _close(metrics[name.replace("|", "/")], v[p + "metric/" + name][0], err_msg=name)


def test_v116_dpo_objective_precomputed_reference_and_ld_alpha():
    """Precomputed reference sequence log-probs (LD weighting applied in that pass) give the same loss."""
    v = vectors()
    p = "v116/dpo/ld_alpha0.5/"
    mask = jnp.asarray(v[p + "completion_mask"][:, 1:])
    ref_seq = L.sequence_logps(jnp.asarray(v[p + "ref_per_token_logps"]), mask, ld_alpha=0.5)
    loss, _ = L.dpo_objective(
        jnp.asarray(v[p + "policy_per_token_logps"]),
        None,
        mask,
        ld_alpha=0.5,
        ref_chosen_logps=ref_seq[:4],
        ref_rejected_logps=ref_seq[4:],
    )
    _close(loss, v[p + "loss"])


def test_dpo_loss_rejects_unsupported_combinations():
    x = jnp.zeros(2)
    with pytest.raises(ValueError):
        L.dpo_loss(x, x, x, x, loss_type="nca_pair", f_divergence_type="js_divergence")
    with pytest.raises(ValueError):
        L.dpo_loss(x, x, x, x, loss_type="ipo")  # needs lengths
    with pytest.raises(ValueError):
        L.dpo_objective(
            jnp.zeros((4, 3)),
            jnp.zeros((4, 3)),
            jnp.ones((4, 3)),
            loss_type="aot",
            use_weighting=True,
            policy_log_sum_sq_probs=jnp.zeros((4, 3)),
        )


# ---------------------------------------------------------------------------------------------------------
# DPO 0.22.1 (v0221/dpo/<case>) through the compatibility flags
# ---------------------------------------------------------------------------------------------------------

V0221_DPO = _cases("v0221/dpo/")
# 0.22.1 behaviours this module deliberately does not replicate (1.16 semantics are the target); for these
# only the loss computed from 0.22.1's own sequence log-probs (and WPO weights) is checked.
V0221_SEQUENCE_ONLY = {
    "ld_alpha0.5": "0.22.1 LD mask uses absolute row positions and leaves the reference unweighted",
    "wpo_weighting": "0.22.1 WPO weights are clamped at 1 and off by one position",
}


@functools.cache
def _v0221_token_level(max_length, truncation_mode):
    """Policy/ref per-token log-probs of the common examples under the bigram model, via our pipeline."""
    v = vectors()
    batch = L.preference_batch(_examples(), max_length=max_length, truncation_mode=truncation_mode)
    labels = jnp.asarray(np.where(batch["completion_mask"] == 1, batch["input_ids"], -100))
    hidden = jax.nn.one_hot(batch["input_ids"], 16)
    lp = {w: token_logprobs(hidden, jnp.asarray(v[f"common/dpo/w_{w}"]), labels) for w in ("policy", "ref")}
    return lp["policy"]["log_probs"], lp["ref"]["log_probs"], lp["policy"]["label_mask"]


def test_v0221_case_list():
    assert len(V0221_DPO) == 26


@pytest.mark.parametrize("case", V0221_DPO)
def test_v0221_dpo(case):
    v = vectors()
    p = f"v0221/dpo/{case}/"
    cfg = _readme_cfg(f"v0221/dpo/{case}", "cfg")
    loss_types = ["aot_unpaired" if t == "aot_pair" else t for t in cfg.pop("loss_type")]
    loss_weights = cfg.pop("loss_weights", [1.0] * len(loss_types))
    reward_scale = sum(loss_weights)  # 0.22.1 sums the rewards over its loss types with their weights
    if "rpo_alpha" in cfg:  # 0.22.1 RPO = 1.16 sigmoid + rpo_alpha * sft
        loss_types, loss_weights = [*loss_types, "sft"], [*loss_weights, cfg.pop("rpo_alpha")]
    seq = {
        k: jnp.asarray(v[p + k])
        for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    beta = cfg.get("beta", 0.1)
    kw = {"beta": beta, "label_smoothing": cfg.get("label_smoothing", 0.0)}
    if "f_divergence_type" in cfg:
        kw["f_divergence_type"] = cfg["f_divergence_type"]
        kw["f_alpha_divergence_coef"] = 1.0 - cfg.get("f_alpha", 1.0)  # α_1.16 = 1 - α_0.22
    kw["reference_free"] = cfg.get("reference_free", False)
    kw["cdpo"] = True  # 0.22.1 sigmoid honours label smoothing
    if "ipo" in loss_types:  # 0.22.1 length-averages L before the loss; the stored logps are averages
        kw["chosen_lengths"] = kw["rejected_lengths"] = jnp.ones(4)
    if "bco_pair" in loss_types:  # first step of RunningMoments: δ = this batch's mean reward
        r_w = seq["chosen_logps"] - seq["ref_chosen_logps"]
        r_l = seq["rejected_logps"] - seq["ref_rejected_logps"]
        batch_mean = L.bco_batch_reward_mean(beta * r_w, beta * r_l)
        kw["bco_delta"], _ = L.bco_running_mean(0.0, 1e-24, batch_mean)

    # Sequence log-probs from our own pipeline (batch, truncation, fused head on the bigram model).
    lp, ref_lp, mask = _v0221_token_level(cfg.get("max_length"), cfg.get("truncation_mode", "keep_start"))
    if case not in V0221_SEQUENCE_ONLY:
        ours = L.sequence_logps(lp, mask), L.sequence_logps(ref_lp, mask)
        if "ipo" in loss_types:
            n = jnp.sum(mask, axis=1)
            ours = tuple(x / n for x in ours)
        _close(ours[0], np.concatenate([v[p + "chosen_logps"], v[p + "rejected_logps"]]))
        _close(ours[1], np.concatenate([v[p + "ref_chosen_logps"], v[p + "ref_rejected_logps"]]))

    per_pair = jnp.zeros(4)
    for lt, lam in zip(loss_types, loss_weights, strict=True):
        if lt == "sft":  # token-level: the NLL of the chosen completion tokens
            nll, _ = L.dpo_objective(lp, ref_lp, mask, loss_type="sft")
            _close(nll, v[p + "nll_loss"])
            per_pair = per_pair + lam * nll
        else:
            per_pair = per_pair + lam * L.dpo_loss(**seq, loss_type=lt, **kw)[0]
    if case == "wpo_weighting":
        per_pair = per_pair * v[p + "policy_weights"]
    _close(per_pair, v[p + "per_example_losses"])
    _close(jnp.mean(per_pair), v[p + "loss"])
    if "sft" in loss_types:  # the full objective on the token-level batch gives the same loss
        loss, _ = L.dpo_objective(lp, ref_lp, mask, loss_type=loss_types, loss_weights=loss_weights, **kw)
        _close(loss, v[p + "loss"])

    _, rw, rl = L.dpo_loss(**seq, **kw)
    _close(rw * reward_scale, v[p + "rewards_chosen"])
    _close(rl * reward_scale, v[p + "rewards_rejected"])
    _close(jnp.mean(rw > rl), v[p + "rewards_accuracies"])
    _close(jnp.mean(rw - rl) * reward_scale, v[p + "rewards_margins"])


def test_v0221_bco_running_mean_is_a_pure_update():
    mean, count = L.bco_running_mean(0.0, 1e-24, 0.3)
    _close(mean, 0.3)
    mean, count = L.bco_running_mean(mean, count, 0.1)
    _close(mean, 0.2)
    _close(count, 2.0)


# ---------------------------------------------------------------------------------------------------------
# Dummy pairs of a short batch (pair_mask)
# ---------------------------------------------------------------------------------------------------------

_PAIR_MASK_CASES = [
    *[{"loss_type": t} for t in L.DPO_LOSS_TYPES if t not in ("exo_pair",)],
    {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    {"loss_type": "robust", "label_smoothing": 0.1},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "bco_delta": 0.3},
    {"loss_type": "sigmoid", "use_weighting": True},
    {"loss_type": "sigmoid", "ld_alpha": 0.5},
    {"loss_type": "sigmoid", "f_divergence_type": "js_divergence"},
]


def _case_id(cfg):
    return "+".join(np.atleast_1d(cfg["loss_type"])) + "".join(f"-{k}" for k in cfg if k != "loss_type")


@pytest.mark.parametrize("cfg", _PAIR_MASK_CASES, ids=_case_id)
def test_dummy_pairs_carry_no_weight(cfg):
    """3 real pairs with 2 dummy pairs between them (pair_mask 0) give the loss, metrics and gradients of
    the 3 real pairs alone, whatever the dummy rows hold; the dummies get no gradient."""
    rng = np.random.default_rng(3)
    t, real_b, dummy_at = 7, 3, (1, 4)

    def rows(b):  # chosen then rejected
        return {
            "lp": rng.normal(-2.0, 1.0, (2 * b, t)).astype(np.float32),
            "ref": rng.normal(-2.0, 1.0, (2 * b, t)).astype(np.float32),
            "lssp": rng.normal(-1.5, 0.3, (2 * b, t)).astype(np.float32),
            "mask": (rng.random((2 * b, t + 1)) < 0.7).astype(np.int32),
            "attn": np.ones((2 * b, t + 1), np.int32),
            "mean_logits": rng.normal(size=(2 * b, t)).astype(np.float32),
            "is_top1": (rng.random((2 * b, t)) < 0.5).astype(np.float32),
            "entropy": rng.random((2 * b, t)).astype(np.float32),
        }

    real, dummy = rows(real_b), rows(len(dummy_at))
    order = [i for i in range(real_b + len(dummy_at)) if i not in dummy_at]
    b = real_b + len(dummy_at)

    def interleave(r, d):
        out = np.zeros((2 * b, *r.shape[1:]), r.dtype)
        for half in (0, 1):
            out[half * b + np.asarray(order)] = r[half * real_b : (half + 1) * real_b]
            out[half * b + np.asarray(dummy_at)] = d[half * len(dummy_at) : (half + 1) * len(dummy_at)]
        return out

    mixed = {k: interleave(real[k], dummy[k]) for k in real}
    pair_mask = np.isin(np.arange(b), order).astype(np.int32)

    def objective(lp, data, pm):
        return L.dpo_objective(
            lp,
            jnp.asarray(data["ref"]),
            jnp.asarray(data["mask"]),
            policy_log_sum_sq_probs=jnp.asarray(data["lssp"]),
            token_stats={k: jnp.asarray(data[k]) for k in ("mean_logits", "is_top1", "entropy")},
            attention_mask=jnp.asarray(data["attn"]),
            pair_mask=pm,
            **cfg,
        )

    (l1, m1), g1 = jax.value_and_grad(objective, has_aux=True)(jnp.asarray(real["lp"]), real, None)
    (l2, m2), g2 = jax.value_and_grad(objective, has_aux=True)(jnp.asarray(mixed["lp"]), mixed, pair_mask)
    _close(l2, l1)
    assert set(m1) == set(m2)
    for k in m1:
        _close(m2[k], m1[k], err_msg=k)
    g2 = np.asarray(g2)
    _close(interleave(np.asarray(g1), np.zeros_like(dummy["lp"])), g2)
    assert np.any(np.asarray(g1) != 0)


def test_bco_batch_reward_mean_is_over_real_pairs():
    rw, rl = jnp.asarray([0.2, -0.4, 9.0]), jnp.asarray([0.1, 0.3, 9.0])
    _close(L.bco_batch_reward_mean(rw, rl, jnp.asarray([1, 1, 0])), (0.2 - 0.4 + 0.1 + 0.3) / 4)
    _close(L.bco_batch_reward_mean(rw[:2], rl[:2]), jnp.mean(jnp.concatenate([rw[:2], rl[:2]])))
