"""PPO objectives and the reward-model loss vs TRL's numbers (tests/data/trl_vectors.npz, spec rl.md 4 and 5).

Tolerances are the spec's and are never relaxed: rtol 2e-5, atol 2e-6 (fp32). Every `v0221/ppo_replica/*`
case is discovered from the file and its count pinned, and every field a case holds is checked. Options
beyond TRL are checked against numpy transcriptions of verl's formulas (`core_algos.py`), and the TRL
post-processing stage is also transcribed line by line in numpy to cover configurations the vectors do not
(γ < 1, no truncation, edge-case rows). The reward-model loss is checked against TRL 1.16's own
`RewardTrainer.compute_loss` (no reward-model vectors exist in the file).
"""

from __future__ import annotations

import ast
import collections
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trl_vectors import section, vectors

from qwenvl_jax import losses as L
from qwenvl_jax import losses_ppo as P

RTOL, ATOL = 2e-5, 2e-6
PREFIX = "v0221/ppo_replica/"
EXPECTED_CASES = 4


def common():
    return section("common/ppo/")


def _readme(key):
    return next(s for s in vectors()["_readme"] if s.startswith(key + ":"))


@functools.cache
def token_ids():
    """pad and eos (= stop) ids from the common/ppo description line."""
    line = _readme("common/ppo")
    return int(re.search(r"\bpad=(\d+)", line).group(1)), int(re.search(r"\beos=stop=(\d+)", line).group(1))


def _case_cfg(case):
    """`name=value` pairs of the case's description; `a=b=v` gives both names the value."""
    body = re.search(r"\((kl_estimator=[^)]*)\)", _readme(PREFIX + case)).group(1)
    cfg = {}
    for item in body.split(", "):
        *names, value = item.split("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        cfg.update(dict.fromkeys(names, value))
    return cfg


def _close(actual, desired, err_msg=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(desired, np.float64), RTOL, ATOL, err_msg=err_msg
    )


CASES = sorted({k[len(PREFIX) :].split("/")[0] for k in vectors() if k.startswith(PREFIX)})


def test_every_case_in_the_file_is_covered():
    assert len(CASES) == EXPECTED_CASES
    ppo_keys = {k for k in vectors() if k.split("/")[1:2] in (["ppo"], ["ppo_replica"])}
    assert ppo_keys == {k for k in ppo_keys if k.startswith(("common/ppo/", PREFIX))}
    assert set(common()) == {
        "responses",
        "logprobs",
        "ref_logprobs",
        "values",
        "scores",
        "new_logprobs",
        "vpred",
    }


# ---------------------------------------------------------------------------------------------------------
# v0221/ppo_replica/<case>: post-processing, rewards, GAE, one update, every field
# ---------------------------------------------------------------------------------------------------------


def _advantages_kwargs(cfg):
    pad, eos = token_ids()
    return dict(
        eos_token_id=eos,
        pad_token_id=pad,
        kl_coef=cfg.pop("kl_coef"),
        kl_estimator=cfg.pop("kl_estimator"),
        gamma=float(cfg.pop("gamma")),
        lam=cfg.pop("lam"),
        whiten_rewards=cfg.pop("whiten_rewards"),
        missing_eos_penalty=cfg.pop("missing_eos_penalty"),
    )


def _loss_and_grads(out, new_logprobs, vpred, **kw):
    def objective(new_logprobs, vpred):
        return L.ppo_loss(
            new_logprobs,
            vpred,
            out["logprobs"],
            out["values"],
            out["advantages"],
            out["returns"],
            out["padding_mask"],
            out["padding_mask_p1"],
            **kw,
        )

    return jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        jnp.asarray(new_logprobs), jnp.asarray(vpred)
    )


