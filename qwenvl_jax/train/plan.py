"""Memory plan of a training config, without allocating a byte or needing a device.

`plan(config)` builds the model and the train state abstractly (`jax.eval_shape` around
`train.state.init_train_state`, PPO's `ppo_step.abstract_ppo_state`, so the trainable/frozen split, the
LoRA tree and the optimizer state are exactly the ones a run makes), shards every leaf by
`sharding.DEFAULT_RULES` on an `AbstractMesh` of the config's `mesh` shape, and adds up bytes per device.
`format_plan` prints it (`qwenvl-jax train --dry-run`). `check_step_shapes(config)` traces the real
SFT/DPO/GRPO/reward/PPO step on abstract inputs of the config's static batch shapes (`jax.eval_shape`:
full-size 3B/7B steps without allocating).

The hardware is the top-level `target` key: `"<n>xh100"`, `"<n>xh200"` (n GPUs) or `"v5p-<cores>"` (a TPU
v5p slice; Cloud TPU names count TensorCores, two per chip, so v5p-8 is 4 chips = 4 JAX devices). The
per-device memory (HBM) comes from `CHIPS`; no target means an unknown budget (the plan is printed, the
fit is not judged).

Per device, each row of `Plan.rows` in one phase:
- "state", exact (from shapes, dtypes and shardings), live the whole step: trainable params, frozen
  params, the reference copy (non-LoRA DPO, non-LoRA GRPO with `grpo.beta > 0` and non-LoRA PPO: the
  policy's full param tree at the storage dtype, frozen + trainable without PPO's value model), PPO's
  reward model (`_reward_model_bytes`), optimizer state, the gradients, and the step's batch (`collate`'s
  arrays for the largest bucket, x grad_accum). `Plan.state_bytes`.
- "backward", live during forward and backward only: the micro-batch gradient being added to the running
  sum (`grad_accum > 1`, exact), and the ESTIMATES of one micro-batch's activations
  (`activation_estimate`) and of LoRA's own (`_lora_activation_bytes`: the adapters are applied, so no
  merged kernel exists).
- "update", live during the optimizer update only: its temporaries (an ESTIMATE, `UPDATE_TEMP_COPIES`).
- "rollout" (GRPO and PPO), live while the step's completions are generated, before the
  forward/backward: the KV cache of `P x G` rows (PPO: G = 1; exact: `generation.cache`'s layout, k/v
  split like the engine splits them), the prefill's own keys/values of the P prompts (exact), the
  prefill's activations (ESTIMATE, `prefill_estimate`), the decode logits and sampler (ESTIMATE,
  `DECODE_LOGIT_COPIES` rows x vocab float32 buffers) and the sampler view the generating model reads
  (`_sampler_view_bytes`, exact: every parameter of the policy at the compute dtype, whole along the
  model width on every device; with LoRA the adapters and whatever part of the base is not already so).
  The state's gradients and batch do not exist yet while generating, so counting them under the rollout
  is conservative by their size.
- "scoring" (PPO only), live while the generation batch is scored (`ppo_step.score_fn`), after the
  rollout (whose sampler view and cache are gone) and before the first train step: one forward-only
  micro-batch of `batch.batch_size` rows through the policy, the reference, the value model and the reward
  model, one after another (ESTIMATE, `_scoring_estimate`), and with LoRA the adapters' own transient
  activations (`_lora_activation_bytes` without a backward). Without a backward pass nothing is
  saved across layers and nothing is differentiated, so this phase stays below the forward/backward's
  (two models' forward and backward on a micro-batch of the same shape) and does not bind; it is planned
  to show that, not to find a peak.

PPO trains the policy and the value model in one loss (`ppo_step.ppo_step`): their params, gradients and
AdamW moments are one trainable tree (`{**policy, "value": ..., "score": head}`: a second full tree, or
with LoRA a second adapter set on the one frozen base), and each micro-batch runs both models' forward
and backward, so "backward" counts two micro-batches' activations (with LoRA, both adapter sets').

`peak = state + max(backward, update, rollout, scoring)`. A config FITS when `peak <= USABLE_FRACTION *
HBM`; the other 10% is for what no formula here sees (allocator fragmentation, cuBLAS/cuDNN workspaces,
XLA's scheduling choices) and for the estimates' error. On GPU, JAX preallocates only 75% of HBM by
default: run with `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` for the budget to be available.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

GIB = 2**30
USABLE_FRACTION = 0.90
# `step.apply_update` runs the update under `lax.cond` into the donated buffers: the update itself is the
# one trainable-sized temporary (XLA:CPU's buffer assignment of the real 3B step agrees, docs/training.md).
UPDATE_TEMP_COPIES = 1
# Rows x vocab float32 buffers live in a decode step: the prefill's repeated last logits (an input of the
# decode loop, held to its end), the step's logits and the sampler's working set (processed logits, the
# top-k/top-p sort and its indices, softmax, cumsum, log-softmax, the presence mask). XLA:CPU's buffer
# assignment of the real decode loop at grpo_3b_lora_1xh100's shape (128 rows, float32 compute so that no
# bf16 upcast muddles it) holds 1.05 GiB of temporaries besides the in-place cache: 14.5 such buffers.
DECODE_LOGIT_COPIES = 16


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    memory_bytes: int  # HBM per JAX device


CHIPS = {
    # nvidia-smi's total (81559 MiB), which is what JAX's allocator sees before its fraction.
    "h100": Chip("NVIDIA H100 80GB", 81559 * 2**20),
    "h200": Chip("NVIDIA H200", 143771 * 2**20),
    # The 24 GB cards QLoRA targets, at nvidia-smi's totals.
    "l4": Chip("NVIDIA L4", 23034 * 2**20),
    "rtx4090": Chip("NVIDIA GeForce RTX 4090", 24564 * 2**20),
    # 95 GiB HBM2e per chip (one JAX device per chip: the two TensorCores run as one megacore).
    "v5p": Chip("TPU v5p", 95 * GIB),
}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    num_devices: int
    hosts: int = 1  # processes of a multi-host run (`qwenvl_jax.distributed`), num_devices / hosts each

    @property
    def local_devices(self) -> int:
        return self.num_devices // self.hosts


V5P_CHIPS_PER_HOST = 4  # a v5p host (TPU VM worker) drives 4 chips


def parse_target(value: str | None) -> Target | None:
    """`"8xh100"`, `"1xh200"`, `"1xl4"`, `"1xrtx4090"`, `"2x8xh100"` (2 hosts of 8 GPUs) or
    `"v5p-8"` (4 chips; v5p-16 and larger are 4 chips per host) -> `Target`; None -> None (unknown
    hardware)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    gpu = re.fullmatch(r"(?:(\d+)x)?(\d+)x(h100|h200|l4|rtx4090)", text)
    if gpu and int(gpu.group(2)) >= 1 and int(gpu.group(1) or 1) >= 1:
        hosts = int(gpu.group(1) or 1)
        return Target(text, CHIPS[gpu.group(3)], hosts * int(gpu.group(2)), hosts)
    tpu = re.fullmatch(r"v5p-(\d+)", text)
    if tpu and int(tpu.group(1)) >= 2 and int(tpu.group(1)) % 2 == 0:
        chips = int(tpu.group(1)) // 2
        return Target(text, CHIPS["v5p"], chips, max(1, chips // V5P_CHIPS_PER_HOST))
    raise ValueError(
        f"target {value!r} is not one of '<n>x<gpu>' (gpu: h100, h200, l4, rtx4090), "
        "'<hosts>x<n>x<gpu>', 'v5p-<even cores>'"
    )


PHASES = ("state", "backward", "update", "rollout", "scoring")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    bytes: int  # per device
    phase: str  # one of PHASES
    exact: bool
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Rollout:
    """A generation batch: P prompts x G completions, decoded into a `cache_slots`-slot KV cache."""

    completions: int  # GRPO: batch_size x steps_per_generation (default grad_accum); PPO: P
    prompts: int  # P = completions // G
    num_generations: int  # G; PPO: 1
    prompt_len: int  # the prompt bucket: grpo/ppo.max_prompt_length
    max_completion_length: int
    cache_slots: int  # round_up(prompt_len + max_completion_length, cache_multiple)
    vision_patches: int  # the P prompts' vision budget, encoded once in prefill; replicated

    @property
    def rows(self) -> int:
        return self.prompts * self.num_generations


@dataclasses.dataclass(frozen=True)
class Plan:
    kind: str
    trainable: str
    model_source: str  # "preset 3B", or the config.json it was read from
    param_count: int  # the whole model, as HF counts it
    trainable_count: int  # LoRA: the adapter parameters
    trainable_dtype: str
    target: Target | None
    mesh: dict[str, int]
    rows_per_micro_batch: int  # DPO: 2 x pairs
    seq_len: int  # the largest bucket: the shape that decides memory
    vision_patches: int  # per micro-batch (image + video budgets); replicated on every device
    grad_accum: int
    rows: tuple[Row, ...]
    activation_formula: str
    notes: tuple[str, ...] = ()
    rollout: Rollout | None = None  # GRPO, PPO
    prefill_formula: str = ""
    scoring_formula: str = ""  # PPO
    config_for_hosts: dict = dataclasses.field(default_factory=dict)  # kind + batch: `hosts.check_split`

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def batch_shards(self) -> int:
        return self.mesh["data"] * self.mesh["fsdp"]

    @property
    def rows_per_device(self) -> float:
        return self.rows_per_micro_batch / self.batch_shards

    def phase_bytes(self, phase: str) -> int:
        return sum(r.bytes for r in self.rows if r.phase == phase)

    @property
    def state_bytes(self) -> int:
        """Params, frozen params, reference, reward model, optimizer state, gradients, batch: exact."""
        return self.phase_bytes("state")

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + max(self.phase_bytes(phase) for phase in PHASES[1:])

    @property
    def binding_phase(self) -> str:
        """The phase that sets the peak (on a tie, the first of `PHASES`)."""
        return max(PHASES[1:], key=self.phase_bytes)

    @property
    def usable_bytes(self) -> int | None:
        return None if self.target is None else int(USABLE_FRACTION * self.target.chip.memory_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.usable_bytes is None else self.peak_bytes <= self.usable_bytes

    @property
    def problems(self) -> tuple[str, ...]:
        out = []
        if self.target is not None and self.num_devices != self.target.num_devices:
            out.append(
                f"mesh {self.mesh} has {self.num_devices} devices, target {self.target.name} has "
                f"{self.target.num_devices}"
            )
        if self.target is not None and self.target.hosts > 1:
            from qwenvl_jax.train.hosts import check_split

            try:
                check_split(self.config_for_hosts, self.target.hosts)
            except ValueError as err:
                out.append(str(err))
        if self.rows_per_micro_batch % self.batch_shards:
            out.append(
                f"{self.rows_per_micro_batch} rows per micro-batch do not divide over data x fsdp = "
                f"{self.batch_shards}"
            )
        if self.rollout is not None and self.rollout.completions % self.rollout.num_generations:
            out.append(
                f"{self.rollout.completions} completions per generation batch are not a multiple of "
                f"num_generations {self.rollout.num_generations}: a generation must hold whole groups"
            )
        if self.rollout is not None and self.rollout.prompts % self.batch_shards:
            out.append(
                f"{self.rollout.prompts} prompts per generation batch do not divide over data x fsdp = "
                f"{self.batch_shards} (generation shards the prompts like the rows)"
            )
        if self.fits is False:
            out.append(
                f"peak {self.peak_bytes / GIB:.1f} GiB per device exceeds the usable "
                f"{self.usable_bytes / GIB:.1f} GiB"
            )
        return tuple(out)


# ----------------------------------------------------------------------------------- config reading


def model_config(config: dict):
    """`(Qwen25VLConfig, source)`: from `model.path`'s config.json when the path exists, else the preset."""
    from qwenvl_jax.config import Qwen25VLConfig

    model = config.get("model") or {}
    policy = {k: model[k] for k in ("dtype", "param_dtype", "remat", "attention_backend") if k in model}
    # The train loop's defaults: float32 compute and float32 master weights.
    policy.setdefault("dtype", "float32")
    policy.setdefault("param_dtype", "float32")
    path = model.get("path")
    if path and Path(path).exists():
        directory = Path(path)
        if not (directory / "config.json").is_file():
            from qwenvl_jax.checkpoint import params_dir  # an Orbax checkpoint: config.json beside params/

            directory = params_dir(directory).parent
        return Qwen25VLConfig.from_pretrained(directory, **policy), str(directory / "config.json")
    if not model.get("preset"):
        raise ValueError(f"config model needs a preset (model.path {path!r} does not exist)")
    return Qwen25VLConfig.preset(model["preset"], **policy), f"preset {model['preset']}"


def mesh_shape(config: dict) -> dict[str, int]:
    from qwenvl_jax.sharding import MESH_AXES

    mesh = config.get("mesh") or {}
    unknown = sorted(set(mesh) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh keys {unknown}; known: {list(MESH_AXES)}")
    shape = {axis: int(mesh.get(axis, 1)) for axis in MESH_AXES}
    if min(shape.values()) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got {shape}")
    return shape


def lora_config(config: dict):
    from qwenvl_jax.train.lora import LoraConfig

    if config.get("trainable", "full") != "lora":
        return None
    values = dict(config.get("lora") or {})
    for key in ("targets", "scopes"):
        if key in values:
            values[key] = tuple(values[key])
    return LoraConfig(**values)


def batch_rows(config: dict) -> int:
    """Rows of one collated micro-batch: `batch_size`, or for DPO and reward 2 x `batch_size` pairs."""
    size = int((config.get("batch") or {}).get("batch_size", 2))
    return 2 * size if config.get("kind", "sft") in ("dpo", "reward") else size


def batch_section(config: dict) -> dict:
    """The config's batch section; GRPO and PPO without `seq_buckets` train on one bucket of
    `max_prompt_length + max_completion_length`, as `train.grpo.GrpoSource` and `train.ppo.PpoSource` do."""
    batch = dict(config.get("batch") or {})
    kind = config.get("kind", "sft")
    if kind in ("grpo", "ppo") and not batch.get("seq_buckets"):
        g = grpo_settings(config) if kind == "grpo" else ppo_settings(config)
        batch["seq_buckets"] = [int(g["max_prompt_length"]) + int(g["max_completion_length"])]
    return batch


def grpo_vision_budget(config: dict, merge_size: int) -> dict[str, int]:
    """A GRPO training micro-batch's vision budgets (`train.grpo.micro_batch_budget`): its prompts' rows
    share their images, encoded once."""
    from qwenvl_jax.train.grpo import micro_batch_budget

    batch = {k: v for k, v in batch_section(config).items() if k != "pack"}
    hosts = parse_target(config["target"]).hosts if config.get("target") else 1
    return micro_batch_budget({**config, "batch": {**batch, "merge_size": merge_size}}, hosts)


def grpo_settings(config: dict) -> dict:
    from qwenvl_jax.train.grpo import grpo_settings as settings

    return settings(config)


def ppo_settings(config: dict) -> dict:
    from qwenvl_jax.train.ppo import ppo_settings as settings

    return settings(config)


def rollout_shape(config: dict, model_cfg) -> Rollout:
    """A generation batch, as `train.grpo.GrpoSource` / `train.ppo.PpoSource` and `generation.generate`
    make it. GRPO: `batch_size x steps_per_generation` completions (default `grad_accum`: one generation
    per step) of G per prompt; PPO: one completion for each of `ppo.rows_per_generation` prompts
    (`batch_size x grad_accum x num_mini_batches`)."""
    import inspect

    from qwenvl_jax.generation import generate

    batch = {**batch_section(config), "merge_size": model_cfg.vision.spatial_merge_size}
    full = {**_run_config(config), "batch": batch}
    if config.get("kind", "sft") == "ppo":
        from qwenvl_jax.train.ppo import prompt_budgets

        g = ppo_settings(config)
        prompts, budget, _ = prompt_budgets(full)
        completions, generations = prompts, 1
    else:
        from qwenvl_jax.train.grpo import prompt_budgets

        g = grpo_settings(config)
        spg = int(g.get("steps_per_generation") or full["grad_accum"])
        prompts, budget, _ = prompt_budgets(full)
        completions, generations = int(batch.get("batch_size", 2)) * spg, int(g["num_generations"])
    prompt_len, completion = int(g["max_prompt_length"]), int(g["max_completion_length"])
    multiple = inspect.signature(generate).parameters["cache_multiple"].default  # rollout keeps the default
    slots = -(-(prompt_len + completion) // multiple) * multiple
    patches = budget["image_patches"] + budget["video_patches"]
    return Rollout(completions, prompts, generations, prompt_len, completion, slots, patches)


def _run_config(config: dict) -> dict:
    """`config` with the keys `train.grpo`'s and `train.ppo`'s helpers read filled with the run's defaults."""
    return {
        **config,
        "grad_accum": int(config.get("grad_accum", 1)),
        "chunk_size": int(config.get("chunk_size", 1024)),
    }


# ------------------------------------------------------------------------------------ abstract state


@dataclasses.dataclass(frozen=True)
class AbstractSetup:
    model_cfg: Any
    source: str
    graphdef: Any
    state: Any  # TrainState of ShapeDtypeStructs
    frozen: Any
    tx: Any
    lora_cfg: Any
    logical_axes: dict[str, tuple[str | None, ...]]
    param_count: int


def abstract_setup(config: dict, model_cfg=None) -> AbstractSetup:
    """The model, the train state and the frozen params as `init_train_state` makes them (PPO:
    `ppo_step.abstract_ppo_state`, the policy and the value model in one state), all abstract.
    `model_cfg`: a `Qwen25VLConfig` to use instead of the config's model (analyses at other depths)."""
    import jax
    from flax import nnx

    from qwenvl_jax.loading import abstract_model
    from qwenvl_jax.loading import param_count as loading_param_count
    from qwenvl_jax.train.optim import OptimConfig
    from qwenvl_jax.train.state import init_train_state, param_logical_axes

    if model_cfg is None:
        model_cfg, source = model_config(config)
    else:
        source = "given config"
    lora_cfg = lora_config(config)
    quantize = (
        {}
        if lora_cfg is None
        else {"quantize": lora_cfg.quantize, "quantize_vision": lora_cfg.quantize_vision}
    )
    model = abstract_model(model_cfg, **quantize)
    logical_axes = param_logical_axes(model)
    param_count = loading_param_count(model)
    graphdef, params = nnx.split(model)
    optim_cfg = OptimConfig(**{"total_steps": int(config.get("steps", 20)), **(config.get("optim") or {})})
    static = {}
    kind = config.get("kind", "sft")
    if kind == "reward":  # the backbone plus the scalar head `score`
        from qwenvl_jax.train.reward_step import init_reward_state as init_train_state
    if kind == "ppo":
        from qwenvl_jax.train.ppo_step import abstract_ppo_state

        g, state, frozen, tx = abstract_ppo_state(
            model, optim_cfg, config.get("trainable", "full"), lora_cfg, int(config.get("seed", 0)),
            train_merger=bool(config.get("train_merger", True)),
        )  # fmt: skip
        # Its leaves carry a one-device sharding (the model is not placed); the plan lays them out itself.
        state, frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, frozen))
        return AbstractSetup(model_cfg, source, g, state, frozen, tx, lora_cfg, logical_axes, param_count)

    def init(values):
        g, state, frozen, tx = init_train_state(
            nnx.merge(graphdef, values),
            optim_cfg,
            config.get("trainable", "full"),
            lora_cfg,
            seed=int(config.get("seed", 0)),
            train_merger=bool(config.get("train_merger", True)),
        )
        static.update(graphdef=g, tx=tx)  # not arrays: taken out of the trace by closure
        return state, frozen

    state, frozen = jax.eval_shape(init, params)
    return AbstractSetup(
        model_cfg,
        source,
        static["graphdef"],
        state,
        frozen,
        static["tx"],
        lora_cfg,
        logical_axes,
        param_count,
    )


def _device_fraction_tree(params, logical_axes, mesh, lora: bool, table=None):
    """Per leaf: the fraction of its elements one device holds under `table` (default `DEFAULT_RULES`)."""
    from qwenvl_jax import sharding as shd
    from qwenvl_jax.model.value_head import HEAD_LOGICAL_AXES, SCORE, VALUE
    from qwenvl_jax.quant import per_array
    from qwenvl_jax.train import lora as lora_lib
    from qwenvl_jax.train.optim import map_with_path

    rules = shd.as_rules(shd.DEFAULT_RULES if table is None else table)
    sizes = dict(mesh.shape)

    def one(path, x):
        if path.split("/", 1)[0] == VALUE:  # a PPO value model: laid out like the policy's own leaf
            path = path.split("/", 1)[1]
        if path.split("/", 1)[0] == SCORE:  # a reward model's head (as `train.step` shards it)
            axes = HEAD_LOGICAL_AXES
        else:
            axes = lora_lib.leaf_logical_axes(path, logical_axes, lora=lora)
        return per_array(functools.partial(fraction, path), x, axes)

    def fraction(path, x, axes):
        try:
            spec = rules.spec(axes, x.shape, mesh)
        except ValueError as err:
            raise ValueError(f"parameter {path}: {err}") from None
        ways = 1
        for entry in spec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                ways *= sizes[axis]
        return 1.0 / ways

    return map_with_path(one, params)


def _bytes(tree, fractions=None) -> int:
    import jax

    leaves = jax.tree.leaves(tree)
    if fractions is None:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    return round(
        sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize * f
            for x, f in zip(leaves, jax.tree.leaves(fractions), strict=True)
        )
    )


def _opt_state_bytes(setup: AbstractSetup, param_fractions) -> int:
    """Params-shaped optimizer leaves (Adam mu, nu) shard like their params; the rest is replicated."""
    import jax
    import optax

    fractions = optax.tree_map_params(
        setup.tx,
        lambda _, f: f,
        setup.state.opt_state,
        param_fractions,
        transform_non_params=lambda _: 1.0,
        is_leaf=lambda x: isinstance(x, float),
    )
    return _bytes(setup.state.opt_state, jax.tree.map(float, fractions))


# --------------------------------------------------------------------------------------- estimates


def activation_estimate(
    model_cfg, rows: int, seq: int, patches: int, chunk: int, mesh: dict[str, int], frame: int = 0
):
    """`(bytes, formula)`: an ESTIMATE of one micro-batch's peak activation memory on one device.

    Layout: the decoder constrains its layer inputs to rows over (data, fsdp)
    (`sharding.constrain_activation`), so inside a layer a device holds its rows at full model width
    (FSDP gathers the weights) with the MLP/heads split tensor ways. The vision tower splits its P patch
    rows the same way (`patches` -> (data, fsdp), when they divide), and its attention reads K keys per
    query: 3 x 64 in the windowed blocks, 3 x `frame` (`batch.max_frame_patches`) or all P in the full ones.

    Symbols: r = rows / (data x fsdp), S sequence, D/I/L/H text width/MLP/layers/heads, Kv kv width, V
    vocab, t the tensor size, P vision patches, p = P / (data x fsdp) a device's rows of them, K the vision
    keys per query, Dv/Iv/Lv/Hv the vision tower's, a bytes of the compute dtype, c the loss chunk.
    - one text layer's tensors: T = r S (7 D + 3 I/t) a, plus attention r H/t S^2 (4 + a) with the
      xla backend (fp32 logits and probs; cuDNN's flash kernel keeps none);
    - one vision block's: Vb = p (7 Dv + 3 Iv) a, plus Hv p K (4 + a) + p K (xla: logits, probs, mask) or
      p K (1 + a) (cuDNN: the segment mask and its dense bias);
    - the loss: one chunk's fp32 logits and their gradient, 2 c V/t 4;
    - remat full: saved = (L r S D + Lv p Dv) a (the layer inputs), transient = 2 max(T, Vb, loss);
      remat dots: saved = L r S (3 D + 2 Kv/t + 2 I/t) a + Lv p (5 Dv + 2 Iv) a (matmul outputs),
      transient as full; remat none: saved = L T + Lv Vb, transient = max(T, Vb, loss).
    It ignores XLA's fusion and scheduling; read it as the right order of magnitude (docs/training.md
    compares it with XLA's buffer assignment).
    """
    tc, vc = model_cfg.text, model_cfg.vision
    a = np.dtype(model_cfg.dtype).itemsize
    r, s = rows / (mesh["data"] * mesh["fsdp"]), seq
    split = mesh["data"] * mesh["fsdp"]
    p = patches / split if patches % split == 0 else patches
    t = mesh["tensor"]
    d, i, kv = tc.hidden_size, tc.intermediate_size / t, tc.num_key_value_heads * tc.head_dim / t
    keys = vision_keys(model_cfg, patches, frame)
    text_layer, vision_layer = _layer_working_sets(model_cfg, r, s, p, t, keys)
    loss = 2 * min(chunk, r * s) * tc.vocab_size / t * 4
    lt, lv = tc.num_hidden_layers, vc.depth
    if model_cfg.remat == "none":
        saved = lt * text_layer + lv * vision_layer
        transient = max(text_layer, vision_layer, loss)
    else:
        if model_cfg.remat == "full":
            saved = (lt * r * s * d + lv * p * vc.hidden_size) * a
        else:
            saved = lt * r * s * (3 * d + 2 * kv + 2 * i) * a
            saved += lv * p * (5 * vc.hidden_size + 2 * vc.intermediate_size) * a
        transient = 2 * max(text_layer, vision_layer, loss)
    formula = (
        f"remat {model_cfg.remat}: saved {format_bytes(saved)} + transient {format_bytes(transient)} "
        f"(r={r:g}, S={s}, p={p:g}, K={keys}, attention {model_cfg.attention_backend}; see activation_estimate)"
    )
    return round(saved + transient), formula


def vision_keys(model_cfg, patches: int, frame: int = 0) -> int:
    """K of `activation_estimate`: the most keys a vision query reads in any block (`VisionTower`): 3
    windows of 64 in the windowed blocks (`banded_attention`), in the full ones 3 frames of `frame`
    patches when that bound is under a third of the budget, else the whole budget."""
    vc = model_cfg.vision
    window = (vc.window_size // vc.patch_size) ** 2
    full = 3 * frame if frame and 3 * frame < patches else patches
    return max(full, 3 * window) if patches else 0


def _layer_working_sets(
    model_cfg, r: float, s: int, p: float, t: int, keys: int | None = None
) -> tuple[float, float]:
    """`(T, Vb)` of `activation_estimate`: one text layer's and one vision block's tensors, bytes; `keys`
    (K, default p: a dense block) the vision keys per query."""
    tc, vc = model_cfg.text, model_cfg.vision
    a = np.dtype(model_cfg.dtype).itemsize
    xla = model_cfg.attention_backend == "xla"
    text_layer = r * s * (7 * tc.hidden_size + 3 * tc.intermediate_size / t) * a
    text_layer += r * tc.num_attention_heads / t * s * s * (4 + a) if xla else 0
    vision_layer = p * (7 * vc.hidden_size + 3 * vc.intermediate_size) * a
    keys = p if keys is None else keys
    vision_layer += (vc.num_heads * p * keys * (4 + a) + p * keys) if xla else p * keys * (1 + a)
    return text_layer, (vision_layer if p else 0)


def prefill_estimate(model_cfg, prompts: int, seq: int, patches: int, mesh: dict[str, int], frame: int = 0):
    """`(bytes, formula)`: an ESTIMATE of the generation prefill's activations on one device.

    The prefill is a forward pass without gradients (`text.prefill` runs its layer scan with remat
    "none", nothing saved but the keys and values, counted apart), one layer at a time: the residual
    stream r S D a plus the larger of one text layer's and one vision block's working set
    (`activation_estimate`'s T and Vb), r = prompts / (data x fsdp) prompt rows of S = max_prompt_length
    tokens, and P = the prompts' whole vision budget, encoded on every device (vision inputs are
    replicated), its queries reading K keys (`vision_keys`). XLA:CPU's buffer assignment of the real
    prefill (`generation.engine._prefill`) at grpo_3b_lora_1xh100's shape without a frame bound (16
    prompts x 2048, 16384 patches, K = P; float32, XLA attention) agrees where the vision block binds
    (temporaries 34.7 GiB; this estimate plus the prefill's keys/values, 35.9) and is far below it where the text layer does (no images: 4.0 GiB against 16.3; XLA:CPU never holds a
    layer's whole fp32 attention logits, which T counts).
    """
    r = prompts / (mesh["data"] * mesh["fsdp"])
    keys = vision_keys(model_cfg, patches, frame)
    text_layer, vision_layer = _layer_working_sets(model_cfg, r, seq, patches, mesh["tensor"], keys)
    residual = r * seq * model_cfg.text.hidden_size * np.dtype(model_cfg.dtype).itemsize
    total = residual + max(text_layer, vision_layer)
    formula = (
        f"residual {format_bytes(residual)} + max(text layer {format_bytes(text_layer)}, vision "
        f"block {format_bytes(vision_layer)}) (r={r:g}, S={seq}, P={patches}, K={keys}, attention "
        f"{model_cfg.attention_backend}; see prefill_estimate)"
    )
    return round(total), formula


def _scoring_estimate(
    model_cfg, rows: int, seq: int, patches: int, chunk: int, mesh: dict[str, int], frame: int = 0
):
    """`(bytes, formula)`: an ESTIMATE of PPO's scoring pass (`ppo_step.score_fn`) on one device.

    One micro-batch of `rows` training rows (the largest bucket S, the micro-batch's P patches) runs
    forward, without gradients, through the policy, the reference, the value model and the reward model
    in turn; each holds what a prefill holds (`prefill_estimate`: the residual stream and one layer's or
    one vision block's working set) plus the log-probs' fp32 logits of one loss chunk and their softmax,
    `2 c V/t 4` (as `activation_estimate`'s loss term). Each model's outputs are `(B, T)` or `(B,)`, so
    one model's working set is dead before the next begins: the pass holds one of them at a time.
    """
    r = rows / (mesh["data"] * mesh["fsdp"])
    forward, _ = prefill_estimate(model_cfg, rows, seq, patches, mesh, frame)
    loss = 2 * min(chunk, r * seq) * model_cfg.text.vocab_size / mesh["tensor"] * 4
    formula = (
        f"one model at a time: forward {format_bytes(forward)} (as prefill_estimate) + loss chunk "
        f"{format_bytes(loss)} (r={r:g}, S={seq}, P={patches}; see _scoring_estimate)"
    )
    return round(forward + loss), formula


def _cache_rows(rollout: Rollout, model_cfg, mesh) -> list[Row]:
    """The KV cache and the prefill's keys/values per device, exact: k and v split as `generate` splits
    them (`CACHE_AXES` under `DEFAULT_RULES` with `indivisible="replicate"`: kv heads that the tensor axis
    does not divide stay whole), the int32 mask and the decode loop's token and log-prob buffers counted
    whole on every device."""
    import dataclasses as dc

    from qwenvl_jax import sharding as shd
    from qwenvl_jax.generation.cache import CACHE_AXES, cache_shape

    rules = dc.replace(shd.as_rules(shd.DEFAULT_RULES), indivisible="replicate")
    sizes = dict(mesh.shape)
    a = np.dtype(model_cfg.dtype).itemsize

    def per_device(shape) -> float:
        ways = 1
        for entry in rules.resolve(CACHE_AXES, shape, mesh).spec:
            for axis in (entry,) if isinstance(entry, str) else entry or ():
                ways *= sizes[axis]
        return 2 * math.prod(shape) * a / ways  # k and v

    rows, slots = rollout.rows, rollout.cache_slots
    kv = per_device(cache_shape(model_cfg, rows, slots))
    free = slots - rollout.prompt_len
    side = rows * slots * 4 + rows * free * (4 + 4)  # mask; sampled tokens and their log-probs
    prefill_kv = per_device(cache_shape(model_cfg, rollout.prompts, rollout.prompt_len))
    return [
        Row(
            "KV cache",
            round(kv + side),
            "rollout",
            True,
            f"{rows} rows x {slots} slots, k+v {format_bytes(kv)} ({np.dtype(model_cfg.dtype).name}) "
            f"+ mask and token buffers",
        ),
        Row(
            "prefill keys/values",
            round(prefill_kv),
            "rollout",
            True,
            f"{rollout.prompts} prompts x {rollout.prompt_len}, beside the cache while it is filled",
        ),
    ]


def _decode_view_bytes(
    setup: AbstractSetup, tree, mesh, lora: bool, *, prefix: str = "", changed: bool = False
):
    """Bytes per device of the leaves of `tree` under `prefix` at the compute dtype in the decode layout
    (`sharding.DECODE_RULES`); `changed`: only those a cast or a re-layout copies (the others are read
    where they are). Exact."""
    import jax

    from qwenvl_jax import sharding as shd
    from qwenvl_jax.quant import is_nf4
    from qwenvl_jax.train import lora as lora_lib

    flat = {k: v for k, v in lora_lib.flatten(tree).items() if k.startswith(prefix)}
    if not flat:
        return 0
    sub = lora_lib.unflatten(flat)
    itemsize = np.dtype(setup.model_cfg.dtype).itemsize
    decode = jax_leaves(_device_fraction_tree(sub, setup.logical_axes, mesh, lora, shd.DECODE_RULES))
    train = jax_leaves(_device_fraction_tree(sub, setup.logical_axes, mesh, lora))
    # A quantized kernel's arrays are read as stored (never cast): copied only to be re-laid out.
    stored = jax_leaves(jax.tree.map(lambda x: jax.tree.map(lambda _: True, x) if is_nf4(x) else False, sub,
                                     is_leaf=is_nf4))  # fmt: skip
    total = 0.0
    for x, f, t, keep in zip(jax_leaves(sub), decode, train, stored, strict=True):
        size = np.dtype(x.dtype).itemsize if keep else itemsize
        if changed and (keep or np.dtype(x.dtype).itemsize == itemsize) and f == t:
            continue
        total += int(np.prod(x.shape)) * size * f
    return round(total)


def _sampler_view_bytes(setup: AbstractSetup, mesh, policy) -> tuple[int, str]:
    """The weights the rollout decodes with (`train.grpo.sampler_view` of `policy`, the trainable params:
    PPO's view reads `ppo_step.split_ppo(params)[0]`, never the value model) beside the train state: every
    parameter at the compute dtype, laid out by `sharding.DECODE_RULES` (whole along the model width, split
    by tensor parallelism only). With LoRA, the adapters (applied, never merged) and only those base leaves
    that are not already at the compute dtype in the decode layout: the others are read where they are.
    Exact."""
    from qwenvl_jax.train import lora as lora_lib

    if setup.lora_cfg is None:
        whole = lora_lib.unflatten({**lora_lib.flatten(setup.frozen), **lora_lib.flatten(policy)})
        note = f"all params at {setup.model_cfg.dtype}, decode layout (no FSDP split)"
        return _decode_view_bytes(setup, whole, mesh, False), note
    adapters = _decode_view_bytes(setup, policy, mesh, True)
    base = _decode_view_bytes(setup, setup.frozen, mesh, False, changed=True)
    how = "the base read as it is" if not base else f"a {format_bytes(base)} cast/re-laid copy of the base"
    return adapters + base, f"adapters applied at {setup.model_cfg.dtype} ({format_bytes(adapters)}), {how}"


def _layer_copy_bytes(setup: AbstractSetup, mesh, policy) -> int:
    """The decoder's per-layer weight copies decode reads (`TextModel.decode_layers`, made once per
    generation from the sampler view): every leaf under `text/layers/` of the view (LoRA: the base's and
    the adapters') at the compute dtype, in the decode layout. Exact."""
    lora = setup.lora_cfg is not None
    return sum(
        _decode_view_bytes(setup, tree, mesh, is_lora, prefix="text/layers/")
        for tree, is_lora in ((setup.frozen, False), (policy, lora))
    )


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _lora_activation_bytes(
    setup: AbstractSetup,
    adapters,
    rows: int,
    seq: int,
    mesh: dict[str, int],
    *,
    sets: int = 1,
    backward: bool = True,
) -> tuple[int, str]:
    """LoRA's own activations for `sets` adapter sets shaped like `adapters` (PPO: the policy's and the
    value model's). The adapters are applied, never merged (`lora.attach`: `y = x W + s (x A) B`), so no
    kernel-sized buffer exists: per adapted layer the rank-r product `x A` of the micro-batch's tokens is
    saved for the backward (remat none/dots; remat full recomputes it), and with dropout one dropped copy
    of the widest adapted input lives at a time. ESTIMATE."""
    from qwenvl_jax.train import lora as lora_lib

    a = np.dtype(setup.model_cfg.dtype).itemsize
    tokens = rows / (mesh["data"] * mesh["fsdp"]) * seq
    rank = setup.lora_cfg.rank
    flat = lora_lib.flatten(setup.frozen)
    layers = sum(int(np.prod(flat[t].shape[:-2])) for t in adapters)  # adapted (layer, kernel) pairs
    widest = max(flat[t].shape[-2] for t in adapters)
    saved = layers * tokens * rank * a if backward and setup.model_cfg.remat != "full" else 0.0
    transient = tokens * (rank + (widest if setup.lora_cfg.dropout > 0 else 0)) * a
    note = f"x A of {layers} adapted layers ({'saved' if saved else 'recomputed'}), rank {rank}"
    if sets > 1:
        note = f"{sets} adapter sets x ({note})"
    return round(sets * (saved + transient)), note


def _dequantized_layer_bytes(setup: AbstractSetup, mesh: dict[str, int]) -> tuple[int, str] | None:
    """QLoRA: the NF4 kernels of the largest stack's layer dequantized at the compute dtype (`Dense`
    dequantizes at use, whole along FSDP, split by tensor parallelism), two layers' worth: the layer a
    pass is in and its recomputation in the backward. None without quantized kernels. ESTIMATE."""
    from qwenvl_jax.quant import is_nf4
    from qwenvl_jax.train import lora as lora_lib

    per_stack: dict[str, int] = {}
    for path, x in lora_lib.flatten(setup.frozen).items():
        if is_nf4(x):
            stack = path.split("/")[0] + "/" + path.split("/")[1]
            per_stack[stack] = per_stack.get(stack, 0) + int(np.prod(x.shape[-2:]))
    if not per_stack:
        return None
    stack, elements = max(per_stack.items(), key=lambda kv: kv[1])
    a = np.dtype(setup.model_cfg.dtype).itemsize
    return round(2 * elements * a / mesh["tensor"]), f"2 layers of {stack} at {setup.model_cfg.dtype}"


def _reward_model_bytes(config: dict, setup: AbstractSetup, mesh) -> tuple[int, str] | None:
    """PPO's frozen reward model on one device (`train.loop._ppo_models`), or None without one: every
    parameter of its backbone at the policy's compute dtype, laid out by `DEFAULT_RULES` like frozen
    params (`sharding.shard_model`), plus its float32 head `(hidden, 1)`, whole on every device. Its
    architecture is read from `ppo.reward_model`'s config.json where the path exists, else taken to be the
    policy's. Exact."""
    import jax
    from flax import nnx

    from qwenvl_jax.loading import abstract_model
    from qwenvl_jax.train.state import param_logical_axes

    path = ppo_settings(config)["reward_model"]
    if not path:
        return None
    cfg, source = setup.model_cfg, "the policy's architecture"
    if Path(path).exists():
        cfg, source = model_config({**config, "model": {**(config.get("model") or {}), "path": path}})
    model = abstract_model(cfg)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fractions = _device_fraction_tree(params, param_logical_axes(model), mesh, False)
    itemsize = np.dtype(setup.model_cfg.dtype).itemsize
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(fractions), strict=True)
    backbone = round(sum(int(np.prod(x.shape)) * itemsize * f for x, f in leaves))
    head = cfg.text.hidden_size * 4
    return backbone + head, f"{source}; every param at {setup.model_cfg.dtype} + the float32 head"


def _batch_bytes(config: dict, model_cfg, shape: dict[str, int]) -> int:
    """One step's stacked batch on one device: row-sharded keys split over data x fsdp, the packed vision
    inputs replicated (`sharding.batch_axes`)."""
    from qwenvl_jax.sharding import batch_axes

    unpacked = {**config, "batch": {k: v for k, v in batch_section(config).items() if k != "pack"}}
    shards = shape["data"] * shape["fsdp"]
    total = 0
    for key, x in abstract_batch(unpacked, model_cfg).items():
        nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        total += nbytes / shards if "batch" in batch_axes(key, len(x.shape) - 1) else nbytes
    return round(total)


# --------------------------------------------------------------------------------------------- plan


def plan(config: dict) -> Plan:
    """The per-device memory plan of a training config (a YAML file's contents); allocates nothing."""
    import jax
    from jax.sharding import AbstractMesh, AxisType

    from qwenvl_jax.sharding import MESH_AXES

    kind = config.get("kind", "sft")
    if kind not in ("sft", "dpo", "grpo", "reward", "ppo"):
        raise ValueError(f"kind must be sft, dpo, grpo, reward or ppo, got {kind!r}")
    setup = abstract_setup(config)
    shape = mesh_shape(config)
    mesh = AbstractMesh(tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    lora = setup.lora_cfg is not None
    params = setup.state.params
    policy = params  # what the sampler reads and the reference copies; PPO's params also hold the value model
    if kind == "ppo":
        from qwenvl_jax.train.ppo_step import split_ppo

        policy = split_ppo(params)[0]
    param_fr = _device_fraction_tree(params, setup.logical_axes, mesh, lora)
    frozen_fr = _device_fraction_tree(setup.frozen, setup.logical_axes, mesh, False)
    trainable_bytes = _bytes(params, param_fr)
    accum = int(config.get("grad_accum", 1))
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(params)})

    held = "/".join(dtypes) + ("; policy + value model + value head" if kind == "ppo" else "")
    rows = [
        Row("trainable params", trainable_bytes, "state", True, held),
        Row("frozen params", _bytes(setup.frozen, frozen_fr), "state", True),
    ]
    if _holds_reference(config, lora):
        note = {"dpo": "DPO without LoRA", "grpo": "GRPO beta > 0 without LoRA",
                "ppo": "PPO without LoRA: the initial policy"}[kind]  # fmt: skip
        policy_bytes = _bytes(policy, _device_fraction_tree(policy, setup.logical_axes, mesh, False))
        rows.append(Row("reference params", policy_bytes + rows[1].bytes, "state", True, note))
    reward = _reward_model_bytes(config, setup, mesh) if kind == "ppo" else None
    if reward is not None:
        rows.append(Row("reward model", reward[0], "state", True, reward[1]))
    rows.append(Row("optimizer state", _opt_state_bytes(setup, param_fr), "state", True, "AdamW mu, nu"))
    rows.append(Row("gradients", trainable_bytes, "state", True))
    rows.append(
        Row("batch inputs", _batch_bytes(config, setup.model_cfg, shape), "state", True, "x grad_accum")
    )
    if accum > 1:
        rows.append(Row("micro-batch gradient", trainable_bytes, "backward", True, f"grad_accum {accum}"))

    batch = batch_section(config)
    rows_mb = batch_rows(config)
    seq = max(batch.get("seq_buckets") or [1024])
    patches = int(batch.get("image_patches", 0)) + int(batch.get("video_patches", 0))
    if kind in ("dpo", "reward"):  # a pair's images are encoded once (`data.collate_pairs`)
        patches //= 2
    if kind == "grpo":  # a prompt's images once per micro-batch (`rl.batch.shared_vision_budget`)
        budget = grpo_vision_budget(config, setup.model_cfg.vision.spatial_merge_size)
        patches = budget["image_patches"] + budget["video_patches"]
    chunk = int(config.get("chunk_size", 1024))
    from qwenvl_jax.train.loop import frame_bound

    frame = frame_bound(batch, data=config.get("data"))
    act, formula = activation_estimate(setup.model_cfg, rows_mb, seq, patches, chunk, shape, frame)
    # PPO differentiates the policy's and the value model's forward in one loss: both models' saved
    # activations live until the backward, both adapter sets' among them.
    models = 2 if kind == "ppo" else 1
    if models > 1:
        formula = f"2 models (policy, value) x [{formula}]"
    what = "one micro-batch" if models == 1 else "one micro-batch through the policy and the value model"
    rows.append(Row("activations", models * act, "backward", False, what))
    if lora:
        own, note = _lora_activation_bytes(setup, policy, rows_mb, seq, shape, sets=models)
        rows.append(Row("LoRA activations", own, "backward", False, note))
    dequantized = _dequantized_layer_bytes(setup, shape)
    if dequantized:
        rows.append(Row("dequantized kernels", dequantized[0], "backward", False, dequantized[1]))
    rows.append(
        Row(
            "update temporaries",
            UPDATE_TEMP_COPIES * trainable_bytes,
            "update",
            False,
            f"{UPDATE_TEMP_COPIES} trainable-sized buffer (the update; moments are written in place)",
        )
    )
    rollout, prefill_formula, scoring_formula = None, "", ""
    if kind in ("grpo", "ppo"):
        rollout = rollout_shape(config, setup.model_cfg)
        rows += _cache_rows(rollout, setup.model_cfg, mesh)
        pre, prefill_formula = prefill_estimate(
            setup.model_cfg, rollout.prompts, rollout.prompt_len, rollout.vision_patches, shape, frame
        )
        rows.append(Row("prefill activations", pre, "rollout", False, f"{rollout.prompts} prompts"))
        rows_dev = rollout.rows / shape["data"] / shape["fsdp"]
        rows_dev = rows_dev if rows_dev.is_integer() else rollout.rows
        logits = DECODE_LOGIT_COPIES * rows_dev * setup.model_cfg.text.vocab_size * 4
        rows.append(
            Row(
                "decode logits",
                round(logits),
                "rollout",
                False,
                f"{DECODE_LOGIT_COPIES} x {rows_dev:g} rows x {setup.model_cfg.text.vocab_size} float32",
            )
        )
        view, note = _sampler_view_bytes(setup, mesh, policy)
        rows.append(Row("sampler view", view, "rollout", True, note))
        layers = _layer_copy_bytes(setup, mesh, policy)
        rows.append(
            Row("decode layer copies", layers, "rollout", True, "the view's decoder layers, one array each")
        )
    if kind == "ppo":
        score, scoring_formula = _scoring_estimate(
            setup.model_cfg, rows_mb, seq, patches, chunk, shape, frame
        )
        rows.append(Row("scoring activations", score, "scoring", False, "one micro-batch, forward only"))
        if lora:  # the policy's and the value model's adapters; the reference is the bare base
            own, note = _lora_activation_bytes(setup, policy, rows_mb, seq, shape, sets=2, backward=False)
            rows.append(Row("scoring LoRA activations", own, "scoring", False, note))

    notes = []
    if any(np.dtype(d).itemsize < 4 for d in dtypes):
        notes.append(
            f"trainable params are {'/'.join(dtypes)}: AdamW keeps its moments in the same dtype "
            "(no float32 master weights)"
        )
    if _holds_reference(config, lora):
        notes.append(f"{kind.upper()} reference: a second full param tree (no LoRA to disable)")
    if lora and (kind == "ppo" or (kind == "grpo" and float(grpo_settings(config)["beta"]))):
        notes.append(f"{kind.upper()} reference: the base with the adapters disabled (no copy)")
    if kind == "ppo":
        value = "a second adapter set on the one frozen base" if lora else "a second full trainable tree"
        notes.append(
            f"PPO value model: {value} and a (hidden, 1) float32 head, trained with the policy in one loss "
            "(one optimizer state for both)"
        )
        if reward is None:
            notes.append("PPO: no ppo.reward_model; the reward functions score the completions")
    if batch.get("pack"):
        notes.append("batch.pack: batch shapes and activations are those of unpacked rows")
    trainable_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return Plan(
        kind=kind,
        trainable=config.get("trainable", "full"),
        model_source=setup.source,
        param_count=setup.param_count,
        trainable_count=trainable_count,
        trainable_dtype="/".join(dtypes),
        target=parse_target(config.get("target")),
        mesh=shape,
        rows_per_micro_batch=rows_mb,
        seq_len=seq,
        vision_patches=patches,
        grad_accum=accum,
        rows=tuple(rows),
        activation_formula=formula,
        notes=tuple(notes),
        rollout=rollout,
        prefill_formula=prefill_formula,
        scoring_formula=scoring_formula,
        config_for_hosts={
            **{k: config[k] for k in ("batch", "grad_accum", "grpo", "ppo", "mesh") if k in config},
            "kind": kind,
        },
    )


def _holds_reference(config: dict, lora: bool) -> bool:
    """A frozen full copy of the initial policy: DPO (unless reference-free), GRPO with beta > 0 and PPO,
    all without LoRA (with it the reference is the base with the adapters disabled), as `train.loop` does."""
    kind = config.get("kind", "sft")
    if lora or kind in ("sft", "reward"):
        return False
    if kind == "ppo":
        return True
    if kind == "dpo":
        return not (config.get("dpo") or {}).get("reference_free", False)
    return bool(float(grpo_settings(config)["beta"]))


def format_bytes(n: float) -> str:
    """`n` bytes in GiB, MiB or KiB with two decimals: "6.43 GiB"."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if n >= scale / 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.2f} KiB"


def _size(n: float) -> str:
    """`format_bytes` right-aligned for the plan's table column."""
    return f"{format_bytes(n):>13}"


def format_plan(p: Plan) -> str:
    """A readable table of the plan (what `qwenvl-jax train --dry-run` prints)."""
    mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.items())
    tokens = p.rows_per_micro_batch * p.seq_len
    lines = [
        f"{p.kind} ({p.trainable}), model {p.model_source}: {p.param_count:,} params, "
        f"{p.trainable_count:,} trainable ({p.trainable_dtype})",
        f"mesh {mesh} = {p.num_devices} device(s); target "
        + (
            f"{p.target.name}: {p.target.num_devices} x {p.target.chip.name}, "
            f"{p.target.chip.memory_bytes / GIB:.1f} GiB each"
            if p.target
            else "not given (no memory budget)"
        ),
    ]
    if p.target is not None and p.target.hosts > 1:
        h, b = p.target.hosts, p.config_for_hosts["batch"]
        share = ", ".join(
            f"{b[k] // h} {k}" for k in ("batch_size", "image_patches", "video_patches") if b.get(k)
        )
        lines.append(
            f"hosts: {h} processes x {p.target.local_devices} local devices (one command on every host, "
            f"`distributed`); each collates its share of the batch: {share}; the figures below are per device"
        )
    lines += [
        f"micro-batch {p.rows_per_micro_batch} rows{' (chosen + rejected)' if p.kind in ('dpo', 'reward') else ''} x "
        f"{p.seq_len} tokens ({tokens:,} tokens, "
        f"{p.vision_patches} vision patches) x grad_accum {p.grad_accum} = "
        f"{p.rows_per_micro_batch * p.grad_accum} rows / {tokens * p.grad_accum:,} tokens per step; "
        f"rows per device: {p.rows_per_device:g}",
    ]
    if p.rollout is not None:
        r = p.rollout
        batch = (
            f"{r.prompts} prompts x 1 completion (batch_size x grad_accum x num_mini_batches)"
            if p.kind == "ppo"
            else f"{r.prompts} prompts x {r.num_generations} generations = {r.rows} completions"
        )
        lines.append(
            f"rollout {batch} per generation batch; "
            f"prompt bucket {r.prompt_len} + {r.max_completion_length} new tokens -> {r.cache_slots} cache "
            f"slots; {r.vision_patches} vision patches in prefill"
        )
    lines.append("")
    titles = {"state": "state", "backward": "forward/backward", "update": "update", "rollout": "rollout",
              "scoring": "scoring"}  # fmt: skip
    shown = [ph for ph in PHASES if ph in PHASES[:3] or any(r.phase == ph for r in p.rows)]
    for phase in shown:
        title = titles[phase]
        lines.append(f"{title + ' (per device)':<30}{_size(p.phase_bytes(phase))}")
        for r in p.rows:
            if r.phase == phase:
                note = r.note if r.exact else f"estimate: {r.note}"
                lines.append(f"  {r.name:<28}{_size(r.bytes)}  {note}")
        if phase == "backward":
            lines.append(f"  {'':<28}{'':13}  activations: {p.activation_formula}")
        if phase == "rollout":
            lines.append(f"  {'':<28}{'':13}  prefill: {p.prefill_formula}")
        if phase == "scoring":
            lines.append(f"  {'':<28}{'':13}  scoring: {p.scoring_formula}")
    phases = ", ".join(titles[phase] for phase in shown[1:])
    lines.append(
        f"{'peak (estimate)':<30}{_size(p.peak_bytes)}  state + max({phases}); "
        f"{titles[p.binding_phase]} binds"
    )
    if p.usable_bytes is not None:
        verdict = "FITS" if p.fits else "DOES NOT FIT"
        lines.append(
            f"{'usable':<30}{_size(p.usable_bytes)}  {USABLE_FRACTION:.0%} of HBM -> {verdict} "
            f"({p.peak_bytes / p.usable_bytes:.0%} of usable)"
        )
    lines += [f"note: {n}" for n in p.notes]
    lines += [f"PROBLEM: {n}" for n in p.problems]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- step shapes


