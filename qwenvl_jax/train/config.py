"""Run configs: YAML (plus `--set key=value` overrides) -> one validated schema -> a plain dict.

The whole config is checked before anything is built or written, so a typo or a wrong value fails in a
second with the key, the value and what is allowed, instead of a traceback after minutes of loading:

    kind: sft | dpo | grpo | reward | ppo
    target: 1xh100                 # hardware of the memory plan (`train.plan`, `--dry-run`): NxH100,
                                   # NxH200, v5p-CORES; not used by the run itself
    run_dir: DIR                   # metrics.jsonl, tensorboard/, loss_curves.png, checkpoints/, final/
    steps: 20                      # optimizer steps in total (a resumed run continues up to it)
    seed: 0                        # train-state rng (LoRA dropout) and data shuffling
    model: {preset: tiny, random_seed: 0}    # random weights, no downloads; or {path: DIR} (HF or Orbax)
           dtype: float32, param_dtype: float32, remat: none|full|dots, attention_backend: xla|cudnn|splash
    processor: DIR                 # default: model.path, or the tiny processor written into run_dir
    data: {paths: [a.jsonl, ...]}  # or {synthetic: N}: N shape-drawing records written into run_dir/data
          shuffle, num_epochs (null = repeat), worker_count, policy: skip|strict, max_length,
          mask_vision_tokens, columns: {prompt: problem} (rename a data set's columns),
          min_pixels, max_pixels (the processor's image resize bounds), prompt_suffix (GRPO)
    batch: {batch_size, seq_buckets, image_patches, max_images, ..., pack}   # `BatchSpec` fields + pack;
                                   # for DPO and reward batch_size counts PAIRS (2 x pairs rows)
    grad_accum: 1                  # micro-batches per optimizer step (padded to one length)
    trainable: full | frozen_vision | lora,  train_merger: true
    lora: {rank, alpha, dropout, targets, scopes, quantize: nf4, quantize_vision}  # `LoraConfig` fields
    optim: {learning_rate, warmup_steps, schedule, ...}              # `OptimConfig` fields
    mesh: {data: 1, fsdp: 1, tensor: 1}                              # omitted: one device, no mesh
    distributed: {auto: true} | {coordinator_address, num_processes, process_id}   # multi-host
                                   # (`qwenvl_jax.distributed`; env QWENVL_* may give the last three)
    dpo: {loss_type, beta, label_smoothing, reference_free, ...}     # `losses.dpo_objective` keywords
    grpo: {num_generations, max_prompt_length, max_completion_length, temperature, top_p, top_k,
           loss_type, beta, epsilon, scale_rewards, ...}             # sampling + `losses.grpo_loss` keywords
    ppo: {reward_model, value_init, num_ppo_epochs, num_mini_batches, kl_coef, cliprange, vf_coef, ...}
                                   # TRL 0.22.1 PPOConfig's names (+ sampling, verl's extensions)
    rewards: [accuracy_reward, {name: pkg.mod:fn, weight: 0.5}, ...]   # GRPO / PPO reward functions
    reward: {margin: 0.0, center_rewards_coefficient: null, head_init_std: 0.02}   # reward model (DPO pairs)
    checkpoint: {every: 50, keep: 3, async: true}
    max_bad_steps: 10              # stop after this many non-finite (skipped) steps in a row
    max_skipped_fraction: 0.1      # a finished run with more skipped steps than this exits 4
    loss_type: nll | dft, chunk_size: 1024
    logging: {progress: true, tensorboard: true, plot: true}

The schema is pydantic models, one per section (`RunConfig`); a test keeps each section's fields equal to
the dataclass it configures (`BatchSpec`, `LoraConfig`, `OptimConfig`, `dpo_objective`'s keywords).
`resolve` returns the defaults-merged dict with every value coerced to its declared type, which is what
the loop and the planner read.

YAML: numbers in either notation are numbers (`1e-5` as well as `1.0e-5`; YAML 1.1 reads the former as a
string), in files and in `--set`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

DEFAULTS: dict[str, Any] = {
    "kind": "sft",
    "target": None,
    "run_dir": None,
    "steps": 20,
    "seed": 0,
    "model": {"preset": "tiny", "random_seed": 0, "dtype": "float32", "param_dtype": "float32"},
    "processor": None,
    "data": {"shuffle": True, "num_epochs": None, "worker_count": 0, "policy": "skip"},
    "batch": {"batch_size": 2},
    "grad_accum": 1,
    "trainable": "full",
    "train_merger": True,
    "lora": {},
    "optim": {},
    "mesh": None,
    "distributed": None,
    "dpo": {},
    "grpo": {},
    "ppo": {},
    "rewards": None,
    "reward": {},
    "checkpoint": {"every": 50, "keep": 3, "async": True},
    "max_bad_steps": 10,
    "max_skipped_fraction": 0.1,
    "loss_type": "nll",
    "chunk_size": 1024,
    "logging": {"progress": True, "tensorboard": True, "plot": True},
}

# Filled in by the loop from the batch itself, never by the user.
_DPO_INTERNAL = ("policy_token_logps", "ref_token_logps", "completion_mask", "policy_log_sum_sq_probs",
                 "ref_chosen_logps", "ref_rejected_logps", "token_stats", "attention_mask", "pair_mask")  # fmt: skip


class ConfigError(ValueError):
    """A config key or value that cannot be run; the message names the key."""


# ------------------------------------------------------------------------------------------- schema
# Integers and booleans are strict: YAML gives them typed, and `batch_size: yes` must not become 1.
Int = Annotated[int, Strict()]
PosInt = Annotated[int, Strict(), Field(gt=0)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
Bool = Annotated[bool, Strict()]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Dtype = Literal["float32", "bfloat16", "float16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    path: str | None = None
    preset: str | None = None
    random_seed: NonNegInt = 0
    dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"
    remat: Literal["none", "full", "dots"] | None = None
    attention_backend: Literal["xla", "cudnn", "splash"] | None = None

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value):
        from qwenvl_jax.config import PRESETS

        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset; known: {sorted(PRESETS)}")
        return value


class DataSection(_Section):
    paths: list[str] | str | None = None
    synthetic: PosInt | None = None
    shuffle: Bool = True
    num_epochs: PosInt | None = None
    worker_count: NonNegInt = 0
    policy: Literal["skip", "strict"] = "skip"
    max_length: PosInt | None = None
    mask_vision_tokens: Bool | None = None
    columns: dict[str, str] | None = None  # rename columns at read time, e.g. {prompt: problem}
    prompt_suffix: str | None = None  # GRPO: appended to each prompt (a task's format instructions)
    min_pixels: PosInt | None = None  # override the processor's image resize bounds
    max_pixels: PosInt | None = None


class BatchSection(_Section):
    batch_size: PosInt = 2
    seq_buckets: list[PosInt] | None = None
    image_patches: NonNegInt | None = None
    video_patches: NonNegInt | None = None
    max_images: NonNegInt | None = None
    max_videos: NonNegInt | None = None
    max_frame_patches: NonNegInt | None = None
    padding_side: Literal["left", "right"] | None = None
    pad_token_id: NonNegInt | None = None
    image_token_id: NonNegInt | None = None
    video_token_id: NonNegInt | None = None
    merge_size: PosInt | None = None
    patch_size: PosInt | None = None
    window_size: PosInt | None = None
    tokens_per_second: Annotated[float, Field(gt=0)] | None = None
    rope_rule: Literal["5.24", "legacy"] | None = None
    pack: Bool = False

    @model_validator(mode="after")
    def _spec(self):
        from qwenvl_jax.processing.batch import BatchSpec

        values = self.model_dump(exclude_none=True, exclude={"pack"})
        if "seq_buckets" in values:
            values["seq_buckets"] = tuple(values["seq_buckets"])
        BatchSpec(**values)  # its own checks: increasing buckets, budgets in whole merge blocks
        return self


class LoraSection(_Section):
    rank: PosInt = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    targets: list[str] | None = None
    scopes: list[str] | None = None
    quantize: Literal["nf4"] | None = None
    quantize_vision: bool = False


class OptimSection(_Section):
    learning_rate: Annotated[float, Field(gt=0)] = 1e-5
    warmup_steps: NonNegInt = 0
    total_steps: PosInt | None = None
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr_ratio: Fraction = 0.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    b1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    b2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    eps: Annotated[float, Field(gt=0)] = 1e-8
    max_grad_norm: Annotated[float, Field(ge=0)] | None = 1.0


def _dpo_loss_type():
    from qwenvl_jax.losses import DPO_LOSS_TYPES

    return DPO_LOSS_TYPES


class DpoSection(_Section):
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: Annotated[float, Field(gt=0)] = 0.1
    label_smoothing: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.0
    ld_alpha: Fraction | None = None
    use_weighting: Bool = False
    reference_free: Bool = False
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: Annotated[float, Field(gt=0)] = 0.05
    cdpo: Bool = False
    bco_delta: float = 0.0

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value):
        known = _dpo_loss_type()
        for name in [value] if isinstance(value, str) else value:
            if name not in known:
                raise ValueError(f"unknown DPO loss type {name!r}; known: {list(known)}")
        return value


class GrpoSection(_Section):
    """Sampling, batch geometry and `losses.grpo_loss` / `losses.grpo_advantages` keywords (TRL 1.16's
    names and defaults)."""

    num_generations: Annotated[int, Strict(), Field(ge=2)] = 8
    steps_per_generation: PosInt | None = None  # micro-batches per generation batch (default: grad_accum)
    num_iterations: PosInt = 1  # passes over each generation batch
    max_prompt_length: PosInt = 512
    max_completion_length: PosInt = 256
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: NonNegInt = 0
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    mask_truncated_completions: Bool = False
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = "dapo"
    beta: Annotated[float, Field(ge=0)] = 0.0
    epsilon: Annotated[float, Field(gt=0)] = 0.2
    epsilon_high: Annotated[float, Field(gt=0)] | None = None
    delta: Annotated[float, Field(gt=1)] | None = None
    importance_sampling_level: Literal["token", "sequence"] = "token"
    use_bias_correction_kl: Bool = True
    top_entropy_quantile: Annotated[float, Field(gt=0, le=1)] = 1.0
    off_policy_mask_threshold: Annotated[float, Field(ge=0)] | None = None
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0
    sapo_temperature_pos: Annotated[float, Field(gt=0)] = 1.0
    sapo_temperature_neg: Annotated[float, Field(gt=0)] = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    vllm_importance_sampling_mode: (
        Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] | None
    ) = None
    vllm_importance_sampling_clip_min: Annotated[float, Field(ge=0)] | None = None
    vllm_importance_sampling_clip_max: Annotated[float, Field(gt=0)] = 3.0
    scale_rewards: Literal["group", "batch", "none"] = "group"
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    reward_weights: list[float] | None = None
    reward_policy: Literal["strict", "skip"] = "strict"
    log_completions_every: NonNegInt = 10
    log_completions_count: PosInt = 4


# Keys of the grpo section that are not `losses.grpo_loss` keywords.
GRPO_HOST_KEYS = ("num_generations", "steps_per_generation", "num_iterations", "max_prompt_length",
                  "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "mask_truncated_completions", "scale_rewards", "multi_objective_aggregation",
                  "reward_weights", "reward_policy", "log_completions_every", "log_completions_count")  # fmt: skip


class PpoSection(_Section):
    """TRL 0.22.1 `PPOConfig` keys and defaults (`response_length` is `max_completion_length`), the model
    sources, sampling, and verl's extensions (off by default). Rows per generation batch (TRL's
    `batch_size`): `batch.batch_size x grad_accum x num_mini_batches`, one completion per prompt."""

    reward_model: str | None = None  # a reward run's final/ or its HF export (`kind: reward`)
    # The value model's start: the reward model (TRL's default; full fine-tuning), or the policy (a new
    # head; with LoRA always: a second adapter set on the policy's base).
    value_init: Literal["reward_model", "policy"] | None = None
    max_prompt_length: PosInt = 512
    max_completion_length: PosInt = 53
    temperature: Annotated[float, Field(gt=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: NonNegInt = 0
    min_p: Annotated[float, Field(ge=0, lt=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0
    num_ppo_epochs: PosInt = 4
    num_mini_batches: PosInt = 1
    kl_coef: Annotated[float, Field(ge=0)] = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: Annotated[float, Field(gt=0)] = 0.2
    cliprange_value: Annotated[float, Field(gt=0)] = 0.2
    vf_coef: Annotated[float, Field(ge=0)] = 0.1
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0
    lam: Annotated[float, Field(ge=0, le=1)] = 0.95
    whiten_rewards: Bool = False
    missing_eos_penalty: float | None = None
    clip_ratio_c: Annotated[float, Field(gt=1)] | None = None  # dual-clip PPO (verl, OpenRLHF)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                           "seq-mean-token-sum-norm"] = "token-mean"  # fmt: skip
    kl_target: Annotated[float, Field(gt=0)] | None = None  # adaptive KL controller (arXiv 1909.08593)
    kl_horizon: PosInt = 10000
    reward_weights: list[float] | None = None
    reward_policy: Literal["strict", "skip"] = "strict"
    log_completions_every: NonNegInt = 10  # generation batches between samples in completions.jsonl
    log_completions_count: PosInt = 4


# Keys of the ppo section that `losses.ppo_loss` takes (the rest are the loop's).
PPO_LOSS_KEYS = ("cliprange", "cliprange_value", "vf_coef", "clip_ratio_c", "loss_agg_mode")


class RewardSection(_Section):
    """A reward model's objective (`losses.reward_loss`, TRL 1.16 RewardTrainer) and head init."""

    # Subtracted from every pair's r_c - r_r: TRL's per-record `margin` column, as one value for the run.
    margin: float = 0.0
    center_rewards_coefficient: Annotated[float, Field(ge=0)] | None = None  # TRL's default: no centring
    head_init_std: Annotated[float, Field(ge=0)] = 0.02  # N(0, std) as transformers inits `score`; 0: zeros


