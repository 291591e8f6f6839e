"""Multi-device sharding checks on 8 fake CPU devices, run in a fresh process by test_sharding_multidevice.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_checks.py [CHECK ...]

XLA reads the flag once, when jax first initialises, and the pytest process has already initialised jax,
hence the subprocess. Each check prints `PASS <name>` or `FAIL <name>: <reason>`; the exit status is 1
if any failed.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwenvl_jax import loading
from qwenvl_jax import sharding as shd
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model import Qwen25VL
from qwenvl_jax.model.qwen2_5_vl import host_inputs

MESHES = ((8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2), (2, 1, 4))
ATOL = 1e-5  # float32, highest precision: only the reduction order changes across layouts
BATCH, SEQ = 8, 24  # 8 rows: divisible by data * fsdp of every mesh above


def same_spec(a: P, b: P) -> bool:
    """Equal up to trailing None entries (jax drops them from the specs of jit outputs)."""

    def strip(spec):
        spec = list(spec)
        while spec and spec[-1] is None:
            spec.pop()
        return tuple(spec)

    return strip(a) == strip(b)


def tiny_config(tied: bool) -> Qwen25VLConfig:
    cfg = Qwen25VLConfig.preset("tiny").replace(dtype="float32", param_dtype="float32")
    return cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))


def raw_batch(cfg: Qwen25VLConfig) -> dict[str, np.ndarray]:
    """8 left-padded rows of random text; rows 1 and 6 hold an image (grid 1x4x4 -> 4 placeholder tokens)
    and row 6 a second one (1x4x8 -> 8 tokens), so the vision tower and the scatter run under sharding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 320, (BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int32)
    for row, pad in ((0, 5), (3, 9), (6, 2)):
        mask[row, :pad] = 0
    ids[1, 4:8] = cfg.image_token_id
    ids[6, 3:7] = cfg.image_token_id
    ids[6, 10:18] = cfg.image_token_id
    grids = np.array([[1, 4, 4], [1, 4, 4], [1, 4, 8]], np.int64)
    pixels = rng.normal(size=(int(grids.prod(-1).sum()), 1176)).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": grids}


def random_model(cfg: Qwen25VLConfig) -> Qwen25VL:
    """The tiny model with random weights, filled from numpy (eager nnx init costs seconds on 8 devices)."""
    return loading.random_model(cfg, seed=3)


@functools.cache
def reference(tied: bool):
    """(device model, host-array copy, collated batch, single-device logits)."""
    cfg = tiny_config(tied)
    model = random_model(cfg)
    batch = host_inputs(cfg, **raw_batch(cfg))
    ref = np.asarray(model(**batch))
    assert ref.shape == (BATCH, SEQ, cfg.text.vocab_size), ref.shape
    assert np.abs(ref).max() > 0.1  # not a degenerate all-zero comparison
    host = nnx.clone(model)
    nnx.update(host, jax.tree.map(np.asarray, nnx.state(host, nnx.Param)))
    return model, host, batch, ref


