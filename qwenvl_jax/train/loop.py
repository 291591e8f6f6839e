"""The training loop: `train(config)` runs (or resumes) an SFT, DPO, GRPO, reward-model or PPO run from a config.

The config schema, defaults and validation are in `qwenvl_jax.train.config`. A run directory holds:

    config.json          the resolved config
    metrics.jsonl        one line per optimizer step (`qwenvl_jax.train.logger`), plus tensorboard/ and
                         loss_curves.png
    checkpoints/<step>/  train state (trainable params, optimizer state, step, rng), data iterator, config
    final/               at the end of a run: the whole model (LoRA merged in, frozen parts included) as
                         an Orbax model checkpoint that `qwenvl_jax.load`, `qwenvl-jax export` and
                         `model: {path: run_dir/final}` of a next run (SFT -> DPO) accept
    adapter/             at the end of a LoRA run (not a reward model's): the adapters alone in PEFT's format
                         (`adapter_model.safetensors`, `adapter_config.json`), for transformers + PEFT
                         on the original base

With a checkpoint in `run_dir/checkpoints` the run RESUMES from its latest loadable step: params,
optimizer state, step, rng and the data iterator (so the batches continue where they stopped); metrics past
that step are dropped. A resume whose config changes the state's structure or the data order is refused;
other changes are reported. SIGTERM or Ctrl-C saves a checkpoint at the current step and returns 3 (no
`final/`). A non-finite loss or gradient skips the update (see `train.step`); `max_bad_steps` of them in a
row save a checkpoint and stop the run with `TrainingError`. An update that overflows by itself stops the
run at once, saving nothing of that step (the previous checkpoints stay). Exit codes: `train.runs`.

Before anything is loaded or written, `prepare` checks the whole config, makes every path absolute, checks
the inputs exist and the mesh matches the devices; `run_dir/.lock` then keeps a second process out.

Sharding: with a `mesh` section the model is placed on a `(data, fsdp, tensor)` mesh by
`sharding.DEFAULT_RULES` and the step is jitted with explicit shardings (one compile per batch shape);
without one everything runs on the default device.

Reward (`train.reward_step`): DPO pair records and batches, the backbone plus the scalar head `score`
(`model.value_head`); `final/` holds both (the head as `score/kernel`), which `qwenvl-jax export` writes
as an HF sequence classifier and `qwenvl_jax.reward_model.load_reward_model` loads back.

PPO (`train.ppo`, `train.ppo_step`): prompt records as GRPO's; the state holds the policy and the value
model (its backbone under `"value"`, its head under `"score"`); the reference is the adapter-free base
with LoRA, else a frozen copy of the initial policy; the reward model (`ppo.reward_model`) is loaded frozen
at the compute dtype. `final/` holds the policy.

DPO: the reference is the LoRA-disabled base with `trainable: lora` (no second copy of the weights),
nothing with `dpo.reference_free`, and otherwise a frozen copy of the initial trainable parameters (the
frozen ones are shared, not copied).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.train.config import ConfigError, apply_overrides, load_config, resolve
from qwenvl_jax.train.hosts import check_split
from qwenvl_jax.train.runs import (
    EXIT_OK,
    EXIT_STOPPED,
    EXIT_UNHEALTHY,
    RunLock,
    check_inputs,
    check_mesh,
    check_resume,
    resolve_paths,
)

__all__ = ["ConfigError", "TrainingError", "apply_overrides", "load_config", "train"]


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a streak of non-finite steps); a checkpoint was saved first."""


# ------------------------------------------------------------------------------------------------ setup
# The platform each fused attention backend compiles for (xla runs anywhere).
BACKEND_PLATFORMS = {"cudnn": "gpu", "splash": "tpu"}


def check_backend_platform(model_cfg: dict) -> None:
    """A fused attention backend on a platform that cannot compile it is a config mistake, refused in one
    line before any weights load (it would otherwise fail deep inside XLA at the first step)."""
    import jax

    backend = model_cfg.get("attention_backend")
    platform = BACKEND_PLATFORMS.get(backend)
    if platform is not None and jax.default_backend() != platform:
        raise ConfigError(
            f"model.attention_backend={backend} runs on {platform.upper()} only, and this run's devices "
            f"are {jax.default_backend()}: use xla (or --dry-run to plan for the target)"
        )


def build_model(model_cfg: dict, lora: dict | None = None):
    """The run's model from its `model` section; `lora`: the lora section, whose `quantize` (QLoRA)
    stores the base's kernels in NF4 as they are loaded."""
    check_backend_platform(model_cfg)
    policy = {k: model_cfg[k] for k in ("remat", "attention_backend") if model_cfg.get(k)}
    dtype, param_dtype = model_cfg.get("dtype", "float32"), model_cfg.get("param_dtype", "float32")
    lora = lora or {}
    quantize = {"quantize": lora.get("quantize"), "quantize_vision": bool(lora.get("quantize_vision"))}
    if model_cfg.get("path"):
        from qwenvl_jax import loading

        return loading.load(model_cfg["path"], dtype=dtype, param_dtype=param_dtype, **quantize, **policy)
    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.loading import random_model

    cfg = Qwen25VLConfig.preset(
        model_cfg.get("preset", "tiny"), dtype=dtype, param_dtype=param_dtype, **policy
    )
    return random_model(cfg, int(model_cfg.get("random_seed", 0)), **quantize)