class MeshSection(_Section):
    data: PosInt = 1
    fsdp: PosInt = 1
    tensor: PosInt = 1


class DistributedSection(_Section):
    auto: Bool = False  # jax's cluster detection: TPU pod workers, SLURM, Open MPI
    coordinator_address: str | None = None  # host:port of process 0 (or QWENVL_COORDINATOR_ADDRESS)
    num_processes: PosInt | None = None  # (or QWENVL_NUM_PROCESSES)
    process_id: NonNegInt | None = None  # this host's (or QWENVL_PROCESS_ID: one config for every host)
    timeout_s: PosInt = 300
    heartbeat_s: PosInt = 100


class CheckpointSection(_Section):
    every: NonNegInt = 50
    keep: PosInt = 3
    async_: Bool = Field(True, alias="async")


class LoggingSection(_Section):
    progress: Bool = True
    tensorboard: Bool = True
    plot: Bool = True


class RunConfig(_Section):
    kind: Literal["sft", "dpo", "grpo", "reward", "ppo"] = "sft"
    target: str | None = None
    run_dir: str
    steps: PosInt = 20
    seed: NonNegInt = 0
    model: ModelSection
    processor: str | None = None
    data: DataSection
    batch: BatchSection
    grad_accum: PosInt = 1
    trainable: Literal["full", "frozen_vision", "lora"] = "full"
    train_merger: Bool = True
    lora: LoraSection
    optim: OptimSection
    mesh: MeshSection | None = None
    distributed: DistributedSection | None = None
    dpo: DpoSection
    grpo: GrpoSection
    ppo: PpoSection
    rewards: list[str | dict[str, Any]] | None = None
    reward: RewardSection
    checkpoint: CheckpointSection
    max_bad_steps: PosInt = 10
    max_skipped_fraction: Fraction = 0.1
    loss_type: Literal["nll", "dft"] = "nll"
    chunk_size: PosInt = 1024
    logging: LoggingSection

    @field_validator("run_dir")
    @classmethod
    def _non_empty(cls, value):
        if not value.strip():
            raise ValueError("run_dir is empty")
        return value

    @field_validator("target")
    @classmethod
    def _known_target(cls, value):
        from qwenvl_jax.train.plan import parse_target

        parse_target(value)
        return value


