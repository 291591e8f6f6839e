"""Rollouts -> static-shape training micro-batches for GRPO (host side: numpy only, never jax).

Row `r` of a generation batch is completion `r % G` of prompt `r // G` (the engine's order). Its training
example is the prompt's ids followed by the completion's tokens (cut after the first stop token, which is
kept, as TRL's completion mask keeps the EOS), labels on the completion tokens only, and the prompt's
vision inputs; `collate` pads the rows and computes positions exactly as for SFT.

Per-row arrays that `collate` does not know are aligned with the SHIFTED training log-probs (index `j`
holds the log-prob of the token at position `j + 1`): the sampler's log-prob of completion token `k` of a
prompt of `Lp` tokens goes to index `Lp - 1 + k`.

Vision: the rows of one prompt in a micro-batch carry the same images, so they are encoded once
(`collate(share=...)`): with G = B the vision tower encodes one image where it would encode B. The
micro-batch's patch budget is `shared_vision_budget`, static for the run's layout (one compiled shape).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwenvl_jax.processing.batch import IGNORE_INDEX, BatchSpec, collate

VISION_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


@dataclasses.dataclass
class Rollouts:
    """The completions of one generation batch; rows `i*G .. i*G+G-1` belong to prompt `i`."""

    tokens: np.ndarray  # (R, N) int32, padding after `lengths`
    lengths: np.ndarray  # (R,) tokens kept, the stop token included
    logprobs: np.ndarray  # (R, N) float32 sampler log-probs of `tokens` (0 after the end)
    stopped: np.ndarray  # (R,) bool: ended on a stop token (False: cut at max_completion_length)
    num_generations: int

    @property
    def prompt_index(self) -> np.ndarray:
        return np.arange(len(self.lengths)) // self.num_generations

    def completion(self, row: int) -> np.ndarray:
        return self.tokens[row, : self.lengths[row]]


def training_examples(
    prompts: Sequence[Mapping[str, Any]], rollouts: Rollouts, *, mask_truncated_completions: bool = False
) -> list[dict[str, Any]]:
    """One SFT-like example per row: `input_ids` = prompt + completion, `labels` = the completion (all
    -100 for a truncated completion under `mask_truncated_completions`), the prompt's vision inputs."""
    out = []
    for row, p in enumerate(rollouts.prompt_index.tolist()):
        prompt = prompts[p]
        prompt_ids = np.asarray(prompt["input_ids"]).reshape(-1)
        completion = rollouts.completion(row).astype(prompt_ids.dtype)
        masked = mask_truncated_completions and not rollouts.stopped[row]
        ignored = np.full(prompt_ids.size, IGNORE_INDEX, prompt_ids.dtype)
        trained = np.full(completion.size, IGNORE_INDEX, prompt_ids.dtype) if masked else completion
        example = {
            "id": f"{prompt.get('id', p)}#{row % rollouts.num_generations}",
            "input_ids": np.concatenate([prompt_ids, completion]),
            "labels": np.concatenate([ignored, trained]),
        }
        example.update({k: prompt[k] for k in VISION_KEYS if prompt.get(k) is not None})
        out.append(example)
    return out


def prompt_share(batch: Mapping[str, Any]) -> dict[str, int]:
    """The vision inputs one prompt may hold: a training row's share of the micro-batch's budgets in
    `batch` (a config's batch section or `BatchSpec` fields): `image_patches / B` in whole merge blocks,
    `max_images / B` (videos likewise). A micro-batch of B rows may hold B different prompts."""
    rows = int(batch["batch_size"])
    unit = int(batch.get("merge_size") or 2) ** 2
    return {
        "image_patches": int(batch.get("image_patches") or 0) // rows // unit * unit,
        "video_patches": int(batch.get("video_patches") or 0) // rows // unit * unit,
        "max_images": int(batch.get("max_images", 16)) // rows,
        "max_videos": int(batch.get("max_videos", 4)) // rows,
    }


def max_prompts_per_micro_batch(batch_size: int, num_generations: int, num_micro_batches: int) -> int:
    """The most distinct prompts any of the `num_micro_batches` micro-batches of `batch_size` consecutive
    rows holds, row `r` being a completion of prompt `r // num_generations` (groups may straddle two
    micro-batches). A short generation batch has fewer rows, so never more prompts in a micro-batch."""
    rows, g = batch_size * num_micro_batches, num_generations
    return max(
        (min(start + batch_size, rows) - 1) // g - start // g + 1 for start in range(0, rows, batch_size)
    )


