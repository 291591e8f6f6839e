"""GRPO's side of the training loop: prompts -> rollouts -> rewards -> advantages -> micro-batches.

Batch geometry (TRL 1.16): a generation batch holds `batch.batch_size x steps_per_generation` completions
(`P = that / G` prompts with G completions each; `steps_per_generation` defaults to `grad_accum`). It is cut
into `steps_per_generation` micro-batches, buffered and served `num_iterations` times; each optimizer step
takes `grad_accum` of them. `steps_per_generation x num_iterations` must be a multiple of `grad_accum`, so
an optimizer step never straddles two generations. When the policy changes while a buffer is still in use
(`grad_accum` not a multiple of `steps_per_generation x num_iterations`), the old log-probs are computed
once, with the weights from before the first update on that batch (TRL's condition); otherwise the ratio
is exactly 1 (on-policy) and none are computed.

Exact resume: the sampling seed of a generation is derived from the run seed and the step that made it,
and a checkpoint taken while a buffer is in use stores what cannot be recomputed (the completions, their
sampler log-probs, advantages and old log-probs, a few MB) with the prompt iterator's position from
before its prompts were pulled; the restored buffer re-encodes those prompts and is bitwise the same.

Per step (times logged as `time/rollout_s`, `time/reward_s`, `time/train_s`):
1. the next P prompts (`data.prompts`: encoded once, images within the budget);
2. `rl.rollout`: G completions per prompt from one prefill each, vision tokens never sampled, cut after
   the first stop id of the checkpoint;
3. `rl.rewards.score`: every reward function on the decoded completions with the records' other columns
   (`None` -> NaN), then `losses.grpo_advantages` over each group of G;
4. `rl.batch.micro_batches`: prompt + completion rows, collated like SFT rows, with advantages and the
   sampler's log-probs; `num_items_in_batch` = completion tokens of the whole generation batch (dapo).
   The rows of one prompt in a micro-batch share its images, encoded once, in the vision budget of
   `micro_batch_budget` (at most `k_max` prompts' shares instead of B rows').
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.rl.batch import prompt_share, shared_vision_budget
from qwenvl_jax.train.config import GRPO_HOST_KEYS, ConfigError, GrpoSection, grpo_loss_keys

_RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


def grpo_settings(config: dict) -> dict[str, Any]:
    """The grpo section with every default filled in."""
    return GrpoSection.model_validate(config.get("grpo") or {}).model_dump()


def steps_per_generation(config: dict) -> int:
    g = grpo_settings(config)
    return int(g["steps_per_generation"] or config["grad_accum"])


def grpo_step_kw(config: dict) -> dict[str, Any]:
    """Keywords of `train.grpo_step.grpo_step`: the sampling temperature, the accumulation factors and
    `losses.grpo_loss`'s."""
    g = grpo_settings(config)
    keys = set(grpo_loss_keys())
    return {"chunk_size": int(config["chunk_size"]), "temperature": float(g["temperature"]),
            "steps_per_generation": steps_per_generation(config),
            "gradient_accumulation_steps": int(config["grad_accum"]),
            **{k: v for k, v in g.items() if k in keys and k not in GRPO_HOST_KEYS}}  # fmt: skip


def prompt_budgets(config: dict) -> tuple[int, dict[str, int], dict[str, int]]:
    """`(prompts per step, generation-batch budget, per-prompt budget)`.

    A training micro-batch of `B` rows may hold the completions of a single prompt B times over, so a
    prompt may hold at most a row's share of the micro-batch's vision budget (`image_patches / B`, in whole
    merge blocks; `max_images / B`); the P prompts of a generation batch then fit P such shares.
    """
    g = grpo_settings(config)
    prompts = int(config["batch"]["batch_size"]) * steps_per_generation(config) // int(g["num_generations"])
    return split_budgets(config["batch"], prompts)