@pytest.mark.parametrize("case", CASES)
def test_v0221_ppo_replica(case):
    v, c = vectors(), common()
    p = PREFIX + case + "/"
    cfg = _case_cfg(case)
    out = L.ppo_advantages(
        c["responses"], c["logprobs"], c["ref_logprobs"], c["values"], c["scores"], **_advantages_kwargs(cfg)
    )
    loss_kw = {k: cfg.pop(k) for k in ("cliprange", "cliprange_value", "vf_coef")}
    assert not cfg, f"unhandled config keys {cfg}"
    (loss, metrics), (grad_lp, grad_vp) = _loss_and_grads(out, c["new_logprobs"], c["vpred"], **loss_kw)

    exact = {
        "postprocessed_responses": out["postprocessed_responses"],
        "sequence_lengths": out["sequence_lengths"],
        "padding_mask": out["padding_mask"],
        "padding_mask_p1": out["padding_mask_p1"],
    }
    close = {
        "scores_after_eos_penalty": out["scores"],
        "kl": out["kl"],
        "rewards": out["rewards"],
        "advantages": out["advantages"],
        "returns": out["returns"],
        "loss": loss,
        # TRL's masked_fill stops the gradient at padded positions, as jnp.where does: compared everywhere.
        "grad_new_logprobs": grad_lp,
        "grad_vpred": grad_vp,
        **{k: metrics[k] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl")},
        **{
            "objective_" + k: out["metrics"]["objective/" + k]
            for k in ("kl", "entropy", "non_score_reward", "rlhf_reward")
        },
    }
    fields = {k[len(p) :] for k in v if k.startswith(p)}
    assert fields == set(exact) | set(close)
    for name, got in exact.items():
        np.testing.assert_array_equal(np.asarray(got), v[p + name], err_msg=p + name)
    for name, got in close.items():
        _close(got, v[p + name], err_msg=p + name)


def test_common_ppo_rows_exercise_every_ending():
    """The file's four rows: eos inside, eos last, eos first, no eos (penalised); checked by the cases."""
    pad, eos = token_ids()
    out = L.ppo_advantages(**_common_inputs(), eos_token_id=eos, pad_token_id=pad, missing_eos_penalty=1.0)
    np.testing.assert_array_equal(out["sequence_lengths"], [3, 7, 0, 7])
    np.testing.assert_array_equal(out["contain_eos_token"], [True, True, True, False])
    _close(out["scores"], common()["scores"] - np.array([0, 0, 0, 1.0], np.float32))
    # the score sits one step after the eos (row 0: t=4, row 2: t=1), or on the last token (rows 1, 3)
    ends = [4, 7, 1, 7]
    _close(out["rewards"][np.arange(4), ends] - out["non_score_reward"][np.arange(4), ends], out["scores"])
    assert int(out["metrics"]["val/num_eos_tokens"]) == int((common()["responses"] == eos).sum())
    _close(out["metrics"]["objective/scores"], np.mean(out["scores"]))


def _common_inputs():
    c = common()
    return {k: c[k] for k in ("responses", "logprobs", "ref_logprobs", "values", "scores")}


# ---------------------------------------------------------------------------------------------------------
# A line-by-line numpy transcription of TRL 0.22.1 train() l.470-537 and l.560-598, for other configurations
# ---------------------------------------------------------------------------------------------------------


def _np_first_true_indices(bools):
    row_len = bools.shape[-1]
    return np.min(row_len * (~bools).astype(np.int64) + np.arange(row_len), axis=-1)


def _np_masked_mean(values, mask, axis=None):
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def _np_masked_whiten(values, mask, shift_mean=True):
    mean = _np_masked_mean(values, mask)
    mask_sum = mask.sum()
    var = _np_masked_mean((values - mean) ** 2, mask) * np.float32(mask_sum / (mask_sum - 1))
    whitened = (values - mean) / np.sqrt(var + np.float32(1e-8))
    return whitened if shift_mean else whitened + mean


def _np_trl_advantages(
    responses,
    logprobs,
    ref_logprobs,
    values,
    scores,
    *,
    eos,
    pad,
    stop,
    kl_coef,
    kl_estimator,
    gamma,
    lam,
    whiten_rewards,
    missing_eos_penalty,
):
    f32 = np.float32
    logprobs, ref_logprobs, values, scores = (
        np.array(x, f32) for x in (logprobs, ref_logprobs, values, scores)
    )
    post = responses.copy()
    if stop is not None:
        trunc = _np_first_true_indices(responses == stop)[:, None]
        post[np.arange(responses.shape[1])[None] > trunc] = pad
    seq_len = _np_first_true_indices(post == pad) - 1
    if missing_eos_penalty is not None:
        scores[~np.any(post == eos, axis=-1)] -= f32(missing_eos_penalty)
    idx = np.arange(responses.shape[1])[None].repeat(responses.shape[0], 0)
    padding_mask = idx > seq_len[:, None]
    logprobs[padding_mask] = 1.0
    ref_logprobs[padding_mask] = 1.0
    padding_mask_p1 = idx > (seq_len + 1)[:, None]
    values[padding_mask_p1] = 0
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (np.exp(logr) - 1) - logr
    rewards = f32(-kl_coef) * kl
    end = np.where(seq_len + 1 < rewards.shape[1], seq_len + 1, seq_len)
    rewards[np.arange(len(rewards)), end] += scores
    if whiten_rewards:
        rewards = _np_masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards[padding_mask_p1] = 0
    lastgaelam, reversed_ = f32(0), []
    n = responses.shape[1]
    for t in reversed(range(n)):
        nextvalues = values[:, t + 1] if t < n - 1 else f32(0)
        delta = rewards[:, t] + f32(gamma) * nextvalues - values[:, t]
        lastgaelam = delta + f32(gamma * lam) * lastgaelam
        reversed_.append(lastgaelam)
    advantages = np.stack(reversed_[::-1], axis=1)
    returns = advantages + values
    advantages = _np_masked_whiten(advantages, ~padding_mask)
    advantages[padding_mask] = 0
    return dict(
        postprocessed_responses=post,
        sequence_lengths=seq_len,
        scores=scores,
        padding_mask=padding_mask,
        padding_mask_p1=padding_mask_p1,
        logprobs=logprobs,
        values=values,
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
    )


def _compare_with_transcription(inputs, **kw):
    pad, eos = kw.pop("pad"), kw.pop("eos")
    stop = kw.pop("stop", eos)
    ours = L.ppo_advantages(**inputs, eos_token_id=eos, pad_token_id=pad, stop_token_id=stop, **kw)
    ref = _np_trl_advantages(*inputs.values(), eos=eos, pad=pad, stop=stop, **kw)
    for name, want in ref.items():
        if want.dtype.kind in "biu":
            np.testing.assert_array_equal(np.asarray(ours[name]), want, err_msg=name)
        else:
            _close(ours[name], want, err_msg=name)
    return ours


_DEFAULTS = dict(
    kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False, missing_eos_penalty=1.0
)


@pytest.mark.parametrize("case", CASES)
def test_numpy_transcription_reproduces_the_vectors(case):
    """The transcription below is trusted for other configurations because it reproduces every case."""
    cfg = _case_cfg(case)
    kw = _advantages_kwargs(cfg)
    pad, eos = kw.pop("pad_token_id"), kw.pop("eos_token_id")
    ref = _np_trl_advantages(*_common_inputs().values(), eos=eos, pad=pad, stop=eos, **kw)
    for name in ("rewards", "advantages", "returns", "kl"):
        _close(ref[name], vectors()[PREFIX + case + "/" + name], err_msg=name)


def _edge_inputs(seed=0):
    """Rows: eos mid-row then junk (incl. pad), eos last, eos first, no eos, leading pad (seq_len = -1),
    eos at T-2 (score on T-1)."""
    rng = np.random.default_rng(seed)
    pad, eos = 0, 2
    b, t = 6, 9
    responses = rng.integers(3, 20, size=(b, t))
    responses[0, 3], responses[0, 5] = eos, pad
    responses[1, t - 1] = eos
    responses[2, 0] = eos
    responses[4, 0] = pad
    responses[5, t - 2] = eos
    lp = -rng.uniform(0.05, 3.0, size=(b, t)).astype(np.float32)
    ref = (lp + rng.normal(0, 0.3, size=(b, t))).astype(np.float32)
    values = rng.normal(0, 1, size=(b, t)).astype(np.float32)
    scores = rng.normal(0, 1, size=(b,)).astype(np.float32)
    return dict(responses=responses, logprobs=lp, ref_logprobs=ref, values=values, scores=scores), pad, eos


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"kl_estimator": "k3", "whiten_rewards": True},
        {"gamma": 0.9, "lam": 0.8, "kl_coef": 0.2},
        {"gamma": 0.99, "lam": 1.0, "whiten_rewards": True, "missing_eos_penalty": None},
        {"stop": None},
        {"stop": 7, "kl_estimator": "k3"},
    ],
    ids=["defaults", "k3_whiten", "gamma0.9_lam0.8", "gamma0.99_lam1_nopenalty", "no_truncation", "stop7"],
)
def test_advantages_match_trl_transcription_on_edge_rows(overrides):
    inputs, pad, eos = _edge_inputs()
    out = _compare_with_transcription(inputs, pad=pad, eos=eos, **{**_DEFAULTS, **overrides})
    if overrides.get("stop", eos) == eos:
        np.testing.assert_array_equal(out["sequence_lengths"], [3, 8, 0, 8, -1, 7])
        assert bool(out["padding_mask"][4].all()) and not bool(out["padding_mask_p1"][4, 0])