def abstract_batch(config: dict, model_cfg) -> dict[str, Any]:
    """ShapeDtypeStructs of one step's batch: `collate`'s output for the config's BatchSpec (largest
    bucket, full vision budgets) with the leading micro-batch axis of `stack_micro_batches`; DPO adds the
    `completion_mask` its step reads, GRPO the `advantages (B,)` and `sampling_per_token_logps (B, S-1)`
    of `rl.batch.micro_batches` (and `old_per_token_logps (B, S-1)` where `train.grpo.GrpoSource` computes
    them: a generation batch served over more than one optimizer step), PPO the per-response arrays of
    `train.ppo.PpoSource.collate` (`ppo_step.PPO_KEYS`, `(B, T)`, T = `ppo.max_completion_length`)."""
    import jax

    from qwenvl_jax.processing.batch import BatchSpec, collate

    batch = batch_section(config)
    if batch.pop("pack", False):
        raise ValueError("check_step_shapes: packed batches (batch.pack) are not modelled")
    rows = batch_rows(config)
    spec = BatchSpec.from_dict(
        batch,
        batch_size=rows,
        pad_token_id=model_cfg.bos_token_id,
        image_token_id=model_cfg.image_token_id,
        video_token_id=model_cfg.video_token_id,
        merge_size=model_cfg.vision.spatial_merge_size,
        patch_size=model_cfg.vision.patch_size,
        window_size=model_cfg.vision.window_size,
    )
    # Shapes depend only on the spec: one row of the longest bucket with one merged image unit is enough.
    ids = np.full(spec.seq_buckets[-1], model_cfg.bos_token_id, np.int64)
    example: dict[str, Any] = {"input_ids": ids, "labels": ids.copy()}
    if spec.image_patches:
        unit = spec.merge_size**2
        ids[1] = model_cfg.image_token_id
        example["pixel_values"] = np.zeros((unit, model_cfg.vision.patch_dim), np.float32)
        example["image_grid_thw"] = np.array([[1, spec.merge_size, spec.merge_size]])
    if config.get("kind", "sft") in ("dpo", "reward"):  # pairs: `collate_pairs`' shapes (images once)
        from qwenvl_jax.data.pipeline import collate_pairs

        out = collate_pairs([(example, dict(example))], spec)
    elif config.get("kind", "sft") == "grpo":  # a prompt's rows share its images (`rl.batch.micro_batches`)
        unit = spec.merge_size**2
        slots = {"image": spec.image_patches // unit, "video": spec.video_patches // unit}
        shared = dataclasses.replace(spec, **grpo_vision_budget(config, spec.merge_size))
        out = collate([example], shared, share=[None], slots=slots)
    else:
        out = collate([example], spec)
    if config.get("kind", "sft") == "dpo":
        out["completion_mask"] = (out["labels"] != -100).astype(np.int32)
    if config.get("kind", "sft") == "reward":  # scored at the last token: the loop drops the labels
        out.pop("labels")
    if config.get("kind", "sft") == "grpo":  # rl.batch.micro_batches' additions
        out["advantages"] = np.zeros(rows, np.float32)
        out["sampling_per_token_logps"] = np.zeros((rows, out["input_ids"].shape[1] - 1), np.float32)
        g = grpo_settings(config)
        accum = int(config.get("grad_accum", 1))
        if accum % (int(g.get("steps_per_generation") or accum) * int(g.get("num_iterations", 1))):
            # The policy moves while a generation batch is still served: `GrpoSource` adds old log-probs.
            out["old_per_token_logps"] = out["sampling_per_token_logps"].copy()
    if config.get("kind", "sft") == "ppo":
        from qwenvl_jax.train.ppo_step import PPO_KEYS

        t = int(ppo_settings(config)["max_completion_length"])
        dtypes = {"response_index": np.int32, "padding_mask": bool, "padding_mask_p1": bool}
        out.update({k: np.zeros((rows, t), dtypes.get(k, np.float32)) for k in PPO_KEYS})
    accum = int(config.get("grad_accum", 1))
    return {k: jax.ShapeDtypeStruct((accum, *np.shape(v)), np.asarray(v).dtype) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class StepCheck:
    state: Any  # the new TrainState, ShapeDtypeStructs
    metrics: dict[str, Any]
    attention_backend: str  # the backend traced (see check_step_shapes)


def _traceable(config: dict) -> dict:
    """`config` with a fused attention backend (`cudnn`, `splash`) swapped for `xla` when the default
    backend is not its platform (`loop.BACKEND_PLATFORMS`): compiling the cuDNN or Mosaic call needs that
    platform, and every backend takes and returns the same shapes."""
    import jax

    from qwenvl_jax.train.loop import BACKEND_PLATFORMS

    model = dict(config.get("model") or {})
    platform = BACKEND_PLATFORMS.get(model.get("attention_backend"))
    if platform is not None and jax.default_backend() != platform:
        model["attention_backend"] = "xla"
        return {**config, "model": model}
    return config


def step_and_args(config: dict, *, sharded: bool, model_cfg=None):
    """`(setup, jitted step, abstract args)` of the config's real train step; `sharded`: on a mesh of the
    config's shape over the available devices, with the step's explicit shardings; `model_cfg` as
    `abstract_setup`'s. `step.lower(*args).compile()` gives XLA's cost and memory analysis of the real
    program without allocating it (`bench/compute_at_scale.py`)."""
    import jax

    from qwenvl_jax import sharding as shd
    from qwenvl_jax.train.step import make_train_step, nnx_full_params_like

    setup = abstract_setup(config, model_cfg)
    kind = config.get("kind", "sft")
    batch = abstract_batch(config, setup.model_cfg)
    step_kw: dict[str, Any] = {"chunk_size": int(config.get("chunk_size", 1024))}
    num_items = jax.ShapeDtypeStruct((), np.float32)  # the host's count (sft_step, grpo_step)
    lora = setup.lora_cfg is not None
    # PPO's reference enters the scoring pass only, never the train step.
    with_ref = _holds_reference(config, lora) and kind != "ppo"
    ref = (nnx_full_params_like(setup.frozen, setup.state, None),) if with_ref else ()
    if kind == "sft":
        step_kw["loss_type"] = config.get("loss_type", "nll")
        extra: tuple = (num_items,)
    elif kind == "grpo":
        from qwenvl_jax.train.grpo import grpo_step_kw

        step_kw = grpo_step_kw(_run_config(config))
        extra = (num_items, *ref)
    elif kind == "ppo":
        from qwenvl_jax.train.ppo import ppo_step_kw

        step_kw = ppo_step_kw(_run_config(config))
        extra = ()
    elif kind == "reward":
        reward = config.get("reward") or {}
        pad = int((config.get("batch") or {}).get("pad_token_id", 151643))  # shapes only: any id
        step_kw = {"pad_token_id": pad, "margin": float(reward.get("margin", 0.0)),
                   "center_rewards_coefficient": reward.get("center_rewards_coefficient")}  # fmt: skip
        extra = ()
    else:
        step_kw.update(config.get("dpo") or {})
        extra = ref
    if sharded:
        step_kw.update(
            state=setup.state,
            frozen=setup.frozen,
            batch=batch,
            logical_axes=setup.logical_axes,
            mesh=shd.make_mesh(**mesh_shape(config)),
            with_ref_params=bool(ref),
        )
    step = make_train_step(kind, setup.graphdef, setup.tx, lora_cfg=setup.lora_cfg, **step_kw)
    return setup, step, (setup.state, setup.frozen, batch, *extra)


def check_step_shapes(config: dict) -> StepCheck:
    """`jax.eval_shape` of the config's real jitted train step (`make_train_step`, no mesh) on the abstract
    state and batch (plus the host's `num_items_in_batch` scalar for SFT/GRPO and the frozen reference
    copy where the step reads one: DPO, GRPO); raises if the new state's structure, shapes or dtypes
    differ from the input state's (a donated state must come back alike). A `cudnn` config is traced with
    `xla` off GPU (`StepCheck.attention_backend` says which).
    """
    import jax

    setup, step, args = step_and_args(_traceable(config), sharded=False)
    new_state, metrics = jax.eval_shape(step, *args)
    before = jax.tree_util.tree_flatten_with_path(setup.state)[0]
    after = jax.tree_util.tree_flatten_with_path(new_state)[0]
    if len(before) != len(after):
        raise ValueError(f"the step returns a state of {len(after)} leaves for {len(before)}")
    for (path, x), (_, y) in zip(before, after, strict=True):
        if (x.shape, x.dtype) != (y.shape, y.dtype):
            raise ValueError(
                f"state leaf {jax.tree_util.keystr(path)}: {x.shape} {x.dtype} in, {y.shape} {y.dtype} out"
            )
    return StepCheck(new_state, metrics, setup.model_cfg.attention_backend)


def compiled_memory(config: dict) -> dict[str, int]:
    """XLA's own per-device figures for the config's real step: lower and COMPILE it for the default
    backend (on the config's mesh, which needs that many devices: on CPU set
    `XLA_FLAGS=--xla_force_host_platform_device_count=N`) and read `memory_analysis()`. Nothing is
    allocated, but compiling a full-size step takes 10-60 s on CPU. Keys: argument, output, alias, temp
    and peak = argument + output - alias + temp (bytes). On a GPU host this is the figure to trust; on
    CPU it holds bf16 matmul operands in fp32 (XLA:CPU computes bf16 dots in fp32), so it overstates
    bf16 models (docs/training.md).
    """
    sharded = math.prod(mesh_shape(config).values()) > 1
    _, step, args = step_and_args(_traceable(config), sharded=sharded)
    stats = step.lower(*args).compile().memory_analysis()
    out = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


__all__ = [
    "CHIPS",
    "DECODE_LOGIT_COPIES",
    "PHASES",
    "USABLE_FRACTION",
    "Plan",
    "Rollout",
    "Row",
    "StepCheck",
    "Target",
    "abstract_batch",
    "activation_estimate",
    "check_step_shapes",
    "compiled_memory",
    "format_plan",
    "parse_target",
    "plan",
    "prefill_estimate",
    "rollout_shape",
]
