"""GRPO objectives vs TRL's own numbers (tests/data/trl_vectors.npz, spec rl.md sections 3 and 5).

Tolerances are the spec's and are never relaxed: losses/gradients rtol 2e-5, atol 2e-6 (fp32). Gradients are
compared under the completion mask (TRL's leaf stand-in has gradient at padded positions too). Every case
is discovered from the file and its count pinned, so a new case cannot be skipped silently, and every field a
case holds is checked.
"""

from __future__ import annotations

import ast
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trl_vectors import section, vectors

from qwenvl_jax import losses as L
from qwenvl_jax import losses_rl as R

RTOL, ATOL = 2e-5, 2e-6
MICRO_BATCHES = (
    slice(0, 6),
    slice(6, 12),
)  # common/grpo: rows [0:6] and [6:12], GA = steps_per_generation = 2
GA = 2
G = 4
EXPECTED_CASES = {
    "v116/grpo/": 20,
    "v0221/grpo/": 11,
    "v116/grpo_adv_replica/": 8,
    "v0221/grpo_adv_replica/": 3,
    "v116/grpo_vllm_is_replica/": 5,
}


def common():
    return section("common/grpo/")


def _cases(prefix):
    """Case names under `prefix`: the key path up to the `mb<i>`/field level."""
    depth = {"v116/grpo_adv_replica/": 3, "v0221/grpo_adv_replica/": 2}.get(prefix, 1)
    keys = [k[len(prefix) :].split("/") for k in vectors() if k.startswith(prefix)]
    return sorted({"/".join(parts[:depth]) for parts in keys})


def _readme(key):
    return next(s for s in vectors()["_readme"] if s.startswith(key + ":"))


def _readme_cfg(key):
    return ast.literal_eval(re.search(r"cfg=(\{.*?\})(;|$)", _readme(key)).group(1))


def _close(actual, desired, err_msg=""):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(desired, np.float64), RTOL, ATOL, err_msg=err_msg
    )


V116_GRPO = _cases("v116/grpo/")
V0221_GRPO = _cases("v0221/grpo/")
V116_ADV = _cases("v116/grpo_adv_replica/")
V0221_ADV = _cases("v0221/grpo_adv_replica/")
V116_IS = _cases("v116/grpo_vllm_is_replica/")


def test_every_case_in_the_file_is_covered():
    covered = {
        "v116/grpo/": V116_GRPO,
        "v0221/grpo/": V0221_GRPO,
        "v116/grpo_adv_replica/": V116_ADV,
        "v0221/grpo_adv_replica/": V0221_ADV,
        "v116/grpo_vllm_is_replica/": V116_IS,
    }
    assert {p: len(c) for p, c in covered.items()} == EXPECTED_CASES
    grpo_keys = {k for k in vectors() if "grpo" in k and not k.startswith("common/")}
    assert grpo_keys == {k for k in grpo_keys if any(k.startswith(p) for p in EXPECTED_CASES)}


# ---------------------------------------------------------------------------------------------------------
# Loss cases: v116/grpo/<case> and v0221/grpo/<case>
# ---------------------------------------------------------------------------------------------------------

_IS_RATIO = {"token": "is_ratio_token_truncate", "sequence": "is_ratio_sequence_mask"}
_IS_MODE = {"token": "token_truncate", "sequence": "sequence_mask"}  # the modes common/grpo/is_ratio_* hold


