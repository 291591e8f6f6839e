"""Logical-axis sharding: one rules table from logical names to mesh axes, and the helpers that use it.

Layers name logical axes only (each `nnx.Param` carries `logical_axes=(...)`, see `model/layers.py`);
this module is the only place that knows about mesh axes. (jax-llm-examples `qwen3_jax/model.py::
ShardingRules`; MaxText `base.yml::logical_axis_rules`.)

Mesh: three named axes, `MESH_AXES = ("data", "fsdp", "tensor")` (a `context` axis comes later), all of
type `AxisType.Auto`: GSPMD propagates shardings through the program, and we pin them where it matters
with `constrain` (`with_sharding_constraint`) at layer boundaries, as MaxText does. `Explicit` axes would
put shardings in the types of every array and make each layer responsible for them; the model is written
without a mesh, so Auto is the mode that fits it.

Rules (`DEFAULT_RULES`), and why:
- `batch -> ("data", "fsdp")`: both axes split the batch; FSDP is data parallelism whose parameters are
  also split (gathered per layer), so it must carry its own share of the rows. `patches`, the vision
  tower's rows, likewise: each device encodes its share.
- `embed`, `vision_embed`, `merger -> "fsdp"`: every weight matrix has exactly one model-width dim, so
  FSDP over it splits every parameter (and the optimizer state) fsdp ways without touching the
  tensor-parallel dim of the same matrix.
- `mlp`, `heads`, `kv_heads`, `vocab`, `vision_mlp`, `vision_qkv -> "tensor"`: Megatron-style tensor
  parallelism over the "wide" dim of each matmul pair (column-parallel in, row-parallel out), and over
  the vocabulary of the embedding / lm_head.
- `seq`, `cache_seq`, `head_dim`, `layers`, `norm`, `vision_patch -> None`: replicated. `layers` is the
  scanned stack axis (sharding it would be pipeline parallelism); norms and the 1176-wide patch input are
  small; `seq`/`cache_seq` go to `context` once context parallelism exists.

Policies, each enforced rather than assumed:
- A logical name missing from the table raises (never replicated by default); `None` as a logical name
  means "replicated on purpose".
- A spec that would use one mesh axis twice raises (e.g. `("batch", "embed")` under the default rules:
  both would use `fsdp`; activations name their model-width dim `None`).
- Divisibility: when a shape and a mesh are known, a dim not divisible by the product of its mesh axes
  raises by default (`indivisible="raise"`); jax would reject the layout later with a less precise
  message. `ShardingRules(..., indivisible="replicate")` instead keeps the longest prefix of that dim's
  mesh axes whose product divides it (possibly none), records every dropped axis (`resolve()`,
  `sharding_plan()`) and logs a warning: an explicit, queryable fallback, never a silent one.
  Real case: Qwen2.5-VL-3B's vision MLP is 3420 wide, so `tensor=8` needs the fallback (`tensor<=4` and
  every text dim divide).
- Batches (`shard_batch`): the batch dim goes on the `batch` rule, packed vision inputs are replicated
  (the tower then splits its patch rows over the same axes, `patches`).
- Column splits are by contiguous blocks: with `tensor` larger than the number of kv heads, or on the
  fused vision `qkv`, a block does not line up with a head; GSPMD keeps the result exact (the 8-device
  tests compare logits) at the cost of extra communication, which a later layout change can remove.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from qwenvl_jax.quant import is_nf4, map_arrays

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
LogicalAxes = Sequence[str | None]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("patches", ("data", "fsdp")),  # the vision tower's patch rows: each device encodes its share
    ("seq", None),
    ("cache_seq", None),
    ("head_dim", None),
    # text decoder parameters
    ("layers", None),
    ("norm", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    # vision tower and merger parameters
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_qkv", "tensor"),
    ("vision_patch", None),
    ("merger", "fsdp"),
)


# Weights as decoding reads them (`train.grpo.sampler_view`): whole along the model width on every device,
# split only by tensor parallelism. Under FSDP a decode step would otherwise all-gather every layer's
# weights for every generated token.
DECODE_RULES: tuple[tuple[str, MeshAxes], ...] = tuple(
    (name, None if axes == "fsdp" else axes) for name, axes in DEFAULT_RULES
)


@dataclasses.dataclass(frozen=True)
class Dropped:
    """A mesh axis left out of one dim because the dim is not divisible (`indivisible="replicate"`)."""

    logical: str
    dim: int
    size: int
    mesh_axes: tuple[str, ...]  # the axes the table asked for
    kept: tuple[str, ...]  # the prefix that divides `size`


@dataclasses.dataclass(frozen=True)
class Resolved:
    spec: PartitionSpec
    dropped: tuple[Dropped, ...] = ()


def _mesh_shape(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    return dict(mesh.shape)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """The logical-name -> mesh-axes table, validated at construction.

    `table`: `(logical name, mesh axis | tuple of mesh axes | None)` pairs, each name once.
    `indivisible`: `"raise"` (default) or `"replicate"`, see the module docstring.
    """

    table: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES
    indivisible: Literal["raise", "replicate"] = "raise"

    def __post_init__(self):
        table = tuple((name, _normalise(name, axes)) for name, axes in self.table)
        names = [name for name, _ in table]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"logical names listed more than once in the sharding rules: {dupes}")
        if self.indivisible not in ("raise", "replicate"):
            raise ValueError(f"indivisible must be 'raise' or 'replicate', got {self.indivisible!r}")
        object.__setattr__(self, "table", table)

    @property
    def mapping(self) -> dict[str, tuple[str, ...]]:
        return dict(self.table)

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes of one logical name (`()` = replicated); unknown names raise."""
        if logical is None:
            return ()
        mapping = self.mapping
        if logical not in mapping:
            raise ValueError(
                f"logical axis {logical!r} is not in the sharding rules (known: {sorted(mapping)}); add it "
                "to the table, or name the dim None to replicate it on purpose"
            )
        return mapping[logical]

    def resolve(
        self,
        logical_axes: LogicalAxes,
        shape: Sequence[int] | None = None,
        mesh: Mesh | AbstractMesh | None = None,
    ) -> Resolved:
        """The PartitionSpec of `logical_axes` plus any mesh axes dropped for divisibility.

        With `shape`, a mesh is needed to check divisibility: `mesh`, else the current one
        (`jax.set_mesh`); with neither, it raises rather than skip the check.
        """
        logical_axes = tuple(logical_axes)
        per_dim = [self.mesh_axes(name) for name in logical_axes]
        used: dict[str, str | None] = {}
        for name, axes in zip(logical_axes, per_dim, strict=True):
            for ax in axes:
                if ax in used:
                    raise ValueError(
                        f"sharding collision in {logical_axes}: {used[ax]!r} and {name!r} both map to mesh "
                        f"axis {ax!r}"
                    )
                used[ax] = name
        dropped: list[Dropped] = []
        if shape is not None:
            shape = tuple(shape)
            if len(shape) != len(logical_axes):
                raise ValueError(f"logical_axes {logical_axes} do not match shape {shape}")
            mesh = _current_mesh(mesh, what="check divisibility of a shape")
            sizes = _mesh_shape(mesh)
            unknown = sorted(set(used) - set(sizes))
            if unknown:
                raise ValueError(f"mesh axes {unknown} of the rules are not in the mesh {tuple(sizes)}")
            for dim, (name, axes, size) in enumerate(zip(logical_axes, per_dim, shape, strict=True)):
                total = math.prod(sizes[a] for a in axes)
                if size % total == 0:
                    continue
                if self.indivisible == "raise":
                    raise ValueError(
                        f"dim {dim} ({name!r}) of shape {shape} has size {size}, not divisible by mesh axes "
                        f"{axes} of total size {total}; pick a mesh that divides it or build the rules with "
                        "indivisible='replicate'"
                    )
                kept = axes
                while kept and size % math.prod(sizes[a] for a in kept):
                    kept = kept[:-1]
                dropped.append(Dropped(name, dim, size, axes, kept))  # type: ignore[arg-type]
                per_dim[dim] = kept
        return Resolved(PartitionSpec(*(_entry(axes) for axes in per_dim)), tuple(dropped))

    def spec(
        self,
        logical_axes: LogicalAxes,
        shape: Sequence[int] | None = None,
        mesh: Mesh | AbstractMesh | None = None,
    ) -> PartitionSpec:
        """`resolve(...).spec`; a divisibility fallback (`indivisible="replicate"`) is logged."""
        resolved = self.resolve(logical_axes, shape, mesh)
        for d in resolved.dropped:
            logger.warning("sharding fallback: %s", d)
        return resolved.spec


