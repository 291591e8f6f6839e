"""PPO's side of the training loop: prompts -> rollouts -> scores, values, KL -> GAE -> mini-batches.

TRL 0.22.1 `PPOTrainer.train` (spec rl.md section 4), one generation batch at a time:

1. the next P prompts (`data.prompts`, encoded once), P = `batch.batch_size x grad_accum x
   ppo.num_mini_batches` (TRL's `batch_size`), one completion each from the current policy's sampler view
   (`rl.rollout`: one prefill per prompt, vision tokens never sampled, cut after the first stop id);
2. the scoring pass (`train.ppo_step.score_fn`, jitted, micro-batch by micro-batch): the policy's and the
   reference's log-probs of the response tokens, the value model's values and the reward model's score;
   the reward functions (GRPO's API, `rewards:`) add their weighted sum (NaN-skipping, as TRL's nansum);
3. `losses.ppo_advantages`: `missing_eos_penalty` (applied here with the engine's own stop flag, so every
   stop id counts as the EOS), the per-token KL penalty (`kl_coef`, k1/k3), the score after the last
   token, `whiten_rewards`, GAE and advantage whitening, over the whole generation batch;
4. `num_ppo_epochs` passes, each over a fresh permutation of the rows cut into `num_mini_batches`
   mini-batches; one optimizer step per mini-batch, of `grad_accum` micro-batches of `batch.batch_size`
   rows (each micro-batch's rows kept in generation order). On several processes each permutes its own
   rows, so a mini-batch holds an equal share of every process's rows. A generation batch therefore
   serves `num_ppo_epochs x num_mini_batches` optimizer steps; a short last one (the end of the data) is
   dropped, as TRL's loader drops it.

Where this differs from TRL 0.22.1, on purpose:
- the old log-probs are those of the training forward on the rollout's weights (the scoring pass), not
  the sampler's: the first epoch's ratio is then exactly 1, as TRL's is only when its sampler and its
  forward agree; the sampler's are compared with them (`sampling/sampling_logp_difference/*`);
- the arrays have `T = max_completion_length` columns whatever the completions' lengths (static shapes);
  past a row's end everything is masked, so only TRL's `objective/entropy` quirk (-1 per padded position)
  depends on it;
- metrics are logged every optimizer step: the mini-batch's (`policy/*`, `loss/*`, `val/*`), and at each
  step that generated the generation batch's (`objective/*`, `completions/*`, `rewards/*`).

Exact resume: the sampling seed and the epoch permutations derive from the run seed and the step that
generated; a checkpoint taken while a generation batch is in use stores its completions and PPO arrays
(a few MB) with the prompt iterator's position from before its prompts were pulled, and the adaptive KL
coefficient.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from qwenvl_jax.train.config import PPO_LOSS_KEYS, PpoSection
from qwenvl_jax.train.grpo import _RESERVED, RolloutSource, _seed, p_text, split_budgets, truncate_samples

# The per-row arrays a generation batch keeps (and a checkpoint stores) for its optimizer steps.
ROW_ARRAYS = ("logprobs", "values", "advantages", "returns", "padding_mask", "padding_mask_p1")


def ppo_settings(config: dict) -> dict[str, Any]:
    """The ppo section with every default filled in."""
    return PpoSection.model_validate(config.get("ppo") or {}).model_dump()


def rows_per_generation(config: dict) -> int:
    """TRL's `batch_size`: rows (= prompts) per generation batch."""
    return (
        int(config["batch"]["batch_size"])
        * int(config["grad_accum"])
        * int(ppo_settings(config)["num_mini_batches"])
    )


def steps_per_generation(config: dict) -> int:
    """Optimizer steps served by one generation batch."""
    s = ppo_settings(config)
    return int(s["num_ppo_epochs"]) * int(s["num_mini_batches"])