def _loss_kwargs(version, case, rows, *, is_from_sampling=False):
    """grpo_loss keywords of one micro-batch, from the case's config line in `_readme` (every key consumed)."""
    c = common()
    cfg = _readme_cfg(f"{version}/grpo/{case}")
    kw = {
        k: cfg.pop(k)
        for k in (
            "loss_type",
            "beta",
            "epsilon",
            "epsilon_high",
            "delta",
            "importance_sampling_level",
            "top_entropy_quantile",
        )
    }
    with_old = cfg.pop("with_old")
    kw.update(
        old_per_token_logps=c["old"][rows] if with_old else None,
        ref_per_token_logps=c["ref"][rows] if kw["beta"] else None,
        entropies=c["ent"][rows],
        num_items_in_batch=int(c["mask"].sum()),  # both micro-batches = the generation batch
        gradient_accumulation_steps=GA,
        steps_per_generation=GA,
        max_completion_length=c["mask"].shape[1],  # the generator ran with max_completion_length = T = 7
    )
    if version == "v0221":
        kw["compat"] = "0.22.1"
    else:
        kw["use_bias_correction_kl"] = cfg.pop("use_bias_correction_kl")
        kw["entropy_coef"] = cfg.pop("entropy_coef")
        kw["off_policy_mask_threshold"] = cfg.pop("off_policy_mask_threshold")
        if kw["off_policy_mask_threshold"] is not None:
            kw["sampling_per_token_logps"] = c["sampling"][rows]
        use_vllm, is_mode = cfg.pop("use_vllm"), cfg.pop("is_mode")
        if use_vllm and is_from_sampling:
            kw["sampling_per_token_logps"] = c["sampling"][rows]
            kw["vllm_importance_sampling_mode"] = _IS_MODE[is_mode]
        elif use_vllm:
            kw["importance_sampling_ratio"] = c[_IS_RATIO[is_mode]][rows]
    assert not cfg, f"unhandled config keys {cfg}"
    return kw


def _check_loss_case(version, case, **opts):
    v, c = vectors(), common()
    p = f"{version}/grpo/{case}/"
    fields = {k[len(p) :] for k in v if k.startswith(p)}
    total = 0.0
    for i, rows in enumerate(MICRO_BATCHES):
        mb = f"{p}mb{i}/"
        kw = _loss_kwargs(version, case, rows, **opts)

        def objective(lp, rows=rows, kw=kw):
            return L.grpo_loss(lp, c["mask"][rows], c["advantages_used_for_loss"][rows], **kw)

        (loss, metrics), grad = jax.value_and_grad(objective, has_aux=True)(jnp.asarray(c["logps"][rows]))
        _close(loss, v[mb + "loss"], err_msg=mb + "loss")
        m = c["mask"][rows].astype(bool)
        _close(np.asarray(grad)[m], v[mb + "grad_per_token_logps"][m], err_msg=mb + "grad")
        names = {k[len(mb + "metric/") :] for k in v if k.startswith(mb + "metric/")}
        assert set(metrics) == {n.replace("|", "/") for n in names}
        for name in names:
            _close(metrics[name.replace("|", "/")], v[mb + "metric/" + name][0], err_msg=mb + name)
        assert fields >= {f"mb{i}/loss", f"mb{i}/grad_per_token_logps"}
        total += float(loss)
    assert {f for f in fields if not f.startswith(("mb0/", "mb1/"))} == {"loss_sum_over_grad_accum"}
    _close(total, v[p + "loss_sum_over_grad_accum"])


@pytest.mark.parametrize("case", V116_GRPO)
def test_v116_grpo_loss_grad_metrics(case):
    _check_loss_case("v116", case)


@pytest.mark.parametrize("case", [c for c in V116_GRPO if "vllm_is" in c])
def test_v116_grpo_is_ratio_computed_in_the_loss(case):
    """The same cases with the ratio computed inside grpo_loss from the sampling log-probs."""
    _check_loss_case("v116", case, is_from_sampling=True)


@pytest.mark.parametrize("case", V0221_GRPO)
def test_v0221_grpo_loss_grad_metrics(case):
    """0.22.1 through compat="0.22.1": KL gradient = ∇k3 only, dapo / (N/P), clip min/max of rank means."""
    _check_loss_case("v0221", case)