def _normalise(name: str, axes: Any) -> tuple[str, ...]:
    if not isinstance(name, str):
        raise ValueError(f"logical name must be a string, got {name!r}")
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    axes = tuple(axes)
    if not all(isinstance(a, str) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"rule {name!r}: mesh axes must be distinct strings, got {axes!r}")
    return axes


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def as_rules(rules: ShardingRules | Sequence[tuple[str, MeshAxes]]) -> ShardingRules:
    """A `ShardingRules` from itself or from a table."""
    return rules if isinstance(rules, ShardingRules) else ShardingRules(tuple(rules))


def _current_mesh(mesh: Mesh | AbstractMesh | None, *, what: str) -> Mesh | AbstractMesh:
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
        raise ValueError(f"no mesh given and none set (jax.set_mesh): cannot {what}")
    return abstract


# ------------------------------------------------------------------------------------------ meshes


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh with `AxisType.Auto` axes over `devices` (default: all devices).

    The product must equal the number of devices: a mesh over a subset is asked for by passing the subset.
    """
    given = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    shape = (data, fsdp, tensor)
    if min(shape) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {math.prod(shape)} devices, but "
            f"{len(devices)} {'were given' if given else 'are available'}"
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def named_sharding(
    mesh: Mesh,
    rules: ShardingRules | Sequence[tuple[str, MeshAxes]],
    logical_axes: LogicalAxes,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    return NamedSharding(mesh, as_rules(rules).spec(logical_axes, shape, mesh))


# ------------------------------------------------------------------------------------------ params


def _params(model_or_state: nnx.Module | nnx.State) -> nnx.State:
    if isinstance(model_or_state, nnx.State):
        return model_or_state
    return nnx.state(model_or_state, nnx.Param)


def _resolve_param(
    rules: ShardingRules, path: tuple[Any, ...], var: Any, mesh: Mesh | AbstractMesh
) -> Resolved:
    name = "/".join(map(str, path))
    if not isinstance(var, nnx.Variable):
        raise TypeError(f"parameter {name}: expected an nnx.Variable leaf, got {type(var).__name__}")
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
        raise ValueError(f"parameter {name} has no logical_axes metadata")
    try:
        return rules.resolve(tuple(axes), var.shape, mesh)
    except ValueError as e:
        raise ValueError(f"parameter {name}: {e}") from None


def sharding_plan(
    model_or_state: nnx.Module | nnx.State,
    mesh: Mesh | AbstractMesh,
    rules: ShardingRules | Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> dict[str, Resolved]:
    """`{"a/b/c": Resolved(spec, dropped)}` for every Param: the queryable record of the layout."""
    rules = as_rules(rules)
    return {
        "/".join(map(str, path)): _resolve_param(rules, path, var, mesh)
        for path, var in nnx.to_flat_state(_params(model_or_state))
    }


def param_shardings(
    model_or_state: nnx.Module | nnx.State,
    mesh: Mesh,
    rules: ShardingRules | Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> nnx.State:
    """`nnx.State` of `NamedSharding`, one per Param, from each Param's `logical_axes` metadata (for a
    quantized kernel, `quant.NF4Weight` of them: a prefix of its value, not of the Param).

    The tree is a pytree prefix of `nnx.state(model, nnx.Param)` (Variables replaced by shardings), so it
    serves as `jax.device_put` target or jit `in_shardings`/`out_shardings` for that state. Variables
    other than Params are not in it; a Param without `logical_axes` raises.
    """
    rules = as_rules(rules)

    def one(path, var):
        resolved = _resolve_param(rules, path, var, mesh)
        for d in resolved.dropped:
            logger.warning("sharding fallback for %s: %s", "/".join(map(str, path)), d)
        if is_nf4(var.get_value()):  # each of its arrays laid out by the kernel's axes
            return map_arrays(lambda x, axes: NamedSharding(mesh, rules.spec(axes, x.shape, mesh)),
                              var.get_value(), var.get_metadata()["logical_axes"])  # fmt: skip
        return NamedSharding(mesh, resolved.spec)

    state = _params(model_or_state)
    return nnx.from_flat_state([(path, one(path, var)) for path, var in nnx.to_flat_state(state)])


def shard_model(
    model: nnx.Module, mesh: Mesh, rules: ShardingRules | Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES
) -> nnx.Module:
    """Place the model's Params on `mesh` by the rules, IN PLACE (`nnx.update`), and return the same model.

    `jax.device_put` per Param: host (numpy) values are transferred shard by shard; device arrays are
    resharded (on CPU that compiles a small copy per distinct shape, ~0.2 s each). Other code holding the
    old arrays (e.g. an `nnx.clone` taken before) keeps them: nothing is donated. Non-Param
    variables would stay where they are; the model has none today, and a new kind should get its own
    logical axes rather than be replicated here.
    """
    params = nnx.state(model, nnx.Param)
    shardings = nnx.to_pure_dict(param_shardings(params, mesh, rules))
    nnx.replace_by_pure_dict(params, jax.device_put(nnx.to_pure_dict(params), shardings))
    nnx.update(model, params)
    return model


# ------------------------------------------------------------------------------------- activations


def constrain(
    x: jax.Array,
    logical_axes: LogicalAxes,
    mesh: Mesh | AbstractMesh | None = None,
    rules: ShardingRules | Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
) -> jax.Array:
    """`with_sharding_constraint` by logical names (in or out of jit).

    `mesh=None` uses the mesh set with `jax.set_mesh`; with none set it raises: a constraint that
    silently does nothing hides exactly the bugs the multi-device tests are there to catch. Only Auto
    mesh axes can be constrained this way (Explicit axes are resharded with `jax.sharding.reshard`).
    """
    mesh = _current_mesh(mesh, what="apply a sharding constraint")
    spec = as_rules(rules).spec(logical_axes, x.shape, mesh)
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    not_auto = sorted(
        a for e in spec if e for a in ((e,) if isinstance(e, str) else e) if types[a] != AxisType.Auto
    )
    if not_auto:
        raise ValueError(f"constrain needs Auto mesh axes; {not_auto} are not (use jax.sharding.reshard)")
    sharding = NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec
    return jax.lax.with_sharding_constraint(x, sharding)


# Activation hints: a batch that does not divide over the batch axes (e.g. 2 DPO pairs on 8 devices) keeps
# the longest dividing prefix of them instead of failing (recorded and logged by the rules).
ACTIVATION_RULES = ShardingRules(DEFAULT_RULES, indivisible="replicate")


def constrain_activation(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """`constrain` by `ACTIVATION_RULES` under the abstract mesh a sharded step traces in (the jitted train
    step sets it, `jax.sharding.use_abstract_mesh`); outside any mesh (one device) there is nothing to lay
    out and `x` comes back as it is. Without these hints GSPMD follows the FSDP-split weights inside a
    layer and computes every row of the batch on every device."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return constrain(x, logical_axes, rules=ACTIVATION_RULES)