def prompt_budgets(config: dict) -> tuple[int, dict[str, int], dict[str, int]]:
    """`(prompts per generation, generation-batch budget, per-prompt budget)`: a prompt holds at most a
    row's share of a training micro-batch's vision budget (as GRPO's, with one completion per prompt)."""
    return split_budgets(config["batch"], rows_per_generation(config))


def ppo_step_kw(config: dict) -> dict[str, Any]:
    """Keywords of `train.ppo_step.ppo_step`."""
    s = ppo_settings(config)
    return {"chunk_size": int(config["chunk_size"]), "temperature": float(s["temperature"]),
            **{k: s[k] for k in PPO_LOSS_KEYS}}  # fmt: skip


def turn_suffix(processor) -> tuple[int, np.ndarray]:
    """`(turn-end id, the ids the chat template writes after it)`: for Qwen `<|im_end|>` and `"\n"`. A
    reward model trained on templated pairs reads its head at the last token of the row, the template's
    `"\n"` after `<|im_end|>`; a rollout stops AT `<|im_end|>`. PPO appends these ids to every completion
    that ended on the turn-end id, so the reward model scores it where it was trained to (TRL 0.22.1 reads
    the `<|im_end|>` itself). They carry no label and, the model being causal, change nothing before them."""
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ids = np.asarray(processor.encode_chat([conv], padding=False)["input_ids"]).reshape(-1)
    end = processor.tokenizer.token_to_id("<|im_end|>")
    if end is None or end not in ids:
        return -1, np.zeros(0, ids.dtype)
    last = int(np.nonzero(ids == end)[0][-1])
    return int(end), ids[last + 1 :]


def response_index(prompt_len: int, seq: int, t: int) -> np.ndarray:
    """`(t,)` int32: the shifted position that scores response token k, `prompt_len - 1 + k`, clipped to
    the row (positions past the row's end are masked by `padding_mask`)."""
    return np.minimum(prompt_len - 1 + np.arange(t), seq - 2).astype(np.int32)