def shared_vision_budget(
    batch: Mapping[str, Any], num_generations: int, num_micro_batches: int, *, batch_shards: int = 1
) -> dict[str, int]:
    """`{image_patches, video_patches, max_images, max_videos}` of a GRPO training micro-batch whose rows of
    one prompt share its images (`micro_batches`): `k_max` prompts' shares (`prompt_share`), `k_max` the
    most distinct prompts a micro-batch of the layout holds (`max_prompts_per_micro_batch`). It depends
    on the layout only, never on the data: one compiled shape per run.

    Under a mesh the vision tower splits its patch rows over the batch axes (`batch_shards` = data x fsdp),
    so a patch budget is rounded up to a multiple of `merge_size**2 x batch_shards` (each device a whole
    number of merge units, as an unshared budget that divides has); a `ValueError` naming the key says
    when that would exceed `batch`'s own budget."""
    share = prompt_share(batch)
    k_max = max_prompts_per_micro_batch(int(batch["batch_size"]), num_generations, num_micro_batches)
    step = int(batch.get("merge_size") or 2) ** 2 * batch_shards
    out = {}
    for name, value in share.items():
        need = k_max * value
        if name.endswith("_patches"):
            need = -(-need // step) * step
            full = int(batch.get(name) or 0)
            if need > full:
                raise ValueError(
                    f"batch.{name}={full} with kind: grpo: a micro-batch encodes its {k_max} prompts' images "
                    f"once in {k_max * value} patch rows, {need} once rounded up to a multiple of "
                    f"merge_size**2 x data x fsdp = {step} so that the devices split them, more than the "
                    f"budget; use a multiple of {step}"
                )
        out[name] = need
    return out


def micro_batches(
    prompts: Sequence[Mapping[str, Any]],
    rollouts: Rollouts,
    advantages: np.ndarray,
    spec: BatchSpec,
    *,
    num_micro_batches: int,
    mask_truncated_completions: bool = False,
    batch_shards: int = 1,
    seq: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """The generation batch as `num_micro_batches` collated micro-batches of `spec.batch_size` rows, in
    row order, padded to one sequence length (`seq`, default the bucket of the longest row; one compiled
    shape per step), each with `advantages (B,)` and `sampling_per_token_logps (B, S-1)`; padding rows
    have labels -100 and advantage 0.

    The rows of one prompt share the images of its first row in the micro-batch; the vision budgets are
    `shared_vision_budget(spec, G, num_micro_batches, batch_shards=...)`, so each prompt must hold at most
    its `prompt_share` of `spec` (as the prompt iterator ensures), and the scatter slots are those of
    `spec`'s whole budget: every row's placeholders have one."""
    rows = len(rollouts.lengths)
    if rows > num_micro_batches * spec.batch_size:
        raise ValueError(
            f"{rows} completions do not fit {num_micro_batches} micro-batches of {spec.batch_size} rows"
        )
    examples = training_examples(prompts, rollouts, mask_truncated_completions=mask_truncated_completions)
    if seq is None:
        seq = spec.bucket(max(ex["input_ids"].size for ex in examples))
    budget = shared_vision_budget(
        dataclasses.asdict(spec), rollouts.num_generations, num_micro_batches, batch_shards=batch_shards
    )
    shared_spec = dataclasses.replace(spec, seq_buckets=(seq,), **budget)
    unit = spec.merge_size**2
    slots = {"image": spec.image_patches // unit, "video": spec.video_patches // unit}
    out = []
    for m in range(num_micro_batches):
        chunk = range(m * spec.batch_size, min((m + 1) * spec.batch_size, rows))
        if not chunk:  # a short last generation batch: a micro-batch of padding rows only
            chunk = range(0)
        part = [examples[r] for r in chunk] or [_filler(spec)]
        first: dict[int, int] = {}  # prompt -> its first row in the micro-batch, which owns the images
        share = [first.setdefault(int(rollouts.prompt_index[r]), i) for i, r in enumerate(chunk)]
        share = [None if j == i else j for i, j in enumerate(share)] or [None]
        batch = collate(part, shared_spec, share=share, slots=slots)
        adv = np.zeros(spec.batch_size, np.float32)
        sampled = np.zeros((spec.batch_size, seq - 1), np.float32)
        for i, r in enumerate(chunk):
            adv[i] = advantages[r]
            start = np.asarray(prompts[rollouts.prompt_index[r]]["input_ids"]).size - 1
            n = int(rollouts.lengths[r])
            sampled[i, start : start + n] = rollouts.logprobs[r, :n]
        if not chunk:
            batch["labels"][:] = IGNORE_INDEX
            batch["example_mask"][:] = 0
        batch["advantages"], batch["sampling_per_token_logps"] = adv, sampled
        out.append(batch)
    return out


def _filler(spec: BatchSpec) -> dict[str, Any]:
    return {
        "id": "<filler>",
        "input_ids": np.asarray([spec.pad_token_id]),
        "labels": np.asarray([IGNORE_INDEX]),
    }


def completion_stats(lengths: np.ndarray, stopped: np.ndarray) -> dict[str, float]:
    """TRL's `completions/*` metrics of a generation batch, from its rows' `Rollouts.lengths` and
    `Rollouts.stopped` (on several hosts, every host's rows: `distributed.gather_rows`)."""
    lengths, stopped = np.asarray(lengths, np.float64), np.asarray(stopped, bool)
    term = lengths[stopped]
    stats = {
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": float(1.0 - stopped.mean()),
    }
    if term.size:
        stats.update({
            "completions/mean_terminated_length": float(term.mean()),
            "completions/min_terminated_length": float(term.min()),
            "completions/max_terminated_length": float(term.max()),
        })  # fmt: skip
    else:
        stats.update(dict.fromkeys(
            ("completions/mean_terminated_length", "completions/min_terminated_length",
             "completions/max_terminated_length"), 0.0))  # fmt: skip
    return stats