def test_dapo_micro_batch_losses_sum_to_the_token_mean_of_the_generation_batch():
    """steps_per_generation == GA: Σ_micro-batches L_dapo = Σ_{all tokens} L / N_gen, i.e. the loss of the
    whole generation batch as one micro-batch (GA = 1)."""
    c = common()
    kw = dict(old_per_token_logps=c["old"], num_items_in_batch=int(c["mask"].sum()), entropies=c["ent"])
    whole, _ = L.grpo_loss(c["logps"], c["mask"], c["advantages_used_for_loss"], **kw)
    parts = [
        L.grpo_loss(
            c["logps"][r],
            c["mask"][r],
            c["advantages_used_for_loss"][r],
            **{**kw, "old_per_token_logps": c["old"][r], "entropies": c["ent"][r]},
            gradient_accumulation_steps=GA,
            steps_per_generation=GA,
        )[0]
        for r in MICRO_BATCHES
    ]
    _close(sum(float(x) for x in parts), whole)
    _close(whole, vectors()["v116/grpo/dapo/loss_sum_over_grad_accum"])
    # One micro-batch per generation (steps_per_generation = 1 < GA = 2): each is a token mean, halved.
    half, _ = L.grpo_loss(
        c["logps"], c["mask"], c["advantages_used_for_loss"], **kw, gradient_accumulation_steps=2
    )
    _close(half, float(whole) / 2)


# ---------------------------------------------------------------------------------------------------------
# Advantages and reward metrics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V116_ADV)
def test_v116_advantage_replicas(case):
    v = vectors()
    agg, scale, _ = case.split("/")
    weights = ast.literal_eval(
        re.search(r"reward_weights=(\[.*?\])", _readme(f"v116/grpo_adv_replica/{case}")).group(1)
    )
    kw = dict(num_generations=G, reward_weights=weights, scale_rewards=scale, multi_objective_aggregation=agg)
    rewards = common()["rewards_per_func"]
    _close(L.grpo_advantages(rewards, **kw), v[f"v116/grpo_adv_replica/{case}/advantages"])
    frac = L.grpo_reward_metrics(rewards, **kw)["frac_reward_zero_std"]
    _close(frac, v[f"v116/grpo_adv_replica/{case}/is_std_zero"].mean())
    if scale in ("group", "none"):  # GRPOConfig's boolean spellings
        _close(
            L.grpo_advantages(rewards, **{**kw, "scale_rewards": scale == "group"}),
            v[f"v116/grpo_adv_replica/{case}/advantages"],
        )


@pytest.mark.parametrize("case", V0221_ADV)
def test_v0221_advantage_replicas_inverted_scaling(case):
    scale, weights = case.split("/")
    assert weights == "w11"
    adv = L.grpo_advantages(
        common()["rewards_per_func"], num_generations=G, scale_rewards=scale, compat="0.22.1"
    )
    _close(adv, vectors()[f"v0221/grpo_adv_replica/{case}/advantages"])


def test_advantage_scaling_is_trl_116_by_default():
    """1.16 "group" == 0.22.1 "none" (the bug swapped them); 1.16 "none" == 0.22.1 "group"."""
    r = common()["rewards_per_func"]
    for new, old in (("group", "none"), ("none", "group")):
        _close(
            L.grpo_advantages(r, num_generations=G, scale_rewards=new),
            L.grpo_advantages(r, num_generations=G, scale_rewards=old, compat="0.22.1"),
        )