def _cross_checks(config: dict, given: dict) -> None:
    """Rules between sections; `given` is what the user wrote (before defaults)."""
    kind, trainable = config["kind"], config["trainable"]
    if given.get("lora") and trainable != "lora":
        raise ConfigError(f"a lora section needs trainable: lora (trainable is {trainable!r})")
    if config["lora"].get("quantize_vision") and not config["lora"].get("quantize"):
        raise ConfigError(
            "lora.quantize_vision: true needs lora.quantize: nf4 (the decoder is quantized first)"
        )
    if given.get("dpo") and kind != "dpo":
        raise ConfigError(f"a dpo section needs kind: dpo (kind is {kind!r})")
    if kind != "sft" and config["batch"].get("pack"):
        raise ConfigError(f"batch.pack=true: packing applies to SFT only, not kind: {kind}")
    if given.get("grpo") and kind != "grpo":
        raise ConfigError(f"a grpo section needs kind: grpo (kind is {kind!r})")
    if given.get("reward") and kind != "reward":
        raise ConfigError(f"a reward section needs kind: reward (kind is {kind!r})")
    if given.get("ppo") and kind != "ppo":
        raise ConfigError(f"a ppo section needs kind: ppo (kind is {kind!r})")
    if given.get("rewards") and kind not in ("grpo", "ppo"):
        hint = " (a reward model's section is `reward:`)" if kind == "reward" else ""
        raise ConfigError(f"rewards apply to kind: grpo or ppo (kind is {kind!r}){hint}")
    if kind in ("dpo", "reward"):  # a pair's images are encoded once, in half the budget
        from qwenvl_jax.processing.batch import pair_budget_problem

        merge = int(config["batch"].get("merge_size") or 2)
        for name in ("image_patches", "video_patches"):
            problem = pair_budget_problem(name, int(config["batch"].get(name) or 0), merge)
            if problem:
                raise ConfigError(f"{problem} (kind: {kind})")
    if kind == "ppo":
        _ppo_checks(config)
    if kind == "grpo":
        g = RunConfig.model_fields["grpo"].annotation.model_validate(config["grpo"])
        if not config.get("rewards"):
            raise ConfigError("kind: grpo needs rewards: [a reward function, ...] (e.g. accuracy_reward)")
        spg = g.steps_per_generation or config["grad_accum"]
        rows = config["batch"]["batch_size"] * spg
        if rows % g.num_generations:
            raise ConfigError(
                f"batch.batch_size x steps_per_generation = {rows} completions per generation is not a "
                f"multiple of grpo.num_generations={g.num_generations}: a generation must hold whole groups"
            )
        if (spg * g.num_iterations) % config["grad_accum"]:
            raise ConfigError(
                f"grpo.steps_per_generation x num_iterations = {spg * g.num_iterations} micro-batches per "
                f"generation is not a multiple of grad_accum={config['grad_accum']}: an optimizer step "
                "would straddle two generations"
            )
        from qwenvl_jax.train.grpo import micro_batch_budget

        try:  # a prompt's rows share its images in a smaller budget, which must split over the devices too
            micro_batch_budget(config)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        weights = config["grpo"].get("reward_weights")
        if weights is not None and len(weights) != len(config["rewards"]):
            raise ConfigError(
                f"grpo.reward_weights has {len(weights)} weights for {len(config['rewards'])} rewards"
            )
    data = config["data"]
    if data.get("paths") and data.get("synthetic"):
        raise ConfigError("data: give paths or synthetic, not both")
    if not data.get("paths") and not data.get("synthetic"):
        raise ConfigError("data needs paths: [a.jsonl, ...] or synthetic: N")
    if data.get("min_pixels") and data.get("max_pixels") and data["min_pixels"] > data["max_pixels"]:
        raise ConfigError(
            f"data.min_pixels={data['min_pixels']} is above data.max_pixels={data['max_pixels']}"
        )
    model = config["model"]
    if not model.get("path") and not model.get("preset"):
        raise ConfigError("model needs path: DIR (HF or Orbax checkpoint) or preset: NAME (random weights)")
    if trainable != "lora" and model["param_dtype"] != "float32":
        raise ConfigError(
            f"model.param_dtype={model['param_dtype']} with trainable: {trainable}: the master weights and "
            f"AdamW moments would be {model['param_dtype']}, where updates of ~1e-5 relative round away. "
            "Use param_dtype: float32 (dtype: bfloat16 keeps bf16 compute), or trainable: lora"
        )


