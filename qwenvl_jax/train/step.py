"""Pure SFT and DPO train steps `(state, frozen, batch, ...) -> (state, metrics)` and their jitted form.

Batches carry a LEADING MICRO-BATCH AXIS on every entry (`stack_micro_batches`): `input_ids (M, B, S)`,
`position_ids (M, 3, B, S)`, `pixel_values (M, P, 1176)`, ... (static shapes, as `collate` makes them).
`accumulate` scans the M micro-batches, summing losses and gradients, and the step applies ONE optimizer
update. The loss is never computed from full logits: `model.hidden_states` then the chunked
`losses.token_logprobs` with `model.lm_head_matrix()`.

Normalisation (rl.md 1.3-1.4): SFT takes `num_items_in_batch` = N, the label-token count of the WHOLE
accumulation window computed on the host (`losses.sft_num_items_in_batch`, summed over hosts); each
micro-batch loss is Σ/N and the gradients are SUMMED (no /M), which gives the token mean over the window
however the tokens are split. DPO (rl.md 2.5) follows TRL: each micro-batch pair mean is divided by M.

Mixed precision: parameters (and optimizer moments) stay in their storage dtype (float32 master); the model
casts them to the compute dtype at use and the token statistics are float32 (see `losses.py`).

Non-finite steps: when the loss or the gradient norm is not finite, the update is SKIPPED: params and
opt_state come back unchanged (so the optimizer's schedule count does not advance), `metrics["skipped"] =
1`, and `state.step` still advances (it counts attempted steps, so data order and logging stay in step with
the loop). An update that overflows by itself is reported as `metrics["params_finite"] = 0` (see
`apply_update` for why it is not undone).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qwenvl_jax import losses
from qwenvl_jax import sharding as shd
from qwenvl_jax.model.qwen2_5_vl import CORE_KEYS
from qwenvl_jax.quant import per_array
from qwenvl_jax.train import lora as lora_lib
from qwenvl_jax.train.optim import map_with_path
from qwenvl_jax.train.state import TrainState

# ------------------------------------------------------------------------------------------ model


def build_model(graphdef, params, frozen, lora_cfg=None, *, dropout_key=None, lora_enabled=True):
    """The model of one step: `nnx.merge(graphdef, trainable, frozen)`, or, with LoRA, the frozen base with
    the adapters attached to its `Dense` layers (`lora.attach`: `x W + scale (x A) B`, so no merged kernel
    exists and no gradient of a frozen kernel is computed); `lora_enabled=False`: the base model, e.g. the
    DPO reference."""
    if lora_cfg is None:
        return nnx.merge(graphdef, params, frozen)
    model = nnx.merge(graphdef, {}, frozen)
    return lora_lib.attach(model, params, lora_cfg, dropout_key=dropout_key) if lora_enabled else model


def token_stats(
    model,
    batch: Mapping[str, jax.Array],
    labels_bs: jax.Array,
    *,
    chunk_size=1024,
    temperature=1.0,
    vision_features=None,
):
    """`losses.token_logprobs` of `model` on `batch` (shifted, `(B, S-1)`), without full logits.
    `vision_features`: the batch's `Qwen25VL.vision_features`, when another pass computed them already."""
    inputs = {k: batch[k] for k in CORE_KEYS if k in batch}
    h_bsd = model.hidden_states(**inputs, vision_features=vision_features)
    return losses.token_logprobs(
        h_bsd, model.lm_head_matrix(), labels_bs, temperature=temperature, chunk_size=chunk_size
    )


# ---------------------------------------------------------------------------------- accumulation


def stack_micro_batches(micro_batches: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Host: stack same-shape micro-batches along a new leading axis (keys present in all of them)."""
    keys = [k for k in micro_batches[0] if micro_batches[0][k] is not None]
    return {k: np.stack([np.asarray(mb[k]) for mb in micro_batches]) for k in keys}


def accumulate(loss_fn: Callable, params: Any, micro_batches: Mapping[str, jax.Array], rng: jax.Array):
    """Σ over the leading micro-batch axis of `value_and_grad(loss_fn, has_aux=True)(params, mb, key)`.

    `lax.scan`, so compile time does not grow with the number of micro-batches; returns
    `(loss_sum, aux_sum, grad_sum)`. Micro-batch `i` gets `fold_in(rng, i)`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    num = jax.tree.leaves(micro_batches)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], micro_batches)
    (loss0, aux0), g0 = jax.eval_shape(grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss0, aux0, g0))

    def body(carry, xs):
        i, mb = xs
        (loss, aux), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, aux, g)), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(num), micro_batches))
    return total