class PpoSource(RolloutSource):
    """Generation batches for the loop, checkpointable like the other kinds' batch iterators."""

    def __init__(self, config: dict, processor, prompts, *, run_dir: Path, eos_token_id: int, mesh=None):
        from qwenvl_jax import distributed as dist
        from qwenvl_jax.train import hosts

        # The PPO arrays (GAE, whitening) are computed over every process's rows.
        s = ppo_settings(config)
        config, _ = self._setup(config, processor, prompts, s, prompt_budgets, num_generations=1, run_dir=run_dir,
                                mesh=mesh)  # fmt: skip
        self.mini = int(s["num_mini_batches"])
        self.rows = rows_per_generation(config)
        self.per_generation = steps_per_generation(config)
        self.T = int(s["max_completion_length"])
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(processor.pad_token_id)
        self.kl_coef = float(s["kl_coef"])
        self.turn_end, self.suffix = turn_suffix(processor)
        self.buffer: dict[str, Any] | None = None
        self.row_offset = dist.process_index() * self.rows  # this process's rows in the gathered arrays
        self.row_ids = hosts.global_rows(self.rows, self.train_spec.batch_size)  # sampling keys

    @property
    def skipped(self):
        return self.prompts.skipped

    def _in_use(self) -> bool:
        return self.buffer is not None and self.buffer["position"] < self.per_generation

    # ----------------------------------------------------------------------------------- checkpoint
    def get_state(self) -> bytes:
        if not self._in_use():
            return json.dumps(
                {"prompts": self.prompts.get_state().decode("utf-8"), "kl_coef": self.kl_coef}
            ).encode()
        b = self.buffer
        r = b["rollouts"]
        arrays = {"tokens": r.tokens, "lengths": r.lengths, "sampler_logprobs": r.logprobs, "stopped": r.stopped,
                  **b["arrays"]}  # fmt: skip
        packed = io.BytesIO()
        np.savez(packed, **arrays)
        return json.dumps({
            "prompts": b["prompts_state"].decode("utf-8"), "position": b["position"], "step": b["step"],
            "kl_coef": self.kl_coef, "buffer": base64.b64encode(packed.getvalue()).decode("ascii"),
        }).encode()  # fmt: skip

    def set_state(self, state: bytes) -> None:
        from qwenvl_jax.rl.batch import Rollouts

        value = json.loads(state)
        self.prompts.set_state(value["prompts"].encode("utf-8"))
        self.kl_coef = float(value["kl_coef"])
        self.buffer = None
        if "buffer" not in value:
            return
        with np.load(io.BytesIO(base64.b64decode(value["buffer"]))) as f:
            arrays = {k: f[k] for k in f.files}
        before = self.prompts.get_state()
        prompts = next(self.prompts)  # the same prompts, pulled again from the same position
        rollouts = Rollouts(
            arrays["tokens"], arrays["lengths"], arrays["sampler_logprobs"], arrays["stopped"], 1
        )
        self.buffer = self._buffer(
            prompts, rollouts, {k: arrays[k] for k in ROW_ARRAYS}, before, value["step"]
        )
        self.buffer["position"] = int(value["position"])

    def _buffer(self, prompts, rollouts, arrays, prompts_state, step) -> dict[str, Any]:
        from qwenvl_jax.rl.batch import training_examples

        examples = training_examples(prompts, rollouts)
        if self.suffix.size:  # the template's turn ending after a completed turn (`turn_suffix`)
            for r, ex in enumerate(examples):
                if rollouts.lengths[r] and rollouts.completion(r)[-1] == self.turn_end:
                    ex["input_ids"] = np.concatenate(
                        [ex["input_ids"], self.suffix.astype(ex["input_ids"].dtype)]
                    )
                    ex["labels"] = np.concatenate(
                        [ex["labels"], np.full(self.suffix.size, -100, ex["labels"].dtype)]
                    )
        longest = max(ex["input_ids"].size for ex in examples)
        if self.processes > 1:  # one sequence bucket for every process's rows
            from qwenvl_jax import distributed as dist

            longest = dist.agree(True, longest, False).seq
        seq = self.train_spec.bucket(longest)
        starts = [np.asarray(prompts[i]["input_ids"]).size for i in range(len(prompts))]
        index = np.stack([response_index(n, seq, self.T) for n in starts])
        return {"prompts": prompts, "rollouts": rollouts, "arrays": arrays, "examples": examples, "seq": seq,
                "index": index, "prompts_state": prompts_state, "step": step, "position": 0}  # fmt: skip

    # ------------------------------------------------------------------------------------- serving
    def collate(self, rows, buffer=None) -> dict[str, np.ndarray]:
        """The micro-batch of generation-batch rows `rows` (at most `batch.batch_size`; fewer are padded
        with masked rows): collated prompt + response rows, `response_index` and the PPO arrays."""
        import dataclasses

        from qwenvl_jax.processing.batch import collate

        b = self.buffer if buffer is None else buffer
        spec = dataclasses.replace(self.train_spec, seq_buckets=(b["seq"],))
        batch = collate([b["examples"][r] for r in rows], spec)
        n = spec.batch_size
        batch["response_index"] = np.zeros((n, self.T), np.int32)
        batch["response_index"][: len(rows)] = b["index"][rows]
        for key, x in b.get("arrays", {}).items():
            fill = True if x.dtype == bool else 0
            out = np.full((n, self.T), fill, x.dtype)
            out[: len(rows)] = x[rows]
            batch[key] = out
        return batch

    def next_step(self, model_fn, score, step: int) -> dict[str, Any] | None:
        """The micro-batches of optimizer step `step` (1-based) and, on a step that generated, the
        generation's metrics; None when the prompts are exhausted. `model_fn()` builds the policy's sampler
        view (called only when a generation is due); `score(mb)` runs the scoring pass on a micro-batch."""
        metrics: dict[str, Any] = {}
        if not self._in_use():
            metrics = self._generate(model_fn, score, step)
            if metrics is None:
                return None
        b = self.buffer
        epoch, mini = divmod(b["position"], self.mini)
        order = np.random.default_rng([self.run_seed, b["step"], epoch]).permutation(self.rows)
        size = self.rows // self.mini
        rows = order[mini * size : (mini + 1) * size]
        n = self.train_spec.batch_size
        # Each micro-batch's rows in generation order: the permutation decides which rows train together;
        # their order within a micro-batch would only change float summation order (and, on several
        # processes, a micro-batch is every process's block in turn, as one process's would be).
        micro = [self.collate(np.sort(rows[i : i + n])) for i in range(0, size, n)]
        b["position"] += 1
        return {"micro": micro, "metrics": metrics}

    def _generate(self, model_fn, score, step: int) -> dict[str, Any] | None:
        from qwenvl_jax import distributed as dist
        from qwenvl_jax.losses_ppo import adaptive_kl_coef, ppo_advantages
        from qwenvl_jax.rl.batch import completion_stats
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
        rollouts, timing = rollout(model, prompts, self.prompt_spec, self.sampling,
                                   seed=_seed(self.run_seed, step), mesh=self.mesh, row_ids=self.row_ids)  # fmt: skip
        del model
        t1 = time.perf_counter()
        decode = self.processor.tokenizer.decode
        texts = [
            decode(rollouts.completion(r).tolist(), skip_special_tokens=True) for r in range(len(prompts))
        ]
        fn_scores, metrics = self._reward_functions(prompts, rollouts, texts, step)
        t2 = time.perf_counter()
        # The scoring pass, micro-batch by micro-batch in row order.
        self.buffer = self._buffer(prompts, rollouts, {}, before, step)
        n = self.train_spec.batch_size
        parts = [score(self.collate(np.arange(i, min(i + n, self.rows)))) for i in range(0, self.rows, n)]
        scored = {k: np.concatenate([np.asarray(p[k]) for p in parts])[: self.rows] for k in parts[0]}
        t3 = time.perf_counter()
        scores = scored.get("scores", np.zeros(self.rows, np.float32)) + fn_scores
        s = self.settings
        if s["missing_eos_penalty"] is not None:  # every stop id counts as the EOS (the engine's flag)
            scores = np.where(rollouts.stopped, scores, scores - float(s["missing_eos_penalty"]))
        responses = np.full((self.rows, self.T), self.pad_token_id, np.int32)
        for r in range(self.rows):
            c = rollouts.completion(r)[: self.T]
            responses[r, : c.size] = c
        # GAE and whitening over the whole generation batch: every process's rows, as on one process.
        responses, scores = self._whole(responses), self._whole(scores)
        scored = {k: self._whole(v) for k, v in scored.items()}
        lengths, stopped = self._whole(rollouts.lengths), self._whole(rollouts.stopped)
        mine = slice(self.row_offset, self.row_offset + self.rows)
        out = ppo_advantages(
            responses, scored["logprobs"], scored["ref_logprobs"], scored["values"], scores.astype(np.float32),
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, stop_token_id=None,
            kl_coef=self.kl_coef, kl_estimator=s["kl_estimator"], gamma=float(s["gamma"]), lam=float(s["lam"]),
            whiten_rewards=bool(s["whiten_rewards"]),
        )  # fmt: skip
        self.buffer["arrays"] = {k: np.asarray(out[k])[mine] for k in ROW_ARRAYS}
        metrics.update({k: float(v) for k, v in out["metrics"].items() if k != "val/num_eos_tokens"})
        metrics["val/num_eos_tokens"] = float(stopped.sum())
        metrics["objective/kl_coef"] = self.kl_coef
        metrics.update(completion_stats(lengths, stopped))
        metrics.update(_sampling_gap(lengths, self._whole(rollouts.logprobs), scored["logprobs"]))
        if s["kl_target"] is not None:  # the coefficient of the NEXT generation batch
            self.kl_coef = float(adaptive_kl_coef(self.kl_coef, metrics["objective/kl"], self.rows,
                                                  target=float(s["kl_target"]), horizon=int(s["kl_horizon"])))  # fmt: skip
        t4 = time.perf_counter()
        metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/score_s": t3 - t2,
                        "time/advantages_s": t4 - t3, "time/prefill_s": timing["prefill_s"],
                        "time/decode_s": timing["decode_s"]})  # fmt: skip
        every = int(s["log_completions_every"])  # in generation batches
        if every and ((step - 1) // self.per_generation) % every == 0 and dist.is_primary():
            self._log_samples(step, prompts, texts, scores[mine], np.asarray(out["advantages"])[mine])
        return metrics

    def _reward_functions(self, prompts, rollouts, texts, step) -> tuple[np.ndarray, dict[str, float]]:
        """`(weighted sum per row, metrics)` of the reward functions (zeros and no metrics without any)."""
        from qwenvl_jax.rl.rewards import failure_metrics, score

        if not self.rewards:
            return np.zeros(self.rows, np.float32), {}
        completions = [[{"role": "assistant", "content": t}] if not isinstance(p["prompt"], str) else t
                       for p, t in zip(prompts, texts, strict=True)]  # fmt: skip
        names = sorted({k for p in prompts for k in p.get("columns", {})} - set(_RESERVED))
        columns = {k: [p.get("columns", {}).get(k) for p in prompts] for k in names}
        scores = score(
            self.rewards, [p["prompt"] for p in prompts], completions,
            [rollouts.completion(r).tolist() for r in range(len(prompts))], columns,
            ids=[str(p["id"]) for p in prompts], weights=self.weights, policy=self.settings["reward_policy"],
            trainer_state={"global_step": step - 1},
        )  # fmt: skip
        per_func = np.asarray(scores.rewards_per_func, np.float32)
        total = np.nansum(per_func * np.asarray(scores.weights, np.float32)[None], axis=1)
        per_func = self._whole(per_func)  # the metrics are the whole generation batch's
        metrics = {}
        for j, label in enumerate(scores.labels):
            metrics[f"rewards/{label}/mean"] = (
                float(np.nanmean(per_func[:, j])) if np.isfinite(per_func[:, j]).any() else float("nan")
            )
        metrics.update(failure_metrics(scores))
        return total.astype(np.float32), metrics

    def _log_samples(self, step, prompts, texts, scores, advantages) -> None:
        count = min(int(self.settings["log_completions_count"]), len(prompts))
        with self.completions_path.open("a", encoding="utf-8") as f:
            for r in range(count):
                real = ~self.buffer["arrays"]["padding_mask"][r]
                f.write(json.dumps({"step": step, "id": str(prompts[r]["id"]), "prompt": p_text(prompts[r]["prompt"]),
                                    "completion": texts[r], "score": float(scores[r]),
                                    "advantage_mean": float(advantages[r][real].mean()) if real.any() else 0.0}) + "\n")  # fmt: skip

    def truncate_log(self, step: int) -> None:
        from qwenvl_jax import distributed as dist

        if dist.is_primary():
            truncate_samples(self.completions_path, step)


def _sampling_gap(
    lengths: np.ndarray, sampler_logprobs: np.ndarray, logprobs_bt: np.ndarray
) -> dict[str, float]:
    """The sampler's log-probs (`Rollouts.logprobs`, of rows of `lengths` tokens) against the scoring
    forward's, over the completion tokens (the mismatch users chase between inference and training
    numerics)."""
    t = logprobs_bt.shape[1]
    mask = np.arange(t)[None] < np.minimum(lengths, t)[:, None]
    if not mask.any():
        return {}
    gap = np.abs(np.asarray(logprobs_bt, np.float64) - sampler_logprobs[:, :t])[mask]
    return {"sampling/sampling_logp_difference/mean": float(gap.mean()),
            "sampling/sampling_logp_difference/max": float(gap.max())}  # fmt: skip