def _quantized_summary(model) -> str | None:
    """One line on a QLoRA base: how many kernels are NF4 and what they hold; None if none are."""
    from flax import nnx

    from qwenvl_jax.quant import is_nf4

    values = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    nf4 = [v for v in values if is_nf4(v)]
    if not nf4:
        return None
    from qwenvl_jax.train.plan import format_bytes

    kernels = sum(int(np.prod(v.shape[:-2])) for v in nf4)  # a stack's layers count one each
    params = sum(int(np.prod(v.shape)) for v in nf4)
    held = format_bytes(sum(v.nbytes for v in nf4))
    return (f"NF4 base: {kernels} kernels ({params:,} params) in {held}; the other weights at "
            f"{model.config.param_dtype}")  # fmt: skip


def processor_dir(config: dict, run_dir: Path) -> Path:
    if config.get("processor"):
        return Path(config["processor"])
    if config["model"].get("path"):
        return Path(config["model"]["path"])
    out = run_dir / "processor"
    if not (out / "tokenizer.json").exists():
        from qwenvl_jax.tiny import write_tiny_checkpoint

        write_tiny_checkpoint(out)
    return out


def image_options(config: dict) -> dict[str, int]:
    """`data.min_pixels` / `data.max_pixels`: the processor's image resize bounds, when the config sets them."""
    return {k: int(config["data"][k]) for k in ("min_pixels", "max_pixels") if config["data"].get(k)}


def data_paths(config: dict, run_dir: Path) -> list[str]:
    data = config["data"]
    if data.get("synthetic"):
        from qwenvl_jax.data import synthetic

        num, seed = int(data["synthetic"]), int(config["seed"])
        if config["kind"] in ("dpo", "grpo", "reward", "ppo"):
            task = synthetic.write_shape_task(run_dir / "data", num_train=num, num_heldout=1, seed=seed)
            return [str(task.grpo if config["kind"] in ("grpo", "ppo") else task.dpo)]
        return [str(synthetic.write_synthetic_data(run_dir / "data", num, seed=seed))]
    paths = data.get("paths")
    if not paths:
        raise ConfigError("config data needs `paths: [...]` or `synthetic: N`")
    return [str(p) for p in ([paths] if isinstance(paths, str) else paths)]


