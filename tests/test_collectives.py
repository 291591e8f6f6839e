"""The fused LM head under FSDP moves its weight, never its logits; and `bench/collectives.py` counts right.

The compiled check runs the real SFT step of a tiny tied-embedding model on 8 fake CPU devices in a
subprocess (the device-count flag only works before jax initialises; this file is also that subprocess's
script) on meshes 1x8x1 (FSDP) and 1x4x2 (FSDP + tensor), and walks the optimised HLO with the bench's
walker. Its loss chunk (16 tokens) is narrower than the model (64): per chunk, the partial logits are then
smaller than the head, and GSPMD left alone contracts the FSDP-split hidden dim and all-reduces every
chunk's logits, forward and in the recomputing backward, which is what the 3B config did
(docs/benchmarks.md, "LM head under FSDP").

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/test_collectives.py 1x8x1
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from multidevice import xla_flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import collectives as C  # noqa: E402  (bench/collectives.py)

MESHES = ("1x8x1", "1x4x2")
CHUNK = 16


def compiled_collectives(mesh: str) -> dict:
    """The subprocess side: compile the step on `mesh` and list its collectives."""
    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.train.plan import step_and_args

    cfg = Qwen25VLConfig.preset("tiny")
    cfg = cfg.replace(
        text=dataclasses.replace(cfg.text, tie_word_embeddings=True),
        # One vision block: the tower is not what this checks, and each block run is its own scan.
        vision=dataclasses.replace(cfg.vision, depth=1, fullatt_block_indexes=(0,)),
    )
    shape = dict(zip(("data", "fsdp", "tensor"), map(int, mesh.split("x")), strict=True))
    config = {
        "kind": "sft", "run_dir": "unused", "mesh": shape, "grad_accum": 1, "chunk_size": CHUNK,
        "batch": {"batch_size": 8, "seq_buckets": [32], "image_patches": 32, "max_images": 2},
        "optim": {"learning_rate": 1e-3},
    }  # fmt: skip
    _, step, args = step_and_args(config, sharded=True, model_cfg=cfg)
    colls, unknown = C.collectives(step.lower(*args).compile().as_text(), 8)
    return {
        "mesh": shape,
        "hidden": cfg.text.hidden_size,
        "vocab": cfg.text.vocab_size,
        "layers": cfg.text.num_hidden_layers,
        "unknown": unknown,
        "collectives": [dataclasses.asdict(c) for c in colls],
    }


def dense_collectives() -> dict:
    """The subprocess side: two `Dense` layers as in the vision tower's blocks (down to the model width,
    then up from it) on replicated rows (every patch on every device), their kernels split over FSDP along
    the model width, compiled on a 1x8x1 mesh: the collectives they need."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwenvl_jax import sharding as shd
    from qwenvl_jax.model.layers import Dense

    mesh = shd.make_mesh(fsdp=8)
    kw = dict(use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    layers = nnx.List([Dense(128, 64, axes=("vision_mlp", "vision_embed"), **kw),
                       Dense(64, 128, axes=("vision_embed", "vision_mlp"), **kw)])  # fmt: skip
    graphdef, params = nnx.split(layers)
    params = jax.device_put(params, shd.param_shardings(params, mesh))
    rows = jax.device_put(jnp.ones((1024, 128)), shd.named_sharding(mesh, shd.DEFAULT_RULES, (None, None)))

    def apply(params, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            down, up = nnx.merge(graphdef, params)
            return up(down(x))

    colls, unknown = C.collectives(jax.jit(apply).lower(params, rows).compile().as_text(), 8)
    return {"dense": sorted((c.op, [list(d) for _, d in c.arrays]) for c in colls), "unknown": unknown}


def vision_block_flops() -> dict:
    """The subprocess side: XLA's FLOPs of one vision block (the step at 2 blocks minus at 1, layers
    unrolled) of the tiny SFT step on one device of a 1x8x1 mesh and on a lone device."""
    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.train.plan import step_and_args

    base = Qwen25VLConfig.preset("tiny")
    config = {
        "kind": "sft", "run_dir": "unused", "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "grad_accum": 1,
        "batch": {"batch_size": 8, "seq_buckets": [64], "image_patches": 512, "max_images": 8},
        "optim": {"learning_rate": 1e-3},
    }  # fmt: skip

    def flops(blocks: int, sharded: bool) -> float:
        vision = dataclasses.replace(base.vision, depth=blocks, fullatt_block_indexes=())
        cfg = base.replace(vision=vision, scan_layers=False)
        _, step, args = step_and_args(config, sharded=sharded, model_cfg=cfg)
        cost = step.lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    return {
        "vision_block": {
            name: flops(2, sharded) - flops(1, sharded) for name, sharded in (("mesh", True), ("one", False))
        }
    }


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-W", "error", __file__, *MESHES],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if "dense" in rec or "vision_block" in rec:
                out["dense" if "dense" in rec else "vision_block"] = rec
                continue
            rec["collectives"] = [
                C.Collective(**{**c, "arrays": tuple((dt, tuple(d)) for dt, d in c["arrays"]),
                                "sliced": tuple(c["sliced"])})
                for c in rec["collectives"]
            ]  # fmt: skip
            out["x".join(str(v) for v in rec["mesh"].values())] = rec
    assert set(out) == {*MESHES, "dense", "vision_block"}, proc.stdout[-3000:]
    return out


@pytest.mark.parametrize("mesh", MESHES)
def test_lm_head_all_reduces_no_logits(compiled, mesh):
    """No all-reduce carries a vocab-sized dim, except the head's own gradient read as this device's
    slice (a reduce-scatter on GPU; XLA:CPU spells it all-reduce + slice), and the head is gathered once."""
    rec = compiled[mesh]
    d, t = rec["hidden"], rec["mesh"]["tensor"]
    v = rec["vocab"] // t
    assert not rec["unknown"]
    vocab_arrays = [
        (c, dims, c.sliced[i] if c.sliced else False)
        for c in rec["collectives"]
        for i, (_, dims) in enumerate(c.arrays)
        if v in dims or rec["vocab"] in dims
    ]
    for c, dims, sliced in vocab_arrays:
        if c.op == "all-reduce":
            assert sliced and dims == (d, v), (c.op, dims, c.source)
    gathers = [(c, dims) for c, dims, _ in vocab_arrays if c.op == "all-gather"]
    assert [(dims, c.count) for c, dims in gathers] == [((d, v), 1)], [(c.shape, c.count) for c, _ in gathers]
    # The walker multiplies the layer scan's collectives by its trip count.
    assert any(c.op == "all-gather" and c.count == rec["layers"] for c in rec["collectives"])


def test_fsdp_kernel_is_gathered_at_use_not_its_activations_all_reduced(compiled):
    """A kernel split over FSDP is all-gathered whole before its matmul (`sharding.constrain_weight_at_use`),
    as FSDP does: left to GSPMD, a replicated input contracts the split dim and all-reduces the float32
    activations instead (the vision tower's ~48 GB per 3B step, docs/benchmarks.md)."""
    rec = compiled["dense"]
    assert not rec["unknown"]
    assert rec["dense"] == [["all-gather", [[64, 128]]], ["all-gather", [[128, 64]]]]


def test_vision_work_is_split_over_the_batch_axes(compiled):
    """Each device encodes its share of the patch rows: a vision block costs one device of a 1x8x1 mesh
    about an eighth of its cost on a lone device (it was the whole of it when the tower ran replicated)."""
    flops = compiled["vision_block"]["vision_block"]
    assert flops["mesh"] < 1.2 * flops["one"] / 8, flops


def test_batch_shards_follows_the_activation_rules():
    """The head regroups rows per batch shard: as many as `constrain_activation` splits the rows into."""
    import jax
    from jax.sharding import AbstractMesh, AxisType

    from qwenvl_jax import sharding as shd

    assert shd.batch_shards(8) == 1  # no mesh
    for sizes, rows, shards in (((1, 8, 1), 8, 8), ((1, 8, 1), 4, 1), ((2, 4, 1), 4, 2), ((2, 2, 2), 8, 4)):
        mesh = AbstractMesh(sizes, shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        with jax.sharding.use_abstract_mesh(mesh):
            assert shd.batch_shards(rows) == shards, (sizes, rows)


# ----------------------------------------------------------------------------- the walker, on known text

HLO = """HloModule m, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%slice_mine (p: f32[8,4], i: s32[]) -> f32[1,4] {
  %p = f32[8,4]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %c = bf16[8,4]{1,0} convert(%p)
  %z = s32[] constant(0)
  ROOT %ds = bf16[1,4]{1,0} dynamic-slice(%c, %i, %z), dynamic_slice_sizes={1,4}
}

%inner (t: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %t = (s32[], f32[8,4]{1,0}) parameter(0)
  %n = s32[] get-tuple-element(%t), index=0
  %x = f32[8,4]{1,0} get-tuple-element(%t), index=1
  %ag = f32[8,4]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %ar = (f32[8,4]{1,0}, f32[2]{0}) all-reduce(%ag, %ag), channel_id=2, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %g0 = f32[8,4]{1,0} get-tuple-element(%ar), index=0
  %g1 = f32[2]{0} get-tuple-element(%ar), index=1
  %pid = s32[] partition-id()
  %f = bf16[1,4]{1,0} fusion(%g0, %pid), kind=kLoop, calls=%slice_mine
  %u = f32[2]{0} add(%g1, %g1)
  ROOT %r = (s32[], f32[8,4]{1,0}) tuple(%n, %x)
}

%cond (t: (s32[], f32[8,4])) -> pred[] {
  %t = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%outer (t: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %t = (s32[], f32[8,4]{1,0}) parameter(0)
  %w = (s32[], f32[8,4]{1,0}) while(%t), condition=%cond, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[8,4]{1,0} get-tuple-element(%w), index=1
  %rs = f32[1,4]{1,0} reduce-scatter(%y), channel_id=3, replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={0}, to_apply=%add
  ROOT %o = (s32[], f32[8,4]{1,0}) tuple(%w)
}

ENTRY %main (t: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %t = (s32[], f32[8,4]{1,0}) parameter(0)
  %w = (s32[], f32[8,4]{1,0}) while(%t), condition=%cond, body=%outer, backend_config={"known_trip_count":{"n":"2"}}
  %cp = f32[8,4]{1,0} collective-permute(%t), channel_id=4, source_target_pairs={{0,1}}
  ROOT %o = (s32[], f32[8,4]{1,0}) tuple(%w)
}
"""


def test_walker_counts_loops_groups_and_slices():
    colls, unknown = C.collectives(HLO, num_devices=8)
    assert not unknown
    by_op = {c.op: c for c in colls}
    assert set(by_op) == {"all-gather", "all-reduce", "reduce-scatter", "collective-permute"}
    ag, ar, rs, cp = (by_op[k] for k in ("all-gather", "all-reduce", "reduce-scatter", "collective-permute"))
    assert (ag.count, ar.count, rs.count, cp.count) == (6, 6, 2, 1)  # nested trip counts 2 x 3
    assert (ag.group, ar.group, rs.group, cp.group) == (8, 4, 4, 1)
    assert ag.array_bytes == 128 and ag.wire_bytes == 128 * 7 / 8
    assert rs.array_bytes == 16 * 4  # the array reduced, whole: result x group
    # The (8, 4) result of the all-reduce is read only as this device's slice (through a convert, in a
    # fusion); the (2,) one is used whole.
    assert ar.sliced == (True, False)
    assert ar.wire_bytes == (128 + 8) * 2 * 3 / 4
    assert ar.wire_bytes_gpu == ar.wire_bytes - 128 * 3 / 4
    assert cp.wire_bytes == 128


if __name__ == "__main__":
    for mesh in sys.argv[1:]:
        print(json.dumps(compiled_collectives(mesh)), flush=True)
    print(json.dumps(dense_collectives()), flush=True)
    print(json.dumps(vision_block_flops()), flush=True)