def apply_update(state: TrainState, grads: Any, loss: jax.Array, tx: optax.GradientTransformation, rng):
    """One optimizer update, skipped (params/opt_state unchanged) when the loss or the gradients are not
    finite; `params_finite` reports whether the parameters still are after it.

    Memory: the update runs under `lax.cond`, so XLA writes the new params and moments into the donated
    buffers. Deciding the skip from the update itself would hold the old and the new state side by side,
    three extra param-sized buffers (new mu, new nu, update): a 98 GiB peak instead of 70 GiB for a 3B full
    fine-tune. So an update that overflows on its own (finite gradients, an absurd learning rate) is not
    undone: it is reported, and the loop stops before saving anything from that step.
    """
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    params, opt_state = jax.lax.cond(ok, update, lambda: (state.params, state.opt_state))
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, {
        "grad_norm": grad_norm,
        "skipped": 1 - ok.astype(jnp.int32),
        "params_finite": params_finite.astype(jnp.int32),
    }


def _next_rng(state: TrainState):
    key = jax.random.wrap_key_data(state.rng)
    key, step_key = jax.random.split(key)
    return jax.random.key_data(key), step_key


# ------------------------------------------------------------------------------------------ SFT


def sft_loss_fn(
    graphdef: Any,
    frozen: Any,
    num_items_in_batch: jax.Array,
    *,
    lora_cfg: lora_lib.LoraConfig | None = None,
    loss_type: str = "nll",
    chunk_size: int = 1024,
) -> Callable:
    """`sft_step`'s differentiated function `(params, micro_batch, dropout_key) -> (loss, sums)`: the
    micro-batch loss Σ_tokens -lp / N (nll) or the DFT variant (rl.md 1.3), N = num_items_in_batch, and
    the token sums of its metrics. `accumulate` it for the loss and gradients of a whole step."""

    def loss_fn(params, mb, key):
        model = build_model(graphdef, params, frozen, lora_cfg, dropout_key=key)
        st = token_stats(model, mb, mb["labels"], chunk_size=chunk_size)
        loss = losses.sft_loss(
            st["log_probs"], st["label_mask"], num_items_in_batch=num_items_in_batch, loss_type=loss_type
        )
        m = st["label_mask"]
        aux = {
            "entropy": jnp.sum(st["entropy"] * m),
            "correct": jnp.sum(st["is_top1"] * m),
            "label_tokens": jnp.sum(m),
            "num_tokens": jnp.sum(mb["attention_mask"] > 0).astype(jnp.float32)
            if "attention_mask" in mb
            else jnp.asarray(float(mb["input_ids"].size), jnp.float32),
        }
        return loss, aux

    return loss_fn