def check_parity(tied: bool, mesh_shape: tuple[int, int, int], from_device: bool):
    """shard_model + shard_batch on `mesh_shape`: params split as the rules say, logits = single device.

    `from_device` shards the device-resident model (the `load` path: a reshard per array, ~0.2 s of
    compile each on CPU); otherwise its host copy (plain transfers), which keeps the suite fast.
    """
    data, fsdp, tensor = mesh_shape
    model, host, batch, ref = reference(tied)
    mesh = shd.make_mesh(data, fsdp, tensor)
    m = shd.shard_model(nnx.clone(model if from_device else host), mesh)
    # Params really are split: spec from the rules, and each device holds only its block.
    w = m.text.layers.mlp.gate_proj.kernel[...]  # (L, D, F): ("layers", "embed", "mlp")
    assert w.sharding.spec == P(None, "fsdp", "tensor"), w.sharding.spec
    assert len(w.addressable_shards) == 8
    assert {s.data.shape for s in w.addressable_shards} == {(2, 64 // fsdp, 128 // tensor)}
    assert len({str(s.index) for s in w.addressable_shards}) == fsdp * tensor
    emb = m.text.embed_tokens.embedding[...]  # (V, D): ("vocab", "embed")
    assert emb.sharding.spec == P("tensor", "fsdp"), emb.sharding.spec
    assert {s.data.shape for s in emb.addressable_shards} == {(384 // tensor, 64 // fsdp)}
    qkv = m.visual.blocks.attn.qkv.kernel[...]  # (L, 32, 96): ("layers", "vision_embed", "vision_qkv")
    assert {s.data.shape for s in qkv.addressable_shards} == {(4, 32 // fsdp, 96 // tensor)}
    kv = m.text.layers.self_attn.k_proj.bias[...]  # (L, 32): ("layers", "kv_heads")
    assert kv.sharding.spec == P(None, "tensor"), kv.sharding.spec
    if not tied:
        head = m.lm_head.kernel[...]
        assert head.sharding.spec == P("fsdp", "tensor"), head.sharding.spec
    # The batch is split over data x fsdp (position_ids on its axis 1), vision inputs replicated.
    sharded = shd.shard_batch(batch, mesh)
    ids = sharded["input_ids"]
    assert {s.data.shape for s in ids.addressable_shards} == {(BATCH // (data * fsdp), SEQ)}
    assert sharded["position_ids"].sharding.spec == P(None, ("data", "fsdp"), None)
    assert sharded["pixel_values"].sharding.is_fully_replicated
    got = np.asarray(m(**sharded))
    diff = float(np.abs(got - ref).max())
    assert diff <= ATOL, f"mesh {mesh_shape}: max |diff| {diff}"
    # shard_model works in place: the clone moved, the original did not.
    assert len(model.text.layers.mlp.gate_proj.kernel[...].devices()) == 1
    return f"max |diff| {diff:.1e}"


def check_constrain_changes_sharding():
    mesh = shd.make_mesh(2, 2, 2)
    x = jax.device_put(jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16), NamedSharding(mesh, P()))

    plain = jax.jit(lambda a: a * 2)(x)
    assert plain.sharding.is_fully_replicated, plain.sharding
    y = jax.jit(lambda a: shd.constrain(a * 2, ("batch", "mlp"), mesh))(x)
    assert y.sharding.spec == P(("data", "fsdp"), "tensor"), y.sharding.spec
    assert {s.data.shape for s in y.addressable_shards} == {(2, 8)}
    np.testing.assert_array_equal(np.asarray(y), np.asarray(plain))
    # mesh=None takes the mesh set with jax.set_mesh, inside jit.
    with jax.set_mesh(mesh):
        z = jax.jit(lambda a: shd.constrain(a * 2, ("batch", None)))(x)
    assert same_spec(z.sharding.spec, P(("data", "fsdp"), None)), z.sharding.spec
    # ... and with none set it refuses instead of doing nothing.
    try:
        jax.jit(lambda a: shd.constrain(a, ("batch", None)))(x)
    except ValueError as e:
        assert "no mesh" in str(e), e
    else:
        raise AssertionError("constrain without a mesh did not raise")


def check_errors_on_mesh():
    mesh = shd.make_mesh(2, 2, 2)
    for axes, needle in (
        (("batch", "embed"), "collision"),
        (("batch", "channels"), "not in the sharding rules"),
    ):
        try:
            shd.named_sharding(mesh, shd.DEFAULT_RULES, axes)
        except ValueError as e:
            assert needle in str(e), e
        else:
            raise AssertionError(f"{axes} did not raise")
    try:
        shd.make_mesh(2, 2, 1)
    except ValueError as e:
        assert "4 devices" in str(e) and "8" in str(e), e
    else:
        raise AssertionError("make_mesh with the wrong device count did not raise")
    assert shd.make_mesh(2, 2, 1, devices=jax.devices()[:4]).devices.size == 4


def check_divisibility_policy():
    mesh = shd.make_mesh(2, 4, 1)
    batch = {"input_ids": np.zeros((6, 4), np.int32)}  # 6 rows: divisible by data=2, not by data x fsdp=8
    try:
        shd.shard_batch(batch, mesh)
    except ValueError as e:
        assert "input_ids" in str(e) and "not divisible" in str(e), e
    else:
        raise AssertionError("indivisible batch did not raise")
    lenient = shd.ShardingRules(shd.DEFAULT_RULES, indivisible="replicate")
    out = shd.shard_batch(batch, mesh, lenient)["input_ids"]
    assert out.sharding.spec == P("data", None), out.sharding.spec  # fsdp dropped, data kept
    assert {s.data.shape for s in out.addressable_shards} == {(3, 4)}
    resolved = lenient.resolve(("batch", None), (6, 4), mesh)
    assert [(d.logical, d.kept) for d in resolved.dropped] == [("batch", ("data",))], resolved
    # A parameter that does not divide (20 vocab rows on tensor=8): strict rules raise, lenient ones
    # replicate that dim, keep fsdp on the other, and record the drop in the plan.
    mesh_t = shd.make_mesh(1, 1, 8)
    odd = nnx.Param(jnp.zeros((20, 64)), logical_axes=("vocab", "embed"))
    state = nnx.State({"table": odd})
    try:
        shd.param_shardings(state, mesh_t)
    except ValueError as e:
        assert "not divisible" in str(e), e
    else:
        raise AssertionError("indivisible param did not raise")
    plan = shd.sharding_plan(state, mesh_t, lenient)
    assert plan["table"].spec == P(None, "fsdp") and plan["table"].dropped[0].mesh_axes == ("tensor",)
    sh = shd.param_shardings(state, mesh_t, lenient)
    placed = jax.device_put(state, sh)
    assert placed["table"][...].sharding.is_fully_replicated


def check_generation_on_mesh():
    """Rollouts on the training mesh: the sharded model, batch and KV cache give the single-device tokens
    and log-probs (greedy and sampled with n > 1), and the model's params stay where they are."""
    from qwenvl_jax.generation import generate

    model, host, _, _ = reference(False)
    raw = raw_batch(tiny_config(False))
    mesh = shd.make_mesh(2, 1, 4)
    sharded = shd.shard_model(nnx.clone(host), mesh)
    before = sharded.text.layers.mlp.gate_proj.kernel[...].sharding
    notes = []
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "n": 2, "seed": 5}):
        ref = generate(model, raw, max_new_tokens=6, stop_token_ids=(), **kw)
        got = generate(sharded, raw, max_new_tokens=6, stop_token_ids=(), mesh=mesh, **kw)
        assert np.array_equal(np.asarray(got.tokens), np.asarray(ref.tokens)), (kw, got.tokens, ref.tokens)
        diff = float(np.abs(np.asarray(got.logprobs) - np.asarray(ref.logprobs)).max())
        assert diff <= 1e-4, (kw, diff)
        notes.append(f"{kw.get('n', 1)}x{BATCH} rows lp diff {diff:.1e}")
    assert sharded.text.layers.mlp.gate_proj.kernel[...].sharding == before  # no parameter copy or move
    return "; ".join(notes)


def check_splash_on_mesh():
    """The splash kernel (Pallas interpreter) inside a sharded step: a shard_map per device over its rows
    and kv heads gives `attention`'s xla numbers and gradients, for packed causal rows and for plain
    rows; a kv-head count that `tensor` does not divide is gathered and stays exact."""
    from qwenvl_jax.model.attention import attention

    rng = np.random.default_rng(0)
    mesh = shd.make_mesh(2, 2, 2)
    notes = []
    for kv_heads, packed in ((2, True), (1, False)):
        b, t, n, h = 4, 256, 4, 32
        q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h)), jnp.float32) for m in (n, kv_heads, kv_heads))
        seg = (
            jnp.asarray(np.repeat([[1] * 100 + [2] * 120 + [0] * 36], b, axis=0), jnp.int32)
            if packed
            else None
        )
        kw = dict(q_segment_ids=seg, kv_segment_ids=seg, causal=packed, scale=h**-0.5)

        def loss(q, k, v, backend, kw=kw):
            out = attention(q, k, v, backend=backend, **kw)
            return jnp.sum(out * jnp.cos(out)), out

        (_, want), want_g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "xla")
        row = NamedSharding(mesh, P(("data", "fsdp")))
        placed = [jax.device_put(x, row) for x in (q, k, v)]
        step = jax.jit(jax.value_and_grad(functools.partial(loss, backend="splash_interpret"),
                                          argnums=(0, 1, 2), has_aux=True))  # fmt: skip
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            text = step.lower(*placed).as_text()
            (_, got), got_g = step(*placed)
        assert "shard_map" in text or "sdy.manual_computation" in text, "no shard_map in the program"
        diff = max(float(jnp.abs(got - want).max()),
                   *(float(jnp.abs(a - w).max()) for a, w in zip(got_g, want_g, strict=True)))  # fmt: skip
        assert diff <= 2e-5, (kv_heads, packed, diff)
        notes.append(f"kv_heads {kv_heads} {'packed causal' if packed else 'plain'}: {diff:.1e}")
    return "; ".join(notes)


CHECKS = {
    **{
        f"parity_{'tied' if tied else 'untied'}_{'x'.join(map(str, ms))}": functools.partial(
            check_parity, tied, ms, from_device=(ms == (2, 2, 2))
        )
        for tied, meshes in ((False, MESHES), (True, ((1, 4, 2),)))
        for ms in meshes
    },
    "constrain_changes_sharding": check_constrain_changes_sharding,
    "errors_on_mesh": check_errors_on_mesh,
    "divisibility_policy": check_divisibility_policy,
    "generation_on_mesh": check_generation_on_mesh,
    "splash_on_mesh": check_splash_on_mesh,
}


def main(names: list[str]) -> int:
    if jax.device_count() != 8:
        print(f"FAIL setup: expected 8 devices, got {jax.device_count()} (set XLA_FLAGS)")
        return 1
    jax.config.update("jax_default_matmul_precision", "highest")
    failed = 0
    for name in names or list(CHECKS):
        t0 = time.perf_counter()
        try:
            note = CHECKS[name]()
        except Exception as e:  # report every check, not just the first failure
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)
        else:
            print(f"PASS {name} ({time.perf_counter() - t0:.1f}s{'; ' + note if note else ''})")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