def frame_bound(batch: dict, processor=None, *, data: dict | None = None) -> int:
    """`batch.max_frame_patches` of a run: the config's when set, else the largest frame in patches that the
    processor's resize bounds allow (`max_pixels` of images, and of video frames when the batch has a video
    budget: a frame of h x w pixels, multiples of 28, is (h/14)(w/14) patches), 0 (unbounded) when that
    bound would not help: the full blocks attend over 3 bounded blocks per query (`vision.banded_attention`),
    so a bound of a third of the budget or more costs as much as the whole budget. Without a processor
    (the memory plan) the default processor's bounds with `data.min_pixels`/`max_pixels` stand in."""
    if batch.get("max_frame_patches") is not None:
        return int(batch["max_frame_patches"])
    if processor is None:
        from qwenvl_jax.processing.image import ImageConfig
        from qwenvl_jax.processing.video_sampling import VideoConfig

        image_config = ImageConfig(**{k: int(v) for k, v in (data or {}).items() if k == "max_pixels" and v})
        configs = (image_config, VideoConfig())
    else:
        configs = (processor.image_config, processor.video_config)
    bounds, budgets = [], []
    for kind, cfg in zip(("image", "video"), configs, strict=True):
        budget = int(batch.get(f"{kind}_patches") or 0)
        if budget:
            unit = cfg.merge_size**2
            bounds.append(int(cfg.max_pixels) // cfg.patch_size**2 // unit * unit)
            budgets.append(budget)
    if not bounds or 3 * max(bounds) >= max(budgets):
        return 0
    return max(bounds)


def batch_spec(config: dict, processor=None):
    """`(BatchSpec, pack)` of the config, refused up front (`ConfigError`) when it can never form a batch;
    with the processor, its token ids are filled in and its smallest image is checked against the budget."""
    from qwenvl_jax.processing.batch import BatchSpec, check_spec

    kind = pipeline_kind(config["kind"])
    batch = dict(config["batch"])
    pack = bool(batch.pop("pack", False))
    batch["max_frame_patches"] = frame_bound(batch, processor)
    if kind == "dpo":
        batch["batch_size"] = 2 * int(batch["batch_size"])  # rows [chosen x pairs, rejected x pairs]
    ids = {}
    if processor is not None:
        ids = dict(pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
                   video_token_id=processor.video_token_id)  # fmt: skip
    try:
        spec = BatchSpec.from_dict(batch, **ids)
        min_pixels = processor.image_config.min_pixels if processor is not None else None
        # GRPO's training rows are prompt + completion rows, batched like SFT rows.
        check_spec(spec, "dpo" if kind == "dpo" else "sft", pack, min_pixels=min_pixels)
    except ValueError as err:
        raise ConfigError(f"batch: {err}") from None
    return spec, pack


def pipeline_kind(kind: str) -> str:
    """The data pipeline's kind of a run kind: a reward model reads DPO pairs."""
    return "dpo" if kind == "reward" else kind


def _make_batches(config: dict, run_dir: Path, processor, proc_dir: Path, paths: list[str] | None = None):
    """The record stream's batches; on several processes, this process's shard at its share of the batch
    (`train.hosts`), `paths` the data files process 0 made ready."""
    from qwenvl_jax import distributed as dist
    from qwenvl_jax.data.pipeline import make_batches
    from qwenvl_jax.train.hosts import local_config

    kind, data = pipeline_kind(config["kind"]), config["data"]
    processes = dist.process_count()
    config = local_config(config, processes, frame_bound(config["batch"], processor))
    spec, pack = batch_spec(config, processor)
    options = {"pack": True} if pack else {}
    for key in ("max_length", "mask_vision_tokens"):
        if data.get(key) is not None:
            options[key] = data[key]
    if processes > 1:
        options.update(shard_index=dist.process_index(), shard_count=processes)
    return make_batches(*_source(config, run_dir, processor, proc_dir, paths), spec, kind=kind, **options,
                        **_stream_options(config, run_dir))  # fmt: skip


def _source(config: dict, run_dir: Path, processor, proc_dir: Path, paths=None) -> tuple[list[str], Any]:
    """The data files and the processor (its directory when grain workers load their own)."""
    workers = int(config["data"].get("worker_count", 0))
    return (data_paths(config, run_dir) if paths is None else paths), proc_dir if workers else processor


def _stream_options(config: dict, run_dir: Path) -> dict[str, Any]:
    """What every training kind's record stream takes from the config: policy, order, workers, the skip
    log, column renames and the processor's image bounds."""
    data = config["data"]
    return dict(
        policy=data.get("policy", "skip"),
        seed=int(config["seed"]),
        shuffle=bool(data.get("shuffle", True)),
        num_epochs=data.get("num_epochs"),
        worker_count=int(data.get("worker_count", 0)),
        skip_log=run_dir / _skip_log_name(),
        columns=data.get("columns"),
        image_options=image_options(config),
    )


def _skip_log_name() -> str:
    """Each process logs the records it skipped: `skipped.jsonl` (process 0), `skipped.p<i>.jsonl`."""
    from qwenvl_jax import distributed as dist

    index = dist.process_index()
    return "skipped.jsonl" if index == 0 else f"skipped.p{index}.jsonl"


def _make_prompts(config: dict, run_dir: Path, processor, proc_dir: Path, paths: list[str] | None = None):
    """GRPO's and PPO's prompt iterator: P prompts per generation within its vision budget, each within a
    row's share of the training micro-batch's (`train.grpo.prompt_budgets`, `train.ppo.prompt_budgets`);
    on several processes, this process's shard and its share of the P prompts (`train.hosts`)."""
    from qwenvl_jax import distributed as dist
    from qwenvl_jax.data.prompts import make_prompt_batches
    from qwenvl_jax.train.hosts import local_config

    if config["kind"] == "ppo":
        from qwenvl_jax.train.ppo import ppo_settings as settings
        from qwenvl_jax.train.ppo import prompt_budgets
    else:
        from qwenvl_jax.train.grpo import grpo_settings as settings
        from qwenvl_jax.train.grpo import prompt_budgets

    processes = dist.process_count()
    frames = frame_bound(config["batch"], processor)
    config = local_config(config, processes, frames)
    prompts, budget, per_prompt = prompt_budgets(config)
    per_prompt = {**per_prompt, "max_frame_patches": frames}
    shard = {"shard_index": dist.process_index(), "shard_count": processes} if processes > 1 else {}
    return make_prompt_batches(
        *_source(config, run_dir, processor, proc_dir, paths),
        **shard,
        # PPO's generation batch is its mini-batches' rows: a short last one is dropped, as TRL's loader
        # does (drop_last); GRPO pads a short one with masked rows.
        drop_remainder=config["kind"] == "ppo",
        prompts_per_batch=prompts,
        max_prompt_length=int(settings(config)["max_prompt_length"]),
        prompt_suffix=config["data"].get("prompt_suffix") or "",
        per_prompt=per_prompt,
        **budget,
        **_stream_options(config, run_dir),
    )


def full_params(state, frozen, lora_cfg, *, dequantized_dtype: Any = "float32") -> dict[str, Any]:
    """Flat `{"a/b/c": array}` of the whole model: trainable + frozen, or the base with LoRA merged (a
    QLoRA base's kernels dequantized in `dequantized_dtype`); a reward model's head as `score/kernel`; of
    a PPO state, the policy only."""
    from qwenvl_jax.model.value_head import SCORE, VALUE
    from qwenvl_jax.train import lora as lora_lib

    reward_head = SCORE in state.params and VALUE not in state.params
    head = lora_lib.flatten({SCORE: state.params[SCORE]}) if reward_head else {}
    params = policy_params(state.params)
    if lora_cfg is not None:
        merged = lora_lib.merge_lora(frozen, params, lora_cfg, dequantized_dtype=dequantized_dtype)
        return {**merged, **head}
    return {**lora_lib.flatten(frozen), **lora_lib.flatten(params), **head}


def policy_params(params) -> dict[str, Any]:
    """A state's params without a PPO state's value model or a reward model's head: the policy's (its
    LoRA adapters, in a LoRA state)."""
    from qwenvl_jax.model.value_head import SCORE, VALUE

    return {k: v for k, v in params.items() if k not in (VALUE, SCORE)}


def model_source(model_cfg: dict) -> str:
    """How a run names its model: the checkpoint path, or the preset with random weights."""
    return model_cfg.get("path") or f"preset {model_cfg.get('preset')} (random weights)"


def _ppo_models(config: dict, model, mesh) -> tuple[Any, dict[str, Any]]:
    """PPO's reward model, `(graphdef, params at the compute dtype, head)` or None, and the value model's
    start for `ppo_step.init_ppo_state` (`value_init`: `{"value_init": its backbone, "head": its head}` when
    it starts from the reward model, TRL's default with full fine-tuning; `{}` from the policy)."""
    import jax
    import jax.numpy as jnp

    from qwenvl_jax import sharding as shd
    from qwenvl_jax.safetensors_io import CheckpointError
    from qwenvl_jax.train.ppo import ppo_settings
    from qwenvl_jax.train.state import split_model
    from qwenvl_jax.weights import CheckpointMismatchError

    s = ppo_settings(config)
    path = s["reward_model"]
    if not path:
        return None, {}
    value_init = s["value_init"] or ("reward_model" if config["trainable"] == "full" else "policy")
    keep = value_init == "reward_model"  # its float32 backbone starts the value model
    dtype = model.config.dtype
    _say(f"loading reward model: {path}")
    from qwenvl_jax.reward_model import load_reward_model

    try:
        rm, head = load_reward_model(
            path, dtype=dtype, param_dtype=model.config.param_dtype if keep else dtype
        )
    except (CheckpointError, CheckpointMismatchError, FileNotFoundError) as err:
        raise ConfigError(f"ppo.reward_model: {err}") from None
    if mesh is not None:
        shd.shard_model(rm, mesh)
    graphdef, backbone, _ = split_model(rm, "full")
    value_start = {}
    if keep:
        mine = jax.tree.map(lambda x: x.shape, split_model(model, "full")[1])
        theirs = jax.tree.map(lambda x: x.shape, backbone)
        if mine != theirs:
            raise ConfigError(
                f"ppo.reward_model {path}: not the policy's architecture, so the value model cannot start from "
                "it; set ppo.value_init: policy"
            )
        # Copies: the train state is donated to the step, the reward model's arrays must outlive it.
        value_start = {"value_init": jax.tree.map(lambda x: x.copy(), backbone),
                       "head": jax.tree.map(lambda x: x.copy(), head)}  # fmt: skip
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), backbone)
    del rm, backbone
    return (graphdef, params, head), value_start


