"""Rollouts: G completions per prompt from the current policy, with the generation engine.

The prompts of a generation batch are collated LEFT-padded (`spec`, `padding_side="left"`) and run
through `generation.generate` with `n = num_generations`: one prefill per prompt, so each prompt's images
go through the vision tower once per generation, and its keys and values are repeated G times into the
cache. The image and video placeholders (and the other vision special tokens) can never be sampled;
a row stops at the first of the checkpoint's stop ids and the stop token is kept.

The sampling seed of a generation is given by the caller (the loop derives it from the run seed and the
step), so a resumed run draws the same completions; each row draws with its own key (`row_ids`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwenvl_jax.generation import generate
from qwenvl_jax.processing.batch import BatchSpec, collate
from qwenvl_jax.rl.batch import VISION_KEYS, Rollouts


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


def suppressed_ids(config) -> tuple[int, ...]:
    """Token ids a completion may never hold: the image/video placeholders and the vision markers."""
    return tuple(sorted({config.image_token_id, config.video_token_id, config.vision_start_token_id,
                         config.vision_end_token_id, config.vision_token_id}))  # fmt: skip


def rollout(
    model,
    prompts: Sequence[Mapping[str, Any]],
    spec: BatchSpec,
    sampling: SamplingConfig,
    *,
    seed: int,
    mesh=None,
    suppress_token_ids=None,
    row_ids=None,
) -> tuple[Rollouts, dict[str, float]]:
    """`(Rollouts, timing)` of `prompts` (encoded prompt examples: 1-D `input_ids` and vision inputs).

    `suppress_token_ids` (default `suppressed_ids(model.config)`) are never sampled; the sampler's
    log-probs are those of the distribution it sampled from, renormalised without them. Row `r` draws
    with its own key (`generate`'s `row_ids`, one per completion row of `spec.batch_size` prompts): on
    several hosts each passes its rows' ids in the global batch (`train.hosts.global_rows`), so that a
    prompt's completions are those one process holding the whole batch would draw."""
    if spec.padding_side != "left":
        raise ValueError("rollout prompts are collated left-padded (BatchSpec(padding_side='left'))")
    examples = [
        {"id": p.get("id", i), "input_ids": np.asarray(p["input_ids"]).reshape(-1),
         **{k: p[k] for k in VISION_KEYS if p.get(k) is not None}}
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    batch = collate(examples, spec)
    out = generate(
        model,
        batch,
        max_new_tokens=sampling.max_completion_length,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        n=sampling.num_generations,
        seed=seed,
        suppress_token_ids=suppressed_ids(model.config) if suppress_token_ids is None else suppress_token_ids,
        prompt_buckets=spec.seq_buckets,
        mesh=mesh,
        row_ids=row_ids,
    )
    rows = len(prompts) * sampling.num_generations  # the filler prompts of a short batch come after
    stopped = np.asarray([r == "stop" for r in out.finish_reasons[:rows]])
    rollouts = Rollouts(
        tokens=out.tokens[:rows],
        lengths=out.lengths[:rows],
        logprobs=out.logprobs[:rows],
        stopped=stopped,
        num_generations=sampling.num_generations,
    )
    return rollouts, {"prefill_s": out.prefill_s, "decode_s": out.decode_s}