def sft_step(
    state: TrainState,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    num_items_in_batch: jax.Array,
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    lora_cfg: lora_lib.LoraConfig | None = None,
    loss_type: str = "nll",
    chunk_size: int = 1024,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SFT optimizer step over the micro-batches of `batch` (needs `labels`, -100 = ignored).

    loss = Σ_micro-batches Σ_tokens -lp / N (nll) or the DFT variant (rl.md 1.3), N = num_items_in_batch.
    Metrics: loss, grad_norm, skipped, entropy and mean_token_accuracy (token means over the window),
    num_tokens (Σ attention_mask), label_tokens (Σ label mask).
    """
    new_rng, step_key = _next_rng(state)
    loss_fn = sft_loss_fn(
        graphdef, frozen, num_items_in_batch, lora_cfg=lora_cfg, loss_type=loss_type, chunk_size=chunk_size
    )
    loss, aux, grads = accumulate(loss_fn, state.params, batch, step_key)
    state, upd = apply_update(state, grads, loss, tx, new_rng)
    n = jnp.maximum(aux["label_tokens"], 1.0)
    metrics = {
        "loss": loss,
        "entropy": aux["entropy"] / n,
        "mean_token_accuracy": aux["correct"] / n,
        "num_tokens": aux["num_tokens"],
        "label_tokens": aux["label_tokens"],
        **upd,
    }
    return state, metrics


# ------------------------------------------------------------------------------------------ DPO


def dpo_loss_fn(
    graphdef: Any,
    frozen: Any,
    ref_params: Any = None,
    *,
    lora_cfg: lora_lib.LoraConfig | None = None,
    chunk_size: int = 1024,
    num_micro_batches: int = 1,
    pair_blocks: int = 1,
    **objective_kw: Any,
) -> Callable:
    """`dpo_step`'s differentiated function `(params, micro_batch, dropout_key) -> (loss, metrics)`:
    `losses.dpo_objective` of one micro-batch divided by `num_micro_batches` (TRL divides by GA for DPO,
    rl.md 2.5), so `accumulate` gives the loss, metrics and gradients of a whole step.

    Reference, in this order: the micro-batch's precomputed `ref_chosen_logps`/`ref_rejected_logps`;
    with LoRA, the base model (adapters disabled, no second copy of weights; the vision tower, frozen and
    without adapters, encodes the images once for both passes); else `ref_params` (a full nested param
    dict for `graphdef`, e.g. the initial policy). The reference pass is not differentiated.
    A micro-batch's `example_mask` (its chosen half) marks the real pairs: the dummy pairs that fill a
    short batch get no weight (`dpo_objective`'s `pair_mask`). `pair_blocks`: the rows are that many
    `[chosen, rejected]` blocks (one per process, `losses.pair_order`), put in the objective's order.
    """

    def labels_of(mb):
        return jnp.where(mb["completion_mask"] > 0, mb["input_ids"], losses.IGNORE_INDEX)

    # With LoRA on the decoder only, the policy and its reference (adapters off) share the frozen vision
    # tower: the images are encoded once for both passes (XLA's CSE merged the two identical forwards
    # already, `bench/compute_at_scale.py dpo --trainable lora`; this makes it a guarantee).
    share_vision = lora_cfg is not None and not any(s.startswith("visual") for s in lora_cfg.scopes)

    def loss_fn(params, mb, key):
        model = build_model(graphdef, params, frozen, lora_cfg, dropout_key=key)
        feats = None
        if share_vision and "ref_chosen_logps" not in mb:
            feats = model.vision_features(**mb)  # reads the vision keys only (`VisionInputs.from_batch`)
        st = token_stats(model, mb, labels_of(mb), chunk_size=chunk_size, vision_features=feats)
        ref_kw = {}
        if "ref_chosen_logps" in mb:
            ref_kw = {
                "ref_chosen_logps": mb["ref_chosen_logps"],
                "ref_rejected_logps": mb["ref_rejected_logps"],
            }
            ref_lp = None
        else:
            if lora_cfg is not None:
                ref_model = build_model(graphdef, params, frozen, lora_cfg, lora_enabled=False)
            elif ref_params is not None:
                ref_model = nnx.merge(graphdef, ref_params)
            else:
                raise ValueError("dpo_step needs a reference: ref_params, LoRA, or precomputed ref log-probs")
            ref_st = token_stats(ref_model, mb, labels_of(mb), chunk_size=chunk_size, vision_features=feats)
            ref_lp = jax.lax.stop_gradient(ref_st["log_probs"])
        rows = mb["input_ids"].shape[0]
        order = losses.pair_order(rows, pair_blocks)

        def ordered(x):  # the objective's [chosen x B, rejected x B] (a static gather; none for one block)
            return x if x is None or pair_blocks == 1 else jnp.take(x, order, axis=0)

        st = {k: ordered(v) if getattr(v, "ndim", 0) and v.shape[0] == rows else v for k, v in st.items()}
        if "example_mask" in mb:
            ref_kw["pair_mask"] = ordered(mb["example_mask"])[: rows // 2]
        loss, metrics = losses.dpo_objective(
            st["log_probs"],
            ordered(ref_lp) if ref_lp is not None else jnp.zeros_like(st["log_probs"]),
            ordered(mb["completion_mask"]),
            policy_log_sum_sq_probs=st["log_sum_sq_probs"],
            token_stats=st,
            attention_mask=ordered(mb.get("attention_mask")),
            **ref_kw,
            **objective_kw,
        )
        return loss / num_micro_batches, jax.tree.map(lambda x: x / num_micro_batches, metrics)

    return loss_fn


def dpo_step(
    state: TrainState,
    frozen: Any,
    batch: Mapping[str, jax.Array],
    ref_params: Any = None,
    *,
    graphdef: Any,
    tx: optax.GradientTransformation,
    lora_cfg: lora_lib.LoraConfig | None = None,
    chunk_size: int = 1024,
    **objective_kw: Any,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One DPO optimizer step; each micro-batch holds the `2B` rows `[chosen x B, rejected x B]`.

    batch: `input_ids`, `attention_mask`, `position_ids`, vision keys, `completion_mask (2B, S)`, and
    optionally `example_mask (2B,)` (0 on the dummy pairs of a short batch) and precomputed
    `ref_chosen_logps`/`ref_rejected_logps (B,)`; the reference is chosen as `dpo_loss_fn` says.
    `objective_kw` goes to `losses.dpo_objective`. Loss = Σ_micro-batches dpo_objective / M (rl.md 2.5).
    """
    new_rng, step_key = _next_rng(state)
    num = jax.tree.leaves(batch)[0].shape[0]
    loss_fn = dpo_loss_fn(
        graphdef,
        frozen,
        ref_params,
        lora_cfg=lora_cfg,
        chunk_size=chunk_size,
        num_micro_batches=num,
        **objective_kw,
    )
    loss, metrics, grads = accumulate(loss_fn, state.params, batch, step_key)
    state, upd = apply_update(state, grads, loss, tx, new_rng)
    return state, {"loss": loss, **metrics, **upd}


# ------------------------------------------------------------------------------------ jit + shardings


def _param_sharding_tree(params, logical_axes, mesh, rules, lora: bool):
    from qwenvl_jax.model.value_head import HEAD_LOGICAL_AXES, SCORE, VALUE

    def one(path, x):
        if path.split("/", 1)[0] == VALUE:  # a PPO value model: laid out like the policy's own leaf
            path = path.split("/", 1)[1]
        if path.split("/", 1)[0] == SCORE:  # a reward model's head: not a Param of the model
            axes = HEAD_LOGICAL_AXES
        else:
            axes = lora_lib.leaf_logical_axes(path, logical_axes, lora=lora)
        return per_array(lambda a, a_axes: NamedSharding(mesh, rules.spec(a_axes, a.shape, mesh)), x, axes)

    return map_with_path(one, params)


def batch_shardings(
    batch: Mapping[str, Any], mesh: Mesh, rules=shd.DEFAULT_RULES
) -> dict[str, NamedSharding]:
    """`shard_batch`'s layout behind the leading micro-batch axis (which is replicated)."""
    rules = shd.as_rules(rules)
    out = {}
    for key, x in batch.items():
        shape = tuple(np.shape(x))
        axes = (None, *shd.batch_axes(key, len(shape) - 1)) if shape else ()
        if key in ("ref_chosen_logps", "ref_rejected_logps"):  # (M, B): B pairs, not 2B rows
            axes = (None,) * len(shape)
        out[key] = NamedSharding(mesh, rules.spec(axes, shape, mesh))
    return out


def state_shardings(state: TrainState, tx, logical_axes, mesh: Mesh, rules=shd.DEFAULT_RULES, *, lora=False):
    """Shardings of a `TrainState`: params by their logical axes (LoRA rank dim replicated), each
    params-shaped optimizer leaf (Adam mu, nu) like its param, scalars (counts, step, rng) replicated."""
    rules = shd.as_rules(rules)
    rep = NamedSharding(mesh, P())
    params_sh = _param_sharding_tree(state.params, logical_axes, mesh, rules, lora)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        state.opt_state,
        params_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(step=rep, params=params_sh, opt_state=opt_sh, rng=rep)


def make_train_step(
    kind: str,
    graphdef: Any,
    tx: optax.GradientTransformation,
    *,
    state: TrainState | None = None,
    frozen: Any = None,
    batch: Mapping[str, Any] | None = None,
    logical_axes: Mapping[str, tuple[str | None, ...]] | None = None,
    mesh: Mesh | None = None,
    rules=shd.DEFAULT_RULES,
    lora_cfg: lora_lib.LoraConfig | None = None,
    with_ref_params: bool = False,
    **step_kw: Any,
) -> Callable:
    """`sft_step` (`kind="sft"`: `(state, frozen, batch, num_items_in_batch)`), `dpo_step` (`"dpo"`:
    `(state, frozen, batch[, ref_params])`), `grpo_step` (`"grpo"`: `(state, frozen, batch,
    num_items_in_batch[, ref_params])`), `reward_step.reward_step` (`"reward"`: `(state, frozen,
    batch)`) or `ppo_step.ppo_step` (`"ppo"`: `(state, frozen, batch)`) jitted once, with the state donated.

    With `mesh`, `state`, `frozen`, `batch` (arrays or ShapeDtypeStructs of the real shapes) and
    `logical_axes` (`state.param_logical_axes(model)`) are needed for the explicit shardings:
    - params, frozen params, ref params and the Adam moments: by each Param's logical axes (FSDP over the
      model width, tensor parallelism over heads/mlp/vocab), so optimizer state is split like params;
    - batch: rows on `batch -> (data, fsdp)`, packed vision inputs and the micro-batch axis replicated;
    - step, rng, optimizer counts, `num_items_in_batch` and every metric: replicated.
    Outputs get the same state shardings, so the donated buffers are reused in place.
    """
    if kind == "sft":
        fn = functools.partial(sft_step, graphdef=graphdef, tx=tx, lora_cfg=lora_cfg, **step_kw)
    elif kind == "dpo":
        fn = functools.partial(dpo_step, graphdef=graphdef, tx=tx, lora_cfg=lora_cfg, **step_kw)
    elif kind == "grpo":
        from qwenvl_jax.train.grpo_step import grpo_step

        fn = functools.partial(grpo_step, graphdef=graphdef, tx=tx, lora_cfg=lora_cfg, **step_kw)
    elif kind == "reward":
        from qwenvl_jax.train.reward_step import reward_step

        fn = functools.partial(reward_step, graphdef=graphdef, tx=tx, lora_cfg=lora_cfg, **step_kw)
    elif kind == "ppo":
        from qwenvl_jax.train.ppo_step import ppo_step

        fn = functools.partial(ppo_step, graphdef=graphdef, tx=tx, lora_cfg=lora_cfg, **step_kw)
    else:
        raise ValueError(f"kind must be 'sft', 'dpo', 'grpo', 'reward' or 'ppo', got {kind!r}")
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    if state is None or frozen is None or batch is None or logical_axes is None:
        raise ValueError("a sharded step needs state, frozen, batch and logical_axes")
    rules = shd.as_rules(rules)
    rep = NamedSharding(mesh, P())
    unmeshed = fn

    def fn(*args):  # traced under the mesh, so the model's activation hints apply
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return unmeshed(*args)

    state_sh = state_shardings(state, tx, logical_axes, mesh, rules, lora=lora_cfg is not None)
    frozen_sh = _param_sharding_tree(frozen, logical_axes, mesh, rules, False)
    batch_sh = batch_shardings(batch, mesh, rules)
    if kind in ("dpo", "reward", "ppo"):
        in_sh = (state_sh, frozen_sh, batch_sh)
    else:  # sft and grpo take the host's token count (num_items_in_batch)
        in_sh = (state_sh, frozen_sh, batch_sh, rep)
    if kind in ("dpo", "grpo") and with_ref_params:
        ref_sh = _param_sharding_tree(
            nnx_full_params_like(frozen, state, lora_cfg), logical_axes, mesh, rules, False
        )
        in_sh = (*in_sh, ref_sh)
    return jax.jit(fn, in_shardings=in_sh, out_shardings=(state_sh, rep), donate_argnums=0)


def nnx_full_params_like(frozen, state, lora_cfg):
    """The structure of a full reference param dict: trainable + frozen merged (non-LoRA modes)."""
    if lora_cfg is not None:
        return frozen
    return lora_lib.unflatten({**lora_lib.flatten(state.params), **lora_lib.flatten(frozen)})