class _Steps:
    """The jitted step per batch signature (with a mesh the batch shardings depend on the shapes)."""

    def __init__(self, kind, graphdef, tx, *, mesh, logical_axes, lora_cfg, with_ref, step_kw):
        self.args = dict(kind=kind, graphdef=graphdef, tx=tx)
        self.kw = dict(mesh=mesh, logical_axes=logical_axes, lora_cfg=lora_cfg, **step_kw)
        if kind != "sft":
            self.kw["with_ref_params"] = with_ref
        self.cache: dict = {}
        self.seen: set = set()  # batch signatures compiled so far (jit compiles once per signature)

    @staticmethod
    def _signature(batch):
        # `v.dtype`: a global array of several processes cannot be read as a whole on one.
        return tuple(sorted((k, np.shape(v), str(getattr(v, "dtype", None) or np.asarray(v).dtype))
                            for k, v in batch.items()))  # fmt: skip

    def needs_compile(self, batch) -> bool:
        """Whether the next call with `batch` compiles the step (a batch signature not seen before)."""
        return self._signature(batch) not in self.seen

    def __call__(self, state, frozen, batch, *extra):
        from qwenvl_jax.train.step import make_train_step

        signature = self._signature(batch)
        self.seen.add(signature)
        key = signature if self.kw["mesh"] is not None else None
        fn = self.cache.get(key)
        if fn is None:
            sharded = (
                {"state": state, "frozen": frozen, "batch": batch} if self.kw["mesh"] is not None else {}
            )
            fn = make_train_step(
                self.args["kind"], self.args["graphdef"], self.args["tx"], **sharded, **self.kw
            )
            self.cache[key] = fn
        return fn(state, frozen, batch, *extra)


def _scorer(fn, mesh):
    """`fn(*args, micro_batch)` jitted (GRPO's old log-probs, PPO's scoring pass). On a mesh the
    micro-batch enters laid out as the train step's (rows over data x fsdp, not replicated), and on
    several processes it is this process's rows: the call runs on the global micro-batch of every
    process's rows and returns this process's rows of the outputs (`hosts.score_rows`)."""
    import jax

    from qwenvl_jax.train import hosts

    if mesh is None:
        return jax.jit(fn)
    one = jax.jit(lambda *args: fn(*args[:-1], {k: v[0] for k, v in args[-1].items()}))
    return lambda *args: hosts.score_rows(one, args[:-1], args[-1], mesh)


