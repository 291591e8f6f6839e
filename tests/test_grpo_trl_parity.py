"""One GRPO micro-step of ours vs TRL 1.16 `GRPOTrainer._compute_loss`, end to end (spec rl.md 3).

Both sides run the same tiny random Qwen2.5-VL (spec 7) on two prompts with one image each (different
sizes) and G = 4 FIXED completions per prompt of different lengths, two of them cut at
max_completion_length without EOS. TRL runs its own `_generate_and_score_completions` with only the
sampler replaced (`_generate_single_turn` returns the fixed completions), so the prompt tokenisation, left
padding, processor re-run (pixel_values, image_grid_thw, mm_token_type_ids), rewards -> advantages,
num_items_in_batch and the old / reference log-probs are TRL's own; then `_compute_loss` and `backward()`.
Ours: `Processor.encode_chat` prompts -> `rl.batch.micro_batches` (right-padded rows) -> `grpo_loss_fn`
under `jax.value_and_grad`.

The policy is an "updated" copy θ1 of the checkpoint θ0 (θ0 plus a small perturbation) and the reference
is θ0, so the KL term and its gradient are not trivially zero; with num_iterations = 2 TRL computes the old
log-probs with θ0 at generation time (ours: `score_fn` on θ0), so the ratios differ from 1 and clip.

Compared, float32, at the objectives' tolerances (losses / gradients rtol 2e-5, atol 2e-6), never relaxed:
the loss, the gradient of EVERY parameter (TRL's `.grad` mapped to our layout by the checkpoint key map,
which transposes Linear weights), advantages, num_items_in_batch and TRL's loss metrics (kl, entropy,
clip ratios). These hold through the whole model (vision tower included): measured, |Δ loss| < 1e-7 and
max |Δ grad| < 7e-7 (entries up to 0.4), at most 3e-7 beyond rtol·|g|.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import qwenvl_jax
from conversion import tiny_hf
from qwenvl_jax import losses
from qwenvl_jax.loading import model_from_params
from qwenvl_jax.processing import BatchSpec, Processor
from qwenvl_jax.rl.batch import Rollouts, micro_batches
from qwenvl_jax.train.grpo_step import grpo_loss_fn, score_fn
from qwenvl_jax.train.state import split_model
from qwenvl_jax.weights import flatten_params, hf_to_params

# TRL 1.16's `disable_gradient_checkpointing` (around its no-grad scoring) reads a property transformers 5.24
# deprecated: third-party noise, not our code.
pytestmark = [
    pytest.mark.usefixtures("highest_precision"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

RTOL, ATOL = 2e-5, 2e-6  # rl.md: objectives (losses, gradients), float32
G = 4
MAX_COMPLETION_LENGTH = 12
EOS = 322  # <|im_end|> of the tiny tokenizer (spec 7); ids < 320 are ordinary tokens
PERTURBATION = 0.1  # θ1 = θ0 + 0.1 · std(θ0) · N(0, 1) per tensor: some token ratios leave [0.8, 1.2]

TEXTS = ("Describe this.", "What is in the picture here?")
IMAGE_SIZES = ((56, 84), (112, 140))  # (h, w): 4x6 and 8x10 patches
# Completion lengths by row (prompt r // G); None = cut at MAX_COMPLETION_LENGTH without EOS.
LENGTHS = (5, 9, 3, None, 7, None, 2, 6)


@dataclasses.dataclass(frozen=True)
class Case:
    loss_type: str
    beta: float = 0.0
    num_iterations: int = 1  # 2: TRL scores old log-probs with θ0 at generation time
    mask_truncated_completions: bool = False
    tied: bool = False


CASES = {
    "dapo": Case("dapo"),
    "grpo_tied_mask_truncated": Case("grpo", mask_truncated_completions=True, tied=True),
    "dr_grpo": Case("dr_grpo"),
    "dapo_kl_off_policy": Case("dapo", beta=0.04, num_iterations=2),
}


def _reward(completion_ids, **_):
    return [float(sum(ids) % 7) / 3.0 for ids in completion_ids]


@functools.cache
def _data():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    completions = []
    for n in LENGTHS:
        ids = rng.integers(0, 320, n or MAX_COMPLETION_LENGTH).tolist()
        if n is not None:
            ids[-1] = EOS
        completions.append(ids)
    return images, completions


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per tied flag: the HF dir of θ0, θ1 as an HF state dict, and our θ0 / θ1 models."""
    out = {}
    for tied in (False, True):
        d = tiny_hf.save_tiny_model_dir(tmp_path_factory.mktemp("grpo_trl"), tie_word_embeddings=tied)
        hf = tiny_hf.build_tiny_model(tie_word_embeddings=tied)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, p in hf.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * PERTURBATION * p.std())
        theta1 = {n: p.detach().clone() for n, p in hf.named_parameters()}
        model0 = qwenvl_jax.load(d, dtype="float32")
        flat1 = hf_to_params(((n, t.numpy()) for n, t in theta1.items()), model0.config)
        out[tied] = (d, theta1, model0, model_from_params(model0.config, flat1))
    return out