# Weights at use under FSDP: whole along their FSDP-split dim, still split by tensor parallelism. FSDP's
# schedule is one all-gather of each layer's weights before its matmuls (and its gradient reduce-scattered
# after); left to itself, GSPMD instead keeps a matmul's contracted dim split and all-reduces its float32
# partial activations, which for the vision tower (all patches on every device) moves ~5x more bytes.
WEIGHT_AT_USE_RULES = ShardingRules(DECODE_RULES, indivisible="replicate")


def constrain_weight_at_use(w: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """`w` (a parameter cast to the compute dtype, about to enter a matmul) pinned to its layout at use,
    `WEIGHT_AT_USE_RULES`: gathered along the FSDP dim. Outside any mesh `w` comes back as it is."""
    if jax.sharding.get_abstract_mesh().empty:
        return w
    # A layer of a stack sees its own slice: the stacked parameter's leading "layers" name is not its.
    return constrain(w, tuple(logical_axes)[-w.ndim :], rules=WEIGHT_AT_USE_RULES)


def batch_shards(rows: int) -> int:
    """How many ways `constrain_activation(x, ("batch", ...))` splits `rows` rows under the abstract mesh a
    sharded step traces in: the product of the batch mesh axes the activation rules keep for that size
    (1 outside any mesh). Code that regroups rows per device (`losses.token_logprobs`) needs the count."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    spec = ACTIVATION_RULES.resolve(("batch",), (rows,), mesh).spec
    axes = spec[0] or ()
    sizes = _mesh_shape(mesh)
    return math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))


# ------------------------------------------------------------------------------------------ batches

# Keys of the packed vision inputs (`collate` / `host_inputs`): their leading axis is the patch or unit
# axis of ALL rows together, not the batch, and the vision tower's window/full attention segments are
# defined over it, so they enter replicated; inside a sharded step the tower splits its patch rows over
# the batch axes (logical `patches`), and the scatter into the text embeddings picks each device's rows.
_REPLICATED_PREFIXES = ("pixel_values", "image_", "video_", "second_per_grid_ts")


def batch_axes(key: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes `shard_batch` gives a batch entry (see there)."""
    if ndim == 0 or key.startswith(_REPLICATED_PREFIXES):
        return (None,) * ndim
    if key == "position_ids" and ndim == 3:  # (3, B, S) M-RoPE positions
        return (None, "batch", None)
    return ("batch",) + (None,) * (ndim - 1)


def shard_batch(
    batch: Mapping[str, Any],
    mesh: Mesh,
    rules: ShardingRules | Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
    *,
    axes: Mapping[str, LogicalAxes] | None = None,
) -> dict[str, jax.Array]:
    """`jax.device_put` each array with its batch dim on the `batch` rule (default: `("data", "fsdp")`).

    Layout by key (`batch_axes`): `position_ids (3, B, S)` -> batch on axis 1; keys starting with
    `pixel_values`, `image_`, `video_` or `second_per_grid_ts` (packed vision inputs) and scalars ->
    replicated; every other array -> batch on axis 0, the rest replicated. `axes={key: logical_axes}`
    overrides a key. The batch size must divide by the batch mesh axes (or the rules' fallback applies).
    `None` values are dropped.
    """
    rules = as_rules(rules)
    axes = dict(axes or {})
    out = {}
    for key, value in batch.items():
        if value is None:
            continue
        shape = tuple(np.shape(value))
        logical = tuple(axes[key]) if key in axes else batch_axes(key, len(shape))
        try:
            spec = rules.spec(logical, shape, mesh)
        except ValueError as e:
            raise ValueError(f"batch[{key!r}]: {e}") from None
        out[key] = jax.device_put(value, NamedSharding(mesh, spec))
    return out