def _next_micro_batches(batches, accum: int, pad_token_id: int) -> list[dict] | None:
    """The micro-batches of one step, padded to the longest one's bucket (one shape per step)."""
    micro = []
    for _ in range(accum):
        try:
            micro.append(next(batches))
        except StopIteration:
            return None
    return _pad_micro(micro, max(np.shape(mb["input_ids"])[-1] for mb in micro), pad_token_id)


def _pad_micro(micro: list[dict], seq: int, pad_token_id: int) -> list[dict]:
    """The micro-batches padded to `seq` tokens (the longest of all processes)."""
    from qwenvl_jax.processing import pad_to_length

    return [pad_to_length(mb, seq, pad_token_id) for mb in micro]


def _data_states(own: bytes) -> bytes:
    """What a checkpoint stores as the data state: this process's iterator state alone on one process
    (the format single-process runs always had), else every process's, gathered, as JSON
    `{"processes": [base64, ...]}` (`_own_data_state` picks one's back)."""
    from qwenvl_jax import distributed as dist

    if dist.process_count() == 1:
        return own
    states = dist.gather_bytes(own)
    return json.dumps({"processes": [base64.b64encode(x).decode("ascii") for x in states]}).encode()


def _own_data_state(saved: bytes) -> bytes:
    """This process's iterator state from a checkpoint's (`_data_states`); a checkpoint of a run with
    another process count is refused (its shards were other records)."""
    from qwenvl_jax import distributed as dist

    processes, index = dist.process_count(), dist.process_index()
    try:
        value = json.loads(saved)
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    states = value.get("processes") if isinstance(value, dict) else None
    saved_count = 1 if states is None else len(states)
    if saved_count != processes:
        raise ConfigError(
            f"the checkpoint was saved by a run of {saved_count} process(es) and this one has {processes}: "
            "each process reads its own shard of the data, so the data position cannot carry over; resume "
            "with the same number of processes, or use a new run_dir"
        )
    return saved if states is None else base64.b64decode(states[index])


def _row(
    kind: str, step: int, metrics: dict, micro: list[dict], dt: float, records_skipped: int, global_sum=None
) -> dict:
    tokens = float(sum(int((np.asarray(mb["attention_mask"]) > 0).sum()) for mb in micro))
    tokens = global_sum(tokens) if global_sum is not None else tokens
    row: dict[str, Any] = {"step": step, "loss": float(metrics["loss"])}
    row.update(tokens=tokens, tokens_per_s=tokens / dt if dt > 0 else 0.0, time_s=dt)
    row.update(skipped=int(metrics["skipped"]), records_skipped=records_skipped)
    for key, value in metrics.items():
        if key not in row and np.ndim(value) == 0 and key != "num_tokens":
            row[key] = float(value)
    return row


# ------------------------------------------------------------------------------------------------- loop
def _say(text: str) -> None:
    """A status line before the progress bar exists (loading, compiling): silence reads as a hang."""
    print(text, file=sys.stderr, flush=True)


def prepare(config: dict) -> dict:
    """Everything checked before anything is loaded or written: the config, paths (made absolute),
    inputs, the mesh against this process's devices. Raises `ConfigError` naming what is wrong."""
    import jax

    config = resolve_paths(resolve(config))
    check_inputs(config)
    check_split(config, jax.process_count())  # each process collates an equal share of the global batch
    check_mesh(config, jax.device_count(), jax.default_backend())
    batch_spec(config)
    return config


def train(config: dict) -> int:
    """Run (or resume) the run `config` describes; returns an exit code (`train.runs`: 0 finished,
    3 stopped by a signal with a checkpoint saved, 4 finished with too many skipped steps).

    Raises `ConfigError` (before anything is written, or when the run_dir is in use or the resume changes
    the state or data order) and `TrainingError` (a failure during training, after saving what is good).
    """
    from qwenvl_jax import distributed as dist

    config = prepare(config)
    run_dir = Path(config["run_dir"])
    # One writer per run_dir: process 0 holds the lock for the processes of a multi-host run.
    with RunLock(run_dir) if dist.is_primary() else contextlib.nullcontext():
        changes = check_resume(run_dir / "checkpoints", config)
        return _run(config, run_dir, changes)