def split_budgets(batch: dict, prompts: int) -> tuple[int, dict[str, int], dict[str, int]]:
    """`(prompts, generation-batch budget, per-prompt budget)` of `prompts` prompts, each holding a row's
    share of the training micro-batch's vision budget (GRPO's and PPO's `prompt_budgets`)."""
    per_prompt = prompt_share(batch)
    return prompts, {k: v * prompts for k, v in per_prompt.items()}, per_prompt


def batch_shards(config: dict) -> int:
    """data x fsdp of the run's mesh (1 without one): the devices a batch's rows and patch rows split over."""
    mesh = config.get("mesh") or {}
    return int(mesh.get("data", 1)) * int(mesh.get("fsdp", 1))


def micro_batch_budget(config: dict, processes: int = 1) -> dict[str, int]:
    """The vision budgets (`image_patches`, `video_patches`, `max_images`, `max_videos`) of a GRPO training
    micro-batch, whose rows of one prompt share its images: `rl.batch.shared_vision_budget` of the run's
    layout (batch_size, num_generations, steps_per_generation) and mesh. On several processes each
    collates its rows with its share of the batch (`local_budget`), and the global micro-batch holds
    `processes` such shares. `ValueError` naming the key when the budget cannot split over the devices."""
    return {k: v * processes for k, v in local_budget(config, processes).items()}


