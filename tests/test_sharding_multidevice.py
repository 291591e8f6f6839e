"""Sharding rules and helpers (`qwenvl_jax.sharding`).

In-process tests check the rules table and its error cases (abstract meshes need no devices). The
multi-device tests run `tests/multidevice_checks.py` in subprocesses on 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8` only works before jax initialises, and this pytest
process has initialised it): two processes at once, each check reported as one test here.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from multidevice import assert_passed, run_check_groups

from qwenvl_jax import loading
from qwenvl_jax import sharding as shd
from qwenvl_jax.config import Qwen25VLConfig

SCRIPT = Path(__file__).with_name("multidevice_checks.py")
# Two balanced groups (~20 s each on 2 CPU cores); each process compiles the tiny model per mesh.
GROUPS = (
    ("parity_untied_8x1x1", "parity_untied_1x8x1", "parity_untied_1x4x2", "parity_untied_2x2x2"),
    (
        "parity_untied_2x1x4",
        "parity_tied_1x4x2",
        "constrain_changes_sharding",
        "errors_on_mesh",
        "divisibility_policy",
        "generation_on_mesh",
        "splash_on_mesh",
    ),
)
ALL_CHECKS = [name for group in GROUPS for name in group]


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ------------------------------------------------------------------------------ rules, in-process


def test_default_rules_map_model_names():
    rules = shd.ShardingRules()
    assert rules.spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    assert rules.spec(("layers", "heads", "embed")) == P(None, "tensor", "fsdp")
    assert rules.spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert rules.spec(("layers", "kv_heads")) == P(None, "tensor")
    assert rules.spec(("vision_patch", "vision_embed")) == P(None, "fsdp")
    assert rules.spec(("merger", "vision_mlp")) == P("fsdp", "tensor")
    assert rules.spec(("batch", "seq", None)) == P(("data", "fsdp"), None, None)
    assert rules.spec(("batch", "seq", "heads", "head_dim")) == P(("data", "fsdp"), None, "tensor", None)
    # A table given as a plain tuple is accepted wherever rules are.
    assert shd.as_rules(shd.DEFAULT_RULES) == rules


@pytest.mark.parametrize("preset", ["tiny", "3B"])
def test_every_model_param_resolves(preset):
    """Every Param of the model has logical axes the table knows, without collisions (abstract, no
    allocation), and the model-width dim of every matrix is on fsdp."""
    model = loading.abstract_model(Qwen25VLConfig.preset(preset))
    plan = shd.sharding_plan(model, abstract_mesh(1, 1, 1))
    assert len(plan) >= 30
    assert plan["text/layers/mlp/down_proj/kernel"].spec == P(None, "tensor", "fsdp")
    assert plan["visual/blocks/attn/qkv/kernel"].spec == P(None, "fsdp", "tensor")
    assert not any(r.dropped for r in plan.values())


def test_unknown_logical_name_raises():
    with pytest.raises(ValueError, match="'channels' is not in the sharding rules"):
        shd.ShardingRules().spec(("batch", "channels"))
    # Even a name that would be replicated must be listed: only an explicit None replicates.
    rules = shd.ShardingRules((("batch", "data"),))
    with pytest.raises(ValueError, match="not in the sharding rules"):
        rules.spec(("batch", "seq"))
    assert rules.spec(("batch", None)) == P("data", None)


def test_collision_raises():
    with pytest.raises(ValueError, match=r"collision.*'batch' and 'embed' both map to mesh axis 'fsdp'"):
        shd.ShardingRules().spec(("batch", "seq", "embed"))
    with pytest.raises(ValueError, match="collision"):
        shd.ShardingRules().spec(("heads", "mlp"))  # both tensor
    with pytest.raises(ValueError, match="collision"):
        shd.ShardingRules().spec(("embed", "embed"))


def test_table_is_validated():
    with pytest.raises(ValueError, match="more than once"):
        shd.ShardingRules((("embed", "fsdp"), ("embed", "tensor")))
    with pytest.raises(ValueError, match="distinct strings"):
        shd.ShardingRules((("batch", ("data", "data")),))
    with pytest.raises(ValueError, match="indivisible"):
        shd.ShardingRules(indivisible="ignore")  # type: ignore[arg-type]


def test_divisibility_raises_by_default():
    mesh = abstract_mesh(1, 1, 4)
    rules = shd.ShardingRules()
    assert rules.spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    with pytest.raises(
        ValueError, match=r"dim 1 \('mlp'\).*size 6, not divisible by mesh axes \('tensor',\)"
    ):
        rules.spec(("embed", "mlp"), (64, 6), mesh)


def test_divisibility_replicate_policy_records_what_it_drops():
    mesh = abstract_mesh(2, 4, 1)
    rules = shd.ShardingRules(indivisible="replicate")
    # 6 rows: data (2) divides, data x fsdp (8) does not -> keep the longest dividing prefix, ("data",).
    resolved = rules.resolve(("batch", None), (6, 3), mesh)
    assert resolved.spec == P("data", None)
    assert resolved.dropped == (shd.Dropped("batch", 0, 6, ("data", "fsdp"), ("data",)),)
    # 3 rows: nothing divides -> replicated, and recorded.
    resolved = rules.resolve(("batch", None), (3, 3), mesh)
    assert resolved.spec == P(None, None) and resolved.dropped[0].kept == ()
    assert rules.resolve(("batch", None), (8, 3), mesh).dropped == ()


def test_shape_without_a_mesh_is_not_silently_unchecked():
    with pytest.raises(ValueError, match="no mesh given"):
        shd.ShardingRules().spec(("embed",), (64,))
    with jax.set_mesh(jax.make_mesh((1, 1, 1), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)):
        assert shd.ShardingRules().spec(("embed",), (64,)) == P("fsdp")


def test_3b_vision_mlp_does_not_divide_tensor_8():
    """Qwen2.5-VL-3B's vision MLP is 3420 wide (= 4 x 855): tensor=4 divides every parameter, tensor=8
    does not. Strict rules say where; lenient ones replicate exactly those dims and list them."""
    model = loading.abstract_model(Qwen25VLConfig.preset("3B"))
    assert not any(r.dropped for r in shd.sharding_plan(model, abstract_mesh(1, 8, 4)).values())
    with pytest.raises(
        ValueError, match=r"visual/blocks/mlp/\w+/kernel: dim \d \('vision_mlp'\).* size 3420, not divisible"
    ):
        shd.sharding_plan(model, abstract_mesh(1, 1, 8))
    plan = shd.sharding_plan(model, abstract_mesh(1, 1, 8), shd.ShardingRules(indivisible="replicate"))
    dropped = {path for path, r in plan.items() if r.dropped}
    assert dropped == {f"visual/blocks/mlp/{p}" for p in ("gate_proj/kernel", "gate_proj/bias", "up_proj/kernel",
                       "up_proj/bias", "down_proj/kernel")}  # fmt: skip
    assert {d.logical for path in dropped for d in plan[path].dropped} == {"vision_mlp"}
    assert plan["visual/blocks/mlp/down_proj/kernel"].spec == P(None, None, "fsdp")
    assert plan["text/layers/mlp/down_proj/kernel"].spec == P(None, "tensor", "fsdp")  # 11008 divides


def test_param_without_logical_axes_raises():
    state = nnx.State({"w": nnx.Param(jnp.zeros((4, 4)))})
    mesh = shd.make_mesh()
    with pytest.raises(ValueError, match="w has no logical_axes"):
        shd.param_shardings(state, mesh)


def test_single_device_helpers_still_place_and_constrain():
    """On one device the helpers do real work (NamedShardings on a 1x1x1 mesh), never nothing."""
    mesh = shd.make_mesh()
    assert mesh.axis_names == shd.MESH_AXES and mesh.axis_types == (AxisType.Auto,) * 3

    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((8, 4)), logical_axes=("embed", "mlp"))

    m = shd.shard_model(Tiny(), mesh)
    assert isinstance(m.w[...].sharding, NamedSharding) and m.w[...].sharding.spec == P("fsdp", "tensor")
    f = jax.jit(lambda x: shd.constrain(x, ("batch", None), mesh))
    assert f(jnp.ones((2, 3))).sharding.mesh == mesh
    assert 'sharding_constraint %arg0 <@mesh, [{"data", "fsdp"}, {}]>' in f.lower(jnp.ones((2, 3))).as_text()
    with pytest.raises(ValueError, match="no mesh given"):
        shd.constrain(jnp.ones((2, 3)), ("batch", None))


def test_make_mesh_checks_device_count():
    with pytest.raises(ValueError, match=r"= 2 devices, but 1 are available"):
        shd.make_mesh(data=2)
    with pytest.raises(ValueError, match="were given"):
        shd.make_mesh(tensor=2, devices=jax.devices()[:1])


def test_batch_axes_layout():
    assert shd.batch_axes("input_ids", 2) == ("batch", None)
    assert shd.batch_axes("position_ids", 3) == (None, "batch", None)
    assert shd.batch_axes("pixel_values", 2) == (None, None)
    assert shd.batch_axes("image_scatter_b", 1) == (None,)
    assert shd.batch_axes("example_mask", 1) == ("batch",)
    mesh = shd.make_mesh()
    out = shd.shard_batch(
        {"input_ids": np.zeros((2, 5), np.int32), "labels": None, "x": np.zeros((2, 5, 3))},
        mesh,
        axes={"x": ("batch", "seq", "heads")},
    )
    assert set(out) == {"input_ids", "x"}
    assert out["x"].sharding.spec == P(("data", "fsdp"), None, "tensor")


# ------------------------------------------------------------------- 8 fake devices, in subprocesses


@pytest.fixture(scope="module")
def multidevice_report():
    return run_check_groups(SCRIPT, GROUPS)


def test_groups_cover_every_check():
    import multidevice_checks

    assert set(ALL_CHECKS) == set(multidevice_checks.CHECKS)


@pytest.mark.parametrize("name", ALL_CHECKS)
def test_multidevice(multidevice_report, name):
    assert_passed(multidevice_report, name)