def _ppo_checks(config: dict) -> None:
    p = config["ppo"]
    if not p.get("reward_model") and not config.get("rewards"):
        raise ConfigError(
            "kind: ppo needs ppo.reward_model: DIR (a reward run's final/) or rewards: [...], or both"
        )
    if config["trainable"] not in ("full", "lora"):
        raise ConfigError(f"kind: ppo trains with trainable: full or lora (got {config['trainable']!r})")
    if p.get("value_init") == "reward_model":
        if not p.get("reward_model"):
            raise ConfigError("ppo.value_init: reward_model needs ppo.reward_model")
        if config["trainable"] == "lora":
            raise ConfigError(
                "ppo.value_init: reward_model with trainable: lora: the value model is a second adapter set "
                "on the policy's base; use value_init: policy (or trainable: full)"
            )
    weights = p.get("reward_weights")
    if weights is not None and len(weights) != len(config.get("rewards") or []):
        raise ConfigError(
            f"ppo.reward_weights has {len(weights)} weights for {len(config.get('rewards') or [])} rewards"
        )


# --------------------------------------------------------------------------------------------- YAML
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.1 with YAML 1.2's float syntax: `1e-5` and `3E+2` are floats, not strings."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def parse_yaml(text: str, *, name: str) -> Any:
    """YAML text -> Python values; a syntax error is a `ConfigError` naming `name` and the line."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{name}: not valid YAML{line}: {problem}") from None


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, recursively for mappings (a `None` section replaces nothing below it)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """`["a.b=3", "run_dir=/tmp/x"]` -> config with those (YAML-parsed) values set at the dotted keys."""
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set expects key=value with a dotted key, got {item!r}")
        node = config
        *parents, last = key.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
        node[last] = parse_yaml(raw, name=f"--set {item!r}")
    return config


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config ({err})") from None
    config = parse_yaml(text, name=str(path))
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping, got {type(config).__name__}")
    return apply_overrides(config, list(overrides))


# ------------------------------------------------------------------------------------------ resolve
def _section_name(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) if loc else "top-level"


def _fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The known keys at `loc` (a path of section names from `RunConfig`)."""
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        model = next(t for t in getattr(annotation, "__args__", (annotation,)) if isinstance(t, type))
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _message(err: ValidationError) -> str:
    """One line for the first problem of a validation error, naming the key, the value, what is allowed."""
    errors = err.errors(include_url=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        loc = unknown[0]["loc"][:-1]
        keys = sorted(str(e["loc"][-1]) for e in unknown if e["loc"][:-1] == loc)
        return f"unknown {_section_name(loc)} keys {keys}; known: {_fields(RunConfig, loc)}"
    first = errors[0]
    # Drop pydantic's union-member markers ("int", "list[...]", "function-after[...]") from the path.
    loc = [str(p) for p in first["loc"] if not re.search(r"[\[\]]|^(int|str|float|bool|none)$", str(p))]
    key = ".".join(loc) or "config"
    if first["type"] == "missing" or (key == "run_dir" and not first["input"]):
        return f"config needs {key}" + (" (e.g. --set run_dir=/tmp/run)" if key == "run_dir" else "")
    msg = re.sub(r"^(Value|Assertion) error, ", "", first["msg"])
    if msg[:2].istitle():  # "Input should be" -> "input should be"; "BatchSpec..." stays
        msg = msg[0].lower() + msg[1:]
    if isinstance(first["input"], dict):  # a rule of the section as a whole
        return f"config {key}: {msg}"
    return f"config {key}={first['input']!r}: {msg}"


def grpo_loss_keys() -> tuple[str, ...]:
    """The `losses.grpo_loss` keywords a config sets (the rest are computed by the loop)."""
    import inspect

    from qwenvl_jax.losses import grpo_loss

    internal = ("old_per_token_logps", "ref_per_token_logps", "entropies", "num_items_in_batch",
                "gradient_accumulation_steps", "steps_per_generation", "num_processes",
                "sampling_per_token_logps", "importance_sampling_ratio", "compat")  # fmt: skip
    params = list(inspect.signature(grpo_loss).parameters)[3:]
    return tuple(k for k in params if k not in internal)


def dpo_keys() -> tuple[str, ...]:
    import inspect

    from qwenvl_jax.losses import dpo_objective

    params = inspect.signature(dpo_objective).parameters
    return tuple(k for k in params if k not in _DPO_INTERNAL)


def resolve(config: dict) -> dict:
    """Defaults merged in, every key and value checked and coerced; raises `ConfigError` naming the key."""
    if not isinstance(config, dict):
        raise ConfigError(f"a config is a mapping, got {type(config).__name__}")
    merged = merge(DEFAULTS, config)
    for section in ("lora", "optim", "dpo", "grpo", "ppo", "reward"):  # `lora: null` means an empty section
        if merged.get(section) is None:
            merged[section] = {}
    try:
        checked = RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_message(err)) from None
    # The merged dict with each value as the schema coerced it (e.g. "1e-5" -> 1e-05), nothing added.
    out = checked.model_dump(by_alias=True, exclude_unset=True)
    for section in ("lora", "optim", "dpo", "grpo", "ppo", "reward"):
        out[section] = checked.__getattribute__(section).model_dump(exclude_unset=True)
    _cross_checks(out, config)
    return out