def test_stop_token_none_keeps_tokens_after_eos():
    inputs, pad, eos = _edge_inputs()
    out = L.ppo_advantages(**inputs, eos_token_id=eos, pad_token_id=pad, stop_token_id=None)
    np.testing.assert_array_equal(out["postprocessed_responses"], inputs["responses"])
    assert int(out["sequence_lengths"][0]) == 4  # the literal pad at t=5 ends the row, not the eos at t=3


# ---------------------------------------------------------------------------------------------------------
# Loss: transcription for other clip ranges, verl's dual clip and aggregation modes
# ---------------------------------------------------------------------------------------------------------


def _np_agg_loss(loss_mat, loss_mask, mode, loss_scale_factor=None):
    """verl core_algos.agg_loss, single process (dp_size 1, no global batch info)."""
    m = loss_mask.astype(np.float32)
    if mode == "token-mean":
        return (loss_mat * m).sum() / m.sum()
    if mode == "seq-mean-token-sum":
        seq_losses = (loss_mat * m).sum(-1)
        seq_mask = (m.sum(-1) > 0).astype(np.float32)
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    if mode == "seq-mean-token-mean":
        seq_mask = m.sum(-1)
        seq_losses = (loss_mat * m).sum(-1) / (seq_mask + np.float32(1e-8))
        seq_mask = (seq_mask > 0).astype(np.float32)
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    assert mode == "seq-mean-token-sum-norm"
    return (loss_mat * m).sum(-1).sum() / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)