def test_unscorable_rows_and_zero_std_groups():
    """A row with every reward None gets advantage 0 and leaves its group's mean and std; a constant group
    has advantage 0 and counts in frac_reward_zero_std."""
    nan = np.nan
    r = np.array(
        [[1.0, nan], [0.0, 2.0], [nan, nan], [1.0, 1.0], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]],
        np.float32,
    )
    adv = np.asarray(L.grpo_advantages(r, num_generations=G))
    scored = np.array([1.0, 2.0, 2.0])  # weighted sums of rows 0, 1, 3
    expected = (scored - scored.mean()) / (scored.std(ddof=1) + 1e-4)
    _close(adv[[0, 1, 3]], expected)
    assert adv[2] == 0.0
    _close(adv[4:], np.zeros(4))
    m = L.grpo_reward_metrics(r, num_generations=G, names=["acc", "fmt"])
    _close(m["frac_reward_zero_std"], 0.5)
    _close(m["rewards/acc/mean"], np.nanmean(r[:, 0]))
    _close(m["rewards/fmt/std"], np.nanstd(r[:, 1], ddof=1))
    sums = np.array([1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    _close(m["reward"], sums.mean())
    _close(m["reward_std"], sums.std(ddof=1))


def test_zero_std_is_torch_isclose_to_zero():
    """A group whose rewards differ by 1e-3 is not a zero-std group (isclose atol 1e-8)."""
    r = np.array([[0.5], [0.501], [0.5], [0.5], [1.0], [1.0], [1.0], [1.0]], np.float32)
    _close(L.grpo_reward_metrics(r, num_generations=G)["frac_reward_zero_std"], 0.5)


def test_v0221_reward_metrics():
    """0.22.1 logged reward = mean of the group means, reward_std = mean of the std it normalised with."""
    r = common()["rewards_per_func"]
    sums = np.nansum(r, axis=1)
    m = L.grpo_reward_metrics(r, num_generations=G, scale_rewards="none", compat="0.22.1")
    _close(m["reward"], sums.mean())
    _close(m["reward_std"], sums.reshape(-1, G).std(axis=1, ddof=1).mean())
    m = L.grpo_reward_metrics(r, num_generations=G, compat="0.22.1")  # "group": the batch std
    _close(m["reward_std"], sums.std(ddof=1))


def test_reward_metrics_on_the_common_rewards():
    r = common()["rewards_per_func"]
    m = L.grpo_reward_metrics(r, num_generations=G, reward_weights=[1.0, 0.5])
    weighted = np.nansum(r * np.array([1.0, 0.5], np.float32), axis=1)
    expected = {
        "rewards/0/mean": np.nanmean(r[:, 0]),
        "rewards/0/std": np.nanstd(r[:, 0], ddof=1),
        "rewards/1/mean": np.nanmean(r[:, 1]),
        "rewards/1/std": np.nanstd(r[:, 1], ddof=1),
        "reward": weighted.mean(),
        "reward_std": weighted.std(ddof=1),
        "frac_reward_zero_std": 0.0,
    }
    assert set(m) == set(expected)
    for k, x in expected.items():
        _close(m[k], x, err_msg=k)


# ---------------------------------------------------------------------------------------------------------
# Sampling-engine importance sampling ratio
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V116_IS)
def test_v116_importance_sampling_replicas(case):
    level, kind, lo, hi = re.fullmatch(r"(token|sequence)_(truncate|mask)_min(.+)_max(.+)", case).groups()
    c = common()
    ratio, _ = L.sampling_importance_ratio(
        c["old"],
        c["sampling_with_nan"],
        c["mask"],
        mode=f"{level}_{kind}",
        clip_min=None if lo == "None" else float(lo),
        clip_max=None if hi == "None" else float(hi),
    )
    _close(ratio, vectors()[f"v116/grpo_vllm_is_replica/{case}/ratio"])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_common_importance_sampling_ratios_and_metrics(level):
    """common/grpo/is_ratio_* (the ratios the loss cases use) and TRL's sampling/* metric definitions."""
    c = common()
    ratio, metrics = L.sampling_importance_ratio(c["old"], c["sampling"], c["mask"], mode=_IS_MODE[level])
    _close(ratio, c[_IS_RATIO[level]])
    m = c["mask"].astype(bool)
    diff = np.abs(c["old"] - c["sampling"])[m]
    flat = np.asarray(ratio).reshape(-1) if level == "sequence" else np.asarray(ratio)[m]
    expected = {
        "sampling/sampling_logp_difference/mean": diff.mean(),
        "sampling/sampling_logp_difference/max": diff.max(),
        "sampling/importance_sampling_ratio/min": flat.min(),
        "sampling/importance_sampling_ratio/mean": flat.mean(),
        "sampling/importance_sampling_ratio/max": flat.max(),
    }
    assert set(metrics) == set(expected)
    for k, x in expected.items():
        _close(metrics[k], x, err_msg=k)
    _, empty = L.sampling_importance_ratio(
        c["old"], c["sampling"], np.zeros_like(c["mask"]), mode="token_mask"
    )
    assert all(float(x) == 0.0 for x in empty.values())


def test_token_mask_zeroes_out_of_band_ratios():
    old = np.zeros((1, 4), np.float32)
    sampling = np.log(np.array([[1.0, 4.0, 0.25, 1.0]], np.float32))  # ratios 1, 1/4, 4, 1
    ratio, _ = L.sampling_importance_ratio(
        old, sampling, np.ones((1, 4)), mode="token_mask", clip_min=0.5, clip_max=2.0
    )
    _close(ratio, [[1.0, 0.0, 0.0, 1.0]])
    ratio, _ = L.sampling_importance_ratio(
        old, sampling, np.ones((1, 4)), mode="token_truncate", clip_min=0.5
    )
    _close(ratio, [[1.0, 0.5, 3.0, 1.0]])


# ---------------------------------------------------------------------------------------------------------
# Masked quantile, jit, argument checks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_valid", [0, 1, 2, 7, 20])
@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_masked_quantile_matches_linear_interpolation(n_valid, q):
    rng = np.random.default_rng(n_valid)
    x = rng.random((4, 5)).astype(np.float32)
    mask = np.zeros(20, bool)
    mask[rng.permutation(20)[:n_valid]] = True
    mask = mask.reshape(4, 5)
    got = jax.jit(R.masked_quantile)(x, mask, q)
    if n_valid == 0:
        assert np.isinf(got)
    else:
        _close(got, np.quantile(x[mask], q))


def test_grpo_loss_and_advantages_jit_with_static_keywords():
    c = common()
    rows = MICRO_BATCHES[1]
    arrays = dict(
        old_per_token_logps=c["old"][rows],
        ref_per_token_logps=c["ref"][rows],
        entropies=c["ent"][rows],
        sampling_per_token_logps=c["sampling"][rows],
        num_items_in_batch=np.int32(c["mask"].sum()),
    )
    static = dict(
        loss_type="dapo",
        beta=0.04,
        top_entropy_quantile=0.5,
        off_policy_mask_threshold=0.01,
        vllm_importance_sampling_mode="token_truncate",
        entropy_coef=0.01,
        gradient_accumulation_steps=GA,
        steps_per_generation=GA,
    )
    eager = L.grpo_loss(
        c["logps"][rows], c["mask"][rows], c["advantages_used_for_loss"][rows], **arrays, **static
    )
    jitted = jax.jit(functools.partial(L.grpo_loss, **static))(
        c["logps"][rows], c["mask"][rows], c["advantages_used_for_loss"][rows], **arrays
    )
    jax.tree.map(_close, jitted, eager)
    adv = jax.jit(
        L.grpo_advantages, static_argnames=("num_generations", "scale_rewards", "multi_objective_aggregation")
    )
    _close(
        adv(c["rewards_per_func"], num_generations=G, scale_rewards="batch"),
        L.grpo_advantages(c["rewards_per_func"], num_generations=G, scale_rewards="batch"),
    )


def test_grpo_loss_rejects_unsupported_configurations():
    c = common()
    args = (c["logps"][:6], c["mask"][:6], c["advantages_used_for_loss"][:6])
    bad = [
        dict(loss_type="ppo", num_items_in_batch=1),
        dict(loss_type="dapo"),  # num_items_in_batch missing
        dict(loss_type="dr_grpo"),  # max_completion_length missing
        dict(loss_type="grpo", beta=0.1),  # ref_per_token_logps missing
        dict(loss_type="grpo", top_entropy_quantile=0.5),  # entropies missing
        dict(loss_type="cispo", num_items_in_batch=1, compat="0.22.1"),
        dict(loss_type="grpo", compat="0.21"),
        dict(loss_type="grpo", importance_sampling_level="segment"),
        dict(loss_type="grpo", vllm_importance_sampling_mode="token_truncate"),  # sampling log-probs missing
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            L.grpo_loss(*args, **kw)
    with pytest.raises(ValueError):
        L.grpo_advantages(c["rewards_per_func"], num_generations=5)
    with pytest.raises(ValueError):
        L.grpo_advantages(c["rewards_per_func"], num_generations=G, scale_rewards="rank")
    with pytest.raises(ValueError):
        L.grpo_advantages(
            c["rewards_per_func"],
            num_generations=G,
            multi_objective_aggregation="normalize_then_sum",
            compat="0.22.1",
        )