def local_budget(config: dict, processes: int = 1) -> dict[str, int]:
    """One process's part of `micro_batch_budget`: the shared budget of its `batch_size / processes` rows
    in `image_patches / processes` patch rows, split over its `data x fsdp / processes` devices."""
    from qwenvl_jax.train.hosts import local_config

    g = grpo_settings(config)
    batch = local_config(config, processes, 0)["batch"]
    return shared_vision_budget(
        batch,
        int(g["num_generations"]),
        steps_per_generation(config),
        batch_shards=max(batch_shards(config) // processes, 1),
    )


def sampler_view(graphdef, frozen, lora_cfg, *, dtype: str, mesh=None, logical_axes=None):
    """`params -> model`: the weights the rollout decodes with, made by one jitted function from the train
    state on the devices (no host round trip), after every optimizer step that precedes a generation.

    Every parameter is at the compute dtype and, on a mesh, laid out by `sharding.DECODE_RULES`: whole
    along the model width, split by tensor parallelism only, so a decode step reads its weights where they
    are instead of re-gathering FSDP shards for every token.

    With LoRA the adapters are applied, not merged (`lora.attach`: `x W + scale (x A) B`): the view is the
    frozen base plus the adapters at the compute dtype (a QLoRA base's NF4 kernels as they are stored). A
    base leaf already at that dtype and in that layout is the train state's own array (no copy: a bfloat16
    base on one device costs nothing); only the others are cast or re-laid out. The view lives while the generation runs; the memory plan counts what
    it copies (`plan._sampler_view_bytes`).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwenvl_jax import sharding as shd
    from qwenvl_jax.quant import is_nf4
    from qwenvl_jax.train import lora as lora_lib
    from qwenvl_jax.train.step import _param_sharding_tree

    target = jnp.dtype(dtype)
    rules = shd.as_rules(shd.DECODE_RULES)

    def cast(tree):  # a quantized kernel is read as it is stored (dequantized at use)
        def one(x):
            return x.astype(target) if not is_nf4(x) and jnp.issubdtype(x.dtype, jnp.floating) else x

        return jax.tree.map(one, tree, is_leaf=is_nf4)

    def layouts(tree, lora: bool):
        if mesh is None:
            return None
        return _param_sharding_tree(jax.eval_shape(cast, tree), logical_axes, mesh, rules, lora)

    cache: dict = {}

    if lora_cfg is None:

        def make(params):
            if "fn" not in cache:
                shardings = None if mesh is None else (layouts(params, False), layouts(frozen, False))
                cache["fn"] = jax.jit(lambda p, f: (cast(p), cast(f)), out_shardings=shardings)
            trainable, rest = cache["fn"](params, frozen)
            return nnx.merge(graphdef, trainable, rest)

        return make

    flat = lora_lib.flatten(frozen)
    flat_layout = lora_lib.flatten(layouts(frozen, False)) if mesh is not None else {}

    def as_is(path: str) -> bool:
        x = flat[path]
        if not is_nf4(x) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != target:
            return False
        return mesh is None or all(
            a.sharding.is_equivalent_to(s, a.ndim)
            for a, s in zip(jax.tree.leaves(x), jax.tree.leaves(flat_layout[path]), strict=True)
        )

    kept = {p for p in flat if as_is(p)}
    changed = {p: x for p, x in flat.items() if p not in kept}

    def make(params):
        if "fn" not in cache:
            shardings = (
                None if mesh is None else (layouts(params, True), {p: flat_layout[p] for p in changed})
            )
            cache["fn"] = jax.jit(
                lambda adapters, base: (cast(adapters), cast(base)), out_shardings=shardings
            )
        adapters, base = cache["fn"](params, changed)
        base = lora_lib.unflatten({**{p: flat[p] for p in kept}, **base})
        return lora_lib.attach(nnx.merge(graphdef, {}, base), adapters, lora_cfg)

    make.copied_paths = tuple(sorted(changed))  # what the view holds beside the train state
    return make


def _seed(run_seed: int, step: int) -> int:
    return int(np.random.SeedSequence([run_seed, step]).generate_state(1)[0])


class RolloutSource:
    """What GRPO's and PPO's generation sources share: this process's share of the batch and its devices,
    the train and prompt batch specs, sampling, rewards and the per-row gathers over processes."""

    rows: int  # this process's rows of a generation batch

    def _setup(self, config: dict, processor, prompts, settings: dict, budgets, *, num_generations: int,
               run_dir: Path, mesh) -> tuple[dict, int]:  # fmt: skip
        """Set the shared attributes from the run's `config` and the kind's `settings`; `(this process's
        config, its prompts per generation)` (`budgets`: the kind's `prompt_budgets`)."""
        from qwenvl_jax import distributed as dist
        from qwenvl_jax.processing.batch import BatchSpec
        from qwenvl_jax.rl.rewards import RewardError, load_rewards
        from qwenvl_jax.rl.rollout import SamplingConfig
        from qwenvl_jax.train import hosts
        from qwenvl_jax.train.loop import frame_bound

        self.settings = settings
        # On several processes each generates for its share of the prompts on its own devices
        # (`hosts.local_mesh`) and collates its share of the rows (`hosts.local_config`).
        self.processes = dist.process_count()
        config = hosts.local_config(config, self.processes, frame_bound(config["batch"], processor))
        self.processor, self.prompts = processor, prompts
        self.mesh = hosts.local_mesh(mesh) if mesh is not None and self.processes > 1 else mesh
        self.run_seed, self.accum = int(config["seed"]), int(config["grad_accum"])
        prompt_len, completion_len = (
            int(settings["max_prompt_length"]),
            int(settings["max_completion_length"]),
        )
        batch = {k: v for k, v in config["batch"].items() if k != "pack"}
        ids = dict(pad_token_id=processor.pad_token_id, image_token_id=processor.image_token_id,
                   video_token_id=processor.video_token_id)  # fmt: skip
        if "seq_buckets" not in batch:
            batch["seq_buckets"] = (prompt_len + completion_len,)
        batch["max_frame_patches"] = frame_bound(batch, processor)
        self.train_spec = BatchSpec.from_dict(batch, **ids)
        num_prompts, budget, _ = budgets(config)
        self.prompt_spec = BatchSpec(
            batch_size=num_prompts, seq_buckets=(prompt_len,), padding_side="left",
            max_frame_patches=batch["max_frame_patches"], **budget, **ids,
        )  # fmt: skip
        self.sampling = SamplingConfig(
            num_generations=num_generations, max_completion_length=completion_len,
            temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
            top_k=int(settings["top_k"]), min_p=float(settings["min_p"]),
            repetition_penalty=float(settings["repetition_penalty"]),
        )  # fmt: skip
        try:
            self.rewards = load_rewards(config.get("rewards") or [], base_dir=Path.cwd())
        except RewardError as err:  # a name or file the config gives that does not load
            raise ConfigError(f"rewards: {err}") from None
        weights = settings.get("reward_weights")
        self.weights = np.asarray(
            weights if weights is not None else [r.weight for r in self.rewards], np.float32
        )
        self.completions_path = Path(run_dir) / "completions.jsonl"
        return config, num_prompts

    def _gather(self, x) -> tuple[np.ndarray, int]:
        """`(every process's rows, this process's offset in them)` of per-row host values `x`, at most
        `self.rows` of them (`distributed.gather_rows`): rewards, advantages and metrics are those of the
        whole batch."""
        from qwenvl_jax import distributed as dist

        x = np.asarray(x)[: self.rows]
        capacity = np.zeros((self.rows, *x.shape[1:]), x.dtype)
        capacity[: len(x)] = x
        return dist.gather_rows(capacity, len(x))

    def _whole(self, x) -> np.ndarray:
        """Every process's rows of per-row host values `x`, in global row order."""
        return self._gather(x)[0]


class GrpoSource(RolloutSource):
    """Generation batches for the loop, checkpointable like the SFT/DPO batch iterators."""

    def __init__(self, config: dict, processor, prompts, *, run_dir: Path, mesh=None):
        from qwenvl_jax.train import hosts

        g = grpo_settings(config)
        self.G = int(g["num_generations"])
        config, self.num_prompts = self._setup(
            config, processor, prompts, g, prompt_budgets, num_generations=self.G, run_dir=run_dir, mesh=mesh
        )
        self.rows = self.num_prompts * self.G
        self.spg, self.iterations = steps_per_generation(config), int(g["num_iterations"])
        # TRL computes old log-probs only when the policy moves while a buffer is still served.
        self.needs_old = self.accum % (self.spg * self.iterations) != 0
        self.buffer: dict[str, Any] | None = None  # the generation being served, and its position
        self.batch_shards = max(batch_shards(config) // self.processes, 1)
        # Row r of this process's generation batch: its id in the global one (sampling keys).
        self.row_ids = hosts.global_rows(self.rows, self.train_spec.batch_size)

    # The iterator interface the loop checkpoints.
    @property
    def skipped(self):
        return self.prompts.skipped

    def _in_use(self) -> bool:
        return self.buffer is not None and self.buffer["position"] < self.spg * self.iterations

    def get_state(self) -> bytes:
        if not self._in_use():
            return json.dumps({"prompts": self.prompts.get_state().decode("utf-8")}).encode()
        b = self.buffer
        arrays = {"tokens": b["rollouts"].tokens, "lengths": b["rollouts"].lengths,
                  "logprobs": b["rollouts"].logprobs, "stopped": b["rollouts"].stopped,
                  "advantages": b["advantages"]}  # fmt: skip
        if b["old"] is not None:
            arrays["old"] = np.stack(b["old"])
        packed = io.BytesIO()
        np.savez(packed, **arrays)
        return json.dumps({
            "prompts": b["prompts_state"].decode("utf-8"), "position": b["position"], "step": b["step"],
            "buffer": base64.b64encode(packed.getvalue()).decode("ascii"),
        }).encode()  # fmt: skip

    def set_state(self, state: bytes) -> None:
        from qwenvl_jax.rl.batch import Rollouts

        value = json.loads(state)
        if "prompts" not in value:  # a state written before the generation buffer existed
            self.prompts.set_state(state)
            self.buffer = None
            return
        self.prompts.set_state(value["prompts"].encode("utf-8"))
        self.buffer = None
        if "buffer" not in value:
            return
        with np.load(io.BytesIO(base64.b64decode(value["buffer"]))) as f:
            arrays = {k: f[k] for k in f.files}
        before = self.prompts.get_state()
        prompts = next(self.prompts)  # the same prompts, pulled again from the same position
        rollouts = Rollouts(
            arrays["tokens"], arrays["lengths"], arrays["logprobs"], arrays["stopped"], self.G
        )
        micro = self._micro_batches(prompts, rollouts, arrays["advantages"])
        old = list(arrays["old"]) if "old" in arrays else None
        self.buffer = self._buffer(prompts, rollouts, arrays["advantages"], micro, old, before, value["step"])
        self.buffer["position"] = int(value["position"])

    def _micro_batches(self, prompts, rollouts, advantages):
        from qwenvl_jax import distributed as dist
        from qwenvl_jax.rl.batch import micro_batches

        longest = max(
            np.asarray(prompts[r // self.G]["input_ids"]).size + int(n)
            for r, n in enumerate(rollouts.lengths)
        )
        if self.processes > 1:  # one sequence bucket for every process's rows
            longest = dist.agree(True, longest, False).seq
        return micro_batches(
            prompts, rollouts, advantages, self.train_spec, num_micro_batches=self.spg,
            mask_truncated_completions=bool(self.settings["mask_truncated_completions"]),
            batch_shards=self.batch_shards, seq=self.train_spec.bucket(longest),
        )  # fmt: skip

    def _buffer(self, prompts, rollouts, advantages, micro, old, prompts_state, step) -> dict[str, Any]:
        from qwenvl_jax import distributed as dist
        from qwenvl_jax import losses

        if old is not None:
            micro = [{**mb, "old_per_token_logps": o} for mb, o in zip(micro, old, strict=True)]
        num_items = sum(int((mb["labels"] != losses.IGNORE_INDEX).sum()) for mb in micro)
        if self.processes > 1:  # the completion tokens of the whole generation batch
            num_items = int(dist.global_sum(num_items))
        return {"prompts": prompts, "rollouts": rollouts, "advantages": advantages, "micro": micro, "old": old,
                "prompts_state": prompts_state, "step": step, "position": 0,
                "num_items": max(num_items, 1)}  # fmt: skip

    def next_step(self, model_fn, step: int, old_logps=None) -> dict[str, Any] | None:
        """The micro-batches of optimizer step `step` (1-based), the generation's completion-token count
        and, on a step that generated, its host metrics; None when the prompts are exhausted.

        `model_fn()` builds the current policy (called only when a generation is due); `old_logps(mb)`
        scores a micro-batch with the current weights (called only when old log-probs are needed)."""
        metrics: dict[str, Any] = {}
        if not self._in_use():
            metrics = self._generate(model_fn, step, old_logps)
            if metrics is None:
                return None
        b = self.buffer
        micro = []
        for _ in range(self.accum):
            micro.append(b["micro"][b["position"] % self.spg])
            b["position"] += 1
        return {"micro": micro, "num_items": b["num_items"], "metrics": metrics}

    def _generate(self, model_fn, step: int, old_logps) -> dict[str, Any] | None:
        import jax.numpy as jnp

        from qwenvl_jax import distributed as dist
        from qwenvl_jax import losses
        from qwenvl_jax.rl.batch import completion_stats
        from qwenvl_jax.rl.rewards import failure_metrics, score
        from qwenvl_jax.rl.rollout import rollout
        from qwenvl_jax.train import hosts

        before = self.prompts.get_state()
        prompts = next(self.prompts, None)
        if self.processes > 1 and not dist.agree(prompts is not None, 0, False).have_data:
            return None  # the prompts end for all when they end for one
        if prompts is None:
            return None
        model = model_fn()
        if self.processes > 1:
            model = hosts.localize(model, self.mesh)
        t0 = time.perf_counter()
        rollouts, timing = rollout(
            model, prompts, self.prompt_spec, self.sampling, seed=_seed(self.run_seed, step), mesh=self.mesh,
            row_ids=self.row_ids,
        )  # fmt: skip
        del model
        t1 = time.perf_counter()
        G = self.G
        decode = self.processor.tokenizer.decode
        texts = [
            decode(rollouts.completion(r).tolist(), skip_special_tokens=True)
            for r in range(len(rollouts.lengths))
        ]
        conversational = [not isinstance(p["prompt"], str) for p in prompts]
        completions = [
            [{"role": "assistant", "content": t}] if conversational[r // G] else t
            for r, t in enumerate(texts)
        ]
        names = sorted({k for p in prompts for k in p.get("columns", {})} - set(_RESERVED))
        columns = {k: [p.get("columns", {}).get(k) for p in prompts for _ in range(G)] for k in names}
        ids = [f"{p['id']}#{g}" for p in prompts for g in range(G)]
        scores = score(
            self.rewards,
            [p["prompt"] for p in prompts for _ in range(G)],
            completions,
            [rollouts.completion(r).tolist() for r in range(len(texts))],
            columns,
            ids=ids,
            weights=self.weights,
            policy=self.settings["reward_policy"],
            trainer_state={"global_step": step - 1},
        )
        # Advantages and metrics over every process's rows: groups and batch statistics as on one process.
        whole, offset = self._gather(scores.rewards_per_func)
        rewards = jnp.asarray(whole)
        kw = dict(num_generations=G, reward_weights=jnp.asarray(scores.weights),
                  scale_rewards=self.settings["scale_rewards"],
                  multi_objective_aggregation=self.settings["multi_objective_aggregation"])  # fmt: skip
        advantages = np.asarray(losses.grpo_advantages(rewards, **kw), np.float32)
        advantages = advantages[offset : offset + len(texts)]
        metrics = {
            k: float(v) for k, v in losses.grpo_reward_metrics(rewards, names=scores.labels, **kw).items()
        }
        metrics.update(completion_stats(self._whole(rollouts.lengths), self._whole(rollouts.stopped)))
        metrics.update(failure_metrics(scores))
        micro = self._micro_batches(prompts, rollouts, advantages)
        t2 = time.perf_counter()
        old = [np.asarray(old_logps(mb), np.float32) for mb in micro] if self.needs_old else None
        t3 = time.perf_counter()
        self.buffer = self._buffer(prompts, rollouts, advantages, micro, old, before, step)
        metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/old_logps_s": t3 - t2,
                        "time/prefill_s": timing["prefill_s"], "time/decode_s": timing["decode_s"]})  # fmt: skip
        every = int(self.settings["log_completions_every"])
        if every and (step % every == 0 or step == 1) and dist.is_primary():  # process 0's prompts
            self._log_samples(step, prompts, texts, scores, advantages)
        return metrics

    def _log_samples(self, step, prompts, texts, scores, advantages) -> None:
        """A few prompts with all their completions, rewards and advantages, appended to completions.jsonl."""
        count = min(int(self.settings["log_completions_count"]), len(prompts))
        with self.completions_path.open("a", encoding="utf-8") as f:
            for p in range(count):
                for g in range(self.G):
                    r = p * self.G + g
                    rewards = {
                        label: (None if np.isnan(v) else float(v))
                        for label, v in zip(scores.labels, scores.rewards_per_func[r].tolist(), strict=True)
                    }
                    prompt = p_text(prompts[p]["prompt"])
                    f.write(json.dumps({"step": step, "id": f"{prompts[p]['id']}#{g}", "prompt": prompt,
                                        "completion": texts[r], "rewards": rewards,
                                        "advantage": float(advantages[r])}) + "\n")  # fmt: skip

    def truncate_log(self, step: int) -> None:
        from qwenvl_jax import distributed as dist

        if dist.is_primary():
            truncate_samples(self.completions_path, step)


def truncate_samples(path: Path, step: int) -> None:
    """Drop the samples logged past `step` from `path` (a resumed run logs them again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]  # fmt: skip
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def p_text(prompt) -> str:
    """A prompt as one line of text for the samples log (the text parts of its last user turn)."""
    if isinstance(prompt, str):
        return prompt
    parts = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(b.get("text", "<image>" if b.get("type") == "image" else "") for b in content or [])
    return " ".join(p for p in parts if p)