def _np_ppo_loss(
    new_lp,
    vpred,
    lp,
    values,
    adv,
    ret,
    pm,
    pm1,
    *,
    cliprange=0.2,
    cliprange_value=0.2,
    vf_coef=0.1,
    clip_ratio_c=None,
    loss_agg_mode="token-mean",
    loss_scale_factor=None,
):
    """TRL 0.22.1 l.560-598, with verl's dual clip (compute_policy_loss_vanilla) and agg_loss substituted."""
    new_lp = np.where(pm, 1.0, new_lp).astype(np.float32)
    vpred = np.where(pm1, 0.0, vpred).astype(np.float32)
    vpredclipped = np.clip(vpred, values - np.float32(cliprange_value), values + np.float32(cliprange_value))
    vf1, vf2 = (vpred - ret) ** 2, (vpredclipped - ret) ** 2
    vf_loss = 0.5 * _np_agg_loss(np.maximum(vf1, vf2), ~pm1, loss_agg_mode, loss_scale_factor)
    ratio = np.exp(new_lp - lp)
    pg1 = -adv * ratio
    pg2 = -adv * np.clip(ratio, np.float32(1 - cliprange), np.float32(1 + cliprange))
    clip_pg1 = np.maximum(pg1, pg2)
    metrics = {
        "pg_clipfrac": _np_masked_mean((pg2 > pg1).astype(np.float32), ~pm),
        "vf_clipfrac": _np_masked_mean((vf2 > vf1).astype(np.float32), ~pm1),
    }
    if clip_ratio_c is not None:
        pg3 = -adv * np.float32(clip_ratio_c)
        clip_pg2 = np.minimum(pg3, clip_pg1)
        metrics["pg_clipfrac_lower"] = _np_masked_mean(((clip_pg1 > pg3) & (adv < 0)).astype(np.float32), ~pm)
        clip_pg1 = np.where(adv < 0, clip_pg2, clip_pg1)
    pg_loss = _np_agg_loss(clip_pg1, ~pm, loss_agg_mode, loss_scale_factor)
    metrics.update(pg_loss=pg_loss, vf_loss=vf_loss)
    return pg_loss + np.float32(vf_coef) * vf_loss, metrics