# ------------------------------------------------------------------------------------------------ TRL


def _trl(case: Case, ckpt_dir, theta1, config, tmp_path):
    """TRL's loss, gradients (flat, our layout), inputs and metrics for the fixed completions."""
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration
    from trl import GRPOConfig, GRPOTrainer

    images, completions = _data()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        ckpt_dir, dtype=torch.float32, attn_implementation="eager"
    )
    processor = tiny_hf.hf_processor(ckpt_dir)
    # What GRPOTrainer's own AutoProcessor load sets: its mm_token_type_ids must line up with the
    # left-padded prompt ids (right-padded, the M-RoPE positions of the shorter prompt would be wrong).
    processor.tokenizer.padding_side = "left"
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(LENGTHS), num_generations=G,
        gradient_accumulation_steps=1, num_iterations=case.num_iterations, loss_type=case.loss_type,
        beta=case.beta, mask_truncated_completions=case.mask_truncated_completions,
        max_completion_length=MAX_COMPLETION_LENGTH, temperature=1.0, bf16=False, fp16=False,
        activation_checkpointing=False, use_cpu=True, report_to="none", seed=0,
    )  # fmt: skip
    dataset = [
        {"prompt": [{"role": "user", "content": t}], "image": im} for t, im in zip(TEXTS, images, strict=True)
    ]
    trainer = GRPOTrainer(
        model=model, reward_funcs=_reward, args=args, train_dataset=Dataset.from_list(dataset),
        processing_class=processor,
    )  # fmt: skip

    def fixed_completions(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        assert len(prompt_ids) == len(completions) and num_generations == G
        return [list(c) for c in completions], None

    trainer._generate_single_turn = fixed_completions
    # What `Trainer.train` sets before the first micro-step: train mode and the accumulation count.
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    # RepeatSampler order: each prompt G times in a row.
    inputs = trainer._generate_and_score_completions([dict(ex) for ex in dataset for _ in range(G)])
    # The update between generation and this micro-step (num_iterations = 2: the old log-probs above are
    # θ0's); the reference model stays θ0.
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            p.copy_(theta1[name])
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    for name, p in trainer.model.named_parameters():
        assert p.grad is not None, f"TRL left {name} without a gradient"
    grads = hf_to_params(((n, p.grad.numpy()) for n, p in trainer.model.named_parameters()), config)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach().item(), grads, inputs, metrics


# ------------------------------------------------------------------------------------------------ ours


def _encode_prompts(processor):
    images, _ = _data()
    prompts = []
    for i, (text, image) in enumerate(zip(TEXTS, images, strict=True)):
        messages = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}
        ]
        enc = processor.encode_chat([messages], add_generation_prompt=True, padding=False)
        prompts.append({"id": str(i), "input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"],
                        "image_grid_thw": enc["image_grid_thw"]})  # fmt: skip
    return prompts


def _rollouts():
    _, completions = _data()
    tokens = np.zeros((len(completions), MAX_COMPLETION_LENGTH), np.int32)
    for r, c in enumerate(completions):
        tokens[r, : len(c)] = c
    return Rollouts(
        tokens=tokens,
        lengths=np.array([len(c) for c in completions]),
        logprobs=np.zeros(tokens.shape, np.float32),
        stopped=np.array([n is not None for n in LENGTHS]),
        num_generations=G,
    )