def _run(config: dict, run_dir: Path, changes: list[str]) -> int:
    import jax

    from qwenvl_jax import distributed as dist
    from qwenvl_jax import losses
    from qwenvl_jax import sharding as shd
    from qwenvl_jax.checkpoint import save_params
    from qwenvl_jax.processing import Processor
    from qwenvl_jax.train import hosts
    from qwenvl_jax.train.checkpoints import TrainCheckpointer
    from qwenvl_jax.train.logger import RunLogger
    from qwenvl_jax.train.lora import LoraConfig, flatten, unflatten
    from qwenvl_jax.train.optim import OptimConfig
    from qwenvl_jax.train.state import (
        abstract_train_state,
        init_train_state,
        param_logical_axes,
        split_model,
    )
    from qwenvl_jax.train.step import stack_micro_batches

    kind, steps, seed = config["kind"], int(config["steps"]), int(config["seed"])
    accum, max_bad = int(config["grad_accum"]), int(config["max_bad_steps"])
    processes, primary = dist.process_count(), dist.is_primary()
    if primary:
        (run_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    _say(f"loading model: {model_source(config['model'])}")
    model = build_model(config["model"], config["lora"] if config["trainable"] == "lora" else None)
    model_config = model.config
    quantized = _quantized_summary(model)
    if quantized:
        _say(quantized)
    paths = None
    if processes > 1:  # process 0 makes the shared inputs (a tiny processor, synthetic data) ready first
        made = (
            json.dumps([data_paths(config, run_dir), str(processor_dir(config, run_dir))]) if primary else ""
        )
        paths, proc_name = json.loads(dist.gather_bytes(made.encode())[0])
        proc_dir = Path(proc_name)
    else:
        proc_dir = processor_dir(config, run_dir)
    processor = Processor.from_pretrained(proc_dir, **image_options(config))
    mesh = shd.make_mesh(**config["mesh"]) if config["mesh"] is not None else None
    if kind == "grpo":
        from qwenvl_jax.train.grpo import GrpoSource

        batches = GrpoSource(config, processor, _make_prompts(config, run_dir, processor, proc_dir, paths),
                             run_dir=run_dir, mesh=mesh)  # fmt: skip
    elif kind == "ppo":
        from qwenvl_jax.train.ppo import PpoSource

        batches = PpoSource(config, processor, _make_prompts(config, run_dir, processor, proc_dir, paths),
                            run_dir=run_dir, eos_token_id=model_config.eos_token_id[0], mesh=mesh)  # fmt: skip
    else:
        batches = _make_batches(config, run_dir, processor, proc_dir, paths)

    logical_axes = param_logical_axes(model) if mesh is not None else None
    if mesh is not None:
        shd.shard_model(model, mesh)
    lora_cfg = None
    if config["trainable"] == "lora":
        lora = dict(config["lora"])
        lora.update({k: tuple(lora[k]) for k in ("targets", "scopes") if k in lora})
        lora_cfg = LoraConfig(**lora)
    optim_cfg = OptimConfig(**{"total_steps": steps, **config["optim"]})
    trainable, train_merger = config["trainable"], bool(config["train_merger"])
    if kind == "reward":
        from qwenvl_jax.train import reward_step

        head_std = float(config["reward"].get("head_init_std", reward_step.INIT_STD))
        abstract_train_state = functools.partial(reward_step.abstract_reward_state, head_init_std=head_std)
        init_train_state = functools.partial(reward_step.init_reward_state, head_init_std=head_std)
    reward = None  # PPO's reward model: (graphdef, params at the compute dtype, head)
    if kind == "ppo":
        from qwenvl_jax.train import ppo_step

        reward, value_start = _ppo_models(config, model, mesh)
        abstract_train_state = ppo_step.abstract_ppo_state
        init_train_state = functools.partial(ppo_step.init_ppo_state, **value_start)
    graphdef, abstract, frozen, tx = abstract_train_state(
        model, optim_cfg, trainable, lora_cfg, seed, train_merger=train_merger
    )
    ck = config["checkpoint"]
    ckpt = TrainCheckpointer(
        run_dir / "checkpoints",
        save_every=int(ck.get("every", 50)),
        keep=int(ck.get("keep", 3)),
        async_save=bool(ck.get("async", True)),
    )
    needs_ref = {"dpo": not config["dpo"].get("reference_free"), "grpo": bool(config["grpo"].get("beta")),
                 "ppo": True}  # fmt: skip
    frozen_ref = lora_cfg is None and needs_ref.get(kind, False)
    # The initial policy (DPO's frozen reference): the model's own trainable arrays.
    initial = split_model(model, trainable, train_merger=train_merger)[1] if frozen_ref else None
    restored = None
    if ckpt.latest_step() is None:
        state = init_train_state(model, optim_cfg, trainable, lora_cfg, seed, train_merger=train_merger)[1]
        del model
    else:
        # Dropped before the restore, so that the restored state is the only copy of the trainable params
        # (besides the DPO reference); Orbax allocates it straight into the shardings of `abstract`.
        del model
        restored = ckpt.restore_latest(abstract)  # CheckpointError when no step loads
        state = restored.state
        batches.set_state(_own_data_state(restored.data_state))
    start = restored.step if restored is not None else 0

    extra: tuple = ()
    if frozen_ref:
        # A fresh state holds `initial` itself and the step donates it: copy. A restored one does not.
        ref = initial if restored is not None else jax.tree.map(lambda x: x.copy(), initial)
        extra = (unflatten({**flatten(frozen), **flatten(ref)}),)
        del initial
    if kind == "dpo":
        step_kw = {"chunk_size": int(config["chunk_size"]), **config["dpo"]}
    elif kind == "reward":
        step_kw = {"pad_token_id": int(processor.pad_token_id), "margin": float(config["reward"].get("margin", 0.0)),
                   "center_rewards_coefficient": config["reward"].get("center_rewards_coefficient")}  # fmt: skip
    elif kind == "ppo":
        from qwenvl_jax.train.grpo import sampler_view
        from qwenvl_jax.train.ppo import ppo_step_kw
        from qwenvl_jax.train.ppo_step import score_fn as ppo_score_fn
        from qwenvl_jax.train.ppo_step import split_ppo

        step_kw = ppo_step_kw(config)
        batches.truncate_log(start)
        ppo_ref = extra[0] if extra else None
        extra = ()  # the reference enters the scoring pass only, never the train step
        score = _scorer(ppo_score_fn(
            graphdef, frozen, lora_cfg=lora_cfg, temperature=step_kw["temperature"], chunk_size=step_kw["chunk_size"],
            reward_graphdef=None if reward is None else reward[0], pad_token_id=int(processor.pad_token_id),
        ), mesh)  # fmt: skip
        reward_args = None if reward is None else (reward[1], reward[2])
        view = sampler_view(graphdef, frozen, lora_cfg, dtype=model_config.dtype, mesh=mesh,
                            logical_axes=logical_axes)  # fmt: skip
    elif kind == "grpo":
        from qwenvl_jax.train.grpo import grpo_step_kw
        from qwenvl_jax.train.grpo_step import score_fn

        step_kw = grpo_step_kw(config)
        batches.truncate_log(start)
        # Old log-probs (num_iterations > 1 or steps_per_generation > grad_accum): jitted once.
        score = _scorer(score_fn(graphdef, frozen, lora_cfg=lora_cfg, chunk_size=step_kw["chunk_size"],
                                 temperature=step_kw["temperature"]), mesh)  # fmt: skip
        from qwenvl_jax.train.grpo import sampler_view

        view = sampler_view(graphdef, frozen, lora_cfg, dtype=model_config.dtype, mesh=mesh,
                            logical_axes=logical_axes)  # fmt: skip
    else:
        step_kw = {"loss_type": config["loss_type"], "chunk_size": int(config["chunk_size"])}
    if kind in ("dpo", "reward") and processes > 1:  # the global rows: one [chosen, rejected] block each
        step_kw["pair_blocks"] = processes
    step_fn = _Steps(
        kind, graphdef, tx, mesh=mesh, logical_axes=logical_axes, lora_cfg=lora_cfg,
        with_ref=bool(extra), step_kw=step_kw,
    )  # fmt: skip

    stop: dict[str, Any] = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    logging = config["logging"]
    if primary:
        logger = RunLogger(
            run_dir,
            steps,
            start,
            tensorboard=bool(logging.get("tensorboard", True)),
            progress=bool(logging.get("progress", True)),
            plot=bool(logging.get("plot", True)),
        )
    else:  # process 0 writes the logs; the others count skipped steps for the exit code, as it does
        from qwenvl_jax.train.logger import read_metrics

        kept = read_metrics(run_dir / "metrics.jsonl") if start else []
        logger = hosts.QuietLogger(sum(1 for r in kept if r["step"] <= start and r.get("skipped")))
    for skipped_step, reason in restored.skipped if restored is not None else ():
        logger.message(f"checkpoint step {skipped_step} is damaged, resuming from an earlier one: {reason}")
    if start:
        logger.message(f"resumed from step {start} ({ckpt.directory})")
    for change in changes:
        logger.message(f"resumed with a changed config: {change}")
    step, bad_streak, finished = start, 0, False

    def data_state() -> bytes:  # every process's iterator position (`TrainCheckpointer`, one per process)
        return _data_states(batches.get_state())

    try:
        while step < steps:
            if (
                processes > 1
                and dist.agree(True, 0, stop["signal"] is not None).stop
                and stop["signal"] is None
            ):
                stop["signal"] = signal.SIGTERM  # another host was signalled: all stop at this step
            if stop["signal"] is not None:
                break
            host: dict[str, Any] = {}
            if kind == "ppo":
                from qwenvl_jax.rl.rewards import RewardError

                try:
                    got = batches.next_step(
                        lambda params=state.params: view(split_ppo(params)[0]),
                        lambda mb, params=state.params: score(params, ppo_ref, reward_args, mb),
                        step + 1,
                    )
                except RewardError as err:
                    raise TrainingError(
                        f"step {step + 1}: {err}; the last checkpoint (step {ckpt.latest_step()}) is kept"
                    ) from None
                micro = None if got is None else got["micro"]
                host = {} if got is None else got
            elif kind == "grpo":
                from qwenvl_jax.rl.rewards import RewardError

                # The current policy generates, from its sampler view (`train.grpo.sampler_view`: compute
                # dtype, decode layout, made on the devices), dropped before the step donates the state.
                try:
                    got = batches.next_step(
                        lambda params=state.params: view(params),
                        step + 1,
                        old_logps=lambda mb, params=state.params: score(params, mb),
                    )
                except RewardError as err:  # a reward function failed under reward_policy: strict
                    raise TrainingError(
                        f"step {step + 1}: {err}; the last checkpoint (step {ckpt.latest_step()}) is kept"
                    ) from None
                micro = None if got is None else got["micro"]
                host = {} if got is None else got
            else:
                micro = _next_micro_batches(batches, accum, processor.pad_token_id)
                if processes > 1:  # data ends for all when it ends for one; one sequence length for all
                    seq = 0 if micro is None else int(np.shape(micro[0]["input_ids"])[-1])
                    agreed = dist.agree(micro is not None, seq, False)
                    micro = (
                        _pad_micro(micro, agreed.seq, processor.pad_token_id) if agreed.have_data else None
                    )
            if micro is None:
                logger.message(f"data exhausted after step {step} of {steps}")
                break
            if kind == "dpo":  # DPO pairs collate their completion as labels (-100 elsewhere)
                micro = [
                    {**{k: v for k, v in mb.items() if k != "labels"},
                     "completion_mask": (mb["labels"] != losses.IGNORE_INDEX).astype(np.int32)}
                    for mb in micro
                ]  # fmt: skip
            elif kind == "reward":  # the rows are scored at their last token: no labels
                micro = [{k: v for k, v in mb.items() if k != "labels"} for mb in micro]
            stacked = stack_micro_batches(micro)
            if processes > 1:
                rows = int(np.shape(micro[0]["input_ids"])[0])
                stacked = hosts.to_global(stacked, mesh, rows)
            if step_fn.needs_compile(stacked):
                shape = "x".join(map(str, np.shape(stacked["input_ids"])))
                logger.message(
                    f"compiling the train step for batches of {shape} (micro-batches x rows x tokens)"
                )
            t0 = time.perf_counter()
            if kind == "sft":
                num_items = losses.sft_num_items_in_batch([mb["labels"] for mb in micro])
                num_items = dist.global_sum(num_items) if processes > 1 else num_items
                state, metrics = step_fn(state, frozen, stacked, np.float32(num_items))
            elif kind == "grpo":
                state, metrics = step_fn(state, frozen, stacked, np.float32(host["num_items"]), *extra)
            else:
                state, metrics = step_fn(state, frozen, stacked, *extra)
            metrics = jax.device_get(metrics)
            step += 1
            row = _row(kind, step, metrics, micro, time.perf_counter() - t0, batches.skipped.total,
                       global_sum=dist.global_sum if processes > 1 else None)  # fmt: skip
            if host:
                row.update(host["metrics"])
                row["time/train_s"] = row["time_s"]
                row["time_s"] += sum(row.get(f"time/{k}_s", 0.0)
                                     for k in ("rollout", "reward", "old_logps", "score", "advantages"))  # fmt: skip
            logger.log(row)
            if not row.get("params_finite", 1):
                last = ckpt.latest_step()
                raise TrainingError(
                    f"step {step}: the optimizer update overflowed (finite loss and gradients, non-finite "
                    f"parameters after the update); nothing from this step was saved. Lower "
                    f"optim.learning_rate and resume from the last checkpoint (step {last})."
                )
            bad_streak = bad_streak + 1 if row["skipped"] else 0
            if bad_streak >= max_bad:
                ckpt.save_now(step, state, data_state(), config)
                raise TrainingError(
                    f"{bad_streak} non-finite steps in a row (steps {step - bad_streak + 1}-{step}): the loss "
                    f"or gradients overflowed and every update was skipped, so the parameters are those of "
                    f"step {step - bad_streak}; checkpoint saved at step {step}. Lower optim.learning_rate, "
                    "check the data, or raise max_bad_steps."
                )
            if ckpt.due(step):
                ckpt.save(step, state, data_state(), config)
        if ckpt.latest_step() != step:
            ckpt.save_now(step, state, data_state(), config)
        finished = stop["signal"] is None
        if not finished:
            name = signal.Signals(stop["signal"]).name
            logger.message(f"{name}: saved step {step}; run the same command to resume (final/ not written)")
    finally:
        if batches.skipped.total:
            logger.message(batches.skipped.summary())
        ckpt.close()
        logger.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not finished:
        return EXIT_STOPPED
    params = full_params(state, frozen, lora_cfg, dequantized_dtype=model_config.param_dtype)
    # A reward model's adapters need its head beside them: its final/ is the export to use.
    adapters = policy_params(state.params) if lora_cfg is not None and kind != "reward" else None
    if processes > 1:  # whole on every host (a collective), written by process 0
        params = hosts.gather_params(params)
        adapters = adapters and {k: hosts.gather_params(v) for k, v in adapters.items()}
    final = run_dir / "final"
    if primary:
        save_params(params, final, model_config, assets_from=proc_dir, overwrite=True)
        print(f"final model: {final}", flush=True)
        if adapters:
            from qwenvl_jax.weights import write_peft_adapter

            path = write_peft_adapter(adapters, lora_cfg, model_config, run_dir / "adapter",
                                      base_model=model_source(config["model"]), overwrite=True)  # fmt: skip
            print(f"LoRA adapters (PEFT): {path}", flush=True)
    hosts.barrier("final")
    skipped, limit = logger.skipped_steps, float(config["max_skipped_fraction"])
    if step and skipped / step > limit:
        _say(
            f"warning: {skipped} of {step} steps were skipped as non-finite (more than max_skipped_fraction="
            f"{limit}): the model in {final} had fewer updates than asked. Check metrics.jsonl; lower "
            "optim.learning_rate or check the data before using it"
        )
        return EXIT_UNHEALTHY
    return EXIT_OK