@functools.cache
def _far_off_policy_batch():
    """Edge rows' advantages, with new log-probs far from the old ones (ratios up to ~e^2.5) and a fully
    padded row, so that every clip (value, ratio, dual) is active somewhere."""
    inputs, pad, eos = _edge_inputs(seed=1)
    out = L.ppo_advantages(**inputs, eos_token_id=eos, pad_token_id=pad, missing_eos_penalty=1.0)
    rng = np.random.default_rng(2)
    shape = inputs["logprobs"].shape
    new_lp = (inputs["logprobs"] + rng.uniform(-2.5, 2.5, size=shape)).astype(np.float32)
    vpred = (np.asarray(out["values"]) + rng.normal(0, 0.5, size=shape)).astype(np.float32)
    arrays = {k: np.asarray(out[k]) for k in ("logprobs", "values", "advantages", "returns")}
    arrays.update(
        padding_mask=np.asarray(out["padding_mask"]), padding_mask_p1=np.asarray(out["padding_mask_p1"])
    )
    return new_lp, vpred, arrays


def _loss_args(new_lp, vpred, a):
    return (
        new_lp,
        vpred,
        a["logprobs"],
        a["values"],
        a["advantages"],
        a["returns"],
        a["padding_mask"],
        a["padding_mask_p1"],
    )


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"cliprange": 0.1, "cliprange_value": 0.05, "vf_coef": 0.5},
        {"clip_ratio_c": 3.0},
        {"clip_ratio_c": 1.5, "cliprange": 0.3},
        {"loss_agg_mode": "seq-mean-token-sum"},
        {"loss_agg_mode": "seq-mean-token-mean"},
        {"loss_agg_mode": "seq-mean-token-sum-norm"},
        {"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": 64.0, "clip_ratio_c": 2.0},
    ],
    ids=["trl", "ranges", "dual3", "dual1.5", "seq_sum", "seq_mean", "seq_sum_norm", "seq_sum_norm64_dual2"],
)
def test_ppo_loss_matches_transcription(kw):
    new_lp, vpred, a = _far_off_policy_batch()
    loss, metrics = L.ppo_loss(*_loss_args(new_lp, vpred, a), **kw)
    want, want_metrics = _np_ppo_loss(*_loss_args(new_lp, vpred, a), **kw)
    _close(loss, want)
    assert set(metrics) == set(want_metrics) | {"approxkl", "ratio"}
    for name, value in want_metrics.items():
        _close(metrics[name], value, err_msg=name)
    if kw.get("clip_ratio_c"):
        assert 0 < float(metrics["pg_clipfrac_lower"]) < 1  # the dual clip is active on some tokens only


def test_dual_clip_caps_negative_advantages_and_stops_their_gradient():
    new_lp, vpred, a = _far_off_policy_batch()
    c = 1.5
    args = _loss_args(new_lp, vpred, a)
    grad = jax.grad(lambda lp, **kw: L.ppo_loss(lp, *args[1:], **kw)[0])
    g_plain, g_dual = (
        np.asarray(grad(jnp.asarray(new_lp))),
        np.asarray(grad(jnp.asarray(new_lp), clip_ratio_c=c)),
    )
    valid = ~a["padding_mask"]
    ratio = np.exp(new_lp - a["logprobs"])
    capped = valid & (a["advantages"] < 0) & (ratio > c)
    assert capped.any() and (valid & ~capped).any()
    np.testing.assert_array_equal(g_dual[capped], 0.0)
    assert np.all(g_plain[capped] != 0)
    _close(g_dual[~capped], g_plain[~capped])
    # a cap above every ratio changes nothing
    big = float(ratio[valid].max()) * 2
    _close(L.ppo_loss(*args, clip_ratio_c=big)[0], L.ppo_loss(*args)[0])