def _ours(case: Case, ckpt_dir, model0, model1):
    _, completions = _data()
    processor = Processor.from_pretrained(ckpt_dir)
    prompts = _encode_prompts(processor)
    rewards = jnp.asarray(_reward(completions), jnp.float32)[:, None]
    advantages = np.asarray(losses.grpo_advantages(rewards, num_generations=G), np.float32)
    patches = sum(int(p["pixel_values"].shape[0]) for p in prompts for _ in range(G))
    spec = BatchSpec(
        batch_size=len(LENGTHS), seq_buckets=(96,), image_patches=-(-patches // 64) * 64,
        max_images=len(LENGTHS), pad_token_id=processor.pad_token_id,
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
    )  # fmt: skip
    (mb,) = micro_batches(
        prompts, _rollouts(), advantages, spec, num_micro_batches=1,
        mask_truncated_completions=case.mask_truncated_completions,
    )  # fmt: skip
    mb = {k: jnp.asarray(v) for k, v in mb.items() if k != "sampling_per_token_logps"}  # metrics only
    num_items = int((mb["labels"] != losses.IGNORE_INDEX).sum())
    graphdef, params0, frozen = split_model(model0, "full")
    _, params1, _ = split_model(model1, "full")
    if case.num_iterations > 1:
        mb["old_per_token_logps"] = jax.jit(score_fn(graphdef, frozen))(params0, mb)
    loss_fn = grpo_loss_fn(
        graphdef, frozen, jnp.float32(num_items), params0 if case.beta else None,
        loss_type=case.loss_type, beta=case.beta, max_completion_length=MAX_COMPLETION_LENGTH,
    )  # fmt: skip
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, metrics), grads = grad_fn(params1, mb, jax.random.key(0))
    metrics = {k: float(v) for k, v in metrics.items()}
    return float(loss), flatten_params(grads), prompts, advantages, num_items, metrics


# ----------------------------------------------------------------------------------------------- test


@pytest.mark.parametrize("name", list(CASES))
def test_grpo_micro_step_equals_trl(name, checkpoints, tmp_path):
    case = CASES[name]
    ckpt_dir, theta1, model0, model1 = checkpoints[case.tied]
    trl_loss, trl_grads, inputs, trl_metrics = _trl(case, ckpt_dir, theta1, model0.config, tmp_path)
    loss, grads, prompts, advantages, num_items, metrics = _ours(case, ckpt_dir, model0, model1)

    # Same inputs: prompt tokens (TRL's left-padded rows), advantages, completion-token count.
    for r in range(len(LENGTHS)):
        trl_ids = inputs["prompt_ids"][r][inputs["prompt_mask"][r].bool()].numpy()
        np.testing.assert_array_equal(trl_ids, prompts[r // G]["input_ids"])
    assert inputs["prompt_mask"].numpy().min() == 0  # the two prompts differ in length: padding is exercised
    np.testing.assert_allclose(advantages, inputs["advantages"].numpy(), rtol=RTOL, atol=ATOL)
    assert num_items == int(inputs["num_items_in_batch"])
    assert ("old_per_token_logps" in inputs) == (case.num_iterations > 1)
    assert ("ref_per_token_logps" in inputs) == (case.beta != 0.0)

    np.testing.assert_allclose(loss, trl_loss, rtol=RTOL, atol=ATOL)
    assert set(grads) == set(trl_grads)
    for path, ref in trl_grads.items():
        assert np.abs(ref).max() > 1e-3, path  # every parameter is reached by the loss
        np.testing.assert_allclose(np.asarray(grads[path]), ref, rtol=RTOL, atol=ATOL, err_msg=path)

    assert metrics.keys() <= trl_metrics.keys(), sorted(metrics.keys() - trl_metrics.keys())
    for key, value in metrics.items():
        np.testing.assert_allclose(value, trl_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)
    if case.num_iterations > 1:  # the off-policy cases exercise the clip and the KL term
        assert metrics["clip_ratio/region_mean"] > 0 and metrics["kl"] > 0