def test_aggregation_modes_weigh_rows_differently():
    """Token-mean weighs tokens, seq-mean-token-mean weighs rows: equal only when rows have equal lengths."""
    x = jnp.array([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0]])
    m = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)  # last row: no token, excluded
    _close(P.agg_loss(x, m, "token-mean"), 7 / 5)
    _close(P.agg_loss(x, m, "seq-mean-token-sum"), (4 + 3) / 2)
    _close(P.agg_loss(x, m, "seq-mean-token-mean"), (1 + 3) / 2)
    _close(P.agg_loss(x, m, "seq-mean-token-sum-norm"), 7 / 4)
    _close(P.agg_loss(x, m, "seq-mean-token-sum-norm", loss_scale_factor=10), 0.7)


# ---------------------------------------------------------------------------------------------------------
# Adaptive KL controller
# ---------------------------------------------------------------------------------------------------------


class _NpAdaptiveKLController:
    """TRL's former `trl.core.AdaptiveKLController` (= verl's), verbatim in numpy."""

    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def test_adaptive_kl_controller_follows_the_reference_over_a_trajectory():
    ours, ref = L.AdaptiveKLController(0.2, 6.0, 10000), _NpAdaptiveKLController(0.2, 6.0, 10000)
    for kl in (0.5, 3.0, 5.9, 6.0, 6.5, 40.0, 12.0, 1e-3):
        got = ours.update(kl, 256)
        ref.update(kl, 256)
        assert got == ours.value
        np.testing.assert_allclose(ours.value, ref.value, rtol=1e-12)
    # error clipped at ±20 %: far above target the coefficient grows by exactly 1 + 0.2·n/horizon
    np.testing.assert_allclose(L.adaptive_kl_coef(1.0, 1e6, 100, target=1.0, horizon=1000), 1.02, rtol=1e-6)
    np.testing.assert_allclose(L.adaptive_kl_coef(1.0, 0.0, 100, target=1.0, horizon=1000), 0.98, rtol=1e-6)
    jitted = jax.jit(functools.partial(L.adaptive_kl_coef, target=6.0, horizon=10000.0))
    _close(jitted(jnp.float32(0.2), jnp.float32(3.0), 256), 0.2 * (1 - 0.2 * 256 / 10000))


# ---------------------------------------------------------------------------------------------------------
# jit: static keywords, a traced kl_coef that does not recompile
# ---------------------------------------------------------------------------------------------------------


def test_advantages_and_loss_jit_and_kl_coef_is_traced():
    pad, eos = token_ids()
    inputs = _common_inputs()
    traces = []

    def stage(kl_coef, inputs):
        traces.append(1)
        return L.ppo_advantages(
            **inputs,
            eos_token_id=eos,
            pad_token_id=pad,
            kl_coef=kl_coef,
            kl_estimator="k3",
            whiten_rewards=True,
            missing_eos_penalty=1.0,
        )

    jitted = jax.jit(stage)
    for kl_coef in (0.05, 0.08):
        eager = stage(kl_coef, inputs)
        got = jitted(jnp.float32(kl_coef), inputs)
        jax.tree.map(_close, got, eager)
    assert len(traces) == 2 + 1  # two eager calls, one trace for both coefficients

    loss_fn = jax.jit(functools.partial(L.ppo_loss, clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean"))
    c = common()
    args = (
        c["new_logprobs"],
        c["vpred"],
        eager["logprobs"],
        eager["values"],
        eager["advantages"],
        eager["returns"],
        eager["padding_mask"],
        eager["padding_mask_p1"],
    )
    jax.tree.map(
        _close, loss_fn(*args), L.ppo_loss(*args, clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean")
    )
    jax.tree.map(
        _close,
        jax.jit(L.reward_loss)(c["scores"], c["scores"][::-1]),
        L.reward_loss(c["scores"], c["scores"][::-1]),
    )


def test_arguments_are_checked():
    inputs = _common_inputs()
    with pytest.raises(ValueError, match="kl_estimator"):
        L.ppo_advantages(**inputs, eos_token_id=2, pad_token_id=0, kl_estimator="k2")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        P.agg_loss(jnp.ones((2, 2)), jnp.ones((2, 2), bool), "token-sum")
    new_lp, vpred, a = _far_off_policy_batch()
    with pytest.raises(ValueError, match="clip_ratio_c"):
        L.ppo_loss(*_loss_args(new_lp, vpred, a), clip_ratio_c=1.0)


# ---------------------------------------------------------------------------------------------------------
# Reward model: TRL 1.16 RewardTrainer.compute_loss itself (stand-in self and model)
# ---------------------------------------------------------------------------------------------------------


class _StandInRewardModel:
    """Returns fixed `(2B, 1)` scores as a leaf tensor, so TRL's loss code sees exactly our inputs."""

    training = True

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, **inputs):
        return types.SimpleNamespace(logits=self.logits)


def _trl_reward_loss(chosen, rejected, margin, center_rewards_coefficient):
    torch = pytest.importorskip("torch")
    reward_trainer = pytest.importorskip("trl.trainer.reward_trainer")
    logits = torch.tensor(np.concatenate([chosen, rejected])[:, None], requires_grad=True)
    model = _StandInRewardModel(logits)
    accelerator = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    me = types.SimpleNamespace(
        model=model,
        args=types.SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient),
        accelerator=accelerator,
        _total_train_tokens=0,
        _tp_size=1,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )
    n = 2 * len(chosen)
    inputs = {
        "input_ids": torch.ones(n, 3, dtype=torch.long),
        "attention_mask": torch.ones(n, 3, dtype=torch.long),
    }
    if margin is not None:
        inputs["margin"] = torch.tensor(margin)
    loss = reward_trainer.RewardTrainer.compute_loss(me, model, inputs)
    loss.backward()
    grad = logits.grad.numpy()[:, 0]
    metrics = {k: v[0] for k, v in me._metrics["train"].items() if k != "num_tokens"}
    return loss.item(), grad[: len(chosen)], grad[len(chosen) :], metrics


@pytest.mark.parametrize(
    "margin,center",
    [(False, None), (True, None), (False, 0.01), (True, 0.5)],
    ids=["plain", "margin", "center", "both"],
)
def test_reward_loss_matches_trl_reward_trainer(margin, center):
    rng = np.random.default_rng(3)
    chosen, rejected = (rng.normal(0, 2, size=7).astype(np.float32) for _ in range(2))
    m = rng.uniform(0, 1.5, size=7).astype(np.float32) if margin else None
    want_loss, want_gc, want_gr, want_metrics = _trl_reward_loss(chosen, rejected, m, center)

    def objective(rc, rr):
        return L.reward_loss(rc, rr, margin=m, center_rewards_coefficient=center)

    (loss, metrics), (gc, gr) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        jnp.asarray(chosen), jnp.asarray(rejected)
    )
    _close(loss, want_loss)
    _close(gc, want_gc)
    _close(gr, want_gr)
    assert set(want_metrics) == {"min_reward", "mean_reward", "max_reward", "accuracy", "margin"}
    for name, value in want_metrics.items():
        _close(metrics[name], value, err_msg=name)
    _close(metrics["chosen"], chosen.mean())
    _close(metrics["rejected"], rejected.mean())
    assert 0 < float(metrics["accuracy"]) < 1


def test_reward_loss_accepts_the_score_head_shape():
    rc, rr = np.array([[1.0], [0.5], [-2.0]], np.float32), np.array([[0.0], [1.5], [-3.0]], np.float32)
    loss, metrics = L.reward_loss(rc, rr, margin=np.array([0.5, 0.0, 1.0], np.float32))
    want = -np.mean(np.log(1 / (1 + np.exp(-np.array([0.5, -1.0, 0.0])))))
    _close(loss, want)
    _close(metrics["accuracy"], 2 / 3)
